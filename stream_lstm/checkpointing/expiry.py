"""Forgetting devices idle past ``STREAM_LSTM_DEVICE_TTL_S``.

A device idle that long gets a tombstone on the changelog, leaves memory and the local store,
and its open alert closes (``reason: expired``). Memory holds only part of a large fleet:
devices evicted to the store, or restored there after a restart and not seen since, never
pass through memory again, so each expiry pass also reads a slice of the store (a cursor over
its rows, :data:`SWEEP_ROWS` at a time) and brings the idle ones of the partitions this worker
owns and has restored in for their farewell, as if they had just been loaded.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from stream_lstm.checkpointing.changelog import tombstone
from stream_lstm.checkpointing.codec import decode_for_table
from stream_lstm.state.table import DeviceTable

if TYPE_CHECKING:
    from stream_lstm.checkpointing.manager import StateManager

# How long each device (its partition, its last_seen) has been idle: the input's own time
# (input_clock.py), or the wall clock where none is given.
IdleFor = Callable[[np.ndarray, np.ndarray], np.ndarray]

# Store rows read a pass (~20 us each to decode: ~40 ms of the loop). While a round over the
# store is under way (:attr:`Expiry.sweeping`) a pass comes every SWEEP_PASS_S, not once a
# minute: 24,000 rows a minute, a million stored devices in 42 minutes, and a fleet bringing up
# to 400 new devices a second is swept as fast as it grows. (At one pass a minute, 33 a second
# outgrew it: with the TTL set, the store and the changelog grew without bound; a review.)
SWEEP_ROWS = 2_000
SWEEP_PASS_S = 5.0


class Expiry:
    """The TTL passes of one :class:`~stream_lstm.checkpointing.manager.StateManager`.

    Parameters
    ----------
    manager
        Its settings (the TTL), store, changelog topic and dirty devices.

    Example: see tests/checkpointing/test_expiry.py::test_idle_devices_in_the_store_expire_too
    """

    def __init__(self, manager: StateManager) -> None:
        self.manager = manager
        self._after = ""  # the store's last device id read; "" starts a new round

    @property
    def sweeping(self) -> bool:
        """A round over the store is under way: its last slice was full, more rows follow."""
        return self._after != ""

    def records(self, table: DeviceTable, now: float, farewell: Callable[..., list] | None = None,
                idle_for: IdleFor | None = None) -> list[Any]:
        """Tombstones (and ``farewell``'s alert-closing records) for the devices idle past the
        TTL by ``idle_for`` (default: the wall clock, ``now - last_seen``); they are gone from
        memory, and from the store when the commit carrying the tombstones succeeds
        (``StateManager.committed``)."""
        m = self.manager
        ttl = m.settings.device_ttl_s
        if ttl <= 0:
            return []
        if idle_for is None:
            def idle_for(partitions: np.ndarray, last_seen: np.ndarray) -> np.ndarray:
                return now - last_seen
        ids = list(table.index)  # least recently seen first
        slots = np.fromiter(table.index.values(), np.int64, len(ids))
        gone = idle_for(table.partition[slots], table.last_seen[slots]) > ttl
        idle = [d for d, g in zip(ids, gone.tolist(), strict=True) if g]
        stored = self._idle_in_store(table, ttl, idle_for)
        out: list[Any] = []
        if farewell is not None and (idle or stored):
            out.extend((topic, key, value, headers, None)
                       for topic, key, value, headers in farewell(idle, stored))
        parts = [int(table.partition[table.index[dev]]) for dev in idle] + [int(s.partition) for s in stored]
        gone_ids = idle + [s.device_id for s in stored]
        for dev, partition in zip(gone_ids, parts, strict=True):
            key, value, part = tombstone(dev, partition)
            out.append((m.topic, key, value, None, part))
            # Its partition's replay marker moves past its readings in the same commit: after a
            # crash, a replay from the older marker brought a forgotten device back (a review).
            m.next_flush[part] = 0.0
        table.drop(idle)
        m.expiring.update(gone_ids)  # out of the store once the tombstones commit
        m.unwritten.difference_update(gone_ids)
        return out

    def _idle_in_store(self, table: DeviceTable, ttl: float, idle_for: IdleFor) -> list[Any]:
        """Read the next slice of the store; the snapshots of its devices idle past the TTL.
        Not brought into memory for their farewell: a table kept full by a fleet larger than
        ``MAX_DEVICES`` had no room for them, and a silent device's alert never closed."""
        m = self.manager
        rows = m.store.scan(self._after, SWEEP_ROWS)
        self._after = rows[-1][0] if len(rows) == SWEEP_ROWS else ""  # a short slice ends a round
        candidates = []
        for dev, partition, data in rows:
            if dev in table.index or dev in m.dirty:
                continue  # in memory: the pass over memory judges it
            if dev in m.store.unwritten:
                continue  # its row on disk is older than what waits for a full disk to clear
            if partition not in m.ready or partition in m.replaying:
                # A revoked partition's rows stay in the store for a later reassignment, and a
                # restoring or replaying one's are not current yet: another worker may own the
                # device now, or the replay bring readings of it, so its tombstone (and alert
                # close) are not ours, or not yet.
                continue
            try:
                snap = decode_for_table(data, m.settings.n_features)
            except ValueError:
                continue  # unusable: it starts afresh if it comes back (StateManager.load)
            # The row's partition, not the one its snapshot names: a tombstone deletes only its
            # own partition's row, and that row is the one this worker owns and judged ready.
            snap.partition = partition
            candidates.append(snap)
        if not candidates:
            return []
        idle = idle_for(np.array([s.partition for s in candidates]),  # (one call a slice)
                        np.array([float(s.last_seen) for s in candidates]))
        return [snap for snap, gone in zip(candidates, (idle > ttl).tolist(), strict=True) if gone]
