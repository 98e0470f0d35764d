"""The GPU check (tools/gpu_check.py) runs end to end where there is no GPU, with --device cpu
at a small scale: continuity (the CPU against itself: 0), engine, pipeline, the worker through
the real broker (in-process, then two `stream-lstm run` processes), the JSON line and the
report."""

import argparse
import json

import pytest

from stream_lstm.tools import gpu_check

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(300)]


def test_the_check_runs_on_the_cpu(tmp_path, capsys, bootstrap, monkeypatch):
    monkeypatch.setenv("STREAM_LSTM_BOOTSTRAP_SERVERS", bootstrap)
    monkeypatch.setenv("STREAM_LSTM_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("STREAM_LSTM_MODEL_DIR", str(tmp_path / "models"))
    args = argparse.Namespace(device="cpu", devices=5000, pipeline_devices=500, skip_kafka=False,
                              worker_readings=3000, worker_devices=300, worker_processes=2,
                              report=tmp_path / "report.md")
    assert gpu_check.main(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["device"] == "cpu" and result["continuity_ok"] and result["continuity_max_diff"] == 0.0
    assert result["engine_devices"] == 5000 and result["engine_steps_per_s"] > 0
    assert 0 < result["pipeline_engine_share"] < 1 and result["pipeline_msgs_per_s"] > 0
    assert result["worker_msgs_per_s"] > 0
    assert result["worker_n_processes"] == 2 and result["worker_n_msgs_per_s"] > 0
    assert "| engine_steps_per_s |" in (tmp_path / "report.md").read_text()


def test_without_cuda_a_cuda_check_says_so(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    args = argparse.Namespace(device="cuda", devices=10, pipeline_devices=10, skip_kafka=True,
                              worker_readings=0, worker_devices=0, worker_processes=None, report=None)
    assert gpu_check.main(args) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_a_bad_variable_is_one_line_before_any_figure(monkeypatch, capsys):
    """It was pydantic's traceback, after the figures that did not read it had run."""
    from stream_lstm.cli import main

    monkeypatch.setenv("STREAM_LSTM_HORIZON", "twelve")
    assert main(["gpu-check", "--device", "cpu", "--skip-kafka"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == ("gpu-check: invalid setting STREAM_LSTM_HORIZON: Input should be a "
                                 "valid integer, unable to parse string as an integer\n")


def test_what_it_could_not_honour_is_said_before_any_figure(tmp_path, capsys):
    """A report it cannot write failed with a traceback after every figure (on a GPU machine,
    the device time spent); --device tpu was torch's traceback; --devices 0 measured nothing
    (a review)."""
    from stream_lstm.cli import main

    assert main(["gpu-check", "--device", "cpu", "--skip-kafka", "--report", str(tmp_path / "no" / "r.md")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == f"gpu-check: --report {tmp_path / 'no' / 'r.md'}: cannot write there\n"
    (tmp_path / "afile").write_text("")  # (a file where its directory belongs)
    assert main(["gpu-check", "--device", "cpu", "--skip-kafka", "--report", str(tmp_path / "afile" / "r.md")]) == 2
    assert capsys.readouterr().err.endswith("cannot write there\n")
    for bad in (["--device", "tpu"], ["--devices", "0"], ["--pipeline-devices", "-5"]):
        with pytest.raises(SystemExit):
            main(["gpu-check", *bad])
        err = capsys.readouterr().err
        assert "invalid choice" in err or "is not a whole number of 1 or more" in err, err
