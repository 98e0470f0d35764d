"""The relay benchmark and the worker beside it, on the real broker (tools/bench/relay.py)."""

import uuid

import pytest

from stream_lstm.tools.bench.core import prefill
from stream_lstm.tools.bench.relay import bench_relay, relay

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(300)]


def test_the_relay_reads_every_reading_and_commits_it(settings_factory, topic_name):
    s = settings_factory()
    prefill(s, topic_name, 600, 50)
    assert relay(s, topic_name, 600) > 0
    # One record out per reading, every transaction committed.
    from stream_lstm.kafka.clients import make_consumer

    consumer = make_consumer(s, f"{topic_name}-relay", group_id=f"r-{uuid.uuid4().hex[:6]}",
                             auto_offset_reset="earliest", isolation_level="read_committed")
    try:
        got = 0
        for _ in range(50):
            got += sum(len(v) for v in consumer.poll(timeout_ms=200).values())
            if got >= 600:
                break
        assert got == 600
    finally:
        consumer.close()


def test_bench_relay_reports_the_ratio_and_the_bytes(settings_factory):
    out = bench_relay(settings_factory(), "", 2_000, {}, quick=True)
    assert out["relay_msgs_per_s_4000"] > 0 and out["worker_eos_msgs_per_s_4000"] > 0
    assert 0 < out["worker_vs_relay_4000"] < 10
    assert out["forecast_bytes_per_reading_4000"] > 50
    assert out["state_bytes_per_reading_4000"] > 0
