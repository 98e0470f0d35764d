import torch

from stream_lstm.cli import main as cli
from stream_lstm.models.lstm import ModelSpec, SimpleLSTM
from stream_lstm.models.registry import ModelRegistry

SPEC = ModelSpec(hidden_size=4, horizon=2)


def registry_with_two(path):
    reg = ModelRegistry(path)
    torch.manual_seed(0)
    v1 = reg.register(SimpleLSTM.from_spec(SPEC), SPEC,
                      {"metrics": {"nll": -0.5, "mae": 0.3, "persistence_mae": 0.4}})
    v2 = reg.register(SimpleLSTM.from_spec(SPEC), SPEC,
                      {"parent": v1, "metrics": {"mae": 0.2, "champion_error": 0.3}})
    reg.promote(v2)
    return reg


def test_list_shows_versions_metrics_and_the_promoted_marker(tmp_path, capsys):
    registry_with_two(tmp_path)
    assert cli(["models", "list", "--model-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["version", "parent", "created", "(UTC)", "val", "nll", "val", "mae",
                              "baseline"]
    assert out[1].split()[0] == "v0001" and "0.3000" in out[1] and "0.4000" in out[1]
    assert out[2].split()[:3] == ["*", "v0002", "v0001"]


def test_list_reads_the_directory_from_the_environment(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("STREAM_LSTM_MODEL_DIR", str(tmp_path / "empty"))
    assert cli(["models", "list"]) == 0
    assert "no models in" in capsys.readouterr().out
    registry_with_two(tmp_path / "full")
    monkeypatch.setenv("STREAM_LSTM_MODEL_DIR", str(tmp_path / "full"))
    assert cli(["models", "list"]) == 0
    assert "* v0002" in capsys.readouterr().out


def test_rollback(tmp_path, capsys):
    reg = registry_with_two(tmp_path)
    assert cli(["models", "rollback", "v0001", "--model-dir", str(tmp_path)]) == 0
    assert "promoted v0001 (was v0002)" in capsys.readouterr().out
    assert reg.promoted() == "v0001" and reg.history()[-1]["action"] == "rollback"

    assert cli(["models", "rollback", "v0007", "--model-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no model version 'v0007'" in err and len(err.strip().splitlines()) == 1
    assert cli(["models", "rollback", "--model-dir", str(tmp_path)]) == 2
    assert "give the VERSION" in capsys.readouterr().err
    assert reg.promoted() == "v0001"


def test_rollback_to_a_damaged_version_is_refused(tmp_path, capsys):
    reg = registry_with_two(tmp_path)
    reg.path("v0001").write_bytes(b"\x00" * 10)
    assert cli(["models", "rollback", "v0001", "--model-dir", str(tmp_path)]) == 2
    assert "sha256 mismatch" in capsys.readouterr().err
    assert reg.promoted() == "v0002"
