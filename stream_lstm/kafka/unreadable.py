"""Input the client cannot read: a record batch whose checksum fails, or whose codec it lacks.

kafka-python raises such an error out of ``poll()`` (``CorruptRecordError``,
``UnsupportedCodecError``) without saying which partition (or holds it for the next poll when
records came first), and keeps the spent batch as the next one in line: a later ``poll()``
spins on it. Left alone, the worker ended at the error, and again at each restart (a crash
loop, with the input's other partitions starved too).

Instead the partition is set aside: its failing batch (and an error held for the next poll)
is dropped from the client's fetch buffer and the partition paused, so the rest of the input
goes on. Nothing is lost or skipped:
its committed offset stays before the batch, its later readings wait, and the next
assignment or restart (a fixed installation, a batch that failed its checksum in transit)
reads it again. Skipping it for good is the operator's call (moving the group's offset past
it), as Kafka's own consumer leaves it. The error log line and the
``stream_lstm_input_unreadable_partitions`` gauge say so. A restore's replay that meets such
a batch (checkpointing/replay.py) skips it, offset by offset, and counts its offsets as
readings it could not replay, as it counts those retention deleted.

The failing partition is read from kafka-python's fetcher (``_next_partition_records``: the
batch in line when the error was raised); tests/kafka/test_unreadable.py pins the private
names, and fails by name if an upgrade changes them.
"""

from __future__ import annotations

import logging
from typing import Any

from kafka.errors import CorruptRecordError, UnsupportedCodecError
from kafka.structs import TopicPartition

log = logging.getLogger(__name__)

UNREADABLE = (CorruptRecordError, UnsupportedCodecError)


def set_aside(consumer: Any, error: BaseException) -> tuple[TopicPartition, int] | None:
    """Drop the batch ``error`` was raised on from ``consumer``'s fetch buffer and pause its
    partition; returns the partition and the offset it stopped at, or None where the client
    does not say (the error is then the caller's to handle).

    Example: see tests/kafka/test_unreadable.py::test_a_batch_in_a_codec_the_client_lacks_pauses_its_partition_only
    """
    where = drop_failed_batch(consumer)
    if where is None:
        return None
    tp, offset = where
    if tp in consumer.assignment():
        consumer.pause(tp)
    log.error(
        "input partition %s: the record batch at offset %s cannot be read (%s); the partition is "
        "paused, its readings wait and nothing is skipped. A missing codec: install its package "
        "(kafka-python's: lz4, zstandard, python-snappy) and restart; a failed checksum is read "
        "again at the next assignment or restart. To skip the batch for good, move the group's "
        "offset past it (its readings are then lost; a restore's replay skips it too)",
        tp.partition, offset, error, extra={"topic": tp.topic, "partition": tp.partition,
                                            "offset": offset, "error": repr(error)[:300]})
    return tp, offset


def drop_failed_batch(consumer: Any) -> tuple[TopicPartition, int] | None:
    """Drop the batch a read failed on from the client's fetch buffer (so that it fetches the
    partition again, once resumed, instead of spinning on the spent batch), with the error it
    holds for the next poll; returns its partition and offset, or None where the client does
    not say."""
    fetcher = getattr(consumer, "_fetcher", None)
    part = getattr(fetcher, "_next_partition_records", None)
    if part is None:
        return None
    where = part.topic_partition, part.next_fetch_offset
    part.drain()
    fetcher._next_partition_records = None  # type: ignore[union-attr]
    fetcher._next_in_line_exception_metadata = None  # type: ignore[union-attr]
    return where


def held_error(consumer: Any) -> BaseException | None:
    """An unreadable batch's error that a poll which returned records holds for the next one.

    kafka-python raises it at the next poll only if the partition is still fetchable at the
    same position: paused in between (a re-assignment, a held-back partition), the error is
    dropped and the client spins for ever on the spent batch. So it is taken at once."""
    fetcher = getattr(consumer, "_fetcher", None)
    meta = getattr(fetcher, "_next_in_line_exception_metadata", None)
    part = getattr(fetcher, "_next_partition_records", None)
    for error in (getattr(meta, "exception", None), getattr(part, "_next_inline_exception", None)):
        if isinstance(error, UNREADABLE):
            return error
    return None
