"""The first benchmarks of ``stream-lstm bench`` (``cli.py`` runs them all): the batched
engine against per-message forwards, the in-process pipeline at 1k and 100k devices, and a
plain kafka-python consume loop against the full worker over the same pre-filled topic.
The other modules of this package hold the others; ``prefill`` and ``Record`` serve them too."""

from __future__ import annotations

import sys
import time
import uuid
from typing import Any

import numpy as np


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- engine --------------------------------------------------------------------------------
def bench_engine(devices: int, window: int = 64, hidden: int = 64, repeats: int = 10) -> dict:
    """Stateful batched step vs stateless per-message and batched-window forwards."""
    import torch

    from stream_lstm.engine import BatchedEngine
    from stream_lstm.models import SimpleLSTM
    from stream_lstm.state.table import DeviceTable

    torch.manual_seed(0)
    model = SimpleLSTM(1, hidden, 1, 12).eval()
    table = DeviceTable(devices, window, 1, 1, hidden, initial_capacity=devices)
    slots = table.slots_for([f"d{i}" for i in range(devices)], [0] * devices, 0.0)
    engine = BatchedEngine(model, table)
    z = np.random.default_rng(0).normal(size=(devices, 1)).astype(np.float32)
    engine.step(slots, z, [(0, devices)])
    t0 = time.perf_counter()
    for _ in range(repeats):
        engine.step(slots, z, [(0, devices)])
    engine_rate = devices * repeats / (time.perf_counter() - t0)

    with torch.inference_mode():
        one = torch.randn(1, window, 1)
        for _ in range(10):
            model(one)
        n_naive = 300
        t0 = time.perf_counter()
        for _ in range(n_naive):
            model(one)
        naive_rate = n_naive / (time.perf_counter() - t0)
        windows = torch.randn(devices, window, 1)
        model(windows[:64])
        t0 = time.perf_counter()
        model(windows)
        batched_rate = devices / (time.perf_counter() - t0)
    return {
        "engine_devices": devices,
        "engine_steps_per_s": round(engine_rate),
        "naive_steps_per_s": round(naive_rate),
        "batched_window_steps_per_s": round(batched_rate),
        "speedup": round(engine_rate / naive_rate, 1),
        "speedup_vs_batched_window": round(engine_rate / batched_rate, 1),
    }


# ---- in-process pipeline at fleet scale -------------------------------------------------------
class Record:
    """A consumed record as the pipeline reads it (topic, partition, offset, key, value),
    for benchmarks that feed the pipeline without Kafka.

    >>> r = Record(2, 10, b"dev-1", b"{}")
    >>> r.topic, r.partition, r.offset, r.key
    ('bench', 2, 10, b'dev-1')
    """

    __slots__ = ("topic", "partition", "offset", "key", "value")

    def __init__(self, partition: int, offset: int, key: bytes, value: bytes) -> None:
        self.topic, self.partition, self.offset, self.key, self.value = (
            "bench", partition, offset, key, value)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        import os

        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def bench_scale(devices: int, readings_per_device: int = 3, batch: int = 2000) -> dict:
    """decode → state → engine → encode without Kafka, for a fleet of ``devices``."""
    from stream_lstm.config import load_settings
    from stream_lstm.encoding import encode_reading
    from stream_lstm.engine import BatchedEngine
    from stream_lstm.models import SimpleLSTM
    from stream_lstm.pipeline import BatchPipeline
    from stream_lstm.state.table import DeviceTable

    settings = load_settings(max_devices=devices, min_history=1, window=64, hidden_size=64)
    rss0 = _rss_bytes()
    table = DeviceTable(devices, 64, 1, 1, 64, initial_capacity=1024,
                        with_experts="experts" in settings.stage_names)
    pipe = BatchPipeline(settings, table, BatchedEngine(SimpleLSTM(1, 64, 1, 12), table),
                         lambda: "bench")
    start = time.time() - readings_per_device * 60

    def batches(r: int):
        """Pass r over the fleet, in batches, generated lazily (memory is part of the measure)."""
        for lo in range(0, devices, batch):
            yield [Record(d % 8, r * devices + d, f"dev-{d}".encode(),
                        encode_reading(f"dev-{d}", start + r * 60, [20.0 + (d % 7) + r]))
                   for d in range(lo, min(lo + batch, devices))]

    # The first pass over the fleet allocates every device; time the later passes only.
    for recs in batches(0):
        pipe.handle(recs, time.time())
    rss = (_rss_bytes() - rss0) / devices
    n, t0 = 0, time.perf_counter()
    for r in range(1, readings_per_device):
        for recs in batches(r):
            pipe.handle(recs, time.time())
            n += len(recs)
    rate = n / (time.perf_counter() - t0)
    return {"devices": devices, "msgs_per_s": round(rate), "rss_bytes_per_device": round(rss)}


# ---- Kafka: bare consume vs the worker -----------------------------------------------------------
def prefill(settings: Any, topic: str, messages: int, devices: int, partitions: int = 4) -> None:
    from stream_lstm.encoding import encode_reading
    from stream_lstm.kafka.clients import make_producer
    from stream_lstm.kafka.topics import TopicSpec, ensure_topics

    ensure_topics(settings, [TopicSpec(topic, partitions, {})])
    producer = make_producer(settings, linger_ms=20)
    start = time.time() - messages // devices * 60 - 60
    for i in range(messages):
        d = i % devices
        dev = f"dev-{d}"
        producer.send(topic, encode_reading(dev, start + (i // devices) * 60, [20.0 + d % 7]),
                      key=dev.encode())
    producer.flush()
    producer.close()


def send_paced(producer: Any, topic: str, rate: float, *, count: int | None = None,
               seconds: float | None = None, devices: int = 1000,
               while_waiting: Any = None) -> int:
    """Send readings of ``devices`` devices at ``rate`` a second, each timestamped when sent,
    until ``count`` are sent or ``seconds`` have passed; ``while_waiting()`` runs in the gaps,
    at most every 5 ms (the latency benchmark reads forecasts there). Returns how many."""
    from stream_lstm.encoding import encode_reading

    t0, i, next_idle = time.perf_counter(), 0, 0.0
    while (count is None or i < count) and (seconds is None or time.perf_counter() - t0 < seconds):
        due = t0 + i / rate
        now = time.perf_counter()
        if due > now:
            if while_waiting is not None and now >= next_idle:
                while_waiting()
                next_idle = time.perf_counter() + 0.005
            else:
                time.sleep(min(due - now, 0.002))
            continue
        dev = f"dev-{i % devices}"
        producer.send(topic, encode_reading(dev, time.time(), [20.0 + i % 7]), key=dev.encode())
        i += 1
    return i


def bench_bare_consume(settings: Any, topic: str, messages: int) -> float:
    from stream_lstm.kafka.clients import make_consumer

    consumer = make_consumer(settings, topic, group_id=f"bench-bare-{uuid.uuid4().hex[:8]}",
                             auto_offset_reset="earliest", enable_auto_commit=False,
                             fetch_max_bytes=16 * 1024 * 1024,
                             max_partition_fetch_bytes=4 * 1024 * 1024)
    seen, t0 = 0, None
    deadline = time.time() + 300
    while seen < messages and time.time() < deadline:
        polled = consumer.poll(timeout_ms=500, max_records=2000)
        for recs in polled.values():
            if t0 is None:
                t0 = time.perf_counter()
            seen += len(recs)
    elapsed = time.perf_counter() - (t0 or time.perf_counter())
    consumer.close()
    return seen / elapsed if elapsed > 0 else 0.0


def bench_pipeline(settings: Any, topic: str, messages: int, guarantee: str) -> float:
    from stream_lstm.models.serving import fresh_model
    from stream_lstm.worker import Worker

    s = settings.model_copy(update={
        "input_topic": topic, "output_topic": f"{topic}-out", "dlq_topic": f"{topic}-dlq",
        "group_id": f"bench-{guarantee}-{uuid.uuid4().hex[:8]}", "processing_guarantee": guarantee,
        "metrics_port": 0, "min_history": 1,
    })
    worker = Worker(s, fresh_model(s))
    deadline = time.time() + 300
    totals = worker.run(until=lambda w: w.totals.consumed >= messages or time.time() > deadline)
    # From the first batch (after the group join) to the last commit.
    assert worker.first_batch_at is not None, "the worker processed nothing"
    return totals.consumed / (time.perf_counter() - worker.first_batch_at)
