"""The worker's partition coordinator: assign, revoke, restore with replay, and readiness.

State moves with partitions. An assigned partition is paused until its devices are restored
from the changelog (``checkpointing/``) and the readings committed after their checkpoint are
replayed through the pipeline, publishing nothing; then it is resumed and the worker reports
ready. A revoked partition's open transaction is committed first under exactly-once (as Kafka
Streams does), and its devices leave memory.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from typing import TYPE_CHECKING

from kafka.errors import UnknownTopicOrPartitionError
from kafka.structs import OffsetAndMetadata, TopicPartition

from stream_lstm.bring_in import BringIn
from stream_lstm.checkpointing.manager import StateManager
from stream_lstm.checkpointing.replay import log_start, replay_input
from stream_lstm.config import CHECKPOINT_S_PER_DEVICE, Settings
from stream_lstm.kafka.topics import ensure_changelog_topic, partition_count
from stream_lstm.metrics import LIVENESS_TIMEOUT_S, HealthState, Metrics
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
# How long one loop turn replays input at most: a long replay (a large fleet's checkpoint
# interval) goes on over several turns, and the loop keeps beating (/healthz), polling (the
# group's max.poll.interval.ms) and hearing SIGTERM in between.
REPLAY_SLICE_S = 2.0
# How often a state store that cannot write tries again with no write of its own to make.
STORE_RETRY_S = 5.0
# Holding none, settled this long: a spare. (The first round of a cooperative rebalance leaves
# a joining member settled with none until a heartbeat, up to 3 s later, tells it of the second
# round that gives it partitions: it must not flicker ready in between.)
SPARE_AFTER_S = 10.0


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
        # Holding none, but a settled member of the group: more workers than partitions. Such
        # a worker is ready (a spare); one still joining is not.
        self.idle_member = False
        self._settled_none_since: float | None = None
        # A commit that failed inside on_revoked (kafka-python's IO thread, where the consumer
        # must not be used), or a transaction given up for lost partitions: the worker rolls
        # it back after the poll.
        self.failed_in_callback: Exception | None = None
        # False while a worker that failed closes: closing the consumer revokes its partitions,
        # and a commit then would publish the failed batch's state without its forecasts.
        self.commit_on_revoke = True
        self._store_error: tuple | None = (None, False)  # the write error last said, held_back
        # Input paused: the disk refuses writes and the rows it refused, held in memory, have
        # reached max_devices (a table's worth again); resumed once the store writes.
        self.held_back = False
        self._store_retry_at = 0.0
        # When each partition still paused began restoring (restore_seconds).
        self._restoring_since: dict[int, float] = {}
        # Per partition restored and replaying its input (state.replaying): [next, end) left.
        self._replay_left: dict[int, tuple[int, int]] = {}

    def tps(self, partitions: set[int]) -> list[TopicPartition]:
        return [TopicPartition(self.settings.input_topic, p) for p in sorted(partitions)]

    def on_assigned(self, partitions: set[int]) -> None:
        self.assigned |= partitions
        self.idle_member, self._settled_none_since = False, None  # (if all go, it settles again)
        self.state.assign(partitions)
        self._restoring_since.update(dict.fromkeys(partitions, time.monotonic()))
        assert self.group is not None
        # Paused until restored: no reading of theirs is processed against missing state.
        self.group.consumer.pause(*self.tps(partitions))
        log.info("partitions assigned; restoring their state", extra={"partitions": sorted(partitions)})
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
                tx.settle()  # (a commit in flight first: its devices are counted below)
                # Their changed devices are checkpointed too, so that the next owner replays
                # less: only if that fits in a third of the session timeout (and half the
                # liveness limit). This runs on kafka-python's IO loop, which also heartbeats:
                # a large fleet's checkpoints outlasted the session, and the member was dropped
                # while it committed. Past that, the next owner replays them from their last
                # checkpoints, as after a crash. (What is due anyway is written either way:
                # partitions whose interval has passed, re-warmed devices; state.waiting.)
                state, budget_s = self.state, min(self.settings.session_timeout_ms / 3000, LIVENESS_TIMEOUT_S / 2)
                due = state.flush_due() | partitions
                changed = sum(p in due for p in state.dirty.values()) + state.waiting()
                fits = changed * CHECKPOINT_S_PER_DEVICE <= budget_s
                tx.commit(self.group.consumer, flush=set(partitions) if fits else None)
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
            self._replay_left.pop(p, None)
            self._restoring_since.pop(p, None)
        self.metrics.forget_partitions(partitions)
        tx.drop_offsets(self.tps(partitions))
        log.info(why, extra={"partitions": sorted(partitions), "devices": gone})
        self.update_readiness()

    def busy(self) -> bool:
        """Whether some partition is still restoring or replaying (paused)."""
        return bool(self.state.restoring or self.state.replaying)

    def restore_some(self) -> None:
        """One time-bounded slice of restoring, then of replaying; partitions restored and
        replayed resume."""
        if not self.busy():
            return
        try:
            restored = self.state.restore_slice(budget_s=1.0) if self.state.restoring else set()
        except Exception as exc:  # noqa: BLE001 - e.g. broker down: keep paused, retry
            log.warning("restore did not complete; will retry", extra={"error": repr(exc)[:300]})
            if isinstance(exc, UnknownTopicOrPartitionError) and self._grow_changelog():
                return  # (input partitions added while running: restored next turn)
            # (the broker, or the local store: a full disk is not an outage to wait out)
            what = "state_store" if isinstance(exc, sqlite3.Error) else "broker"
            self.health.set_ready(what, False, f"restore failed: {repr(exc)[:200]}")
            time.sleep(1.0)
            return
        self.state.replaying |= restored & self.assigned
        try:
            done = self._replay_some(REPLAY_SLICE_S)
        except Exception as exc:  # noqa: BLE001 - replay again next turn (it is idempotent)
            log.warning("replay did not complete; will retry", extra={"error": repr(exc)[:300]})
            failed = set(self.state.replaying)
            self._replay_left.clear()
            self.state.rollback(self.table, failed)
            self.tx.drop_offsets(self.tps(failed))  # (set again when their replay completes)
            time.sleep(1.0)
            return
        self.health.set_ready("broker", True)
        if "state_store" in self.health.readiness()[1]:
            if self.state.store.write_error is None:
                self.health.set_ready("state_store", True)
            self._store_error = None  # (a full disk: report_store says so again next turn)
        if done and self.group is not None and not self.held_back:
            self.group.consumer.resume(*self.tps(done))
        now = time.monotonic()
        took = {p: now - self._restoring_since.pop(p, now) for p in done}
        for p in done:  # from assignment (or a rollback) to resuming, replay included
            self.metrics.restore_seconds.observe(took[p])
        if done:  # (the restore's own lines are per slice)
            log.info("partitions resumed: restored and replayed", extra={
                "partitions": sorted(done), "seconds": round(max(took.values()), 3)})
        self.update_readiness()

    def _grow_changelog(self) -> bool:
        """A partition the changelog lacks was assigned: the input topic has grown (someone
        added partitions). Grow the changelog to match (``ensure_changelog_topic``)."""
        s = self.settings
        try:  # (a changelog deleted meanwhile is not recreated here: its absence is said)
            wanted = partition_count(s, s.input_topic)
            if partition_count(s, s.changelog_topic_name()) >= wanted:
                return False
            ensure_changelog_topic(s, wanted)
        except Exception as exc:  # noqa: BLE001 - said; the restore tries again
            log.error("the changelog could not grow with the input topic", extra={"error": repr(exc)[:300]})
            return False
        return True

    def _replay_some(self, budget_s: float) -> set[int]:
        """Replay the restored partitions' input for about ``budget_s``; return those done."""
        def apply(records: list) -> None:
            out = self.bring_in.handle(self.pipeline, records, time.time())
            self.state.touch(self.table, out.touched, out.moved)

        done: set[int] = set()
        began, replayed = time.monotonic(), False
        for p in sorted(self.state.replaying):
            if replayed and time.monotonic() - began >= budget_s:
                break  # (a turn replays one poll at least)
            if p not in self._replay_left and not self._replay_range(p):
                done.add(p)
                continue
            start, end = self._replay_left[p]
            r = replay_input(self.settings, p, start, end, apply,
                             budget_s=max(0.0, budget_s - (time.monotonic() - began)))
            replayed = True
            self.metrics.replayed_readings.inc(r.readings)
            self.metrics.replay_missing_readings.inc(r.missing)
            if r.position < end:
                self._replay_left[p] = (r.position, end)
                continue
            del self._replay_left[p]
            done.add(p)
            # Only now may a commit name the committed offset as this partition's position
            # (and its replay marker): every reading before it is in memory again.
            self.tx.next_offsets[TopicPartition(self.settings.input_topic, p)] = end
            log.info("replayed readings since the last checkpoint",
                     extra={"partition": p, "from": self.state.replay_from(p), "to": end})
        self.state.replaying -= done
        return done

    def _replay_range(self, partition: int) -> bool:
        """Read where ``partition``'s replay starts and ends (its last checkpoint's marker, the
        group's committed offset); False when there is nothing to replay."""
        assert self.group is not None
        tp = TopicPartition(self.settings.input_topic, partition)
        start = self.state.replay_from(partition)
        committed = self.group.consumer.committed(tp, timeout_ms=COMMITTED_TIMEOUT_MS)
        if start is not None and committed is not None and start > committed:
            self.state.marker_floor[partition] = start  # (re-reads below it: duplicates, pipeline.py)
            log.warning("the changelog's replay marker is past the group's committed offset: the group's "
                        "offsets were moved back, or the changelog is another group's; nothing is replayed, "
                        "and readings below the marker count as duplicates, not forecasts (to reprocess: "
                        "README, 'Reprocessing the input')", extra={"partition": partition, "marker": start,
                                                                     "committed": committed})
        if start is None or committed is None or committed <= start:
            if committed is not None:
                self.tx.next_offsets[tp] = committed
            if start is None:
                self.state.first_marker(
                    partition, committed if committed is not None else log_start(self.settings, partition))
            return False
        self._replay_left[partition] = (start, committed)
        return True

    def rewind(self) -> dict[TopicPartition, OffsetAndMetadata | None]:
        """After a rollback: every held partition's state comes again from the changelog, and
        the consumer goes back to the committed offsets, which it returns with their metadata
        (None: none yet). Raises while the broker is away."""
        assert self.group is not None
        consumer = self.group.consumer
        out = {tp: consumer.committed(tp, metadata=True, timeout_ms=COMMITTED_TIMEOUT_MS)
               for tp in self.tps(self.assigned)}
        for tp, committed in out.items():
            if committed is None:
                consumer.seek_to_beginning(tp)
            else:
                consumer.seek(tp, committed.offset)
        return out

    def forget_state(self, cause: BaseException | None = None) -> None:
        """Drop the held partitions' state from memory (restored again) and pause them; if
        ``cause`` says the group no longer knows this member, give them up at the next poll
        instead (``GroupConsumer.commit_refused``)."""
        self.state.rollback(self.table, set(self.assigned))
        # Their positions are set again when their replay completes: until then a commit must
        # not name them as replay markers (the readings before them are not in memory).
        self.tx.drop_offsets(self.tps(self.assigned))
        self._replay_left.clear()
        self._restoring_since.update(dict.fromkeys(self.assigned, time.monotonic()))
        if self.group is not None:
            self.group.consumer.pause(*self.tps(self.assigned))
            if cause is not None:
                self.group.commit_refused(cause)

    def check_group(self) -> None:
        """Readiness from the group itself: a heartbeat gone silent (an idle worker publishes
        nothing, so no failed publish reports an outage), and, holding none, whether the group
        has settled with none for this worker (a spare: more workers than partitions)."""
        if self.group is None:
            return
        changed = self.group.heartbeat.report(self.health)
        if not self.assigned:
            now = time.monotonic()
            if not self.group.stable_member():
                self._settled_none_since = None
            elif self._settled_none_since is None:
                self._settled_none_since = now
            spare = (self._settled_none_since is not None
                     and now - self._settled_none_since >= SPARE_AFTER_S)
            if spare != self.idle_member:
                self.idle_member, changed = spare, True
                if spare:
                    log.info("no partition assigned in a settled group: idle, a spare (more "
                             "workers than input partitions)", extra={"group_id": self.settings.group_id})
        if changed:
            self.update_readiness()

    def update_readiness(self) -> None:
        if self.busy():
            paused = sorted(self.state.restoring | self.state.replaying)
            self.health.set_ready("partitions", False, f"restoring {paused}")
        else:
            # A spare is ready: a pod that would never be ready pages (StreamLstmNotReady),
            # holds up a rolling update and counts against the disruption budget.
            self.health.set_ready("partitions", bool(self.assigned) or self.idle_member,
                                  "waiting for assignment")
        self.metrics.ready.set(1 if self.health.readiness()[0] else 0)

    def report_store(self) -> None:
        """Say on /readyz while the state store cannot write (a full disk). The worker goes on
        (the rows wait in memory, the changelog has them), but someone must make room."""
        store = self.state.store
        if store.write_error is not None and time.monotonic() >= self._store_retry_at:
            self._store_retry_at = time.monotonic() + STORE_RETRY_S  # (room made: ready again
            store.write_unwritten()  # without waiting for the next eviction)
        error = store.write_error
        # Bounded: each device evicted while the disk refuses adds a row held in memory (a
        # fleet larger than the table would fill it without end), so at a table's worth again
        # the input pauses, and nothing is lost: the readings wait in Kafka.
        held_back = error is not None and len(store.unwritten) >= self.settings.max_devices
        if held_back != self.held_back:
            self._hold_back(held_back)
        if (error, held_back) == self._store_error:
            return
        self._store_error = (error, held_back)
        if error is not None:
            paused = "; input paused until it can" if held_back else ""
            self.health.set_ready("state_store", False, f"cannot write ({error}); "
                                  f"{len(store.unwritten)} rows held in memory{paused}")
        elif not self.busy():  # (a restore that fails says so itself)
            self.health.set_ready("state_store", True)
        self.update_readiness()

    def _hold_back(self, on: bool) -> None:
        self.held_back = on
        serving = self.assigned - self.state.restoring - self.state.replaying
        if self.group is not None and serving:
            (self.group.consumer.pause if on else self.group.consumer.resume)(*self.tps(serving))
        if on:
            log.error("the state store still cannot write and holds a table's worth of rows in "
                      "memory: reading paused until it can", extra={"rows": len(self.state.store.unwritten)})
        else:
            log.info("the state store writes again: reading resumed")
