"""docker-compose, Kubernetes, Prometheus and Grafana files parse and match the settings."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from stream_lstm.config import Settings
from stream_lstm.metrics import Metrics

REPO = Path(__file__).resolve().parents[2]
ENV_RE = re.compile(r"STREAM_LSTM_[A-Z0-9_]+")


def settings_vars():
    return {f"STREAM_LSTM_{n.upper()}" for n in Settings.model_fields}


def test_compose_uses_official_kafka_and_real_settings():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert services["kafka"]["image"].startswith("apache/kafka:4")
    assert services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"
    for name in ("kafka-init", "simulator", "worker", "trainer", "prometheus", "grafana"):
        assert name in services
    assert "9108:9108" in services["worker"]["ports"]
    used = set(ENV_RE.findall((REPO / "docker-compose.yml").read_text()))
    assert used and used <= settings_vars(), used - settings_vars()


def test_k8s_manifests_parse_and_wire_probes_to_metrics_port():
    docs = []
    for f in sorted((REPO / "deploy" / "k8s").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(f.read_text()) if d]
        used = set(ENV_RE.findall(f.read_text()))
        assert used <= settings_vars(), (f, used - settings_vars())
    kinds = {d["kind"] for d in docs}
    assert {"StatefulSet", "Deployment", "ConfigMap", "Service"} <= kinds
    port = Settings().metrics_port
    for d in docs:
        if d["kind"] == "StatefulSet":
            c = d["spec"]["template"]["spec"]["containers"][0]
            assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port}
            assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port}
            assert "resources" in c
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text()
    assert f"EXPOSE {port}" in dockerfile and "STREAM_LSTM_METRICS_HOST=0.0.0.0" in dockerfile


def exported_names():
    text = Metrics().exposition().decode()
    names = set(re.findall(r"^# TYPE (\S+) (\S+)", text, re.M))
    out = set()
    for name, kind in names:
        out.add(name)
        if kind == "counter":
            out.add(name + "_total")
        if kind == "histogram":
            out |= {name + "_bucket", name + "_sum", name + "_count"}
        if kind == "info":
            out.add(name + "_info")
    return out


def test_dashboard_and_alerts_query_only_exported_metrics():
    dash = json.loads((REPO / "deploy/grafana/dashboards/stream-lstm.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs += [r["expr"] for g in yaml.safe_load((REPO / "deploy/prometheus/alerts.yml").read_text())["groups"]
              for r in g["rules"]]
    names = exported_names() | {"stream_lstm_model_info"}
    used = {n for e in exprs for n in re.findall(r"stream_lstm_[a-z_]+", e)}
    assert used and used <= names, used - names


@pytest.mark.skipif(not shutil.which("promtool"), reason="promtool not installed (apt install prometheus)")
def test_promtool_checks_rules_and_config(tmp_path):
    rules = REPO / "deploy/prometheus/alerts.yml"
    out = subprocess.run(["promtool", "check", "rules", str(rules)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    # The config names the rules file by its in-container path; check a copy pointing here.
    cfg = (REPO / "deploy/prometheus/prometheus.yml").read_text().replace("/etc/prometheus/alerts.yml", str(rules))
    (tmp_path / "prometheus.yml").write_text(cfg)
    out = subprocess.run(["promtool", "check", "config", str(tmp_path / "prometheus.yml")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
