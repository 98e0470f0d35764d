"""``stream-lstm bench``: throughput, latency and memory, measured against a real broker.

Every figure is taken in the same run as its baseline, and reported as a ratio to it,
because shared machines are noisy:

* ``bare_consume_msgs_per_s``: a plain kafka-python consume loop over a pre-filled topic (the
  ceiling); ``pipeline_msgs_per_s``: the full worker over the same topic, to acknowledged
  forecasts and committed offsets; ``ratio`` = pipeline / bare.
* ``engine_steps_per_s`` (one batched stateful step, 10k devices, W=64, hidden 64) against
  ``naive_steps_per_s`` (the textbook per-message stateless forward over the whole window)
  and ``batched_window_steps_per_s`` (the same forward batched across devices).
* ``p50_ms`` / ``p99_ms``: produce-to-forecast latency with a worker process at about half its
  measured sustained rate.
* ``rss_bytes_per_device`` and in-process pipeline throughput at 1k and 100k devices.

Human-readable lines go to stderr; the **last line on stdout is one JSON object**.
"""

from __future__ import annotations

import argparse
import json
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
class _Rec:
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
    from stream_lstm.config import Settings
    from stream_lstm.encoding import encode_reading
    from stream_lstm.engine import BatchedEngine
    from stream_lstm.models import SimpleLSTM
    from stream_lstm.pipeline import BatchPipeline
    from stream_lstm.state.table import DeviceTable

    settings = Settings(max_devices=devices, min_history=1, window=64, hidden_size=64)
    rss0 = _rss_bytes()
    table = DeviceTable(devices, 64, 1, 1, 64, initial_capacity=1024,
                        with_experts=settings.expert_rate > 0)
    pipe = BatchPipeline(settings, table, BatchedEngine(SimpleLSTM(1, 64, 1, 12), table),
                         lambda: "bench")
    start = time.time() - readings_per_device * 60

    def batches(r: int):
        """Pass r over the fleet, in batches, generated lazily (memory is part of the measure)."""
        for lo in range(0, devices, batch):
            yield [_Rec(d % 8, r * devices + d, f"dev-{d}".encode(),
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
    from stream_lstm.startup import fresh_model
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


# ---- CLI -----------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--devices", type=int, default=10_000, help="fleet size for the engine "
                        "and Kafka benchmarks (default 10000)")
    parser.add_argument("--messages", type=int, default=200_000,
                        help="readings pre-filled for the consume/pipeline comparison")
    parser.add_argument("--quick", action="store_true", help="smaller runs; finishes in < 2 min")
    parser.add_argument("--skip-kafka", action="store_true", help="only in-process benchmarks")


def main(args: argparse.Namespace) -> int:
    import torch

    from stream_lstm.config import load_settings

    messages = min(args.messages, 40_000) if args.quick else args.messages
    devices = args.devices
    torch.set_num_threads(max(1, torch.get_num_threads()))
    result: dict[str, Any] = {"quick": bool(args.quick), "torch_threads": torch.get_num_threads()}

    say(f"engine: {devices} devices, W=64, hidden=64 ...")
    result.update(bench_engine(devices))
    say(f"  engine {result['engine_steps_per_s']:,} steps/s; naive {result['naive_steps_per_s']:,}"
        f"; batched window {result['batched_window_steps_per_s']:,} -> speedup "
        f"{result['speedup']}x, {result['speedup_vs_batched_window']}x vs batched window")

    for n in (1_000, 100_000):
        say(f"pipeline in-process at {n:,} devices ...")
        r = bench_scale(n, readings_per_device=3 if args.quick else 5)
        result[f"pipeline_inproc_msgs_per_s_{n}"] = r["msgs_per_s"]
        result[f"rss_bytes_per_device_{n}"] = r["rss_bytes_per_device"]
        say(f"  {r['msgs_per_s']:,} msgs/s, {r['rss_bytes_per_device']:,} B/device")
    result["devices"] = 100_000
    result["rss_bytes_per_device"] = result["rss_bytes_per_device_100000"]
    result["scale_ratio_100k_vs_1k"] = round(
        result["pipeline_inproc_msgs_per_s_100000"] / result["pipeline_inproc_msgs_per_s_1000"], 3)

    if not args.skip_kafka:
        settings = load_settings()
        from stream_lstm.kafka.local_broker import ensure_local_broker

        with ensure_local_broker(settings) as bootstrap:
            s = settings.model_copy(update={"bootstrap_servers": bootstrap})
            topic = f"bench-{uuid.uuid4().hex[:8]}"
            say(f"pre-filling {messages:,} readings for {min(devices, messages):,} devices ...")
            prefill(s, topic, messages, min(devices, messages))
            bare = bench_bare_consume(s, topic, messages)
            say(f"  bare consume {bare:,.0f} msgs/s")
            pipe = bench_pipeline(s, topic, messages, "at_least_once")
            say(f"  pipeline (at-least-once) {pipe:,.0f} msgs/s -> ratio {pipe / bare:.2f}")
            result.update({
                "bare_consume_msgs_per_s": round(bare), "pipeline_msgs_per_s": round(pipe),
                "ratio": round(pipe / bare, 3),
            })
            for extra in _extra_benchmarks():
                result.update(extra(s, topic, messages, result, args.quick))
    print(json.dumps(result), flush=True)
    return 0


def _extra_benchmarks() -> list:
    """Benchmarks added by later features (exactly-once, restore, retrain, latency)."""
    from stream_lstm.tools import bench_extra

    return bench_extra.BENCHMARKS
