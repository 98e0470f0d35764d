"""The backlog benchmark (tools/bench/backlog.py) at a small scale: the same backlog through the
fused and the step path, the same forecasts from both, and where the time went."""

import math

from stream_lstm import alerts, pipeline
from stream_lstm.tools.bench.backlog import PARTS, backlog_records, bench_backlog, run_backlog


def test_the_backlog_is_each_devices_readings_oldest_first():
    records = backlog_records(devices=3, readings=4)
    assert [r.key for r in records[:4]] == [b"dev-0", b"dev-1", b"dev-2", b"dev-0"]
    assert [r.offset for r in records] == list(range(12))


def test_both_paths_publish_the_same_forecasts():
    records = backlog_records(devices=3, readings=40)
    real = pipeline.assemble, alerts.judge
    step_s, step_parts, stepped = run_backlog(records, devices=3, fused=False)
    fused_s, fused_parts, fused = run_backlog(records, devices=3, fused=True)
    assert (pipeline.assemble, alerts.judge) == real  # the timed stand-ins are put back
    assert stepped.shape == fused.shape == (120, 12)
    assert abs(fused - stepped).max() < 1e-5
    for took, parts in ((step_s, step_parts), (fused_s, fused_parts)):
        assert set(parts) == set(PARTS) and all(v > 0 for v in parts.values())
        assert sum(parts.values()) < took


def test_the_benchmark_reports_the_fused_paths_speed_up():
    out = bench_backlog(None, "", 0, {}, quick=True, devices=3, readings=60)
    assert out["backlog_max_forecast_diff"] < 1e-5
    # Timing ratios: their sense, not their size (one stall in the single packed forward would
    # turn "faster" into "slower" on a loaded machine; docs/benchmarks.md has the figures).
    assert 0.0 < out["backlog_engine_ratio"] < math.inf
    assert 0.0 < out["backlog_ratio"] < math.inf
    for path in ("step", "fused"):
        shares = [out[f"backlog_{path}_{part}_share"] for part in PARTS]
        assert all(s > 0 for s in shares) and sum(shares) < 1.0
    assert out["backlog_readings_per_s_fused"] > 0 and out["backlog_readings_per_s_step"] > 0
