"""Scale-out: 1 worker, then 3, then 2, under load. State moves with the partitions.

Per device, the forecasts must equal an uninterrupted run (the offline reference), with no
gaps and no duplicates, while partitions move between worker processes.
"""

import signal
import threading
import time

import numpy as np
import pytest
import torch

from stream_lstm.kafka.topics import TopicSpec, ensure_topics
from stream_lstm.models.registry import save_model
from stream_lstm.startup import fresh_model

from .helpers import assert_exactly_once_and_continuous, produce_readings, read_topic
from .workers import start_worker

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(600)]


def test_one_then_three_then_two_workers(settings_factory, topic_name, tmp_path):
    s = settings_factory(input_topic=topic_name, output_topic=f"{topic_name}-out", dlq_topic=f"{topic_name}-dlq",
                         group_id=f"{topic_name}-g", window=16, hidden_size=16, horizon=3, min_history=1,
                         poll_max_records=50, topic_partitions=6, session_timeout_ms=6000,
                         model_path=tmp_path / "model.safetensors",
                         blend_rate=0.0, expert_rate=0.0)  # the model's own forecasts (test_alerts.py)
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
    history = {f"dev-{d}": list(values[:, d]) for d in range(n_dev)}
    by_dev = assert_exactly_once_and_continuous(out, history, served.model, s, log.read_text())
    for fs in by_dev.values():  # no gaps: every step, in order
        assert sorted(f["ts"] for f in fs) == [1_700_000_000.0 + 60 * k for k in range(n_steps)]
    text = log.read_text()
    assert "partitions revoked" in text and "restored state" in text  # partitions really moved
