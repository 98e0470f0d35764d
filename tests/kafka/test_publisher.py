"""The kafka-python internals that kafka/publisher.py relies on.

kafka-python's ``commit_transaction()`` waits without a deadline, so the publisher does what it
does (``_transaction_manager.begin_commit()``, ``_sender.wakeup()``, ``result.wait()``) with a
deadline. These are private names; pyproject allows any kafka-python 3.x, so an upgrade that
renames them must fail here, by name, rather than in production the first time a commit hangs.
"""

import inspect

import pytest
from kafka.producer.kafka import KafkaProducer
from kafka.producer.record_accumulator import RecordAccumulator
from kafka.producer.sender import Sender
from kafka.producer.transaction_manager import TransactionalRequestResult, TransactionManager


def test_commit_and_abort_are_still_begin_then_wake_then_wait():
    commit = inspect.getsource(KafkaProducer.commit_transaction)
    abort = inspect.getsource(KafkaProducer.abort_transaction)
    assert "self._transaction_manager.begin_commit()" in commit
    assert "self._transaction_manager.begin_abort()" in abort
    for source in (commit, abort):
        assert "self._sender.wakeup()" in source
        assert "result.wait()" in source


def test_the_private_pieces_have_the_shapes_the_publisher_calls():
    for name in ("begin_commit", "begin_abort", "send_offsets_to_transaction"):
        assert callable(getattr(TransactionManager, name))
    assert list(inspect.signature(TransactionManager.send_offsets_to_transaction).parameters) == [
        "self", "offsets", "group_metadata"]
    assert "timeout_ms" in inspect.signature(TransactionalRequestResult.wait).parameters
    assert callable(Sender.wakeup)
    # BatchPublisher.close stops the sender thread of a producer whose own close() failed.
    assert list(inspect.signature(Sender.force_close).parameters) == ["self"]
    init = inspect.getsource(KafkaProducer.__init__)
    assert "self._transaction_manager" in init and "self._sender" in init


def test_the_lean_send_path_does_what_send_does_with_its_records():
    # BatchPublisher._lean_send calls the accumulator and the transaction manager as send() does.
    send = inspect.getsource(KafkaProducer.send)
    assert "self._accumulator.append(tp, timestamp_ms, key_bytes, value_bytes, headers" in send
    assert "self._transaction_manager.maybe_add_partition_to_transaction(tp)" in send
    assert "self._sender.wakeup()" in send
    append = inspect.signature(RecordAccumulator.append).parameters
    assert list(append)[:6] == ["self", "tp", "timestamp_ms", "key", "value", "headers"]
    assert "future, batch_is_full, new_batch_created, abort_for_new_batch = result" in send
    assert callable(TransactionManager.maybe_add_partition_to_transaction)
    assert callable(TransactionManager.is_transactional)


@pytest.mark.kafka
@pytest.mark.timeout(120)
def test_lean_and_full_sends_share_one_transaction_and_its_fate(settings_factory, topic_name):
    from kafka.structs import TopicPartition

    from stream_lstm.kafka.clients import make_consumer, make_producer
    from stream_lstm.kafka.publisher import BatchPublisher
    from stream_lstm.kafka.topics import TopicSpec, ensure_topics

    s = settings_factory()
    other = f"{topic_name}-o"
    ensure_topics(s, [TopicSpec(topic_name, 2), TopicSpec(other, 1)])
    publisher = BatchPublisher(make_producer(s, transactional_id=f"{topic_name}-tx"), True,
                               send_timeout_s=20)
    try:
        publisher.begin()
        publisher.send(other, b"x", key=b"k")  # the producer now fetches this topic's metadata
        # These name a topic the producer has no metadata for: it must ask (else their
        # batches wait for leaders it never learns, and the commit times out).
        publisher.send(topic_name, b"lean-0", key=b"a", partition=0)
        publisher.send(topic_name, b"lean-1", key=b"b", partition=1)
        written = publisher.commit({}, consumer=None)
        assert written == {(topic_name, 0): 0, (topic_name, 1): 0, (other, 0): 0}
        publisher.begin()
        publisher.send(topic_name, b"full", key=b"c", partition=1, headers=[("h", b"1")])
        publisher.send(topic_name, None, key=b"d", partition=0)  # a tombstone: send()
        publisher.send(topic_name, b"lean-2", key=b"e", partition=0)
        assert publisher.commit({}, consumer=None) == {(topic_name, 0): 3, (topic_name, 1): 2}
        publisher.begin()
        publisher.send(topic_name, b"aborted", key=b"a", partition=0)
        publisher.abort()
    finally:
        publisher.producer.close(timeout=5)
    reader = make_consumer(s, group_id=None, isolation_level="read_committed",
                           enable_auto_commit=False)
    tps = [TopicPartition(topic_name, p) for p in (0, 1)]
    reader.assign(tps)
    reader.seek_to_beginning(*tps)
    seen = []
    try:
        for _ in range(100):
            for recs in reader.poll(timeout_ms=200).values():
                seen.extend((r.partition, r.key, r.value, list(r.headers or [])) for r in recs)
            if len(seen) >= 5:
                break
    finally:
        reader.close()
    assert sorted(seen, key=lambda r: r[1]) == [
        (0, b"a", b"lean-0", []), (1, b"b", b"lean-1", []), (1, b"c", b"full", [("h", b"1")]),
        (0, b"d", None, []), (0, b"e", b"lean-2", [])]


@pytest.mark.kafka
@pytest.mark.timeout(120)
def test_the_key_to_partition_cache_is_bounded_by_a_tables_worth_and_hashes_as_kafka_does(
        settings_factory, topic_name):
    """It held up to a million keys a topic (~100 MB, found by a soak test), whatever the
    worker's STREAM_LSTM_MAX_DEVICES: a fleet whose ids churn grew it that far."""
    from kafka.partitioner.default import DefaultPartitioner

    from stream_lstm.kafka.clients import make_producer
    from stream_lstm.kafka.publisher import BatchPublisher
    from stream_lstm.kafka.topics import TopicSpec, ensure_topics

    s = settings_factory()
    ensure_topics(s, [TopicSpec(topic_name, 4)])
    publisher = BatchPublisher(make_producer(s), False, max_keys=3)
    try:
        publisher.producer.send(topic_name, b"x", key=b"k").get(timeout=30)  # (its metadata)
        keys = [f"dev-{i}".encode() for i in range(10)]
        got = [publisher._partition_for(topic_name, k) for k in keys]
        cluster = publisher.producer._metadata  # (what the producer's own partitioner reads)
        assert got == [DefaultPartitioner().partition(topic_name, k, k, None, None, cluster) for k in keys]
        assert 0 < len(publisher._partitions[topic_name][1]) <= 3
    finally:
        publisher.producer.close(timeout=5)


def test_a_fencing_is_told_in_both_of_kafka_pythons_words_and_nothing_else_is():
    """The worker counted only ProducerFenced as a fencing and the trainer both words: kafka-python
    says InvalidProducerEpoch for a rival's newer epoch on a produce request's records."""
    from kafka.errors import InvalidProducerEpochError, KafkaTimeoutError, ProducerFencedError

    from stream_lstm.kafka.publisher import PublishError, is_fencing

    assert is_fencing(ProducerFencedError()) and is_fencing(InvalidProducerEpochError())
    assert is_fencing(PublishError(f"send to forecasts failed: {InvalidProducerEpochError()}"))
    assert not any(is_fencing(e) for e in (KafkaTimeoutError(), PublishError("send to t not acknowledged in 30s")))
