"""The state changelog: a compacted topic keyed by device id, and restore from it.

Changelog partition ``p`` holds the devices whose readings arrive on input partition ``p``
(co-partitioning), so restoring an assigned input partition means reading one changelog
partition. Records are written inside the batch's transaction; restore reads with
``read_committed``, so it sees exactly the state whose forecasts were published.

Restore never hangs: it reads each partition up to the end offset taken when it starts
(under ``read_committed`` that is the last stable offset), checks positions rather than
waiting for records (positions move past transaction markers and aborted records even when a
poll returns nothing), gives up after a timeout, and stops early when ``cancelled()`` says so
(for example, a bounded time slice between polls, or the partitions being revoked).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from kafka.structs import TopicPartition

from stream_lstm.checkpointing.codec import encode_snapshot
from stream_lstm.checkpointing.store import StateStore
from stream_lstm.config import Settings
from stream_lstm.kafka.clients import make_consumer
from stream_lstm.kafka.topics import TopicSpec, ensure_topics
from stream_lstm.state.snapshot import DeviceSnapshot

CHANGELOG_CONFIG = {
    "cleanup.policy": "compact",
    # Compact soon after a segment rolls, so a restore reads about one record per device.
    "segment.ms": "600000",
    "min.cleanable.dirty.ratio": "0.1",
    "delete.retention.ms": "86400000",
}


class RestoreTimeout(RuntimeError):
    """Restore did not reach the end offsets in time."""


@dataclass
class RestoreResult:
    """Records applied per partition, time taken, and whether every partition is complete."""

    restored: dict[int, int] = field(default_factory=dict)
    seconds: float = 0.0
    complete: bool = True
    skipped: int = 0


def ensure_changelog_topic(settings: Settings, partitions: int) -> None:
    """Create the compacted changelog topic with as many partitions as the input topic."""
    ensure_topics(settings, [TopicSpec(settings.changelog_topic_name(), partitions, CHANGELOG_CONFIG)])


def changelog_records(snaps: list[DeviceSnapshot]) -> list[tuple[bytes, bytes, int]]:
    """``(key, value, partition)`` per snapshot; the partition is the device's input partition."""
    return [(s.device_id.encode(), encode_snapshot(s), s.partition) for s in snaps]


def tombstone(device_id: str, partition: int) -> tuple[bytes, None, int]:
    """A record that deletes the device from the compacted changelog."""
    return device_id.encode(), None, partition


def restore(
    settings: Settings,
    topic: str,
    partitions: list[int],
    store: StateStore,
    *,
    progress: Callable[[int, int, int], None] | None = None,
    cancelled: Callable[[], bool] = lambda: False,
    timeout_s: float = 300.0,
) -> RestoreResult:
    """Bring ``store`` up to date with the changelog for ``partitions``.

    Each partition is read from the store's checkpoint (or from the log start, when the
    checkpoint is missing or the log was truncated past it). Records are applied as raw bytes;
    tombstones delete. Checkpoints advance after every applied chunk, so a cancelled restore
    resumes where it stopped.
    """
    t0 = time.monotonic()
    result = RestoreResult(restored={p: 0 for p in partitions})
    if not partitions:
        return result
    tps = [TopicPartition(topic, p) for p in partitions]
    consumer = make_consumer(
        settings, group_id=None, enable_auto_commit=False, isolation_level="read_committed",
        client_id=f"stream-lstm-restore-{uuid.uuid4().hex[:6]}",
        fetch_max_bytes=64 * 1024 * 1024, max_partition_fetch_bytes=32 * 1024 * 1024,
        fetch_max_wait_ms=50,
    )
    try:
        consumer.assign(tps)
        begin = consumer.beginning_offsets(tps)
        end = consumer.end_offsets(tps)
        start: dict[TopicPartition, int] = {}
        for tp in tps:
            cp = store.checkpoint(tp.partition)
            if cp is None or cp < begin[tp] or cp > end[tp]:
                # Missing, truncated past, or from a topic that was recreated: rebuild it.
                store.drop_partitions([tp.partition])
                cp = begin[tp]
            start[tp] = cp
            consumer.seek(tp, cp)
        todo = {tp for tp in tps if start[tp] < end[tp]}
        for tp in tps:
            if tp not in todo:
                store.set_checkpoints({tp.partition: end[tp]})
                if progress:
                    progress(tp.partition, 1, 1)
        deadline = t0 + timeout_s
        while todo:
            if cancelled():
                result.complete = False
                break
            if time.monotonic() > deadline:
                raise RestoreTimeout(f"restore of {topic} {sorted(p.partition for p in todo)} "
                                     f"did not finish in {timeout_s:.0f}s")
            polled = consumer.poll(timeout_ms=200, max_records=20_000)
            puts: dict[str, tuple[str, int, bytes]] = {}
            deletes: set[str] = set()
            for tp, recs in polled.items():
                for rec in recs:
                    if rec.key is None:
                        result.skipped += 1
                        continue
                    dev = rec.key.decode("utf-8", "replace")
                    if rec.value is None:
                        deletes.add(dev)
                        puts.pop(dev, None)
                    else:
                        puts[dev] = (dev, tp.partition, rec.value)
                        deletes.discard(dev)
                result.restored[tp.partition] += len(recs)
            if deletes:
                store.delete_many(deletes)
            if puts:
                store.put_many(puts.values())
            checkpoints = {}
            for tp in list(todo):
                pos = consumer.position(tp)
                checkpoints[tp.partition] = min(pos, end[tp])
                if progress:
                    total = end[tp] - start[tp]
                    progress(tp.partition, min(pos, end[tp]) - start[tp], total)
                if pos >= end[tp]:
                    todo.discard(tp)
            store.set_checkpoints(checkpoints)
    finally:
        consumer.close(autocommit=False)
    result.seconds = time.monotonic() - t0
    return result
