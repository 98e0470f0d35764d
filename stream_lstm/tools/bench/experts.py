"""``experts_ratio``: in-process pipeline throughput with the per-device experts / without."""

from __future__ import annotations

from typing import Any

from stream_lstm.tools.bench.fixture import pipeline_fixture, rate, say


def bench_experts(settings: Any, topic: str, messages: int, result: dict, quick: bool,
                  devices: int = 10_000) -> dict:
    """In-process pipeline throughput with the experts stage, against the same list without it."""
    rates = {}
    for stages in ("blend,calibration", "blend,experts,calibration"):
        s, _, _, _, pipe, records = pipeline_fixture(devices, forecast_stages=stages)
        rate(pipe, records, range(20))  # past the warm-up, so the experts learn
        rates[stages] = rate(pipe, records, range(20, 23 if quick else 30))
    without, with_ = rates["blend,calibration"], rates["blend,experts,calibration"]
    ratio = with_ / without
    say(f"experts: pipeline {without:,.0f} msgs/s without, {with_:,.0f} with "
        f"({devices:,} devices) -> experts_ratio {ratio:.2f}")
    return {"experts_ratio": round(ratio, 3)}
