"""The weights of every served model version, kept by version beside the registry
(models/served_models.py): found again after a restart whatever their source, copied only when
the registry lacks them, never loaded when damaged or replaced, pruned, and one untrained model
per host."""

import json
import threading

import pytest
import torch

from stream_lstm.models.lstm import ModelSpec, SimpleLSTM
from stream_lstm.models.registry import (
    LoadedModel,
    ModelLoadError,
    ModelRegistry,
    model_from_bytes,
    model_to_bytes,
    save_model,
)
from stream_lstm.models.served_models import ServedModels

SPEC = ModelSpec(hidden_size=4, horizon=2)


def model(version: str, seed: int) -> LoadedModel:
    torch.manual_seed(seed)
    return LoadedModel.of(SimpleLSTM.from_spec(SPEC), SPEC, version)


def same_weights(a: LoadedModel, b: LoadedModel) -> bool:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_every_served_version_is_found_again_by_version_whatever_its_source(tmp_path):
    registry = ModelRegistry(tmp_path)
    registered = registry.load(registry.register(model("", 1).model, SPEC, {}))  # v0001
    save_model(model("", 2).model, SPEC, tmp_path / "given" / "m.safetensors", {"version": "v-file"})
    sources = {
        "v0000-untrained": model("v0000-untrained", 0),  # a fresh model
        "v-file": ModelRegistry(tmp_path / "given").load("m"),  # STREAM_LSTM_MODEL_PATH
        "v0007": model_from_bytes(model_to_bytes(model("", 3).model, SPEC, {"version": "v0007"})),
        "v0001": registered,
    }
    for served in sources.values():
        ServedModels(tmp_path).remember(served)
    # A new process (a restarted worker) finds each one by version.
    again = ServedModels(tmp_path)
    for version, served in sources.items():
        loaded = again.load(version)
        assert loaded.spec == SPEC and same_weights(loaded, served), version
    # The registry's own version is not copied; the others are, with their metadata.
    assert sorted(again.kept()) == ["v-file", "v0000-untrained", "v0007"]
    assert json.loads(again.path("v0007").with_suffix(".json").read_text())["version"] == "v0007"
    assert registry.versions()[-1]["version"] == "v0001"  # the registry lists its own only
    with pytest.raises(ModelLoadError, match="no model version 'v0042'"):
        again.load("v0042")


def test_a_damaged_or_replaced_version_is_never_loaded_as_the_wrong_weights(tmp_path):
    kept = ServedModels(tmp_path)
    kept.remember(model("v0003", 0))
    path = kept.path("v0003")
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])  # torn by a power loss (no fsync)
    with pytest.raises(ModelLoadError, match="sha256 mismatch"):
        kept.load("v0003")
    path.write_bytes(good)
    # The same name served again with other weights (a models-topic v0003 from another
    # registry, say): these replace the kept ones.
    other = model("v0003", 1)
    kept.remember(other)
    assert same_weights(kept.load("v0003"), other)
    # Served again as the registry's own v0003: the registry's weights, no stale copy.
    registry = ModelRegistry(tmp_path)
    registry.register(model("", 2).model, SPEC, {"version": "v0003"})
    kept.remember(registry.load("v0003"))
    assert kept.kept() == [] and same_weights(kept.load("v0003"), registry.load("v0003"))


def test_the_kept_versions_are_the_last_served_and_those_still_held(tmp_path):
    kept = ServedModels(tmp_path, keep=3)
    for k in range(1, 7):  # v1 still held by devices all along (never re-warmed, say)
        kept.remember(model(f"v{k}", k), holding=["v1"] if k > 1 else [])
    assert sorted(kept.kept()) == ["v1", "v5", "v6"]
    kept.remember(model("v7", 7))  # v1 no longer held: held last, it goes last
    assert sorted(kept.kept()) == ["v1", "v6", "v7"]
    for k in (8, 9):
        kept.remember(model(f"v{k}", k))
    assert kept.kept() == ["v7", "v8", "v9"]
    files = sorted(p.name for p in tmp_path.joinpath("served").iterdir())
    assert files == sorted(f"v{k}.{ext}" for k in (7, 8, 9) for ext in ("json", "safetensors"))


def test_a_host_has_one_untrained_model_which_processes_starting_at_once_agree_on(tmp_path):
    starts = [model("v0000-untrained", seed) for seed in range(4)]  # each process's own init
    barrier, got = threading.Barrier(4), [None] * 4

    def start(k):  # flock: each open() of the lock file is its own, as in another process
        barrier.wait()
        got[k] = ServedModels(tmp_path).fresh(starts[k])

    threads = [threading.Thread(target=start, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    winners = [k for k in range(4) if not got[k][1]]
    assert len(winners) == 1  # one kept its own; the others serve it
    for served, _ in got:
        assert same_weights(served, starts[winners[0]])
    # All of one age too: the one that kept it had none (its start time stood in), so a sibling's
    # death moved the dashboard's "last promotion" back 3 s and marked one (a metrics review).
    assert len({served.created_ts for served, _ in got}) == 1 and got[0][0].created_ts is not None
    # Settings that shape another model: a new one replaces it.
    other = LoadedModel.of(SimpleLSTM.from_spec(ModelSpec(hidden_size=6, horizon=2)),
                           ModelSpec(hidden_size=6, horizon=2), "v0000-untrained")
    served, before = ServedModels(tmp_path).fresh(other)
    assert not before and same_weights(served, other) and ServedModels(tmp_path).load("v0000-untrained").spec == other.spec
