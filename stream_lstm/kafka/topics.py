"""Topic creation: idempotent, safe when several workers race, and waits until topics are usable."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import kafka.errors as Errors
from kafka.errors import TopicAlreadyExistsError

from stream_lstm.config import Settings
from stream_lstm.kafka.clients import make_admin

log = logging.getLogger("stream_lstm.kafka")


@dataclass(frozen=True)
class TopicSpec:
    """A topic to create: name, partitions and topic configs (e.g. ``cleanup.policy``).

    Parameters
    ----------
    name
        The topic.
    partitions
        Its partition count when created (an existing topic keeps its own).
    config
        Topic configs, e.g. ``{"cleanup.policy": "compact"}``.

    Examples
    --------
    >>> spec = TopicSpec("sensor-readings", 4, {"retention.ms": "86400000"})
    >>> spec.partitions, spec.config["retention.ms"]
    (4, '86400000')
    """

    name: str
    partitions: int
    config: dict[str, str] = field(default_factory=dict)


def ensure_topics(settings: Settings, specs: list[TopicSpec], timeout_s: float = 30.0) -> None:
    """Create the topics that are missing, then wait until every one has a leader everywhere.

    Existing topics are left as they are (their partition count is the caller's concern, see
    :func:`partition_count`). A topic created by someone else between our listing and our
    create request (another worker starting at the same time) counts as created.
    Raises ``kafka.errors.KafkaTimeoutError`` when the topics are not usable in ``timeout_s``.
    """
    if not specs:
        return
    admin = make_admin(settings)
    try:
        existing = set(admin.list_topics())
        for spec in specs:
            if spec.name in existing:
                continue
            try:
                admin.create_topics({spec.name: {
                    "num_partitions": spec.partitions,
                    "replication_factor": settings.replication_factor,
                    "configs": {k: str(v) for k, v in spec.config.items()},
                }})
            except TopicAlreadyExistsError:
                pass  # another worker created it first: fine
        # CreateTopics returns before the new partitions have leaders in the metadata cache
        # (KRaft propagates them asynchronously); producing at once could fail.
        admin.wait_for_topics([s.name for s in specs], timeout_ms=int(timeout_s * 1000))
    finally:
        admin.close()


def delete_leftovers(settings: Settings, topics: list[str], groups: list[str]) -> tuple[list[str], list[str]]:
    """Delete those of ``topics`` and of the consumer ``groups`` that exist (a run's own, at its
    end: a shared cluster must not collect a set a run); the topics and groups deleted.

    A group still in use is not deleted (the broker refuses it: said in the log, not raised).
    """
    admin = make_admin(settings)
    try:
        there = set(admin.list_topics())
        gone = [t for t in topics if t in there]
        if gone:
            admin.delete_topics(gone)
        known = {g["group_id"] for g in admin.list_groups()} if groups else set()
        mine = [g for g in groups if g in known]
        gone_groups = []
        # kafka-python 3.x answers {group: "OK" or the error's name} (its docstring says a list).
        for group, outcome in (admin.delete_groups(mine) if mine else {}).items():
            if outcome == "OK":
                gone_groups.append(group)
            else:
                log.warning("could not delete consumer group %s: %s", group, outcome)
        return gone, gone_groups
    finally:
        admin.close()


class TopicNotFoundError(LookupError):
    """The topic does not exist (:func:`partition_count`)."""


def partition_count(settings: Settings, topic: str) -> int:
    """Number of partitions of an existing topic.

    Raises :class:`TopicNotFoundError` when there is no such topic: the broker then describes
    it with an error and no partitions, and a count of 0 would pass for an answer (the
    supervisor would size its workers by it rather than by the partitions the worker creates
    the topic with). Any other error the broker reports for the topic (not authorized, say)
    is raised as kafka-python's error for it, naming the topic.
    """
    admin = make_admin(settings)
    try:
        (described,) = admin.describe_topics([topic])
    finally:
        admin.close()
    error = Errors.for_code(described.get("error_code", 0))
    if error is Errors.UnknownTopicOrPartitionError:
        raise TopicNotFoundError(f"topic {topic!r} does not exist at {settings.bootstrap_servers}")
    if error is not Errors.NoError:
        raise error(f"describing topic {topic!r}")
    return len(described["partitions"])


# ---- the worker's topics ---------------------------------------------------------------
CHANGELOG_CONFIG = {
    "cleanup.policy": "compact",
    # Roll segments often enough (10 min or 64 MiB) that the cleaner, which never touches
    # the active segment, keeps a restore near one record per device.
    "segment.ms": "600000",
    "segment.bytes": str(64 * 1024 * 1024),
    "min.cleanable.dirty.ratio": "0.1",
    # Correctness does not need a lag; one minute keeps the cleaner from rewriting a busy
    # partition's freshly rolled segments over and over, and leaves the very latest history
    # readable for debugging.
    "min.compaction.lag.ms": "60000",
    # Tombstones stay one day: a restore slower than that could resurrect a deleted device.
    "delete.retention.ms": "86400000",
}


class ChangelogTopicError(RuntimeError):
    """A compacted topic of the service's own that is not as it must be: the changelog with a
    partition count other than the input topic's, or the changelog, the models topic or the
    alert relay's store of open alerts without compaction."""


def require_compacted(settings: Settings, topic: str, what: str, loss: str, remedy: str) -> dict[str, str]:
    """Refuse ``topic`` (:class:`ChangelogTopicError`: ``what``, what is lost, what to do) when it
    deletes instead of compacting: created by someone else, or auto-created with the broker's
    defaults. Returns its configuration as read (:func:`topic_config`). One the broker will not
    describe is said, not refused: kafka-python 3.0.12 ignores a refusal's error code (no
    DescribeConfigs ACL) and answers an empty configuration, which read as "delete" refused a
    compacted topic (a review)."""
    config = topic_config(settings, topic)
    if (policy := config.get("cleanup.policy")) is None:
        log.warning(f"cannot read the configuration of {topic} (the principal may lack DescribeConfigs "
                    "on it): make sure its cleanup.policy is compact")
    elif "compact" not in policy:
        raise ChangelogTopicError(f"{what} {topic} has cleanup.policy={policy}: it must be compacted "
                                  f"(cleanup.policy=compact), or {loss}. {remedy}")
    return config


def topic_config(settings: Settings, topic: str) -> dict[str, str]:
    """``{name: value}`` of ``topic``'s configuration, the broker's defaults included (kafka-python
    3 answers only the topic's own settings unless asked for all: a topic created with the
    broker's defaults passed the retention and compaction checks it fails)."""
    from kafka.admin import ConfigResource, ConfigResourceType

    admin = make_admin(settings)
    try:
        response = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)], config_filter="all")
    finally:
        admin.close()
    entries = response.get("topic", {}).get(topic, {})  # kafka-python 3's answer
    return {name: entry["value"] for name, entry in entries.items()}


def changelog_topic_spec(settings: Settings, partitions: int | None = None) -> TopicSpec:
    """The state changelog topic (``checkpointing/changelog.py``): compacted, ``partitions``
    (default ``settings.topic_partitions``) partitions, which must equal the input topic's for
    co-partitioning.

    >>> spec = changelog_topic_spec(Settings(group_id="g"), partitions=6)
    >>> spec.name, spec.partitions, spec.config["cleanup.policy"]
    ('g-state-changelog', 6, 'compact')
    """
    n = settings.topic_partitions if partitions is None else partitions
    return TopicSpec(settings.changelog_topic_name(), n, dict(CHANGELOG_CONFIG))


def ensure_changelog_topic(settings: Settings, partitions: int) -> None:
    """Create the changelog topic if missing (idempotent; racing workers are fine).

    One with fewer partitions grows to ``partitions``: someone added partitions to the input
    topic (Kafka cannot take them away), and a new input partition's state needs its changelog
    partition. The others keep theirs. (A device whose readings now land on another partition
    starts afresh there: Kafka moves no records when partitions are added.) Raises
    :class:`ChangelogTopicError` if it has more partitions than ``partitions``: state of input
    partition p would then not be in changelog partition p.
    """
    spec = changelog_topic_spec(settings, partitions)
    ensure_topics(settings, [spec])  # TopicAlreadyExistsError is handled there
    actual = partition_count(settings, spec.name)
    if actual < partitions:
        log.warning(f"the input topic {settings.input_topic} has grown to {partitions} partitions "
                    f"(the changelog {spec.name} had {actual}): the changelog grows with it; "
                    "devices whose readings now land on another partition start afresh there")
        _grow(settings, spec.name, partitions)
    elif actual > partitions:
        raise ChangelogTopicError(
            f"changelog topic {spec.name} has {actual} partitions but the input topic has "
            f"{partitions}; they must match (state of input partition p lives in changelog "
            "partition p). Delete the changelog topic or set STREAM_LSTM_CHANGELOG_TOPIC."
        )
    config = require_compacted(settings, spec.name, "changelog topic", "the checkpoints of quiet "
                               "devices are deleted", "Alter the topic, delete it (the worker creates "
                               "it compacted) or set STREAM_LSTM_CHANGELOG_TOPIC.")
    # Tombstones kept less long than ours: a local store reused within half our time
    # (checkpointing/restoring.py) could bring back a device whose tombstone is gone.
    ours = int(CHANGELOG_CONFIG["delete.retention.ms"])
    if 0 <= (kept := int(config.get("delete.retention.ms", "-1"))) < ours:
        log.warning(f"changelog topic {spec.name} keeps tombstones for delete.retention.ms={kept}, "
                    f"less than the {ours} ms its workers' local stores rely on: a device the TTL "
                    f"forgot may come back after a restart. Set delete.retention.ms={ours}")


def _grow(settings: Settings, topic: str, partitions: int) -> None:
    from kafka.admin import NewPartitions

    admin = make_admin(settings)
    try:
        admin.create_partitions({topic: NewPartitions(total_count=partitions)})
    except Errors.InvalidPartitionsError:  # (another worker grew it first)
        pass
    finally:
        admin.close()


def ensure_worker_topics(settings: Settings) -> None:
    """Create the worker's topics when missing; the changelog is compacted and has as many
    partitions as the input topic (state of input partition p lives in changelog partition p)."""
    n = settings.topic_partitions
    names = [settings.input_topic, settings.output_topic, settings.dlq_topic]
    if settings.alerts_topic:
        names.append(settings.alerts_topic)
    ensure_topics(settings, [TopicSpec(t, n, {}) for t in names])
    ensure_changelog_topic(settings, partition_count(settings, settings.input_topic))
