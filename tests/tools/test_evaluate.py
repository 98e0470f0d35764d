"""`stream-lstm evaluate` end to end on a short slice of a real recording, via the real broker.

The report's numbers must come from the forecasts topic: one metric is recomputed here
independently, from the records on that topic.
"""

import argparse
import importlib.util
import json

import numpy as np
import pytest

from stream_lstm.kafka.clients import make_consumer
from stream_lstm.recordings import load_csv
from stream_lstm.tools import evaluate

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(300)]


def test_evaluate_report_comes_from_the_forecasts_topic(shared_data, bootstrap, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("STREAM_LSTM_BOOTSTRAP_SERVERS", bootstrap)
    monkeypatch.setenv("STREAM_LSTM_HORIZON", "4")
    monkeypatch.setenv("STREAM_LSTM_HIDDEN_SIZE", "16")
    csv = shared_data / "nab" / "machine_temperature_system_failure.csv"
    peer = importlib.util.find_spec("deep_river") is not None  # `make test` installs it
    args = argparse.Namespace(files=[csv], out=tmp_path, epochs=1, limit=600, etth1=None,
                              horizons=[24], peer=peer)
    assert evaluate.main(args) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    rec = report["recordings"]["machine_temperature_system_failure"]
    assert rec["forecasts_read"] == 600 and report["horizon"] == 4
    for png in report["plots"]:
        assert (tmp_path / png.split("/")[-1]).stat().st_size > 5000
    assert "machine_temperature_system_failure" in capsys.readouterr().out

    # Independently: read the forecasts topic and recompute the one-step MAE on the second half.
    from stream_lstm.config import Settings

    consumer = make_consumer(Settings(bootstrap_servers=bootstrap), report["output_topic"],
                             group_id="independent-check", auto_offset_reset="earliest",
                             isolation_level="read_committed")
    fcs = {}
    while len(fcs) < 600:
        for recs in consumer.poll(timeout_ms=1000).values():
            for r in recs:
                f = json.loads(r.value)
                fcs[f["ts"]] = f["forecast"][0]
    consumer.close()
    ts, x = load_csv(csv)
    ts, x = ts[:600], x[:600, 0]
    errors = [abs(x[i] - fcs[ts[i - 1]]) for i in range(300, 600)]
    assert rec["h1"]["model"]["mae"] == pytest.approx(float(np.mean(errors)), rel=1e-9)
    persistence = [abs(x[i] - x[i - 1]) for i in range(300, 600)]
    assert rec["h1"]["model"]["mase"] == pytest.approx(np.mean(errors) / np.mean(persistence), rel=1e-9)

    if peer:  # the peer ran on the same readings: its MASE is what its forecasts give
        from stream_lstm.tools.peer import peer_one_step

        f = peer_one_step(x)
        peer_errors = [abs(x[i] - f[i]) for i in range(300, 600)]
        assert rec["h1"]["deep_river"]["mase"] == pytest.approx(
            np.mean(peer_errors) / np.mean(persistence), rel=1e-9)


def test_settings_of_several_channels_are_refused_before_any_work(tmp_path, monkeypatch, capsys):
    """The recordings are one value column each: a 1-channel model under N_FEATURES=2 had every
    reading dead-lettered, and the report was NaNs with exit 0 (a review)."""
    monkeypatch.setenv("STREAM_LSTM_N_FEATURES", "2")
    args = argparse.Namespace(files=[tmp_path / "any.csv"], out=tmp_path / "out", epochs=1, limit=0,
                              etth1=None, horizons=[24], peer=False)
    assert evaluate.main(args) == 2
    assert "STREAM_LSTM_N_FEATURES is 2: unset it" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_out_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "taken").write_text("a file")
    args = argparse.Namespace(files=[tmp_path / "any.csv"], out=tmp_path / "taken", epochs=1, limit=0,
                              etth1=None, horizons=[24], peer=False)
    assert evaluate.main(args) == 2
    assert capsys.readouterr().err == (f"evaluate: --out {tmp_path / 'taken'}: cannot be the report "
                                       "directory (File exists)\n")
