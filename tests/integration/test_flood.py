"""Bounded memory: 200k distinct device ids with max_devices=10k.

Memory stays bounded (the in-memory table never exceeds max_devices, RSS growth is capped),
and devices evicted to the local store come back with their state intact.
"""

import json
import resource

import numpy as np
import pytest
import torch

from stream_lstm.encoding import encode_reading
from stream_lstm.kafka.clients import make_producer
from stream_lstm.models.serving import fresh_model
from stream_lstm.worker import Worker

from .helpers import ATOL_NORMALIZED, read_topic, served_forecasts

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(900)]

N = 200_000


def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def test_flood_of_device_ids_keeps_memory_bounded(settings_factory, topic_name):
    s = settings_factory(input_topic=topic_name, output_topic=f"{topic_name}-out", dlq_topic=f"{topic_name}-dlq",
                         group_id=f"{topic_name}-g", window=8, hidden_size=8, horizon=2, min_history=1,
                         max_devices=10_000, processing_guarantee="at_least_once")
    t0 = 1_700_000_000.0
    producer = make_producer(s, linger_ms=20)
    for i in range(N):
        dev = f"flood-{i}"
        producer.send(topic_name, encode_reading(dev, t0, [float(i % 100)]), key=dev.encode())
    producer.flush()
    torch.manual_seed(4)
    served = fresh_model(s)
    worker = Worker(s, served)
    worker.connect()
    rss_before = rss_mb()
    peak = {"table": 0}

    def until(w):
        peak["table"] = max(peak["table"], w.table.capacity, len(w.table))
        return w.totals.consumed >= N

    worker.run(until=until)
    grown = rss_mb() - rss_before
    assert peak["table"] <= 10_000 and worker.table.evictions >= N - 10_000
    assert grown < 300, f"RSS grew {grown:.0f} MB"  # ~40 B/device stays (id -> partition cache)

    # The first 300 devices were evicted long ago; a second reading brings each back intact.
    back = [f"flood-{i}" for i in range(300)]
    for i, dev in enumerate(back):
        producer.send(topic_name, encode_reading(dev, t0 + 60, [float(i % 100) + 5.0]), key=dev.encode())
    producer.flush()
    producer.close()
    worker2 = Worker(s, served)
    totals = worker2.run(until=lambda w: w.totals.consumed >= len(back))
    assert totals.forecasts == len(back)
    fcs = {}
    for rec in read_topic(s, s.output_topic, expect=N + len(back), timeout_s=120):
        f = json.loads(rec.value)
        if f["ts"] == t0 + 60:
            fcs[f["device_id"]] = f
    assert len(fcs) == len(back)
    for i, dev in enumerate(back[:50]):
        x = np.array([float(i % 100), float(i % 100) + 5.0])
        ref, _, scale = served_forecasts(served.model, x, s)
        f = fcs[dev]
        np.testing.assert_allclose((np.array(f["forecast"]) - ref[1]) / scale[1], 0.0, atol=ATOL_NORMALIZED)
        assert f["step_s"] == 60.0  # the timestamps came back too
