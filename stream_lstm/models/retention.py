"""How many model versions the registry keeps the weights of.

Every promotion registers a version (``ModelRegistry.register``), so a worker retraining on a
schedule added one a retrain for ever: ~75 KB of weights each at the default size, megabytes
at a larger one, on a volume nobody watches. After each promotion the retrainer prunes
(:func:`prune`): the weights of numbered versions older than the newest :data:`KEEP` are
deleted, never the promoted one's (a rollback may have gone far back). Their metadata stays,
marked ``"pruned": true``: a version's parents still lead back to the file it was first
trained from (``serving.descends_from``, which decides what a restart serves), ``stream-lstm
models list`` still shows the lineage, and a rollback to a pruned version is refused with
its reason. A checkpoint that names a pruned version does not need the registry: a worker
keeps the weights of the versions it served in ``<model_dir>/served/`` (served_models.py).

>>> import tempfile, pathlib
>>> from stream_lstm.models.lstm import ModelSpec, SimpleLSTM
>>> from stream_lstm.models.registry import ModelRegistry
>>> reg, spec = ModelRegistry(pathlib.Path(tempfile.mkdtemp())), ModelSpec(hidden_size=2, horizon=1)
>>> for _ in range(4):
...     reg.promote(reg.register(SimpleLSTM.from_spec(spec), spec, {}))
>>> prune(reg, keep=2), sorted(p.stem for p in reg.root.glob("*.safetensors"))
(['v0001', 'v0002'], ['v0003', 'v0004'])
"""

from __future__ import annotations

import json
import logging

from stream_lstm.models.registry import NUMBERED_RE, ModelRegistry, atomic_write

log = logging.getLogger("stream_lstm.models")

# Versions whose weights are kept (the promoted one besides): a rollback can go this many
# promotions back; older ones were retrained past long ago.
KEEP = 20


def prune(registry: ModelRegistry, keep: int | None = None) -> list[str]:
    """Delete the weights of the numbered versions older than the newest ``keep`` (default
    :data:`KEEP`; never the promoted one), marking their metadata ``pruned``; returns the
    versions pruned."""
    keep = KEEP if keep is None else keep
    promoted = registry.promoted()
    numbered = [m for m in registry.versions() if NUMBERED_RE.match(m["version"]) and "error" not in m]
    pruned = []
    for meta in numbered[: max(0, len(numbered) - keep)]:
        version = meta["version"]
        weights = registry.path(version)
        if version == promoted or meta.get("pruned") or not weights.exists():
            continue
        meta["pruned"] = True  # (written first: a crash between leaves weights, not a lie)
        atomic_write(weights.with_suffix(".json"), (json.dumps(meta, indent=2) + "\n").encode())
        weights.unlink(missing_ok=True)
        pruned.append(version)
    if pruned:
        log.info("model registry: weights of old versions deleted",
                 extra={"versions": pruned, "kept": keep, "model_dir": str(registry.root)})
    return pruned
