"""The rebalance listener (kafka/rebalance.py): partitions gained and lost reach the worker as
sets of partition numbers, nothing is said for an empty change, and lost partitions count as
revoked; and a real consumer group calls it as members come and go."""

import time

import pytest
from kafka.structs import TopicPartition

from stream_lstm.kafka.clients import make_consumer
from stream_lstm.kafka.rebalance import PartitionListener
from stream_lstm.kafka.topics import TopicSpec, ensure_topics


def recording():
    calls = []
    listener = PartitionListener(lambda p: calls.append(("assigned", p)),
                                 lambda p: calls.append(("revoked", p)))
    return listener, calls


def test_changes_arrive_as_partition_numbers_and_empty_ones_not_at_all():
    listener, calls = recording()
    listener.on_partitions_assigned([TopicPartition("in", 0), TopicPartition("in", 2)])
    listener.on_partitions_revoked([TopicPartition("in", 2)])
    listener.on_partitions_assigned([])
    listener.on_partitions_revoked([])
    assert calls == [("assigned", {0, 2}), ("revoked", {2})]


def test_lost_partitions_are_dropped_as_revoked_ones_are():
    listener, calls = recording()
    listener.on_partitions_lost([TopicPartition("in", 1), TopicPartition("in", 3)])
    listener.on_partitions_lost([])
    assert calls == [("revoked", {1, 3})]


def poll_until(consumers, cond, timeout_s=60.0):
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        for c in consumers:
            c.poll(timeout_ms=100)


@pytest.mark.kafka
@pytest.mark.timeout(120)
def test_a_real_group_tells_each_member_what_it_gains_and_loses(settings_factory, topic_name):
    s = settings_factory()
    ensure_topics(s, [TopicSpec(topic_name, 2)])
    owned = {"a": set(), "b": set()}
    consumers = {}
    for name in owned:
        consumers[name] = make_consumer(s, group_id=f"{topic_name}-g", heartbeat_interval_ms=200)
    try:
        for name, consumer in consumers.items():
            # As the worker's group consumer does: a leader whose metadata lacks the topic's
            # partitions at its first join assigns nothing and, under kafka-python 3.0.12, does
            # not rebalance when they appear (this test once timed out so in CI).
            poll_until([], lambda c=consumer: bool(c.partitions_for_topic(topic_name)), 30.0)
            consumer.subscribe([topic_name], listener=PartitionListener(owned[name].update,
                                                                        owned[name].difference_update))
        first = [consumers["a"]]
        poll_until(first, lambda: owned["a"] == {0, 1})  # alone: both partitions
        both = list(consumers.values())
        poll_until(both, lambda: len(owned["a"]) == len(owned["b"]) == 1)  # b joins: one each
        assert owned["a"] | owned["b"] == {0, 1}
        consumers.pop("b").close()  # b leaves: a gets its partition back
        poll_until(first, lambda: owned["a"] == {0, 1})
    finally:
        for consumer in consumers.values():
            consumer.close()
