"""The Numenta Anomaly Benchmark's scoring (NAB v1.1), in plain numpy: no Kafka, no torch.

Reference: A. Lavin and S. Ahmad, "Evaluating Real-time Anomaly Detection Algorithms - the
Numenta Anomaly Benchmark", IEEE ICMLA 2015; NAB's code, https://github.com/numenta/NAB
(``nab/sweeper.py``: per-row scores and the threshold sweep; ``nab/optimizer.py``,
``nab/scorer.py``, ``nab/runner.py``: normalisation; ``config/profiles.json``). A rewrite of
those semantics, not a copy of the code.

* The first ``min(floor(0.15 n), 0.15 * 5000)`` rows of a file (in file order) are not scored.
* A window ``(start, end)`` covers the rows from the one at ``start`` to the one at ``end``;
  its width ``w`` counts them all. A detection (score ``>= threshold``) at row ``i`` is worth,
  with ``sigma(y) = 2 / (1 + exp(5 y)) - 1`` (``-1`` for ``y > 3``): in a window ending at row
  ``r``, ``tp * sigma(-(r - i + 1) / w) / sigma(-1)`` (``tp`` at its first row, about
  ``tp * 2.5 / w`` at its last); after a window, ``fp * sigma((i - r) / (w - 1))``; before the
  first window, ``-fp``. A window counts once, with its best (earliest) detection, and costs
  ``-fn`` without one; every false alert counts. Non-finite scores never detect.
* Corpus raw score: the sum over files; reported score ``100 (raw - null) / (perfect - null)``:
  *null* never fires (``-fn`` a window), *perfect* earns ``tp`` a window (what a detection at
  its first row earns; ``tp`` too, as in NAB, where that row is within the probation).
* One threshold for the corpus, the best one (of equal ones, the highest, as in NAB).

Unlike NAB's code: NAB's perfect score is ``tp x (labelled windows)``, the same unless a window
ends within the probation (none of NAB's 116 does); NAB requires windows' ends to be timestamps
of the file (here: the first row at or after ``start``, the last up to ``end``); NAB's sweep
starts at 1.1 (its scores lie in [0, 1]), here "fire on nothing" is ``inf``; after a one-row
window NAB divides by ``w - 1 = 0``, here by ``max(w - 1, 1)``.

Every scoring function takes ``probation_percent`` (NAB's 0.15) as a keyword argument.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from stream_lstm.tools.scoring import nab_windows

__all__ = ["PROFILES", "FileLabels", "FileScore", "Profile", "label_rows", "nab_windows",
           "normalised", "probation_length", "scaled_sigmoid", "score_file", "score_labelled"]

PROBATION_PERCENT = 0.15


@dataclass(frozen=True)
class Profile:
    """A NAB application profile (``config/profiles.json``): weights of hits, false alerts, misses.

    Parameters
    ----------
    name
        The profile's name.
    tp, fp, fn
        What a detection at a window's first row earns, a false alert far from any window
        costs, a window without a detection costs.

    Examples
    --------
    >>> PROFILES["reward_low_FN_rate"]
    Profile(name='reward_low_FN_rate', tp=1.0, fp=0.11, fn=2.0)
    """

    name: str
    tp: float
    fp: float
    fn: float


PROFILES: dict[str, Profile] = {p.name: p for p in (
    Profile("standard", tp=1.0, fp=0.11, fn=1.0),
    Profile("reward_low_FP_rate", tp=1.0, fp=0.22, fn=1.0),
    Profile("reward_low_FN_rate", tp=1.0, fp=0.11, fn=2.0),
)}
STANDARD = PROFILES["standard"]


def scaled_sigmoid(y):
    """NAB's scaled sigmoid ``2 / (1 + exp(5 y)) - 1``, and ``-1`` for ``y > 3``.

    ``y`` is a relative position (number or array): -1 at a window's first row, 0 past its end.

    Examples
    --------
    >>> round(scaled_sigmoid(-1.0), 5), scaled_sigmoid(0.0), round(scaled_sigmoid(1.0), 5)
    (0.98661, 0.0, -0.98661)
    >>> scaled_sigmoid(np.array([3.5, np.inf])).tolist()
    [-1.0, -1.0]
    """
    y = np.asarray(y, np.float64)
    out = np.where(y > 3.0, -1.0, 2.0 / (1.0 + np.exp(5.0 * np.minimum(y, 4.0))) - 1.0)
    return float(out) if out.ndim == 0 else out


MAX_TP = scaled_sigmoid(-1.0)  # a detection at a window's first row, scaled to be worth tp


def probation_length(n_rows: int, percent: float = PROBATION_PERCENT) -> int:
    """How many leading rows of an ``n_rows`` file are not scored: ``min(floor(0.15 n), 750)``.

    Examples
    --------
    >>> probation_length(4032), probation_length(22695), probation_length(10)
    (604, 750, 1)
    """
    return math.ceil(min(math.floor(percent * n_rows), percent * 5000))


@dataclass(frozen=True)
class FileLabels:
    """One file's rows against its windows (see :func:`label_rows`).

    Parameters
    ----------
    probation
        Rows ``0 .. probation - 1`` are not scored.
    window, position
        For each row, the number of the window holding it (or -1), and NAB's relative
        position: ``-(r - i + 1) / w`` in a window, ``(i - r) / (w - 1)`` after one, ``inf``
        before the first.
    bounds
        ``(first_row, last_row)`` of each window.

    Examples
    --------
    >>> labels = label_rows(np.arange(10.0), [(4.0, 6.0)], probation_percent=0.0)
    >>> labels.window.tolist()
    [-1, -1, -1, -1, 0, 0, 0, -1, -1, -1]
    >>> labels.row_values(PROFILES["standard"]).round(3).tolist()
    [-0.11, -0.11, -0.11, -0.11, 1.0, 0.944, 0.692, -0.093, -0.109, -0.11]
    """

    probation: int
    window: np.ndarray
    position: np.ndarray
    bounds: tuple[tuple[int, int], ...]

    @property
    def scored(self) -> np.ndarray:
        """For each window, whether any of its rows is past probation (else it is ignored)."""
        return np.array([last >= self.probation for _, last in self.bounds], bool)

    def row_values(self, profile: Profile) -> np.ndarray:
        """What a detection at each row is worth under ``profile``, on its own."""
        sigma = scaled_sigmoid(self.position)
        return np.where(self.window >= 0, profile.tp * sigma / MAX_TP, profile.fp * sigma)


def label_rows(ts, windows: Sequence[tuple[float, float]], *,
               probation_percent: float = PROBATION_PERCENT) -> FileLabels:
    """Place a file's windows on its rows.

    Parameters
    ----------
    ts
        The rows' timestamps (epoch seconds), in file order.
    windows
        ``(start, end)`` epoch seconds, e.g. from :func:`nab_windows`, in time order. A window
        runs from the first row at or after ``start`` (after the previous window) to the first
        row at ``end`` (or the row before the first one past it).

    Examples
    --------
    >>> label_rows([0.0, 60.0, 120.0, 180.0], [(60.0, 120.0)], probation_percent=0.0).bounds
    ((1, 2),)
    """
    ts = np.asarray(ts, np.float64)
    n = len(ts)
    window = np.full(n, -1, np.int64)
    position = np.full(n, np.inf)
    bounds: list[tuple[int, int]] = []
    for k, (start, end) in enumerate(windows):
        cursor = bounds[-1][1] + 1 if bounds else 0
        at_start = np.flatnonzero(ts[cursor:] >= start)
        first = cursor + int(at_start[0]) if at_start.size else n
        if end < start or first == n or ts[first] > end:
            raise ValueError(f"window {k} {(start, end)} holds no row of the file"
                             + (" after the previous window" if k else ""))
        at_end = np.flatnonzero(ts[first:] >= end)      # NAB: the first row at ``end``
        last = first + int(at_end[0]) if at_end.size else n - 1
        last -= int(ts[last] > end)
        width = last - first + 1
        window[first:last + 1] = k
        position[first:last + 1] = -(last - np.arange(first, last + 1) + 1) / width
        position[last + 1:] = np.arange(1, n - last) / max(width - 1, 1)  # until the next one
        bounds.append((first, last))
    return FileLabels(probation_length(n, probation_percent), window, position, tuple(bounds))


@dataclass(frozen=True)
class FileScore:
    """One file's NAB score at one threshold.

    Parameters
    ----------
    raw
        The file's raw score.
    windows_hit, windows_missed
        Scored windows with / without a detection (a window wholly in probation is neither).
    false_alerts
        Detections outside every window, after probation (NAB's ``FP``).
    tp_rows, fn_rows, tn_rows
        NAB's other row counts after probation: detected / undetected rows in windows,
        undetected rows outside.

    Examples
    --------
    >>> fs = score_file(np.arange(10.0), np.arange(10) >= 5, [(4.0, 6.0)], probation_percent=0.0)
    >>> round(fs.raw, 4), fs.windows_hit, fs.false_alerts, fs.tp_rows, fs.fn_rows, fs.tn_rows
    (0.632, 1, 3, 2, 1, 4)
    """

    raw: float
    windows_hit: int
    windows_missed: int
    false_alerts: int
    tp_rows: int
    fn_rows: int
    tn_rows: int


def score_labelled(labels: FileLabels, detections, profile: Profile = STANDARD) -> FileScore:
    """Score one file's detections (a boolean per row) against its :class:`FileLabels`."""
    detections = np.asarray(detections, bool)
    if detections.shape != labels.window.shape:
        raise ValueError(f"{detections.shape} detections for {labels.window.shape} rows")
    values = labels.row_values(profile)
    scored_row = np.arange(len(detections)) >= labels.probation
    inside = labels.window >= 0
    tp = detections & scored_row & inside
    fp = detections & scored_row & ~inside
    best = np.full(len(labels.bounds), -profile.fn)
    np.maximum.at(best, labels.window[tp], values[tp])
    hit = np.zeros(len(labels.bounds), bool)
    hit[labels.window[tp]] = True
    scored = labels.scored
    return FileScore(
        raw=float(best[scored].sum() + values[fp].sum()),
        windows_hit=int(hit.sum()), windows_missed=int((scored & ~hit).sum()),
        false_alerts=int(fp.sum()), tp_rows=int(tp.sum()),
        fn_rows=int((scored_row & inside & ~detections).sum()),
        tn_rows=int((scored_row & ~inside & ~detections).sum()))


def score_file(ts, detections, windows: Sequence[tuple[float, float]],
               profile: Profile = STANDARD, *,
               probation_percent: float = PROBATION_PERCENT) -> FileScore:
    """NAB's score of one file's detections.

    Parameters
    ----------
    ts, windows
        As for :func:`label_rows`.
    detections
        A boolean per row: did the detector fire there.
    profile
        One of :data:`PROFILES`.

    Examples
    --------
    >>> ts = np.arange(10.0)
    >>> score_file(ts, ts == 4, [(4.0, 6.0)], probation_percent=0.0).raw   # the first row
    1.0
    >>> score_file(ts, ts < 0, [(4.0, 6.0)], probation_percent=0.0).windows_missed
    1
    """
    labels = label_rows(ts, windows, probation_percent=probation_percent)
    return score_labelled(labels, detections, profile)


def normalised(raw: float, null: float, perfect: float) -> float:
    """NAB's reported score: ``100 * (raw - null) / (perfect - null)``.

    Examples
    --------
    >>> round(normalised(46.6344501971, -116.0, 116.0), 3)   # NAB's numenta, standard profile
    70.101
    """
    if perfect == null:
        raise ValueError("the perfect and null scores are equal: no window is scored")
    return 100.0 * (raw - null) / (perfect - null)
