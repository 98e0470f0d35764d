"""StateManager: where device state lives beyond memory, and how it comes back.

Three tiers, from fastest to most durable:

1. the in-memory :class:`~stream_lstm.state.table.DeviceTable` (a bounded cache);
2. a local SQLite :class:`~stream_lstm.checkpointing.store.StateStore`: evicted devices;
3. the compacted changelog topic, written in the same Kafka transaction as the forecasts and
   the input offsets, so it is never ahead of or behind what was published.

Rules that keep the store honest under exactly-once:

* the store only receives state already committed to the changelog (restored with
  ``read_committed``, or evicted): a *dirty* device (changed since the last commit) that is
  evicted waits beside the table until the commit that writes it to the changelog;
* a transaction may span polls (``STREAM_LSTM_COMMIT_INTERVAL_MS``): a device is written once;
* a store not closed cleanly is wiped and rebuilt on the next start (as Kafka Streams does);
* restoring partitions are paused; restore goes in bounded slices between polls (heartbeats
  and rebalances go on).
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from stream_lstm.checkpointing.changelog import changelog_records, tombstone
from stream_lstm.checkpointing.codec import decode_for_table, encode_snapshot
from stream_lstm.checkpointing.expiry import Expiry, IdleFor
from stream_lstm.checkpointing.replay import REPLAY_MARKER, encode_marker
from stream_lstm.checkpointing.restoring import restore_slice
from stream_lstm.checkpointing.schedule import next_checkpoint
from stream_lstm.checkpointing.store import StateStore
from stream_lstm.config import Settings
from stream_lstm.logs import Sparing
from stream_lstm.state.snapshot import DeviceSnapshot
from stream_lstm.state.table import DeviceTable

log = logging.getLogger("stream_lstm.checkpointing")

# (topic, key, value, headers, partition); no partition: the topic's partitioner decides
ChangelogRecord = tuple[str, bytes | None, bytes | None, None, int | None]


class StateManager:
    """Connects the device table to the local store and the changelog topic.

    Parameters
    ----------
    settings
        Changelog topic, state directory, TTL, processing guarantee.
    store_path
        SQLite file of this worker instance.
    metrics
        Optional :class:`~stream_lstm.metrics.Metrics`: restore progress, evicted devices.

    Examples
    --------
    One commit's checkpoint, with no broker (the records go into the worker's transaction):

    >>> import tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> state = StateManager(Settings(), Path(tmp.name) / "state.sqlite")
    >>> table = DeviceTable(max_devices=4, window=4, n_features=1, num_layers=1, hidden_size=2)
    >>> state.touch(table, table.slots_for(["a"], [0], now=0.0))  # a batch changed device a
    >>> records = state.records_for_commit(table, next_offsets={0: 42}, flush={0})
    >>> [(key, partition) for topic, key, value, headers, partition in records]
    [(b'a', 0), (b'\\x00replay-from', 0)]
    >>> state.committed({}); state.dirty, state.markers
    ({}, {0: 42})
    >>> state.store.close(clean=True); tmp.cleanup()
    """

    def __init__(self, settings: Settings, store_path: Path, metrics: object | None = None):
        self.settings = settings
        self._warn_sparingly = Sparing(lambda msg, extra: log.warning(msg, extra=extra))
        self.topic = settings.changelog_topic_name()
        self.store = StateStore(store_path)  # (makes its directory, or says why it cannot)
        if not self.store.opened_clean:
            # After a crash it may hold state of an uncommitted batch; the changelog is truth.
            log.warning("state store was not closed cleanly: wiping it, will restore from %s", self.topic)
            self.store.wipe()
        self.metrics = metrics
        self.expiry = Expiry(self)
        self.restoring: set[int] = set()
        self._unchecked: set[int] = set()  # assigned, their store rows' age not yet checked
        self.ready: set[int] = set()
        self.replaying: set[int] = set()  # ready ones whose input replay is not done (partitions.py)
        # Next changelog offset per partition after our own committed writes.
        self.written: dict[int, int] = {}
        # Devices changed since the last commit (id -> partition); those evicted meanwhile.
        self.dirty: dict[str, int] = {}
        self._evicted_dirty: dict[str, DeviceSnapshot] = {}
        # Dirty devices the next commit writes whatever the schedule: re-warmed (see mark).
        self.marked: set[str] = set()
        # Devices in no changelog yet (new, or rebuilt by a replay): after a swap the next commit writes them.
        self.unwritten: set[str] = set()
        self._unwritten_due = False
        # (device, old partition) of devices whose readings moved partitions (some were added
        # to the input): the next commit writes each device and a tombstone for its old row,
        # so a restore cannot bring that older state back once the new one is gone (the TTL).
        self.moved: set[tuple[str, int]] = set()
        self._writing_moved: list[tuple[str, int]] = []
        self._writing_unwritten = False
        # When each partition with dirty devices next checkpoints them with its replay marker
        self.next_flush: dict[int, float] = {}  # (0: at the next commit: the TTL's, expiry.py)
        # What the commit being made writes: (partitions checkpointed, devices written).
        self._writing: tuple[set[int], list[str], dict[int, int], list] = (set(), [], {}, [])
        # The replay marker last committed per partition (for the clean-stop checkpoint); the
        # first of a partition whose changelog has none, for the next commit; and a floor: a
        # marker past the group's committed offset (moved back), below which the state has every
        # reading. Written lower, the next owner counted the rest of a re-read late (a review).
        self.markers: dict[int, int] = {}
        self._first_markers: dict[int, int] = {}
        self.marker_floor: dict[int, int] = {}
        # While a commit is in flight (records_for_commit to committed), what the next batch
        # changes, marks or evicts waits here and is applied after the commit's own: the
        # commit must not count as written what changed after its snapshots were taken.
        self._in_flight = False
        self._later_touched: list[tuple[str, int]] = []
        self._later_marked: set[str] = set()
        self._later_moved: set[tuple[str, int]] = set()
        self._later_evicted: dict[str, DeviceSnapshot] = {}
        # Devices the TTL forgot, gone from memory; their store rows go once their tombstones
        # commit (a rollback would otherwise lose them with no tombstone and no alert close).
        self.expiring: set[str] = set()

    # ---- the table's view ------------------------------------------------------------------
    def load(self, device_id: str) -> DeviceSnapshot | None:
        """A device's state from the store (it was evicted, or restored from the changelog)."""
        snap = self._evicted_dirty.pop(device_id, None) or self._later_evicted.pop(device_id, None)
        if snap is not None:
            return snap  # evicted since the last commit: back in memory, still dirty
        row = None if device_id in self.expiring else self.store.get(device_id)
        try:  # restore checks only a snapshot's header and lengths: never crash on it here
            snap = None if row is None else decode_for_table(row[1], self.settings.n_features)
        except (ValueError, TypeError) as exc:  # (SnapshotDecodeError is one) counted, logged, afresh
            self._unusable(1, "a device's stored state cannot be used; it starts afresh",
                           device=device_id[:128], error=str(exc)[:300])
            snap = None
        if snap is not None and row is not None:
            # Its state belongs to the changelog partition it was checkpointed to (the store's
            # row says which), whatever the record claims: a forged number there made every
            # transaction of the partition fail, tombstoning it on a partition that does not exist.
            snap.partition = row[0]
        if snap is None:
            self.unwritten.add(device_id)
        return snap

    def _unusable(self, n: int, why: str, **extra: object) -> None:
        self._warn_sparingly(why, **extra)  # (a setting changed under a fleet: 1 line a minute)
        if self.metrics is not None:  # (counted every time)
            self.metrics.unreadable_snapshots.inc(n)  # type: ignore[attr-defined]

    def on_evict(self, snap: DeviceSnapshot) -> None:
        """A device left memory (the table was full): keep its state where ``load`` finds it."""
        if self.metrics is not None:
            self.metrics.evicted_devices.inc()  # type: ignore[attr-defined]
        if self._in_flight:
            self._later_evicted[snap.device_id] = snap
        else:
            self._keep_evicted(snap)

    def _keep_evicted(self, snap: DeviceSnapshot) -> None:
        """A dirty device waits beside the table for the commit; a clean one goes to the store."""
        if snap.device_id in self.dirty:
            self._evicted_dirty[snap.device_id] = snap
        else:
            self.store.put_many([(snap.device_id, snap.partition, encode_snapshot(snap))])

    # ---- per transaction -------------------------------------------------------------------
    def touch(self, table: DeviceTable, slots, moved=()) -> None:  # noqa: ANN001
        """Note the devices a batch changed: their partition's next checkpoint writes them.
        Those that ``moved`` (``(device, old partition)``: their readings came on another
        partition) go with the next commit, beside a tombstone for their old row: the old
        partition's next marker vouches for their readings there."""
        ids, parts = table.ids, table.partition
        changed = [(ids[slot], int(parts[slot])) for slot in slots.tolist()]
        if self._in_flight:
            self._later_touched.extend(changed)
        else:
            self._note_dirty(changed)
        if moved:
            (self._later_moved if self._in_flight else self.moved).update(moved)
            (self._later_marked if self._in_flight else self.marked).update(d for d, _ in moved)

    def _note_dirty(self, changed: list[tuple[str, int]]) -> None:
        dirty = self.dirty
        for dev, p in changed:
            dirty[dev] = p
            if p not in self.next_flush:  # (at the partition's phase of the interval: in turn)
                self.next_flush[p] = next_checkpoint(p, time.monotonic(), self.settings.checkpoint_interval_s)

    def mark(self, table: DeviceTable, slots) -> None:  # noqa: ANN001
        """Checkpoint these devices with the next commit, whatever their partition's schedule:
        re-warmed after a hot swap, their h/c are another model's, and a replay from their last
        checkpoint would step the readings since under the wrong weights. Written with (or
        before) the first forecast of the new weights, the checkpoint names the new version."""
        self.touch(table, slots)
        ids = table.ids
        (self._later_marked if self._in_flight else self.marked).update(
            ids[slot] for slot in slots.tolist())

    def mark_unwritten(self) -> None:
        """Checkpoint, with the next commit, every device not yet in the changelog (a hot swap:
        a replay would start such a device afresh under the served model, no longer the one it
        started under). A flag: the swap itself does nothing a device."""
        self._unwritten_due = True

    def waiting(self) -> int:
        """Devices the next commit writes whatever their partitions' schedule (at most; none
        when no device is dirty: only a dirty device is written)."""
        if not self.dirty:
            return 0
        return len(self.marked) + (len(self.unwritten) if self._unwritten_due else 0)

    def flush_due(self) -> set[int]:
        """Partitions whose dirty devices are due to be checkpointed."""
        now = time.monotonic()
        return {p for p, due in self.next_flush.items() if now >= due}

    def records_for_commit(self, table: DeviceTable, next_offsets: dict[int, int],
                           flush: set[int] | None = None) -> list[ChangelogRecord]:
        """Changelog records for the committing transaction: the dirty devices of the
        partitions due (and of ``flush``), each with its replay marker (``next_offsets``: the
        input offset after this transaction), every dirty device evicted meanwhile, and the
        marked ones (:meth:`mark`). A device written without its partition's marker is fine:
        a replay from the older marker skips its readings up to its ``last_ts``."""
        due = self.flush_due() | (flush or set())
        evicted_dirty, dirty = self._evicted_dirty, self.dirty
        forced = self.marked | self.unwritten if self._unwritten_due else self.marked
        self._writing_unwritten = self._unwritten_due
        if due:
            devs = [d for d, p in dirty.items() if p in due or d in evicted_dirty or d in forced]
        else:
            devs = [*evicted_dirty, *(d for d in forced if d not in evicted_dirty and d in dirty)]
        # (never for a partition still restoring or replaying: its readings are not all in memory)
        current = {p for p in due if p in next_offsets and p not in self.restoring | self.replaying}
        floor = self.marker_floor
        markers = {**self._first_markers, **{p: max(next_offsets[p], floor.get(p, 0)) for p in current}}
        # Evicted devices are encoded once: the rows go to the changelog, then to the store.
        evicted = [(d, s.partition, encode_snapshot(s)) for d, s in self._evicted_dirty.items()]
        self._writing = (due, devs, markers, evicted)
        self._writing_moved = sorted(self.moved)
        if not devs and not markers and not self._writing_moved:
            return []
        index = table.index
        slots = np.fromiter((index[d] for d in devs if d in index), np.int64)
        snaps = table.snapshots(slots) if len(slots) else []
        out: list[ChangelogRecord] = [
            (self.topic, key, value, None, partition)
            for key, value, partition in [*changelog_records(snaps),
                                          *((d.encode(), v, p) for d, p, v in evicted)]
        ]
        # A device back on the partition it left (its readings came on two, p0 -> p1 -> p0, in
        # one transaction) keeps its state there: a tombstone after its snapshot deleted it.
        now_on = {d: p for d, p, _ in evicted} | {d: int(table.partition[index[d]]) for d, _ in
                                                  self._writing_moved if d in index}
        out.extend((self.topic, key, value, None, part)
                   for key, value, part in (tombstone(d, p) for d, p in self._writing_moved
                                            if now_on.get(d) != p))
        out.extend((self.topic, REPLAY_MARKER, encode_marker(offset), None, p)
                   for p, offset in sorted(markers.items()))
        return out

    def commit_started(self) -> None:
        """The records are being committed: until :meth:`committed` (or a rollback), devices
        changed, marked or evicted are noted apart."""
        self._in_flight = True

    def committed(self, written: dict[tuple[str, int], int]) -> None:
        """After a commit: what it checkpointed is durable (its offsets noted for the clean
        stop). Then what happened while it was in flight."""
        for (topic, partition), offset in written.items():
            if topic == self.topic:
                self.written[partition] = offset + 1
        if self.expiring:  # (before any row put since: a device back meanwhile is new)
            self.store.delete_many(self.expiring)
            self.expiring.clear()
        due, devs, markers, evicted = self._writing
        if self._evicted_dirty:
            encoded = {d for d, _, _ in evicted}  # (any evicted since are encoded here)
            self.store.put_many([*evicted, *((d, s.partition, encode_snapshot(s))
                                             for d, s in self._evicted_dirty.items() if d not in encoded)])
            self._evicted_dirty.clear()
        for dev in devs:
            self.dirty.pop(dev, None)
            self.marked.discard(dev)
            self.unwritten.discard(dev)
        if self._writing_unwritten:
            self._unwritten_due = self._writing_unwritten = False
        for p in due:
            self.next_flush.pop(p, None)
        self.markers.update(markers)
        for p in markers:
            self._first_markers.pop(p, None)
        self.moved.difference_update(self._writing_moved)
        self._writing, self._writing_moved = (set(), [], {}, []), []
        self._in_flight = False
        self._note_dirty(self._later_touched)
        self.marked |= self._later_marked
        self.moved |= self._later_moved
        later_evicted = list(self._later_evicted.values())
        self._later_touched, self._later_marked, self._later_evicted = [], set(), {}
        self._later_moved = set()
        for snap in later_evicted:  # (counted when evicted)
            self._keep_evicted(snap)

    def expire(self, table: DeviceTable, now: float, farewell: Callable[..., list] | None = None,
               idle: IdleFor | None = None) -> list[ChangelogRecord]:
        """Forget devices idle past the TTL (by ``idle``, default the wall clock), in memory and
        in the store: tombstones to send, and ``farewell``'s records (checkpointing/expiry.py)."""
        return self.expiry.records(table, now, farewell, idle)

    # ---- rebalances ------------------------------------------------------------------------
    def assign(self, partitions: set[int]) -> None:
        """New partitions: paused until restored (from the changelog alone if stale). Nothing
        is written here (a rebalance callback): a full disk must not leave them unpaused."""
        self._unchecked |= partitions  # (their store rows' age: checked as their restore begins)
        self.restoring, self.ready = self.restoring | partitions, self.ready - partitions
        for p in partitions:
            self._progress(p, 0.0)

    def revoke(self, table: DeviceTable, partitions: set[int]) -> None:
        """Lost partitions: drop their devices from memory (the changelog has them)."""
        table.drop(table.devices_in_partitions(partitions))
        dropped = [d for d, p in self.dirty.items() if p in partitions]
        for dev in dropped:
            del self.dirty[dev]
            self._evicted_dirty.pop(dev, None)
            self.marked.discard(dev)
            self.unwritten.discard(dev)
        if self.moved and dropped:  # (their new partition's next owner replays the move)
            gone = set(dropped)
            self.moved = {m for m in self.moved if m[0] not in gone}
        for p in partitions:
            self.next_flush.pop(p, None)
            for held in (self.markers, self._first_markers, self.marker_floor):
                held.pop(p, None)
        self.restoring, self.ready, self.replaying = (
            self.restoring - partitions, self.ready - partitions, self.replaying - partitions)
        self.store.release(partitions - self._unchecked, time.time())  # (unchecked: as old as before)
        self._unchecked -= partitions
        for p in partitions:
            self.written.pop(p, None)

    def restore_slice(self, budget_s: float = 1.0) -> set[int]:
        """Restore paused partitions for ``budget_s``; those now complete (restoring.py)."""
        return restore_slice(self, budget_s)

    def replay_from(self, partition: int) -> int | None:
        """Where the input must be replayed from over ``partition``'s restored state."""
        return self.store.replay_from(partition)

    def first_marker(self, partition: int, offset: int) -> None:
        """``partition``'s changelog has no replay marker (a new group, or one from before
        markers): its state is complete up to ``offset``. The next commit says so."""
        self._first_markers[partition] = offset

    def rollback(self, table: DeviceTable, partitions: set[int]) -> None:
        """After an aborted batch: memory may hold uncommitted state. Drop it and restore the
        partitions again from the changelog (the store is never ahead of it)."""
        self._writing, self._writing_moved = (set(), [], {}, []), []
        self._writing_unwritten = False
        self.expiring.clear()  # (still in the store: a later pass expires them again)
        self._in_flight = False  # (the next batch's changes go with it; its evictions are in the changelog)
        self._later_touched, self._later_marked, self._later_evicted = [], set(), {}
        self._later_moved = set()
        self.revoke(table, partitions)  # drops their dirty devices too
        self.assign(partitions)

    def close(self, table: DeviceTable, clean: bool) -> None:
        """On a clean stop, keep every in-memory device in the store for a fast restart. (Not
        with dirty devices: the final checkpoint did not commit, the store must not vouch.)"""
        clean = clean and not self.dirty
        try:
            if clean and len(table):
                slots = np.fromiter(table.index.values(), np.int64)
                self.store.put_many([(s.device_id, s.partition, encode_snapshot(s))
                                     for s in table.snapshots(slots)])
            if clean:
                # Every device of a ready partition is now in the store at its latest committed
                # state, so a restart only needs changelog records written after our last one.
                self.store.apply(
                    checkpoints={p: off for p, off in self.written.items() if p in self.ready},
                    replay_from={p: off for p, off in self.markers.items() if p in self.ready})
                # Restoring ones too: unstamped rows would be trusted however old when next assigned.
                self.store.release((self.ready | self.restoring) - self._unchecked, time.time())
        except sqlite3.OperationalError as exc:  # a full disk: rebuilt from the changelog next start
            log.warning("the state store could not be closed clean", extra={"error": str(exc)})
            clean = False
        self.store.close(clean=clean)

    def _progress(self, partition: int, ratio: float) -> None:
        if self.metrics is not None:
            self.metrics.restore_progress_ratio.labels(str(partition)).set(ratio)  # type: ignore[attr-defined]
