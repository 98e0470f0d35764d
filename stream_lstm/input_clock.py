"""How far each partition's input has moved on: the clock the device TTL runs on.

A device is *idle* when its partition's input has moved on ``STREAM_LSTM_DEVICE_TTL_S``
without it. By the wall clock alone a pause of the whole input, a stopped worker or a restart
longer than the TTL made every device look idle, and the first commit after the input resumed
forgot those whose readings had not come in yet (a soak test: 94 of 99 devices after a 45 s
pause with a 30 s TTL). Gating expiry on "the input has flowed for a whole TTL" instead (the
first fix) never forgot anything where readings come in bursts more than half a TTL apart, or
where a worker reads steadily behind (a review). So the input keeps its own time:

- per partition, each turn adds how far its newest Kafka record time moved on since the last
  one it read, but at most a cap: 1.5 times the second longest of its last 64 gaps (``cap_s``,
  a quarter of the TTL, until two gaps are known). A gap that
  recurs is a period: a fleet reporting together every minute moves on a minute a burst. A
  pause of the whole input (or of its producers) is one gap and adds about 1.5 usual gaps; a
  worker reading a backlog or behind adds what its records span; a producer clock ahead by any
  amount adds the cap, once (one far behind moves nothing until the others' times pass it).
  A device that reports every P s can still miss up to ~2P of input time across a pause (its
  last report before, its first after): the TTL should be more than twice the period;
- a partition read to its end (nothing of it queued, :attr:`InputClock.caught_up`) and silent
  this turn moves on with the worker's whole input: its silence is real;
- a record with no timestamp counts as written when it is read.

Devices keep ``last_seen`` in the worker's wall clock (as in their snapshots); the clock keeps,
per partition, when (wall) it reached which input time, so a device's idleness is the input
time that passed since its ``last_seen`` (:meth:`InputClock.idle`). A partition this worker
has read nothing of since it started (or was assigned it) has no time yet: its devices are not
idle. A silent partition moved with the whole input is credited that time, so its next record
does not count the silence twice (a review: live devices of low-rate partitions were
forgotten). A worker whose whole input is silent forgets nobody: a pause and a fleet stopped
for good look the same; its devices go once input flows again.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping

import numpy as np


class InputClock:
    """The input time of each partition, for the device TTL.

    Parameters
    ----------
    cap_s
        The most one turn moves a partition's time on (a quarter of the TTL).
    resolution_s, max_points
        How finely (wall seconds) and how long (points a partition) the history is kept;
        coarser or older reads as less idle, never more.

    Examples
    --------
    >>> clock = InputClock(cap_s=15.0)
    >>> for t in (100.0, 110.0, 120.0):  # partition 0: records written at t, read at t
    ...     clock.saw({0: t}, now=t)
    >>> clock.saw({0: 400.0}, now=400.0)  # after a 280 s pause: 15 s of input time, not 280
    >>> # seen in the turn at 110; before the clock's first turn; in a partition it never read
    >>> clock.idle(np.array([0, 0, 1]), np.array([110.5, 50.0, 50.0])).tolist()
    [25.0, 35.0, 0.0]
    """

    def __init__(self, cap_s: float, resolution_s: float = 1.0, max_points: int = 4096) -> None:
        self.cap_s = cap_s
        self.resolution_s = resolution_s
        self.max_points = max_points
        self.caught_up: set[int] = set()  # partitions read to their end (set by the worker)
        self._newest: dict[int, float] = {}  # the newest record time read, per partition
        self._time: dict[int, float] = {}  # input time, per partition
        self._history: dict[int, _History] = {}  # when (wall) it reached which input time
        self._worker_newest: float | None = None
        # The gaps of the last turns that moved on, per partition (None: the whole input).
        self._gaps: dict[int | None, deque[float]] = {}
        self._last_now = -np.inf

    def _gain(self, key: int | None, newest: float | None, t: float) -> float:
        if newest is None or t <= newest:
            return 0.0
        gaps = self._gaps.setdefault(key, deque(maxlen=64))
        # The cap: 1.5 times the second longest of the last 64 gaps (each counted up to half the
        # TTL): a gap that recurs (a fleet reporting every
        # minute, even read over several turns a burst) is a period and moves on in full; a
        # pause is one gap, and adds only about the input's usual gap. Until two gaps are known
        # (a start, a new partition), a quarter of the TTL. (Third review: the longest gap as
        # the cap let a second pause soon after a first add 0.75 TTL.)
        cap = self.cap_s if len(gaps) < 2 else 1.5 * sorted(gaps)[-2]
        gaps.append(min(t - newest, 2 * self.cap_s))
        return min(t - newest, cap)

    def saw(self, newest: Mapping[int, float], now: float) -> None:
        """A turn read records of these partitions, the newest of each written at ``newest[p]``
        (seconds); call it before their readings are applied (their ``last_seen`` is then at
        or after this turn's point)."""
        if now < self._last_now:  # the wall clock stepped back (NTP, a resumed VM): so does
            step = self._last_now - now  # the history, or new last_seen would read as old
            for history in self._history.values():
                history.walls[: history.n] -= step
        self._last_now = now
        for p, t in newest.items():
            t = min(t, now)  # (a producer clock ahead cannot move the input past now)
            self._advance(p, self._gain(p, self._newest.get(p), t), now)
            self._newest[p] = max(t, self._newest.get(p, t))
        if newest:
            top = min(max(newest.values()), now)
            whole = self._gain(None, self._worker_newest, top)
            self._worker_newest = max(top, self._worker_newest if self._worker_newest is not None else top)
            for p in self.caught_up - newest.keys():
                self._advance(p, whole, now)
                if p in self._newest:  # (credited: its next record's gap must not count it again)
                    self._newest[p] = min(self._newest[p] + whole, now)

    def _advance(self, p: int, gain: float, now: float) -> None:
        h = self._history.get(p) or self._history.setdefault(p, _History())
        self._time[p] = at = self._time.get(p, 0.0) + gain
        if h.n and gain == 0.0:
            return
        if h.n > 1 and now - h.walls[h.n - 1] < self.resolution_s:
            h.times[h.n - 1] = at  # (one point a resolution: reads as less idle, never more)
            return
        h.append(now, at)
        if h.n > self.max_points:
            # The older half's pairs merged (the earlier wall, the later time: less idle, never
            # more): the newer half, ~2 TTL at the resolution the worker sets, stays exact, and
            # a device seen before it is still at least that idle.
            h.merge_oldest(h.n // 4 * 2)

    def keep_only(self, partitions: set[int]) -> None:
        """Forget the time of partitions no longer assigned: assigned again later, one starts
        with no time (its devices wait for its first records), not with an old history."""
        for p in [p for p in self._history if p not in partitions]:
            for kept in (self._history, self._time, self._newest, self._gaps):
                kept.pop(p, None)

    def idle(self, partitions: np.ndarray, last_seen: np.ndarray) -> np.ndarray:
        """Input time (seconds) each device's partition has moved on since its ``last_seen``
        (wall clock); 0 for a partition with no time yet."""
        out = np.zeros(len(partitions))
        if not len(out):  # (np.split would still give one empty group, for no partition)
            return out
        # Grouped by one sort, not a pass over every device a partition (256 partitions and
        # 50k devices: 134 ms a sweep, most of it those passes).
        order = np.argsort(partitions, kind="stable")
        keys, starts = np.unique(partitions[order], return_index=True)
        for p, rows in zip(keys.tolist(), np.split(order, starts[1:]), strict=True):
            h = self._history.get(p)
            if h is None or not h.n:
                continue
            at = np.searchsorted(h.walls[: h.n], last_seen[rows], side="right") - 1
            out[rows] = h.times[h.n - 1] - h.times[np.maximum(at, 0)]
        return out


class _History:
    """One partition's points (wall clock, input time), oldest first, in arrays grown in place:
    a sweep reads them as they are (as lists, converting them was 101 of its 117 ms at 256
    partitions of 4,096 points)."""

    __slots__ = ("n", "times", "walls")

    def __init__(self) -> None:
        self.walls, self.times, self.n = np.empty(16), np.empty(16), 0

    def append(self, wall: float, time: float) -> None:
        if self.n == len(self.walls):
            self.walls, self.times = np.resize(self.walls, 2 * self.n), np.resize(self.times, 2 * self.n)
        self.walls[self.n], self.times[self.n] = wall, time
        self.n += 1

    def merge_oldest(self, n: int) -> None:
        """The first ``n`` (even) points as ``n / 2``: each pair's earlier wall, later time."""
        half, end = n // 2, self.n
        for points, first in ((self.walls, 0), (self.times, 1)):
            points[:half] = points[first:n:2].copy()
            points[half : end - half] = points[n:end].copy()
        self.n = end - half
