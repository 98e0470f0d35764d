"""The promotion gate: a challenger replaces the champion only if it is clearly better.

Both models are scored on the same held-out recent slice (one-step MAE in normalized units,
see :func:`~stream_lstm.training.tbptt.evaluate`). The challenger must beat the champion by
the relative ``margin``: ``challenger < champion * (1 - margin)``.

>>> decide_from_errors(1.0, 0.9, margin=0.05).promote
True
>>> decide_from_errors(1.0, 0.97, margin=0.05).reason
'challenger 0.9700 does not beat champion 1.0000 by 5%'
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from stream_lstm.models.lstm import SimpleLSTM
from stream_lstm.training.tbptt import evaluate


@dataclass
class PromotionDecision:
    promote: bool
    champion_error: float
    challenger_error: float
    margin: float
    reason: str


def decide_from_errors(champion: float, challenger: float, margin: float) -> PromotionDecision:
    if not math.isfinite(challenger):
        return PromotionDecision(False, champion, challenger, margin, "challenger error is not finite")
    if challenger < champion * (1.0 - margin):
        reason = f"challenger {challenger:.4f} beats champion {champion:.4f} by more than {margin:.0%}"
        return PromotionDecision(True, champion, challenger, margin, reason)
    reason = f"challenger {challenger:.4f} does not beat champion {champion:.4f} by {margin:.0%}"
    return PromotionDecision(False, champion, challenger, margin, reason)


def decide(champion: SimpleLSTM, challenger: SimpleLSTM, holdout: list[np.ndarray],
           margin: float, target: int = 0) -> PromotionDecision:
    """Score both on ``holdout`` (normalized sequences) and decide."""
    return decide_from_errors(evaluate(champion, holdout, target)["mae"],
                              evaluate(challenger, holdout, target)["mae"], margin)
