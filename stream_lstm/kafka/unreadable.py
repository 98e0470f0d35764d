"""Input the client cannot read: a record batch whose checksum fails, or whose codec it lacks.

kafka-python raises such an error out of ``poll()`` (``CorruptRecordError``,
``UnsupportedCodecError``) without saying which partition, and keeps the failing batch as the
next one in line: every later ``poll()`` meets it again. Left alone, the worker ended there,
and again at each restart (a crash loop, with the input's other partitions starved too).

Instead the partition is set aside: its failing batch is dropped from the client's fetch
buffer and the partition paused, so the rest of the input goes on. Nothing is lost or skipped:
its committed offset stays before the batch, its later readings wait, and the next
assignment or restart (a fixed installation, a batch that failed its checksum in transit)
reads it again. Skipping it for good is the operator's call (moving the group's offset past
it), as Kafka's own consumer leaves it. The error log line and the
``stream_lstm_input_unreadable_partitions`` gauge say so.

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
    fetcher = getattr(consumer, "_fetcher", None)
    part = getattr(fetcher, "_next_partition_records", None)
    if part is None:
        return None
    tp, offset = part.topic_partition, part.next_fetch_offset
    part.drain()  # (lets the client fetch the partition again once it is resumed)
    fetcher._next_partition_records = None  # type: ignore[union-attr]
    if tp in consumer.assignment():
        consumer.pause(tp)
    log.error(
        "input partition %s: the record batch at offset %s cannot be read (%s); the partition is "
        "paused, its readings wait and nothing is skipped. A missing codec: install its package "
        "(kafka-python's: lz4, zstandard, python-snappy) and restart; a failed checksum is read "
        "again at the next assignment or restart. To skip the batch for good, move the group's "
        "offset past it (its readings are then lost)", tp.partition, offset, error,
        extra={"topic": tp.topic, "partition": tp.partition, "offset": offset,
               "error": repr(error)[:300]})
    return tp, offset
