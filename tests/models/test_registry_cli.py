import time

import pytest
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


def test_list_says_which_versions_cannot_be_served_and_what_it_ignores(tmp_path, capsys):
    """It read the metadata alone: a version whose weights were truncated or gone was listed
    as normal (rollback then refused it), and a PROMOTED of garbage showed nothing promoted."""
    registry_with_two(tmp_path)
    weights = tmp_path / "v0001.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])
    (tmp_path / "v0002.safetensors").unlink()
    (tmp_path / "PROMOTED").write_text("v00zz/../\n")
    assert cli(["models", "list", "v0001", "--publish", "--model-dir", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    out = captured.out.splitlines()
    assert "(weights damaged (sha256 differs))" in out[1] and "(weights missing)" in out[2]
    assert "holds no version name: nothing is promoted" in captured.err
    assert "ignoring VERSION, --publish (rollback's)" in captured.err


def test_list_reads_the_directory_from_the_environment(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("STREAM_LSTM_MODEL_DIR", str(tmp_path / "missing"))
    assert cli(["models", "list"]) == 2  # a mistyped directory is said, not "no models"
    assert "no model directory at" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
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


@pytest.mark.kafka
def test_rollback_publish_sends_the_version_where_following_workers_read(
        tmp_path, capsys, monkeypatch, bootstrap, topic_name):
    # Workers that follow an external trainer serve the models topic, not a registry: the
    # rollback reaches them only through it (partition 0, as the trainer publishes).
    from stream_lstm.config import Settings
    from stream_lstm.kafka.topics import TopicSpec, ensure_topics
    from stream_lstm.training.models_follower import ModelsFollower

    monkeypatch.setenv("STREAM_LSTM_BOOTSTRAP_SERVERS", bootstrap)
    monkeypatch.setenv("STREAM_LSTM_MODELS_TOPIC", topic_name)
    s = Settings()
    ensure_topics(s, [TopicSpec(topic_name, 4, {"cleanup.policy": "compact"})])  # made by someone else
    reg = registry_with_two(tmp_path)
    follower = ModelsFollower(s)
    try:
        assert cli(["models", "rollback", "v0001", "--publish", "--model-dir", str(tmp_path)]) == 0
        assert f"published v0001 to {topic_name}" in capsys.readouterr().out
        got, deadline = None, time.monotonic() + 30
        while got is None and time.monotonic() < deadline:
            got = follower.poll()  # (returns at once: the fetch goes on in the background)
        assert got is not None and got.version == "v0001" and reg.promoted() == "v0001"
        want = reg.load("v0001").model.state_dict()
        assert all(torch.equal(got.model.state_dict()[k], want[k]) for k in want)
    finally:
        follower.close()


@pytest.mark.kafka
def test_rollback_publish_to_a_topic_too_small_for_the_model_says_so(
        tmp_path, capsys, monkeypatch, bootstrap, topic_name):
    from stream_lstm.config import Settings
    from stream_lstm.kafka.topics import TopicSpec, ensure_topics

    monkeypatch.setenv("STREAM_LSTM_BOOTSTRAP_SERVERS", bootstrap)
    monkeypatch.setenv("STREAM_LSTM_MODELS_TOPIC", topic_name)
    ensure_topics(Settings(), [TopicSpec(topic_name, 1, {"cleanup.policy": "compact",
                                                         "max.message.bytes": 200})])  # by hand
    reg = registry_with_two(tmp_path)
    assert cli(["models", "rollback", "v0001", "--publish", "--model-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "v0001 is promoted in the registry but not published" in err
    assert "max.message.bytes" in err and topic_name in err
    assert reg.promoted() == "v0001"


def test_the_table_widens_for_long_version_names():
    from stream_lstm.models.registry_cli import format_table

    lines = format_table([{"version": "v0001", "parent": "v0000-untrained", "metrics": {"mae": 0.2}},
                          {"version": "offline-20261205T101010Z", "metrics": {"mae": 0.3}}], "v0001").splitlines()
    end = lines[0].index("val mae") + len("val mae")  # the column's right edge in the header
    assert [line[end - 6 : end] for line in lines[1:]] == ["0.2000", "0.3000"]  # aligned under it
    assert len({len(line) for line in lines}) == 1


def test_rollback_publish_with_no_broker_says_what_it_did_and_did_not_do(tmp_path, capsys, monkeypatch):
    from stream_lstm.kafka.local_broker import free_port

    monkeypatch.setenv("STREAM_LSTM_BOOTSTRAP_SERVERS", f"127.0.0.1:{free_port()}")
    reg = registry_with_two(tmp_path)
    assert cli(["models", "rollback", "v0001", "--publish", "--model-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "v0001 is promoted in the registry but not published" in err and "cannot connect" in err
    assert reg.promoted() == "v0001"


def test_rollback_to_a_version_of_another_shape_says_running_workers_refuse_it(tmp_path, capsys):
    """It said running workers take it within 5 s: they refuse it, and restarted ones refuse
    to start (a review). Said as `train --registry` says it."""
    reg = registry_with_two(tmp_path)
    other = ModelSpec(hidden_size=4, horizon=6)
    v3 = reg.register(SimpleLSTM.from_spec(other), other, {})
    assert cli(["models", "rollback", v3, "--model-dir", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert out == "promoted v0003 (was v0002)\n"  # (not "running workers ... take it")
    assert err.startswith("models rollback: warning: v0003 is not the shape of v0002, which it "
                          "replaces (horizon 2 -> 6): running workers keep serving v0002 and refuse it")
    assert err.rstrip().endswith("To undo: stream-lstm models rollback v0002")
    assert cli(["models", "rollback", "v0002", "--model-dir", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert "take it within" not in out and "warning" in err  # back again: the same warning, reversed
    assert cli(["models", "rollback", "v0001", "--model-dir", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert "take it within 5 s" in out and err == ""


def test_rollback_on_a_disk_that_refuses_writes_is_one_line(tmp_path, capsys, monkeypatch):
    reg = registry_with_two(tmp_path)

    def full(*_a, **_k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("stream_lstm.models.registry.atomic_write", full)
    assert cli(["models", "rollback", "v0001", "--model-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"models rollback: cannot write in {tmp_path}: No space left on device\n"
    monkeypatch.undo()
    assert reg.promoted() == "v0002"


@pytest.mark.parametrize("created", [1e300, float("inf"), "\x1b[2J\x1b[31mPWNED", [1, 2]])
def test_list_shows_a_creation_time_it_cannot_read_as_a_dash(tmp_path, capsys, created):
    """1e300 was an OverflowError that listed nothing (the tool that picks a rollback target);
    text with escape codes reached the operator's terminal."""
    import json

    registry_with_two(tmp_path)
    meta = tmp_path / "v0001.json"
    meta.write_text(json.dumps(json.loads(meta.read_text()) | {"created_at": created}))
    assert cli(["models", "list", "--model-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out
    (row,) = [line for line in out.splitlines() if line[2:].startswith("v0001 ")]
    assert row.split()[1:3] == ["-", "-"] and "v0002" in out  # (parent, created)
