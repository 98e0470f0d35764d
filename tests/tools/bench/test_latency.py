"""The latency benchmark's p99 bound from two scrapes (tools/bench/latency.py)."""

import math

from stream_lstm.tools.bench.latency import _p99_bound


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
