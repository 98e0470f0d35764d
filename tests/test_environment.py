"""Misspelt settings variables (stream_lstm/environment.py)."""

from stream_lstm.environment import unknown_variables


def test_misspelt_variables_are_named():
    env = {"STREAM_LSTM_WINDOWS": "32", "stream_lstm_horizon": "6", "STREAM_LSTM_CACHE_DIR": "/c",
           "STREAM_LSTM_WINDOW": "32", "PATH": "/bin"}
    assert unknown_variables(env) == ["STREAM_LSTM_WINDOWS"]
