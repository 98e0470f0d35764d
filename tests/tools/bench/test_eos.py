"""The exactly-once benchmark (tools/bench/eos.py) on the real broker: the worker exactly-once
against at-least-once over the same pre-filled topic."""

import pytest

from stream_lstm.tools.bench.core import bench_pipeline, prefill
from stream_lstm.tools.bench.eos import bench_eos

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(300)]


def test_exactly_once_against_at_least_once(settings_factory, topic_name):
    s = settings_factory()
    prefill(s, topic_name, 2_000, 200)
    result = {"pipeline_msgs_per_s": bench_pipeline(s, topic_name, 2_000, "at_least_once")}
    out = bench_eos(s, topic_name, 2_000, result, quick=True)
    assert out["pipeline_eos_msgs_per_s"] > 0
    assert out["eos_ratio"] == pytest.approx(out["pipeline_eos_msgs_per_s"] / result["pipeline_msgs_per_s"], rel=0.01)
