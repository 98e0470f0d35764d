"""Metrics registry and health, through the /metrics /healthz /readyz server (its connections:
test_endpoint.py; JSON logs: test_logs.py)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import pytest

from stream_lstm.endpoint import serve_metrics
from stream_lstm.metrics import HealthState, Metrics

# attribute -> the series name it must expose (counters with _total, base units)
EXPECTED = {
    "readings_consumed": "stream_lstm_readings_consumed_total",
    "forecasts_published": "stream_lstm_forecasts_published_total",
    "invalid_readings": "stream_lstm_invalid_readings_total",
    "dlq_messages": "stream_lstm_dlq_messages_total",
    "late_readings": "stream_lstm_late_readings_total",
    "duplicate_readings": "stream_lstm_duplicate_readings_total",
    "warmup_readings": "stream_lstm_warmup_readings_total",
    "gap_resets": "stream_lstm_gap_resets_total",
    "anomalies": "stream_lstm_anomalies_total",
    "alerts_opened": "stream_lstm_alerts_opened_total",
    "alerts_closed": "stream_lstm_alerts_closed_total",
    "alerts_open": "stream_lstm_alerts_open",
    "batch_size": "stream_lstm_batch_size_readings_bucket",
    "inference_seconds": "stream_lstm_inference_seconds_bucket",
    "batch_seconds": "stream_lstm_batch_seconds_bucket",
    "end_to_end_latency_seconds": "stream_lstm_end_to_end_latency_seconds_bucket",
    "commit_seconds": "stream_lstm_commit_seconds_bucket",
    "consumer_lag": "stream_lstm_consumer_lag_messages",
    "active_devices": "stream_lstm_active_devices",
    "evicted_devices": "stream_lstm_evicted_devices_total",
    "expired_devices": "stream_lstm_expired_devices_total",
    "model_info": "stream_lstm_model_info",
    "model_promoted_timestamp_seconds": "stream_lstm_model_promoted_timestamp_seconds",
    "retrain_runs": "stream_lstm_retrain_runs_total",
    "retrain_duration_seconds": "stream_lstm_retrain_duration_seconds_bucket",
    "retrain_loss": "stream_lstm_retrain_loss",
    "promotion_decisions": "stream_lstm_promotion_decisions_total",
    "restore_progress_ratio": "stream_lstm_restore_progress_ratio",
    "restored_devices": "stream_lstm_restored_devices_total",
    "restore_seconds": "stream_lstm_restore_seconds_bucket",
    "swap_pause_seconds": "stream_lstm_swap_pause_seconds_bucket",
    "rewarm_slice_seconds": "stream_lstm_rewarm_slice_seconds_bucket",
    "rewarm_pending_devices": "stream_lstm_rewarm_pending_devices",
    "rewarm_fallbacks": "stream_lstm_rewarm_fallbacks_total",
    "transactions": "stream_lstm_transactions_total",
    "ready": "stream_lstm_ready",
    "up_info": "stream_lstm_up_info",
}


def get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read().decode()


def exercise(m: Metrics) -> None:
    """Touch every series once, so that labelled ones have a child and show samples."""
    m.readings_consumed.labels("sensor-readings", "0").inc(10)
    m.forecasts_published.inc(7)
    m.invalid_readings.labels("not_json").inc()
    m.dlq_messages.inc()
    for c in (m.late_readings, m.duplicate_readings, m.warmup_readings, m.gap_resets, m.anomalies,
              m.evicted_devices, m.expired_devices, m.restored_devices):
        c.inc()
    m.batch_size.observe(500)
    for h in (m.inference_seconds, m.batch_seconds, m.end_to_end_latency_seconds, m.commit_seconds,
              m.retrain_duration_seconds, m.restore_seconds, m.swap_pause_seconds,
              m.rewarm_slice_seconds):
        h.observe(0.01)
    m.consumer_lag.labels("0").set(3)
    m.active_devices.set(200)
    m.rewarm_pending_devices.set(3)
    m.rewarm_fallbacks.inc()
    m.set_model_version("v0002", 1_700_000_000.0)
    m.retrain_runs.labels("promoted").inc()
    m.retrain_loss.labels("champion").set(0.5)
    m.retrain_loss.labels("challenger").set(0.4)
    m.promotion_decisions.labels("promote").inc()
    m.restore_progress_ratio.labels("0").set(1.0)
    m.transactions.labels("committed").inc()
    m.ready.set(1)


@pytest.fixture
def served():
    metrics, health = Metrics(instance="test-0"), HealthState(liveness_timeout_s=30)
    server = serve_metrics(metrics, health, "127.0.0.1", 0)
    try:
        yield metrics, health, f"http://127.0.0.1:{server.port}"
    finally:
        server.shutdown()


def test_registries_are_private_to_each_metrics():
    a, b = Metrics(), Metrics()  # would raise "Duplicated timeseries" on a shared registry
    a.forecasts_published.inc(5)
    assert b"stream_lstm_forecasts_published_total 5.0" in a.exposition()
    assert b"stream_lstm_forecasts_published_total 0.0" in b.exposition()


def test_metrics_endpoint_exposes_every_series(served):
    metrics, _, base = served
    exercise(metrics)
    status, ctype, text = get(base + "/metrics")
    assert status == 200 and ctype.startswith("text/plain")
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
    for attr, series in EXPECTED.items():
        assert hasattr(metrics, attr), attr
        assert series in names, (attr, series)
    assert 'stream_lstm_model_info{version="v0002"} 1.0' in text
    assert "stream_lstm_model_promoted_timestamp_seconds 1.7e+09" in text
    assert 'stream_lstm_up_info{instance="test-0",version="' in text
    assert 'stream_lstm_batch_size_readings_bucket{le="10000.0"} 1.0' in text
    assert 'stream_lstm_readings_consumed_total{partition="0",topic="sensor-readings"} 10.0' in text
    # label values known in advance exist from the start, at 0
    assert 'stream_lstm_retrain_runs_total{outcome="failed"} 0.0' in text
    assert 'stream_lstm_transactions_total{outcome="aborted"} 0.0' in text
    assert get(base + "/nope")[0] == 404


def test_healthz_follows_the_heartbeat():
    health = HealthState(liveness_timeout_s=2.0)  # (a loaded machine may take 0.3 s to answer)
    server = serve_metrics(Metrics(), health, "127.0.0.1", 0)
    base = f"http://127.0.0.1:{server.port}"
    try:
        health.beat()
        status, _, body = get(base + "/healthz")
        assert (status, body) == (200, "ok")
        time.sleep(2.5)
        status, _, body = get(base + "/healthz")
        assert status == 503 and "stale" in body and "limit 2s" in body
        assert health.liveness()[0] is False
        assert health.liveness(stale_after_s=60)[0] is True  # a caller may pass its own limit
        health.beat()
        assert get(base + "/healthz")[0] == 200
    finally:
        server.shutdown()


def test_readyz_names_what_is_missing_then_turns_ready(served):
    metrics, health, base = served
    status, ctype, body = get(base + "/readyz")
    assert status == 503 and ctype == "application/json"
    assert json.loads(body)["ready"] is False  # nothing registered yet: not ready
    health.set_ready("broker", True)
    health.set_ready("model", True, "v0001")
    health.set_ready("partitions", False, "restoring [0, 3]")
    health.set_ready("restored", False)
    status, _, body = get(base + "/readyz")
    doc = json.loads(body)
    assert status == 503
    assert doc["not_ready"] == ["partitions", "restored"]
    assert doc["components"] == {"broker": "ok", "model": "ok", "partitions": "restoring [0, 3]",
                                 "restored": "not ready"}
    assert "stream_lstm_ready 0.0" in get(base + "/metrics")[2]
    health.set_ready("partitions", True)
    health.set_ready("restored", True)
    status, _, body = get(base + "/readyz")
    assert status == 200 and json.loads(body) == {
        "ready": True, "not_ready": [],
        "components": {"broker": "ok", "model": "ok", "partitions": "ok", "restored": "ok"}}
    assert "stream_lstm_ready 1.0" in get(base + "/metrics")[2]


def test_every_gauge_says_how_a_host_of_processes_combines_it():
    """With STREAM_LSTM_PROCESSES > 1 the host adds up its children's files (processes.py):
    a count of what each holds sums, a figure per partition is its latest owner's, and every
    mode is a live one, so a child that exited leaves the host's gauges."""
    from prometheus_client import Gauge

    modes = {k: g._multiprocess_mode for k, g in vars(Metrics()).items() if isinstance(g, Gauge)}
    assert modes == {
        "alerts_open": "livesum", "active_devices": "livesum", "expert_leading_devices": "livesum",
        "rewarm_pending_devices": "livesum", "input_unreadable_partitions": "livesum",
        "consumer_lag": "livemostrecent", "restore_progress_ratio": "livemostrecent",
        "retrain_loss": "livemostrecent", "model_promoted_timestamp_seconds": "livemax",
        "ready": "livemin",
    }


def test_every_series_is_updated_by_some_code_path():
    """A series declared (and dashboarded) but never set reads 0 for ever, and an operator
    trusts it: the restore series were, until 2026-12-05. Each attribute Metrics.__init__
    declares must be read somewhere in the package outside its own declaration."""
    import ast
    from pathlib import Path

    import stream_lstm

    root = Path(stream_lstm.__file__).parent
    tree = ast.parse((root / "metrics.py").read_text())
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Metrics"]
    (init,) = [n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"]
    declared = {t.attr for n in ast.walk(init) if isinstance(n, ast.Assign) for t in n.targets
                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"}
    declared -= {"registry", "instance"} | {a for a in declared if a.startswith("_")}
    used: set[str] = set()
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                used.add(node.attr)
    assert len(declared) > 30
    assert not sorted(declared - used), "series declared but never updated"


def test_a_metrics_port_in_use_is_a_clear_refusal_not_a_traceback():
    """Two workers on one host, or `make up` beside a worker: one line naming the setting."""
    import socket

    from stream_lstm.config import SettingsError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SettingsError, match=f"cannot serve /metrics on 127.0.0.1:{port}.*STREAM_LSTM_METRICS_PORT"):
            serve_metrics(Metrics(), HealthState(), "127.0.0.1", port)


def test_forgotten_partitions_are_zeroed_and_removed_except_where_removal_is_not_implemented(monkeypatch):
    """Under a host's several processes (PROMETHEUS_MULTIPROC_DIR) prometheus-client cannot
    remove a labelled series and says so with a Python warning per call, raw in the JSON log:
    there the series is zeroed only."""
    for shared in (False, True):
        m = Metrics()
        m.consumer_lag.labels("3").set(7)
        removed = []
        monkeypatch.setattr(m.consumer_lag, "remove", lambda *labels, r=removed: r.append(labels))
        if shared:
            monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "/nonexistent")
        m.restore_progress_ratio.labels("3").set(0.5)
        m.forget_partitions({3})
        assert m.consumer_lag.labels("3")._value.get() == 0
        assert removed == ([] if shared else [("3",)])
        if shared:  # a partition moved away reads restored: at 0 it silenced StreamLstmNotReady
            assert m.restore_progress_ratio.labels("3")._value.get() == 1
