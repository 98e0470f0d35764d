"""The processes benchmark (tools/bench/processes.py) at a small scale on the real broker:
``stream-lstm run`` with 1 and with 2 worker processes over the same backlog."""

import pytest

from stream_lstm.tools.bench.processes import bench_processes

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(300)]


def test_one_process_against_two_over_the_same_backlog(settings_factory):
    # (not quick: the quick run's backlog is a fixed 200,000 readings, QUICK_BACKLOG)
    out = bench_processes(settings_factory(), "", 6_000, {}, quick=False, devices=300)
    assert out["processes_backlog_readings"] == 6_000 and out["processes_devices"] == 300
    assert out["processes_1_msgs_per_s"] > 0 and out["processes_2_msgs_per_s"] > 0
    assert out["processes_ratio"] == pytest.approx(
        out["processes_2_msgs_per_s"] / out["processes_1_msgs_per_s"], rel=0.01)
    assert out["processes_1_wall_s"] > 0 and out["processes_2_wall_s"] > 0
