"""A group join that kafka-python finishes but never applies is mended (kafka/join.py).

The join is abandoned the way test_flood met it: a leader rejoins because its metadata changed,
the poll that starts the join times out at once, and the leader's own assignment then records
the new metadata, so no later poll looks at the finished join.
"""

import time

import pytest
from kafka.coordinator.assignors.cooperative_sticky import CooperativeStickyAssignor
from kafka.structs import MemberState, OffsetAndMetadata, TopicPartition

from stream_lstm.kafka.clients import make_consumer
from stream_lstm.kafka.join import is_rebalancing, mend_abandoned_join
from stream_lstm.kafka.topics import TopicSpec, ensure_topics

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(120)]


def poll_until(consumer, done, timeout_s=30.0, poll_ms=200):
    deadline = time.monotonic() + timeout_s
    while not done() and time.monotonic() < deadline:
        consumer.poll(timeout_ms=poll_ms)
    return done()


def abandon_a_join(consumer):
    """Start a metadata-triggered rejoin with a poll that gives up at once; wait for it to end."""
    coordinator = consumer._coordinator
    coordinator._assignment_snapshot = {}  # as if the last assignment saw no partitions
    assert coordinator.need_rejoin()
    consumer.poll(timeout_ms=0)
    deadline = time.monotonic() + 20
    while (coordinator._join_task is None or not coordinator._join_task.is_done) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert coordinator._join_task is not None and coordinator._join_task.is_done


def test_an_abandoned_join_is_rejoined_and_offsets_commit_again(settings_factory, topic_name):
    s = settings_factory(input_topic=topic_name)
    ensure_topics(s, [TopicSpec(topic_name, 2)])
    # metadata_max_age_ms: should the first join come before the consumer's metadata holds the
    # new topic (and assign nothing), the next refresh, a second later rather than kafka-python's
    # 5 minutes, changes the leader's metadata snapshot and so makes it rejoin. (The worker and
    # test_rebalance wait for the metadata before subscribing instead; here the abandoned join
    # needs the snapshot taken after the subscription.)
    consumer = make_consumer(s, group_id=f"{topic_name}-g", enable_auto_commit=False,
                             session_timeout_ms=6000, metadata_max_age_ms=1000,
                             partition_assignment_strategy=[CooperativeStickyAssignor()])
    try:
        consumer.subscribe([topic_name])
        assert poll_until(consumer, lambda: len(consumer.assignment()) == 2 and not is_rebalancing(consumer))
        assert not mend_abandoned_join(consumer)  # a settled member is left alone

        abandon_a_join(consumer)
        # The join finished, yet the member is stuck mid-rebalance and polls do not free it.
        assert consumer.group_metadata().state is not MemberState.STABLE
        assert not consumer._coordinator.need_rejoin()
        assert not poll_until(consumer, lambda: not is_rebalancing(consumer), timeout_s=1.0)

        assert mend_abandoned_join(consumer)
        assert poll_until(consumer, lambda: not is_rebalancing(consumer))
        assert len(consumer.assignment()) == 2
        consumer.commit({TopicPartition(topic_name, 0): OffsetAndMetadata(0, "", -1)})
    finally:
        consumer.close(autocommit=False)
