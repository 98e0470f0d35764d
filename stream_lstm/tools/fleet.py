"""A synthetic sensor fleet: daily seasonality, noise, drift, gaps and recorded anomalies.

Plain numpy, deterministic for a seed, and vectorised: time is generated in fixed-size blocks
of steps x devices, each block with its own random stream derived from ``(seed, block)``. So
the same seed gives the same readings however they are consumed (:meth:`Fleet.readings` at
once, or :meth:`Fleet.stream` one by one), and a stream of any length needs bounded memory.

Each device has its own level, daily amplitude and phase, noise level, random-walk drift and
optional linear trend. Now and then a device goes silent for a stretch (a gap, recorded in
:attr:`Fleet.gaps`), shows a spike, or shifts its level for a while (both recorded in
:attr:`Fleet.anomalies`, the ground truth for evaluation).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

DAY_S = 86_400.0
# Values per generated block (steps x devices x features): big enough to amortise numpy
# overhead, small enough that a 100k-device fleet stays a few MB per block.
_BLOCK_VALUES = 1 << 18
_MAX_BLOCK_STEPS = 1024


@dataclass(frozen=True)
class Anomaly:
    """One injected anomaly: a ``spike`` (one reading) or a ``level_shift`` (a stretch).

    Parameters
    ----------
    device_id, kind
        The device, and ``"spike"`` or ``"level_shift"``.
    start_ts, end_ts
        Event times of the first and last affected reading (equal for a spike).
    magnitude
        The offset added to channel 0, in value units.
    step
        The fleet's time step it starts at.

    Examples
    --------
    >>> fleet = Fleet(n_devices=2, seed=1, step_s=60, start_ts=1_700_000_000, spike_prob=0.02)
    >>> _ = fleet.readings(100)  # ground truth is known for the steps handed out
    >>> a = fleet.anomalies[0]
    >>> a.device_id, a.kind, a.start_ts == a.end_ts, round(float(a.magnitude), 2)
    ('sim-0001', 'spike', True, 9.7)
    """

    device_id: str
    kind: Literal["spike", "level_shift"]
    start_ts: float
    end_ts: float
    magnitude: float
    step: int


@dataclass(frozen=True)
class Gap:
    """A stretch of missing readings of one device: first and last missing event time.

    Parameters
    ----------
    device_id
        The silent device.
    start_ts, end_ts
        Event times of its first and last missing reading.
    n_missing
        Readings missed.
    step
        The fleet's time step it starts at.

    Examples
    --------
    >>> fleet = Fleet(n_devices=2, seed=1, step_s=60, start_ts=1_700_000_000, gap_prob=0.02)
    >>> _ = fleet.readings(100)
    >>> g = fleet.gaps[0]
    >>> g.device_id, g.n_missing, (g.end_ts - g.start_ts) / 60 + 1  # one reading a minute
    ('sim-0001', 25, 25.0)
    """

    device_id: str
    start_ts: float
    end_ts: float
    n_missing: int
    step: int


@dataclass
class FleetReadings:
    """Readings in time order as arrays; iterating yields ``(device_id, ts, values)``.

    Parameters
    ----------
    device_ids
        The device id of each reading.
    device_index
        ``[N]`` int: each reading's device, as its index in the fleet.
    ts
        ``[N]`` event times, epoch seconds.
    values
        ``[N, F]`` channel values.

    Examples
    --------
    >>> batch = Fleet(n_devices=2, seed=1, step_s=60, start_ts=1_700_000_000).readings(2)
    >>> len(batch), batch.device_ids  # devices interleaved in time order
    (4, ['sim-0000', 'sim-0001', 'sim-0000', 'sim-0001'])
    >>> device, ts, values = next(iter(batch))
    >>> device, ts, len(values), float(batch.ts[1] - ts)  # devices spread within the step
    ('sim-0000', 1700000000.0, 1, 30.0)
    """

    device_ids: list[str]
    device_index: np.ndarray
    ts: np.ndarray
    values: np.ndarray

    def __len__(self) -> int:
        return len(self.ts)

    def __iter__(self) -> Iterator[tuple[str, float, tuple[float, ...]]]:
        return zip(self.device_ids, self.ts.tolist(), map(tuple, self.values.tolist()), strict=True)


@dataclass
class _CarriedState:
    """What one block hands to the next: drift level, open gaps and open level shifts."""

    drift: np.ndarray                          # [D]
    gap_end_step: np.ndarray                   # [D] absolute step at which a device's gap ends
    # open level shifts: (device, start_step, end_step, magnitude)
    shifts: list[tuple[int, int, int, float]] = field(default_factory=list)


class Fleet:
    """Synthetic devices each producing one reading per ``step_s`` of event time.

    Parameters
    ----------
    n_devices
        Number of devices, named ``<id_prefix>0000``, ``<id_prefix>0001``, ...
    seed
        Random seed: the same seed (and parameters) gives the same fleet.
    step_s
        Event-time seconds between two readings of a device. Within a step, devices are
        spread evenly, so readings of different devices never share a timestamp.
    start_ts
        Event time of the first reading (epoch seconds); default: one day ago.
    n_features
        Channels per reading. Channels 1.. are noisy affine copies of channel 0 (with their
        own gain and offset), so they are strongly correlated with it and share its anomalies.
    drift
        Standard deviation per step of each device's random-walk drift (value units).
    trend
        Largest linear trend per day; each device draws its slope from ``[-trend, trend]``.
    gap_prob
        Chance per step that a reporting device goes silent, for 5 to 60 steps.
    spike_prob
        Chance per reading of a spike of 6 to 10 times the device's noise level.
    shift_prob
        Chance per step of a level shift of 4 to 8 noise levels lasting 30 to 300 steps.
    id_prefix
        What each device id starts with.

    Examples
    --------
    >>> fleet = Fleet(n_devices=3, seed=1, step_s=300, start_ts=1_700_000_000)
    >>> batch = fleet.readings(4)           # 4 time steps, interleaved across devices
    >>> len(batch), batch.device_ids[0], bool((batch.ts[1:] > batch.ts[:-1]).all())
    (12, 'sim-0000', True)
    >>> first = next(iter(batch))
    >>> first[0], first[1], len(first[2])
    ('sim-0000', 1700000000.0, 1)
    >>> next(iter(Fleet(3, seed=1, step_s=300, start_ts=1_700_000_000).stream())) == first
    True
    """

    def __init__(self, n_devices: int, seed: int = 0, step_s: float = 60.0,
                 start_ts: float | None = None, *, n_features: int = 1, drift: float = 0.02,
                 trend: float = 0.0, gap_prob: float = 0.001, spike_prob: float = 0.001,
                 shift_prob: float = 0.0001, id_prefix: str = "sim-") -> None:
        if n_devices < 1 or n_features < 1 or step_s <= 0:
            raise ValueError("n_devices and n_features must be >= 1 and step_s > 0")
        self.n_devices, self.seed, self.step_s, self.n_features = n_devices, seed, float(step_s), n_features
        self.start_ts = time.time() - DAY_S if start_ts is None else float(start_ts)
        self.drift, self.trend = drift, trend
        self.gap_prob, self.spike_prob, self.shift_prob = gap_prob, spike_prob, shift_prob
        self.device_ids = [f"{id_prefix}{i:04d}" for i in range(n_devices)]
        self.block_steps = max(1, min(_MAX_BLOCK_STEPS, _BLOCK_VALUES // (n_devices * n_features)))

        params = self._rng(0)
        self.level = params.uniform(10, 90, n_devices)
        self.amplitude = params.uniform(1, 10, n_devices)
        self.phase = params.uniform(0, 2 * np.pi, n_devices)
        self.noise = params.uniform(0.1, 1.0, n_devices)
        self.trend_per_day = params.uniform(-trend, trend, n_devices) if trend else np.zeros(n_devices)
        self.channel_gain = params.uniform(0.5, 2.0, (n_devices, n_features))
        self.channel_offset = params.uniform(-20, 20, (n_devices, n_features))
        self.channel_gain[:, 0], self.channel_offset[:, 0] = 1.0, 0.0
        # Spread devices within a step so the interleaved stream is strictly time-ordered.
        self.device_offset_s = self.step_s * np.arange(n_devices) / n_devices

        # Ground truth per generated block; blocks may be regenerated, the dict dedupes them.
        self._anomalies: dict[int, list[Anomaly]] = {}
        self._gaps: dict[int, list[Gap]] = {}
        self._steps_seen = 0
        # Where generation stands: the next block's index and the state it starts from. Reading
        # sequentially (the usual case) never recomputes a block; going back restarts at 0.
        self._next_block = 0
        self._next_state = self._initial_state()

    # --- ground truth ----------------------------------------------------------------------
    @property
    def anomalies(self) -> list[Anomaly]:
        """Injected anomalies that start within the steps handed out so far, in time order."""
        out = [a for block in self._anomalies.values() for a in block if a.step < self._steps_seen]
        return sorted(out, key=lambda a: a.start_ts)

    @property
    def gaps(self) -> list[Gap]:
        """Gaps that start within the steps handed out so far, in time order."""
        out = [g for block in self._gaps.values() for g in block if g.step < self._steps_seen]
        return sorted(out, key=lambda g: g.start_ts)

    def step_ts(self, step: int | np.ndarray) -> np.ndarray:
        """Event times ``[..., D]`` of every device at absolute ``step``."""
        return self.start_ts + np.asarray(step, np.float64)[..., None] * self.step_s + self.device_offset_s

    # --- readings ---------------------------------------------------------------------------
    def readings(self, n_steps: int) -> FleetReadings:
        """The first ``n_steps`` time steps of every device, interleaved in time order.

        A device has ``n_steps`` readings minus those it missed in gaps.
        """
        blocks = [self._block(b) for b in range(-(-n_steps // self.block_steps))]
        if not blocks:
            return FleetReadings([], np.zeros(0, np.int64), np.zeros(0), np.zeros((0, self.n_features)))
        values = np.concatenate([b[0] for b in blocks])[:n_steps]
        present = np.concatenate([b[1] for b in blocks])[:n_steps]
        self._steps_seen = max(self._steps_seen, n_steps)
        # Row-major nonzero = (step, device) order = time order, thanks to the device offsets.
        step_idx, dev_idx = np.nonzero(present)
        ts = self.start_ts + step_idx * self.step_s + self.device_offset_s[dev_idx]
        ids = np.asarray(self.device_ids, dtype=object)[dev_idx].tolist()
        return FleetReadings(ids, dev_idx, ts, values[step_idx, dev_idx])

    def stream(self) -> Iterator[tuple[str, float, tuple[float, ...]]]:
        """Endless ``(device_id, ts, values)`` in time order; the same readings as :meth:`readings`."""
        for block_index in itertools.count():
            values, present = self._block(block_index)
            first_step = block_index * self.block_steps
            for row in range(values.shape[0]):
                self._steps_seen = max(self._steps_seen, first_step + row + 1)
                devices = np.flatnonzero(present[row])
                ts = (self.start_ts + (first_step + row) * self.step_s + self.device_offset_s[devices]).tolist()
                rows = values[row, devices].tolist()
                for d, t, v in zip(devices.tolist(), ts, rows, strict=True):
                    yield self.device_ids[d], t, tuple(v)

    # --- generation ---------------------------------------------------------------------------
    def _rng(self, stream: int, block: int = 0) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(stream, block)))

    def _initial_state(self) -> _CarriedState:
        return _CarriedState(np.zeros(self.n_devices), np.zeros(self.n_devices, np.int64))

    def _block(self, block_index: int) -> tuple[np.ndarray, np.ndarray]:
        """``(values [S, D, F], present [S, D])`` of one block. Drift, gaps and level shifts
        carry over from block to block, so the blocks before it are generated first."""
        if block_index < self._next_block:
            self._next_block, self._next_state = 0, self._initial_state()
        while True:
            values, present, end_state = self._generate(self._next_block, self._next_state)
            self._next_block, self._next_state = self._next_block + 1, end_state
            if self._next_block > block_index:
                return values, present

    def _generate(self, block_index: int, state: _CarriedState):
        rng = self._rng(1, block_index)
        n_steps, n_dev = self.block_steps, self.n_devices
        first = block_index * self.block_steps
        steps = first + np.arange(n_steps)
        ts = self.step_ts(steps)                                        # [S, D]

        season = self.amplitude * np.sin(2 * np.pi * ts / DAY_S + self.phase)
        walk = state.drift + np.cumsum(rng.normal(0.0, self.drift, (n_steps, n_dev)), axis=0)
        trend = self.trend_per_day * (ts - self.start_ts) / DAY_S
        x = self.level + season + walk + trend + rng.normal(0.0, 1.0, (n_steps, n_dev)) * self.noise

        present = np.ones((n_steps, n_dev), bool)
        gap_end = state.gap_end_step.copy()
        for d in np.flatnonzero(gap_end > first):                       # gaps open from before
            present[: gap_end[d] - first, d] = False
        gaps: list[Gap] = []
        starts_s, starts_d = np.nonzero(rng.random((n_steps, n_dev)) < self.gap_prob)
        lengths = rng.integers(5, 61, len(starts_s))
        for s, d, n in zip(starts_s.tolist(), starts_d.tolist(), lengths.tolist(), strict=True):
            # A device already silent cannot start another gap: dropping those draws is the
            # same as a per-step Bernoulli trial that only runs while the device reports.
            if first + s < gap_end[d]:
                continue
            gap_end[d] = first + s + n
            present[s: s + n, d] = False
            last_ts = float(self.step_ts(first + s + n - 1)[d])
            gaps.append(Gap(self.device_ids[d], float(ts[s, d]), last_ts, n, first + s))

        anomalies: list[Anomaly] = []
        spike_s, spike_d = np.nonzero(rng.random((n_steps, n_dev)) < self.spike_prob)
        spike_size = rng.choice([-1.0, 1.0], len(spike_s)) * rng.uniform(6, 10, len(spike_s))
        for s, d, size in zip(spike_s.tolist(), spike_d.tolist(), spike_size.tolist(), strict=True):
            magnitude = size * self.noise[d]
            x[s, d] += magnitude
            if present[s, d]:  # a spike nobody saw is not ground truth
                t = float(ts[s, d])
                anomalies.append(Anomaly(self.device_ids[d], "spike", t, t, magnitude, first + s))

        shifts = list(state.shifts)
        shift_s, shift_d = np.nonzero(rng.random((n_steps, n_dev)) < self.shift_prob)
        shift_len = rng.integers(30, 301, len(shift_s))
        shift_size = rng.choice([-1.0, 1.0], len(shift_s)) * rng.uniform(4, 8, len(shift_s))
        for s, d, n, size in zip(shift_s.tolist(), shift_d.tolist(), shift_len.tolist(),
                                 shift_size.tolist(), strict=True):
            magnitude = size * self.noise[d]
            shifts.append((d, first + s, first + s + n, magnitude))
            last_ts = float(self.step_ts(first + s + n - 1)[d])
            anomalies.append(Anomaly(self.device_ids[d], "level_shift", float(ts[s, d]), last_ts,
                                     magnitude, first + s))
        for d, start_step, end_step, magnitude in shifts:
            x[:, d] += magnitude * ((steps >= start_step) & (steps < end_step))
        values = x[..., None] * self.channel_gain + self.channel_offset
        if self.n_features > 1:
            values[..., 1:] += rng.normal(0.0, 1.0, (n_steps, n_dev, self.n_features - 1)) * (0.2 * self.noise[:, None])

        self._anomalies[block_index] = anomalies
        self._gaps[block_index] = gaps
        end = _CarriedState(walk[-1].copy(), gap_end,
                            [sh for sh in shifts if sh[2] > first + n_steps])
        return values, present, end
