"""The worker's transaction unit: what one Kafka transaction carries, and its send, commit, abort.

One transaction (exactly-once) or one flush-and-commit (at-least-once) spans the batches of
``STREAM_LSTM_COMMIT_INTERVAL_MS``: their forecasts and dead letters, the checkpoints due (with
their replay markers), and the input offsets after them. Readers with ``read_committed`` see
all of it or none. A failure raises: the worker rolls back (``worker.py``), since undoing a
batch needs the partitions and the consumer, which this unit does not own.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from kafka import KafkaConsumer
from kafka.structs import OffsetAndMetadata, TopicPartition

from stream_lstm.checkpointing.manager import StateManager
from stream_lstm.config import Settings
from stream_lstm.kafka.publisher import BatchPublisher
from stream_lstm.metrics import Metrics
from stream_lstm.pipeline import BatchCounts, BatchOutput
from stream_lstm.state.table import DeviceTable

log = logging.getLogger("stream_lstm.worker")
# Fenced again this soon after taking the transactional id back: another live worker holds it
# (one configured alike, or this one's replacement after a pause), not a stall of this one's.
FENCED_AGAIN_S = 600.0


def transaction_timeout_ms(settings: Settings) -> int:
    """How long the broker lets a transaction stay open before it aborts it: one is open for up
    to a commit interval, and must outlast it (a minute to spare)."""
    return 60_000 + 2 * settings.commit_interval_ms


@dataclass
class OpenTransaction:
    """What the open transaction holds: since when, the offsets to commit, and its counts.

    Parameters
    ----------
    began
        When it was begun (``time.monotonic()``).
    offsets, consumed
        Per input partition: the offset to commit (after its last record), and the records
        its batches read.
    counts, oldest_ts
        Where its readings went, and the oldest event time it forecast (``inf``: none).
    tag, tagged
        Set as its commit begins: the metadata its offsets are committed with, unique to that
        commit, and their partitions (what ``TransactionUnit.resolve_in_doubt`` looks for).

    Examples
    --------
    >>> from types import SimpleNamespace
    >>> tp, tx = TopicPartition("sensor-readings", 0), OpenTransaction(began=0.0)
    >>> polled = {tp: [SimpleNamespace(offset=41), SimpleNamespace(offset=42)]}
    >>> tx.add(polled, BatchCounts(consumed=2, forecasts=2), oldest_ts=100.0)
    >>> tx.offsets[tp].offset, tx.consumed[tp], tx.counts.forecasts, tx.oldest_ts
    (43, 2, 2, 100.0)
    """

    began: float
    offsets: dict[TopicPartition, OffsetAndMetadata] = field(default_factory=dict)
    consumed: dict[TopicPartition, int] = field(default_factory=dict)
    counts: BatchCounts = field(default_factory=BatchCounts)
    oldest_ts: float = float("inf")
    tag: str = ""
    tagged: tuple[TopicPartition, ...] = ()

    def add(self, polled: dict[TopicPartition, list], counts: BatchCounts, oldest_ts: float) -> None:
        for tp, records in polled.items():
            self.offsets[tp] = OffsetAndMetadata(records[-1].offset + 1, "", -1)
            self.consumed[tp] = self.consumed.get(tp, 0) + len(records)
        self.counts.add(counts)
        self.oldest_ts = min(self.oldest_ts, oldest_ts)


class TransactionUnit:
    """Sends batches into the open transaction and commits it with its checkpoints.

    Parameters
    ----------
    settings
        The commit interval and the table size (a commit is due early when half the table
        is dirty).
    state, table
        Where the checkpoints come from (``StateManager.records_for_commit``).
    metrics
        Transactions, commit time, consumed readings and the batch counts, counted at commit.
    new_publisher
        Makes a ``BatchPublisher`` (transactional under exactly-once); called again after a
        failure, since a fresh transactional producer fences whatever the old one left open.

    Example: see tests/test_transaction.py::test_committed_batches_are_read_and_aborted_ones_never
    """

    def __init__(self, settings: Settings, state: StateManager, table: DeviceTable,
                 metrics: Metrics, new_publisher: Callable[[], BatchPublisher]) -> None:
        self.settings = settings
        self.state = state
        self.table = table
        self.metrics = metrics
        self._new_publisher = new_publisher
        self.publisher: BatchPublisher | None = None
        self.open: OpenTransaction | None = None
        self.next_offsets: dict[TopicPartition, int] = {}  # per partition, after the last commit
        self.totals = BatchCounts()  # what committed transactions carried
        # Transactions this process committed and aborted (its supervisor exports them per
        # process: summed over the host, one child that only rolls back was hidden; a review).
        self.outcomes = {"committed": 0, "aborted": 0}
        # A commit begun and not yet settled: (its transaction, when its commit began).
        self._committing: tuple[OpenTransaction, float] | None = None
        self._tag_prefix, self._commits = uuid.uuid4().hex[:12], 0  # (OpenTransaction.tag)
        # A commit that failed here: its outcome is unknown until resolve_in_doubt (a broker
        # that went away after taking it completes it when it comes back).
        self.in_doubt: OpenTransaction | None = None
        self._turns_ms = (0.0, 0.0)  # the worker's last two loop turns (turn_ended)
        self._fenced_at: float | None = None  # when a rival last fenced it (fenced_again)

    def connect(self) -> None:
        self.publisher = self._new_publisher()

    def send(self, polled: dict[TopicPartition, list], out: BatchOutput) -> None:
        """Add one processed batch to the open transaction (begun here if none is open)."""
        assert self.publisher is not None
        self.settle()
        if self.open is None:
            self.publisher.begin()
            self.open = OpenTransaction(time.monotonic())
        send = self.publisher.send
        for topic, key, value, headers in out.records:
            send(topic, value, key=key, headers=headers)
        self.state.touch(self.table, out.touched, out.moved)
        self.open.add(polled, out.counts, out.oldest_ts)

    def turn_ended(self, ms: float) -> None:
        """The worker's loop turn took ``ms``: what :meth:`due` guesses the next one from."""
        self._turns_ms = (self._turns_ms[1], ms)

    def due(self) -> bool:
        """Whether to commit now: the open transaction is old enough, or would be by the end
        of the next loop turn (guessed as the longer of the last two, :meth:`turn_ended`), or
        its changed devices fill half the table (evicting more of them would only hold them in
        memory), or, with none open, a partition's checkpoint is due or re-warmed devices wait
        for theirs (so an idle input still checkpoints).

        The next turn counts because a forecast is readable only once its transaction commits,
        and a transaction held for one more turn makes its readings wait for another fetch.
        The longer of two because on a live input a turn that processes a fetch (short) and
        one that waits for the next (up to the fetch's wait) alternate: guessed from the last
        turn alone, the transaction was held through the wait. Measured live (exactly-once,
        docs/benchmarks.md): p50 ~132 -> ~80-97 ms at 500 and 2,000 readings/s, CPU the same."""
        if self.open is None:
            return bool(self.state.flush_due() or self.state.waiting())
        age_ms = (time.monotonic() - self.open.began) * 1000
        return (age_ms + max(self._turns_ms) >= self.settings.commit_interval_ms
                or len(self.state.dirty) >= self.settings.max_devices // 2)

    def wait_ms(self) -> int:
        """How long a poll may wait: no longer than the open transaction has left, so a quiet
        input never holds a commit back."""
        wait = self.settings.poll_timeout_ms
        if self.open is not None:
            left = self.settings.commit_interval_ms - (time.monotonic() - self.open.began) * 1000
            wait = min(wait, max(0, int(left)))
        return wait

    def commit(self, consumer: KafkaConsumer, flush: set[int] | None = None,
               extra: list | None = None, wait: bool = True) -> None:
        """Commit the open transaction: the records sent so far, the input offsets, the
        checkpoints due (the changed devices of those partitions, and of ``flush``'s, with their
        replay markers), and ``extra`` changelog records (expired devices). Raises on failure,
        with the transaction left for ``abort``.

        ``wait=False`` returns once the commit is begun: the worker polls and computes the
        next batch while the broker completes it, and :meth:`settle` (called by every other
        method here that needs the producer) waits for it and does its bookkeeping."""
        assert self.publisher is not None
        self.settle()
        if self.open is None:
            if not extra and (not self.state.dirty
                              or not (self.state.flush_due() or flush or self.state.waiting())):
                return  # (a first marker waits for the first transaction with readings)
            self.publisher.begin()  # a transaction of checkpoints alone
            self.open = OpenTransaction(time.monotonic())
        unit = self.open
        # The replay marker of a partition: the input offset after this transaction.
        after = {tp.partition: off for tp, off in self.next_offsets.items()}
        after.update((tp.partition, om.offset) for tp, om in unit.offsets.items())
        records = [*self.state.records_for_commit(self.table, after, flush), *(extra or [])]
        if records:
            self.publisher.confirm_sent()  # at-least-once: the forecasts land first
        send = self.publisher.send
        for topic, key, value, headers, partition in records:
            send(topic, value, key=key, headers=headers, partition=partition)
        offsets = unit.offsets
        if records and not offsets and self.exactly_once:
            # Checkpoints alone still name their partitions' positions (the same offsets again):
            # the offset commit carries the group's generation, so that of a member dropped
            # while it was stopped, which does not know it yet, is refused. Unfenced, such a
            # zombie woke and overwrote the new owner's checkpoints and marker with its older
            # ones, and a later restore lost the readings in between.
            offsets = {tp: OffsetAndMetadata(off, "", -1) for tp, off in self.next_offsets.items()}
        # Each commit names itself in its offsets' metadata: after a failure, the group's
        # committed offsets say whether this commit completed, not merely the same offsets
        # committed by another member meanwhile (a review).
        self._commits += 1
        unit.tag, unit.tagged = f"{self._tag_prefix}-{self._commits}", tuple(offsets)
        offsets = {tp: OffsetAndMetadata(om.offset, unit.tag, -1) for tp, om in offsets.items()}
        self._committing = (unit, time.perf_counter())
        self.open = None
        self.state.commit_started()
        self.publisher.start_commit(offsets, consumer)
        if wait:
            self.settle()

    @property
    def exactly_once(self) -> bool:
        return self.settings.processing_guarantee == "exactly_once"

    @property
    def committing(self) -> bool:
        """Whether a commit is in flight (begun with ``wait=False``, not yet settled)."""
        return self._committing is not None

    def in_flight(self) -> BatchCounts:
        """What the commit in flight carries (nothing when none is)."""
        return self._committing[0].counts if self._committing is not None else BatchCounts()

    def settle(self) -> None:
        """Wait for the commit in flight, if any, and account for it: the checkpoints it
        wrote are durable, its offsets are the partitions' next, its counts reach the metrics.
        Raises if it failed (the caller rolls back)."""
        if self._committing is None:
            return
        assert self.publisher is not None
        unit, tc = self._committing
        self._committing = None
        try:
            written = self.publisher.finish_commit()
        except Exception:
            self.in_doubt = unit
            raise
        self.metrics.commit_seconds.observe(time.perf_counter() - tc)
        self.state.committed(written)
        self.next_offsets.update((tp, om.offset) for tp, om in unit.offsets.items())
        self._count(unit)

    def resolve_in_doubt(self, committed: Mapping[TopicPartition, OffsetAndMetadata | None]) -> None:
        """After a rollback, with a fresh producer (whose init waits for the broker to finish
        any commit it had taken): whether the commit that failed here completed after all. It
        did if the group's ``committed`` offsets (of the partitions still held) carry its tag;
        its forecasts are then published and its readings are not read again (the replay that
        rebuilds their state counts nothing), so they are counted now. With none of its
        partitions held any more, whether it completed is unknown: counted neither way."""
        unit, self.in_doubt = self.in_doubt, None
        held = [committed[tp] for tp in (unit.tagged if unit is not None else ()) if tp in committed]
        if unit is None or not held:
            return
        if any(om is not None and om.metadata == unit.tag for om in held):  # (one transaction: all or none)
            log.info("the commit that failed had completed on the broker; its readings are "
                     "counted", extra={"readings": unit.counts.consumed})
            self._count(unit)
        else:
            self._outcome("aborted")

    def _outcome(self, outcome: str) -> None:
        self.metrics.transactions.labels(outcome).inc()
        self.outcomes[outcome] += 1

    def _count(self, unit: OpenTransaction) -> None:
        """A committed transaction's counts, into the metrics and the totals."""
        m = self.metrics
        self._outcome("committed")
        for tp, k in unit.consumed.items():
            m.readings_consumed.labels(tp.topic, str(tp.partition)).inc(k)
        if unit.counts.forecasts:
            m.end_to_end_latency_seconds.observe(max(0.0, time.time() - unit.oldest_ts))
        m.count_batch(unit.counts, active_devices=len(self.table))
        self.totals.add(unit.counts)

    def drop_offsets(self, tps: list[TopicPartition]) -> None:
        """Forget revoked partitions' offsets: their readings are left to the next owner."""
        for tp in tps:
            if self.open is not None:
                self.open.offsets.pop(tp, None)
            self.next_offsets.pop(tp, None)

    def abort(self) -> Exception | None:
        """Give up the open transaction; returns (and logs) the abort's own failure, if any:
        the broker may be gone, and the next producer's ``init_transactions`` fences it anyway."""
        if self.open is not None:
            self._outcome("aborted")
        if self._committing is not None:  # (begun, perhaps taken by the broker: counted as
            self.in_doubt = self._committing[0]  # what resolve_in_doubt finds)
        self.open = self._committing = None
        if self.publisher is None:
            return None
        try:
            self.publisher.abort()
        except Exception as exc:  # noqa: BLE001 - nothing to undo: said, and the caller goes on
            log.warning("abort failed", extra={"error": repr(exc)[:300]})
            return exc
        return None

    def fenced_again(self) -> bool:
        """Note a fencing (another producer took the transactional id); True if it is the
        second within :data:`FENCED_AGAIN_S`. Taking the id back each time, two workers that
        share it fenced each other every 2 s for as long as both ran, each ready, lag growing
        (a review): the second time, the worker gives the id up. Not counted: a fencing of a
        transaction open past the broker's timeout (kafka-python reports the broker's abort of
        this worker's own stalled transaction, a VM pause, as a fencing too: a review)."""
        # (a commit that failed as it settled is in doubt by now, no longer committing)
        began = [t.began for t in (self.open, self._committing and self._committing[0], self.in_doubt) if t]
        now = time.monotonic()
        if began and (now - min(began)) * 1000 >= transaction_timeout_ms(self.settings):
            return False  # its own stall: no rival shown
        before, self._fenced_at = self._fenced_at, now
        return before is not None and now - before < FENCED_AGAIN_S

    def reconnect(self) -> None:
        """A fresh producer after a failure. Exactly-once: ``init_transactions`` fences the old
        one and aborts anything it left open, whatever state it is in. At-least-once too: an
        idempotent producer that met a fatal error (a record the topic refuses) refuses every
        later send, so the worker would retry against it for ever."""
        if self.publisher is not None:
            self.publisher.close(timeout=1)
            self.publisher = self._new_publisher()

    def close(self) -> None:
        if self.publisher is not None:
            self.publisher.close(timeout=10)
            self.publisher = None
