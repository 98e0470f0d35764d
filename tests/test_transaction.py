"""The transaction unit (transaction.py) on the real broker, exactly-once: what it sent is read
under read_committed only once committed, an aborted transaction is never read, and after a
failure a fresh producer commits again."""

import time
import uuid
from contextlib import contextmanager

import numpy as np
import pytest

from stream_lstm.checkpointing.manager import StateManager
from stream_lstm.config import Settings
from stream_lstm.kafka.clients import make_consumer, make_producer
from stream_lstm.kafka.publisher import BatchPublisher
from stream_lstm.kafka.topics import TopicSpec, ensure_topics
from stream_lstm.metrics import Metrics
from stream_lstm.pipeline import BatchCounts, BatchOutput
from stream_lstm.state.table import DeviceTable
from stream_lstm.transaction import TransactionUnit

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(120)]


@contextmanager
def transaction_unit(settings, tmp_path):
    """A transaction unit (exactly-once) writing to ``settings.output_topic``, made here;
    yields ``(tx, state, metrics)`` and closes them after."""
    ensure_topics(settings, [TopicSpec(settings.output_topic, 1)])
    table = DeviceTable(8, 4, 1, 1, 8)
    state = StateManager(settings, tmp_path / "state.sqlite")
    metrics = Metrics()
    txn_id = f"{settings.group_id}-{uuid.uuid4().hex[:6]}"

    def new_publisher():
        return BatchPublisher(make_producer(settings, transactional_id=txn_id), True, send_timeout_s=20)

    tx = TransactionUnit(settings, state, table, metrics, new_publisher)
    tx.connect()
    try:
        yield tx, state, metrics
    finally:
        tx.close()
        state.store.close(clean=True)


def output(topic, values):
    records = [(topic, b"k", v, None) for v in values]
    return BatchOutput(records, BatchCounts(consumed=len(values), forecasts=len(values)),
                       np.zeros(0, np.int64), 0.0)


def read_until(settings, topic, last: bytes, timeout_s=60):
    """Every value read under read_committed, up to and including ``last``."""
    consumer = make_consumer(settings, topic, group_id=f"r-{uuid.uuid4().hex[:6]}",
                             auto_offset_reset="earliest", enable_auto_commit=False,
                             isolation_level="read_committed")
    seen: list[bytes] = []
    try:
        for _ in range(int(timeout_s / 0.3)):
            for recs in consumer.poll(timeout_ms=300).values():
                seen.extend(r.value for r in recs)
            if last in seen:
                return seen
    finally:
        consumer.close()
    raise AssertionError(f"{last!r} never became readable; read {seen}")


def test_committed_batches_are_read_and_aborted_ones_never(settings_factory, topic_name, tmp_path):
    s = settings_factory(output_topic=topic_name, group_id=f"{topic_name}-g")
    with transaction_unit(s, tmp_path) as (tx, state, metrics):
        tx.send({}, output(topic_name, [b"a1", b"a2"]))
        tx.send({}, output(topic_name, [b"a3"]))  # the same open transaction
        assert tx.open is not None and tx.totals.forecasts == 0  # counted at commit
        tx.commit(consumer=None)
        assert tx.open is None and tx.totals.forecasts == 3

        tx.send({}, output(topic_name, [b"lost"]))
        assert tx.abort() is None
        assert metrics.transactions.labels("aborted")._value.get() == 1
        tx.reconnect()  # what the worker does after a failure: a fresh, fencing producer
        tx.send({}, output(topic_name, [b"b1"]))
        tx.commit(consumer=None)
        assert read_until(s, topic_name, b"b1") == [b"a1", b"a2", b"a3", b"b1"]
        assert metrics.transactions.labels("committed")._value.get() == 2


def test_a_commit_is_due_by_age_and_a_poll_never_outwaits_it(settings_factory, topic_name, tmp_path):
    s = settings_factory(output_topic=topic_name, group_id=f"{topic_name}-g", commit_interval_ms=100,
                         poll_timeout_ms=500)
    with transaction_unit(s, tmp_path) as (tx, state, _):
        assert not tx.due() and tx.wait_ms() == 500  # nothing open: a poll waits its full time
        tx.send({}, output(topic_name, [b"x"]))
        assert tx.wait_ms() <= 100

        def now_due():  # the transaction just begun: its age, not the broker's speed, is tested
            # (the first send waits for the topic's metadata, at times for over 50 ms)
            tx.open.began = time.monotonic()
            return tx.due()

        assert not now_due()
        # The next turn would carry it past the interval: due now, rather than a turn late.
        tx.turn_ended(50)
        assert not now_due()
        tx.turn_ended(100)
        assert now_due()
        # A short turn (one that processed a fetch) after a long one (that waited for it): the
        # next may wait again, so the longer of the two is the guess.
        tx.turn_ended(5)
        assert now_due()
        tx.turn_ended(5)
        assert not now_due()
        tx.open.began -= 0.2  # the interval has passed
        assert tx.due() and tx.wait_ms() == 0
        tx.commit(consumer=None)
        assert not tx.due()


def test_a_commit_in_flight_is_settled_before_the_next_batch_is_sent(settings_factory, topic_name, tmp_path):
    s = settings_factory(output_topic=topic_name, group_id=f"{topic_name}-g")
    with transaction_unit(s, tmp_path) as (tx, state, metrics):
        tx.send({}, output(topic_name, [b"a1", b"a2"]))
        tx.commit(consumer=None, wait=False)  # begun: the worker polls and computes meanwhile
        assert tx.committing and tx.open is None
        assert tx.in_flight().forecasts == 2 and tx.totals.forecasts == 0
        tx.send({}, output(topic_name, [b"b1"]))  # waits for it, then opens the next
        assert not tx.committing and tx.totals.forecasts == 2
        assert metrics.transactions.labels("committed")._value.get() == 1
        tx.commit(consumer=None, wait=False)
        tx.settle()
        assert tx.totals.forecasts == 3 and tx.in_flight().forecasts == 0
        assert read_until(s, topic_name, b"b1") == [b"a1", b"a2", b"b1"]


def test_a_commit_that_failed_here_but_completed_on_the_broker_is_counted(settings_factory, topic_name, tmp_path):
    """A broker that stops after taking a commit and before answering it completes the commit
    when it comes back: its forecasts are published and the group's offsets moved past its
    readings, which the worker then replays without counting. It was never counted (a broker
    outage test once ended 25 readings short of what was published). The lost answer is
    injected here; the commit itself is real."""
    from kafka import TopicPartition

    from stream_lstm.kafka.publisher import PublishError

    s = settings_factory(input_topic=f"{topic_name}-in", output_topic=topic_name, group_id=f"{topic_name}-g")
    ensure_topics(s, [TopicSpec(s.input_topic, 1)])
    producer = make_producer(s)
    for i in range(5):
        producer.send(s.input_topic, f"r{i}".encode())
    producer.flush()
    producer.close()
    consumer = make_consumer(s, s.input_topic, group_id=s.group_id, auto_offset_reset="earliest",
                             enable_auto_commit=False, isolation_level="read_committed")
    tp = TopicPartition(s.input_topic, 0)
    try:
        polled: dict = {}
        for _ in range(100):
            for part, records in consumer.poll(timeout_ms=300, max_records=3).items():
                polled.setdefault(part, []).extend(records)
            if polled:
                break
        assert [r.offset for r in polled[tp]] == [0, 1, 2]
        with transaction_unit(s, tmp_path) as (tx, _, metrics):
            tx.send(polled, output(topic_name, [b"a0", b"a1", b"a2"]))
            real = tx.publisher.finish_commit

            def answer_lost():
                real()  # (the broker commits ...)
                raise PublishError("the broker went away before answering")  # (... unheard)

            tx.publisher.finish_commit = answer_lost
            with pytest.raises(PublishError):
                tx.commit(consumer)
            assert tx.totals.consumed == 0 and tx.in_doubt is not None
            tx.abort()
            tx.reconnect()
            committed = consumer.committed(tp, metadata=True)
            assert committed.offset == 3  # it did commit
            tx.resolve_in_doubt({tp: committed})
            assert tx.totals.consumed == 3 and tx.totals.forecasts == 3 and tx.in_doubt is None
            assert metrics.transactions.labels("committed")._value.get() == 1
            assert metrics.readings_consumed.labels(s.input_topic, "0")._value.get() == 3

            # A commit that never reached the broker: the group's offsets stay where they were.
            rest = consumer.poll(timeout_ms=5000, max_records=2)
            tx.send(rest, output(topic_name, [b"a3", b"a4"]))

            def refused(*_args, **_kw):
                raise PublishError("the broker is away")

            tx.publisher.start_commit = refused
            with pytest.raises(PublishError):
                tx.commit(consumer)
            tx.abort()
            tx.reconnect()
            unit = tx.in_doubt
            tx.resolve_in_doubt({tp: consumer.committed(tp, metadata=True)})
            assert tx.totals.consumed == 3 and tx.in_doubt is None
            assert metrics.transactions.labels("aborted")._value.get() == 1
            # The same offsets committed by another member meanwhile (its tag, not this
            # commit's) are not this commit; a commit none of whose partitions is held any more
            # is counted neither way (whether it completed is unknown).
            from kafka.structs import OffsetAndMetadata

            tx.in_doubt = unit
            tx.resolve_in_doubt({tp: OffsetAndMetadata(5, "another-member-1", -1)})
            assert tx.totals.consumed == 3 and metrics.transactions.labels("aborted")._value.get() == 2
            tx.in_doubt = unit
            tx.resolve_in_doubt({})
            assert tx.totals.consumed == 3 and metrics.transactions.labels("aborted")._value.get() == 2
            assert metrics.transactions.labels("committed")._value.get() == 1
            assert read_until(s, topic_name, b"a2") == [b"a0", b"a1", b"a2"]
    finally:
        consumer.close()


def test_a_fencing_counts_against_a_rival_but_not_against_its_own_stalled_transaction(tmp_path):
    """kafka-python reports the broker's abort of this worker's own transaction, left open past
    its timeout (a VM paused for over a minute), as a fencing too: two such stalls stopped a
    lone worker (a review). Only fencings of fresh transactions show a live rival."""
    from stream_lstm.transaction import OpenTransaction, transaction_timeout_ms

    s = Settings(state_dir=tmp_path, commit_interval_ms=100)
    tx = TransactionUnit(s, StateManager(s, tmp_path / "state.sqlite"), DeviceTable(8, 4, 1, 1, 8), Metrics(),
                         lambda: None)
    stalled = time.monotonic() - transaction_timeout_ms(s) / 1000 - 1
    for _ in range(3):  # its own stalls, however many: never a rival
        tx.open = OpenTransaction(began=stalled)
        assert not tx.fenced_again()
        tx.open = None
    assert not tx.fenced_again()  # a fresh transaction fenced: once may be a restart of its own
    tx.open = OpenTransaction(began=time.monotonic())
    assert tx.fenced_again()  # twice within 10 minutes: a live rival holds the id
    tx.state.store.close(clean=True)


def test_its_own_stalled_transaction_is_no_rival_when_its_commit_fails_as_it_settles(settings_factory,
                                                                                     topic_name, tmp_path, monkeypatch):
    """The worker commits without waiting (exactly-once) and settles the commit later: a
    transaction the broker aborted past its timeout (this worker stalled) failed there, when
    the transaction was neither open nor committing any more, only in doubt, so fenced_again
    took it for a rival's fencing; two such stalls within 10 minutes stopped a lone worker
    (FENCED_OUT). The broker's timeout is shortened here to 2 s, the worker's view of it too."""
    from kafka.structs import TopicPartition

    from stream_lstm import transaction
    from stream_lstm.kafka.publisher import is_fencing

    s = settings_factory(output_topic=topic_name)
    monkeypatch.setattr(transaction, "transaction_timeout_ms", lambda settings: 2000)
    ensure_topics(s, [TopicSpec(topic_name, 1)])
    txn_id = f"{s.group_id}-{uuid.uuid4().hex[:6]}"
    tx = TransactionUnit(s, StateManager(s, tmp_path / "state.sqlite"), DeviceTable(8, 4, 1, 1, 8), Metrics(),
                         lambda: BatchPublisher(make_producer(s, transactional_id=txn_id, transaction_timeout_ms=2000),
                                                True, send_timeout_s=20))
    tx.connect()
    reader = make_consumer(s, group_id=None, isolation_level="read_committed")
    tp = TopicPartition(topic_name, 0)
    try:
        for i in range(2):
            tx.send({}, output(topic_name, [f"s{i}".encode()]))
            tx.publisher.producer.flush()
            held = reader.end_offsets([tp])[tp]  # (the last stable offset, held by the open transaction)
            deadline = time.monotonic() + 60
            while reader.end_offsets([tp])[tp] <= held:  # until the broker aborts it
                assert time.monotonic() < deadline, "the broker did not abort the transaction"
                time.sleep(0.1)
            tx.commit(None, wait=False)
            with pytest.raises(Exception) as failed:
                tx.settle()
            assert is_fencing(failed.value)  # (kafka-python says ProducerFenced for it)
            assert not tx.fenced_again(), f"stall {i + 1} taken for a rival"
            tx.abort()
            tx.reconnect()
            tx.resolve_in_doubt({})
    finally:
        reader.close()
        tx.close()
        tx.state.store.close(clean=True)
