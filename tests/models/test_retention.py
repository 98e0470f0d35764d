"""The registry keeps the weights of its newest versions (models/retention.py): a worker that
retrains on a schedule registered a version a promotion for ever."""

from stream_lstm.models import retention
from stream_lstm.models.lstm import ModelSpec, SimpleLSTM
from stream_lstm.models.registry import ModelRegistry
from stream_lstm.models.serving import descends_from


def registry_of(tmp_path, n: int, first_parent: str = "offline-1") -> tuple[ModelRegistry, list[str]]:
    reg, spec = ModelRegistry(tmp_path / "models"), ModelSpec(hidden_size=2, horizon=1)
    versions, parent = [], first_parent
    for _ in range(n):  # each retrained from the one before, the first from a model file
        parent = reg.register(SimpleLSTM.from_spec(spec), spec, {"parent": parent})
        reg.promote(parent)
        versions.append(parent)
    return reg, versions


def weights(reg: ModelRegistry) -> list[str]:
    return sorted(p.stem for p in reg.root.glob("*.safetensors"))


def test_the_newest_versions_keep_their_weights_the_older_their_metadata_and_lineage(tmp_path):
    reg, versions = registry_of(tmp_path, 8)
    assert retention.prune(reg, keep=3) == versions[:5]
    assert weights(reg) == versions[5:]
    metas = {m["version"]: m for m in reg.versions()}
    assert [v for v in versions if metas[v].get("pruned")] == versions[:5]  # listed, marked
    # What a restart with STREAM_LSTM_MODEL_PATH decides by: the parents still lead to the file.
    assert descends_from(reg, versions[-1], "offline-1")
    assert retention.prune(reg, keep=3) == []  # nothing more to do


def test_the_promoted_version_keeps_its_weights_however_old(tmp_path):
    reg, versions = registry_of(tmp_path, 6)
    reg.rollback(versions[0])  # far back
    retention.prune(reg, keep=2)
    assert weights(reg) == [versions[0], *versions[4:]]
    assert reg.load(versions[0]).version == versions[0]


def test_a_listing_says_pruned_and_a_rollback_to_one_is_refused_with_why(tmp_path, capsys):
    from stream_lstm.cli import main

    reg, versions = registry_of(tmp_path, 4)
    retention.prune(reg, keep=2)
    assert main(["models", "list", "--model-dir", str(reg.root)]) == 0
    assert "weights pruned (the registry keeps the weights of the newest" in capsys.readouterr().out
    assert main(["models", "rollback", versions[0], "--model-dir", str(reg.root)]) == 2
    assert f"{versions[0]}: weights pruned" in capsys.readouterr().err
    assert reg.promoted() == versions[-1]
