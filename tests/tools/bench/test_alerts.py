"""The alerts benchmark (tools/bench/alerts.py): the likelihood stage against judging nothing."""

import math


def test_bench_alerts_compares_the_pipeline_with_and_without_the_likelihood_stage():
    from stream_lstm import alerts
    from stream_lstm.tools.bench.alerts import bench_alerts

    real = alerts.judge
    out = bench_alerts(None, "", 0, {}, quick=True)
    assert alerts.judge is real  # the stage swapped out for the measurement is put back
    assert 0.0 < out["alerts_ratio"] < math.inf  # a timing ratio: its sense, not its size
    assert out["alerts_state_bytes"] > 0
