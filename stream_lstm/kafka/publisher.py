"""BatchPublisher: send a batch's records and commit its input offsets, as one unit.

Two guarantees, chosen by ``STREAM_LSTM_PROCESSING_GUARANTEE``:

* ``at_least_once``: records are sent, the producer is flushed, every send is checked, and
  only then are the consumer offsets committed. A crash before the commit replays the batch.
* ``exactly_once``: each batch is one Kafka transaction holding its forecasts, dead letters,
  state-changelog records *and* the consumer offsets (``send_offsets_to_transaction`` with the
  consumer's group metadata, KIP-447). Readers with ``isolation_level=read_committed`` see a
  batch entirely or not at all. The transactional id is stable per worker instance; the group
  generation in the offsets commit fences a zombie that lost its partitions.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from kafka import KafkaConsumer, KafkaProducer
from kafka.partitioner.default import murmur2
from kafka.producer.future import FutureRecordMetadata
from kafka.structs import OffsetAndMetadata, TopicPartition

log = logging.getLogger(__name__)


# The lean path takes records up to this size (the producer's max.request.size is 1 MiB; a
# forecast is ~1 KB, a device's checkpoint ~4.3 KB); larger ones take send()'s size check.
_LEAN_MAX_BYTES = 256 * 1024
_NO_HEADERS: list = []


class PublishError(RuntimeError):
    """A batch could not be published; its offsets were not committed."""


# kafka-python turns a newer epoch of the transactional id into ProducerFencedError on its
# transactional requests, but leaves it InvalidProducerEpochError on a produce request's records.
_FENCINGS = ("ProducerFenced", "InvalidProducerEpoch")


def is_fencing(exc: BaseException) -> bool:
    """``exc`` (or the failure a :class:`PublishError` names) says another producer took this
    producer's transactional id, in either of kafka-python's two words for it; the worker and
    the trainer tell a fencing by this one test.

    >>> from kafka.errors import InvalidProducerEpochError, KafkaTimeoutError
    >>> is_fencing(PublishError(f"send to t failed: {InvalidProducerEpochError()}")), is_fencing(KafkaTimeoutError())
    (True, False)
    """
    return any(word in repr(exc) for word in _FENCINGS)


def bounded_transaction_step(producer: Any, start: Any, what: str, timeout_s: float) -> None:
    """Run a transactional request (``start``: the transaction manager's ``begin_commit``,
    ``begin_abort``, ...) and wait for it at most ``timeout_s``; :class:`PublishError` past it.

    kafka-python's ``commit_transaction()``, ``abort_transaction()`` and
    ``send_offsets_to_transaction()`` wait without a deadline; when the broker disappears
    mid-commit they block forever. This does what they do, with a deadline, so the caller can
    roll back and retry instead. The private names it uses are pinned by
    tests/kafka/test_publisher.py, which fails by name if a kafka-python upgrade changes them.
    """
    result = start()
    producer._sender.wakeup()
    if not result.wait(timeout_ms=int(timeout_s * 1000)):  # (raises the request's own error)
        raise PublishError(f"{what} did not finish within {timeout_s:.0f}s")


class BatchPublisher:
    """Publishes batches with at-least-once or exactly-once semantics.

    Parameters
    ----------
    producer
        A kafka-python producer; transactional (``transactional_id`` set) for exactly-once.
    exactly_once
        Use transactions.
    send_timeout_s
        How long a flush may take before the batch counts as failed.
    max_keys
        Most keys a topic's key -> partition cache holds (cleared when full): the worker's
        ``STREAM_LSTM_MAX_DEVICES``.

    Example: see tests/test_transaction.py::test_committed_batches_are_read_and_aborted_ones_never
    """

    def __init__(self, producer: KafkaProducer, exactly_once: bool, send_timeout_s: float = 30.0,
                 max_keys: int = 100_000):
        self.producer = producer
        self.max_keys = max_keys
        self.exactly_once = exactly_once
        self.send_timeout_s = send_timeout_s
        self._futures: list[tuple[str, int | None, FutureRecordMetadata]] = []
        # Key and value bytes sent per topic (benchmarks: state written against forecasts).
        self.sent_bytes: dict[str, int] = {}
        self._in_txn = False
        # A commit started and not yet finished: (its sends' futures, the transaction's
        # commit result or None, its offsets, the consumer, its deadline).
        self._committing: tuple | None = None
        # key -> partition per topic. kafka-python hashes every key in Python (murmur2) on each
        # send; the mapping never changes for a topic, so we remember it: sends ~1.8x faster.
        self._partitions: dict[str, tuple[int, dict[bytes, int]]] = {}
        # The lean path's partitions, and those already added to the open transaction.
        self._tps: dict[tuple[str, int], TopicPartition] = {}
        self._joined: set[TopicPartition] = set()
        self._lean_topics: set[str] = set()
        if exactly_once:
            # Fences any earlier producer with the same transactional id and aborts its
            # unfinished transaction, so a restarted worker never sees a zombie's writes.
            producer.init_transactions()

    def begin(self) -> None:
        self._futures.clear()
        if self.exactly_once and not self._in_txn:
            self.producer.begin_transaction()
            self._in_txn = True
            self._joined.clear()  # a new transaction: each partition joins it again

    def send(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None = None,
        headers: list[tuple[str, bytes]] | None = None,
        partition: int | None = None,
    ) -> None:
        if partition is None and key is not None:
            partition = self._partition_for(topic, key)
        size = len(value or b"") + len(key or b"")
        if (partition is None or headers or size > _LEAN_MAX_BYTES or value is None
                or not self._has_metadata(topic)):
            fut = self.producer.send(topic, value=value, key=key, headers=headers, partition=partition)
        else:
            fut = self._lean_send(topic, partition, key, value)
        self._futures.append((topic, partition, fut))
        sent = self.sent_bytes
        sent[topic] = sent.get(topic, 0) + size

    def _has_metadata(self, topic: str) -> bool:
        """Whether the producer tracks ``topic``'s metadata (its sender fetches only the
        topics it was asked for; ``send()`` asks on each call, the lean path once)."""
        if topic in self._lean_topics:
            return True
        if self.producer.partitions_for(topic):  # waits for it, as send() would
            self._lean_topics.add(topic)
            return True
        return False

    def _lean_send(self, topic: str, partition: int, key: bytes | None, value: bytes) -> Any:
        """``KafkaProducer.send`` for the records the worker makes itself, less what they
        never need: validating, serialising and sizing bytes it made, asking the partitioner,
        metadata it already has (``_partition_for``), and adding the partition to the
        transaction on every record rather than once per transaction (``_joined``). That is
        about 40% of ``send()`` (docs/benchmarks.md, issue 16). The record goes to the same
        accumulator, so batching, ordering, idempotence and the transaction are kafka-python's
        own. Records with headers, tombstones, large ones, and those whose partition is not
        known yet take the full ``send()``. The private names are pinned by
        tests/kafka/test_publisher.py."""
        tp = self._tps.get((topic, partition))
        if tp is None:
            tp = self._tps[(topic, partition)] = TopicPartition(topic, partition)
        if tp not in self._joined:
            tm = self.producer._transaction_manager
            if tm is not None and tm.is_transactional():
                tm.maybe_add_partition_to_transaction(tp)  # also fails if not ready to send
            self._joined.add(tp)
        future, full, new_batch, _ = self.producer._accumulator.append(
            tp, int(time.time() * 1000), key, value, _NO_HEADERS)
        if full or new_batch:
            self.producer._sender.wakeup()
        return future

    def _partition_for(self, topic: str, key: bytes) -> int | None:
        """The default partitioner's choice (murmur2 of the key), cached."""
        entry = self._partitions.get(topic)
        if entry is None:
            parts = self.producer.partitions_for(topic)
            if not parts:
                return None  # unknown yet: let the producer decide
            entry = self._partitions[topic] = (len(parts), {})
        count, cache = entry
        p = cache.get(key)
        if p is None:
            if len(cache) >= self.max_keys:  # bounded (a soak test: 1M keys were 100 MB a topic):
                cache.clear()  # a fleet's churn of ids cannot grow it past a table's worth
            p = cache[key] = (murmur2(key) & 0x7FFFFFFF) % count
        return p

    def commit(
        self, offsets: dict[TopicPartition, OffsetAndMetadata], consumer: KafkaConsumer
    ) -> dict[tuple[str, int], int]:
        """Make the batch durable, then commit ``offsets``. Returns the last offset written
        per (topic, partition), e.g. for state-store checkpoints of the changelog."""
        self.start_commit(offsets, consumer)
        return self.finish_commit()

    def start_commit(
        self, offsets: dict[TopicPartition, OffsetAndMetadata], consumer: KafkaConsumer
    ) -> None:
        """Begin committing the batch and return without waiting for the broker: the caller
        may poll and compute the next batch meanwhile, and must call :meth:`finish_commit`
        before it sends again (kafka-python cannot send into a transaction being committed).

        Exactly-once: the offsets join the transaction (a short, bounded wait) and its commit
        is begun. At-least-once: nothing to begin; the sender thread is already sending, and
        ``finish_commit`` flushes, checks every send, then commits the offsets."""
        if self._committing is not None:
            raise RuntimeError("a commit is already in flight: finish it first")
        result = None
        if self.exactly_once:
            tm = self.producer._transaction_manager
            if offsets:
                group = consumer.group_metadata()
                if group.generation_id < 0 or not group.member_id:
                    # Dropped from the group: a broker accepts a transactional offset commit
                    # with no generation, which would publish a zombie's batch beside the new
                    # owner's. The caller rolls back instead.
                    raise PublishError("this member is no longer in its group (generation "
                                       "lost): its transaction is not committed")
                self._bounded(lambda: tm.send_offsets_to_transaction(offsets, group),
                              "sending offsets to the transaction")
            result = tm.begin_commit()
            self.producer._sender.wakeup()
            self._in_txn = False
        self._committing = (self._futures, result, offsets, consumer,
                            time.monotonic() + self.send_timeout_s)
        self._futures = []

    def close(self, timeout: float) -> None:
        """Close the producer. One in a fatal state (an idempotent producer after a record its
        topic refused) fails its own flush in ``close()`` and keeps its sender thread: that
        thread is stopped here, or every reconnect would leave one behind."""
        try:
            self.producer.close(timeout=timeout)
        except Exception as exc:  # noqa: BLE001 - whatever the flush raised, the thread goes
            log.warning("the producer did not close cleanly; stopping its sender",
                        extra={"error": repr(exc)[:300]})
            self.producer._sender.force_close()

    def confirm_sent(self) -> None:
        """At-least-once: wait for what was sent so far and check every send (raises
        :class:`PublishError`). Before a commit's checkpoints are sent, so that a changelog
        never holds the state of readings whose forecasts failed: a restore from it would take
        them, when read again, for duplicates. (Exactly-once: the transaction does this.)"""
        if self.exactly_once or not self._futures:
            return
        self.producer.flush(timeout=self.send_timeout_s)
        self._written(self._futures)
        self._futures = []

    @property
    def committing(self) -> bool:
        """Whether a commit was started and not yet finished."""
        return self._committing is not None

    def finish_commit(self) -> dict[tuple[str, int], int]:
        """Wait for the commit begun by :meth:`start_commit` (at most ``send_timeout_s`` from
        its start). Returns the last offset written per (topic, partition); raises
        :class:`PublishError` if the batch did not become durable (its offsets not committed)."""
        if self._committing is None:
            raise RuntimeError("no commit in flight")
        futures, result, offsets, consumer, deadline = self._committing
        self._committing = None
        if result is not None:  # exactly-once: the transaction's commit
            left_ms = max(0, int((deadline - time.monotonic()) * 1000))
            if not result.wait(timeout_ms=left_ms):  # (raises the commit's own error)
                raise PublishError(f"committing the transaction did not finish within "
                                   f"{self.send_timeout_s:.0f}s")
            return self._written(futures)
        self.producer.flush(timeout=max(0.0, deadline - time.monotonic()))
        written = self._written(futures)  # raises before the offsets are committed
        if offsets:
            consumer.commit(offsets)
        return written

    def _bounded(self, start: Any, what: str) -> None:
        bounded_transaction_step(self.producer, start, what, self.send_timeout_s)

    def abort(self) -> None:
        """Give up the current batch (exactly-once: abort the transaction)."""
        self._futures.clear()
        self._committing = None
        if self.exactly_once and self._in_txn:
            try:
                self._bounded(self.producer._transaction_manager.begin_abort, "aborting the transaction")
            finally:
                self._in_txn = False

    def _written(self, futures: list) -> dict[tuple[str, int], int]:
        last: dict[tuple[str, int], int] = {}
        for topic, _, fut in futures:
            if not fut.is_done:
                raise PublishError(f"send to {topic} not acknowledged in {self.send_timeout_s}s")
            if fut.failed():
                raise PublishError(f"send to {topic} failed: {fut.exception}")
            md: Any = fut.value
            key = (topic, md.partition)
            if md.offset > last.get(key, -1):
                last[key] = md.offset
        return last
