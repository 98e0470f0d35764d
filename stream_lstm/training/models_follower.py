"""The models topic, followed: what a worker of an external trainer serves.

A worker with ``STREAM_LSTM_TRAINER=external`` serves what the trainer publishes to the
compacted models topic (``training/service.py``, ``models rollback --publish``), not its own
registry: at start the topic's latest loadable model, then each newly published one.
"""

from __future__ import annotations

import logging
import time

from stream_lstm.config import Settings
from stream_lstm.models.registry import LoadedModel, ModelLoadError, model_from_bytes
from stream_lstm.models.serving import (
    UNTRAINED,
    ModelSettingsMismatch,
    check_model_matches_settings,
)
from stream_lstm.training.retrainer import (
    MODEL_RECORD_MAX_BYTES,
    MODELS_PARTITION,
    ensure_models_topic,
)

log = logging.getLogger("stream_lstm.training")

# How many of the topic's last records a start reads for the latest loadable model: one damaged
# record at the end sent a restarted worker back to its own registry, while the running ones
# kept the model before it (the fleet split by restart time).
LOOK_BACK = 5
START_READ_S = 30.0  # the most a start waits for them (a model may be megabytes)


class ModelsFollower:
    """Follows the compacted models topic; returns each newly published model.

    Parameters
    ----------
    settings
        The broker and ``STREAM_LSTM_MODELS_TOPIC`` (created if missing).

    ``latest`` is the topic's latest loadable model when it was created (None for none): a
    worker serves it from its first reading. It used to begin with its own registry's model
    (an empty one's is untrained) and swap a poll later, having published forecasts of the
    wrong model meanwhile. :meth:`poll` returns the models published since (and ``latest``
    first, if the worker started on another).

    Example: see tests/training/test_models_follower.py::test_a_start_serves_the_latest_loadable_model
    """

    def __init__(self, settings: Settings) -> None:
        from kafka.structs import TopicPartition

        from stream_lstm.kafka.clients import make_consumer

        ensure_models_topic(settings)
        self.tp = tp = TopicPartition(settings.models_topic, MODELS_PARTITION)
        self.consumer = make_consumer(settings, group_id=None, enable_auto_commit=False,
                                      isolation_level="read_committed", fetch_max_bytes=MODEL_RECORD_MAX_BYTES,
                                      max_partition_fetch_bytes=MODEL_RECORD_MAX_BYTES)
        self.consumer.assign([tp])
        end = self.consumer.end_offsets([tp])[tp]
        begin = self.consumer.beginning_offsets([tp])[tp]
        self.consumer.seek(tp, max(begin, end - LOOK_BACK))
        self.latest: LoadedModel | None = None
        deadline = time.monotonic() + START_READ_S
        while self.consumer.position(tp) < end and time.monotonic() < deadline:
            self.latest = self._read(self.consumer.poll(timeout_ms=200)) or self.latest
        self._unserved = self.latest  # (the first poll's news, unless served from the start)

    def to_serve(self, settings: Settings) -> LoadedModel | None:
        """:attr:`latest`, to serve from the first reading; None for none, or for one the
        settings contradict (said: the registry's is served, and a running worker refuses it
        as well)."""
        latest, source = self.latest, f"the models topic {settings.models_topic}"
        if latest is None:
            return None
        try:
            check_model_matches_settings(latest, settings, source)
        except ModelSettingsMismatch as exc:
            log.error(f"not serving the models topic's latest: {exc}")
            return None
        log.info("serving model %s from %s", latest.version, source, extra={"model_version": latest.version})
        self._unserved = None
        return latest

    def poll(self) -> LoadedModel | None:
        """The newest model published since the last call, if any (never waits); the first
        call also returns :attr:`latest` when it was not served from the start."""
        unserved, self._unserved = self._unserved, None
        return self._read(self.consumer.poll(timeout_ms=0)) or unserved

    def _read(self, polled: dict) -> LoadedModel | None:
        latest = None
        for recs in polled.values():
            for rec in recs:
                try:
                    loaded = model_from_bytes(rec.value)
                    if loaded.meta.get("version") in (None, UNTRAINED):  # (None: served as "unknown"; the
                        # next unnamed one never swapped in. UNTRAINED: it would replace the host's own.)
                        raise ModelLoadError(f"the model's version {loaded.meta.get('version')!r} is no "
                                             "trainer's: a swap compares names")
                    latest = loaded
                except ModelLoadError as exc:
                    log.error("ignoring an unloadable model from the models topic",
                              extra={"offset": rec.offset, "error": str(exc)})
        return latest

    def close(self) -> None:
        self.consumer.close()
