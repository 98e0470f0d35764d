"""Benchmarks of the later features, each against a baseline measured in the same run.

* ``eos_ratio``: exactly-once pipeline throughput / at-least-once, same topic, same run.
* ``worker_vs_relay_<devices>``: the worker (defaults, exactly-once) / kafka-python's own
  transactional relay; ``state_vs_forecast_bytes_<devices>``: changelog bytes written per
  forecast byte (``bench_relay.py``).
* ``live_<rate>_cpu_ratio`` / ``live_<rate>_p99_ratio``: CPU a reading and p99 latency of the
  worker / the relay under a paced live load of 500 and 2,000 readings/s (``bench_live.py``).
* ``restore_s_100k``: seconds to restore 100k devices' state from the changelog into the
  local store (``--quick`` restores 25k and reports ``restore_s_25k``).
* ``retrain_ratio``: in-process pipeline throughput while a background retrain runs / without.
* ``experts_ratio``: in-process pipeline throughput with the per-device experts / without.
* ``alerts_ratio``: in-process pipeline throughput with the anomaly likelihood and alert events
  / with that stage judging nothing; ``alerts_state_bytes``: what its state adds to a snapshot.
* ``swap_pause_ms``: inference pause of a hot-swap with re-warm, at 10k devices.
* ``p50_ms`` / ``p99_ms``: produce-to-forecast latency at about half the sustained rate, with
  the p99 bounds of the worker's own batch, commit and inference histograms over the same run.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np


def _say(msg: str) -> None:
    import sys

    print(msg, file=sys.stderr, flush=True)


def bench_eos(settings: Any, topic: str, messages: int, result: dict, quick: bool) -> dict:
    from stream_lstm.tools.bench import bench_pipeline

    eos = bench_pipeline(settings, topic, messages, "exactly_once")
    ratio = eos / result["pipeline_msgs_per_s"]
    _say(f"  pipeline (exactly-once) {eos:,.0f} msgs/s -> eos_ratio {ratio:.2f}")
    return {"pipeline_eos_msgs_per_s": round(eos), "eos_ratio": round(ratio, 3)}


def _pipeline_fixture(devices: int, **settings: Any):
    from stream_lstm.config import Settings
    from stream_lstm.encoding import encode_reading
    from stream_lstm.engine import BatchedEngine
    from stream_lstm.models import SimpleLSTM
    from stream_lstm.pipeline import BatchPipeline
    from stream_lstm.state.table import DeviceTable
    from stream_lstm.tools.bench import _Rec

    s = Settings(max_devices=devices, min_history=1, **settings)
    table = DeviceTable(devices, s.window, 1, 1, s.hidden_size, initial_capacity=devices,
                        with_experts="experts" in s.stage_names)
    model = SimpleLSTM(1, s.hidden_size, 1, s.horizon)
    engine = BatchedEngine(model, table)
    pipe = BatchPipeline(s, table, engine, lambda: "bench")
    t_start = time.time() - 100_000 * 60

    def records(step: int) -> list:
        return [_Rec(d % 4, d, f"dev-{d}".encode(),
                     encode_reading(f"dev-{d}", t_start + 60 * step, [20 + d % 9 + np.sin(step / 5)]))
                for d in range(devices)]

    return s, table, model, engine, pipe, records


def _rate(pipe: Any, records: Any, steps: range, batch: int = 2000) -> float:
    n, t0 = 0, time.perf_counter()
    for step in steps:
        recs = records(step)
        for i in range(0, len(recs), batch):
            pipe.handle(recs[i : i + batch], time.time())
        n += len(recs)
    return n / (time.perf_counter() - t0)


def bench_retrain_and_swap(settings: Any, topic: str, messages: int, result: dict, quick: bool) -> dict:
    from stream_lstm.metrics import Metrics
    from stream_lstm.models.registry import LoadedModel
    from stream_lstm.training.background import BackgroundTrainer, encode_job
    from stream_lstm.training.data import windows_from_table
    from stream_lstm.training.lifecycle import ModelLifecycle
    from stream_lstm.training.retrainer import job_params

    devices = 10_000
    s, table, model, engine, pipe, records = _pipeline_fixture(devices)
    _say(f"retrain/swap: filling windows of {devices:,} devices ...")
    _rate(pipe, records, range(s.window))  # full windows everywhere
    seqs = windows_from_table(table, s.window)[:2000]
    params = job_params(s) | {"max_epochs": 50, "patience": 50}
    step = s.window
    ratios = {}
    # Same run: the trainer at the worker's priority (nice 0), then at STREAM_LSTM_TRAIN_NICE.
    for nice in (0, s.train_nice):
        base = _rate(pipe, records, range(step, step + 3))
        trainer = BackgroundTrainer(threads=s.train_threads, nice=nice)
        trainer.submit(encode_job(model, _spec(s), {"version": "v0"}, seqs, params))
        time.sleep(2.0)  # let the child start training
        during = _rate(pipe, records, range(step + 3, step + 6))
        busy = trainer.busy and trainer.poll() is None
        trainer.close()
        step += 6
        ratios[nice] = during / base
        _say(f"  pipeline {base:,.0f} msgs/s alone, {during:,.0f} while retraining at nice {nice} "
             f"-> {ratios[nice]:.2f}{'' if busy else ' (the retrain finished early)'}")
    ratio = ratios[s.train_nice]
    spec = _spec(s)
    life = ModelLifecycle(s, LoadedModel.of(model, spec, "v0"), engine, table, Metrics())
    from stream_lstm.models import SimpleLSTM

    new = SimpleLSTM.from_spec(spec)
    swap = life.swap(LoadedModel(new, spec, {"version": "v1"}))
    # After the swap, the loop re-warms each batch's devices before stepping them, and idle
    # ones in slices between batches. The longest of these is the pause inference sees.
    batch_slots = np.arange(2000, dtype=np.int64)
    t0 = time.perf_counter()
    life.rewarm_stale(batch_slots)
    batch_rewarm = time.perf_counter() - t0
    t0 = time.perf_counter()
    life.rewarm_idle()
    idle_slice = time.perf_counter() - t0
    t0 = time.perf_counter()
    while life.rewarm_idle():
        pass
    rest = time.perf_counter() - t0
    pause = swap + max(batch_rewarm, idle_slice)
    _say(f"  hot-swap at {devices:,} devices (W={s.window}): swap {swap * 1e3:.1f} ms; re-warm of one "
         f"batch's 2,000 devices {batch_rewarm * 1e3:.0f} ms; idle slice {idle_slice * 1e3:.0f} ms; "
         f"whole fleet re-warmed in slices over {rest:.2f} s of loop turns")
    return {"pipeline_inproc_msgs_per_s_10k": round(base), "retrain_ratio": round(ratio, 3),
            "retrain_ratio_nice0": round(ratios[0], 3),
            "swap_pause_ms": round(pause * 1e3, 1), "swap_devices": devices}


def bench_experts(settings: Any, topic: str, messages: int, result: dict, quick: bool) -> dict:
    """In-process pipeline throughput with the per-device experts on, against off."""
    devices, rates = 10_000, {}
    for rate in (0.0, 0.1):
        s, _, _, _, pipe, records = _pipeline_fixture(devices, expert_rate=rate)
        _rate(pipe, records, range(20))  # past the warm-up, so the experts learn
        rates[rate] = _rate(pipe, records, range(20, 23 if quick else 30))
    ratio = rates[0.1] / rates[0.0]
    _say(f"experts: pipeline {rates[0.0]:,.0f} msgs/s without, {rates[0.1]:,.0f} with "
         f"({devices:,} devices) -> experts_ratio {ratio:.2f}")
    return {"experts_ratio": round(ratio, 3)}


def bench_alerts(settings: Any, topic: str, messages: int, result: dict, quick: bool) -> dict:
    """In-process pipeline throughput with the likelihood and alert stage, against the same
    pipeline whose stage judges nothing (swapped in for this measurement only)."""
    from stream_lstm import alerts, likelihood
    from stream_lstm.checkpointing.codec import encode_snapshot

    def judges_nothing(batch: Any, fb: Any, table: Any, **_: Any) -> list:
        fb.anomaly_likelihood = np.full(len(batch), np.nan)
        fb.is_anomaly = np.zeros(len(batch), bool)
        return []

    devices, rates, real = 10_000, {}, alerts.judge
    for name, stage in (("without", judges_nothing), ("with", real)):
        alerts.judge = stage
        try:
            _, table, _, _, pipe, records = _pipeline_fixture(devices)
            _rate(pipe, records, range(5))
            rates[name] = _rate(pipe, records, range(5, 8 if quick else 15))
        finally:
            alerts.judge = real
    snap = table.snapshot(next(iter(table.index.values())))
    full = len(encode_snapshot(snap))
    for key in likelihood.FIELDS:
        snap.extra.pop(key)
    ratio = rates["with"] / rates["without"]
    _say(f"alerts: pipeline {rates['without']:,.0f} msgs/s without the likelihood stage, "
         f"{rates['with']:,.0f} with ({devices:,} devices) -> alerts_ratio {ratio:.2f}; "
         f"+{full - len(encode_snapshot(snap))} B a snapshot")
    return {"alerts_ratio": round(ratio, 3), "alerts_state_bytes": full - len(encode_snapshot(snap))}


def _spec(s: Any):
    from stream_lstm.models.lstm import ModelSpec

    return ModelSpec(n_features=1, hidden_size=s.hidden_size, num_layers=1, horizon=s.horizon)


def bench_latency(settings: Any, topic: str, messages: int, result: dict, quick: bool) -> dict:
    """Produce at ~half the sustained rate with ts = now; latency = forecast seen - ts.

    The worker runs as its own process (as in production), so the producer and the reader in
    this process do not compete with it for the interpreter lock.
    """
    import os
    import subprocess
    import sys

    from stream_lstm.encoding import encode_reading
    from stream_lstm.kafka.clients import make_consumer, make_producer
    from stream_lstm.kafka.local_broker import free_port

    rate = 0.5 * (result.get("pipeline_eos_msgs_per_s") or result["pipeline_msgs_per_s"])
    duration = 8.0 if quick else 20.0
    t = f"{topic}-lat"
    s = settings.model_copy(update={
        "input_topic": t, "output_topic": f"{t}-out", "dlq_topic": f"{t}-dlq",
        "group_id": f"bench-lat-{uuid.uuid4().hex[:6]}", "min_history": 1,
        "metrics_port": free_port(), "metrics_host": "127.0.0.1",
        "state_dir": Path(tempfile.mkdtemp())})
    env = dict(os.environ)
    for name, value in s.model_dump().items():
        if value is not None and "password" not in name:
            env[f"STREAM_LSTM_{name.upper()}"] = str(value)
    worker = subprocess.Popen([sys.executable, "-m", "stream_lstm.cli", "run"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    reader = make_consumer(s, s.output_topic, group_id=f"lat-{uuid.uuid4().hex[:6]}",
                           auto_offset_reset="latest", isolation_level="read_committed",
                           fetch_max_wait_ms=20)
    lat: list[float] = []
    try:
        # Warm up: wait until the worker answers with forecasts before measuring.
        p = make_producer(s, linger_ms=1)
        deadline = time.time() + 90
        while time.time() < deadline and not reader.poll(timeout_ms=500):
            p.send(t, encode_reading("warm", time.time(), [1.0]), key=b"warm")
            p.flush()
        before = _scrape(s.metrics_port)
        t0, i = time.perf_counter(), 0
        next_poll = 0.0
        while time.perf_counter() - t0 < duration:
            due = t0 + i / rate
            now = time.perf_counter()
            if due > now:
                if now >= next_poll:  # read forecasts while pacing the producer
                    for recs in reader.poll(timeout_ms=0).values():
                        seen = time.time()
                        lat.extend(seen - json.loads(r.value)["ts"] for r in recs)
                    next_poll = time.perf_counter() + 0.005
                else:
                    time.sleep(min(due - now, 0.002))
                continue
            dev = f"dev-{i % 1000}"
            p.send(t, encode_reading(dev, time.time(), [20.0 + i % 7]), key=dev.encode())
            i += 1
        p.flush()
        p.close()
        t_end = time.time() + 5
        while time.time() < t_end:
            for recs in reader.poll(timeout_ms=100).values():
                seen = time.time()
                lat.extend(seen - json.loads(r.value)["ts"] for r in recs)
        # Where the time goes inside the worker, from its own histograms over the same run.
        after = _scrape(s.metrics_port)
        inside = {name: _p99_bound(before, after, name)
                  for name in ("batch_seconds", "commit_seconds", "inference_seconds")}
    finally:
        worker.terminate()
        worker.wait(30)
        reader.close()
    arr = np.array(lat[len(lat) // 10 :]) * 1e3  # skip the first tenth (warm-up)
    p50, p99 = (float(np.percentile(arr, 50)), float(np.percentile(arr, 99))) if len(arr) else (0.0, 0.0)
    _say(f"latency at {rate:,.0f} readings/s ({s.processing_guarantee}, worker process): "
         f"p50 {p50:.1f} ms, p99 {p99:.1f} ms over {len(arr):,} forecasts; inside the worker, "
         + ", ".join(f"{name} p99 <= {bound:g} s" for name, bound in inside.items()))
    return {"latency_rate_msgs_per_s": round(rate), "p50_ms": round(p50, 1), "p99_ms": round(p99, 1),
            **{f"worker_{name}_p99_le": bound for name, bound in inside.items()}}


def _scrape(port: int) -> dict[tuple[str, float], float]:
    """``{(histogram, le): cumulative count}`` from a worker's /metrics."""
    import re
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[tuple[str, float], float] = {}
    for m in re.finditer(r'^stream_lstm_(\w+)_bucket\{.*?le="([^"]+)".*\} (\S+)$', text, re.M):
        key = (m.group(1), float(m.group(2)))
        out[key] = out.get(key, 0.0) + float(m.group(3))
    return out


def _p99_bound(before: dict, after: dict, name: str) -> float:
    """The histogram bucket bound under which 99 % of the run's observations fell."""
    bounds = sorted(le for (n, le) in after if n == name)
    counts = [after[(name, le)] - before.get((name, le), 0.0) for le in bounds]
    total = counts[-1] if counts else 0.0
    return next((le for le, c in zip(bounds, counts, strict=True) if total and c >= 0.99 * total),
                math.inf)


def _bench_relay(settings: Any, topic: str, messages: int, result: dict, quick: bool) -> dict:
    from stream_lstm.tools.bench_relay import bench_relay

    return bench_relay(settings, topic, messages, result, quick)


def _bench_restore(settings: Any, topic: str, messages: int, result: dict, quick: bool) -> dict:
    from stream_lstm.tools.bench_restore import bench_restore

    return bench_restore(settings, topic, messages, result, quick)


def _bench_live(settings: Any, topic: str, messages: int, result: dict, quick: bool) -> dict:
    from stream_lstm.tools.bench_live import bench_live

    return bench_live(settings, topic, messages, result, quick)


BENCHMARKS = [bench_eos, _bench_relay, _bench_live, _bench_restore, bench_retrain_and_swap, bench_experts,
              bench_alerts, bench_latency]
