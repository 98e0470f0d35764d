"""The live benchmark's roles and one short measurement each way (tools/bench_live.py)."""

import pytest

from stream_lstm.tools.bench.live import _run_one

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(400)]


@pytest.mark.parametrize(("kind", "guarantee"), [("relay", "exactly_once"), ("worker", "exactly_once"),
                                               ("worker", "at_least_once")])
def test_a_short_paced_load_is_seen_through_and_measured(settings_factory, kind, guarantee):
    row = _run_one(settings_factory(processing_guarantee=guarantee), kind, rate=100, seconds=3)
    assert row["readings"] == 300  # every reading came out, read_committed
    assert row["cpu_ms_per_reading"] > 0
    assert 0 < row["p50_ms"] <= row["p99_ms"] < 60_000
