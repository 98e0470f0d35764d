"""Topic creation: idempotent, safe when several workers race, and waits until topics are usable.

>>> TopicSpec("readings", 4, {"retention.ms": "86400000"}).partitions
4
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kafka.errors import TopicAlreadyExistsError

from stream_lstm.config import Settings
from stream_lstm.kafka.clients import make_admin


@dataclass(frozen=True)
class TopicSpec:
    """A topic to create: name, partitions and topic configs (e.g. ``cleanup.policy``)."""

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


def partition_count(settings: Settings, topic: str) -> int:
    """Number of partitions of an existing topic."""
    admin = make_admin(settings)
    try:
        (described,) = admin.describe_topics([topic])
        return len(described["partitions"])
    finally:
        admin.close()

