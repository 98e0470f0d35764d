"""Apply a poll's readings to device state: event-time rules, normalization, windows.

This is the *state* stage of the pipeline. Given decoded readings in arrival order, it

1. finds (or allocates, or loads from the store) each device's slot;
2. applies the event-time rules per device, in order: a reading with the same ``ts`` as the
   last applied one is a **duplicate**, an older one is **late**; neither touches state. A
   gap longer than ``max_gap_s`` marks the reading as a **reset** (its h/c start from zero);
3. orders the accepted readings into *rounds* (round ``r`` = each device's ``r``-th reading
   of this poll) so the engine can run one batched step per round;
4. tracks each device's range (:func:`~stream_lstm.likelihood.beyond_range`): a reading
   absurdly far outside it is a **glitch** until the next reading confirms it, and the state
   takes in the device's previous reading in its place (below);
5. updates the normalizer, rolling window, timestamps and counters, one vectorised call per
   round.

Why a glitch is kept out of the state: one reading of 1e11 on a device near 21 moves the
normalizer's variance by about 1e22 and the experts' history and regression with it, and the
device's forecasts and alerts are worthless for about 2,000 readings after. Clipping every
large deviation instead cost accuracy on bursty devices, whose bursts are tens of standard
deviations (docs/evaluation.md); a glitch here is past the device's whole range by
:data:`~stream_lstm.likelihood.RANGE_ABSURD` times its width, once the device has shown
:data:`GLITCH_WARMUP` readings. The reading is still published
as it came, scored against its forecast and judged anomalous (it is outside the range), and a
second such reading in a row is taken in as it is, with the range (a new regime).

The returned :class:`StepBatch` is everything the engine and the forecast assembly need.

>>> import numpy as np
>>> from stream_lstm.state.table import DeviceTable
>>> t = DeviceTable(max_devices=8, window=4, n_features=1, num_layers=1, hidden_size=2)
>>> b = ingest(t, ["a", "b", "a", "a"], [1.0, 1.0, 2.0, 2.0], np.array([[1.], [5.], [2.], [2.]]),
...            [0, 0, 0, 0], now=10.0, target=0)
>>> b.outcome.tolist()            # the second ("a", 2.0) is a duplicate
[0, 0, 0, 1]
>>> b.rows.tolist(), b.rounds     # round 0: a@1, b@1; round 1: a@2
([0, 1, 2], [(0, 2), (2, 3)])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from stream_lstm.likelihood import beyond_range
from stream_lstm.state.table import DeviceTable

ACCEPTED, DUPLICATE, LATE = 0, 1, 2
# Weight of the newest gap in the sampling-interval estimate (an EWMA).
STEP_ALPHA = 0.1
# Readings a device must have shown before one far outside its range is taken for a glitch.
GLITCH_WARMUP = 1000


@dataclass
class StepBatch:
    """Accepted readings of one poll, ordered by round, with the state they were applied to.

    ``outcome`` is per input reading (``ACCEPTED``, ``DUPLICATE`` or ``LATE``); every other
    array is per accepted reading, in round order, and ``rows`` maps back to input positions.

    Parameters
    ----------
    outcome, rows, slots, rounds
        Each input's outcome; the accepted inputs' positions and slots in round order; each
        round's ``(start, end)`` in those arrays.
    z, x_target, mean_target, scale_target
        Normalized inputs ``[m, F]``; the target channel's value as it came, and the mean and
        scale it was normalized with.
    x_taken, outside, glitch
        The target channel's value the state took in (``x_target``, or for a glitch the
        device's previous one); whether the reading is outside the device's range so far, and
        whether it is a glitch held out of the state.
    reset, n_seen, since_reset, step_s, ts
        Per accepted reading: h/c reset by a gap, the device's counters after it, its
        sampling interval estimate and its event time.
    moved
        ``(slot, old partition)`` of each device whose readings came on another partition
        than its state's (partitions were added to the input): its state is now the new one's.

    Examples
    --------
    >>> t = DeviceTable(max_devices=4, window=4, n_features=1, num_layers=1, hidden_size=2)
    >>> b = ingest(t, ["a", "a"], [1.0, 2.0], np.array([[1.0], [3.0]]), [0, 0], now=0.0, target=0)
    >>> len(b), b.rounds, b.n_seen.tolist(), b.step_s.tolist()
    (2, [(0, 1), (1, 2)], [1, 2], [nan, 1.0])
    """

    outcome: np.ndarray
    rows: np.ndarray
    slots: np.ndarray
    rounds: list[tuple[int, int]]
    z: np.ndarray
    x_target: np.ndarray
    mean_target: np.ndarray
    scale_target: np.ndarray
    reset: np.ndarray
    n_seen: np.ndarray
    since_reset: np.ndarray
    step_s: np.ndarray
    ts: np.ndarray
    x_taken: np.ndarray
    outside: np.ndarray
    glitch: np.ndarray
    moved: list[tuple[int, int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows)


def ingest(
    table: DeviceTable,
    device_ids: Sequence[str],
    ts: Sequence[float],
    values: np.ndarray,
    partitions: Sequence[int],
    now: float,
    target: int,
    max_gap_s: float = 0.0,
) -> StepBatch:
    """Apply readings (arrival order) to ``table`` and return the batch to step.

    Parameters
    ----------
    table
        The in-memory device state, updated in place.
    device_ids, ts, values, partitions
        The decoded readings: ids, event times (epoch s), ``[n, F]`` values, source partitions.
    now
        Wall-clock time (for LRU and TTL).
    target
        Index of the forecast channel.
    max_gap_s
        A gap longer than this resets the device's h/c; 0 disables.

    A device not in ``table`` starts afresh: bring devices that have state elsewhere in first
    (``bring_in.py``).
    """
    n = len(device_ids)
    slot_of = table.slots_for(device_ids, partitions, now)
    outcome = np.zeros(n, np.int64)
    round_of = np.zeros(n, np.int64)
    reset = np.zeros(n, bool)
    # Per-slot event-time bookkeeping within this poll; plain dicts are the fastest here.
    last_ts: dict[int, float] = {}
    seen: dict[int, int] = {}
    table_last = table.last_ts
    for i in range(n):
        slot = int(slot_of[i])
        t = ts[i]
        last = last_ts.get(slot)
        if last is None:
            last = table_last[slot]
        if t <= last:  # NaN (never seen) compares False, so a first reading is accepted
            outcome[i] = DUPLICATE if t == last else LATE
            continue
        if max_gap_s > 0.0 and t - last > max_gap_s:
            reset[i] = True
        last_ts[slot] = t
        r = seen.get(slot, 0)
        seen[slot] = r + 1
        round_of[i] = r

    accepted = np.flatnonzero(outcome == ACCEPTED)
    order = accepted[np.argsort(round_of[accepted], kind="stable")]
    counts = np.bincount(round_of[order]) if len(order) else np.zeros(0, np.int64)
    bounds = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    rounds = [(int(bounds[r]), int(bounds[r + 1])) for r in range(len(counts))]

    slots = slot_of[order]
    x = np.asarray(values, np.float64)[order]
    t_arr = np.asarray(ts, np.float64)[order]
    rst = reset[order]
    part = np.asarray(partitions, np.int64)[order]
    m = len(order)
    batch = StepBatch(
        outcome=outcome, rows=order, slots=slots, rounds=rounds,
        z=np.empty((m, x.shape[1] if x.ndim == 2 else 1), np.float32),
        x_target=x[:, target].copy() if m else np.zeros(0), mean_target=np.empty(m),
        scale_target=np.empty(m), reset=rst,
        n_seen=np.empty(m, np.int64), since_reset=np.empty(m, np.int64),
        step_s=np.empty(m), ts=t_arr, x_taken=x[:, target] if m else np.zeros(0),
        outside=np.zeros(m, bool), glitch=np.zeros(m, bool),
    )
    for start, end in rounds:
        s = slots[start:end]
        keep_glitches_out(table, s, x[start:end], target, batch.outside[start:end], batch.glitch[start:end])
        z, mean, scale = table.norm.update(s, x[start:end])
        batch.z[start:end] = z
        batch.mean_target[start:end] = mean[:, target]
        batch.scale_target[start:end] = scale[:, target]
        table.window.push(s, z)
        gap = t_arr[start:end] - table.last_ts[s]
        old = table.step_s[s]
        table.step_s[s] = np.where(
            np.isnan(gap), old, np.where(np.isnan(old), gap, old + STEP_ALPHA * (gap - old))
        )
        table.last_ts[s] = t_arr[start:end]
        # A device's state belongs to the partition its readings come on: after partitions are
        # added to the input, the producers' partitioner moves some devices, and their state
        # must then be checkpointed (and its replay marked) with the new partition's.
        was, now_on = table.partition[s], part[start:end]
        if (moved := was != now_on).any():
            batch.moved.extend(zip(s[moved].tolist(), was[moved].tolist(), strict=True))
        table.partition[s] = now_on
        table.n_seen[s] += 1
        table.since_reset[s] = np.where(rst[start:end], 1, table.since_reset[s] + 1)
        batch.n_seen[start:end] = table.n_seen[s]
        batch.since_reset[start:end] = table.since_reset[s]
        batch.step_s[start:end] = table.step_s[s]
    return batch


def keep_glitches_out(table: DeviceTable, slots: np.ndarray, x: np.ndarray, target: int,
                      outside: np.ndarray, glitch: np.ndarray) -> None:
    """One round: note which readings are outside their device's range and which are glitches
    (both in place), and put each glitch's device's previous reading (target channel) in its
    place in ``x`` (in place), so that the state never takes it in.

    A device restored from a snapshot written before ``last_value`` existed has none: the
    normalizer's mean stands in.
    """
    value_range, held = table.value_range[slots], table.range_held[slots]
    outside[:] = beyond_range(value_range, x[:, target], held)
    table.value_range[slots], table.range_held[slots] = value_range, held
    # Held out of the range until the next reading confirms it, on a device whose range has
    # had time to mean something: on the 19 NAB recordings, real bursts and level changes come
    # 12 to 1,000 widths past the range of a device's first 1,000 readings, never later.
    glitch[:] = np.isfinite(held) & (table.n_seen[slots] >= GLITCH_WARMUP)
    if glitch.any():
        last = table.last_value[slots]
        last = np.where(np.isnan(last), table.norm.mean[slots, target], last)
        x[:, target] = np.where(glitch, last, x[:, target])
    table.last_value[slots] = x[:, target]
