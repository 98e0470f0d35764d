"""The ETTh1 protocol: every test window is scored, on the training rows' scaler."""

import numpy as np
import pytest

from stream_lstm.recordings import load_csv
from stream_lstm.tools.etth1 import etth1_protocol


def test_etth1_protocol_scores_every_test_window_on_the_train_scaler(shared_data, tmp_path, monkeypatch):
    from stream_lstm.config import Settings

    monkeypatch.setenv("STREAM_LSTM_HIDDEN_SIZE", "8")
    csv = shared_data / "ett" / "ETTh1.csv"
    report = etth1_protocol(csv, [24], Settings(), epochs=1)
    h24 = report["h24"]
    assert h24["windows"] == 14400 - 24 - (11520 - 1)  # every forecast whose targets are test rows
    _, x = load_csv(csv, "date", ["OT"])
    xs = (x[:, 0] - x[:8640, 0].mean()) / x[:8640, 0].std()
    persist = np.array([xs[t] - xs[t + 1 : t + 25] for t in range(11519, 14400 - 24)])
    assert h24["persistence_mse"] == pytest.approx(float((persist**2).mean()), rel=1e-9)
    assert 0 < h24["mse"] < 1.0 and 0 < h24["mae"] < 1.0
