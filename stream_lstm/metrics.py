"""Prometheus metrics and the health state; ``stream_lstm.endpoint`` serves both over HTTP.

All series are prefixed ``stream_lstm_`` and use base units (``_seconds``, ``_total``).
Each :class:`Metrics` owns its own registry, so several workers can live in one process
(tests, benchmarks). ``/healthz`` is liveness (the main loop is turning), ``/readyz`` is
readiness (partitions assigned and restored, broker reachable, model loaded).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any, Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics import MetricWrapperBase

log = logging.getLogger(__name__)

PREFIX = "stream_lstm_"
# Seconds: 1 ms .. 30 s (a batch, an inference step, a commit, end-to-end latency).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# Readings per batch: 1 .. 10 000.
BATCH_BUCKETS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2000, 5000, 10000)
# Seconds for slow things: a retrain, a state restore.
SLOW_BUCKETS = (0.1, 0.5, 1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

# Label values known in advance are created at start so that rate() and the dashboards see
# a zero series instead of nothing.
RETRAIN_OUTCOMES = ("promoted", "rejected", "superseded", "failed")
PROMOTION_DECISIONS = ("promote", "reject")
MODEL_REFUSALS = ("shape", "unloadable")
TRANSACTION_OUTCOMES = ("committed", "aborted")
# prometheus-client's multiprocess modes that the worker's gauges use (see Metrics.__init__).
GaugeMode = Literal["livesum", "livemax", "livemin", "livemostrecent"]


# What `stream-lstm trainer` updates: its retrains, the gate's decisions, the model it would
# promote against, readiness and identity.
TRAINER_SERIES = ("retrain_runs", "retrain_duration_seconds", "retrain_loss", "promotion_decisions", "models_refused",
                  "model_info", "model_promoted_timestamp_seconds", "ready", "up_info")


class Metrics:
    """Every series the worker (and the trainer) exports, in a private registry.

    Parameters
    ----------
    instance
        This process's instance id on ``stream_lstm_up_info``; default: the host name.

    Examples
    --------
    >>> m = Metrics(instance="w-0")
    >>> m.forecasts_published.inc(3)
    >>> b"stream_lstm_forecasts_published_total 3.0" in m.exposition()
    True
    """

    def __init__(self, instance: str | None = None) -> None:
        r = self.registry = CollectorRegistry()
        p = PREFIX

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(p + name, doc, list(labels), registry=r)

        # How a host with several worker processes (processes.py) combines a gauge of each:
        # counts of what each holds add up, per-partition figures are the latest owner's, and
        # all but "all" forget a process that exited. A single process ignores the mode.
        def gauge(name: str, doc: str, labels: tuple[str, ...] = (), *, mode: GaugeMode) -> Gauge:
            return Gauge(p + name, doc, list(labels), registry=r, multiprocess_mode=mode)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(p + name, doc, buckets=buckets, registry=r)

        # --- Flow -----------------------------------------------------------------------------
        self.readings_consumed = counter("readings_consumed", "Readings consumed (committed)",
                                         ("topic", "partition"))
        self.forecasts_published = counter("forecasts_published", "Forecasts published")
        self.invalid_readings = counter("invalid_readings", "Invalid readings, by error code",
                                        ("reason",))
        self.dlq_messages = counter("dlq_messages", "Messages written to the dead-letter topic")
        self.late_readings = counter("late_readings", "Readings older than the device's last applied ts, "
                                     "dropped (LATE_POLICY=dlq counts them as invalid_readings{reason=late})")
        self.duplicate_readings = counter("duplicate_readings", "Readings repeating a device's last ts")
        self.warmup_readings = counter("warmup_readings", "Readings applied before a device's min_history")
        self.gap_resets = counter("gap_resets", "Hidden-state resets after a gap longer than max_gap_s")
        self.anomalies = counter("anomalies", "Readings flagged as anomalies")
        self.alerts_opened = counter("alerts_opened", "Alerts opened (alert events on the alerts topic)")
        self.alerts_closed = counter("alerts_closed", "Alerts closed after their hold time")
        self.alerts_open = gauge("alerts_open", "Devices in memory with an open alert", mode="livesum")

        # --- Timing ---------------------------------------------------------------------------
        self.batch_size = histogram("batch_size_readings", "Readings per batch", BATCH_BUCKETS)
        self.inference_seconds = histogram("inference_seconds", "Decode, state and engine time per batch",
                                           LATENCY_BUCKETS)
        self.batch_seconds = histogram("batch_seconds", "Whole batch time, poll to commit", LATENCY_BUCKETS)
        self.commit_seconds = histogram("commit_seconds", "Publish and commit time per batch", LATENCY_BUCKETS)
        self.end_to_end_latency_seconds = histogram(
            "end_to_end_latency_seconds", "From a reading's event time to its forecast's publication "
            "(a backfill's or a replay's old readings count at their age)",
            LATENCY_BUCKETS + (60, 300))

        # --- Consumer and per-device state ------------------------------------------------------
        self.consumer_lag = gauge("consumer_lag_messages", "Input messages not yet consumed",
                                  ("partition",), mode="livemostrecent")
        self.active_devices = gauge("active_devices", "Devices held in memory", mode="livesum")
        self.input_unreadable_partitions = gauge(
            "input_unreadable_partitions", "Input partitions paused at a record batch the client "
            "cannot read (a failed checksum, a codec it lacks): their readings wait", mode="livesum")
        self.expert_leading_devices = gauge(
            "expert_leading_devices", "Devices in memory whose one-step forecast weighs this "
            "expert most (experts.py): many on 'last' says the model no longer helps", ("expert",),
            mode="livesum")
        self.evicted_devices = counter("evicted_devices", "Devices moved from memory to the state store")
        self.expired_devices = counter("expired_devices", "Devices forgotten after their TTL")

        # --- Model, retraining, hot swap ---------------------------------------------------------
        self.model_info = Info(p + "model", "The served model version", registry=r)
        self.model_promoted_timestamp_seconds = gauge(
            "model_promoted_timestamp_seconds", "When the served model was made (its created_at, "
            "unix time): a promotion or rollback changes it, a restart does not",
            mode="livemax")
        self.retrain_runs = counter("retrain_runs", "Retraining runs by outcome", ("outcome",))
        self.retrain_duration_seconds = histogram("retrain_duration_seconds", "Retraining time", SLOW_BUCKETS)
        self.retrain_loss = gauge("retrain_loss", "Holdout loss of the last retrain", ("model",),
                                  mode="livemostrecent")
        self.promotion_decisions = counter("promotion_decisions", "Promotion gate decisions", ("decision",))
        self.models_refused = counter(
            "models_refused", "Models a worker was handed but does not serve: another serving "
            "shape than its model's (it swaps only within one), or weights that do not load; "
            "its log says which", ("reason",))
        self.swap_pause_seconds = histogram(
            "swap_pause_seconds", "The time a loop turn was held up by a hot swap (devices are "
            "re-warmed after it, in slices of STREAM_LSTM_REWARM_SLICE_MS)", LATENCY_BUCKETS)
        self.rewarm_pending_devices = gauge(
            "rewarm_pending_devices", "Devices in memory that may still step under an older "
            "model's weights after a hot swap, waiting for their re-warm (0: the swap is "
            "complete)", mode="livesum")
        self.rewarm_slice_seconds = histogram(
            "rewarm_slice_seconds", "The time a loop turn spent re-warming devices after a hot swap",
            LATENCY_BUCKETS)
        self.rewarm_fallbacks = counter(
            "rewarm_fallbacks", "Devices restored with h/c of a model version that could not be "
            "loaded (another registry, deleted, a third version), re-warmed at once under the "
            "served model")

        # --- State restore ------------------------------------------------------------------------
        self.restore_progress_ratio = gauge("restore_progress_ratio", "State restore progress per partition",
                                            ("partition",), mode="livemostrecent")
        self.restored_devices = counter("restored_devices", "Devices whose state was restored "
                                        "(in the local store when their partition's restore ended)")
        self.restored_records = counter("restored_records", "Changelog records read while restoring "
                                        "(snapshots, tombstones and replay markers)")
        self.unreadable_snapshots = counter(
            "unreadable_snapshots", "Stored device states that could not be used (corrupt, or "
            "of other settings): the device started afresh; the log names it")
        self.replayed_readings = counter("replayed_readings", "Input readings applied again "
                                         "after a restore (since the last checkpoint)")
        self.replay_missing_readings = counter(
            "replay_missing_readings", "Readings a replay needed that the input's retention "
            "had deleted, or in a record batch that cannot be read (state resumed without them)")
        self.restore_seconds = histogram(
            "restore_seconds", "Time from a partition's assignment (or a rollback) to its "
            "resuming: its state restored from the changelog and the input replayed since its "
            "checkpoint", SLOW_BUCKETS)

        # --- Transactions and liveness --------------------------------------------------------
        self.transactions = counter("transactions", "Batches committed or aborted", ("outcome",))
        self.kafka_stalls = counter("kafka_stalls", "kafka-python polls stuck past 20 s (2/3 of the "
                                    "liveness limit) and ended (kafka/stall.py), or joins mended")
        # A host of several processes exports its own (every process ready), not this one.
        self.ready = gauge("ready", "1 when the worker is ready (see /readyz), else 0", mode="livemin")
        self.up_info = Info(p + "up", "Version and instance of this stream-lstm process", registry=r)

        for outcome in RETRAIN_OUTCOMES:
            self.retrain_runs.labels(outcome)
        for decision in PROMOTION_DECISIONS:
            self.promotion_decisions.labels(decision)
        for reason in MODEL_REFUSALS:
            self.models_refused.labels(reason)
        for outcome in TRANSACTION_OUTCOMES:
            self.transactions.labels(outcome)
        self.set_instance(instance or socket.gethostname())

    def set_instance(self, instance: str) -> None:
        """Label ``stream_lstm_up_info`` with this process's instance id (and the version)."""
        from stream_lstm import __version__

        self.up_info.info({"version": __version__, "instance": instance})

    def only(self, names: tuple[str, ...]) -> Metrics:
        """Export only the series named (attribute names, e.g. :data:`TRAINER_SERIES`); the
        others stay usable and are left out of ``/metrics``. A process that is not a worker
        must not export the worker's series: its zeros would read as a worker that does nothing.

        >>> text = Metrics().only(TRAINER_SERIES).exposition()
        >>> b"stream_lstm_retrain_runs_total" in text, b"stream_lstm_forecasts_published" in text
        (True, False)
        """
        for name, series in vars(self).items():
            if isinstance(series, MetricWrapperBase) and name not in names:
                self.registry.unregister(series)
        return self

    def set_model_version(self, version: str, promoted_at: float) -> None:
        """Expose the served model: ``stream_lstm_model_info{version=...}`` and its promotion time."""
        self.model_info.info({"version": str(version)})
        self.model_promoted_timestamp_seconds.set(promoted_at)

    def forget_partitions(self, partitions: Any) -> None:
        """Drop the per-partition series of partitions this worker no longer holds: left, their
        last value would be summed with their new owner's (``sum(consumer_lag)``) for ever.
        (Set idle first: under a host's several processes the most recent write is shown, so a
        moved partition reads no lag, and restored: 0 kept StreamLstmNotReady quiet for ever.)"""
        import os

        shared = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))  # (removal is not implemented
        for gauge, idle in ((self.consumer_lag, 0), (self.restore_progress_ratio, 1)):  # there)
            for p in partitions:
                gauge.labels(str(p)).set(idle)
                if not shared:
                    gauge.remove(str(p))

    def count_batch(self, c: Any, active_devices: int) -> None:
        """Add one batch's :class:`~stream_lstm.pipeline.BatchCounts`: where each reading ended."""
        self.forecasts_published.inc(c.forecasts)
        self.warmup_readings.inc(c.warmup)
        self.late_readings.inc(c.late)
        self.duplicate_readings.inc(c.duplicate)
        self.dlq_messages.inc(c.dlq)
        self.anomalies.inc(c.anomalies)
        self.alerts_opened.inc(c.alerts_opened)
        self.alerts_closed.inc(c.alerts_closed)
        self.gap_resets.inc(c.resets)
        for reason, k in c.dlq_by_reason.items():
            self.invalid_readings.labels(reason).inc(k)
        self.active_devices.set(active_devices)

    def set_expert_leaders(self, counts: dict[str, int]) -> None:
        """``{expert: devices that weigh it most}`` (``experts.leaders``)."""
        for name, k in counts.items():
            self.expert_leading_devices.labels(name).set(k)

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format."""
        return generate_latest(self.registry)


# A process whose loop has not turned for this long is not live (/healthz 503): its pod is
# restarted, a host's supervisor kills it. Anything that may hold the loop ends sooner.
LIVENESS_TIMEOUT_S = 30.0


class HealthState:
    """Liveness (a heartbeat from the main loop) and readiness (named components). Thread-safe.

    Readiness needs one registered component at least, and all ok (``broker``, ``model``...).

    Parameters
    ----------
    liveness_timeout_s
        How old the last heartbeat may be while the process counts as live.

    Examples
    --------
    >>> h = HealthState()
    >>> h.readiness()
    (False, {})
    >>> h.set_ready("model", True); h.set_ready("partitions", False, "restoring [0]")
    >>> h.readiness()
    (False, {'model': 'ok', 'partitions': 'restoring [0]'})
    >>> h.beat(); h.liveness()[0]
    True
    """

    def __init__(self, liveness_timeout_s: float = LIVENESS_TIMEOUT_S) -> None:
        self._lock = threading.Lock()
        self._last_beat = time.monotonic()
        self._components: dict[str, tuple[bool, str]] = {}
        self.liveness_timeout_s = liveness_timeout_s

    def beat(self) -> None:
        """The main loop turned; call once per iteration."""
        with self._lock:
            self._last_beat = time.monotonic()

    def set_ready(self, component: str, ok: bool, detail: str = "") -> None:
        with self._lock:
            self._components[component] = (bool(ok), detail or ("ok" if ok else "not ready"))

    def liveness(self, stale_after_s: float | None = None) -> tuple[bool, str]:
        """``(ok, detail)``: ok while the last beat is at most ``stale_after_s`` old."""
        limit = self.liveness_timeout_s if stale_after_s is None else stale_after_s
        with self._lock:
            age = time.monotonic() - self._last_beat
        ok = age <= limit
        return ok, f"last loop iteration {age:.1f}s ago" + ("" if ok else f" (limit {limit:g}s)")

    def readiness(self) -> tuple[bool, dict[str, str]]:
        """``(ok, {component: "ok" | why not})``."""
        with self._lock:
            items = dict(self._components)
        ok = bool(items) and all(v[0] for v in items.values())
        return ok, {k: ("ok" if v[0] else v[1]) for k, v in items.items()}
