"""The one retrainer: schedule → train → gate → register → publish.

The worker's in-process lifecycle (``lifecycle.py``: the job runs in a background process, a
promoted model is swapped in) and ``stream-lstm trainer`` (``service.py``: the job runs in the
trainer, a promoted model goes to the models topic) differ only in where the job runs and
where a promoted model goes. What they share is here, once:

* the schedule (``STREAM_LSTM_RETRAIN_EVERY_READINGS`` / ``_S``);
* the job: the fleet's normalized windows and the champion, with the TBPTT and gate settings;
* the verdict: logged, counted, and a promoted challenger registered and promoted in the
  model registry under the next version, unless the registry's promoted version moved while
  it trained (an operator's rollback, or another process's promotion): then nothing is
  promoted, and :meth:`Retrainer.moved` hands the registry's version to serve instead;
* the models topic (compacted, one partition) that external trainers publish to.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from kafka.errors import KafkaError

from stream_lstm.config import Settings
from stream_lstm.kafka.topics import TopicSpec, ensure_topics, require_compacted
from stream_lstm.models.registry import (
    LoadedModel,
    ModelLoadError,
    ModelRegistry,
    PromotionConflict,
    load_model,
    model_to_bytes,
)
from stream_lstm.models.retention import prune
from stream_lstm.models.serving import descends_from
from stream_lstm.state.table import DeviceTable
from stream_lstm.training.background import BackgroundTrainer, RetrainResult, encode_job
from stream_lstm.training.data import windows_from_table

log = logging.getLogger("stream_lstm.training")


def job_params(settings: Settings) -> dict:
    """The TBPTT and gate settings a job carries to the process that runs it, and the
    normalisation its windows had (for the model's metadata)."""
    return {"k1": settings.tbptt_k1, "k2": settings.tbptt_k2, "lr": settings.learning_rate,
            "weight_decay": settings.weight_decay, "grad_clip": settings.grad_clip,
            "max_epochs": settings.max_epochs, "patience": settings.early_stopping_patience,
            "batch_size": settings.train_batch_size,
            "margin": settings.promotion_margin, "dropout": settings.dropout,
            # (not for the job: recorded in the model's metadata, checked where it is served)
            "normalizer": settings.normalizer, "normalizer_alpha": settings.normalizer_alpha,
            "std_floor": settings.std_floor}


# The models topic's partition that carries the models: the trainer (or a rollback) writes
# there and workers read there, whatever partition count a topic created by someone else has
# (the record's key alone hashes elsewhere).
MODELS_PARTITION = 0


# A model is one record. A broker refuses a record over its message.max.bytes (1 MiB by
# default, which a model of hidden size 256 already passes), so the models topic is created
# with its own limit, and the clients that write and read it are sized to match.
MODEL_RECORD_MAX_BYTES = 16 * 1024 * 1024

# How often the registry's PROMOTED file is read for a change made by someone else (a rollback,
# another process's promotion): one small file read, off the per-poll path.
REGISTRY_CHECK_S = 5.0


class ModelPublishError(RuntimeError):
    """The broker did not take a model (too large for the topic, not authorised, away)."""


def ensure_models_topic(settings: Settings) -> None:
    """The compacted models topic: the last record of :data:`MODELS_PARTITION` is the latest
    promoted model. An existing topic is left as it is, but one that deletes is refused: on
    a quiet fleet its only model went with its retention, and workers started later served
    their own registry's (a review)."""
    topic = settings.models_topic
    ensure_topics(settings, [TopicSpec(topic, 1, {
        "cleanup.policy": "compact", "max.message.bytes": MODEL_RECORD_MAX_BYTES})])
    require_compacted(settings, topic, "the models topic", "its latest model is deleted with its "
                      "retention", "Alter the topic, or delete it: stream-lstm creates it compacted; "
                      "then publish the model again (stream-lstm models rollback VERSION --publish)")


def send_model(producer: Any, settings: Settings, model: LoadedModel, timeout_s: float = 60.0) -> None:
    """Send ``model`` to the models topic, where workers following it read, and wait until the
    broker has it; raises :class:`ModelPublishError` saying why not. (A flush alone does not
    say: a refused record only fails its own future.)"""
    data = model_to_bytes(*model)
    try:
        producer.send(settings.models_topic, data, key=b"model",
                      partition=MODELS_PARTITION).get(timeout=timeout_s)
    except KafkaError as exc:
        raise ModelPublishError(
            f"publishing model {model.version} ({len(data):,} bytes) to {settings.models_topic} "
            f"failed: {exc!r}. A model must fit the topic's max.message.bytes "
            f"({MODEL_RECORD_MAX_BYTES:,} when stream-lstm creates it; a topic created "
            "otherwise has the broker's, 1 MiB by default)") from exc


class Retrainer:
    """When to retrain, what to train on, and what a verdict does.

    Parameters
    ----------
    settings
        The schedule, TBPTT and gate settings, and the registry directory.
    metrics
        A :class:`~stream_lstm.metrics.Metrics` for the retrain series, or None.

    >>> import tempfile
    >>> r = Retrainer(Settings(retrain_every_readings=100, model_dir=tempfile.mkdtemp()))
    >>> r.count(99); r.due()
    False
    >>> r.count(1); r.due()
    True
    """

    def __init__(self, settings: Settings, metrics: object | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.registry = ModelRegistry(settings.model_dir)
        self.readings_since = 0
        self.last = time.monotonic()
        # The promoted version as this process last knew it (at start, or its own promotion):
        # a promotion goes through only if it still is (registry.promote's expect).
        self.pointer = self.registry.promoted()
        self.expect = self.pointer
        self._checked = time.monotonic()
        self.trained_from = self.pointer  # the last job's champion (set by job())

    def say_if_windows_are_short(self) -> None:
        """Said by a process that retrains: a TBPTT window longer than the devices' windows,
        which the retrain trains on, does nothing more (`train` on a CSV honours it: not refused)."""
        s = self.settings
        if s.tbptt_k2 > s.window:
            log.warning("STREAM_LSTM_TBPTT_K2=%d is past STREAM_LSTM_WINDOW=%d: a retrain here "
                        "trains on the devices' windows, so it backpropagates through at most %d "
                        "readings", s.tbptt_k2, s.window, s.window)

    @property
    def scheduled(self) -> bool:
        s = self.settings
        return s.retrain_every_readings > 0 or s.retrain_every_s > 0

    def count(self, readings: int) -> None:
        self.readings_since += readings

    def due(self) -> bool:
        """Whether a retrain is due: by readings, or by time if any reading came since the last
        (retraining on the same windows gives the same model: 20 runs in 80 s on an idle fleet)."""
        s = self.settings
        return ((s.retrain_every_readings > 0 and self.readings_since >= s.retrain_every_readings)
                or (s.retrain_every_s > 0 and self.readings_since > 0
                    and time.monotonic() - self.last >= s.retrain_every_s))

    def job(self, table: DeviceTable, champion: LoadedModel) -> tuple[bytes, int] | None:
        """A job for the fleet's windows (and the number of devices in it); None when fewer
        than two devices have enough history. Either way the schedule starts again."""
        self.readings_since, self.last = 0, time.monotonic()
        # What its challenger may replace: PROMOTED as the job starts. (Compared with the
        # pointer at its end instead, a rollback that moved() followed meanwhile passed.)
        self.expect = self.pointer
        self.trained_from = champion.version  # (the verdict's champion, whatever is served by then)
        seqs = windows_from_table(table, min(self.settings.window, 2 * self.settings.tbptt_k1))
        if len(seqs) < 2:  # (said: a due retrain that never came looked like a broken trainer)
            log.info("a retrain was due but skipped: fewer than two devices have a full window "
                     "since this process started", extra={"devices": len(seqs), "devices_in_memory": len(table)})
            return None
        return (encode_job(champion.model, champion.spec, {"version": champion.version}, seqs,
                           job_params(self.settings)), len(seqs))

    def start(self, trainer: BackgroundTrainer, table: DeviceTable, champion: LoadedModel) -> bool:
        """Hand a job for the fleet's windows to ``trainer``; False if there is too little."""
        job = self.job(table, champion)
        if job is None:
            return False
        trainer.submit(job[0])
        log.info("retraining started", extra={"devices": job[1], "champion": champion.version})
        return True

    def turn(self, trainer: BackgroundTrainer, table: DeviceTable,
             champion: LoadedModel) -> RetrainResult | None:
        """Between two polls: a finished job's result (for :meth:`verdict`), or else the next
        job started when one is due and none runs. Never waits for the training."""
        result = trainer.poll()
        if result is None and not trainer.busy and self.due():
            self.start(trainer, table, champion)
        return result

    def verdict(self, result: RetrainResult) -> LoadedModel | None:
        """Count and log a finished job; a promoted challenger is registered and promoted in
        the registry, and returned with its new version. Not if the registry's promoted
        version moved while it trained: a rollback must not be undone by a retrain of the
        model it rolled back (:meth:`moved` then hands over the registry's version)."""
        m, champion = self.metrics, self.trained_from  # (its errors are that model's, a review)
        if m is not None:
            m.retrain_duration_seconds.observe(result.seconds)  # type: ignore[attr-defined]
        if result.error:
            self._count_run("failed")
            log.error("retraining failed", extra={"error": result.error[-500:]})
            return None
        decision = "promote" if result.promote else "reject"
        if m is not None:
            m.retrain_loss.labels("champion").set(result.champion_error)  # type: ignore[attr-defined]
            m.retrain_loss.labels("challenger").set(result.challenger_error)  # type: ignore[attr-defined]
            m.promotion_decisions.labels(decision).inc()  # type: ignore[attr-defined]
        log.info(f"promotion gate: {decision}: {result.reason}",
                 extra={"champion": champion, "champion_error": result.champion_error,
                        "challenger_error": result.challenger_error,
                        "seconds": round(result.seconds, 2)})
        if not (result.promote and result.model is not None):
            self._count_run("rejected")
            return None
        loaded = result.model
        try:
            if (now := self.registry.promoted()) != self.expect:  # (before a version is taken)
                raise PromotionConflict(now)
            # (No version of our own: register takes the next free one, exclusively, so two
            # processes promoting at once both land, each under its own number.)
            version = self.registry.register(loaded.model, loaded.spec, {**loaded.meta, "version": None})
            self.registry.promote(version, expect=self.expect)
        except PromotionConflict as exc:
            self._count_run("superseded")
            self._checked = 0.0  # moved() looks at once
            log.warning(f"not promoting the challenger trained from {champion}: "
                        f"the registry's promoted version moved from {self.expect} to {exc.args[0]} "
                        "while it trained (a rollback, or another process's promotion); serving that",
                        extra={"model_dir": str(self.registry.root)})
            return None
        except OSError as exc:  # a full or read-only model directory: serve on, say so
            self._count_run("failed")
            log.error("the promoted model could not be registered; serving the champion on",
                      extra={"model_dir": str(self.registry.root), "error": repr(exc)[:300]})
            return None
        self._count_run("promoted")
        self.pointer = version
        self.expect = version
        try:  # (a registry that grew a version a retrain for ever: retention.py)
            prune(self.registry)
        except OSError as exc:
            log.warning("old model versions could not be pruned", extra={"error": repr(exc)[:200]})
        return LoadedModel(loaded.model, loaded.spec, {**loaded.meta, "version": version})

    def moved(self, served: str) -> LoadedModel | None:
        """The registry's promoted model, when someone else changed ``PROMOTED`` since this
        process last looked (read every :data:`REGISTRY_CHECK_S`) and it is not ``served``:
        ``stream-lstm models rollback`` takes effect without a restart. A version that does not
        load is said once and not tried again until ``PROMOTED`` changes again."""
        if time.monotonic() - self._checked < REGISTRY_CHECK_S:
            return None
        self._checked = time.monotonic()
        now = self.registry.promoted()
        if now == self.pointer:
            return None
        self.pointer = now
        if now is None or now == served:  # (a removed PROMOTED changes nothing served; the
            return None                   # next job's promotion expects none)
        if (path := self.settings.model_path) is not None:  # the file wins, as at start
            try:
                file_version = load_model(path).version
            except ModelLoadError:
                file_version = None
            if file_version is None or not descends_from(self.registry, now, file_version):
                log.warning(f"the registry's promoted version changed to {now}, which was not "
                            f"retrained from STREAM_LSTM_MODEL_PATH's model: not served (unset it "
                            f"to serve the registry's)")
                return None
        try:
            loaded = self.registry.load(now)
        except ModelLoadError as exc:
            log.error(f"the registry's newly promoted {now} cannot be loaded; serving {served} on: {exc}")
            if self.metrics is not None:
                self.metrics.models_refused.labels("unloadable").inc()  # type: ignore[attr-defined]
            return None
        log.warning(f"the registry's promoted version changed to {now} (a rollback or another "
                    f"process's promotion): serving it instead of {served}")
        return loaded

    def _count_run(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.retrain_runs.labels(outcome).inc()  # type: ignore[attr-defined]
