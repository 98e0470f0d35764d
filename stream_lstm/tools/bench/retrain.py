"""``retrain_ratio`` (inference while a background retrain runs / alone, at the trainer's
nice and at nice 0) and ``swap_pause_ms`` (a hot-swap with re-warm, at 10k devices)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from stream_lstm.tools.bench.fixture import pipeline_fixture, rate, say
from stream_lstm.tools.bench.fixture import spec as model_spec


def bench_retrain_and_swap(settings: Any, topic: str, messages: int, result: dict, quick: bool,
                           devices: int = 10_000) -> dict:
    from stream_lstm.metrics import Metrics
    from stream_lstm.models.registry import LoadedModel
    from stream_lstm.training.background import BackgroundTrainer, encode_job
    from stream_lstm.training.data import windows_from_table
    from stream_lstm.training.lifecycle import ModelLifecycle
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
    spec = model_spec(s)
    life = ModelLifecycle(s, LoadedModel.of(model, spec, "v0"), engine, table, Metrics())
    from stream_lstm.models import SimpleLSTM

    new = SimpleLSTM.from_spec(spec)
    swap = life.swap(LoadedModel(new, spec, {"version": "v1"}))
    # After the swap, the loop re-warms each batch's devices before stepping them, and idle
    # ones in slices between batches. The longest of these is the pause inference sees.
    batch_slots = np.arange(min(2000, devices), dtype=np.int64)  # one batch's devices
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
    say(f"  hot-swap at {devices:,} devices (W={s.window}): swap {swap * 1e3:.1f} ms; re-warm of one "
         f"batch's {len(batch_slots):,} devices {batch_rewarm * 1e3:.0f} ms; idle slice {idle_slice * 1e3:.0f} ms; "
         f"whole fleet re-warmed in slices over {rest:.2f} s of loop turns")
    return {"pipeline_inproc_msgs_per_s_10k": round(base), "retrain_ratio": round(ratio, 3),
            "retrain_ratio_nice0": round(ratios[0], 3),
            "swap_pause_ms": round(pause * 1e3, 1), "swap_devices": devices}
