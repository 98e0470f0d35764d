"""The offline training of ``evaluate`` (recordings and ETTh1): its own recipe, with which
docs/evaluation.md's figures were made, faster and longer than a retrain's. A setting given
explicitly replaces its part (it was ignored, a review)."""

from __future__ import annotations

from typing import Any

RECIPE = {"learning_rate": 3e-3, "early_stopping_patience": 4, "train_batch_size": 16, "max_epochs": 30}


def recipe(settings: Any, epochs: int | None) -> dict[str, Any]:
    """The offline training's learning rate, patience, batch and most epochs: :data:`RECIPE`,
    but for the settings given explicitly (``--epochs`` before ``STREAM_LSTM_MAX_EPOCHS``).

    >>> from stream_lstm.config import Settings
    >>> recipe(Settings(), None)["learning_rate"], recipe(Settings(learning_rate=0.01), 5)
    (0.003, {'learning_rate': 0.01, 'early_stopping_patience': 4, 'train_batch_size': 16, 'max_epochs': 5})
    """
    given = settings.model_fields_set
    out = {k: getattr(settings, k) if k in given else v for k, v in RECIPE.items()}
    return out | ({"max_epochs": epochs} if epochs else {})
