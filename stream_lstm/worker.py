"""The worker: the long-lived loop that wires every part together.

One iteration is one batch: **poll → decode → state → engine → encode → publish → commit**.

* *poll*: up to ``poll_max_records`` readings from the input topic (consumer group).
* *decode*: :class:`~stream_lstm.messages.ReadingDecoder`; invalid readings go to the DLQ.
* *state*: :func:`~stream_lstm.state.ingest.ingest` applies event-time rules, normalization and
  windows, and orders readings into rounds.
* *engine*: one batched LSTM step per round across all devices.
* *encode / publish*: forecasts (and dead letters, alerts, changelog records) are sent and the
  batch is committed by :class:`~stream_lstm.kafka.publisher.BatchPublisher`.

Every consumed reading ends in exactly one place: a forecast, the warm-up count, the late or
duplicate count, or the DLQ. The counts are metrics, so the accounting can be checked live.
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from kafka.structs import OffsetAndMetadata, TopicPartition

from stream_lstm.config import Settings, load_settings
from stream_lstm.engine import BatchedEngine, resolve_device
from stream_lstm.kafka.clients import make_consumer, make_producer
from stream_lstm.kafka.publisher import BatchPublisher
from stream_lstm.kafka.rebalance import PartitionListener
from stream_lstm.metrics import HealthState, Metrics
from stream_lstm.models.lstm import ModelSpec, SimpleLSTM
from stream_lstm.pipeline import BatchCounts, BatchPipeline
from stream_lstm.state.table import DeviceTable

log = logging.getLogger("stream_lstm.worker")


@dataclass
class Served:
    """The model being served and its version."""

    model: SimpleLSTM
    spec: ModelSpec
    version: str


def fresh_model(settings: Settings) -> Served:
    spec = ModelSpec(
        n_features=settings.n_features, hidden_size=settings.hidden_size,
        num_layers=settings.num_layers, horizon=settings.horizon,
        target_channel=settings.target_channel, dropout=settings.dropout,
    )
    return Served(SimpleLSTM.from_spec(spec), spec, "v0000-untrained")


def load_served_model(settings: Settings) -> Served:
    """The model to serve: STREAM_LSTM_MODEL_PATH, else the registry's promoted version,
    else a freshly initialized model (with a warning)."""
    from stream_lstm.models.registry import ModelRegistry, load_model

    if settings.model_path is not None:
        loaded = load_model(settings.model_path)
    else:
        registry = ModelRegistry(settings.model_dir)
        version = registry.promoted()
        if version is None:
            log.warning(
                "no model given (STREAM_LSTM_MODEL_PATH) and none promoted in %s: serving a "
                "freshly initialized, untrained model", settings.model_dir,
            )
            return fresh_model(settings)
        loaded = registry.load(version)
    return Served(loaded.model, loaded.spec, str(loaded.meta.get("version", "unknown")))


class Worker:
    """The forecasting worker. ``run()`` loops until ``stop()`` (or SIGTERM/SIGINT).

    Parameters
    ----------
    settings
        All settings.
    served
        The model to serve; by default :func:`load_served_model`.
    metrics, health
        Prometheus series and health state; created when not given.
    """

    def __init__(
        self,
        settings: Settings,
        served: Served | None = None,
        metrics: Metrics | None = None,
        health: HealthState | None = None,
    ) -> None:
        self.settings = settings
        self.served = served or load_served_model(settings)
        self.metrics = metrics or Metrics()
        self.health = health or HealthState()
        self.device = resolve_device(settings.device)
        spec = self.served.spec
        self.table = DeviceTable(
            max_devices=settings.max_devices, window=settings.window,
            n_features=spec.n_features, num_layers=spec.num_layers,
            hidden_size=spec.hidden_size, device=self.device,
            normalizer=settings.normalizer, alpha=settings.normalizer_alpha,
            std_floor=settings.std_floor,
        )
        self.engine = BatchedEngine(self.served.model, self.table)
        self.pipeline = BatchPipeline(settings, self.table, self.engine, lambda: self.served.version)
        self._stop = threading.Event()
        self.consumer = None
        self.publisher: BatchPublisher | None = None
        self.assigned: set[int] = set()
        self.totals = BatchCounts()
        self.first_batch_at: float | None = None  # perf_counter of the first batch (benchmarks)

    # ---- lifecycle ------------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()

    def connect(self) -> None:
        """Create the consumer (subscribed, cooperative-sticky) and the publisher."""
        from kafka.coordinator.assignors.cooperative_sticky import (
            CooperativeStickyPartitionAssignor,
        )

        s = self.settings
        exactly_once = s.processing_guarantee == "exactly_once"
        self.consumer = make_consumer(
            s,
            group_id=s.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=s.poll_max_records,
            max_poll_interval_ms=s.max_poll_interval_ms,
            session_timeout_ms=s.session_timeout_ms,
            isolation_level="read_committed",
            partition_assignment_strategy=[CooperativeStickyPartitionAssignor],
            fetch_max_bytes=16 * 1024 * 1024,
            max_partition_fetch_bytes=4 * 1024 * 1024,
            client_id=f"stream-lstm-{self.instance_id}",
        )
        self.consumer.subscribe(
            [s.input_topic], listener=PartitionListener(self.on_assigned, self.on_revoked)
        )
        producer_kw = {"transactional_id": f"{s.group_id}-{self.instance_id}"} if exactly_once else {}
        self.publisher = BatchPublisher(make_producer(s, **producer_kw), exactly_once)
        self.health.set_ready("broker", True)
        self.health.set_ready("model", True, self.served.version)
        self.metrics.set_model_version(self.served.version, time.time())

    @property
    def instance_id(self) -> str:
        return self.settings.instance_id or socket.gethostname()

    def run(self, until: Callable[[Worker], bool] | None = None) -> BatchCounts:
        """Poll and process batches until stopped (or ``until(self)`` is true); then close."""
        if self.consumer is None:
            self.connect()
        assert self.consumer is not None
        try:
            while not self._stop.is_set():
                polled = self.consumer.poll(
                    timeout_ms=self.settings.poll_timeout_ms,
                    max_records=self.settings.poll_max_records,
                )
                self.health.beat()
                if polled:
                    self.process(polled)
                self._update_lag()
                if until is not None and until(self):
                    break
        finally:
            self.close()
        return self.totals

    def close(self) -> None:
        if self.consumer is not None:
            self.consumer.close(autocommit=False)
            self.consumer = None
        if self.publisher is not None:
            self.publisher.producer.close(timeout=10)
            self.publisher = None
        self.health.set_ready("partitions", False)

    # ---- rebalances ----------------------------------------------------------------------
    def on_assigned(self, partitions: set[int]) -> None:
        self.assigned |= partitions
        log.info("partitions assigned", extra={"partitions": sorted(partitions)})
        self.health.set_ready("partitions", True)

    def on_revoked(self, partitions: set[int]) -> None:
        # The previous batch was committed before this poll, so only memory remains to drop.
        gone = self.table.devices_in_partitions(partitions)
        self.table.drop(gone)
        self.assigned -= partitions
        log.info("partitions revoked", extra={"partitions": sorted(partitions), "devices": len(gone)})
        self.health.set_ready("partitions", bool(self.assigned))

    # ---- one batch -------------------------------------------------------------------------
    def process(self, polled: dict[TopicPartition, list]) -> BatchCounts:
        """Run one polled batch through the pipeline, publish it, and commit it."""
        t0 = time.perf_counter()
        if self.first_batch_at is None:
            self.first_batch_at = t0
        m = self.metrics
        assert self.publisher is not None and self.consumer is not None
        commit: dict[TopicPartition, OffsetAndMetadata] = {}
        for tp, records in polled.items():
            m.readings_consumed.labels(tp.topic, str(tp.partition)).inc(len(records))
            commit[tp] = OffsetAndMetadata(records[-1].offset + 1, "", -1)
        records = [rec for recs in polled.values() for rec in recs]
        ti = time.perf_counter()
        out = self.pipeline.handle(records, time.time())
        m.inference_seconds.observe(time.perf_counter() - ti)
        self.publisher.begin()
        send = self.publisher.send
        for topic, key, value, headers in out.records:
            send(topic, value, key=key, headers=headers)
        tc = time.perf_counter()
        self.publisher.commit(commit, self.consumer)
        m.commit_seconds.observe(time.perf_counter() - tc)
        if out.counts.forecasts:
            m.end_to_end_latency_seconds.observe(max(0.0, time.time() - out.oldest_ts))
        self._count(out.counts)
        m.batch_size.observe(out.counts.consumed)
        m.batch_seconds.observe(time.perf_counter() - t0)
        return out.counts

    def _count(self, c: BatchCounts) -> None:
        m = self.metrics
        m.forecasts_published.inc(c.forecasts)
        m.warmup_readings.inc(c.warmup)
        m.late_readings.inc(c.late)
        m.duplicate_readings.inc(c.duplicate)
        m.dlq_messages.inc(c.dlq)
        m.anomalies.inc(c.anomalies)
        m.gap_resets.inc(c.resets)
        for reason, k in c.dlq_by_reason.items():
            m.invalid_readings.labels(reason).inc(k)
        m.active_devices.set(len(self.table))
        self.totals.add(c)

    def _update_lag(self) -> None:
        if self.consumer is None:
            return
        for tp in self.consumer.assignment():
            high = self.consumer.highwater(tp)
            if high is not None:
                self.metrics.consumer_lag.labels(str(tp.partition)).set(
                    max(0, high - self.consumer.position(tp))
                )


# ---- CLI: `stream-lstm run` ----------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Run the forecasting worker: consume readings, keep per-device LSTM state, publish "
        "forecasts. All settings come from STREAM_LSTM_* environment variables (README)."
    )
    parser.add_argument("--metrics-port", type=int, help="override STREAM_LSTM_METRICS_PORT")


def main(args: argparse.Namespace) -> int:
    from stream_lstm.logs import configure_logging, log_startup
    from stream_lstm.metrics import serve_metrics

    overrides = {"metrics_port": args.metrics_port} if args.metrics_port is not None else {}
    settings = load_settings(**overrides)
    configure_logging(settings.log_level)
    worker = Worker(settings)
    server = None
    if settings.metrics_port:
        server = serve_metrics(worker.metrics, worker.health, settings.metrics_host, settings.metrics_port)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: worker.stop())
    worker.connect()
    log_startup(log, settings, {
        "bootstrap_servers": settings.bootstrap_servers, "input_topic": settings.input_topic,
        "output_topic": settings.output_topic, "group_id": settings.group_id,
        "compute_device": str(worker.device), "model_version": worker.served.version,
        "metrics": f"http://{settings.metrics_host}:{server.port}/metrics" if server else "off",
    })
    totals = worker.run()
    log.info("worker stopped", extra={"consumed": totals.consumed, "forecasts": totals.forecasts})
    if server is not None:
        server.shutdown()
    return 0
