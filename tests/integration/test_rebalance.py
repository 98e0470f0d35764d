"""Scale-out: 1 worker, then 3, then 2, under load. State moves with the partitions.

Per device, the forecasts must equal an uninterrupted run (the offline reference), with no
gaps and no duplicates, while partitions move between worker processes. The default settings,
as users run them (session timeout, model, history, polls).
"""

import signal
import threading
import time

import numpy as np
import pytest
import torch

from stream_lstm.kafka.topics import TopicSpec, ensure_topics
from stream_lstm.models.registry import save_model
from stream_lstm.models.serving import fresh_model

from .helpers import (
    assert_exactly_once_and_continuous,
    guarantee_settings,
    produce_readings,
    published,
    read_topic,
)
from .workers import start_worker

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(600)]


def test_one_then_three_then_two_workers(settings_factory, topic_name, tmp_path):
    s = guarantee_settings(settings_factory, topic_name, topic_partitions=6,
                           model_path=tmp_path / "model.safetensors")
    ensure_topics(s, [TopicSpec(topic_name, 6)])
    torch.manual_seed(9)
    served = fresh_model(s)
    save_model(served.model, served.spec, s.model_path, {"version": "v-rb"})
    n_dev, n_steps = 60, 80
    rng = np.random.default_rng(3)
    values = 30 + rng.normal(size=(n_steps, n_dev)).cumsum(axis=0)
    readings = [(f"dev-{d}", 1_700_000_000.0 + 60 * k, float(values[k, d])) for k in range(n_steps) for d in range(n_dev)]

    history = {f"dev-{d}": list(values[:, d]) for d in range(n_dev)}
    chunks = [readings[i : i + 400] for i in range(0, len(readings), 400)]
    logs = {name: tmp_path / f"{name}.log" for name in ("w0", "w1", "w2")}
    sent = threading.Semaphore(0)  # one release per chunk on the topic
    joined, leaving = threading.Event(), threading.Event()

    def feed():  # load keeps flowing while membership changes; paced, and gated on events
        for i, chunk in enumerate(chunks):
            if i == 6:  # not past half before w1 and w2 have joined: the 1 -> 3 move is under load
                assert joined.wait(120), "w1 and w2 never joined"
            if i == 9:  # the rest flows while w2 leaves: the 3 -> 2 move is under load too
                assert leaving.wait(120), "w2 was never stopped"
            produce_readings(s, topic_name, chunk)
            sent.release()
            time.sleep(0.4)

    procs = {"w0": start_worker(s, "w0", logs["w0"])}
    wait_for_line(logs["w0"], "partitions assigned")
    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    try:
        for _ in range(3):  # w0 alone has the first chunks
            assert sent.acquire(timeout=60)
        procs["w1"] = start_worker(s, "w1", logs["w1"])
        procs["w2"] = start_worker(s, "w2", logs["w2"])
        for name in ("w1", "w2"):
            wait_for_line(logs[name], "partitions assigned")
        joined.set()
        for name in ("w1", "w2"):
            wait_for_line(logs[name], "restored state")
        for _ in range(5):  # chunks 3-7 on the topic: some of them reach the three workers
            assert sent.acquire(timeout=60)
        procs.pop("w2").send_signal(signal.SIGTERM)  # a graceful leave: 3 -> 2
        leaving.set()
        feeder.join(120)
        assert not feeder.is_alive()
        out = read_topic(s, s.output_topic, expect=published(history, s), timeout_s=240, idle_s=15)
    finally:
        joined.set()
        leaving.set()
        for p in procs.values():
            p.send_signal(signal.SIGTERM)
        for p in procs.values():
            p.wait(60)
    log_text = "".join(path.read_text() for path in logs.values() if path.exists())
    by_dev = assert_exactly_once_and_continuous(out, history, served.model, s, log_text)
    for fs in by_dev.values():  # no gaps: every step from the first forecast on, in order
        assert sorted(f["ts"] for f in fs) == [1_700_000_000.0 + 60 * k for k in range(s.min_history - 1, n_steps)]
    assert "partitions revoked" in logs["w0"].read_text()  # partitions really moved
    assert "restored state" in logs["w1"].read_text()


def wait_for_line(path, text: str, timeout_s: float = 120.0) -> None:
    """Wait until a worker's log has a line containing ``text`` (the worker's own event)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if path.exists() and text in path.read_text():
            return
        time.sleep(0.1)
    raise AssertionError(f"no {text!r} in {path.name} after {timeout_s} s:\n{path.read_text()[-2000:]}")
