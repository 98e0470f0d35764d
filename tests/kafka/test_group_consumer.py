"""The worker's group consumer (kafka/group_consumer.py) on the real broker: it joins through
its listener, reads, says when its membership is unsettled, and polls long enough to finish a
rebalance even when the worker asks for a short poll."""

import time

import pytest

from stream_lstm.encoding import encode_reading
from stream_lstm.kafka.clients import make_producer
from stream_lstm.kafka.group_consumer import GroupConsumer
from stream_lstm.kafka.rebalance import PartitionListener
from stream_lstm.kafka.topics import TopicSpec, ensure_topics

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(120)]


def test_it_joins_reads_and_settles(settings_factory, topic_name):
    s = settings_factory(input_topic=topic_name, group_id=f"{topic_name}-g", commit_interval_ms=100)
    ensure_topics(s, [TopicSpec(topic_name, 2)])
    producer = make_producer(s)
    for i in range(20):
        producer.send(topic_name, encode_reading(f"d{i}", 1_700_000_000.0, [1.0]), key=f"d{i}".encode())
    producer.flush()
    producer.close()
    assigned, stalls = set(), []
    group = GroupConsumer(s, PartitionListener(assigned.update, assigned.difference_update),
                          client_id="test", on_stall=lambda: stalls.append(1))
    try:
        assert group.rebalancing()  # not joined yet
        # A 64 KiB fetch minimum on a live input (fetch_shape): 20 readings wait for the
        # commit interval's bounded wait, not forever.
        assert group.consumer.config["fetch_min_bytes"] == 64 * 1024
        assert group.consumer.config["fetch_max_wait_ms"] == 100  # exactly-once: the interval
        read, deadline = 0, time.monotonic() + 60
        # Polls of 0 ms, as the worker makes when its transaction is due: the rebalances (a
        # start takes two: the first join sees no partitions in its metadata snapshot) still
        # complete, since a poll during one waits at least the poll timeout.
        while (read < 20 or group.rebalancing()) and time.monotonic() < deadline:
            read += sum(len(v) for v in group.poll(0).values())
        assert read == 20 and assigned == {0, 1} and not group.rebalancing()
        assert len(stalls) <= 1  # at most one abandoned join mended (counted, never silent)
        group.check_membership(assigned=True)  # a settled member is left alone
        assert group._unjoined_since is None
    finally:
        group.close()


def test_an_at_least_once_fetch_waits_half_the_commit_interval(settings_factory, topic_name):
    # At-least-once forecasts are readable once sent: the fetch's wait is all the latency the
    # fuller turns add, so it is half the interval (fetch_shape; docs/benchmarks.md).
    s = settings_factory(input_topic=topic_name, group_id=f"{topic_name}-g", commit_interval_ms=100,
                         processing_guarantee="at_least_once")
    ensure_topics(s, [TopicSpec(topic_name, 1)])
    group = GroupConsumer(s, PartitionListener(lambda _: None, lambda _: None), client_id="test")
    try:
        assert group.consumer.config["fetch_min_bytes"] == 64 * 1024
        assert group.consumer.config["fetch_max_wait_ms"] == 50
    finally:
        group.close()


def test_a_replacement_that_cannot_connect_keeps_the_old_consumer_and_tries_later(
        settings_factory, topic_name, caplog):
    # The stuck consumer's replacement is due just as the broker goes away: the worker must
    # go on (and try again later), not end with the connect error.
    from stream_lstm.kafka.local_broker import free_port

    s = settings_factory(input_topic=topic_name, group_id=f"{topic_name}-g")
    ensure_topics(s, [TopicSpec(topic_name, 1)])
    group = GroupConsumer(s, PartitionListener(lambda _: None, lambda _: None), client_id="test")
    old = group.consumer
    try:
        group.settings = s.model_copy(update={"bootstrap_servers": f"127.0.0.1:{free_port()}"})
        group._unjoined_since = time.monotonic() - 3600  # never joined, for an hour
        with caplog.at_level("WARNING", logger="stream_lstm"):
            group.check_membership(assigned=False)
        assert group.consumer is old and group._unjoined_since > time.monotonic() - 60
        assert any("trying again later" in r.getMessage() for r in caplog.records)
    finally:
        group.settings = s
        group.close()


def test_a_stuck_poll_ends_before_the_worker_stops_being_live():
    """The guard's limit was ~310 s with the default settings, the liveness limit 30 s: a
    hang inside poll restarted the pod (a restore and a replay) before the guard could end it,
    and stream_lstm_kafka_stalls_total never counted one."""
    from stream_lstm.config import Settings
    from stream_lstm.kafka.group_consumer import poll_limit_s
    from stream_lstm.metrics import HealthState

    for s in (Settings(), Settings(max_poll_interval_ms=900_000, session_timeout_ms=45_000)):
        assert poll_limit_s(s) < HealthState().liveness_timeout_s
