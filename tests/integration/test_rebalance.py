"""Scale-out: 1 worker, then 3, then 2, under load. State moves with the partitions.

Per device, the forecasts must equal an uninterrupted run (the offline reference), with no
gaps and no duplicates, while partitions move between worker processes.
"""

import json
import signal
import threading
import time

import numpy as np
import pytest
import torch

from stream_lstm.kafka.topics import TopicSpec, ensure_topics
from stream_lstm.models.registry import save_model
from stream_lstm.worker import fresh_model

from .helpers import offline_forecasts, produce_readings, read_topic
from .workers import start_worker

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(600)]


def test_one_then_three_then_two_workers(settings_factory, topic_name, tmp_path):
    s = settings_factory(input_topic=topic_name, output_topic=f"{topic_name}-out", dlq_topic=f"{topic_name}-dlq",
                         group_id=f"{topic_name}-g", window=16, hidden_size=16, horizon=3, min_history=1,
                         poll_max_records=50, topic_partitions=6, session_timeout_ms=6000,
                         model_path=tmp_path / "model.safetensors")
    ensure_topics(s, [TopicSpec(topic_name, 6)])
    torch.manual_seed(9)
    served = fresh_model(s)
    save_model(served.model, served.spec, s.model_path, {"version": "v-rb"})
    n_dev, n_steps = 60, 80
    rng = np.random.default_rng(3)
    values = 30 + rng.normal(size=(n_steps, n_dev)).cumsum(axis=0)
    readings = [(f"dev-{d}", 1_700_000_000.0 + 60 * k, float(values[k, d])) for k in range(n_steps) for d in range(n_dev)]

    def feed():  # load keeps flowing while membership changes
        for i in range(0, len(readings), 400):
            produce_readings(s, topic_name, readings[i : i + 400])
            time.sleep(0.4)

    feeder = threading.Thread(target=feed)
    feeder.start()
    log = tmp_path / "workers.log"
    procs = {"w0": start_worker(s, "w0", log)}
    time.sleep(6)
    procs["w1"] = start_worker(s, "w1", log)
    procs["w2"] = start_worker(s, "w2", log)
    time.sleep(8)
    procs.pop("w2").send_signal(signal.SIGTERM)  # a graceful leave: 3 -> 2
    feeder.join()
    try:
        out = read_topic(s, s.output_topic, expect=len(readings), timeout_s=240, idle_s=15)
    finally:
        for p in procs.values():
            p.send_signal(signal.SIGTERM)
        for p in procs.values():
            p.wait(60)
    fcs = [json.loads(r.value) for r in out]
    keys = [(f["partition"], f["offset"]) for f in fcs]
    assert len(keys) == len(set(keys)), "duplicate forecasts"
    assert len(fcs) == len(readings), f"missing {len(readings) - len(fcs)}\n{log.read_text()[-3000:]}"
    by_dev = {}
    for f in fcs:
        by_dev.setdefault(f["device_id"], []).append(f)
    for d in range(n_dev):
        got = sorted(by_dev[f"dev-{d}"], key=lambda f: f["ts"])
        x = values[:, d]
        assert [f["ts"] for f in got] == [1_700_000_000.0 + 60 * k for k in range(n_steps)]
        _, mu_ref, scale = offline_forecasts(served.model, x, s)
        fc = np.array([f["forecast"] for f in got])
        np.testing.assert_allclose((fc - x[:, None]) / scale[:, None], mu_ref, atol=1e-5, err_msg=f"dev-{d}")
    text = log.read_text()
    assert "partitions revoked" in text and "restored state" in text  # partitions really moved
