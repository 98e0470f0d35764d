"""DeviceTable: every in-memory device's state, one *slot* (row) per device.

The LSTM state of all devices lives in two preallocated tensors ``h`` and ``c`` of shape
``[num_layers, capacity, hidden]`` on the compute device (the GPU when there is one), so a
batch gathers and scatters rows instead of moving per-device objects. Everything else
lives in numpy arrays indexed by the same slot: the normalizer statistics, the rolling
window, the experts, and the columns declared in state/columns.py (timestamps, the forecast
corrections, the anomaly likelihood, the open alert), which the table grows, clears,
snapshots and restores from their declarations alone. Capacity doubles when needed, up to
``max_devices``; beyond that the least recently seen device leaves memory (the caller
decides where its snapshot goes).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections import OrderedDict
from collections.abc import Callable, Sequence

import numpy as np
import torch

from stream_lstm.state import expert_state
from stream_lstm.state.columns import COLUMNS, HORIZON, Column, schema_id
from stream_lstm.state.normalizer import OnlineNormalizer
from stream_lstm.state.snapshot import DeviceSnapshot
from stream_lstm.state.window import RollingWindow


class DeviceTable:
    """Slots, LSTM state tensors and per-device arrays for the devices held in memory.

    Parameters
    ----------
    max_devices
        Devices held in memory at most; the least recently seen one is evicted beyond it.
    window, n_features, num_layers, hidden_size
        Shapes of the rolling window and of the LSTM state.
    device
        Torch device of ``h`` and ``c``.
    normalizer, alpha, std_floor
        Online normalizer settings (see :class:`OnlineNormalizer`).
    on_evict
        Called with the snapshot of each device evicted to make room; ``None`` drops it.
    initial_capacity
        Slots allocated up front (grows by doubling).
    with_experts
        Hold the per-device one-step experts (2.8 KB a device, see experts.py). Without them,
        a restored device's expert state is dropped.
    columns
        The per-device numeric state (state/columns.py): each becomes ``table.<name>``, grown,
        cleared, snapshotted (``DeviceSnapshot.columns``) and restored from its declaration
        alone; a snapshot's columns the table does not declare are ignored, and a declared
        one the snapshot lacks, or holds with another width, restores to its fill.

    Examples
    --------
    >>> import numpy as np
    >>> t = DeviceTable(max_devices=4, window=3, n_features=1, num_layers=1, hidden_size=2)
    >>> slots = t.slots_for(["a", "b", "a"], partitions=[0, 0, 0], now=0.0)
    >>> slots.tolist(), len(t)
    ([0, 1, 0], 2)
    >>> t.snapshot(0).device_id
    'a'
    """

    def __init__(
        self,
        max_devices: int,
        window: int,
        n_features: int,
        num_layers: int,
        hidden_size: int,
        device: torch.device | str = "cpu",
        normalizer: str = "welford",
        alpha: float = 0.01,
        std_floor: float = 1e-3,
        on_evict: Callable[[DeviceSnapshot], None] | None = None,
        initial_capacity: int = 1024,
        with_experts: bool = True,
        columns: tuple[Column, ...] = COLUMNS,
    ) -> None:
        self.max_devices = max_devices
        self.num_layers, self.hidden_size, self.n_features = num_layers, hidden_size, n_features
        self.device = torch.device(device)
        self.on_evict = on_evict
        cap = max(1, min(initial_capacity, max_devices))
        self.norm = OnlineNormalizer(cap, n_features, normalizer, alpha, std_floor)
        self.window = RollingWindow(cap, window, n_features)
        self.h = torch.zeros(num_layers, cap, hidden_size, device=self.device)
        self.c = torch.zeros(num_layers, cap, hidden_size, device=self.device)
        self.columns = columns
        self.schema = schema_id(columns)
        self.horizon = 0  # width of the HORIZON columns: the served model's (ensure_horizon)
        for col in columns:
            setattr(self, col.name, col.rows(cap, self.horizon))
        # The per-device one-step experts and their weights (see experts.py); no columns
        # when they are off.
        self.with_experts = with_experts
        self.experts = self._fresh_experts(cap)
        self.model_version: list[str] = [""] * cap
        self.ids: list[str | None] = [None] * cap
        # device id -> slot, in least-recently-seen-first order (an LRU).
        self.index: OrderedDict[str, int] = OrderedDict()
        self._free = list(range(cap - 1, -1, -1))
        self.evictions = 0

    def __len__(self) -> int:
        return len(self.index)

    def ensure_horizon(self, horizon: int) -> None:
        """Size the per-step columns (the drift ring) for a model of ``horizon`` steps
        (emptied if it changes)."""
        if self.horizon != horizon:
            self.horizon = horizon
            for col in self.columns:
                if col.width == HORIZON:
                    setattr(self, col.name, col.rows(self.capacity, horizon))

    def _fresh_experts(self, n: int) -> np.ndarray:
        return expert_state.init_state(n) if self.with_experts else np.zeros((n, 0))

    @property
    def capacity(self) -> int:
        return len(self.ids)

    # ---- slots ---------------------------------------------------------------------------
    def slots_for(
        self,
        device_ids: Sequence[str],
        partitions: Sequence[int],
        now: float,
        load: Callable[[str], DeviceSnapshot | None] | None = None,
    ) -> np.ndarray:
        """Slots of ``device_ids`` (repeats allowed), allocating new devices.

        A device not in memory is taken from ``load`` (the state store) when that returns a
        snapshot, else it starts empty. Every listed device becomes most recently seen.
        """
        out = np.empty(len(device_ids), np.int64)
        index = self.index
        pinned = set(device_ids)  # never evict a device that is part of this batch
        new: list[int] = []  # positions of the devices new to memory
        for i, dev in enumerate(device_ids):
            slot = index.get(dev)
            if slot is None:
                slot = self._allocate(dev, pinned)
                new.append(i)
            else:
                index.move_to_end(dev)
            out[i] = slot
        if new:
            # Cleared together, not one by one: a fleet's first readings (a start, a rebalance)
            # cost ~180 us a device in a loop over the columns, the live p99's first second.
            slots = out[new]
            self._clear(slots)
            self.partition[slots] = np.asarray(partitions)[new]
            for i, slot in zip(new, slots.tolist(), strict=True):
                if load is not None and (snap := load(device_ids[i])) is not None:
                    self._restore_into(slot, snap)
        self.last_seen[out] = now
        return out

    def _allocate(self, dev: str, pinned: set[str]) -> int:
        """A free slot for ``dev`` (evicting the least recently seen device when full); the
        caller clears it (:meth:`_clear`) before it is used."""
        if not self._free:
            if self.capacity < self.max_devices:
                self._grow(min(self.max_devices, self.capacity * 2))
            else:
                self._evict_lru(pinned)
        slot = self._free.pop()
        self.ids[slot] = dev
        self.index[dev] = slot
        return slot

    def _evict_lru(self, pinned: set[str]) -> None:
        for dev in self.index:
            if dev not in pinned:
                break
        else:
            raise RuntimeError(
                f"one batch holds more than max_devices={self.max_devices} devices; "
                "lower STREAM_LSTM_POLL_MAX_RECORDS or raise STREAM_LSTM_MAX_DEVICES"
            )
        snap = self.snapshot(self.index[dev])
        self.drop([dev])
        self.evictions += 1
        if self.on_evict is not None:
            self.on_evict(snap)

    def drop(self, device_ids: Sequence[str]) -> None:
        """Remove devices from memory (revoked partitions, TTL, eviction)."""
        for dev in device_ids:
            slot = self.index.pop(dev, None)
            if slot is not None:
                self.ids[slot] = None
                self._free.append(slot)

    def devices_in_partitions(self, partitions: set[int]) -> list[str]:
        return [d for d, s in self.index.items() if int(self.partition[s]) in partitions]

    def _grow(self, capacity: int) -> None:
        old = self.capacity
        extra = capacity - old
        self.norm.grow(capacity)
        self.window.grow(capacity)
        pad = torch.zeros(self.num_layers, extra, self.hidden_size, device=self.device)
        self.h = torch.cat([self.h, pad], dim=1)
        self.c = torch.cat([self.c, pad.clone()], dim=1)
        for col in self.columns:
            setattr(self, col.name, np.concatenate([getattr(self, col.name), col.rows(extra, self.horizon)]))
        self.experts = np.concatenate([self.experts, self._fresh_experts(extra)])
        self.model_version.extend([""] * extra)
        self.ids.extend([None] * extra)
        self._free.extend(range(capacity - 1, old - 1, -1))
        _return_freed_memory()

    def _clear(self, slots: np.ndarray) -> None:
        """A new device's state in ``slots``."""
        self.norm.reset(slots)
        self.window.reset(slots)
        rows = torch.as_tensor(slots, device=self.device)
        self.h.index_fill_(1, rows, 0.0)
        self.c.index_fill_(1, rows, 0.0)
        for col in self.columns:
            getattr(self, col.name)[slots] = col.fill  # the scalar fills the whole rows
        self.experts[slots] = self._fresh_experts(1)[0]
        for slot in slots.tolist():
            self.model_version[slot] = ""

    # ---- snapshots -------------------------------------------------------------------------
    def snapshot(self, slot: int) -> DeviceSnapshot:
        """A self-contained copy of one slot's state."""
        return self.snapshots(np.array([slot]))[0]

    def snapshots(self, slots: np.ndarray) -> list[DeviceSnapshot]:
        """Copies of many slots' state. One device-to-host copy for all rows."""
        # One device-to-host copy for all rows rather than one per device.
        idx = torch.as_tensor(slots, device=self.device)
        h = self.h.index_select(1, idx).cpu().numpy()
        c = self.c.index_select(1, idx).cpu().numpy()
        out = []
        for i, slot in enumerate(slots.tolist()):
            snap = self.snapshot_meta(slot)
            snap.h, snap.c = h[:, i].copy(), c[:, i].copy()
            out.append(snap)
        return out

    def snapshot_meta(self, slot: int) -> DeviceSnapshot:
        """Like :meth:`snapshot` but leaves ``h``/``c`` empty (filled in bulk by the caller)."""
        dev = self.ids[slot]
        assert dev is not None, f"slot {slot} is free"
        empty = np.zeros((0,), np.float32)
        columns: dict = {}
        for col in self.columns:
            row = getattr(self, col.name)[slot]
            if col.sparse and col.is_fill(row):
                continue
            if row.ndim == 0:
                columns[col.name] = row  # a numpy scalar: immutable, no copy needed
            elif row.size:
                columns[col.name] = row.copy()
        return DeviceSnapshot(
            device_id=dev, h=empty, c=empty,
            count=float(self.norm.count[slot]), mean=self.norm.mean[slot].copy(),
            var=self.norm.var[slot].copy(), window=self.window.ordered(slot),
            model_version=self.model_version[slot],
            experts=expert_state.pack(self.experts[slot]) if self.with_experts else np.zeros(0),
            columns=columns, schema=self.schema,
        )

    def restore(self, snap: DeviceSnapshot) -> int:
        """Put a snapshot into memory (restore on assignment, or a device coming back)."""
        slot = self.index.get(snap.device_id)
        if slot is None:
            slot = self._allocate(snap.device_id, {snap.device_id})
            self._clear(np.array([slot]))
            self.partition[slot] = int(snap.partition)
        self._restore_into(slot, snap)
        return slot

    def _restore_into(self, slot: int, snap: DeviceSnapshot) -> None:
        compatible = snap.h.shape == (self.num_layers, self.hidden_size)
        if compatible:
            self.h[:, slot] = torch.from_numpy(snap.h).to(self.device)
            self.c[:, slot] = torch.from_numpy(snap.c).to(self.device)
        # else: the model's shape changed since the snapshot; h/c stay zero and the caller
        # re-warms the device from its window.
        self.norm.count[slot] = snap.count
        self.norm.mean[slot] = snap.mean
        self.norm.var[slot] = snap.var
        self.window.load(slot, snap.window)
        saved = snap.columns
        if self.horizon == 0:  # a table that serves no model yet adopts the snapshot's horizon
            ring = next((np.size(saved[c.name]) for c in self.columns
                         if c.width == HORIZON and c.name in saved), 0)
            if ring:
                self.ensure_horizon(ring)
        for col in self.columns:
            table = getattr(self, col.name)
            value = saved.get(col.name)
            # Absent (written before the column existed, or sparse at its fill) or of another
            # width (e.g. another horizon than the served model's: no drift score for H
            # readings): the column's fill.
            shape = getattr(value, "shape", None)  # numpy values have one; a plain float: ()
            if (shape if shape is not None or value is None else np.shape(value)) != table.shape[1:]:
                value = col.fill
            if col.keep_newer:  # the larger of the two
                value = np.fmax(table[slot], value) if col.width else max(table[slot], value)
            table[slot] = value
        # A snapshot from before the experts (or with an unknown layout) starts them afresh.
        if self.with_experts:
            fresh = not expert_state.readable(snap.experts)
            self.experts[slot] = self._fresh_experts(1)[0] if fresh else expert_state.unpack(snap.experts)
        self.model_version[slot] = snap.model_version if compatible else ""


def _load_malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None


_MALLOC_TRIM = _load_malloc_trim()


def _return_freed_memory() -> None:
    """Give the arrays a growth just replaced back to the OS.

    glibc raises its mmap threshold to the size of each large block freed, so after the first
    doubling the old columns are freed into the heap instead of unmapped, and the process keeps
    them: measured, ~640 B a device of 4.1 KB at 100k devices grown from 1,024 slots
    (docs/benchmarks.md). ``malloc_trim`` hands them back; a growth happens ~17 times on the
    way to 100k devices, so its cost (milliseconds) does not matter.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
