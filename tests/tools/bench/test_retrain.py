"""The retrain and swap benchmark (tools/bench/retrain.py) at a small scale: a real background
trainer at both priorities, a hot-swap and its re-warm, and the figures it reports."""

import pytest

from stream_lstm.tools.bench.retrain import bench_retrain_and_swap

pytestmark = [pytest.mark.timeout(300)]


def test_the_benchmark_runs_and_reports_its_figures():
    out = bench_retrain_and_swap(None, None, 0, {}, quick=True, devices=300)
    assert set(out) == {"pipeline_inproc_msgs_per_s_10k", "retrain_ratio", "retrain_ratio_nice0",
                        "swap_pause_ms", "swap_devices"}
    assert out["swap_devices"] == 300 and out["swap_pause_ms"] > 0
    assert 0 < out["retrain_ratio"] < 3 and 0 < out["retrain_ratio_nice0"] < 3
