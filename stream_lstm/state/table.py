"""DeviceTable: every in-memory device's state, one *slot* (row) per device.

The LSTM state of all devices lives in two preallocated tensors ``h`` and ``c`` of shape
``[num_layers, capacity, hidden]`` on the compute device (the GPU when there is one), so a
batch gathers and scatters rows instead of moving per-device objects. Everything else
(normalizer statistics, rolling window, timestamps) lives in numpy arrays indexed by the
same slot. Capacity doubles when needed, up to ``max_devices``; beyond that the least
recently seen device leaves memory (the caller decides where its snapshot goes).

>>> import numpy as np
>>> t = DeviceTable(max_devices=4, window=3, n_features=1, num_layers=1, hidden_size=2)
>>> slots = t.slots_for(["a", "b", "a"], partitions=[0, 0, 0], now=0.0)
>>> slots.tolist(), len(t)
([0, 1, 0], 2)
>>> t.snapshot(0).device_id
'a'
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

import numpy as np
import torch

from stream_lstm import alerts, experts, likelihood
from stream_lstm.state.normalizer import OnlineNormalizer
from stream_lstm.state.snapshot import DeviceSnapshot
from stream_lstm.state.window import RollingWindow

_NAN = float("nan")
# Snapshot extras holding the interval calibration and the blend with persistence (absent in
# older snapshots: no correction, the model's change as it is).
_LOG_M1, _LOG_MH = "interval_log_m1", "interval_log_mH"
_BLEND_W1, _BLEND_WH, _PREV_CHANGE = "blend_w1", "blend_wH", "prev_change"


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
        Hold the per-device one-step experts (4 KB a device, see experts.py). Without them,
        a restored device's expert state is dropped.
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
        self.last_ts = np.full(cap, _NAN)
        self.step_s = np.full(cap, _NAN)
        self.n_seen = np.zeros(cap, np.int64)
        self.since_reset = np.zeros(cap, np.int64)
        self.prev_mu = np.full(cap, _NAN, np.float64)
        self.prev_sigma = np.full(cap, _NAN, np.float64)
        # The H-step forecasts (location, scale b) of each device's last H readings, a ring
        # indexed by reading count: what a reading's drift score compares it with. Its width
        # follows the served model's horizon (see ensure_horizon); float32 is plenty for a score.
        self.drift_mu = np.full((cap, 0), _NAN, np.float32)
        self.drift_b = np.full((cap, 0), _NAN, np.float32)
        self.drift_change = np.full((cap, 0), _NAN, np.float32)  # the model's own (normalized)
        self.prev_change = np.full(cap, _NAN, np.float64)  # ... and its one-step one
        # Weight of the model's change against persistence at h=1 and h=H (see forecast.py).
        self.blend_w = np.ones((cap, 2), np.float64)
        # Log of the factor applied to the model's scale b at h=1 and h=H, tracked per device
        # so its intervals cover what they claim (see forecast.py).
        self.interval_log_m = np.zeros((cap, 2), np.float64)
        # The per-device one-step experts and their weights (see experts.py); no columns
        # when they are off.
        self.with_experts = with_experts
        self.experts = self._fresh_experts(cap)
        # The model of each device's own scores behind its anomaly likelihood, and its open
        # alert if any (see likelihood.py and alerts.py).
        self.likelihood = np.tile(likelihood.initial_state(), (cap, 1))
        self.alert = np.tile(alerts.initial_state(), (cap, 1))
        self.partition = np.zeros(cap, np.int64)
        self.last_seen = np.zeros(cap)
        self.model_version: list[str] = [""] * cap
        self.ids: list[str | None] = [None] * cap
        # device id -> slot, in least-recently-seen-first order (an LRU).
        self.index: OrderedDict[str, int] = OrderedDict()
        self._free = list(range(cap - 1, -1, -1))
        self.evictions = 0

    def __len__(self) -> int:
        return len(self.index)

    def ensure_horizon(self, horizon: int) -> None:
        """Size the drift ring for a model of ``horizon`` steps (emptied if it changes)."""
        if self.drift_mu.shape[1] != horizon:
            self.drift_mu = np.full((self.capacity, horizon), _NAN, np.float32)
            self.drift_b = np.full((self.capacity, horizon), _NAN, np.float32)
            self.drift_change = np.full((self.capacity, horizon), _NAN, np.float32)

    def _fresh_experts(self, n: int) -> np.ndarray:
        return experts.init_state(n) if self.with_experts else np.zeros((n, 0))

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
        for i, dev in enumerate(device_ids):
            slot = index.get(dev)
            if slot is None:
                snap = load(dev) if load is not None else None
                slot = self._allocate(dev, partitions[i], pinned)
                if snap is not None:
                    self._restore_into(slot, snap)
            else:
                index.move_to_end(dev)
            out[i] = slot
        self.last_seen[out] = now
        return out

    def _allocate(self, dev: str, partition: int, pinned: set[str]) -> int:
        if not self._free:
            if self.capacity < self.max_devices:
                self._grow(min(self.max_devices, self.capacity * 2))
            else:
                self._evict_lru(pinned)
        slot = self._free.pop()
        self._clear(slot)
        self.ids[slot] = dev
        self.partition[slot] = partition
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

    def idle_devices(self, older_than: float) -> list[str]:
        """Devices last seen before ``older_than`` (wall clock), oldest first."""
        out = []
        for dev, slot in self.index.items():  # LRU order: stop at the first recent one
            if self.last_seen[slot] >= older_than:
                break
            out.append(dev)
        return out

    def _grow(self, capacity: int) -> None:
        old = self.capacity
        extra = capacity - old
        self.norm.grow(capacity)
        self.window.grow(capacity)
        pad = torch.zeros(self.num_layers, extra, self.hidden_size, device=self.device)
        self.h = torch.cat([self.h, pad], dim=1)
        self.c = torch.cat([self.c, pad.clone()], dim=1)
        for name, fill in (("last_ts", _NAN), ("step_s", _NAN), ("prev_mu", _NAN), ("prev_change", _NAN),
                           ("prev_sigma", _NAN), ("n_seen", 0), ("since_reset", 0),
                           ("partition", 0), ("last_seen", 0.0), ("drift_mu", _NAN),
                           ("drift_b", _NAN), ("drift_change", _NAN), ("interval_log_m", 0.0),
                           ("blend_w", 1.0)):
            arr = getattr(self, name)
            new_rows = np.full((extra, *arr.shape[1:]), fill, arr.dtype)
            setattr(self, name, np.concatenate([arr, new_rows]))
        self.experts = np.concatenate([self.experts, self._fresh_experts(extra)])
        self.likelihood = np.concatenate([self.likelihood, np.tile(likelihood.initial_state(), (extra, 1))])
        self.alert = np.concatenate([self.alert, np.tile(alerts.initial_state(), (extra, 1))])
        self.model_version.extend([""] * extra)
        self.ids.extend([None] * extra)
        self._free.extend(range(capacity - 1, old - 1, -1))

    def _clear(self, slot: int) -> None:
        s = np.array([slot])
        self.norm.reset(s)
        self.window.reset(s)
        self.h[:, slot] = 0.0
        self.c[:, slot] = 0.0
        self.last_ts[slot] = self.step_s[slot] = _NAN
        self.prev_mu[slot] = self.prev_sigma[slot] = _NAN
        self.drift_mu[slot] = self.drift_b[slot] = self.drift_change[slot] = _NAN
        self.prev_change[slot] = _NAN
        self.interval_log_m[slot] = 0.0
        self.blend_w[slot] = 1.0
        self.experts[slot] = self._fresh_experts(1)[0]
        self.likelihood[slot] = likelihood.initial_state()
        self.alert[slot] = alerts.initial_state()
        self.n_seen[slot] = self.since_reset[slot] = 0
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
        return DeviceSnapshot(
            device_id=dev, partition=int(self.partition[slot]), h=empty, c=empty,
            count=float(self.norm.count[slot]), mean=self.norm.mean[slot].copy(),
            var=self.norm.var[slot].copy(), window=self.window.ordered(slot),
            last_ts=float(self.last_ts[slot]), step_s=float(self.step_s[slot]),
            n_seen=int(self.n_seen[slot]), since_reset=int(self.since_reset[slot]),
            prev_mu=float(self.prev_mu[slot]), prev_sigma=float(self.prev_sigma[slot]),
            model_version=self.model_version[slot], last_seen=float(self.last_seen[slot]),
            drift_mu=self.drift_mu[slot].copy(), drift_b=self.drift_b[slot].copy(),
            drift_change=self.drift_change[slot].copy(),
            experts=experts.pack(self.experts[slot]) if self.with_experts else np.zeros(0),
            extra={_LOG_M1: float(self.interval_log_m[slot, 0]),
                   _LOG_MH: float(self.interval_log_m[slot, 1]),
                   _BLEND_W1: float(self.blend_w[slot, 0]), _BLEND_WH: float(self.blend_w[slot, 1]),
                   _PREV_CHANGE: float(self.prev_change[slot]),
                   **dict(zip(likelihood.FIELDS, self.likelihood[slot].tolist(), strict=True)),
                   # An alert's fields travel only while it is open: most devices have none.
                   **(dict(zip(alerts.FIELDS, self.alert[slot].tolist(), strict=True))
                      if np.isfinite(self.alert[slot, alerts.SINCE]) else {})},
        )

    def restore(self, snap: DeviceSnapshot) -> int:
        """Put a snapshot into memory (restore on assignment, or a device coming back)."""
        slot = self.index.get(snap.device_id)
        if slot is None:
            slot = self._allocate(snap.device_id, snap.partition, {snap.device_id})
        self._restore_into(slot, snap)
        return slot

    def _restore_into(self, slot: int, snap: DeviceSnapshot) -> None:
        compatible = snap.h.shape == (self.num_layers, self.hidden_size)
        if compatible:
            self.h[:, slot] = torch.from_numpy(snap.h).to(self.device)
            self.c[:, slot] = torch.from_numpy(snap.c).to(self.device)
        # else: the model's shape changed since the snapshot; h/c stay zero and the caller
        # re-warms the device from its window.
        self.partition[slot] = snap.partition
        self.norm.count[slot] = snap.count
        self.norm.mean[slot] = snap.mean
        self.norm.var[slot] = snap.var
        self.window.load(slot, snap.window)
        self.last_ts[slot], self.step_s[slot] = snap.last_ts, snap.step_s
        self.n_seen[slot], self.since_reset[slot] = snap.n_seen, snap.since_reset
        self.prev_mu[slot], self.prev_sigma[slot] = snap.prev_mu, snap.prev_sigma
        if self.drift_mu.shape[1] == 0 and len(snap.drift_mu):
            self.ensure_horizon(len(snap.drift_mu))
        if len(snap.drift_mu) == self.drift_mu.shape[1]:  # else the horizon changed: no drift score for H readings
            self.drift_mu[slot], self.drift_b[slot] = snap.drift_mu, snap.drift_b
            self.drift_change[slot] = snap.drift_change
        self.interval_log_m[slot] = snap.extra.get(_LOG_M1, 0.0), snap.extra.get(_LOG_MH, 0.0)
        self.blend_w[slot] = snap.extra.get(_BLEND_W1, 1.0), snap.extra.get(_BLEND_WH, 1.0)
        self.prev_change[slot] = snap.extra.get(_PREV_CHANGE, _NAN)
        # Older snapshots have neither: the device learns its scores afresh, with no alert open.
        self.likelihood[slot] = [snap.extra.get(k, 0.0) for k in likelihood.FIELDS]
        self.alert[slot] = [snap.extra.get(k, _NAN) for k in alerts.FIELDS]
        # A snapshot from before the experts (or with another layout) starts them afresh.
        if self.with_experts:
            fresh = snap.experts.shape != (experts.PACKED_SIZE,)
            self.experts[slot] = self._fresh_experts(1)[0] if fresh else experts.unpack(snap.experts)
        self.model_version[slot] = snap.model_version if compatible else ""
        self.last_seen[slot] = max(self.last_seen[slot], snap.last_seen)
