"""``retrain_ratio`` (inference while a background retrain runs / alone, at the trainer's
nice and at nice 0), and the hot swap (:func:`swap_figures`; ``bench_swap`` alone, at 100k
devices): ``swap_pause_ms``, the loop turn the swap holds up, and the re-warm slices after it."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from stream_lstm.tools.bench.fixture import pipeline_fixture, rate, say
from stream_lstm.tools.bench.fixture import spec as model_spec


def bench_retrain_and_swap(settings: Any, topic: str, messages: int, result: dict, quick: bool,
                           devices: int = 10_000) -> dict:
    from stream_lstm.training.background import BackgroundTrainer, encode_job
    from stream_lstm.training.data import windows_from_table
    from stream_lstm.training.retrainer import job_params

    s, table, model, engine, pipe, records = pipeline_fixture(devices)
    say(f"retrain/swap: filling windows of {devices:,} devices ...")
    rate(pipe, records, range(s.window))  # full windows everywhere
    seqs = windows_from_table(table, s.window)[:2000]
    params = job_params(s) | {"max_epochs": 50, "patience": 50}
    step = s.window
    ratios = {}
    # Same run: the trainer at the worker's priority (nice 0), then at STREAM_LSTM_TRAIN_NICE.
    for nice in (0, s.train_nice):
        base = rate(pipe, records, range(step, step + 3))
        trainer = BackgroundTrainer(threads=s.train_threads, nice=nice)
        trainer.submit(encode_job(model, model_spec(s), {"version": "v0"}, seqs, params))
        time.sleep(2.0)  # let the child start training
        during = rate(pipe, records, range(step + 3, step + 6))
        busy = trainer.busy and trainer.poll() is None
        trainer.close()
        step += 6
        ratios[nice] = during / base
        say(f"  pipeline {base:,.0f} msgs/s alone, {during:,.0f} while retraining at nice {nice} "
             f"-> {ratios[nice]:.2f}{'' if busy else ' (the retrain finished early)'}")
    ratio = ratios[s.train_nice]
    swap = swap_figures(s, table, engine, pipe, step, devices)
    return {"pipeline_inproc_msgs_per_s_10k": round(base), "retrain_ratio": round(ratio, 3),
            "retrain_ratio_nice0": round(ratios[0], 3), **swap}


def bench_swap(devices: int = 100_000, batches: int = 3) -> dict:
    """The hot swap alone at ``devices`` devices, their windows filled directly (a fleet of
    100k through the pipeline would take minutes to fill)."""
    from stream_lstm.engine import set_inference_threads

    s, table, model, engine, pipe, _ = pipeline_fixture(devices)
    threads = set_inference_threads(s.torch_threads)  # as the worker does
    say(f"swap: filling the windows of {devices:,} devices ({threads} torch thread(s)) ...")
    slots = table.slots_for([f"dev-{d}" for d in range(devices)], [d % 4 for d in range(devices)], 0.0)
    rng = np.random.default_rng(0)
    for _ in range(s.window):
        table.window.push(slots, rng.normal(size=(devices, 1)).astype(np.float32))
    return swap_figures(s, table, engine, pipe, s.window, devices, batches)


def swap_figures(s: Any, table: Any, engine: Any, pipe: Any, step: int, devices: int,
                 batches: int = 3) -> dict:
    """Swap a fleet with full windows to new weights, then re-warm it slice by slice as the
    worker's loop does between batches (``STREAM_LSTM_REWARM_SLICE_MS``). Same run, batches
    of 2,000 readings from devices drawn at random: before the swap (one version), with half
    the fleet re-warmed (two), and after (one)."""
    from stream_lstm.encoding import encode_reading
    from stream_lstm.metrics import Metrics
    from stream_lstm.models import SimpleLSTM
    from stream_lstm.models.registry import LoadedModel
    from stream_lstm.tools.bench.core import Record
    from stream_lstm.training.lifecycle import ModelLifecycle

    spec = model_spec(s)
    # The served models are kept in a model dir of the run's own, removed after it.
    models = tempfile.mkdtemp(prefix="stream-lstm-bench-models-")
    life = ModelLifecycle(s.model_copy(update={"model_dir": Path(models)}),
                          LoadedModel.of(engine.model, spec, "v0"), engine, table, Metrics())
    pipe.version = lambda: life.version
    for slot in table.index.values():
        table.model_version[slot] = "v0"
    rng = np.random.default_rng(1)
    size = min(2000, devices)
    t_start = time.time() - 100_000 * 60

    def batch_seconds(k: int) -> float:
        # Devices drawn afresh: the re-warm takes the last seen first.
        step_ts, took, groups = t_start + 60 * (step + k), 0.0, set()
        for ds in [rng.choice(devices, size, replace=False) for _ in range(batches)]:
            recs = [Record(d % 4, d, f"dev-{d}".encode(),
                           encode_reading(f"dev-{d}", step_ts, [20 + d % 9 + np.sin(step / 5)]))
                    for d in ds.tolist()]
            t0 = time.perf_counter()
            pipe.handle(recs, time.time())
            took += time.perf_counter() - t0
            groups.add(engine.last_groups)
        say(f"    batches of {size:,} readings: {took / batches * 1e3:.1f} ms each, "
            f"{sorted(groups)} weight group(s)")
        return took / batches

    batch_seconds(-1)  # a warm-up: the devices' first readings through the pipeline
    before = batch_seconds(0)
    index = table.index
    t0 = time.perf_counter()
    engine.rewarm(np.array([index[f"dev-{d}"] for d in rng.choice(devices, size, replace=False).tolist()],
                           np.int64))
    old_batch_rewarm = time.perf_counter() - t0  # what a batch waited for before this change
    pause = life.swap(LoadedModel(SimpleLSTM.from_spec(spec), spec, {"version": "v1"}))
    slice_s: list[float] = []

    def rewarm(until_left: int) -> None:
        while life.rewarming and life.pending > until_left:
            t0 = time.perf_counter()
            life.rewarm_slice()
            slice_s.append(time.perf_counter() - t0)

    rewarm(devices // 2)
    mixed = batch_seconds(1)
    rewarm(0)
    after = batch_seconds(2)
    life.close()
    shutil.rmtree(models, ignore_errors=True)
    p50, p99 = np.percentile(slice_s, [50, 99]) * 1e3
    say(f"  hot swap at {devices:,} devices (W={s.window}): the swap held the loop {pause * 1e3:.2f} ms "
        f"(a batch's re-warm before this change: {old_batch_rewarm * 1e3:.0f} ms for {size:,} devices); "
        f"{len(slice_s):,} slices of {s.rewarm_slice_ms:g} ms: p50 {p50:.1f}, p99 {p99:.1f}, the longest "
        f"{max(slice_s) * 1e3:.1f} ms, {sum(slice_s):.2f} s in all; a batch of both versions "
        f"{mixed / after:.2f}x one of the new alone (before the swap: {before / after:.2f}x)")
    return {"swap_pause_ms": round(pause * 1e3, 2), "swap_devices": devices,
            "rewarm_longest_slice_ms": round(max(slice_s) * 1e3, 2),
            "rewarm_slice_p50_ms": round(float(p50), 2), "rewarm_slice_p99_ms": round(float(p99), 2),
            "rewarm_slices": len(slice_s), "rewarm_total_s": round(sum(slice_s), 2),
            "old_batch_rewarm_ms": round(old_batch_rewarm * 1e3, 1),
            "two_versions_batch_ratio": round(mixed / after, 3)}
