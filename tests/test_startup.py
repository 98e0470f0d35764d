"""The model a worker starts with when none is given or promoted: a fresh one, with a warning."""

import logging

from stream_lstm.config import Settings
from stream_lstm.startup import load_served_model


def test_empty_registry_serves_a_fresh_model_and_says_so(tmp_path, caplog):
    s = Settings(model_dir=tmp_path / "models", hidden_size=8, horizon=3)
    with caplog.at_level(logging.WARNING, logger="stream_lstm.worker"):
        served = load_served_model(s)
    assert served.version == "v0000-untrained"
    assert (served.spec.hidden_size, served.spec.horizon) == (8, 3)
    assert [r.name for r in caplog.records] == ["stream_lstm.worker"]
    assert "freshly initialized, untrained model" in caplog.records[0].getMessage()
