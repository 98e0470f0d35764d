"""The model a worker starts with when none is given or promoted: a fresh one, with a warning."""

import logging

import torch

from stream_lstm.config import Settings
from stream_lstm.models.serving import load_served_model


def test_empty_registry_serves_a_fresh_model_and_says_so(tmp_path, caplog):
    s = Settings(model_dir=tmp_path / "models", hidden_size=8, horizon=3)
    with caplog.at_level(logging.WARNING, logger="stream_lstm.worker"):
        served = load_served_model(s)
    assert served.version == "v0000-untrained"
    assert (served.spec.hidden_size, served.spec.horizon) == (8, 3)
    assert [r.name for r in caplog.records] == ["stream_lstm.worker"]
    assert caplog.records[0].getMessage().endswith("serving an untrained model, freshly initialized")


def test_a_host_serves_one_untrained_model_across_restarts_and_processes(tmp_path, caplog):
    """``v0000-untrained`` names one set of weights on a host (a checkpoint names a version):
    a worker that starts again, or a sibling process, serves the untrained model kept
    beside the registry. Another model directory is another host's: since 2026-12-06 it holds
    the same weights (an untrained model's follow from its shape)."""
    s = Settings(model_dir=tmp_path / "models", hidden_size=8, horizon=3)
    first = load_served_model(s)
    caplog.clear()  # (logged too when an earlier test's configure_logging left INFO on)
    with caplog.at_level(logging.INFO, logger="stream_lstm.worker"):
        again = load_served_model(s)
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("serving model")]
    # Not "freshly initialized" again (a soak test read the two lines as contradicting):
    assert any(r.getMessage().endswith("serving an untrained model, the one this host kept")
               for r in caplog.records)
    weights = [m.model.state_dict() for m in (first, load_served_model(s), again)]
    assert all(torch.equal(w[k], weights[0][k]) for w in weights for k in w)
    assert line == f"serving model v0000-untrained from this host's untrained model (kept in {tmp_path / 'models'}/served)"
    other = load_served_model(Settings(model_dir=tmp_path / "elsewhere", hidden_size=8, horizon=3))
    assert torch.equal(other.model.state_dict()["head.weight"], weights[0]["head.weight"])


def _promote_12_step_model(model_dir):
    from stream_lstm.models.registry import ModelRegistry
    from stream_lstm.models.serving import fresh_model

    twelve = fresh_model(Settings(hidden_size=8, horizon=12))
    registry = ModelRegistry(model_dir)
    version = registry.register(twelve.model, twelve.spec, {})
    registry.promote(version)
    return version


def test_the_served_model_and_its_source_are_logged(tmp_path, caplog):
    version = _promote_12_step_model(tmp_path / "models")
    s = Settings(model_dir=tmp_path / "models", hidden_size=8, horizon=12)
    with caplog.at_level(logging.INFO, logger="stream_lstm.worker"):
        served = load_served_model(s)
    assert served.version == version
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("serving model")]
    assert line == f"serving model {version} from the registry {tmp_path / 'models'} (promoted)"


def test_a_promoted_model_with_another_horizon_is_refused(tmp_path):
    import pytest

    from stream_lstm.models.serving import ModelSettingsMismatch

    _promote_12_step_model(tmp_path / "models")
    with pytest.raises(ModelSettingsMismatch, match="has horizon=12, but STREAM_LSTM_HORIZON=6") as refused:
        load_served_model(Settings(model_dir=tmp_path / "models", hidden_size=8, horizon=6))
    # (the hint was compared with the bare "the registry", never the source as named: never said)
    assert f"(from the registry {tmp_path / 'models'} (promoted))" in str(refused.value)
    assert str(refused.value).endswith("or `stream-lstm models rollback` to an earlier version)")


def test_a_model_of_another_size_is_served_with_a_warning(tmp_path, caplog):
    _promote_12_step_model(tmp_path / "models")
    with caplog.at_level(logging.WARNING, logger="stream_lstm.worker"):
        served = load_served_model(Settings(model_dir=tmp_path / "models", hidden_size=64, horizon=12))
    assert served.spec.hidden_size == 8
    assert any("keeps its own hidden_size=8" in r.getMessage() for r in caplog.records)


def test_a_model_trained_under_another_normalisation_is_served_with_a_warning(caplog):
    """Its inputs are scaled otherwise than in training until a retrain here: said at start
    (it was served without a word, a review). The EWM weight counts only under EWM."""
    from stream_lstm.models.lstm import LoadedModel
    from stream_lstm.models.serving import check_model_matches_settings, fresh_model
    from stream_lstm.training.retrainer import job_params

    model, spec, _ = fresh_model(Settings(hidden_size=8))

    def warned(trained: Settings, served_by: Settings) -> list[str]:
        caplog.clear()
        meta = {"version": "v0003", "settings": job_params(trained)}  # (what a retrain records)
        with caplog.at_level(logging.WARNING, logger="stream_lstm.worker"):
            check_model_matches_settings(LoadedModel(model, spec, meta), served_by, "the registry")
        return [r.getMessage() for r in caplog.records]

    (line,) = warned(Settings(hidden_size=8, normalizer="welford"), Settings(hidden_size=8))
    assert line.startswith("the served model v0003 was trained on readings normalised with "
                           "normalizer=welford, std_floor=0.001, this worker normalises with "
                           "normalizer=ewm, normalizer_alpha=0.02, std_floor=0.001")
    assert warned(Settings(hidden_size=8, normalizer_alpha=0.05), Settings(hidden_size=8)) != []
    assert warned(Settings(hidden_size=8), Settings(hidden_size=8)) == []
    assert warned(Settings(hidden_size=8, normalizer="welford"),
                  Settings(hidden_size=8, normalizer="welford")) == []


def test_run_refuses_at_start_with_one_clear_line(tmp_path):
    """Through the CLI a user runs: exit 2, the reason on stderr, no traceback, no broker needed."""
    import os
    import subprocess
    import sys

    _promote_12_step_model(tmp_path / "models")
    env = dict(os.environ, STREAM_LSTM_MODEL_DIR=str(tmp_path / "models"), STREAM_LSTM_HORIZON="6",
               STREAM_LSTM_HIDDEN_SIZE="8", STREAM_LSTM_STATE_DIR=str(tmp_path / "state"),
               STREAM_LSTM_METRICS_PORT="0", STREAM_LSTM_BOOTSTRAP_SERVERS="127.0.0.1:1")
    done = subprocess.run([sys.executable, "-m", "stream_lstm.cli", "run"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "run: the served model" in done.stderr and "STREAM_LSTM_HORIZON=6" in done.stderr
    assert "Traceback" not in done.stderr


def test_default_directories_are_named_after_the_group():
    a, b = Settings(group_id="plant-a"), Settings(group_id="plant-b")
    assert a.model_dir != b.model_dir and a.state_dir != b.state_dir
    assert "plant-a" in str(a.model_dir) and "plant-a" in str(a.state_dir)


def test_every_hosts_untrained_model_of_one_shape_is_the_same_model():
    """Each pod drew its own random v0000-untrained: a device that moved to another pod before
    any trained model existed stepped its h/c under other weights of the same name."""
    from stream_lstm.models.serving import fresh_model

    s = Settings(hidden_size=8, horizon=3)
    torch.manual_seed(1)
    a = fresh_model(s)
    torch.manual_seed(2)
    state = torch.get_rng_state()
    b = fresh_model(s)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random state left alone
    assert a.version == b.version == "v0000-untrained"
    for (name, x), (_, y) in zip(a.model.state_dict().items(), b.model.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


def test_a_model_path_gives_way_to_a_promotion_retrained_from_it_and_says_when_it_does_not(tmp_path, caplog):
    """MODEL_PATH always won: a worker that had retrained and promoted v0002 went back to the
    file's model at its restart (the fleet's versions backwards, every promotion dropped)."""
    from stream_lstm.models.registry import ModelRegistry, save_model
    from stream_lstm.models.serving import fresh_model

    base = fresh_model(Settings(hidden_size=8, horizon=12))
    path = save_model(base.model, base.spec, tmp_path / "offline.safetensors", {"version": "offline-1"})
    registry = ModelRegistry(tmp_path / "models")
    v1 = registry.register(base.model, base.spec, {"parent": "offline-1"})
    v2 = registry.register(base.model, base.spec, {"parent": v1})
    registry.promote(v2)
    s = Settings(model_path=path, model_dir=tmp_path / "models", hidden_size=8, horizon=12)
    assert load_served_model(s).version == v2
    unrelated = registry.register(base.model, base.spec, {"parent": None})
    registry.promote(unrelated)
    with caplog.at_level(logging.WARNING, logger="stream_lstm.worker"):
        assert load_served_model(s).version == "offline-1"
    assert any("STREAM_LSTM_MODEL_PATH wins over the registry's promoted" in r.getMessage() for r in caplog.records)
    registry.promote(v2)
    (tmp_path / "models" / "PROMOTED").unlink()  # the way back to the file, as the README says
    assert load_served_model(s).version == "offline-1"


def test_a_damaged_promoted_model_falls_back_to_the_version_before_it(tmp_path, caplog):
    """After a rollback from a bad v0003 to v0002, a damaged v0002 put v0003 back: the fallback
    took the newest other version, not the previous one (README: "the previous loadable")."""
    from stream_lstm.models.registry import ModelRegistry
    from stream_lstm.models.serving import fresh_model

    registry = ModelRegistry(tmp_path / "models")
    model = fresh_model(Settings(hidden_size=8, horizon=12))
    for _ in range(3):
        registry.register(model.model, model.spec, {})
    registry.promote("v0002")
    weights = next((tmp_path / "models").glob("v0002.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    with caplog.at_level(logging.WARNING, logger="stream_lstm.worker"):
        served = load_served_model(Settings(model_dir=tmp_path / "models", hidden_size=8, horizon=12))
    assert served.version == "v0001"
    assert "serving v0001 instead of the promoted v0002" in caplog.text
