"""The state changelog: a compacted topic keyed by device id, and restore from it.

Changelog partition ``p`` holds the devices whose readings arrive on input partition ``p``
(co-partitioning), so restoring an assigned input partition means reading one changelog
partition. Records are written inside the batch's transaction; restore reads with
``read_committed``, so it sees exactly the state whose forecasts were published.

Restore never hangs: it reads each partition up to the end offset taken when it starts
(under ``read_committed`` that is the last stable offset), checks *positions* rather than
waiting for records (a position moves past transaction markers and aborted records even when
a poll returns nothing), gives up with :class:`RestoreTimeout` after ``timeout_s``, and
returns early with ``complete=False`` when ``cancelled()`` says so (partitions revoked, or
the caller's time slice is over), asked only once the read has moved, so every slice makes
progress. Progress is checkpointed chunk by chunk, so an interrupted
restore resumes where it stopped. The topic itself is declared with the worker's other topics
(``kafka/topics.py``: ``changelog_topic_spec``, ``ensure_changelog_topic``).

>>> from stream_lstm.state.snapshot import DeviceSnapshot
>>> s = DeviceSnapshot.empty("pump-1", num_layers=1, hidden_size=2, n_features=1, partition=5)
>>> [(k, p) for k, _, p in changelog_records([s])], tombstone("pump-1", 5)
([(b'pump-1', 5)], (b'pump-1', None, 5))
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from kafka.errors import KafkaTimeoutError, OffsetOutOfRangeError
from kafka.structs import TopicPartition

from stream_lstm.checkpointing.codec import (
    SCHEMA_ID,
    check_snapshot,
    encode_snapshot,
    snapshot_schema,
)
from stream_lstm.checkpointing.replay import REPLAY_MARKER, decode_marker
from stream_lstm.checkpointing.store import StateStore
from stream_lstm.config import Settings
from stream_lstm.kafka.clients import LOOP_BOOTSTRAP_TIMEOUT_MS, make_admin, make_consumer
from stream_lstm.kafka.deadline import call_with_deadline
from stream_lstm.state.snapshot import DeviceSnapshot

log = logging.getLogger("stream_lstm.checkpointing")

# Restore consumer tuning. kafka-python parses records in Python, so the cost is per record;
# big fetches and big poll batches amortise the per-request and per-poll overhead, and a big
# socket buffer keeps the broker streaming while we parse.
_FETCH = {
    "fetch_max_bytes": 64 * 1024 * 1024,
    "max_partition_fetch_bytes": 16 * 1024 * 1024,
    "max_poll_records": 20_000,
    "fetch_max_wait_ms": 20,
    "receive_buffer_bytes": 4 * 1024 * 1024,
}
_PROGRESS_EVERY_S = 0.25
# How long a restore waits for its first record before a caller's cancel may end it anyway.
_FIRST_READ_GRACE_S = 10.0


def _fast_crc() -> bool:
    """Whether kafka-python checks CRC32C in C (the optional ``crc32c`` package)."""
    try:
        from kafka.record import util
    except ImportError:  # pragma: no cover - layout of a future kafka-python
        return False
    return getattr(util, "crc32c_c", None) is not None


# Record CRCs are checked only with the C implementation: the pure-Python fallback costs
# ~200 us per KB, over 80% of restore time (20 s of 25 s for 100k 1.3 KB snapshots). Without
# it we rely on TCP checksums, the broker's own CRC validation on write, and the structural
# check of every value (check_snapshot). `pip install crc32c` turns the checks back on.
CHECK_CRCS = _fast_crc()


class RestoreTimeout(RuntimeError):
    """Restore did not reach the end offsets in time (progress so far is checkpointed)."""


@dataclass
class RestoreResult:
    """Outcome of :func:`restore`.

    Parameters
    ----------
    restored
        Records read per partition (values, tombstones, skipped).
    seconds
        Wall time.
    complete
        Every partition reached its end offset.
    skipped
        Records that were not valid snapshots (no key, key not UTF-8, value not a readable
        snapshot) and were left out.
    rebuilt
        Partitions read from the log start because the store's checkpoint was missing, below
        the log start (truncated changelog) or past the log end.
    other_schemas
        Snapshots stored that another version wrote, by the state schema in their header
        (``codec.SCHEMA_ID`` as 8 hex digits; ``00000000``: format 1): their columns this
        version does not declare are ignored, and the columns it declares that they lack
        restore to their fill (logged once at the end).

    Examples
    --------
    Restoring no partitions reads nothing (and needs no broker):

    >>> import tempfile
    >>> from pathlib import Path
    >>> from stream_lstm.config import Settings
    >>> with tempfile.TemporaryDirectory() as d:
    ...     store = StateStore(Path(d) / "state.sqlite")
    ...     result = restore(Settings(), "stream-lstm-state", [], store)
    ...     store.close(clean=True)
    >>> result.complete, result.restored, result.skipped
    (True, {}, 0)
    """

    restored: dict[int, int] = field(default_factory=dict)
    seconds: float = 0.0
    complete: bool = True
    skipped: int = 0
    rebuilt: list[int] = field(default_factory=list)
    other_schemas: dict[str, int] = field(default_factory=dict)


# ---- writing -------------------------------------------------------------------------------
def changelog_records(snaps: list[DeviceSnapshot]) -> list[tuple[bytes, bytes, int]]:
    """``(key, value, partition)`` per snapshot; the partition is the device's input partition."""
    return [(s.device_id.encode(), encode_snapshot(s), s.partition) for s in snaps]


def tombstone(device_id: str, partition: int) -> tuple[bytes, None, int]:
    """A record that deletes the device from the compacted changelog."""
    return device_id.encode(), None, partition


# ---- restore -------------------------------------------------------------------------------
def restore(
    settings: Settings,
    topic: str,
    partitions: list[int],
    store: StateStore,
    *,
    progress: Callable[[int, int, int], None] | None = None,
    cancelled: Callable[[], bool] = lambda: False,
    timeout_s: float = 120.0,
) -> RestoreResult:
    """Bring ``store`` up to date with changelog ``topic`` for ``partitions``.

    Each partition is read from the store's checkpoint, or from the log start when the
    checkpoint is missing or below the log start (a truncated changelog: the partition's
    rows are dropped first, since tombstones may be gone). Values are stored as raw bytes
    after a cheap structural check; tombstones delete. ``progress(partition, done, total)``
    is called periodically and once at the end of each partition.

    A private consumer (no group, ``assign()`` only, no commits) does the reading, so the
    worker's group membership and rebalances cannot touch it.
    """
    t0 = time.monotonic()
    deadline = t0 + timeout_s
    result = RestoreResult(restored={p: 0 for p in partitions})
    if not partitions:
        return result

    def remaining_ms() -> int:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RestoreTimeout(f"restore of {topic} {sorted(partitions)} did not finish in "
                                 f"{timeout_s:g}s (progress is checkpointed)")
        return max(1, int(left * 1000))

    tps = [TopicPartition(topic, p) for p in partitions]
    consumer = make_consumer(
        settings, group_id=None, enable_auto_commit=False, isolation_level="read_committed",
        client_id=f"stream-lstm-restore-{uuid.uuid4().hex[:8]}",
        # 'none': a log truncated under us raises instead of silently jumping ahead.
        auto_offset_reset="none", check_crcs=CHECK_CRCS, bootstrap_timeout_ms=LOOP_BOOTSTRAP_TIMEOUT_MS,
        **_FETCH,
    )
    try:
        try:
            begin, end = _list_offsets(settings, tps, ("earliest", "latest"), remaining_ms())
        except KafkaTimeoutError as exc:
            raise RestoreTimeout(f"could not list offsets of {topic}: {exc}") from None
        start = _start_offsets(settings, tps, begin, end, store, result)
        todo = [tp for tp in tps if start[tp] < end[tp]]
        # Nothing to read: the store is current. Record the checkpoint so the next restore
        # of an empty partition starts at the right place too.
        idle = {tp.partition: start[tp] for tp in tps if tp not in todo}
        if idle:
            store.set_checkpoints(idle)
            for p in idle:
                if progress:
                    progress(p, 0, 0)
        if not todo:
            return result
        consumer.assign(todo)
        for tp in todo:
            consumer.seek(tp, start[tp])
        _read(settings, consumer, todo, start, begin, end, store, result, progress, cancelled, remaining_ms)
        if result.other_schemas:
            log.info("restored state written under other state schemas: their columns this "
                     "version lacks restore to their fill", extra={
                         "schemas": result.other_schemas, "schema": f"{SCHEMA_ID:08x}"})
    finally:
        _close(consumer)
        result.seconds = time.monotonic() - t0
    return result


def _close(consumer) -> None:  # noqa: ANN001
    # A consumer whose call got stuck may not close either: never let it hold the worker.
    try:
        call_with_deadline(lambda: consumer.close(autocommit=False), 10.0, "closing a restore consumer")
    except KafkaTimeoutError as exc:
        log.warning("left a stuck restore consumer behind", extra={"error": str(exc)})


# Listing offsets takes milliseconds; past this the call is stuck (stream_lstm.kafka.deadline)
# and a fresh client on the next restore attempt does better than waiting out the restore.
LIST_OFFSETS_DEADLINE_S = 15.0


def _list_offsets(settings: Settings, tps: list[TopicPartition], specs: tuple[str, ...],
                  remaining: int, committed: bool = True) -> list[dict[TopicPartition, int]]:
    """For each of ``specs`` (``earliest`` or ``latest``), the offsets of ``tps``, from one
    admin client; ``latest`` is the last stable offset (what a read_committed consumer reads
    up to), or with ``committed=False`` the high watermark.

    Not ``KafkaConsumer.beginning_offsets``: on a fresh clone's test run, a new restore
    consumer's listing of a just-created changelog never returned, retry after retry, for
    180-900 s (kafka-python 3.0.12), while the admin request answers at once.
    """
    from kafka.admin import OffsetSpec
    from kafka.protocol.consumer import IsolationLevel

    timeout_ms = min(remaining, int(LIST_OFFSETS_DEADLINE_S * 1000))
    level = IsolationLevel.READ_COMMITTED if committed else IsolationLevel.READ_UNCOMMITTED
    admin = make_admin(settings, request_timeout_ms=timeout_ms, bootstrap_timeout_ms=LOOP_BOOTSTRAP_TIMEOUT_MS)

    def listing() -> list[dict[TopicPartition, int]]:
        out = []
        for spec in specs:
            which = OffsetSpec.EARLIEST if spec == "earliest" else OffsetSpec.LATEST
            got = admin.list_partition_offsets({tp: which for tp in tps}, isolation_level=level,
                                               timeout_ms=timeout_ms)
            out.append({tp: int(got[tp].offset) for tp in tps})
        return out

    try:
        return call_with_deadline(listing, len(specs) * timeout_ms / 1000 + 1.0,
                                  f"listing offsets of {sorted({tp.topic for tp in tps})}",
                                  on_timeout=admin.close)
    finally:
        admin.close()


def _start_offsets(settings, tps, begin, end, store, result) -> dict[TopicPartition, int]:  # noqa: ANN001
    """Where each partition's read starts; drops the rows of partitions rebuilt from scratch."""
    start: dict[TopicPartition, int] = {}
    high: dict[TopicPartition, int] | None = None
    for tp in tps:
        cp = store.checkpoint(tp.partition)
        if cp is not None and cp > end[tp]:
            # Past the last stable offset: either another producer's open transaction holds
            # the LSO below offsets we already applied (keep the store, nothing readable yet),
            # or the topic was deleted and recreated (past the high watermark: rebuild).
            if high is None:
                high = _high_watermarks(settings, tps)
            if cp <= high.get(tp, -1):
                start[tp] = end[tp] = cp
                continue
        if cp is None or cp < begin[tp] or cp > end[tp]:
            # Missing, truncated past (compaction keeps offsets, only deletion moves the log
            # start, and tombstones may be among the deleted), or from a recreated topic.
            if cp is not None:  # (the store held state the changelog does not: never silently)
                log.warning("the local state store's checkpoint of changelog %s partition %d is not "
                            "in the topic (offset %d; it holds %d to %d): it was deleted, recreated, "
                            "renamed or truncated; the store's devices of that partition are "
                            "dropped, and restored from what the topic holds", tp.topic, tp.partition,
                            cp, begin[tp], end[tp],
                            extra={"partition": tp.partition, "topic": tp.topic})
            store.drop_partitions([tp.partition])
            result.rebuilt.append(tp.partition)
            cp = begin[tp]
        start[tp] = cp
    return start


def _high_watermarks(settings: Settings, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
    (high,) = _list_offsets(settings, tps, ("latest",), int(LIST_OFFSETS_DEADLINE_S * 1000),
                            committed=False)
    return high


def _read(settings, consumer, todo, start, begin, end, store, result, progress, cancelled, remaining_ms):  # noqa: ANN001
    """The poll loop of :func:`restore` (see there)."""
    todo = set(todo)
    last_report = 0.0
    # A slice may be cancelled only once it has moved (or after a grace period, so a stuck
    # fetch cannot hold the caller): a fresh consumer's first polls often return nothing
    # while it connects, and a caller whose slice ends before then (a loaded machine, a
    # short budget) would otherwise cancel every slice before it read a record, for ever.
    moved = False
    grace_ends = time.monotonic() + _FIRST_READ_GRACE_S
    while todo:
        if (moved or time.monotonic() > grace_ends) and cancelled():
            result.complete = False
            log.info("restore cancelled", extra={"partitions": sorted(t.partition for t in todo)})
            return
        timeout_ms = min(100, remaining_ms())  # raises RestoreTimeout past the deadline
        try:
            polled = consumer.poll(timeout_ms=timeout_ms)
        except OffsetOutOfRangeError as exc:
            # The log start moved past our position during restore (records deleted): what
            # we applied may miss tombstones, so rebuild those partitions from the new start.
            lost = [tp for tp in (exc.args[0] if exc.args and isinstance(exc.args[0], dict)
                                  else todo) if tp in todo]
            (new_begin,) = _list_offsets(settings, lost, ("earliest",), remaining_ms())
            for tp in lost:
                store.drop_partitions([tp.partition])
                if tp.partition not in result.rebuilt:
                    result.rebuilt.append(tp.partition)
                begin[tp] = start[tp] = new_begin[tp]
                end[tp] = max(end[tp], start[tp])
                consumer.seek(tp, start[tp])
            continue
        # By device and partition: a device that moved partitions (some were added to the
        # input) has a row in each, and the store keeps the later state (StateStore.restore_chunk).
        puts: dict[tuple[str, int], tuple[str, int, bytes]] = {}
        deletes: set[tuple[str, int]] = set()
        replay_from: dict[int, int] = {}
        for tp, recs in polled.items():
            part = tp.partition
            # After a rebuild from a new log start, a fetch already under way for the old
            # position can still deliver records below it (seen in CI): they are not ours.
            first = start[tp]
            if recs and recs[0].offset < first:
                recs = [r for r in recs if r.offset >= first]
            for rec in recs:
                key, value = rec.key, rec.value
                if key == REPLAY_MARKER:
                    offset = decode_marker(value)
                    if offset is not None:
                        replay_from[part] = offset
                    continue
                try:
                    dev = key.decode()  # type: ignore[union-attr]
                except (AttributeError, UnicodeDecodeError):  # no key, or not UTF-8
                    result.skipped += 1
                    continue
                if value is None:
                    deletes.add((dev, part))
                    puts.pop((dev, part), None)
                elif check_snapshot(value) is None:
                    puts[dev, part] = (dev, part, value)  # later records of a key win
                    deletes.discard((dev, part))
                    if (schema := snapshot_schema(value)) != SCHEMA_ID:
                        key = f"{schema:08x}"
                        result.other_schemas[key] = result.other_schemas.get(key, 0) + 1
                else:
                    # Unreadable value: keep what the store had rather than storing bytes
                    # that would fail when the device is loaded.
                    result.skipped += 1
            result.restored[part] += len(recs)
        # Positions, not records, decide completion: they also move over transaction
        # markers and aborted batches, which poll never returns.
        positions = {tp: consumer.position(tp, timeout_ms=remaining_ms()) for tp in todo}
        moved = moved or any(pos > start[tp] for tp, pos in positions.items())
        store.restore_chunk(puts.values(), deletes, {tp.partition: pos for tp, pos in positions.items()},
                            replay_from)
        now = time.monotonic()
        finished = [tp for tp, pos in positions.items() if pos >= end[tp]]
        if finished:
            consumer.pause(*finished)  # stop fetching what a later writer appends
        if progress and (finished or (polled and now - last_report >= _PROGRESS_EVERY_S)):
            last_report = now
            for tp, pos in positions.items():
                total = end[tp] - start[tp]
                progress(tp.partition, min(pos, end[tp]) - start[tp], total)
        todo.difference_update(finished)
