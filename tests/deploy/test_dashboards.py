"""The Grafana dashboard and the alert rules query only series that Metrics() exports."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import yaml

from stream_lstm.host_metrics import HostMetrics
from stream_lstm.metrics import Metrics
from stream_lstm.process_health import Slot
from stream_lstm.relay.metrics import RelayMetrics

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "stream-lstm.json"
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
NAME = re.compile(r"\bstream_lstm_[a-zA-Z0-9_]+")


def exported_names() -> set[str]:
    """Every series name a scrape can hold, from the # TYPE lines of a worker's Metrics(), of a
    host supervisor's HostMetrics (STREAM_LSTM_PROCESSES > 1) and of the alert relay's."""
    with tempfile.TemporaryDirectory() as tmp:
        host = HostMetrics(Path(tmp), [Slot("p0", Path(tmp) / "p0.json")], "host")
        text = Metrics().exposition().decode() + host.exposition().decode() + RelayMetrics().exposition().decode()
    out: set[str] = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M):
        out.add(name)
        if kind == "counter":  # older clients name the family without _total
            out |= {name.removesuffix("_total") + "_total", name.removesuffix("_total") + "_created"}
        elif kind == "histogram":
            out |= {name + s for s in ("_bucket", "_sum", "_count", "_created")}
        elif kind == "info":
            out.add(name + "_info")
    return out


def panels(items: list[dict]):
    for p in items:
        yield p
        yield from panels(p.get("panels", []))  # rows hold their panels when collapsed


def dashboard_exprs(dash: dict) -> list[str]:
    exprs = [t["expr"] for p in panels(dash["panels"]) for t in p.get("targets", []) if t.get("expr")]
    exprs += [a["expr"] for a in dash.get("annotations", {}).get("list", []) if a.get("expr")]
    for var in dash.get("templating", {}).get("list", []):
        q = var.get("query")
        exprs.append(q.get("query", "") if isinstance(q, dict) else str(q or ""))
    return exprs


def alert_exprs() -> list[str]:
    return [r["expr"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]


def test_dashboard_parses_and_has_the_panels():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "stream-lstm"
    ids = [p["id"] for p in panels(dash["panels"])]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    text = " ".join(dashboard_exprs(dash))
    for series in ("stream_lstm_readings_consumed_total", "stream_lstm_forecasts_published_total",
                   "stream_lstm_consumer_lag_messages", "stream_lstm_batch_size_readings_bucket",
                   "stream_lstm_inference_seconds_bucket", "stream_lstm_end_to_end_latency_seconds_bucket",
                   "stream_lstm_invalid_readings_total", "stream_lstm_dlq_messages_total",
                   "stream_lstm_active_devices", "stream_lstm_evicted_devices_total",
                   "stream_lstm_model_info", "stream_lstm_promotion_decisions_total",
                   "stream_lstm_retrain_runs_total", "stream_lstm_retrain_loss",
                   "stream_lstm_restore_progress_ratio", "stream_lstm_anomalies_total",
                   "stream_lstm_alerts_open", "stream_lstm_alerts_opened_total",
                   "stream_lstm_expert_leading_devices", "stream_lstm_rewarm_pending_devices",
                   "stream_lstm_process_restarts_total", "stream_lstm_process_running"):
        assert series in text, f"no panel shows {series}"
    for p in panels(dash["panels"]):
        if p["type"] != "row":
            assert p["targets"] and p["datasource"]["type"] == "prometheus", p["title"]


def test_dashboard_and_alerts_query_only_exported_series():
    names = exported_names()
    dash = json.loads(DASHBOARD.read_text())
    for source, exprs in (("dashboard", dashboard_exprs(dash)), ("alerts.yml", alert_exprs())):
        used = {n for e in exprs for n in NAME.findall(e)}
        assert used, source
        assert used <= names, f"{source} uses series Metrics() does not export: {sorted(used - names)}"


def test_grafana_provisioning_points_at_the_dashboards():
    ds = yaml.safe_load((REPO / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["uid"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    prov = yaml.safe_load((REPO / "deploy/grafana/provisioning/dashboards/dashboards.yml").read_text())
    path = prov["providers"][0]["options"]["path"]
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert any(m.startswith("./deploy/grafana/dashboards:" + path) for m in mounts), mounts
