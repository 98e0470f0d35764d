"""Metrics and health of a real worker on the real broker, scraped by a real Prometheus."""

import json
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pytest

from stream_lstm.endpoint import serve_metrics
from stream_lstm.kafka.local_broker import free_port
from stream_lstm.models.serving import fresh_model
from stream_lstm.worker import Worker

from .helpers import produce_readings

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(240)]


def get(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def sample(text, name, labels=""):
    for line in text.splitlines():
        if line.startswith(name + labels + " ") or (not labels and line.startswith(name + " ")):
            return float(line.split()[-1])
    return None


def test_metrics_health_and_real_prometheus(settings_factory, topic_name, tmp_path):
    s = settings_factory(input_topic=topic_name, output_topic=f"{topic_name}-out",
                         dlq_topic=f"{topic_name}-dlq", group_id=f"{topic_name}-g", min_history=3)
    readings = [(f"d{d}", 1_700_000_000.0 + k * 60, 20.0 + d + k % 5) for k in range(30) for d in range(10)]
    produce_readings(s, topic_name, readings)
    worker = Worker(s, fresh_model(s))
    server = serve_metrics(worker.metrics, worker.health, "127.0.0.1", 0)
    base = f"http://127.0.0.1:{server.port}"
    assert get(base + "/readyz")[0] == 503  # not connected yet
    done = threading.Event()
    t = threading.Thread(target=lambda: (worker.run(until=lambda w: done.is_set())), daemon=True)
    t.start()
    deadline = time.time() + 60
    while worker.totals.consumed < len(readings) and time.time() < deadline:
        time.sleep(0.2)

    def lags():  # set in the loop turn after each batch
        return [float(line.split()[-1]) for line in get(base + "/metrics")[1].splitlines()
                if line.startswith("stream_lstm_consumer_lag_messages{")]
    while not (lags() and max(lags()) == 0) and time.time() < deadline:
        time.sleep(0.1)
    status, body = get(base + "/readyz")
    assert status == 200, body
    assert json.loads(body)["components"]["partitions"] == "ok"
    assert get(base + "/healthz")[0] == 200
    _, text = get(base + "/metrics")
    consumed = sum(float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith("stream_lstm_readings_consumed_total{"))
    assert consumed == len(readings)
    assert sample(text, "stream_lstm_forecasts_published_total") == len(readings) - 10 * 2
    assert sample(text, "stream_lstm_warmup_readings_total") == 20
    assert sample(text, "stream_lstm_active_devices") == 10
    lag = [float(line.split()[-1]) for line in text.splitlines() if line.startswith("stream_lstm_consumer_lag_messages{")]
    assert lag and max(lag) == 0
    assert sample(text, "stream_lstm_batch_size_readings_count") >= 1

    def leaders():  # refreshed every 5 s: wait for a count taken after the last device came
        lines = get(base + "/metrics")[1].splitlines()
        return {line.split('"')[1]: float(line.split()[-1]) for line in lines
                if line.startswith("stream_lstm_expert_leading_devices{")}
    deadline = time.time() + 15
    while sum(leaders().values()) != 10 and time.time() < deadline:
        time.sleep(0.5)
    assert set(leaders()) == {"model", "ar", "median", "last", "analog"}
    assert sum(leaders().values()) == 10

    if shutil.which("prometheus"):
        prom_port = free_port()
        cfg = tmp_path / "prom.yml"
        cfg.write_text(f"global: {{scrape_interval: 1s}}\nscrape_configs:\n  - job_name: w\n"
                       f"    static_configs: [{{targets: ['127.0.0.1:{server.port}']}}]\n")
        prom = subprocess.Popen(["prometheus", f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                 f"--web.listen-address=127.0.0.1:{prom_port}"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            value = None
            deadline = time.time() + 40
            while value is None and time.time() < deadline:
                time.sleep(1)
                try:
                    _, body = get(f"http://127.0.0.1:{prom_port}/api/v1/query?query=stream_lstm_forecasts_published_total")
                    res = json.loads(body)["data"]["result"]
                    value = float(res[0]["value"][1]) if res else None
                except (OSError, ValueError, KeyError):
                    pass
            assert value == len(readings) - 20
        finally:
            prom.terminate()
            prom.wait(10)
    done.set()
    t.join(30)
    server.shutdown()
