"""NAB scoring of a whole corpus, and the threshold optimiser (per-file scoring: ``nab.py``).

A corpus is scored as NAB does: the raw scores of its files are summed and normalised between
the null detector (never fires) and the perfect one (``tp`` for each scored window, as a
detection at its first row earns).
The optimiser sweeps thresholds and keeps the best, as NAB's own optimiser does for each
detector before its published figures.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from stream_lstm.tools.nab import (
    PROBATION_PERCENT,
    STANDARD,
    FileScore,
    Profile,
    label_rows,
    normalised,
    score_labelled,
)


@dataclass(frozen=True)
class CorpusScore:
    """A corpus's NAB score at one threshold (see :func:`score_corpus`).

    Parameters
    ----------
    profile, threshold
        What it was scored with: rows with a score ``>= threshold`` were detections.
    raw, null, perfect
        The raw score, and that of never firing / of ``tp`` for each scored window;
        :attr:`score` is the normalised score.
    files
        Each file's :class:`FileScore`.

    Examples
    --------
    >>> ts = np.arange(10.0)
    >>> corpus = score_corpus({"a": (ts, ts / 10, [(4.0, 6.0)])}, STANDARD, 0.6)
    >>> corpus.files["a"].false_alerts, round(corpus.raw, 4), round(corpus.score, 2)
    (3, 0.3798, 68.99)
    """

    profile: Profile
    threshold: float
    raw: float
    null: float
    perfect: float
    files: dict[str, FileScore] = field(repr=False)

    @property
    def score(self) -> float:
        """The normalised score: 0 for the null detector, 100 for the perfect one."""
        return normalised(self.raw, self.null, self.perfect)


def _labelled(files: Mapping[str, tuple], probation_percent: float):
    for name, (ts, scores, windows) in files.items():
        scores = np.asarray(scores, np.float64)
        labels = label_rows(ts, windows, probation_percent=probation_percent)
        if scores.shape != labels.window.shape:
            raise ValueError(f"{name}: {len(scores)} scores for {len(labels.window)} rows")
        yield name, labels, scores


def score_corpus(files: Mapping[str, tuple], profile: Profile = STANDARD,
                 threshold: float = 0.5, *,
                 probation_percent: float = PROBATION_PERCENT) -> CorpusScore:
    """NAB's score of a corpus at one threshold.

    Parameters
    ----------
    files
        ``name -> (ts, scores, windows)``: timestamps in file order, anomaly scores,
        labelled ``(start, end)`` windows.
    profile
        One of :data:`PROFILES`.
    threshold
        Scores ``>= threshold`` are detections.

    Examples
    --------
    >>> ts = np.arange(10.0)
    >>> score_corpus({"a": (ts, ts == 4, [(4.0, 6.0)])}, threshold=1, probation_percent=0).score
    100.0
    """
    per_file, raw, null, perfect = {}, 0.0, 0.0, 0.0
    for name, labels, scores in _labelled(files, probation_percent):
        # Non-finite scores never detect (nab.py), as threshold_curve leaves them out: else
        # +inf would fire even at the threshold inf, "fire on nothing".
        per_file[name] = score_labelled(labels, np.isfinite(scores) & (scores >= threshold), profile)
        raw += per_file[name].raw
        null += score_labelled(labels, np.zeros(len(scores), bool), profile).raw
        # NAB's perfect: tp for each scored window, not a detection at its first row, which
        # would be ignored (a miss) where the window starts within the probation.
        perfect += profile.tp * int(labels.scored.sum())
    return CorpusScore(profile, float(threshold), raw, null, perfect, per_file)


def threshold_curve(files: Mapping[str, tuple], profile: Profile = STANDARD, *,
                    probation_percent: float = PROBATION_PERCENT
                    ) -> tuple[np.ndarray, np.ndarray]:
    """The corpus's raw score at every candidate threshold, highest threshold first.

    Candidates: ``inf`` and every distinct finite score of a scored row. Going down the rows by
    score, a row outside windows changes the total by its value, a row in a window by the rise
    of that window's value if it is the window's earliest row so far, else by nothing: one sort
    and one cumulative sum, O(N log N).

    Parameters
    ----------
    files, profile
        As for :func:`score_corpus`.

    Examples
    --------
    >>> ts = np.arange(10.0)
    >>> scores = np.array([0, 0, 0, 0.3, 0.2, 0.9, 0, 0.4, 0, 0])
    >>> thresholds, raw = threshold_curve({"a": (ts, scores, [(4.0, 6.0)])}, probation_percent=0)
    >>> thresholds.tolist(), raw.round(4).tolist()
    ([inf, 0.9, 0.4, 0.3, 0.2, 0.0], [-1.0, 0.9437, 0.8504, 0.7404, 0.7967, 0.2483])
    """
    keys, deltas, base = [np.zeros(0)], [np.zeros(0)], 0.0
    for _, labels, scores in _labelled(files, probation_percent):
        rows = np.flatnonzero((np.arange(len(scores)) >= labels.probation) & np.isfinite(scores))
        values = labels.row_values(profile)[rows]
        window = labels.window[rows]
        delta = np.where(window < 0, values, 0.0)
        base -= profile.fn * int(labels.scored.sum())
        # Rows in windows by window, then score descending, then row. A row sets its window's
        # value when its key ``window * big - row`` is a new running maximum (every key of a
        # later window is larger, so the running maximum starts afresh at each window).
        inside = np.flatnonzero(window >= 0)
        order = inside[np.lexsort((rows[inside], -scores[rows[inside]], window[inside]))]
        key = window[order] * (len(scores) + 1) - rows[order]
        setter = order[key == np.maximum.accumulate(key)] if order.size else order
        first_setter = np.r_[True, window[setter][1:] != window[setter][:-1]]
        before = np.where(first_setter, -profile.fn, np.r_[0.0, values[setter][:-1]])
        delta[setter] = values[setter] - before
        keys.append(scores[rows])
        deltas.append(delta)
    key_all = np.concatenate(keys)
    order = np.argsort(-key_all, kind="stable")
    key_all, totals = key_all[order], base + np.cumsum(np.concatenate(deltas)[order])
    last_of_value = np.r_[key_all[1:] != key_all[:-1], True][:len(key_all)]
    return np.r_[np.inf, key_all[last_of_value]], np.r_[base, totals[last_of_value]]


def optimise_threshold(files: Mapping[str, tuple], profile: Profile = STANDARD, *,
                       probation_percent: float = PROBATION_PERCENT
                       ) -> tuple[float, CorpusScore]:
    """The one threshold that maximises the corpus's NAB score, exactly.

    The best of :func:`threshold_curve`; of equal scores, the highest threshold (as NAB).

    Parameters
    ----------
    files, profile
        As for :func:`score_corpus`. Returns ``(threshold, score_corpus(..., threshold))``.

    Examples
    --------
    >>> ts = np.arange(10.0)
    >>> scores = np.array([0, 0, 0, 0.3, 0.2, 0.9, 0, 0.4, 0, 0])
    >>> threshold, corpus = optimise_threshold({"a": (ts, scores, [(4.0, 6.0)])},
    ...                                        probation_percent=0)
    >>> threshold, round(corpus.raw, 4), corpus.files["a"].windows_hit
    (0.9, 0.9437, 1)
    """
    thresholds, totals = threshold_curve(files, profile, probation_percent=probation_percent)
    threshold = float(thresholds[int(np.argmax(totals))])   # the first maximum: the highest
    return threshold, score_corpus(files, profile, threshold, probation_percent=probation_percent)
