"""Topic creation: idempotent, safe when several workers race, and waits until topics are usable.

>>> TopicSpec("readings", 4, {"retention.ms": "86400000"}).partitions
4
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from kafka import KafkaConsumer
from kafka.errors import KafkaTimeoutError, TopicAlreadyExistsError

from stream_lstm.config import Settings
from stream_lstm.kafka.clients import make_admin
from stream_lstm.kafka.deadline import call_with_deadline

log = logging.getLogger("stream_lstm.kafka")


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


def wait_for_partition_metadata(consumer: KafkaConsumer, topics: list[str],
                                timeout_s: float = 60.0) -> dict[str, int]:
    """Block until ``consumer``'s own metadata lists the partitions of every topic in ``topics``.

    Why: a consumer that joins its group before its topic's metadata has reached it is
    assigned nothing, and kafka-python looks again only at its next metadata refresh. A worker
    that starts together with its topic (a fresh compose stack or namespace) then sat idle for
    minutes. Subscribing after this returns makes the first assignment see every partition.
    Returns the partition count per topic; raises ``KafkaTimeoutError`` after ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    counts: dict[str, int] = {}
    next_note = time.monotonic() + 5.0
    while True:
        for topic in topics:
            if topic not in counts:
                # Refreshes metadata when the topic is unknown, with no deadline of its own.
                found = call_with_deadline(lambda t=topic: consumer.partitions_for_topic(t),
                                           max(1.0, deadline - time.monotonic()),
                                           f"fetching the metadata of {topic}")
                if found:
                    counts[topic] = len(found)
        missing = [t for t in topics if t not in counts]
        if not missing:
            return counts
        now = time.monotonic()
        if now >= deadline:
            raise KafkaTimeoutError(f"no partition metadata for {missing} after {timeout_s:.0f} s")
        if now >= next_note:
            next_note = now + 5.0
            log.info("waiting for partition metadata before joining the group",
                     extra={"topics": missing})
        time.sleep(0.1)  # a metadata round trip each turn: do not spin on the broker
