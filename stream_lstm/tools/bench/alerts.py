"""``alerts_ratio``: in-process pipeline throughput with the anomaly likelihood and alert events
/ with that stage judging nothing; ``alerts_state_bytes``: what its state adds to a snapshot."""

from __future__ import annotations

from typing import Any

import numpy as np

from stream_lstm.tools.bench.fixture import pipeline_fixture, rate, say


def bench_alerts(settings: Any, topic: str, messages: int, result: dict, quick: bool) -> dict:
    """In-process pipeline throughput with the likelihood and alert stage, against the same
    pipeline whose stage judges nothing (swapped in for this measurement only)."""
    from stream_lstm import alerts
    from stream_lstm.checkpointing.codec import encode_snapshot

    def judges_nothing(batch: Any, fb: Any, table: Any, **_: Any) -> list:
        fb.anomaly_likelihood = np.full(len(batch), np.nan)
        fb.is_anomaly = fb.corroborated = np.zeros(len(batch), bool)
        return []

    devices, rates, real = 10_000, {}, alerts.judge
    for name, stage in (("without", judges_nothing), ("with", real)):
        alerts.judge = stage
        try:
            _, table, _, _, pipe, records = pipeline_fixture(devices)
            rate(pipe, records, range(5))
            rates[name] = rate(pipe, records, range(5, 8 if quick else 15))
        finally:
            alerts.judge = real
    snap = table.snapshot(next(iter(table.index.values())))
    full = len(encode_snapshot(snap))
    for column in ("likelihood", "value_range", "range_held"):  # the stage's own state (an
        snap.columns.pop(column, None)  # open alert aside; a held reading is saved only while held)
    ratio = rates["with"] / rates["without"]
    say(f"alerts: pipeline {rates['without']:,.0f} msgs/s without the likelihood stage, "
         f"{rates['with']:,.0f} with ({devices:,} devices) -> alerts_ratio {ratio:.2f}; "
         f"+{full - len(encode_snapshot(snap))} B a snapshot")
    return {"alerts_ratio": round(ratio, 3), "alerts_state_bytes": full - len(encode_snapshot(snap))}
