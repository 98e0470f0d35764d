"""The worker's partition coordinator: assign, revoke, restore with replay, and readiness.

State moves with partitions. An assigned partition is paused until its devices are restored
from the changelog (``checkpointing/``) and the readings committed after their checkpoint are
replayed through the pipeline, publishing nothing; then it is resumed and the worker reports
ready. A revoked partition's open transaction is committed first under exactly-once (as Kafka
Streams does), and its devices leave memory.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from kafka.structs import TopicPartition

from stream_lstm.bring_in import BringIn
from stream_lstm.checkpointing.manager import StateManager
from stream_lstm.checkpointing.replay import log_start, replay_input
from stream_lstm.config import Settings
from stream_lstm.metrics import HealthState, Metrics
from stream_lstm.pipeline import BatchPipeline
from stream_lstm.state.table import DeviceTable
from stream_lstm.transaction import TransactionUnit

if TYPE_CHECKING:
    from stream_lstm.kafka.group_consumer import GroupConsumer

log = logging.getLogger("stream_lstm.worker")

# How long to wait for the group coordinator's committed offsets. Without a bound kafka-python
# waits until a coordinator answers: through a whole broker outage, deaf to SIGTERM and to the
# liveness beat. Raising instead, the caller's retry loop (with backoff) goes on.
COMMITTED_TIMEOUT_MS = 10_000


class PartitionsLost(RuntimeError):
    """This member was dropped from its group; its open transaction was aborted."""


class PartitionCoordinator:
    """Owns which input partitions the worker holds, and brings their state in and out.

    Parameters
    ----------
    settings, state, table, pipeline, bring_in
        The input topic; the state manager and table the devices live in; the pipeline that
        replays readings, and the step that brings their devices in first.
    tx
        The transaction unit: a revoked partition's readings are committed through it.
    health, metrics
        Readiness (``partitions``, ``broker``) and the replay counters.

    ``group`` (the worker's ``GroupConsumer``) is set once the worker has connected; its
    listener calls ``on_assigned`` and ``on_revoked`` inside ``poll``.

    Example: see tests/test_partitions.py::test_assigned_partitions_wait_for_their_state_then_resume
    """

    def __init__(self, settings: Settings, state: StateManager, table: DeviceTable,
                 pipeline: BatchPipeline, bring_in: BringIn, tx: TransactionUnit,
                 health: HealthState, metrics: Metrics) -> None:
        self.settings = settings
        self.state = state
        self.table = table
        self.pipeline = pipeline
        self.bring_in = bring_in
        self.tx = tx
        self.health = health
        self.metrics = metrics
        self.group: GroupConsumer | None = None
        self.assigned: set[int] = set()
        # A commit that failed inside on_revoked (kafka-python's IO thread, where the consumer
        # must not be used), or a transaction given up for lost partitions: the worker rolls
        # it back after the poll.
        self.failed_in_callback: Exception | None = None
        # False while a worker that failed closes: closing the consumer revokes its partitions,
        # and a commit then would publish the failed batch's state without its forecasts.
        self.commit_on_revoke = True
        # When each partition still paused began restoring (restore_seconds).
        self._restoring_since: dict[int, float] = {}

    def tps(self, partitions: set[int]) -> list[TopicPartition]:
        return [TopicPartition(self.settings.input_topic, p) for p in sorted(partitions)]

    def on_assigned(self, partitions: set[int]) -> None:
        self.assigned |= partitions
        self.state.assign(partitions)
        self._restoring_since.update(dict.fromkeys(partitions, time.monotonic()))
        assert self.group is not None
        # Paused until restored: no reading of theirs is processed against missing state.
        self.group.consumer.pause(*self.tps(partitions))
        log.info("partitions assigned; restoring their state",
                 extra={"partitions": sorted(partitions)})
        self.health.set_ready("partitions", False, f"restoring {sorted(self.state.restoring)}")

    def on_revoked(self, partitions: set[int]) -> None:
        # kafka-python calls this inside poll(), on its IO thread. The open transaction holds
        # readings of these partitions: under exactly-once it commits now, before another
        # member takes them (as Kafka Streams does); a failure is rolled back after the poll,
        # where the consumer may be used. At-least-once cannot commit offsets from this
        # thread: those readings are left to the new owner, which reads them again.
        tx = self.tx
        if self.commit_on_revoke and self._uncommitted():
            assert self.group is not None
            try:
                # Their changed devices are checkpointed too: the next owner replays less.
                tx.commit(self.group.consumer, flush=set(partitions))
            except Exception as exc:  # noqa: BLE001 - rolled back after the poll
                tx.abort()
                self.failed_in_callback = exc
        self._drop(partitions, "partitions revoked")

    def on_lost(self, partitions: set[int]) -> None:
        """Partitions lost without a clean revocation: this member was dropped from its group
        (its session or poll interval ran out), and another may already be processing them
        from the last committed offsets. The open transaction must not commit: its offsets
        would go out with no generation, which a broker accepts for a transactional commit,
        so the zombie's forecasts would be published twice. It is aborted instead, and the
        worker rolls back what it held of the other partitions too (after the poll)."""
        if self._uncommitted():
            self.tx.abort()
            self.failed_in_callback = PartitionsLost(
                f"partitions {sorted(partitions)} lost: their open transaction was aborted")
        self._drop(partitions, "partitions lost (dropped from the group); nothing committed")

    def _uncommitted(self) -> bool:
        """Exactly-once with something not yet committed: an open transaction, one being
        committed, or changed devices waiting for their checkpoint."""
        tx = self.tx
        return bool(tx.publisher is not None and tx.publisher.exactly_once and (
            tx.open is not None or tx.committing or self.state.dirty))

    def _drop(self, partitions: set[int], why: str) -> None:
        tx = self.tx
        gone = len(self.table.devices_in_partitions(partitions))
        self.state.revoke(self.table, partitions)
        self.assigned -= partitions
        for p in partitions:
            self._restoring_since.pop(p, None)
        tx.drop_offsets(self.tps(partitions))
        log.info(why, extra={"partitions": sorted(partitions), "devices": gone})
        self.update_readiness()

    def restore_some(self) -> None:
        """One time-bounded slice of restoring; partitions restored and replayed resume."""
        if not self.state.restoring:
            return
        try:
            done = self.state.restore_slice(budget_s=1.0)
        except Exception as exc:  # noqa: BLE001 - e.g. broker down: keep paused, retry
            log.warning("restore did not complete; will retry", extra={"error": repr(exc)[:300]})
            self.health.set_ready("broker", False, f"restore failed: {repr(exc)[:200]}")
            time.sleep(1.0)
            return
        done &= self.assigned
        try:
            for p in sorted(done):
                self._replay(p)
        except Exception as exc:  # noqa: BLE001 - replay again next turn (it is idempotent)
            log.warning("replay did not complete; will retry", extra={"error": repr(exc)[:300]})
            self.state.rollback(self.table, done)
            time.sleep(1.0)
            return
        self.health.set_ready("broker", True)
        if done and self.group is not None:
            self.group.consumer.resume(*self.tps(done))
        now = time.monotonic()
        for p in done:  # from assignment (or a rollback) to resuming, replay included
            self.metrics.restore_seconds.observe(now - self._restoring_since.pop(p, now))
        self.update_readiness()

    def _replay(self, partition: int) -> None:
        """Apply again the readings committed after ``partition``'s last checkpoint, publishing
        nothing: memory then holds what an uninterrupted worker would (checkpointing/replay.py)."""
        assert self.group is not None
        tp = TopicPartition(self.settings.input_topic, partition)
        start = self.state.replay_from(partition)
        committed = self.group.consumer.committed(tp, timeout_ms=COMMITTED_TIMEOUT_MS)
        if committed is not None:
            self.tx.next_offsets[tp] = committed
        if start is None:
            self.state.first_marker(
                partition, committed if committed is not None else log_start(self.settings, partition))
            return
        if committed is None or committed <= start:
            return

        def apply(records: list) -> None:
            out = self.bring_in.handle(self.pipeline, records, time.time())
            self.state.touch(self.table, out.touched)

        done = replay_input(self.settings, partition, start, committed, apply)
        self.metrics.replayed_readings.inc(done.readings)
        self.metrics.replay_missing_readings.inc(done.missing)
        log.info("replayed readings since the last checkpoint",
                 extra={"partition": partition, "from": start, "to": committed,
                        "readings": done.readings, "seconds": round(done.seconds, 3)})

    def rewind(self) -> None:
        """After a rollback: every held partition's state comes again from the changelog, and
        the consumer goes back to the committed offsets (raises while the broker is away)."""
        assert self.group is not None
        consumer = self.group.consumer
        tps = self.tps(self.assigned)
        for tp in tps:
            committed = consumer.committed(tp, timeout_ms=COMMITTED_TIMEOUT_MS)
            if committed is None:
                consumer.seek_to_beginning(tp)
            else:
                consumer.seek(tp, committed)

    def forget_state(self) -> None:
        """Drop the held partitions' state from memory (restored again) and pause them."""
        self.state.rollback(self.table, set(self.assigned))
        self._restoring_since.update(dict.fromkeys(self.assigned, time.monotonic()))
        if self.group is not None:
            self.group.consumer.pause(*self.tps(self.assigned))

    def update_readiness(self) -> None:
        if self.state.restoring:
            self.health.set_ready("partitions", False, f"restoring {sorted(self.state.restoring)}")
        else:
            self.health.set_ready("partitions", bool(self.assigned),
                                  f"assigned {sorted(self.assigned)}")
        self.metrics.ready.set(1 if self.health.readiness()[0] else 0)
