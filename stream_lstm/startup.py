"""What a worker needs before its first poll: the model to serve and the topics it uses.

Kept apart from the loop (:mod:`stream_lstm.worker`) because other processes start the same
way without running it: the trainer service (``stream-lstm trainer``) starts from the same
served model, and ``stream-lstm up`` and ``evaluate`` create the worker's topics before any
worker exists.
"""

from __future__ import annotations

import logging

from stream_lstm.config import Settings
from stream_lstm.models.lstm import ModelSpec, SimpleLSTM
from stream_lstm.training.lifecycle import Served

# Logged under the worker's name (the ``logger`` field of the JSON lines), as these lines
# always were: they are part of a worker's start-up.
log = logging.getLogger("stream_lstm.worker")


def fresh_model(settings: Settings) -> Served:
    """A freshly initialized, untrained model shaped by the settings (``v0000-untrained``)."""
    spec = ModelSpec(
        n_features=settings.n_features, hidden_size=settings.hidden_size,
        num_layers=settings.num_layers, horizon=settings.horizon,
        target_channel=settings.target_channel, dropout=settings.dropout,
    )
    return Served(SimpleLSTM.from_spec(spec), spec, "v0000-untrained")


def load_served_model(settings: Settings) -> Served:
    """The model to serve: STREAM_LSTM_MODEL_PATH, else the registry's promoted version,
    else a freshly initialized model (with a warning)."""
    from stream_lstm.models.registry import ModelLoadError, ModelRegistry, load_model

    if settings.model_path is not None:
        loaded = load_model(settings.model_path)
        return Served(loaded.model, loaded.spec, loaded.version)
    registry = ModelRegistry(settings.model_dir)
    promoted = registry.promoted()
    if promoted is None:
        log.warning(
            "no model given (STREAM_LSTM_MODEL_PATH) and none promoted in %s: serving a "
            "freshly initialized, untrained model", settings.model_dir,
        )
        return fresh_model(settings)
    # The promoted version first, then older ones: a damaged file never stops the service.
    candidates = [promoted] + [m["version"] for m in reversed(registry.versions())
                               if m.get("version") and m.get("version") != promoted]
    for version in candidates:
        try:
            loaded = registry.load(version)
        except ModelLoadError as exc:
            log.error("cannot load model %s: %s", version, exc)
            continue
        if version != promoted:
            log.warning("serving %s instead of the promoted %s", version, promoted)
        return Served(loaded.model, loaded.spec, loaded.version)
    raise ModelLoadError(f"no loadable model in {settings.model_dir}")


def ensure_worker_topics(settings: Settings) -> None:
    """Create the worker's topics when missing; the changelog is compacted and has as many
    partitions as the input topic (state of input partition p lives in changelog partition p)."""
    from stream_lstm.kafka.topics import TopicSpec, ensure_topics

    n = settings.topic_partitions
    names = [settings.input_topic, settings.output_topic, settings.dlq_topic]
    if settings.alerts_topic:
        names.append(settings.alerts_topic)
    ensure_topics(settings, [TopicSpec(t, n, {}) for t in names])
    from stream_lstm.checkpointing.changelog import ensure_changelog_topic
    from stream_lstm.kafka.topics import partition_count

    ensure_changelog_topic(settings, partition_count(settings, settings.input_topic))
