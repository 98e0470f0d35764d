"""``backlog_ratio``: a deep backlog (10 devices x 2,000 readings, in polls of
``STREAM_LSTM_POLL_MAX_RECORDS``) through the in-process pipeline on the fused path (one packed
forward a poll, ``engine.py``) / on the step path (one batched step per round), in one run.

A poll of 2,000 readings of 10 devices is 200 rounds. Both pipelines get the same readings
from the same start; each path runs ``repeats`` times, alternating, and the best time of each
counts (the machines are shared). Besides the ratio it reports where each path's time went
(the engine; the forecast stages, ``assemble``; the likelihood and alerts, ``alerts.judge``;
the rest: decode, state, encode) and how far apart the two paths' forecasts came out."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from stream_lstm.tools.bench.fixture import pipeline_fixture, say

PARTS = ("engine", "assemble", "judge")


def backlog_records(devices: int, readings: int) -> list:
    """``readings`` readings of each of ``devices`` devices, one a minute, oldest first (as a
    topic holds them after downtime)."""
    from stream_lstm.encoding import encode_reading
    from stream_lstm.tools.bench.core import Record

    rng = np.random.default_rng(0)
    start = time.time() - readings * 60 - 3600
    return [Record(d % 4, i * devices + d, f"dev-{d}".encode(),
                   encode_reading(f"dev-{d}", start + 60 * i,
                                  [20.0 + d + np.sin(i / 5) + 0.1 * rng.normal()]))
            for i in range(readings) for d in range(devices)]


@contextmanager
def timing(engine: Any) -> Iterator[dict[str, float]]:
    """Seconds spent in ``engine.step``, ``assemble`` and ``alerts.judge`` while inside (the
    pipeline's references to them are wrapped for the measurement, then put back)."""
    from stream_lstm import pipeline

    spent = dict.fromkeys(PARTS, 0.0)

    def timed(name: str, fn: Any) -> Any:
        def run(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - t0
        return run

    real_assemble, real_judge = pipeline.assemble, pipeline.alerts.judge
    engine.step = timed("engine", engine.step)
    pipeline.assemble = timed("assemble", real_assemble)
    pipeline.alerts.judge = timed("judge", real_judge)
    try:
        yield spent
    finally:
        pipeline.assemble, pipeline.alerts.judge = real_assemble, real_judge
        del engine.step


def run_backlog(records: list, devices: int, fused: bool) -> tuple[float, dict[str, float], np.ndarray]:
    """Seconds for the whole backlog through a fresh pipeline, the seconds of it in each of
    :data:`PARTS`, and the forecasts published (``[readings, H]``)."""
    import json

    import torch

    torch.manual_seed(0)  # the same weights for both paths
    s, _, _, engine, pipe, _ = pipeline_fixture(devices)
    if not fused:
        engine.fuse_min_rounds = len(records) + 1  # never: one step per round
    published = []
    poll, now = s.poll_max_records, time.time()
    with timing(engine) as spent:
        t0 = time.perf_counter()
        for i in range(0, len(records), poll):
            published += pipe.handle(records[i : i + poll], now).records
        took = time.perf_counter() - t0
    forecasts = np.array([json.loads(value)["forecast"] for _, _, value, _ in published])
    return took, spent, forecasts


def bench_backlog(settings: Any, topic: str, messages: int, result: dict, quick: bool,
                  devices: int = 10, readings: int = 2000) -> dict:
    """The same backlog through the fused and the step path; the fused path's speed-up."""
    records = backlog_records(devices, readings)
    best: dict[bool, tuple[float, dict[str, float]]] = {}
    forecasts: dict[bool, np.ndarray] = {}
    for _ in range(2 if quick else 3):
        for fused in (False, True):
            took, spent, forecasts[fused] = run_backlog(records, devices, fused)
            if fused not in best or took < best[fused][0]:
                best[fused] = (took, spent)
    (step_s, step_parts), (fused_s, fused_parts) = best[False], best[True]
    ratio = step_s / fused_s
    engine_ratio = step_parts["engine"] / max(fused_parts["engine"], 1e-9)
    diff = float(np.max(np.abs(forecasts[True] - forecasts[False]))) if len(forecasts[True]) else 0.0
    n = len(records)

    def parts(total: float, spent: dict[str, float]) -> str:
        rest = total - sum(spent.values())
        return ", ".join(f"{k} {v:.2f}" for k, v in (*spent.items(), ("rest", rest))) + f" of {total:.2f} s"

    say(f"backlog: {devices} devices x {readings:,} readings: step path {n / step_s:,.0f} readings/s "
        f"({parts(step_s, step_parts)}), fused {n / fused_s:,.0f} ({parts(fused_s, fused_parts)}) "
        f"-> backlog_ratio {ratio:.2f} (engine alone {engine_ratio:.1f}x); forecasts within {diff:.1e}")
    out = {
        "backlog_readings_per_s_step": round(n / step_s), "backlog_readings_per_s_fused": round(n / fused_s),
        "backlog_ratio": round(ratio, 3), "backlog_engine_ratio": round(engine_ratio, 2),
        "backlog_max_forecast_diff": diff,
    }
    for path, total, spent in (("step", step_s, step_parts), ("fused", fused_s, fused_parts)):
        out.update({f"backlog_{path}_{k}_share": round(v / total, 3) for k, v in spent.items()})
    return out
