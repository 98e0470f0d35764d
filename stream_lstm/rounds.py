"""One round of a poll's readings, as the forecast stages (``stages.py``) see it.

``forecast.assemble`` runs the stages round by round (a device at most once a round): each
round is a :class:`Round`, arrays of one row per reading. What a stage can compute for the
whole poll at once (``Stage.prepare``: from the readings and the model's outputs alone) reaches
each round as its rows, in ``Round.prepared``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["RECALLED", "SCORED", "Round", "between", "example_round", "pair"]


def between(ends: np.ndarray, along: np.ndarray) -> np.ndarray:
    """``[rows, H]``: per-row values at h=1 and h=H (``ends[:, 0]``, ``ends[:, 1]``),
    linearly interpolated over the steps in between.

    >>> between(np.array([[1.0, 0.0]]), np.array([0.0, 0.5, 1.0])).tolist()
    [[1.0, 0.5, 0.0]]
    """
    return ends[:, :1] + along * (ends[:, 1:] - ends[:, :1])


def pair(one: np.ndarray, h: np.ndarray) -> np.ndarray:
    """``[rows, 2]``: a per-row value for the one-step forecast beside the H-step one's (the
    two columns a correction keeps), in a dtype both fit.

    >>> pair(np.array([1.0, 2.0]), np.array([3.0, 4.0])).tolist()
    [[1.0, 3.0], [2.0, 4.0]]
    """
    out = np.empty((len(one), 2), np.result_type(one, h))
    out[:, 0], out[:, 1] = one, h
    return out


# What Scores recalls (before any stage learns) and what it scores: NaN until then.
RECALLED = ("expected_1", "b_1", "expected_h", "b_h")
SCORED = ("residual", "anomaly_score", "drift_score", "drift_expected")


@dataclass
class Round:
    """One round of readings, as the stages see it: arrays of one row per reading.

    ``forecast`` and ``b`` start as the model's (``x + change``, its Laplace scale, device
    units) and leave as what is published. :class:`Scores` recalls the forecasts made for
    the reading (``RECALLED``) and writes its scores (``SCORED``).

    Parameters
    ----------
    slots, x, reset, mean, scale, pos, scored_1, scored_h
        ``[r]``: table slots; the reading the state takes in (target channel, device units);
        whether the device's
        state was reset at it; the normalizer's mean and scale there; the ring slot of the
        forecast made H readings ago; past the warm-up, the one-step (H-step) forecast counts.
    mu, change, forecast, b
        ``[r, H]``: the model's change, normalized and in device units; the forecast, its scale.
    along
        ``[H]``: where each step lies between h=1 (0) and h=H (1).
    model_1, experts_state
        Set by the experts: the model's own (blended) one-step forecast made for this reading,
        which the blend learns from (the experts' was published); the experts' rows.
    prepared
        This round's rows of what the stages prepared for the whole poll (``Stage.prepare``).
    actual
        ``[r]``: the reading as it came, which the scores judge; ``x`` unless the reading is a
        glitch the state does not take in (``state/ingest.py``). Default: ``x``.

    >>> r = example_round(np.array([0]), x=10.0, expected_1=11.0)
    >>> r.forecast.tolist(), r.expected_1.tolist(), r.residual.tolist()  # not scored yet
    ([[10.0, 10.0]], [11.0], [nan])
    """

    slots: np.ndarray
    x: np.ndarray
    reset: np.ndarray
    mean: np.ndarray
    scale: np.ndarray
    mu: np.ndarray
    change: np.ndarray
    along: np.ndarray
    pos: np.ndarray
    scored_1: np.ndarray
    scored_h: np.ndarray
    forecast: np.ndarray
    b: np.ndarray
    model_1: np.ndarray | None = None
    experts_state: np.ndarray | None = None
    prepared: dict[str, np.ndarray] = field(default_factory=dict)  # this round's rows of them
    actual: np.ndarray | None = None
    expected_1: np.ndarray = field(init=False)  # [r] the one-step forecast made for this reading ...
    b_1: np.ndarray = field(init=False)  # [r] ... and its scale
    expected_h: np.ndarray = field(init=False)  # [r] the H-step forecast made for this reading ...
    b_h: np.ndarray = field(init=False)  # [r] ... and its scale
    residual: np.ndarray = field(init=False)  # [r] x - expected_1
    anomaly_score: np.ndarray = field(init=False)  # [r]
    drift_score: np.ndarray = field(init=False)  # [r]
    drift_expected: np.ndarray = field(init=False)  # [r] expected_h where it was scored

    def __post_init__(self) -> None:
        if self.actual is None:
            self.actual = self.x
        nan = np.full(len(self.x), np.nan)  # one array: the stages replace these, never write into them
        for name in RECALLED + SCORED:
            setattr(self, name, nan)


def example_round(slots: np.ndarray, x: float, expected_1: float, horizon: int = 2) -> Round:
    """A one-reading round for the examples: the model says "no change", scale 1, scored; the
    one-step forecast recalled for it is ``expected_1``, scale 1."""
    one = np.ones(1)
    r = Round(
        slots=slots, x=one * x, reset=np.zeros(1, bool), mean=one * x, scale=one,
        mu=np.zeros((1, horizon), np.float32), change=np.zeros((1, horizon)),
        along=np.linspace(0.0, 1.0, horizon), pos=np.zeros(1, np.int64), scored_1=np.ones(1, bool),
        scored_h=np.zeros(1, bool), forecast=np.full((1, horizon), x), b=np.ones((1, horizon)),
    )
    r.expected_1, r.b_1 = one * expected_1, one
    return r
