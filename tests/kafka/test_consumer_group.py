"""Consumer groups on the real broker: committed offsets survive a consumer restart."""

import uuid

import pytest

from stream_lstm.kafka.clients import make_consumer, make_producer
from stream_lstm.kafka.topics import TopicSpec, ensure_topics, partition_count

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(120)]


def consume(settings, topic, group, n):
    consumer = make_consumer(settings, topic, group_id=group, auto_offset_reset="earliest",
                             enable_auto_commit=False, max_poll_records=n)
    got = []
    while len(got) < n:
        for recs in consumer.poll(timeout_ms=1000, max_records=n - len(got)).values():
            got.extend(recs)
    consumer.commit()
    consumer.close(autocommit=False)
    return got


def test_committed_offset_survives_consumer_restart(settings_factory, topic_name):
    s = settings_factory()
    ensure_topics(s, [TopicSpec(topic_name, 1)])
    assert partition_count(s, topic_name) == 1
    producer = make_producer(s)
    for i in range(100):
        producer.send(topic_name, str(i).encode(), key=b"k")
    producer.flush()
    producer.close()
    group = f"g-{uuid.uuid4().hex[:8]}"
    first = consume(s, topic_name, group, 40)
    second = consume(s, topic_name, group, 60)  # a new consumer in the same group
    values = [int(r.value) for r in first + second]
    assert values == list(range(100)), "resumed exactly at the committed offset"
    assert second[0].offset == 40
