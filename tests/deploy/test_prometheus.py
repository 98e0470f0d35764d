"""deploy/prometheus passes promtool, and a real Prometheus scrapes a serve_metrics server.

Needs the ``prometheus`` and ``promtool`` binaries (Debian/Ubuntu: ``apt-get install -y
prometheus``); without them these tests are skipped with that reason.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from stream_lstm.endpoint import serve_metrics
from stream_lstm.kafka.local_broker import free_port
from stream_lstm.metrics import HealthState, Metrics

REPO = Path(__file__).resolve().parents[2]
PROM_DIR = REPO / "deploy" / "prometheus"
need_promtool = pytest.mark.skipif(not shutil.which("promtool"),
                                   reason="promtool not installed (apt-get install -y prometheus)")
need_prometheus = pytest.mark.skipif(not shutil.which("prometheus"),
                                     reason="prometheus not installed (apt-get install -y prometheus)")


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60)


@need_promtool
def test_promtool_check_config():
    # rule_files is relative to the config file, so the checkout's file checks as it is.
    out = promtool("check", "config", str(PROM_DIR / "prometheus.yml"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 rule files found" in out.stdout + out.stderr


@need_promtool
def test_the_kubernetes_scrape_config_checks_and_names_the_rules_jobs(tmp_path):
    """Under the usual annotation-based job the rules that name a job never fired on
    Kubernetes: this configuration takes the job from the pods' app.kubernetes.io/name."""
    import yaml

    config = yaml.safe_load((PROM_DIR / "kubernetes.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job.pop("kubernetes_sd_configs") == [{"role": "pod"}]
    # (Debian's promtool is built without Kubernetes discovery: the rest is checked with a
    # static target in its place, the relabelling included.)
    job["static_configs"] = [{"targets": ["worker:9108"]}]
    config["rule_files"] = [str(PROM_DIR / f) for f in config["rule_files"]]
    checked = tmp_path / "kubernetes.yml"
    checked.write_text(yaml.safe_dump(config))
    out = promtool("check", "config", str(checked))
    assert out.returncode == 0, out.stdout + out.stderr
    to_job = [r for r in job["relabel_configs"] if r.get("target_label") == "job"]
    assert to_job == [{"source_labels": ["__meta_kubernetes_pod_label_app_kubernetes_io_name"],
                       "regex": "(.+)", "target_label": "job"}]
    # (Run as it is, it evaluated the rules and sent their alerts nowhere: a review.)
    (managers,) = config["alerting"]["alertmanagers"]
    assert managers["static_configs"][0]["targets"]


@need_promtool
def test_promtool_check_rules():
    out = promtool("check", "rules", str(PROM_DIR / "alerts.yml"))
    assert out.returncode == 0, out.stdout + out.stderr


@need_promtool
def test_the_alert_rules_unit_tests_pass():
    # deploy/prometheus/alerts_test.yml: what fires for whom (a worker that only rolls back).
    out = promtool("test", "rules", str(PROM_DIR / "alerts_test.yml"))
    assert out.returncode == 0 and "SUCCESS" in out.stdout, out.stdout + out.stderr


ALERTS = {"StreamLstmCommitsFailing", "StreamLstmConsumerLagGrowing", "StreamLstmNoForecasts", "StreamLstmInvalidReadingRateHigh",
          "StreamLstmRetrainFailures", "StreamLstmAlertStormFleetWide", "StreamLstmNotReady",
          "StreamLstmTargetDown", "StreamLstmModelNoLongerHelps", "StreamLstmAlertRelayNotDelivering",
          "StreamLstmModelRefused", "StreamLstmRestoreSlow"}


def test_alert_rules_cover_the_runbook():
    import yaml

    rules = {r["alert"]: r for g in yaml.safe_load((PROM_DIR / "alerts.yml").read_text())["groups"]
             for r in g["rules"]}
    assert ALERTS <= set(rules), ALERTS - set(rules)
    assert "deriv(" in rules["StreamLstmConsumerLagGrowing"]["expr"]
    assert rules["StreamLstmConsumerLagGrowing"]["for"] == "10m"
    assert rules["StreamLstmNoForecasts"]["for"] == "5m"
    assert rules["StreamLstmNotReady"]["for"] == "2m" and "stream_lstm_ready" in rules["StreamLstmNotReady"]["expr"]
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
        assert rule["annotations"]["summary"], name


def query(prom: str, expr: str) -> list[dict]:
    url = f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as r:
        doc = json.loads(r.read())
    assert doc["status"] == "success", doc
    return doc["data"]["result"]


@need_prometheus
def test_real_prometheus_scrapes_the_metrics_server(tmp_path):
    metrics, health = Metrics(instance="prom-test"), HealthState()
    metrics.forecasts_published.inc(42)
    metrics.readings_consumed.labels("sensor-readings", "1").inc(50)
    metrics.batch_size.observe(50)
    health.beat()
    health.set_ready("model", True)
    server = serve_metrics(metrics, health, "127.0.0.1", 0)
    port = free_port()
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: stream-lstm-worker\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{server.port}']}}]\n")
    log = (tmp_path / "prometheus.log").open("w")
    prom = subprocess.Popen(
        ["prometheus", f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        value, deadline = None, time.monotonic() + 30
        while value != 42.0 and time.monotonic() < deadline:
            assert prom.poll() is None, (tmp_path / "prometheus.log").read_text()[-3000:]
            time.sleep(0.5)
            try:
                res = query(base, "stream_lstm_forecasts_published_total")
            except (OSError, ValueError):
                continue  # not listening yet
            value = float(res[0]["value"][1]) if res else None
        assert value == 42.0, f"no sample within 30 s; log: {(tmp_path / 'prometheus.log').read_text()[-3000:]}"
        (sample,) = query(base, "stream_lstm_forecasts_published_total")
        assert sample["metric"]["job"] == "stream-lstm-worker"
        assert query(base, 'up{job="stream-lstm-worker"}')[0]["value"][1] == "1"
        assert query(base, "stream_lstm_ready")[0]["value"][1] == "1"
        # up_info's own `instance` label collides with the target label; Prometheus keeps it
        # as `exported_instance` (honor_labels: false), the target address stays `instance`.
        (info,) = query(base, "stream_lstm_up_info")
        assert info["metric"]["exported_instance"] == "prom-test"
        assert info["metric"]["instance"] == f"127.0.0.1:{server.port}"
        # a value change shows up on the next scrape
        metrics.forecasts_published.inc(8)
        deadline = time.monotonic() + 15
        while float(query(base, "stream_lstm_forecasts_published_total")[0]["value"][1]) != 50.0:
            assert time.monotonic() < deadline, "second scrape never seen"
            time.sleep(0.5)
    finally:
        prom.terminate()
        try:
            prom.wait(15)
        except subprocess.TimeoutExpired:
            prom.kill()
            prom.wait(5)
        log.close()
        server.shutdown()
