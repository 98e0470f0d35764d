"""Which changelog topic a local state store's rows came from.

The store keeps each partition's checkpoint as an offset, and offsets alone cannot tell the
topic it was written from from a recreated one (deleted and made again, or another topic given
the same name) once the new one holds as many records as the checkpoint: the restore then read
the new topic from the old checkpoint on, kept the old topic's devices and missed the new
one's first records (a review). Kafka gives every topic an id that a recreation changes
(KIP-516); the store records the id of the topic it restores from, and a store of another
topic is forgotten and rebuilt from what the topic holds.
"""

from __future__ import annotations

import logging

from kafka.errors import KafkaTimeoutError

from stream_lstm.checkpointing.store import StateStore
from stream_lstm.config import Settings
from stream_lstm.kafka.clients import make_admin
from stream_lstm.kafka.deadline import call_with_deadline

log = logging.getLogger("stream_lstm.checkpointing")

_NO_ID = "00000000-0000-0000-0000-000000000000"  # (what a broker without topic ids answers)


def topic_id(settings: Settings, topic: str, timeout_s: float) -> tuple[str, list[int]] | None:
    """The id of ``topic`` and its partitions; None when the broker does not say (no such
    topic, a broker without topic ids, no Describe permission, or no answer in ``timeout_s``)."""
    admin = make_admin(settings)
    try:
        described = call_with_deadline(lambda: admin.describe_topics([topic]), timeout_s,
                                       f"describing {topic}", on_timeout=admin.close)
    except KafkaTimeoutError:
        return None
    finally:
        admin.close()
    for t in described:
        if t.get("name") == topic and not t.get("error_code") and str(t.get("topic_id") or _NO_ID) != _NO_ID:
            return str(t["topic_id"]), sorted(p["partition_index"] for p in t.get("partitions") or [])
    return None


def keep_only_this_topics_rows(settings: Settings, topic: str, store: StateStore, timeout_s: float,
                               serving: set[int] = frozenset()) -> bool:
    """Forget ``store``'s rows of another topic than ``topic`` (as it is now), but those of the
    partitions this worker is ``serving`` (their state is its own, and what it commits now goes
    to this topic), and record the topic's id; True when rows were forgotten. Without an id
    from the broker, the offsets decide alone, as before ids were kept."""
    described = topic_id(settings, topic, timeout_s)
    if described is None:
        return False
    now, partitions = described
    before = store.changelog_id()
    if before == now:
        return False
    gone = sorted(set(partitions) - set(serving))
    forgotten = before is not None and store.count(gone) > 0
    if before is not None:
        log.warning("the local state store was written from another changelog topic than %s "
                    "(topic id %s, now %s: it was deleted and recreated, or another topic took "
                    "its name); its devices of partitions %s are dropped and restored from what "
                    "the topic holds", topic, before, now, gone, extra={"topic": topic})
        store.drop_partitions(gone)
    store.set_changelog_id(now)
    return forgotten
