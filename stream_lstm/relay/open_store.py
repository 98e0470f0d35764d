"""The relay's open alerts, kept where the alerts topic's retention cannot take them.

An alert can stay open for longer than the alerts topic keeps its records (a sensor stuck
high for a fortnight on a topic kept for a week). A relay that learnt its open alerts only by
reading that topic again would lose such an alert on a restart: it would stop re-sending it,
and Alertmanager would resolve an incident that is still going on. So the relay keeps them in
a compacted topic of its own, ``<group>-alertmanager-open-alerts``, like a Kafka Streams state store's
changelog: one record per open alert, keyed by its ``alert_id``, and a tombstone when it
closes. Compaction keeps the latest record of each key, so the topic holds the open alerts and
little else, however long they stay open.

The relay writes an event's record before it commits the event's offset (:meth:`flush`, then
the commit): a relay that dies in between reads the event again and writes the same record,
which changes nothing. A relay that is assigned partitions reads the whole store
(:meth:`load`) and keeps the alerts of those partitions.

Example: see tests/relay/test_open_store.py::test_open_alerts_survive_and_closed_ones_are_gone
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from kafka.errors import InvalidRecordError, MessageSizeTooLargeError, RecordListTooLargeError
from kafka.structs import TopicPartition

from stream_lstm.config import Settings
from stream_lstm.kafka.clients import LOOP_BOOTSTRAP_TIMEOUT_MS, make_consumer, make_producer
from stream_lstm.kafka.topics import (
    TopicSpec,
    ensure_topics,
    partition_count,
    require_compacted,
)
from stream_lstm.relay.alertmanager import UNREADABLE, max_id_chars, readable_event

log = logging.getLogger("stream_lstm.relay")

FLUSH_TIMEOUT_S = 10.0  # past this the broker is away: the writes wait for the next turn
# What a write of one record raises when that record can never be written (too large for the
# producer or the broker, a key that is not text): given up alone, not retried for ever.
RECORD_REFUSED = (MessageSizeTooLargeError, RecordListTooLargeError, InvalidRecordError, UnicodeError, TypeError)
# Compaction never touches the active segment (a week by default): a store that rolls hourly
# holds about the open alerts, not every open and tombstone of the last week to read at start
# (tombstones kept a day, as the changelog's: a slow load must not resurrect a closed alert).
STORE_CONFIG = {"cleanup.policy": "compact", "segment.ms": str(3600 * 1000),
                "min.cleanable.dirty.ratio": "0.1", "delete.retention.ms": str(86400 * 1000)}
LOAD_TIMEOUT_S = 60.0  # a store that cannot be read in this long is an error, not an empty store


class OpenAlertStore:
    """Open alerts by ``alert_id``, durable in a compacted topic (see the module's docstring).

    Parameters
    ----------
    settings
        The connection settings.
    topic
        The compacted topic (created with as many partitions as ``alerts_topic`` if missing).
    alerts_topic
        The topic whose events the store follows.

    Example: see tests/relay/test_open_store.py::test_open_alerts_survive_and_closed_ones_are_gone
    """

    def __init__(self, settings: Settings, topic: str, alerts_topic: str) -> None:
        self.settings, self.topic = settings, topic
        self.max_chars = max_id_chars(settings.max_device_id_length)
        ensure_topics(settings, [TopicSpec(topic, partition_count(settings, alerts_topic), STORE_CONFIG)])
        require_compacted(settings, topic, "the relay's store of open alerts", "alerts open for "
                          "longer than its retention are forgotten at the next restart", "Alter the "
                          "topic, or delete it: the relay creates it compacted (the alerts open now "
                          "are then resolved in Alertmanager within minutes)")
        self.producer: Any = self._producer()
        # Written and not yet acknowledged: (alerts partition, alert id, record or None).
        self.pending: list[tuple[int, str, bytes | None]] = []

    def _producer(self) -> Any:
        # One request in flight: a retried put must not land after the tombstone that followed
        # it. A send may wait for metadata no longer than a flush may take.
        # Never re-created by a write: a store deleted under a running relay came back empty and
        # deleting, and 9 of 11 open alerts were forgotten (a review). Its writes fail instead,
        # so reading stops and /readyz says why (:meth:`flush`).
        return make_producer(self.settings, max_in_flight_requests_per_connection=1,
                             max_block_ms=int(FLUSH_TIMEOUT_S * 1000), allow_auto_create_topics=False,
                             client_id=f"stream-lstm-alert-relay-store-{self.settings.instance_id}")

    def _abandon(self) -> None:
        """Give up what the producer still holds (it must not land after a later owner's
        records, or be sent twice beside a retry); the next write starts a fresh one. (Not
        here: with the broker away, making one raised out of the loop, and the relay exited
        instead of waiting for the broker, as it does when idle.)"""
        producer, self.producer = self.producer, None
        try:
            if producer is not None:
                producer.close(timeout=0)
        except Exception:  # noqa: BLE001 - closing a producer the broker left: nothing to keep
            pass

    def opened(self, partition: int, event: dict[str, Any]) -> None:
        """An alert of ``partition`` opened: keep its event."""
        record = json.dumps({"partition": partition, "event": event}).encode()
        self.pending.append((partition, str(event["alert_id"]), record))

    def closed(self, partition: int, alert_id: str) -> None:
        """An alert closed: forget it (a tombstone; compaction removes the key)."""
        self.pending.append((partition, alert_id, None))

    def drop(self, partitions: set[int]) -> None:
        """Partitions revoked: what is in flight goes out now, what is not is the next owner's.

        Their next owner reads the events again from the committed offset and writes the same
        records. One still in flight from here must land before that owner reads the store, or
        an open could come after its close. (Not sent within the flush's time, they are given
        up: this runs in a rebalance callback, which must not raise.)"""
        try:
            if self.producer is not None:
                self.producer.flush(timeout=FLUSH_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - the broker away, say
            log.warning("the relay's open-alert writes were given up at a revocation",
                        extra={"error": repr(exc)[:200]})
            self._abandon()
        self.pending = [w for w in self.pending if w[0] not in partitions]

    def flush(self) -> bool:
        """Write what is pending and wait for it; False (kept, to write again) if the broker did
        not take all of it. Records are written again in order, so the last one of a key wins."""
        if not self.pending:
            return True
        deadline = time.monotonic() + FLUSH_TIMEOUT_S
        try:
            if self.producer is None:
                self.producer = self._producer()
            futures = []
            for write in self.pending:
                try:
                    futures.append((write, self.producer.send(self.topic, key=write[1].encode(), value=write[2])))
                except RECORD_REFUSED as exc:  # this record can never be written: not a retry
                    self._give_up(write, exc)
            for write, f in futures:  # (one deadline for all: the turn, and /healthz, wait no longer)
                try:
                    f.get(timeout=max(0.0, deadline - time.monotonic()))
                except RECORD_REFUSED as exc:
                    self._give_up(write, exc)
        except Exception as exc:  # noqa: BLE001 - the broker away, say: the next turn tries again
            log.warning("writing the relay's open alerts failed; will retry", extra={"error": repr(exc)[:200]})
            self._abandon()  # (the retry sends them all again, in order)
            return False
        self.pending = []
        return True

    def _give_up(self, write: tuple[int, str, bytes | None], exc: Exception) -> None:
        # Retried, it stopped reading and committing for good (every turn failed the same way).
        log.error("an open alert's record cannot be written to the relay's store; given up (a "
                  "restart will not re-send it)", extra={"alert_id": write[1], "error": repr(exc)[:200]})

    def load(self, partitions: set[int], beat: Any = None) -> dict[str, tuple[int, dict[str, Any]]]:
        """The open alerts of ``partitions`` (alerts-topic partitions): ``alert_id`` ->
        (partition, open event). Reads every partition of the store to its end, calling
        ``beat()`` after each poll (a long read is a relay at work, not a stuck one)."""
        consumer = make_consumer(self.settings, enable_auto_commit=False, auto_offset_reset="earliest",
                                 bootstrap_timeout_ms=LOOP_BOOTSTRAP_TIMEOUT_MS)
        try:
            tps = [TopicPartition(self.topic, p) for p in consumer.partitions_for_topic(self.topic) or ()]
            if not tps:  # (created at start: no metadata is not an empty store)
                raise LookupError(f"no partitions of {self.topic} known yet")
            consumer.assign(tps)
            consumer.seek_to_beginning(*tps)
            ends = consumer.end_offsets(tps)
            found: dict[str, tuple[int, dict[str, Any]]] = {}
            left = {tp for tp in tps if ends[tp] > 0}
            deadline = time.monotonic() + LOAD_TIMEOUT_S
            while left:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"reading the relay's open alerts ({self.topic}) took over {LOAD_TIMEOUT_S:g} s")
                for records in consumer.poll(timeout_ms=500).values():
                    for rec in records:
                        self._read(found, rec.key, rec.value, self.max_chars)
                if beat is not None:
                    beat()
                for tp in list(left):
                    if consumer.position(tp) >= ends[tp]:
                        left.discard(tp)
        finally:
            consumer.close()
        return {k: v for k, v in found.items() if v[0] in partitions}

    @staticmethod
    def _read(found: dict[str, tuple[int, dict[str, Any]]], key: bytes | None, value: bytes | None,
              max_chars: int) -> None:
        alert_id = (key or b"").decode(errors="replace")
        if value is None:
            found.pop(alert_id, None)
            return
        try:
            body = json.loads(value)
            event = readable_event(body["event"], max_chars)  # as the alerts topic's: re-sent, whole
            found[alert_id] = (int(body["partition"]), event)
        except UNREADABLE as exc:  # (damaged or forged)
            log.error("skipping an unreadable record of the relay's open alerts",
                      extra={"alert_id": alert_id, "error": repr(exc)[:200]})

    def close(self) -> None:
        if self.producer is not None:
            self.producer.close(timeout=FLUSH_TIMEOUT_S)
