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
* ``backlog_ratio``: a deep backlog (10 devices x 2,000 readings) through the in-process
  pipeline on the fused path (one packed forward a poll) / on the step path (``backlog.py``).
* ``processes_ratio``: a backlog of 4,000 devices consumed by ``stream-lstm run`` with two
  worker processes / with one (``processes.py``).

Human-readable lines go to stderr; the **last line on stdout is one JSON object**.
"""

from __future__ import annotations

import argparse
import json
import uuid
from typing import Any

from stream_lstm.tools.bench.alerts import bench_alerts
from stream_lstm.tools.bench.backlog import bench_backlog
from stream_lstm.tools.bench.core import (
    bench_bare_consume,
    bench_engine,
    bench_pipeline,
    bench_scale,
    prefill,
    say,
)
from stream_lstm.tools.bench.eos import bench_eos
from stream_lstm.tools.bench.experts import bench_experts
from stream_lstm.tools.bench.latency import bench_latency
from stream_lstm.tools.bench.live import bench_live
from stream_lstm.tools.bench.processes import bench_processes
from stream_lstm.tools.bench.relay import bench_relay
from stream_lstm.tools.bench.restore import bench_restore
from stream_lstm.tools.bench.retrain import bench_retrain_and_swap

# Each takes (settings, topic, messages, result so far, quick) and returns its figures.
BENCHMARKS = [bench_eos, bench_relay, bench_live, bench_restore, bench_retrain_and_swap,
              bench_experts, bench_alerts, bench_latency, bench_processes]
# The same, needing no broker: they run with --skip-kafka too (settings and topic are None).
IN_PROCESS = [bench_backlog]


# ---- CLI -----------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Benchmarks, printed as ratios against baselines from the same run (the machine is "
        "noisy): the engine, the in-process pipeline, then through Kafka (the broker "
        "STREAM_LSTM_BOOTSTRAP_SERVERS names when one answers, else a throw-away local one): "
        "exactly-once against kafka-python's own relay, live latency, restore, retrain and "
        "swap, experts, alerts, processes. Ends with one JSON line; docs/benchmarks.md has the "
        "recorded runs.")
    parser.add_argument("--devices", type=int, default=10_000, help="fleet size for the engine "
                        "and Kafka benchmarks (default 10000)")
    parser.add_argument("--messages", type=int, default=200_000,
                        help="readings pre-filled for the consume/pipeline comparison (default 200000)")
    parser.add_argument("--quick", action="store_true", help="smaller runs: a few minutes (5-7 on 2 cores)")
    parser.add_argument("--skip-kafka", action="store_true", help="only in-process benchmarks")


def main(args: argparse.Namespace) -> int:
    import torch

    from stream_lstm.config import load_settings

    load_settings()  # (a bad variable: one line and exit 2 now, not after minutes of figures)
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
    for extra in IN_PROCESS:
        result.update(extra(None, None, 0, result, args.quick))

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
            for extra in BENCHMARKS:  # exactly-once, relay, live, restore, retrain, latency ...
                result.update(extra(s, topic, messages, result, args.quick))
    print(json.dumps(result), flush=True)
    return 0
