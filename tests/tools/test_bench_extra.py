import math

from stream_lstm.tools.bench_extra import _p99_bound


def test_p99_bound_counts_only_the_run_between_two_scrapes():
    # Cumulative bucket counts, as Prometheus exposes them, before and after the run.
    before = {("commit_seconds", 0.05): 90.0, ("commit_seconds", 0.5): 100.0, ("commit_seconds", math.inf): 100.0}
    after = {("commit_seconds", 0.05): 150.0, ("commit_seconds", 0.5): 199.0,
             ("commit_seconds", math.inf): 200.0}
    # In the run: 100 commits, 60 within 0.05 s, 99 within 0.5 s (the earlier 100 must not count).
    assert _p99_bound(before, after, "commit_seconds") == 0.5
    after[("commit_seconds", 0.5)] = 198.0  # only 98 within 0.5 s: the bound is +Inf
    assert _p99_bound(before, after, "commit_seconds") == math.inf
    assert _p99_bound(before, after, "batch_seconds") == math.inf  # no such histogram


def test_bench_alerts_compares_the_pipeline_with_and_without_the_likelihood_stage():
    from stream_lstm import alerts
    from stream_lstm.tools.bench_extra import bench_alerts

    real = alerts.judge
    out = bench_alerts(None, "", 0, {}, quick=True)
    assert alerts.judge is real  # the stage swapped out for the measurement is put back
    assert 0.0 < out["alerts_ratio"] < 2.0
    assert out["alerts_state_bytes"] > 0
