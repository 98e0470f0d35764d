"""The model registry: safetensors weights plus JSON metadata, never pickle.

Each version is ``vNNNN.safetensors`` (weights) and ``vNNNN.json`` (version, parent, spec,
sha256 of the weights, training data range, metrics, settings used). ``PROMOTED`` names the
version the worker serves. Loading checks the checksum and the tensor shapes against the
spec, so a tampered, truncated or foreign file fails with :class:`ModelLoadError` and a
message that says why. The same format travels over Kafka (:func:`model_to_bytes`).

>>> import tempfile, pathlib
>>> from stream_lstm.models.lstm import ModelSpec, SimpleLSTM
>>> reg = ModelRegistry(pathlib.Path(tempfile.mkdtemp()))
>>> spec = ModelSpec(hidden_size=4, horizon=2)
>>> v = reg.register(SimpleLSTM.from_spec(spec), spec, {"metrics": {"val_mae": 0.5}})
>>> reg.promote(v); reg.promoted(), reg.load(v).spec.hidden_size
('v0001', 4)
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from stream_lstm.models.lstm import ModelSpec, SimpleLSTM

_WIRE_MAGIC = b"SLM1"


class ModelLoadError(ValueError):
    """A model file or message could not be loaded safely."""


@dataclass
class LoadedModel:
    model: SimpleLSTM
    spec: ModelSpec
    meta: dict[str, Any]

    @property
    def version(self) -> str:
        return str(self.meta.get("version", "unknown"))


def _weights_bytes(model: SimpleLSTM) -> bytes:
    return st_save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()})


def _build(weights: bytes, meta: dict[str, Any], source: str) -> LoadedModel:
    digest = hashlib.sha256(weights).hexdigest()
    if meta.get("sha256") != digest:
        raise ModelLoadError(f"{source}: checksum mismatch (the weights were modified or truncated)")
    try:
        spec = ModelSpec(**meta["spec"])
    except (KeyError, TypeError) as exc:
        raise ModelLoadError(f"{source}: metadata has no valid spec ({exc})") from None
    try:
        tensors = st_load(weights)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"{source}: not a safetensors file ({exc})") from None
    model = SimpleLSTM.from_spec(spec)
    expected = model.state_dict()
    if set(tensors) != set(expected) or any(tensors[k].shape != expected[k].shape for k in expected):
        raise ModelLoadError(f"{source}: tensors do not match the spec {spec}")
    model.load_state_dict(tensors)
    return LoadedModel(model.eval(), spec, meta)


def save_model(model: SimpleLSTM, spec: ModelSpec, path: Path, meta: dict[str, Any]) -> Path:
    """Write ``path`` (.safetensors) and its metadata (.json beside it); returns the weights path."""
    path = Path(path).with_suffix(".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    weights = _weights_bytes(model)
    full = {"created_at": time.time(), **meta, "spec": spec.to_dict(),
            "sha256": hashlib.sha256(weights).hexdigest(), "format": "safetensors"}
    _atomic_write(path, weights)
    _atomic_write(path.with_suffix(".json"), json.dumps(full, indent=2, default=str).encode())
    return path


def load_model(path: Path, device: str = "cpu") -> LoadedModel:
    """Load a model saved by :func:`save_model`; never unpickles."""
    path = Path(path)
    weights_path = path.with_suffix(".safetensors") if path.suffix != ".safetensors" else path
    meta_path = weights_path.with_suffix(".json")
    try:
        weights = weights_path.read_bytes()
        meta = json.loads(meta_path.read_text())
    except OSError as exc:
        raise ModelLoadError(f"{exc.filename}: {exc.strerror}") from None
    except ValueError:
        raise ModelLoadError(f"{meta_path}: metadata is not valid JSON") from None
    loaded = _build(weights, meta, str(weights_path))
    loaded.model.to(device)
    return loaded


def model_to_bytes(model: SimpleLSTM, spec: ModelSpec, meta: dict[str, Any]) -> bytes:
    """A self-describing message: magic, JSON header length, JSON header, safetensors."""
    weights = _weights_bytes(model)
    header = json.dumps({**meta, "spec": spec.to_dict(),
                         "sha256": hashlib.sha256(weights).hexdigest()}, default=str).encode()
    return _WIRE_MAGIC + struct.pack("<I", len(header)) + header + weights


def model_from_bytes(data: bytes) -> LoadedModel:
    if data[:4] != _WIRE_MAGIC or len(data) < 8:
        raise ModelLoadError("not a stream-lstm model message")
    (n,) = struct.unpack_from("<I", data, 4)
    try:
        meta = json.loads(data[8 : 8 + n])
    except ValueError:
        raise ModelLoadError("model message header is not valid JSON") from None
    return _build(bytes(data[8 + n :]), meta, "model message")


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class ModelRegistry:
    """Versions in a directory, and which one is promoted.

    Parameters
    ----------
    root
        The registry directory (``STREAM_LSTM_MODEL_DIR``).
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def versions(self) -> list[dict[str, Any]]:
        out = []
        for meta_path in sorted(self.root.glob("v*.json")):
            try:
                out.append(json.loads(meta_path.read_text()))
            except ValueError:
                out.append({"version": meta_path.stem, "error": "unreadable metadata"})
        return out

    def next_version(self) -> str:
        numbers = [int(p.stem[1:]) for p in self.root.glob("v*.json") if p.stem[1:].isdigit()]
        return f"v{max(numbers, default=0) + 1:04d}"

    def register(self, model: SimpleLSTM, spec: ModelSpec, meta: dict[str, Any]) -> str:
        version = meta.get("version") or self.next_version()
        save_model(model, spec, self.root / f"{version}.safetensors", {**meta, "version": version})
        return version

    def path(self, version: str) -> Path:
        return self.root / f"{version}.safetensors"

    def load(self, version: str, device: str = "cpu") -> LoadedModel:
        if not self.path(version).exists():
            raise ModelLoadError(f"no model version {version!r} in {self.root}")
        return load_model(self.path(version), device)

    def promote(self, version: str) -> None:
        self.load(version)  # refuse to promote what cannot be served
        self.root.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.root / "PROMOTED", version.encode())

    def promoted(self) -> str | None:
        try:
            return (self.root / "PROMOTED").read_text().strip() or None
        except OSError:
            return None

    def rollback(self, version: str) -> None:
        """Serve an earlier version again (workers load it on start or on the next swap)."""
        self.promote(version)
