"""``stream-lstm trainer``: the retrainer as its own process, for fleets of many workers.

It consumes the input topic in its own consumer group (``<group_id>-trainer``), keeps every
device's normalized rolling window exactly as the workers do (same decoder, same event-time
rules, same normalizer), and on the same schedule trains a challenger with TBPTT, gates it,
and publishes each promoted version to the compacted models topic. Workers started with
``STREAM_LSTM_TRAINER=external`` follow that topic and hot-swap.
"""

from __future__ import annotations

import argparse
import logging
import signal
import time

import numpy as np

from stream_lstm.config import Settings, load_settings
from stream_lstm.messages import InvalidReading, ReadingDecoder
from stream_lstm.models.registry import LoadedModel, ModelRegistry, model_to_bytes
from stream_lstm.state.ingest import ingest
from stream_lstm.state.table import DeviceTable
from stream_lstm.training.background import decode_result, encode_job, run_job
from stream_lstm.training.data import windows_from_table
from stream_lstm.training.lifecycle import job_params

log = logging.getLogger("stream_lstm.trainer")


class TrainerService:
    """Follows the readings, retrains on schedule, publishes promoted models.

    Parameters
    ----------
    settings
        As for the worker; ``retrain_every_readings`` / ``retrain_every_s`` set the schedule.
    served
        The starting champion.
    """

    def __init__(self, settings: Settings, served: LoadedModel) -> None:
        from stream_lstm.kafka.clients import make_consumer, make_producer
        from stream_lstm.kafka.topics import TopicSpec, ensure_topics

        self.settings = settings
        self.champion = served
        self.table = DeviceTable(settings.max_devices, settings.window, served.spec.n_features,
                                 served.spec.num_layers, served.spec.hidden_size,
                                 normalizer=settings.normalizer, alpha=settings.normalizer_alpha,
                                 std_floor=settings.std_floor,
                                 with_experts=False)  # it learns from windows, forecasts nothing
        self.decoder = ReadingDecoder(settings)
        ensure_topics(settings, [TopicSpec(settings.models_topic, 1, {"cleanup.policy": "compact"})])
        self.consumer = make_consumer(settings, settings.input_topic,
                                      group_id=f"{settings.group_id}-trainer",
                                      auto_offset_reset="earliest", enable_auto_commit=True,
                                      isolation_level="read_committed")
        self.producer = make_producer(settings, max_request_size=64 * 1024 * 1024)
        self.registry = ModelRegistry(settings.model_dir)
        self.readings_since = 0
        self.last = time.monotonic()
        self.published = 0
        self._stop = False
        self.metrics: object | None = None  # set by main() when the endpoint is served
        self.health: object | None = None

    def stop(self) -> None:
        self._stop = True

    def consume_once(self, timeout_ms: int = 500) -> int:
        polled = self.consumer.poll(timeout_ms=timeout_ms, max_records=self.settings.poll_max_records)
        ids, ts, values, parts = [], [], [], []
        now = time.time()
        for tp, recs in polled.items():
            for rec in recs:
                try:
                    r = self.decoder.decode(rec.value, rec.key, now)
                except InvalidReading:
                    continue  # the workers dead-letter it; the trainer just skips it
                ids.append(r.device_id)
                ts.append(r.ts)
                values.append(r.values)
                parts.append(tp.partition)
        if ids:
            ingest(self.table, ids, ts, np.asarray(values, np.float64), parts, now,
                   self.champion.spec.target_channel, self.settings.max_gap_s)
        self.readings_since += len(ids)
        return len(ids)

    def due(self) -> bool:
        s = self.settings
        return ((s.retrain_every_readings > 0 and self.readings_since >= s.retrain_every_readings)
                or (s.retrain_every_s > 0 and time.monotonic() - self.last >= s.retrain_every_s))

    def retrain(self) -> bool:
        """One retrain (in this process); publish when promoted. Returns whether it promoted."""
        self.readings_since, self.last = 0, time.monotonic()
        seqs = windows_from_table(self.table, min(self.settings.window, 2 * self.settings.tbptt_k1))
        if len(seqs) < 2:
            return False
        job = encode_job(self.champion.model, self.champion.spec, {"version": self.champion.version},
                         seqs, job_params(self.settings))
        result = decode_result(run_job(job))
        log.info(f"promotion gate: {'promote' if result.promote else 'reject'}: {result.reason}",
                 extra={"champion": self.champion.version, "seconds": round(result.seconds, 1)})
        if not (result.promote and result.model is not None):
            return False
        loaded = result.model
        version = self.registry.register(loaded.model, loaded.spec,
                                         {**loaded.meta, "version": self.registry.next_version()})
        self.registry.promote(version)
        meta = {**loaded.meta, "version": version}
        self.producer.send(self.settings.models_topic, model_to_bytes(loaded.model, loaded.spec, meta),
                           key=b"model")
        self.producer.flush()
        self.champion = LoadedModel.of(loaded.model, loaded.spec, version)
        self.published += 1
        log.info("published model", extra={"version": version, "topic": self.settings.models_topic})
        return True

    def run(self) -> None:
        try:
            while not self._stop:
                self.consume_once()
                if self.health is not None:
                    self.health.beat()  # type: ignore[attr-defined]
                if self.due():
                    t0 = time.monotonic()
                    try:
                        promoted = self.retrain()
                        outcome = "promoted" if promoted else "rejected"
                    except Exception:  # noqa: BLE001 - a failed retrain must not stop the trainer
                        log.exception("retraining failed")
                        outcome = "failed"
                    if self.metrics is not None:
                        self.metrics.retrain_runs.labels(outcome).inc()  # type: ignore[attr-defined]
                        self.metrics.retrain_duration_seconds.observe(time.monotonic() - t0)  # type: ignore[attr-defined]
        finally:
            self.consumer.close()
            self.producer.close()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Run the retrainer as its own process: consume readings (own group), "
                          "retrain on schedule (STREAM_LSTM_RETRAIN_EVERY_*), publish promoted "
                          "models to STREAM_LSTM_MODELS_TOPIC for workers with "
                          "STREAM_LSTM_TRAINER=external.")


def main(args: argparse.Namespace) -> int:
    from stream_lstm.logs import configure_logging
    from stream_lstm.models.serving import load_served_model

    settings = load_settings()
    configure_logging(settings.log_level)
    if settings.retrain_every_readings == 0 and settings.retrain_every_s == 0:
        settings = settings.model_copy(update={"retrain_every_s": 900.0})
        log.warning("no retrain schedule set; retraining every 900 s")
    service = TrainerService(settings, load_served_model(settings))
    server = None
    if settings.metrics_port:
        from stream_lstm.metrics import HealthState, Metrics, serve_metrics

        service.metrics, service.health = Metrics(), HealthState()
        service.health.set_ready("model", True, service.champion.version)
        server = serve_metrics(service.metrics, service.health, settings.metrics_host,
                               settings.metrics_port)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: service.stop())
    log.info(f"trainer started: input {settings.input_topic} at {settings.bootstrap_servers}, "
             f"publishing to {settings.models_topic}")
    service.run()
    if server is not None:
        server.shutdown()
    return 0
