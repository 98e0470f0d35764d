import hashlib
import json
import struct

import pytest
import torch

from stream_lstm.models.lstm import ModelSpec, SimpleLSTM
from stream_lstm.models.registry import (
    LoadedModel,
    ModelLoadError,
    ModelRegistry,
    PromotionConflict,
    load_model,
    model_from_bytes,
    model_to_bytes,
    save_model,
)

SPEC = ModelSpec(n_features=2, hidden_size=6, num_layers=2, horizon=3, target_channel=1)


def make_model(seed: int = 0, spec: ModelSpec = SPEC) -> SimpleLSTM:
    torch.manual_seed(seed)
    return SimpleLSTM.from_spec(spec)


def same_weights(a: SimpleLSTM, b: SimpleLSTM) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


class Payload:
    """Unpickling this runs open(marker, "w"): a real code-execution side effect."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def pickle_file(path, marker):
    torch.save({"weights": Payload(marker)}, path)
    return path


def test_save_load_round_trip(tmp_path):
    model = make_model()
    meta = {"version": "v0003", "parent": "v0002", "metrics": {"mae": 0.25},
            "training_data": {"first_ts": 1.0, "last_ts": 2.0}, "settings": {"tbptt_k1": 16}}
    path = save_model(model, SPEC, tmp_path / "m.safetensors", meta)
    assert path == tmp_path / "m.safetensors" and (tmp_path / "m.json").exists()
    loaded = load_model(path)
    assert isinstance(loaded, LoadedModel) and loaded.spec == SPEC
    assert same_weights(loaded.model, model) and not loaded.model.training
    assert loaded.version == "v0003" and loaded.meta["parent"] == "v0002"
    for key in ("created_at", "sha256", "spec", "training_data", "metrics", "settings"):
        assert key in loaded.meta
    model2, spec2, meta2 = load_model(tmp_path / "m.json")  # unpacks; the .json path works too
    assert same_weights(model2, model) and spec2 == SPEC and meta2 == loaded.meta
    x = torch.randn(3, 7, 2)
    assert torch.equal(loaded.model(x)[0], model.eval()(x)[0])


def test_tampered_weights_are_refused(tmp_path):
    path = save_model(make_model(), SPEC, tmp_path / "m.safetensors", {})
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # one bit of one weight
    path.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="sha256 mismatch"):
        load_model(path)


def test_truncated_weights_are_refused(tmp_path):
    path = save_model(make_model(), SPEC, tmp_path / "m.safetensors", {})
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ModelLoadError, match="truncated"):
        load_model(path)


@pytest.mark.parametrize("damage", ["missing weights", "missing json", "bad json", "no sha"])
def test_missing_or_broken_files_are_refused(tmp_path, damage):
    path = save_model(make_model(), SPEC, tmp_path / "m.safetensors", {})
    meta_path = tmp_path / "m.json"
    if damage == "missing weights":
        path.unlink()
    elif damage == "missing json":
        meta_path.unlink()
    elif damage == "bad json":
        meta_path.write_text('{"sha256": ')
    else:
        meta = json.loads(meta_path.read_text())
        del meta["sha256"]
        meta_path.write_text(json.dumps(meta))
    with pytest.raises(ModelLoadError) as err:
        load_model(path)
    assert "\n" not in str(err.value)
    if damage == "missing json":  # it named a file the user never gave, and not why it matters
        assert "the metadata that must lie beside the weights" in str(err.value)


def test_a_directory_given_as_the_model_says_which_file_to_give(tmp_path):
    with pytest.raises(ModelLoadError, match="a directory; give the model's .safetensors file"):
        load_model(tmp_path)


def test_wrong_shapes_are_refused_even_with_a_matching_checksum(tmp_path):
    path = save_model(make_model(), SPEC, tmp_path / "m.safetensors", {})
    meta_path = tmp_path / "m.json"
    meta = json.loads(meta_path.read_text())
    meta["spec"]["hidden_size"] = 8  # the sha256 still matches the (hidden 6) weights
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ModelLoadError, match="shape"):
        load_model(path)


def test_non_finite_weights_are_refused(tmp_path):
    model = make_model()
    with torch.no_grad():
        model.head.weight[0, 0] = float("nan")
    path = save_model(model, SPEC, tmp_path / "m.safetensors", {})
    with pytest.raises(ModelLoadError, match="NaN"):
        load_model(path)


def test_saving_a_model_that_does_not_match_its_spec_fails(tmp_path):
    with pytest.raises(ValueError, match="spec"):
        save_model(make_model(), ModelSpec(n_features=1), tmp_path / "m.safetensors", {})


def test_the_pickle_payload_is_live(tmp_path):
    """Guard for the next test: loading this payload with pickle really has a side effect."""
    marker = tmp_path / "proof"
    pickle_file(tmp_path / "p.pt", marker)
    torch.load(tmp_path / "p.pt", weights_only=False)
    assert marker.exists()


def test_a_pickle_placed_as_a_model_is_refused_without_unpickling(tmp_path):
    marker = tmp_path / "pwned"
    # 1. a torch.save file passed as the model path
    with pytest.raises(ModelLoadError, match="pickle"):
        load_model(pickle_file(tmp_path / "model.pt", marker))
    # 2. the same bytes in place of a saved model's weights, with a metadata file that even
    #    carries their checksum
    path = save_model(make_model(), SPEC, tmp_path / "m.safetensors", {})
    pickle_file(path, marker)
    meta = json.loads((tmp_path / "m.json").read_text())
    meta["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (tmp_path / "m.json").write_text(json.dumps(meta))
    with pytest.raises(ModelLoadError, match="never unpickles"):
        load_model(path)
    # 3. in a registry
    reg = ModelRegistry(tmp_path / "reg")
    v = reg.register(make_model(), SPEC, {})
    pickle_file(reg.path(v), marker)
    with pytest.raises(ModelLoadError):
        reg.load(v)
    with pytest.raises(ModelLoadError):
        reg.promote(v)
    assert not marker.exists()


def test_bytes_round_trip_and_damage():
    model = make_model(4)
    data = model_to_bytes(model, SPEC, {"version": "v0009", "parent": "v0008"})
    loaded = model_from_bytes(data)
    assert same_weights(loaded.model, model) and loaded.spec == SPEC and loaded.version == "v0009"
    assert loaded.meta["format_version"] == 1 and loaded.meta["parent"] == "v0008"
    flipped = bytearray(data)
    flipped[-3] ^= 0xFF
    with pytest.raises(ModelLoadError, match="sha256"):
        model_from_bytes(bytes(flipped))
    with pytest.raises(ModelLoadError):
        model_from_bytes(data[: len(data) - 10])
    with pytest.raises(ModelLoadError, match="magic"):
        model_from_bytes(b"PK\x03\x04" + data[4:])
    with pytest.raises(ModelLoadError, match="truncated"):
        model_from_bytes(data[:4] + struct.pack("<I", 10**6) + data[8:])
    with pytest.raises(ModelLoadError):
        model_from_bytes(b"")
    (n,) = struct.unpack_from("<I", data, 4)
    header = json.loads(data[8 : 8 + n])
    header["format_version"] = 99
    h = json.dumps(header).encode()
    with pytest.raises(ModelLoadError, match="format_version"):
        model_from_bytes(data[:4] + struct.pack("<I", len(h)) + h + data[8 + n :])


def test_registry_versions_promote_and_rollback(tmp_path):
    reg = ModelRegistry(tmp_path / "models")
    assert reg.versions() == [] and reg.promoted() is None and reg.next_version() == "v0001"
    v1 = reg.register(make_model(1), SPEC, {"metrics": {"mae": 0.5}})
    v2 = reg.register(make_model(2), SPEC, {"parent": v1, "metrics": {"mae": 0.4}})
    assert (v1, v2, reg.next_version()) == ("v0001", "v0002", "v0003")
    assert [m["version"] for m in reg.versions()] == ["v0001", "v0002"]
    assert reg.versions()[1]["parent"] == "v0001"
    with pytest.raises(FileExistsError):
        reg.register(make_model(3), SPEC, {"version": "v0001"})
    assert same_weights(reg.load(v2).model, make_model(2))

    reg.promote(v1)
    reg.promote(v2)
    assert reg.promoted() == "v0002"
    reg.rollback(v1, reason="v0002 drifts")
    assert reg.promoted() == "v0001"
    assert (reg.root / "PROMOTED").read_text().strip() == "v0001"
    assert [(e["action"], e["version"], e["previous"]) for e in reg.history()] == [
        ("promote", "v0001", None), ("promote", "v0002", "v0001"), ("rollback", "v0001", "v0002")]
    assert reg.history()[-1]["reason"] == "v0002 drifts"
    assert not list(reg.root.glob("*.tmp")) and not list(reg.root.glob(".*.tmp"))

    with pytest.raises(ModelLoadError, match="no model version"):
        reg.rollback("v0042")
    with pytest.raises(ModelLoadError, match="invalid"):
        reg.rollback("../../etc/passwd")
    assert reg.promoted() == "v0001"


def test_a_promotion_that_expects_another_promoted_version_is_refused(tmp_path):
    """``expect``: a retrain that began under v0002 must not undo an operator's rollback."""
    reg = ModelRegistry(tmp_path / "models")
    v1, v2, v3 = (reg.register(make_model(k), SPEC, {}) for k in (1, 2, 3))
    reg.promote(v1, expect=None)  # nothing promoted yet: as expected
    reg.promote(v2, expect=v1)
    reg.rollback(v1)
    with pytest.raises(PromotionConflict) as conflict:
        reg.promote(v3, expect=v2)
    assert conflict.value.args == (v1,) and reg.promoted() == v1
    assert [e["version"] for e in reg.history()] == [v1, v2, v1]  # nothing logged
    reg.promote(v3, expect=v1)
    assert reg.promoted() == v3


def test_json_nested_past_the_parsers_depth_is_a_load_error_not_a_crash(tmp_path):
    """A forged models-topic record whose header is 100,000 '[': RecursionError, not
    ModelLoadError, went through the follower at every start (a crash loop)."""
    header = b"[" * 100_000
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        model_from_bytes(b"SLM1" + struct.pack("<I", len(header)) + header)
    reg = ModelRegistry(tmp_path)
    reg.register(make_model(1), SPEC, {})
    (tmp_path / "v0001.json").write_bytes(header)
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        reg.load("v0001")
    assert "unreadable metadata" in reg.versions()[0]["error"]


def test_registry_numbers_sort_numerically_and_skip_damaged_metadata(tmp_path):
    reg = ModelRegistry(tmp_path)
    for v in ["v0009", "v0010", "v10000"]:
        reg.register(make_model(), SPEC, {"version": v})
    (tmp_path / "v0011.json").write_text("{not json")
    rows = reg.versions()
    assert [m["version"] for m in rows] == ["v0009", "v0010", "v0011", "v10000"]
    assert "error" in rows[2]
    assert reg.next_version() == "v10001"


def test_weights_that_are_finite_only_in_float64_are_refused():
    # Served as float32, 1e300 is infinity: checked as it will be served.
    import struct

    from safetensors.torch import save

    from stream_lstm.models.registry import WIRE_MAGIC, _dumps, _full_meta, model_from_bytes

    spec = ModelSpec(hidden_size=2, horizon=1)
    weights = {k: v.double() for k, v in SimpleLSTM.from_spec(spec).state_dict().items()}
    weights["head.bias"][0] = 1e300
    raw = save(weights)
    header = _dumps(_full_meta({"version": "v0001"}, spec, raw), indent=None)
    with pytest.raises(ModelLoadError, match=r"head\.bias has NaN, infinite or weights past ±10000 \(as float32\)"):
        model_from_bytes(WIRE_MAGIC + struct.pack("<I", len(header)) + header + raw)


def test_a_spec_asking_for_a_huge_model_is_refused_without_allocating_it(tmp_path):
    """A record off the models topic is checked against its spec before anything is built: the
    spec's shapes used to be found by building the model it names (hidden_size=10**6: terabytes)."""
    import json

    from stream_lstm.models.lstm import ModelSpec, SimpleLSTM
    from stream_lstm.models.registry import ModelLoadError, load_model, save_model

    spec = ModelSpec(hidden_size=4, horizon=2)
    path = save_model(SimpleLSTM.from_spec(spec), spec, tmp_path / "m.safetensors", {"version": "x"})
    meta_path = path.with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    meta["spec"]["hidden_size"] = 10**6
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ModelLoadError, match="no valid spec .hidden_size is 1000000: at most 65536"):
        load_model(path)
    # 20,000 layers: checking the shapes of what it asks for held a worker's loop for a minute.
    meta["spec"].update(hidden_size=4, num_layers=20_000)
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ModelLoadError, match="num_layers is 20000: at most 64"):
        load_model(path)
    meta["spec"].update(num_layers="2")
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ModelLoadError, match="num_layers is '2', not a whole number"):
        load_model(path)


def test_a_version_that_is_not_a_version_name_is_refused():
    """A 70,000-character version off the models topic loaded, and then no checkpoint naming it
    could be encoded (a length of at most 65,535): every transaction failed."""
    spec = ModelSpec(hidden_size=2, horizon=1)
    model = SimpleLSTM.from_spec(spec)
    with pytest.raises(ModelLoadError, match="is not a version name"):
        model_from_bytes(model_to_bytes(model, spec, {"version": "v" * 70_000}))
    with pytest.raises(ModelLoadError, match="is not a version name"):
        model_from_bytes(model_to_bytes(model, spec, {"version": "../v1"}))
    assert model_from_bytes(model_to_bytes(model, spec, {"version": "offline-2026.12_a"})).version == "offline-2026.12_a"


def test_a_model_of_finite_but_extreme_weights_is_refused():
    """Every tensor finite, each weight 3e38: its forecasts were infinite and its h/c NaN, and a
    worker following the models topic swapped to it and checkpointed NaN state for every device
    (a security review). Its weights are bounded as it loads (MAX_WEIGHT)."""
    from stream_lstm.models.registry import model_from_bytes, model_to_bytes

    spec = ModelSpec(hidden_size=4, horizon=2)
    model = SimpleLSTM.from_spec(spec)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(3e38)
    with pytest.raises(ModelLoadError, match="weight_ih_l0 has NaN, infinite or weights past ±10000"):
        model_from_bytes(model_to_bytes(model, spec, {"version": "v9999"}))
    assert model_from_bytes(model_to_bytes(SimpleLSTM.from_spec(spec), spec, {"version": "v1"})).version == "v1"


def test_finite_weights_that_open_only_past_the_probe_are_refused_by_their_size():
    """A review forged a model with finite weights that kept its units shut for readings within
    4.5 sigma (what the output probe then tried) and forecast inf from one spike on, for good."""
    from stream_lstm.models.registry import MAX_WEIGHT, model_from_bytes, model_to_bytes

    h = 2
    spec = ModelSpec(n_features=1, hidden_size=h, num_layers=1, horizon=1)
    model = SimpleLSTM.from_spec(spec)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        w, b = model.lstm.weight_ih_l0, model.lstm.bias_ih_l0
        w[:h], b[:h], b[h:] = 1000.0, -4500.0, 1000.0  # input gate shut below 4.5; the rest open
        model.head.weight[0] = 3e38
    hs, cs = model.eval().zero_state(1)
    mu, _, hs, cs = model.step(torch.tensor([[4.0]]), hs, cs)
    assert torch.isfinite(mu).all()  # ordinary readings: nothing shows
    mu, _, hs, cs = model.step(torch.tensor([[5.0]]), hs, cs)
    assert not torch.isfinite(mu).all()  # one spike: what it would have served, for good
    with pytest.raises(ModelLoadError, match=r"head\.weight has NaN, infinite or weights past ±10000"):
        model_from_bytes(model_to_bytes(model, spec, {"version": "evil-1"}))
    with torch.no_grad():  # the same model with every weight at the bound loads, and stays finite
        for p in model.parameters():
            p.clamp_(-MAX_WEIGHT, MAX_WEIGHT)
    served = model_from_bytes(model_to_bytes(model, spec, {"version": "bounded"})).model
    hs, cs = served.zero_state(1)
    for x in (0.5, 5.0, 1e6, -1e6, 3.0):
        mu, log_b, hs, cs = served.step(torch.tensor([[x]]), hs, cs)
        assert torch.isfinite(mu).all() and torch.isfinite(hs).all() and torch.isfinite(cs).all()


def test_trained_weights_sit_far_below_the_bound():
    """MAX_WEIGHT must never refuse a real model: trained hard (a high learning rate, no decay)
    on a spiky series with a level shift, the largest weight stays orders of magnitude below."""
    import numpy as np

    from stream_lstm.models.registry import MAX_WEIGHT
    from stream_lstm.state.normalizer import normalize_sequence
    from stream_lstm.training.tbptt import train_tbptt

    rng = np.random.default_rng(0)
    x = np.sin(np.arange(3000) / 7) + rng.standard_t(2, 3000) * 0.3
    x[1500:] += 8
    z, _, _ = normalize_sequence(x[:, None].astype(np.float32))
    model = SimpleLSTM.from_spec(ModelSpec(hidden_size=16, horizon=4))
    train_tbptt(model, [z[:2500]], [z[2500:]], lr=5e-2, weight_decay=0.0, max_epochs=4, patience=4)
    largest = max(float(p.detach().abs().max()) for p in model.parameters())
    assert largest < MAX_WEIGHT / 100, largest  # (about 2 here)


@pytest.mark.parametrize("name", ["v0002\n", "offline-x\n", "v0001\r"])
def test_a_version_name_with_a_line_break_is_refused(tmp_path, name):
    from stream_lstm.models.registry import (
        NUMBERED_RE,
        VERSION_RE,
        model_from_bytes,
        model_to_bytes,
    )

    assert not VERSION_RE.match(name) and not NUMBERED_RE.match(name)
    spec = ModelSpec(hidden_size=2, horizon=1)
    with pytest.raises(ModelLoadError, match="is not a version name"):
        model_from_bytes(model_to_bytes(SimpleLSTM.from_spec(spec), spec, {"version": name}))


@pytest.mark.parametrize("parent", [["offline-a"], {"v": 1}, "x" * 5_000_000, "\x1b[2Jcleared"])
def test_a_parent_that_is_not_a_version_name(tmp_path, parent):
    """From the topic: refused. In a registry file: read as none (a list crashed every start of a
    worker following parents; an escape code cleared the operator's screen in `models list`)."""
    import json

    from stream_lstm.models.registry import model_from_bytes, model_to_bytes
    from stream_lstm.models.serving import _ancestors

    spec = ModelSpec(hidden_size=2, horizon=1)
    with pytest.raises(ModelLoadError, match="parent .* is not a version name"):
        model_from_bytes(model_to_bytes(SimpleLSTM.from_spec(spec), spec, {"parent": parent}))
    reg = ModelRegistry(tmp_path)
    v1 = reg.register(SimpleLSTM.from_spec(spec), spec, {})
    v2 = reg.register(SimpleLSTM.from_spec(spec), spec, {"parent": v1})
    meta_path = tmp_path / f"{v2}.json"
    meta_path.write_text(json.dumps(json.loads(meta_path.read_text()) | {"parent": parent}))
    assert [m["parent"] for m in reg.versions()] == [None, None]
    assert _ancestors(reg, v2) == []


def test_a_full_disk_leaves_no_partial_version_behind(tmp_path, monkeypatch):
    import os

    reg = ModelRegistry(tmp_path)
    spec = ModelSpec(hidden_size=2, horizon=1)
    real_fsync = os.fsync

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space"):
        reg.register(SimpleLSTM.from_spec(spec), spec, {})
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no partial file, no number spent
    assert reg.register(SimpleLSTM.from_spec(spec), spec, {}) == "v0001"
