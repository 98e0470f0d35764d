"""The promotion gate: a challenger replaces the champion only if it is clearly better.

Both models are scored on the same held-out sequences with the one-step-ahead MAE of the
target channel in normalized units (:func:`~stream_lstm.training.tbptt.evaluate_mae`). The
challenger is promoted only if its error is finite and beats the champion's by the relative
``margin``: ``challenger < champion * (1 - margin)``. A champion that cannot be scored (its
error is NaN or infinite, e.g. corrupted weights) loses to any finite challenger; an empty
holdout scores NaN, so nothing is promoted without evidence.

>>> decide_from_errors(1.0, 0.9, margin=0.05).promote
True
>>> decide_from_errors(1.0, 0.97, margin=0.05).reason
'challenger 0.9700 does not beat champion 1.0000 by 5%'
>>> decide_from_errors(1.0, float("nan"), margin=0.05).promote
False
>>> decide_from_errors(1.0, 1.0, margin=0.05).reason
"challenger 1.0000 does not beat champion 1.0000 by 5% (the same error: no epoch of training improved on the champion's weights)"
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from stream_lstm.models.lstm import SimpleLSTM
from stream_lstm.training.tbptt import evaluate_mae


@dataclass(frozen=True)
class PromotionDecision:
    """The gate's verdict and the evidence for it.

    Parameters
    ----------
    promote
        Whether the challenger should be served.
    champion_error, challenger_error
        One-step MAE of each on the holdout (normalized units).
    margin
        Relative improvement required.
    reason
        One line for logs and the registry.

    >>> d = decide_from_errors(0.5, 0.4, margin=0.1)
    >>> d.promote, d.reason
    (True, 'challenger 0.4000 beats champion 0.5000 by more than 10%')
    """

    promote: bool
    champion_error: float
    challenger_error: float
    margin: float
    reason: str


def decide_from_errors(champion: float, challenger: float, margin: float) -> PromotionDecision:
    """Apply the rule to two errors already computed (see the module doc)."""
    if not (math.isfinite(margin) and margin >= 0.0):
        raise ValueError(f"margin must be a finite number >= 0, got {margin}")
    champion, challenger = float(champion), float(challenger)
    if not math.isfinite(challenger):
        return PromotionDecision(False, champion, challenger, margin,
                                 f"challenger error is not finite ({challenger})")
    if not math.isfinite(champion):
        return PromotionDecision(True, champion, challenger, margin,
                                 f"champion error is not finite ({champion}); challenger {challenger:.4f}")
    if challenger < champion * (1.0 - margin):
        reason = f"challenger {challenger:.4f} beats champion {champion:.4f} by more than {margin:.0%}"
        return PromotionDecision(True, champion, challenger, margin, reason)
    reason = f"challenger {challenger:.4f} does not beat champion {champion:.4f} by {margin:.0%}"
    if challenger == champion:  # (early stopping kept the starting weights: the champion's own)
        reason += " (the same error: no epoch of training improved on the champion's weights)"
    return PromotionDecision(False, champion, challenger, margin, reason)


def decide(champion: SimpleLSTM, challenger: SimpleLSTM, holdout_seqs: list[np.ndarray],
           margin: float, target: int = 0) -> PromotionDecision:
    """Score both models on ``holdout_seqs`` (normalized ``[T, F]`` sequences) and decide."""
    return decide_from_errors(evaluate_mae(champion, holdout_seqs, target),
                              evaluate_mae(challenger, holdout_seqs, target), margin)
