"""Consumer groups on the real broker: a restarted consumer resumes at the committed offset."""

import time
import uuid
from collections import Counter

import pytest

from stream_lstm.kafka.clients import make_admin, make_consumer, make_producer
from stream_lstm.kafka.topics import TopicSpec, ensure_topics, partition_count

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(120)]

N, FIRST, PARTITIONS = 120, 50, 3


def consume_and_commit(settings, topic, group, n, timeout_s=30.0):
    """One group member reads exactly ``n`` records, commits what it read and leaves."""
    consumer = make_consumer(settings, topic, group_id=group, auto_offset_reset="earliest",
                             enable_auto_commit=False)
    got = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(got) < n:
            assert time.monotonic() < deadline, f"only {len(got)} of {n} records in {timeout_s}s"
            for records in consumer.poll(timeout_ms=500, max_records=n - len(got)).values():
                got.extend(records)
        consumer.commit()  # the positions after the records we returned
    finally:
        consumer.close(autocommit=False)
    return got


def test_restarted_consumer_resumes_exactly_at_committed_offset(settings_factory, topic_name):
    s = settings_factory()
    ensure_topics(s, [TopicSpec(topic_name, PARTITIONS)])
    ensure_topics(s, [TopicSpec(topic_name, PARTITIONS)])  # idempotent
    assert partition_count(s, topic_name) == PARTITIONS
    producer = make_producer(s)
    for i in range(N):
        producer.send(topic_name, str(i).encode(), key=f"device-{i % 7}".encode())
    producer.flush()
    producer.close()

    group = f"g-{uuid.uuid4().hex[:8]}"
    first = consume_and_commit(s, topic_name, group, FIRST)
    admin = make_admin(s)
    try:
        committed = admin.list_group_offsets({group: None})[group]
    finally:
        admin.close()
    assert sum(meta.offset for meta in committed.values()) == FIRST
    resume_at = {p: 0 for p in range(PARTITIONS)}
    for tp, meta in committed.items():
        resume_at[tp.partition] = meta.offset
        read = [r.offset for r in first if r.partition == tp.partition]
        assert meta.offset == (max(read) + 1 if read else 0), f"{tp}: committed {meta.offset}, read up to {read}"

    second = consume_and_commit(s, topic_name, group, N - FIRST)  # a new member, same group
    for p in range(PARTITIONS):  # each partition resumes exactly where the first member stopped
        offsets = [r.offset for r in second if r.partition == p]
        if offsets:
            assert min(offsets) == resume_at[p], f"partition {p} resumed at {min(offsets)}"
    values = Counter(int(r.value) for r in first + second)
    assert sorted(values) == list(range(N)), "nothing lost"
    assert max(values.values()) == 1, "nothing read twice"
