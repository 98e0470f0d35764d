"""The model a worker serves: from STREAM_LSTM_MODEL_PATH, the registry, or a fresh one, and
checked against the settings before the first poll.

The trainer service (``stream-lstm trainer``) starts from the same served model.
"""

from __future__ import annotations

import logging

import torch

from stream_lstm.config import Settings, SettingsError
from stream_lstm.models.lstm import ModelSpec, SimpleLSTM
from stream_lstm.models.registry import LoadedModel, ModelLoadError, ModelRegistry, load_model
from stream_lstm.models.served_models import ServedModels

# Logged under the worker's name (the ``logger`` field of the JSON lines), as these lines
# always were: they are part of a worker's start-up.
log = logging.getLogger("stream_lstm.worker")
UNTRAINED = "v0000-untrained"  # a fresh model's name, the same on every host (fresh_model)


def fresh_model(settings: Settings) -> LoadedModel:
    """A freshly initialized, untrained model shaped by the settings (``v0000-untrained``).

    Its weights follow from its shape alone (a fixed seed, the caller's random state left as it
    was): every host's ``v0000-untrained`` of one shape is the same model, so a device whose
    partition moves to another worker before any trained model exists keeps stepping under the
    weights its state was made with (each pod used to draw its own, under the same name).

    >>> s = Settings(hidden_size=4, horizon=2)
    >>> a, b = fresh_model(s), fresh_model(s)
    >>> a.version, bool(torch.equal(a.model.head.weight, b.model.head.weight))
    ('v0000-untrained', True)
    """
    spec = ModelSpec(
        n_features=settings.n_features, hidden_size=settings.hidden_size,
        num_layers=settings.num_layers, horizon=settings.horizon,
        target_channel=settings.target_channel, dropout=settings.dropout,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = SimpleLSTM.from_spec(spec)
    return LoadedModel.of(model, spec, UNTRAINED)


class ModelSettingsMismatch(SettingsError):
    """The served model's shape contradicts the settings (horizon, channels, target)."""


# What a served model must agree with, because it is the wire contract: the forecast's length,
# the readings' channels and the channel forecast. A served model with other values is refused.
CONTRACT = ("horizon", "n_features", "target_channel")
# What only shapes a fresh model: a served model keeps its own architecture, and says so.
ARCHITECTURE = ("hidden_size", "num_layers")
# How the readings a model sees are normalised: a model trained under other ones is served,
# with a warning at start (its inputs are scaled otherwise until a retrain here).
NORMALIZATION = ("normalizer", "normalizer_alpha", "std_floor")


def check_model_matches_settings(served: LoadedModel, settings: Settings, source: str) -> None:
    """Refuse a model whose horizon, channels or target differ from the settings; warn when
    only its architecture (hidden size, layers) does.

    Refusing is the choice for the contract: a worker told ``STREAM_LSTM_HORIZON=6`` that
    publishes 12-step forecasts breaks every consumer silently. The error names both values
    and both ways out.

    >>> s = Settings(horizon=6)
    >>> check_model_matches_settings(fresh_model(Settings(horizon=12)), s, "the registry")
    Traceback (most recent call last):
    ...
    stream_lstm.models.serving.ModelSettingsMismatch: the served model v0000-untrained (from the registry) has horizon=12, but STREAM_LSTM_HORIZON=6; set STREAM_LSTM_HORIZON=12, or serve a model made for these settings (STREAM_LSTM_MODEL_PATH, or another STREAM_LSTM_MODEL_DIR, or `stream-lstm models rollback` to an earlier version)
    """
    spec = served.spec
    wrong = [(k, getattr(spec, k), getattr(settings, k)) for k in CONTRACT
             if getattr(spec, k) != getattr(settings, k)]
    if wrong:
        has = ", ".join(f"{k}={m}" for k, m, _ in wrong)
        told = ", ".join(f"STREAM_LSTM_{k.upper()}={v}" for k, _, v in wrong)
        fix = " ".join(f"STREAM_LSTM_{k.upper()}={m}" for k, m, _ in wrong)
        raise ModelSettingsMismatch(
            f"the served model {served.version} (from {source}) has {has}, but {told}; set "
            f"{fix}, or serve a model made for these settings (STREAM_LSTM_MODEL_PATH, or "
            "another STREAM_LSTM_MODEL_DIR" + (", or `stream-lstm models rollback` to an earlier "
                                               "version" if source.startswith("the registry") else "") + ")")
    for k in ARCHITECTURE:
        if getattr(spec, k) != getattr(settings, k):
            log.warning("the served model keeps its own %s=%s; STREAM_LSTM_%s=%s shapes only a "
                        "fresh model", k, getattr(spec, k), k.upper(), getattr(settings, k),
                        extra={"model_version": served.version, "source": source})
    trained = served.meta.get("settings") or {}
    if all(k in trained for k in NORMALIZATION):  # (recorded by `train` and by every retrain)
        theirs, ours = _normalization(trained), _normalization(settings.model_dump(include=set(NORMALIZATION)))
        if theirs != ours:
            log.warning("the served model %s was trained on readings normalised with %s, this worker "
                        "normalises with %s: its forecasts are off until it is retrained here, or "
                        "set those STREAM_LSTM_ settings to the model's", served.version,
                        _said(theirs), _said(ours), extra={"model_version": served.version, "source": source})


def _normalization(values: dict) -> dict:
    """The normalisation settings that matter (the EWM weight only for the EWM normalizer)."""
    return {k: values[k] for k in NORMALIZATION if k != "normalizer_alpha" or values["normalizer"] == "ewm"}


def _said(values: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items())


def load_served_model(settings: Settings) -> LoadedModel:
    """The model to serve: STREAM_LSTM_MODEL_PATH, else the registry's promoted version,
    else a freshly initialized model (with a warning). Says which and from where, and refuses
    one that contradicts the settings (:func:`check_model_matches_settings`)."""
    served, source = _find_served_model(settings)
    check_model_matches_settings(served, settings, source)
    log.info("serving model %s from %s", served.version, source,
             extra={"model_version": served.version, "source": source,
                    "horizon": served.spec.horizon, "n_features": served.spec.n_features})
    return served


def _find_served_model(settings: Settings) -> tuple[LoadedModel, str]:
    registry = ModelRegistry(settings.model_dir)
    promoted = registry.promoted()
    if settings.model_path is not None:
        loaded = load_model(settings.model_path)
        source = f"STREAM_LSTM_MODEL_PATH={settings.model_path}"
        if promoted is None or promoted == loaded.version:
            return loaded, source
        # A promotion retrained from the file's model (its parent chain leads there) is what
        # this worker served before its restart: going back to the file would take the fleet's
        # versions backwards and drop every promotion. An unrelated promotion: the file wins.
        if descends_from(registry, promoted, loaded.version):
            try:
                return registry.load(promoted), (f"the registry {settings.model_dir} (promoted, retrained from "
                                                 f"{source}; remove its PROMOTED to serve the file)")
            except ModelLoadError as exc:
                log.error("cannot load model %s: %s", promoted, exc)
        log.warning("STREAM_LSTM_MODEL_PATH wins over the registry's promoted %s, which was not "
                    "retrained from it (unset it to serve the registry's)", promoted)
        return loaded, source
    if promoted is None:
        loaded, source = _host_fresh_model(settings)
        # (Said as it is: "freshly initialized" at every restart contradicted the next line,
        # which names the untrained model this host kept from its first start.)
        log.warning("no model given (STREAM_LSTM_MODEL_PATH) and none promoted in %s: serving an "
                    "untrained model, %s", settings.model_dir,
                    "the one this host kept" if source.startswith("this host") else "freshly initialized")
        return loaded, source
    # The promoted version first, then the ones before it, newest first (the version a rollback
    # would go back to), then any later: a damaged file never stops the service. (Newest first
    # overall put back the very version a rollback had left.)
    versions = [m["version"] for m in registry.versions() if m.get("version") and not m.get("pruned")]
    before = versions[: versions.index(promoted)] if promoted in versions else []
    candidates = [promoted, *reversed(before), *(v for v in reversed(versions) if v != promoted and v not in before)]
    for version in candidates:
        try:
            loaded = registry.load(version)
        except ModelLoadError as exc:
            log.error("cannot load model %s: %s", version, exc)
            continue
        if version != promoted:
            log.warning("serving %s instead of the promoted %s", version, promoted)
        return (loaded,
                f"the registry {settings.model_dir}" + (" (promoted)" if version == promoted else ""))
    raise ModelLoadError(f"no loadable model in {settings.model_dir}")


def descends_from(registry: ModelRegistry, version: str, ancestor: str) -> bool:
    """Whether ``version`` was retrained from ``ancestor`` (its parents lead there): with
    ``STREAM_LSTM_MODEL_PATH`` set, the only promotions a worker serves instead of the file,
    at start and when one is made while it runs (training/retrainer.py)."""
    return ancestor in _ancestors(registry, version)


def _ancestors(registry: ModelRegistry, version: str) -> list[str]:
    """The versions ``version`` was retrained from, nearest first (its metadata's ``parent``)."""
    parents = {m["version"]: m.get("parent") for m in registry.versions()}
    out: list[str] = []
    while (version := parents.get(version)) and version not in out and len(out) < 1000:  # type: ignore[assignment]
        out.append(version)
    return out


def _host_fresh_model(settings: Settings) -> tuple[LoadedModel, str]:
    """The untrained model this host served before (kept beside the registry), else a new
    one, kept: ``v0000-untrained`` then names one set of weights in every worker process of
    the host and across restarts, as a checkpoint that names it needs."""
    new = fresh_model(settings)
    try:
        served, before = ServedModels(settings.model_dir).fresh(new)  # type: ignore[arg-type]
    except OSError as exc:  # e.g. a read-only model dir: this process's own
        log.warning("the fresh model could not be kept: %s", exc)
        return new, "a fresh initialization (untrained)"
    if before:
        return served, f"this host's untrained model (kept in {settings.model_dir}/served)"
    return served, "a fresh initialization (untrained)"
