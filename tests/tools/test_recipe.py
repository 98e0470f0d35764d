"""evaluate's offline training recipe (tools/recipe.py): its own figures, but for the settings
given explicitly, in the environment as in code."""

from stream_lstm.config import load_settings
from stream_lstm.tools.recipe import RECIPE, recipe


def test_the_recipe_is_evaluates_own_unless_a_setting_is_given(monkeypatch):
    assert recipe(load_settings(), None) == RECIPE  # (not the settings' defaults: lr 1e-3, 20 epochs)
    monkeypatch.setenv("STREAM_LSTM_LEARNING_RATE", "0.01")
    monkeypatch.setenv("STREAM_LSTM_MAX_EPOCHS", "7")
    monkeypatch.setenv("STREAM_LSTM_TRAIN_BATCH_SIZE", "4")
    monkeypatch.setenv("STREAM_LSTM_EARLY_STOPPING_PATIENCE", "2")
    got = recipe(load_settings(), None)
    assert got == {"learning_rate": 0.01, "early_stopping_patience": 2, "train_batch_size": 4, "max_epochs": 7}
    assert recipe(load_settings(), 3)["max_epochs"] == 3  # --epochs first
