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
        self._walls: dict[int, list[float]] = {}  # when (wall) ...
        self._times: dict[int, list[float]] = {}  # ... it reached which input time
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
            for walls in self._walls.values():
                walls[:] = [w - step for w in walls]
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
        walls, times = self._walls.setdefault(p, []), self._times.setdefault(p, [])
        self._time[p] = at = self._time.get(p, 0.0) + gain
        if walls and gain == 0.0:
            return
        if len(walls) > 1 and now - walls[-1] < self.resolution_s:
            times[-1] = at  # (one point a resolution: reads as less idle, never more)
            return
        walls.append(now)
        times.append(at)
        if len(walls) > self.max_points:
            # The older half's pairs merged (the earlier wall, the later time: less idle, never
            # more): the newer half, ~2 TTL at the resolution the worker sets, stays exact, and
            # a device seen before it is still at least that idle.
            n = len(walls) // 4 * 2
            walls[:n], times[:n] = walls[0:n:2], times[1:n:2]

    def keep_only(self, partitions: set[int]) -> None:
        """Forget the time of partitions no longer assigned: assigned again later, one starts
        with no time (its devices wait for its first records), not with an old history."""
        for p in [p for p in self._walls if p not in partitions]:
            for kept in (self._walls, self._times, self._time, self._newest, self._gaps):
                kept.pop(p, None)

    def idle(self, partitions: np.ndarray, last_seen: np.ndarray) -> np.ndarray:
        """Input time (seconds) each device's partition has moved on since its ``last_seen``
        (wall clock); 0 for a partition with no time yet."""
        out = np.zeros(len(partitions))
        for p in np.unique(partitions).tolist():
            if not self._walls.get(p):
                continue
            rows = partitions == p
            walls, times = np.asarray(self._walls[p]), np.asarray(self._times[p])
            at = np.searchsorted(walls, last_seen[rows], side="right") - 1
            out[rows] = times[-1] - times[np.maximum(at, 0)]
        return out
