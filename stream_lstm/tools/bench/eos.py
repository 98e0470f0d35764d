"""``eos_ratio``: exactly-once pipeline throughput / at-least-once, same topic, same run."""

from __future__ import annotations

from typing import Any

from stream_lstm.tools.bench.fixture import say


def bench_eos(settings: Any, topic: str, messages: int, result: dict, quick: bool) -> dict:
    from stream_lstm.tools.bench.core import bench_pipeline

    eos = bench_pipeline(settings, topic, messages, "exactly_once")
    ratio = eos / result["pipeline_msgs_per_s"]
    say(f"  pipeline (exactly-once) {eos:,.0f} msgs/s -> eos_ratio {ratio:.2f}")
    return {"pipeline_eos_msgs_per_s": round(eos), "eos_ratio": round(ratio, 3)}
