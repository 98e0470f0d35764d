"""The weights of every model version this host served, kept by version beside the registry.

A device's checkpoint names the model version its h/c came from, and after a hot swap a
restored device steps under that version until a slice re-warms it (training/lifecycle.py):
the worker that restores it needs those weights again, by version. The registry
(``STREAM_LSTM_MODEL_DIR``) holds only the versions it numbered. A fresh untrained model, a file
given by ``STREAM_LSTM_MODEL_PATH`` or a model from the models topic is in no registry, so each
version a worker serves is also kept in ``<model_dir>/served/``, in the registry's own format
(safetensors + JSON, sha256-checked on load, never unpickled), unless the registry beside it
holds the same weights under that name:

* **when**: as the worker starts serving a model (before its first poll), and right after each
  swap on a thread of its own (:meth:`ServedModels.keep`: 1 to 10 ms of serialising and
  writing that the swap's loop turn does not wait for). The files are replaced whole
  (temporary file + rename) but not fsynced. A crash within those milliseconds, or a file torn
  by a power loss (it fails its checksum), only costs the devices an immediate re-warm.
* **pruned** to the :data:`KEEP` versions served last (each serve or hold refreshes a version's
  time), never one a worker holds: the cache cannot grow for ever.
* **one name, one set of weights**: the worker processes of a host (``STREAM_LSTM_PROCESSES``)
  share the directory, and a fresh model is always named ``v0000-untrained``, so a worker that
  starts with no model serves the host's untrained model when one is kept (:meth:`fresh`);
  otherwise the name would stand for other weights in each process. A version served again
  with other weights replaces the kept ones (logged).

>>> import tempfile, pathlib
>>> from stream_lstm.models.lstm import ModelSpec, SimpleLSTM
>>> models = ServedModels(pathlib.Path(tempfile.mkdtemp()))
>>> spec = ModelSpec(hidden_size=4, horizon=2)
>>> served = LoadedModel.of(SimpleLSTM.from_spec(spec), spec, "v0000-untrained")
>>> models.remember(served)
>>> models.kept(), models.load("v0000-untrained").spec == spec
(['v0000-untrained'], True)
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from stream_lstm.models.registry import (
    LoadedModel,
    ModelLoadError,
    ModelRegistry,
    load_model,
    model_files,
)

log = logging.getLogger("stream_lstm.models")

# Versions kept at most (besides those held): a checkpoint names a version until its device is
# re-warmed (seconds after a swap for a device in memory); only a device out of memory for
# longer than this many swaps needs an older one, and it falls back to an immediate re-warm.
KEEP = 16
DIR = "served"


class ServedModels:
    """The served versions' weights in ``<model_dir>/served/``, by version.

    Parameters
    ----------
    model_dir
        The registry directory (``STREAM_LSTM_MODEL_DIR``); versions the registry holds with
        the same weights are not copied, and :meth:`load` looks there too.
    keep
        Versions kept at most, besides those a caller holds (:data:`KEEP`).

    >>> import tempfile, pathlib
    >>> from stream_lstm.models.lstm import ModelSpec, SimpleLSTM
    >>> models = ServedModels(pathlib.Path(tempfile.mkdtemp()), keep=2)
    >>> spec = ModelSpec(hidden_size=4, horizon=2)
    >>> for v in ("v1", "v2", "v3"):  # a worker serving v3 still holds v1 for some devices
    ...     models.remember(LoadedModel.of(SimpleLSTM.from_spec(spec), spec, v),
    ...                     holding=["v1"] if v == "v3" else [])
    >>> sorted(models.kept())  # the two served or held last
    ['v1', 'v3']
    """

    def __init__(self, model_dir: Path, keep: int = KEEP) -> None:
        self.registry = ModelRegistry(Path(model_dir))
        self.root = Path(model_dir) / DIR
        self.limit = keep
        self._thread: ThreadPoolExecutor | None = None

    def path(self, version: str) -> Path:
        """Where ``version``'s weights are kept (the name is checked: no path tricks)."""
        return self.root / self.registry.path(version).name

    def kept(self) -> list[str]:
        """The versions kept, served longest ago first."""
        return [v for v, _ in sorted(self._times().items(), key=lambda kv: (kv[1], kv[0]))]

    def remember(self, served: LoadedModel, holding: Iterable[str] = ()) -> None:
        """``served`` is served from now on: keep its weights (unless kept already, here or in
        the registry, the same), refresh the time of it and of the versions in ``holding``
        (those a worker still holds for its devices), and prune the rest to ``keep``."""
        version = served.version
        path = self.path(version)
        weights, meta = model_files(served.model, served.spec, {**served.meta, "version": version})
        digest = hashlib.sha256(weights).hexdigest()
        kept = _digest(path)
        if kept is not None and kept != digest:
            log.warning("model version served again with other weights: the kept ones are "
                        "replaced (devices checkpointed under the earlier ones step under "
                        "these after a restore)", extra={"version": version})
        if _digest(self.registry.path(version)) == digest:  # the registry has it: no copy
            if kept is not None and kept != digest:
                _remove(path)
        elif kept != digest:
            self.root.mkdir(parents=True, exist_ok=True)
            _write(path, weights)  # the weights first: the metadata vouches for them
            _write(path.with_suffix(".json"), meta)
        held = {version, *holding}
        for v in held:
            with contextlib.suppress(OSError, ModelLoadError):
                os.utime(self.path(v).with_suffix(".json"))
        self._prune(held)

    def keep(self, served: LoadedModel, holding: Iterable[str] = (), wait: bool = False) -> None:
        """:meth:`remember`, on a thread of this object's own (one keep at a time, in order)
        unless ``wait``; a failure (a read-only model dir, say) is logged, not raised: the
        worker serves on, and its devices would fall back to an immediate re-warm."""
        if self._thread is None:
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="served-models")
        done = self._thread.submit(self._remember_or_say, served, list(holding))
        if wait:
            done.result()

    def close(self) -> None:
        """Wait for the keeps under way."""
        if self._thread is not None:
            self._thread.shutdown(wait=True)
            self._thread = None

    def _remember_or_say(self, served: LoadedModel, holding: list[str]) -> None:
        try:
            self.remember(served, holding)
        except Exception as exc:  # noqa: BLE001 - keeping is best effort: serve on
            log.warning("the served model's weights could not be kept: devices restored under "
                        "it after a swap are re-warmed at once", extra={
                            "version": served.version, "error": repr(exc)[:300]})

    def load(self, version: str, device: str = "cpu") -> LoadedModel:
        """``version``'s weights as this host served them, else the registry's;
        :class:`ModelLoadError` when neither has them (or they fail their checks)."""
        path = self.path(version)
        if path.exists():
            return load_model(path, device)
        return self.registry.load(version, device)

    def fresh(self, new: LoadedModel) -> tuple[LoadedModel, bool]:
        """The host's untrained model: the one kept under ``new``'s version with ``new``'s
        spec, else ``new``, kept first; and whether it was kept before. Processes starting at
        once agree on one (a lock file)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".fresh.lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                kept = load_model(self.path(new.version))
            except ModelLoadError:
                kept = None
            if kept is not None and kept.spec == new.spec:
                self.remember(kept)
                return kept, True
            self.remember(new)
            try:  # as kept: with the created_at every other process (and a restart) reads
                return load_model(self.path(new.version)), False  # (the dashboard's "promoted")
            except ModelLoadError:  # (not readable back as kept: serve it as made)
                return new, False

    def _times(self) -> dict[str, float]:
        times = {}
        for meta in self.root.glob("*.json"):
            with contextlib.suppress(OSError):
                times[meta.stem] = meta.stat().st_mtime
        return times

    def _prune(self, held: set[str]) -> None:
        """Keep the ``keep`` versions served or held last, and those in ``held``."""
        kept = self.kept()
        for version in [v for v in kept[: max(0, len(kept) - self.limit)] if v not in held]:
            _remove(self.path(version))
            log.info("pruned a kept model version", extra={"version": version})


def _digest(weights_path: Path) -> str | None:
    """The sha256 the metadata beside ``weights_path`` gives, or None (absent, unreadable)."""
    try:
        meta = json.loads(weights_path.with_suffix(".json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta.get("sha256") if isinstance(meta, dict) and weights_path.exists() else None


def _remove(weights_path: Path) -> None:
    for path in (weights_path, weights_path.with_suffix(".json")):
        with contextlib.suppress(OSError):
            path.unlink()


def _write(path: Path, data: bytes) -> None:
    """Replace ``path`` whole (a unique temporary file, renamed); no fsync (see the module)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
