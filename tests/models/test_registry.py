import json
import pickle

import pytest
import torch

from stream_lstm.models.lstm import ModelSpec, SimpleLSTM
from stream_lstm.models.registry import (
    ModelLoadError,
    ModelRegistry,
    load_model,
    model_from_bytes,
    model_to_bytes,
    save_model,
)

SPEC = ModelSpec(hidden_size=4, horizon=2)


def test_round_trip_keeps_weights(tmp_path):
    torch.manual_seed(0)
    m = SimpleLSTM.from_spec(SPEC)
    path = save_model(m, SPEC, tmp_path / "m", {"version": "v0001"})
    loaded = load_model(path)
    for k, v in m.state_dict().items():
        assert torch.equal(v, loaded.model.state_dict()[k])
    assert loaded.version == "v0001" and loaded.spec == SPEC
    assert model_from_bytes(model_to_bytes(m, SPEC, {"version": "x"})).version == "x"


def test_tampered_truncated_and_wrong_shape_fail_clearly(tmp_path):
    path = save_model(SimpleLSTM.from_spec(SPEC), SPEC, tmp_path / "m", {"version": "v1"})
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="checksum mismatch"):
        load_model(path)
    path.write_bytes(bytes(data[:100]))
    with pytest.raises(ModelLoadError, match="checksum"):
        load_model(path)
    good = save_model(SimpleLSTM.from_spec(SPEC), SPEC, tmp_path / "g", {"version": "v1"})
    meta = json.loads(good.with_suffix(".json").read_text())
    meta["spec"]["hidden_size"] = 8
    good.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(ModelLoadError, match="do not match the spec"):
        load_model(good)
    with pytest.raises(ModelLoadError, match="not a stream-lstm model"):
        model_from_bytes(b"garbage")


class Exploit:
    def __reduce__(self):
        import os
        return (os.system, ("touch /tmp/stream-lstm-pwned",))


def test_pickle_payload_placed_as_model_is_refused(tmp_path):
    import hashlib
    import os

    marker = "/tmp/stream-lstm-pwned"
    if os.path.exists(marker):
        os.remove(marker)
    payload = pickle.dumps(Exploit())
    path = tmp_path / "evil.safetensors"
    path.write_bytes(payload)
    # Even with metadata whose checksum matches, the bytes are parsed as safetensors only.
    path.with_suffix(".json").write_text(json.dumps(
        {"version": "evil", "spec": SPEC.to_dict(), "sha256": hashlib.sha256(payload).hexdigest()}))
    with pytest.raises(ModelLoadError, match="not a safetensors file"):
        load_model(path)
    assert not os.path.exists(marker)


def test_registry_versions_promote_rollback(tmp_path):
    reg = ModelRegistry(tmp_path)
    v1 = reg.register(SimpleLSTM.from_spec(SPEC), SPEC, {})
    v2 = reg.register(SimpleLSTM.from_spec(SPEC), SPEC, {"parent": v1})
    assert (v1, v2) == ("v0001", "v0002")
    reg.promote(v2)
    assert reg.promoted() == "v0002"
    reg.rollback(v1)
    assert reg.promoted() == "v0001"
    with pytest.raises(ModelLoadError, match="no model version"):
        reg.rollback("v0009")
    assert [m["version"] for m in reg.versions()] == ["v0001", "v0002"]
