"""The restore benchmark (tools/bench_restore.py) on the real broker, at a small scale: the
changelog's devices are restored, and one checkpoint interval of readings replayed through
the pipeline with each device loaded from the restored store."""

import pytest

from stream_lstm.tools.bench.restore import bench_restore

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(180)]


def test_restore_then_replay_one_interval(settings_factory, topic_name):
    s = settings_factory(checkpoint_interval_s=30.0)
    out = bench_restore(s, topic_name, 0, {}, quick=True, devices=1200)
    # 1,200 devices a minute for 30 s: 600 readings replayed (the benchmark checks the count).
    assert set(out) == {"restore_s_1k", "replay_s_1k", "restore_and_replay_s_1k"}
    assert 0 < out["restore_s_1k"] and 0 < out["replay_s_1k"]
    assert out["restore_and_replay_s_1k"] == pytest.approx(out["restore_s_1k"] + out["replay_s_1k"], abs=0.02)
