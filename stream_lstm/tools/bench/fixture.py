"""What the in-process benchmarks share: a pipeline over a fleet, its rate, the model spec."""

from __future__ import annotations

import sys
import time
from typing import Any

import numpy as np


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def pipeline_fixture(devices: int, **settings: Any):
    """``(settings, table, model, engine, pipeline, records)`` for a fleet of ``devices``;
    ``records(step)`` is every device's reading at that step, a minute apart.

    ``settings`` are passed to :class:`~stream_lstm.config.Settings`; ``min_history`` is 1
    unless given (a forecast from each device's first reading: every reading does the work).
    """
    from stream_lstm.config import load_settings
    from stream_lstm.encoding import encode_reading
    from stream_lstm.engine import BatchedEngine
    from stream_lstm.models import SimpleLSTM
    from stream_lstm.pipeline import BatchPipeline
    from stream_lstm.state.table import DeviceTable
    from stream_lstm.tools.bench.core import Record

    settings.setdefault("min_history", 1)
    s = load_settings(max_devices=devices, **settings)
    table = DeviceTable(devices, s.window, 1, 1, s.hidden_size, initial_capacity=devices,
                        with_experts="experts" in s.stage_names)
    model = SimpleLSTM(1, s.hidden_size, 1, s.horizon)
    engine = BatchedEngine(model, table)
    pipe = BatchPipeline(s, table, engine, lambda: "bench")
    t_start = time.time() - 100_000 * 60

    def records(step: int) -> list:
        return [Record(d % 4, d, f"dev-{d}".encode(),
                     encode_reading(f"dev-{d}", t_start + 60 * step, [20 + d % 9 + np.sin(step / 5)]))
                for d in range(devices)]

    return s, table, model, engine, pipe, records


def rate(pipe: Any, records: Any, steps: range, batch: int = 2000) -> float:
    n, t0 = 0, time.perf_counter()
    for step in steps:
        recs = records(step)
        for i in range(0, len(recs), batch):
            pipe.handle(recs[i : i + batch], time.time())
        n += len(recs)
    return n / (time.perf_counter() - t0)


def spec(s: Any):
    from stream_lstm.models.lstm import ModelSpec

    return ModelSpec(n_features=1, hidden_size=s.hidden_size, num_layers=1, horizon=s.horizon)
