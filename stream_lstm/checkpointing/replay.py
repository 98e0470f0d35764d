"""The input topic as the log: replay markers, replaying readings, and the retention check.

Device state is checkpointed to the changelog at most once per ``CHECKPOINT_INTERVAL_S`` per
partition, not with every commit. With each checkpoint of input partition ``p`` goes, in the
same transaction, a *replay marker* on changelog partition ``p``: the input offset from which
the readings since that checkpoint start. A restore loads the checkpoints, then reads the input
from the marker up to the group's committed offset and applies those readings again, publishing
nothing. A reading a device's checkpoint already holds has a timestamp at or before the
device's ``last_ts``, so the replay skips it as a duplicate: replay is idempotent.

Replay needs the input's readings from the marker on. A topic that compacts, or keeps less than
:data:`MIN_RETENTION_INTERVALS` checkpoint intervals, could delete them: the worker refuses to
start on one (:func:`check_retention`). If readings are gone anyway (the worker was down for
longer than the retention), the restore says how many, counts them, and goes on from the
checkpoint: never silently.

>>> decode_marker(encode_marker(1234))
1234
>>> decode_marker(b"short") is None
True
>>> REPLAY_MARKER.startswith(b"\\x00")  # device ids cannot hold control characters
True
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from kafka.errors import OffsetOutOfRangeError
from kafka.structs import TopicPartition

from stream_lstm.config import Settings
from stream_lstm.kafka.clients import LOOP_BOOTSTRAP_TIMEOUT_MS, make_consumer
from stream_lstm.kafka.deadline import call_with_deadline
from stream_lstm.kafka.topics import topic_config
from stream_lstm.kafka.unreadable import UNREADABLE, drop_failed_batch

log = logging.getLogger("stream_lstm.checkpointing")

REPLAY_MARKER = b"\x00replay-from"
_OFFSET = struct.Struct(">q")
# Retention must cover this many checkpoint intervals (and at least an hour) of input.
MIN_RETENTION_INTERVALS = 10
MIN_RETENTION_MS = 3_600_000
# A slice with a budget that has read nothing for this long gives up until the caller's next
# turn (the broker went away mid-replay): it used to wait out the whole replay timeout.
FIRST_READ_GRACE_S = 10.0
# Listing a log start takes milliseconds; past this the call is stuck, and a fresh consumer on
# the next turn does better.
LOG_START_DEADLINE_S = 10.0


def encode_marker(offset: int) -> bytes:
    return _OFFSET.pack(int(offset))


def decode_marker(value: bytes | None) -> int | None:
    """The offset of a replay marker's value; None for anything else (a negative offset too:
    no commit writes one, and replaying from it would report readings lost to retention)."""
    if value is None or len(value) != _OFFSET.size:
        return None
    offset = int(_OFFSET.unpack(value)[0])
    return offset if offset >= 0 else None


@dataclass
class Replayed:
    """What a replay of one partition did: readings applied again, and readings it needed
    that retention had already deleted.

    Parameters
    ----------
    readings
        Records handed to the replay's ``handle``.
    missing
        Offsets the replay could not apply: before the log start (retention had deleted them),
        or in a record batch the client cannot read (``unreadable`` of them).
    unreadable
        Offsets skipped in record batches the client cannot read (kafka/unreadable.py).
    seconds
        Wall time of the replay.
    position
        The next offset not replayed yet: ``end`` once the replay is complete.

    Examples
    --------
    An empty range (``end <= start``) reads nothing and needs no broker:

    >>> r = replay_input(Settings(), partition=0, start=5, end=5, handle=print)
    >>> r.readings, r.missing, r.position
    (0, 0, 5)
    """

    readings: int = 0
    missing: int = 0
    unreadable: int = 0
    seconds: float = 0.0
    position: int = 0


def replay_input(settings: Settings, partition: int, start: int, end: int,
                 handle: Callable[[list], None], timeout_s: float = 120.0,
                 budget_s: float | None = None) -> Replayed:
    """Read input ``partition`` from ``start`` up to (not including) ``end`` under
    ``read_committed`` and hand the records to ``handle`` poll by poll. With ``budget_s``, stop
    after the first poll that ends past it: ``position`` says where to go on from."""
    t0 = time.monotonic()
    out = Replayed(position=max(start, end))
    if end <= start:
        return out
    tp = TopicPartition(settings.input_topic, partition)
    # "none": readings deleted while the replay runs (retention reaching its position) raise
    # here and are counted as missing below; "earliest" skipped them silently (a review).
    consumer = make_consumer(settings, enable_auto_commit=False, isolation_level="read_committed",
                             auto_offset_reset="none", bootstrap_timeout_ms=LOOP_BOOTSTRAP_TIMEOUT_MS,
                             fetch_max_bytes=16 * 1024 * 1024, max_partition_fetch_bytes=8 * 1024 * 1024,
                             fetch_max_wait_ms=20,
                             # (at most one poll's devices in memory at once, as live)
                             max_poll_records=settings.poll_max_records)
    try:
        consumer.assign([tp])
        begin = _beginning(consumer, tp)
        if begin > start:
            _deleted(out, partition, begin - start)
            start = begin
        consumer.seek(tp, start)
        deadline = t0 + timeout_s
        while (position := consumer.position(tp)) < end:
            if budget_s is not None and time.monotonic() - t0 > budget_s and (
                    out.readings or position > start or time.monotonic() - t0 > FIRST_READ_GRACE_S):
                out.position = position  # (every record before it was handled)
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"replaying input partition {partition} did not reach offset "
                                   f"{end} within {timeout_s:g} s")
            try:
                records = consumer.poll(timeout_ms=200).get(tp, [])
            except OffsetOutOfRangeError:  # retention deleted what comes next, mid-replay
                begin = _beginning(consumer, tp)
                _deleted(out, partition, max(0, min(begin, end) - position))
                consumer.seek(tp, max(begin, position))
                continue
            except UNREADABLE as exc:  # (the live worker waited at it; an operator moved past it)
                if (at := drop_failed_batch(consumer)) is None:
                    raise
                if not out.unreadable:
                    log.error("a record batch of the input cannot be read; the replay skips it, "
                              "offset by offset, and its readings are not in the restored state",
                              extra={"partition": partition, "offset": at[1], "error": repr(exc)[:300]})
                consumer.seek(tp, at[1] + 1)
                out.missing, out.unreadable = out.missing + 1, out.unreadable + 1
                continue
            records = [r for r in records if start <= r.offset < end]
            if records:
                handle(records)
                out.readings += len(records)
    finally:
        consumer.close()
    out.seconds = time.monotonic() - t0
    return out


def _deleted(out: Replayed, partition: int, n: int) -> None:
    """Count ``n`` readings retention deleted before the replay could apply them; said once."""
    if n and not out.missing - out.unreadable:
        log.error("readings needed to replay state were deleted by the input topic's "
                  "retention; state resumes from the checkpoint without them",
                  extra={"partition": partition, "missing_offsets": n})
    out.missing += n


def log_start(settings: Settings, partition: int) -> int:
    """The first offset input ``partition`` still holds."""
    tp = TopicPartition(settings.input_topic, partition)
    consumer = make_consumer(settings, enable_auto_commit=False, bootstrap_timeout_ms=LOOP_BOOTSTRAP_TIMEOUT_MS)
    try:
        return _beginning(consumer, tp)
    finally:
        consumer.close()


def _beginning(consumer, tp: TopicPartition) -> int:  # noqa: ANN001 - a KafkaConsumer
    return call_with_deadline(lambda: consumer.beginning_offsets([tp])[tp], LOG_START_DEADLINE_S,
                              "listing the input's log start", on_timeout=consumer.close)


def check_retention(settings: Settings) -> str | None:
    """Why the input topic cannot serve replays of ``STREAM_LSTM_CHECKPOINT_INTERVAL_S``, or
    None when it can (or when checkpoints are written with every commit)."""
    interval_ms = settings.checkpoint_interval_s * 1000
    if interval_ms <= 0:
        return None
    configs = topic_config(settings, settings.input_topic)
    policy = configs.get("cleanup.policy", "delete")
    retention = int(configs.get("retention.ms", "-1") or -1)
    need = max(MIN_RETENTION_MS, MIN_RETENTION_INTERVALS * interval_ms)
    topic = settings.input_topic
    if "compact" in policy:
        return (f"input topic {topic!r} has cleanup.policy={policy}: compaction deletes readings "
                "that a state restore must replay. Use cleanup.policy=delete, or set "
                "STREAM_LSTM_CHECKPOINT_INTERVAL_S=0 to checkpoint with every commit")
    if 0 <= retention < need:
        # (a shorter interval helps only down to the floor of 1 h)
        shorter = (f"lower the interval to at most {retention / 1000 / MIN_RETENTION_INTERVALS:g} s, "
                   if retention >= MIN_RETENTION_MS else "")
        return (f"input topic {topic!r} keeps readings for retention.ms={retention}, less than "
                f"the {int(need)} ms a state restore may need to replay "
                f"({MIN_RETENTION_INTERVALS} x STREAM_LSTM_CHECKPOINT_INTERVAL_S, at least 1 h). "
                f"Raise retention.ms to at least {int(need)}, {shorter}or set "
                "STREAM_LSTM_CHECKPOINT_INTERVAL_S=0 (checkpoints with every commit)")
    size = int(configs.get("retention.bytes", "-1") or -1)
    if size >= 0:  # cannot be checked against a rate at start: said, not refused
        log.warning(f"input topic {topic!r} also deletes by size (retention.bytes={size} a "
                    "partition): a partition that fills it within the replay window loses "
                    "readings a state restore must replay; they are logged and counted "
                    "(stream_lstm_replay_missing_readings_total). Prefer retention.bytes=-1")
    return None
