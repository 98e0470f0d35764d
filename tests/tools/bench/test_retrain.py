"""The retrain and swap benchmark (tools/bench/retrain.py) at a small scale: a real background
trainer at both priorities, a hot-swap and its re-warm slices, and the figures it reports."""

import math

import pytest

from stream_lstm.tools.bench.retrain import bench_retrain_and_swap, bench_swap

pytestmark = [pytest.mark.timeout(300)]

SWAP_FIGURES = {"swap_pause_ms", "swap_devices", "rewarm_longest_slice_ms", "rewarm_slice_p50_ms",
                "rewarm_slice_p99_ms", "rewarm_slices", "rewarm_total_s", "old_batch_rewarm_ms",
                "two_versions_batch_ratio"}


def test_the_benchmark_runs_and_reports_its_figures():
    out = bench_retrain_and_swap(None, None, 0, {}, quick=True, devices=300)
    assert set(out) == {"pipeline_inproc_msgs_per_s_10k", "retrain_ratio", "retrain_ratio_nice0",
                        *SWAP_FIGURES}
    assert out["swap_devices"] == 300 and out["swap_pause_ms"] > 0
    # Ratios of two timings: a shared machine can push either far from 1, so only their sense
    # is checked here (the figures themselves belong in docs/benchmarks.md).
    assert all(0 < out[k] < math.inf for k in ("retrain_ratio", "retrain_ratio_nice0"))


def test_the_swap_alone_converts_the_fleet_in_slices(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where the default (relative) state and model dirs would go
    out = bench_swap(devices=600, batches=1)
    assert list(tmp_path.iterdir()) == []  # the models it served were kept in a dir of its own
    assert set(out) == SWAP_FIGURES and out["swap_devices"] == 600
    assert out["rewarm_slices"] >= 1 and out["rewarm_longest_slice_ms"] > 0
    assert 0 < out["two_versions_batch_ratio"] < math.inf
