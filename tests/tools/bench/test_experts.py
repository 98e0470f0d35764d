"""The experts benchmark (tools/bench/experts.py) at a small scale: the same pipeline with and
without the experts stage."""

import math

from stream_lstm.tools.bench.experts import bench_experts


def test_the_benchmark_compares_the_stage_lists():
    out = bench_experts(None, None, 0, {}, quick=True, devices=300)
    assert set(out) == {"experts_ratio"} and 0 < out["experts_ratio"] < math.inf  # its sense, not its size
