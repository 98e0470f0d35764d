"""The model registry: safetensors weights plus JSON metadata, never pickle.

A saved model is two files: ``NAME.safetensors`` (the weights, in the `safetensors
<https://huggingface.co/docs/safetensors>`_ format, which holds only tensors and cannot run
code) and ``NAME.json`` beside it: format version, model version, parent version, creation
time, the :class:`~stream_lstm.models.lstm.ModelSpec`, the weights' sha256, training data,
metrics and settings. Loading checks the JSON, the checksum, every tensor's name, shape, dtype
and size against the spec: a missing, truncated, tampered, foreign (a ``torch.save`` pickle),
mis-shaped or extreme file fails with :class:`ModelLoadError` and a line that says why.

:class:`ModelRegistry` keeps numbered versions ``v0001``, ``v0002``, ... in one directory
(``STREAM_LSTM_MODEL_DIR``), a ``PROMOTED`` file naming the version workers serve (replaced
atomically), and ``promotions.jsonl``, the log of promotions and rollbacks.

The same format travels over the Kafka models topic as one message
(:func:`model_to_bytes` / :func:`model_from_bytes`): ``b"SLM1"``, the header length
(uint32, little-endian), the JSON header, then the safetensors bytes.

>>> import tempfile, pathlib
>>> from stream_lstm.models.lstm import ModelSpec, SimpleLSTM
>>> reg = ModelRegistry(pathlib.Path(tempfile.mkdtemp()))
>>> spec = ModelSpec(hidden_size=4, horizon=2)
>>> v = reg.register(SimpleLSTM.from_spec(spec), spec, {"metrics": {"val_mae": 0.5}})
>>> reg.promote(v); reg.promoted(), reg.load(v).spec.hidden_size
('v0001', 4)
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import struct
import time
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

# (LoadedModel lives beside SimpleLSTM; imported from here too, where it lived before.)
from stream_lstm.models.lstm import LoadedModel, ModelSpec, SimpleLSTM, check_spec

FORMAT = "stream-lstm-model"
FORMAT_VERSION = 1
WIRE_MAGIC = b"SLM1"
_MAX_HEADER = 16 << 20
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")  # (a file name too; \Z: no newline)
NUMBERED_RE = re.compile(r"^v(\d+)\Z")
# |w| of a served model, far above trained ones. Bounded weights bound the forecasts whatever the
# readings (h is in [-1, 1], log_b clamped), which a probe of inputs could not: a forged model
# kept its units shut below 4.5 sigma and forecast inf after one spike, for good (a review).
MAX_WEIGHT = 1e4


class ModelLoadError(ValueError):
    """A model file or message could not be loaded safely (the message says why)."""


class PromotionConflict(RuntimeError):
    """Not the promoted version expected (a rollback, or another process promoted): args[0]."""


_ANY = object()  # promote(): whatever is promoted now


def _utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _jsonable(value: Any) -> Any:  # numpy / torch scalars (item), arrays (tolist), paths (str)
    method = next((m for m in ("item", "tolist") if hasattr(value, m) and not isinstance(value, Path)), None)
    return getattr(value, method)() if method else str(value)


def _expected_shapes(spec: ModelSpec) -> dict[str, torch.Size]:
    # On the meta device: shapes without memory, whatever size the spec asks for (a models-topic
    # record saying hidden_size=10**6 would otherwise be allocated before it is checked).
    with torch.device("meta"):
        model = SimpleLSTM.from_spec(spec)
    return {k: v.shape for k, v in model.state_dict().items()}


def _weights_bytes(model: SimpleLSTM, spec: ModelSpec) -> bytes:
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous()
               for k, v in model.state_dict().items()}
    expected = _expected_shapes(spec)
    if {k: t.shape for k, t in tensors.items()} != expected:
        raise ValueError(f"the model's tensors do not match the spec {spec}")
    return st_save(tensors)


def _full_meta(meta: dict[str, Any], spec: ModelSpec, weights: bytes) -> dict[str, Any]:
    return {"version": None, "parent": None, "created_at": _utc_now(), "training_data": None,
            "metrics": {}, "settings": {}, **meta, "format": FORMAT,
            "format_version": FORMAT_VERSION, "spec": spec.to_dict(),
            "sha256": hashlib.sha256(weights).hexdigest()}


def model_files(model: SimpleLSTM, spec: ModelSpec, meta: dict[str, Any]) -> tuple[bytes, bytes]:
    """The two files :func:`save_model` writes: the safetensors weights and their JSON metadata."""
    weights = _weights_bytes(model, spec)
    return weights, _dumps(_full_meta(meta, spec, weights))


def _looks_pickled(data: bytes) -> bool:
    """Heuristic, for the error message only (a file is refused unless it parses as safetensors)."""
    return data[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05") or data.startswith(b"PK\x03\x04")  # pickle 2-5, zip


def _build(weights: bytes, meta: Any, source: str, device: str = "cpu") -> LoadedModel:
    """Verify metadata, checksum and tensors; build the model. Never unpickles."""
    if not isinstance(meta, dict):
        raise ModelLoadError(f"{source}: metadata is not a JSON object")
    fmt_version = meta.get("format_version", 1)
    if not isinstance(fmt_version, int) or fmt_version > FORMAT_VERSION:
        raise ModelLoadError(f"{source}: format_version {fmt_version!r} is newer than this "
                             f"stream-lstm understands ({FORMAT_VERSION})")
    for key in ("version", "parent"):  # (names in every checkpoint and metric; serving.py follows parents)
        if (name := meta.get(key)) is not None and not (isinstance(name, str) and VERSION_RE.match(name)):
            raise ModelLoadError(f"{source}: {key} {str(name)[:80]!r} is not a version name "
                                 "(letters, digits, '.', '_', '-'; at most 64)")
    digest = meta.get("sha256")
    if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise ModelLoadError(f"{source}: metadata has no valid sha256")
    if hashlib.sha256(weights).hexdigest() != digest:
        raise ModelLoadError(f"{source}: sha256 mismatch: the weights were modified or truncated "
                             f"({len(weights)} bytes)")
    try:
        spec = ModelSpec(**meta["spec"])
        check_spec(spec)
        expected = _expected_shapes(spec)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"{source}: metadata has no valid spec ({exc})") from None
    try:
        tensors = st_load(weights)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        if _looks_pickled(weights):
            raise ModelLoadError(f"{source}: looks like a pickle / torch.save file, not "
                                 "safetensors; stream-lstm never unpickles model files") from None
        raise ModelLoadError(f"{source}: not a valid safetensors file ({exc})") from None
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ModelLoadError(f"{source}: tensor names do not match the spec "
                             f"(missing {missing}, unexpected {extra})")
    for name, shape in expected.items():
        t = tensors[name]
        if t.shape != shape:
            raise ModelLoadError(f"{source}: tensor {name} has shape {tuple(t.shape)}, the spec "
                                 f"needs {tuple(shape)}")
        # (as served: 1e300 in float64 is inf; bounded weights bound the forecasts: MAX_WEIGHT)
        if not t.is_floating_point() or not bool(t.float().abs().max() <= MAX_WEIGHT):  # (NaN too)
            raise ModelLoadError(f"{source}: tensor {name} " + (
                f"has NaN, infinite or weights past ±{MAX_WEIGHT:g} (as float32)"
                if t.is_floating_point() else f"has dtype {t.dtype}, expected float"))
    model = SimpleLSTM.from_spec(spec)
    model.load_state_dict({k: t.float() for k, t in tensors.items()})
    return LoadedModel(model.eval().to(device), spec, meta)


def _weights_path(path: Path) -> Path:
    return path if path.suffix == ".safetensors" else path.with_suffix(".safetensors")


def save_model(model: SimpleLSTM, spec: ModelSpec, path: Path, meta: dict[str, Any]) -> Path:
    """Write the weights (``path``, as ``.safetensors``) and ``<stem>.json``; return the weights path.

    ``meta`` keys are kept (``version``, ``parent``, ``training_data``, ``metrics``,
    ``settings``, anything else JSON-able); ``format``, ``spec`` and ``sha256`` are computed;
    ``created_at`` (UTC, ISO 8601) defaults to now; ``version`` defaults to the file stem.
    Both files are replaced atomically (temporary file + rename), weights first.
    """
    weights_path = _weights_path(Path(path))
    weights, meta_json = model_files(model, spec, {"version": weights_path.stem, **meta})
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(weights_path, weights)
    atomic_write(weights_path.with_suffix(".json"), meta_json)
    return weights_path


def load_model(path: Path, device: str = "cpu") -> LoadedModel:
    """Load a model saved by :func:`save_model` (``path``: its ``.safetensors`` or ``.json``).

    Raises :class:`ModelLoadError` for a missing, truncated, tampered, mis-shaped or pickled
    file. The model is returned in eval mode on ``device``.
    """
    path = Path(path)
    if path.is_dir():
        raise ModelLoadError(f"{path}: a directory; give the model's .safetensors file (its .json "
                             "beside it), e.g. a registry's v0003.safetensors")
    if path.suffix not in (".safetensors", ".json") and path.is_file():
        head = path.read_bytes()[:4]
        kind = "a pickle / torch.save file" if _looks_pickled(head) else "not a .safetensors file"
        raise ModelLoadError(f"{path}: {kind}; stream-lstm loads only .safetensors + .json "
                             "(it never unpickles)")
    weights_path = _weights_path(path)
    meta_path = weights_path.with_suffix(".json")
    try:
        weights = weights_path.read_bytes()
        meta_text = meta_path.read_text(encoding="utf-8")
    except OSError as exc:
        which = ("the metadata that must lie beside the weights" if exc.filename == str(meta_path)
                 and weights_path.exists() else "the model")
        raise ModelLoadError(f"{exc.filename}: {exc.strerror or exc} ({which}: a model is "
                             f"NAME.safetensors and NAME.json together)") from None
    except UnicodeDecodeError:
        raise ModelLoadError(f"{meta_path}: metadata is not UTF-8 text") from None
    try:
        meta = json.loads(meta_text)
    except (ValueError, RecursionError) as exc:  # (RecursionError: nested past the parser's depth)
        raise ModelLoadError(f"{meta_path}: metadata is not valid JSON ({exc!r:.200})") from None
    return _build(weights, meta, str(weights_path), device)


def model_to_bytes(model: SimpleLSTM, spec: ModelSpec, meta: dict[str, Any]) -> bytes:
    """One self-describing message: ``b"SLM1"``, header length, JSON header, safetensors."""
    weights = _weights_bytes(model, spec)
    header = _dumps(_full_meta(meta, spec, weights), indent=None)
    return WIRE_MAGIC + struct.pack("<I", len(header)) + header + weights


def model_from_bytes(data: bytes, device: str = "cpu") -> LoadedModel:
    """Decode and verify a :func:`model_to_bytes` message; raises :class:`ModelLoadError`."""
    data = bytes(data or b"")
    if len(data) < 8 or data[:4] != WIRE_MAGIC:
        raise ModelLoadError("not a stream-lstm model message (bad magic)")
    (n,) = struct.unpack_from("<I", data, 4)
    if n > min(_MAX_HEADER, len(data) - 8):
        raise ModelLoadError(f"model message truncated (header of {n} bytes, message of {len(data)})")
    try:
        meta = json.loads(data[8 : 8 + n].decode("utf-8"))
    except (ValueError, RecursionError):  # (a forged header nested past the parser's depth)
        raise ModelLoadError("model message header is not valid JSON") from None
    return _build(data[8 + n :], meta, "model message", device)


def _dumps(obj: Any, indent: int | None = 2) -> bytes:
    return json.dumps(obj, indent=indent, default=_jsonable).encode("utf-8")


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to a unique temporary file beside ``path``, fsync, rename over ``path``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _version_key(version: str) -> tuple[int, int, str]:
    m = NUMBERED_RE.match(version)
    return (0, int(m.group(1)), "") if m else (1, 0, version)


class ModelRegistry:
    """Numbered model versions in a directory, and which one is promoted.

    Parameters
    ----------
    root
        The registry directory (``STREAM_LSTM_MODEL_DIR``); created on first write.

    >>> import tempfile, pathlib
    >>> reg = ModelRegistry(pathlib.Path(tempfile.mkdtemp()))
    >>> spec = ModelSpec(hidden_size=2, horizon=1)
    >>> v1 = reg.register(SimpleLSTM.from_spec(spec), spec, {})
    >>> v2 = reg.register(SimpleLSTM.from_spec(spec), spec, {"parent": v1})
    >>> reg.promote(v2); reg.rollback(v1)
    >>> reg.promoted(), [e["action"] for e in reg.history()], reg.next_version()
    ('v0001', ['promote', 'rollback'], 'v0003')
    """

    PROMOTED = "PROMOTED"
    LOG = "promotions.jsonl"

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, version: str) -> Path:
        """The weights file of ``version`` (the name is checked: no path tricks)."""
        if not isinstance(version, str) or not VERSION_RE.match(version):
            raise ModelLoadError(f"invalid model version name {version!r}")
        return self.root / f"{version}.safetensors"

    def versions(self) -> list[dict[str, Any]]:
        """Metadata of every version, oldest first (``{"version", "error"}`` if unreadable)."""
        out = []
        for p in (p for p in self.root.glob("*.json") if VERSION_RE.match(p.stem)):
            try:
                meta = json.loads(p.read_text(encoding="utf-8"))
                if not isinstance(meta, dict):
                    raise ValueError("not an object")
            except (OSError, ValueError, RecursionError) as exc:
                meta = {"error": f"unreadable metadata ({exc!r:.200})"}
            meta["version"] = p.stem
            if not (isinstance(parent := meta.get("parent"), str) and VERSION_RE.match(parent)):
                meta["parent"] = None  # (followed by serving.py, shown by `models list`: a name or none)
            out.append(meta)
        return sorted(out, key=lambda m: _version_key(m["version"]))

    def next_version(self) -> str:
        """``v0001``, ``v0002``, ...: one past the highest numbered version present."""
        numbers = [int(m.group(1)) for p in self.root.glob("v*.*")
                   if p.suffix in (".json", ".safetensors") and (m := NUMBERED_RE.match(p.stem))]
        return f"v{max(numbers, default=0) + 1:04d}"

    def register(self, model: SimpleLSTM, spec: ModelSpec, meta: dict[str, Any]) -> str:
        """Save a new version; returns its name.

        Without ``meta["version"]`` the next number is taken; the weights file is created
        exclusively, so two processes registering at once get different numbers. An explicit
        version that already exists raises ``FileExistsError``.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        weights = _weights_bytes(model, spec)
        explicit = meta.get("version")
        for _ in range(1000):
            version = explicit or self.next_version()
            path = self.path(version)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                if explicit:
                    raise FileExistsError(f"model version {version} already exists in {self.root}") from None
                continue
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(weights)
                    f.flush()
                    os.fsync(f.fileno())
                atomic_write(path.with_suffix(".json"), _dumps(_full_meta({**meta, "version": version}, spec, weights)))
            except BaseException:  # (a full disk: no partial file left, listed nowhere, its number spent)
                path.unlink(missing_ok=True)
                raise
            return version
        raise RuntimeError(f"could not allocate a version in {self.root}")

    def load(self, version: str, device: str = "cpu") -> LoadedModel:
        """Load and verify ``version``; :class:`ModelLoadError` if absent or damaged."""
        path = self.path(version)
        if not path.exists():
            raise ModelLoadError(f"no model version {version!r} in {self.root}")
        return load_model(path, device)

    def promoted(self) -> str | None:
        """The promoted version's name, or ``None`` if nothing was promoted."""
        try:
            text = (self.root / self.PROMOTED).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            return None
        return text if VERSION_RE.match(text) else None

    def promote(self, version: str, *, action: str = "promote", reason: str = "",
                expect: str | None | object = _ANY) -> None:
        """Make workers serve ``version``: verify it loads, then replace ``PROMOTED`` atomically;
        with ``expect``, only if that is still the promoted version (else
        :class:`PromotionConflict`), under a lock: a retrain cannot undo a rollback."""
        self.load(version)  # refuse to promote what cannot be served
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # (released when the file closes)
            previous = self.promoted()
            if expect is not _ANY and previous != expect:
                raise PromotionConflict(previous)
            atomic_write(self.root / self.PROMOTED, (version + "\n").encode())
            entry = {"at": _utc_now(), "action": action, "version": version, "previous": previous,
                     **({"reason": reason} if reason else {})}
            with open(self.root / self.LOG, "a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\n")

    def rollback(self, version: str, reason: str = "") -> None:
        """Promote an existing (usually older) version again, logged as a rollback: running
        workers and a trainer on this registry take it within seconds."""
        self.promote(version, action="rollback", reason=reason)

    def history(self) -> list[dict[str, Any]]:
        """Promotions and rollbacks, oldest first (from ``promotions.jsonl``)."""
        try:
            lines = (self.root / self.LOG).read_text(encoding="utf-8").splitlines()
        except OSError:
            return []
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue  # a torn last line after a crash
        return out
