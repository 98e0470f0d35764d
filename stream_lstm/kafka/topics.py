"""Topic creation: idempotent, and waits until the broker shows the topics."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from kafka.admin import NewTopic
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
    """Create the missing topics; existing ones are left as they are."""
    admin = make_admin(settings)
    try:
        existing = set(admin.list_topics())
        missing = [s for s in specs if s.name not in existing]
        for spec in missing:
            try:
                admin.create_topics([NewTopic(spec.name, spec.partitions, settings.replication_factor,
                                              topic_configs=dict(spec.config))])
            except TopicAlreadyExistsError:
                pass  # another worker created it first
        deadline = time.monotonic() + timeout_s
        while missing and time.monotonic() < deadline:
            described = admin.describe_topics([s.name for s in missing])
            if all(t.get("partitions") and not t.get("error_code") for t in described):
                return
            time.sleep(0.2)
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
