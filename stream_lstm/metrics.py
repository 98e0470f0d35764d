"""Prometheus metrics and the health endpoints, served from one small stdlib HTTP server.

All series are prefixed ``stream_lstm_`` and use base units (``_seconds``, ``_total``).
Each :class:`Metrics` owns its own registry, so several workers can live in one process
(tests, benchmarks). ``/healthz`` is liveness (the main loop is turning), ``/readyz`` is
readiness (partitions assigned and restored, broker reachable, model loaded).

>>> m = Metrics()
>>> m.forecasts_published.inc(3)
>>> b"stream_lstm_forecasts_published_total 3.0" in m.exposition()
True
>>> h = HealthState()
>>> h.set_ready("model", True); h.set_ready("partitions", False, "restoring [0]")
>>> h.readiness()
(False, {'model': 'ok', 'partitions': 'restoring [0]'})
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_BATCH = (1, 10, 50, 100, 250, 500, 1000, 2000, 5000, 10000)


class Metrics:
    """Every series the worker exports."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        p = "stream_lstm_"
        self.readings_consumed = Counter(p + "readings_consumed", "Readings consumed and committed",
                                         ["topic", "partition"], registry=r)
        self.forecasts_published = Counter(p + "forecasts_published", "Forecasts published", registry=r)
        self.invalid_readings = Counter(p + "invalid_readings", "Readings sent to the DLQ, by error code",
                                        ["reason"], registry=r)
        self.dlq_messages = Counter(p + "dlq_messages", "Messages written to the dead-letter topic", registry=r)
        self.late_readings = Counter(p + "late_readings", "Late readings dropped (older than the last applied ts)", registry=r)
        self.duplicate_readings = Counter(p + "duplicate_readings", "Duplicate readings (same device and ts)", registry=r)
        self.warmup_readings = Counter(p + "warmup_readings", "Readings applied before a device's min_history", registry=r)
        self.gap_resets = Counter(p + "gap_resets", "Hidden-state resets after a gap longer than max_gap_s", registry=r)
        self.anomalies = Counter(p + "anomalies", "Readings flagged as anomalies", registry=r)
        self.batch_size = Histogram(p + "batch_size_readings", "Readings per batch", buckets=_BATCH, registry=r)
        self.inference_seconds = Histogram(p + "inference_seconds", "Decode, state and engine time per batch",
                                           buckets=_LATENCY, registry=r)
        self.batch_seconds = Histogram(p + "batch_seconds", "Whole batch time, poll to commit", buckets=_LATENCY, registry=r)
        self.commit_seconds = Histogram(p + "commit_seconds", "Publish and commit time per batch", buckets=_LATENCY, registry=r)
        self.end_to_end_latency_seconds = Histogram(
            p + "end_to_end_latency_seconds", "From the oldest reading's ts in a batch to its forecasts' commit",
            buckets=_LATENCY, registry=r)
        self.consumer_lag = Gauge(p + "consumer_lag_messages", "Input messages not yet consumed", ["partition"], registry=r)
        self.active_devices = Gauge(p + "active_devices", "Devices held in memory", registry=r)
        self.evicted_devices = Counter(p + "evicted_devices", "Devices moved from memory to the state store", registry=r)
        self.expired_devices = Counter(p + "expired_devices", "Devices forgotten after their TTL", registry=r)
        self.model_info = Info(p + "model", "The served model version", registry=r)
        self.model_promoted_timestamp_seconds = Gauge(p + "model_promoted_timestamp_seconds",
                                                      "When the served model was promoted", registry=r)
        self.retrain_runs = Counter(p + "retrain_runs", "Retraining runs by outcome", ["outcome"], registry=r)
        self.retrain_duration_seconds = Histogram(p + "retrain_duration_seconds", "Retraining time",
                                                  buckets=(1, 5, 10, 30, 60, 120, 300, 600, 1800), registry=r)
        self.retrain_loss = Gauge(p + "retrain_loss", "Holdout error of the last retrain", ["model"], registry=r)
        self.promotion_decisions = Counter(p + "promotion_decisions", "Promotion gate decisions", ["decision"], registry=r)
        self.swap_pause_seconds = Histogram(p + "swap_pause_seconds", "Inference pause for a hot-swap and re-warm",
                                            buckets=_LATENCY, registry=r)
        self.restore_progress_ratio = Gauge(p + "restore_progress_ratio", "State restore progress per partition",
                                            ["partition"], registry=r)
        self.restored_records = Counter(p + "restored_records", "Changelog records restored", registry=r)
        self.transactions = Counter(p + "transactions", "Batches committed or rolled back", ["outcome"], registry=r)
        self.ready = Gauge(p + "ready", "1 when the worker is ready", registry=r)
        self.build_info = Info(p + "build", "Version of stream-lstm", registry=r)
        from stream_lstm import __version__

        self.build_info.info({"version": __version__})

    def set_model_version(self, version: str, promoted_at: float) -> None:
        self.model_info.info({"version": version})
        self.model_promoted_timestamp_seconds.set(promoted_at)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class HealthState:
    """Liveness (a heartbeat from the main loop) and readiness (named components)."""

    def __init__(self, liveness_timeout_s: float = 60.0) -> None:
        self._lock = threading.Lock()
        self._last_beat = time.monotonic()
        self._components: dict[str, tuple[bool, str]] = {}
        self.liveness_timeout_s = liveness_timeout_s

    def beat(self) -> None:
        self._last_beat = time.monotonic()

    def set_ready(self, component: str, ok: bool, detail: str = "") -> None:
        with self._lock:
            self._components[component] = (ok, detail or ("ok" if ok else "not ready"))

    def liveness(self) -> tuple[bool, str]:
        age = time.monotonic() - self._last_beat
        return age <= self.liveness_timeout_s, f"last loop iteration {age:.1f}s ago"

    def readiness(self) -> tuple[bool, dict[str, str]]:
        with self._lock:
            items = dict(self._components)
        ok = bool(items) and all(v[0] for v in items.values())
        return ok, {k: ("ok" if v[0] else v[1]) for k, v in items.items()}


def serve_metrics(metrics: Metrics, health: HealthState, host: str, port: int) -> ThreadingHTTPServer:
    """Serve ``/metrics``, ``/healthz`` and ``/readyz`` in a daemon thread; port 0 = any."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            path = self.path.split("?")[0]
            if path == "/metrics":
                self._send(200, metrics.exposition(), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                ok, detail = health.liveness()
                self._send(200 if ok else 503, detail.encode(), "text/plain")
            elif path == "/readyz":
                ok, parts = health.readiness()
                body = json.dumps({"ready": ok, "components": parts}).encode()
                self._send(200 if ok else 503, body, "application/json")
            else:
                self._send(404, b"not found: try /metrics, /healthz, /readyz", "text/plain")

        def _send(self, status: int, body: bytes, ctype: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:  # scrapes are not worth a log line
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    server.port = server.server_address[1]  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server
