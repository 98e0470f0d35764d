"""The worker's consumer in its group, with kafka-python 3.0.12's stuck states handled in one place.

``GroupConsumer`` builds the ``KafkaConsumer`` the worker reads with (cooperative-sticky,
read_committed, manual commits, fuller fetches on a live input) and wraps the one call that can
hang, ``poll``, with every guard the worker needs against kafka-python 3.0.12:

* the input's partitions are in the consumer's metadata before its first join (a leader that
  joined without them assigned nothing and never rebalanced when they appeared);
* a join that finished unapplied is rejoined before the next poll (``join.py``);
* a poll stuck on the client's own network thread is ended (``stall.py``);
* a consumer that has been out of its group for minutes is replaced (``check_membership``);
* a record batch it cannot read (a failed checksum, a codec it lacks) pauses its partition
  instead of ending the worker (``unreadable.py``).

Each of these is counted by ``on_stall`` (``stream_lstm_kafka_stalls_total``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from kafka import ConsumerRebalanceListener, KafkaConsumer
from kafka.errors import KafkaTimeoutError
from kafka.structs import MemberState, TopicPartition

from stream_lstm.config import Settings
from stream_lstm.kafka.clients import group_timeouts, make_consumer
from stream_lstm.kafka.deadline import call_with_deadline
from stream_lstm.kafka.heartbeat import GroupHeartbeat
from stream_lstm.kafka.join import forget_lost_membership, is_rebalancing, mend_abandoned_join
from stream_lstm.kafka.stall import StallGuard
from stream_lstm.kafka.unreadable import UNREADABLE, held_error, set_aside
from stream_lstm.logs import Sparing
from stream_lstm.metrics import LIVENESS_TIMEOUT_S

log = logging.getLogger(__name__)


def fetch_shape(commit_interval_ms: int, exactly_once: bool = True) -> dict[str, int]:
    """Fuller turns on a live input: the broker holds a fetch until 64 KiB (about 800
    readings) or a bounded wait has passed. Every loop turn costs the same whatever it carries
    (a fetch, a batched step, the housekeeping), so nearly empty turns are what made a live
    reading cost several times a backlog one. With commits every poll, a poll returns as soon
    as anything arrives.

    The wait: under exactly-once, the commit interval, since forecasts wait for the commit
    anyway. At-least-once forecasts are readable once sent, so there the wait is all the
    latency the batching adds: half the interval. Measured live at 500 and 2,000 readings/s
    (docs/benchmarks.md, issue 18 item 4): p99 132-263 ms -> 85-113 ms for 20-40 % more CPU a
    reading; a quarter of it cost 2.3x the CPU.

    >>> fetch_shape(100)
    {'fetch_min_bytes': 65536, 'fetch_max_wait_ms': 100}
    >>> fetch_shape(100, exactly_once=False)
    {'fetch_min_bytes': 65536, 'fetch_max_wait_ms': 50}
    >>> fetch_shape(0)
    {'fetch_min_bytes': 1, 'fetch_max_wait_ms': 100}
    """
    if commit_interval_ms <= 0:
        return {"fetch_min_bytes": 1, "fetch_max_wait_ms": 100}
    wait = commit_interval_ms if exactly_once else commit_interval_ms // 2
    return {"fetch_min_bytes": 64 * 1024, "fetch_max_wait_ms": max(10, min(500, wait))}


def poll_limit_s(settings: Settings) -> float:
    """How long one ``poll`` may take before the stall guard ends it (kafka-python's known hang
    inside it, dpkp/kafka-python#3121): the broker evicts a member that has not polled within
    max.poll.interval.ms, so no poll (rebalance callbacks included) legitimately takes longer;
    and a loop that has not turned for :data:`~stream_lstm.metrics.LIVENESS_TIMEOUT_S` is not
    live, its pod or process killed, so a stuck poll must end well before that (it was ~310 s:
    the guard never acted, and a hang cost a restart, restore and replay instead).

    >>> from stream_lstm.config import Settings
    >>> poll_limit_s(Settings()), poll_limit_s(Settings(max_poll_interval_ms=10_000, session_timeout_ms=6_000))
    (20.0, 16.1)
    """
    s = settings
    return min((s.max_poll_interval_ms + s.session_timeout_ms + s.poll_timeout_ms) / 1000,
               LIVENESS_TIMEOUT_S * 2 / 3)


class GroupConsumer:
    """Reads the input topic as a member of the worker's consumer group.

    Parameters
    ----------
    settings
        The worker's settings (topic, group, poll and session limits, security).
    listener
        The rebalance listener (``rebalance.PartitionListener``); it runs inside ``poll``.
    client_id
        The Kafka client id (the worker's instance id, so brokers' logs say which worker).
    on_stall
        Called once for every stuck state ended or mended (a metric, in the worker).

    ``consumer`` is the current ``KafkaConsumer``: use it for offsets, pause and resume, but
    poll through ``poll``. A replaced consumer is a new object.

    Example: see tests/kafka/test_group_consumer.py::test_it_joins_reads_and_settles
    """

    def __init__(self, settings: Settings, listener: Any, client_id: str,
                 on_stall: Callable[[], None] = lambda: None) -> None:
        self.settings = settings
        self.listener = listener
        self.client_id = client_id
        self.on_stall = on_stall
        # Partitions set aside at a batch they cannot read, and its offset (``unreadable.py``):
        # kept while paused (the worker resumes one after a restore: it is then read again).
        self.unreadable: dict[TopicPartition, int] = {}
        self._say_unexplained = Sparing(lambda msg, extra: log.error(msg, extra=extra))
        self._open()

    def _open(self, consumer: KafkaConsumer | None = None) -> None:
        """A subscribed consumer, with its heartbeat watch and its stall guard."""
        self.consumer: KafkaConsumer = consumer or self._subscribe()
        self.heartbeat = GroupHeartbeat(self.consumer, stale_after_s=self.settings.session_timeout_ms / 1000)
        self.stall_guard = StallGuard(self.consumer)
        self._unjoined_since: float | None = None

    def _subscribe(self) -> KafkaConsumer:
        from kafka.coordinator.assignors.cooperative_sticky import CooperativeStickyAssignor

        s = self.settings
        consumer = make_consumer(
            s,
            group_id=s.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=s.poll_max_records,
            **group_timeouts(s),
            isolation_level="read_committed",
            partition_assignment_strategy=[CooperativeStickyAssignor()],
            fetch_max_bytes=16 * 1024 * 1024,
            max_partition_fetch_bytes=4 * 1024 * 1024,
            **fetch_shape(s.commit_interval_ms, s.processing_guarantee == "exactly_once"),
            client_id=self.client_id,
        )
        # The consumer's metadata must know the input's partitions before its first join: a
        # group leader that joins without them assigns nothing ("No partition metadata") and,
        # under kafka-python 3.0.12, did not rebalance when they appeared.
        deadline = time.monotonic() + 30.0
        while not consumer.partitions_for_topic(s.input_topic) and time.monotonic() < deadline:
            time.sleep(0.2)
        consumer.subscribe([s.input_topic], listener=_Unguarded(self.listener, lambda: self.stall_guard))
        return consumer

    def poll(self, timeout_ms: int) -> dict:
        """One ``consumer.poll``; a poll stuck inside kafka-python is ended and counts as empty."""
        s = self.settings
        if mend_abandoned_join(self.consumer):
            self.on_stall()
        # A rebalance completes inside poll: a short poll leaves the join to the next one.
        if self.rebalancing():
            timeout_ms = max(timeout_ms, s.poll_timeout_ms)
        if self.unreadable:
            paused = self.consumer.paused()
            self.unreadable = {tp: at for tp, at in self.unreadable.items() if tp in paused}
        try:
            with self.stall_guard.limit("consumer.poll", poll_limit_s(s)):
                polled = self.consumer.poll(timeout_ms=timeout_ms, max_records=s.poll_max_records)
            if (held := held_error(self.consumer)) is not None:  # (records first, then a batch it cannot read)
                self._set_aside(held)
            return polled
        except KafkaTimeoutError as exc:
            self.on_stall()
            log.warning("poll did not return; polling again", extra={"error": str(exc)[:300]})
            return {}
        except UNREADABLE as exc:
            self._set_aside(exc)
            return {}

    def _set_aside(self, error: BaseException) -> None:
        if (where := set_aside(self.consumer, error)) is not None:
            self.unreadable[where[0]] = where[1]
            return
        # (not seen: its test pins where)
        self._say_unexplained("the input cannot be read, and kafka-python does not say where; "
                              "polling again", error=repr(error)[:300])
        time.sleep(1.0)  # (a loop that still turns: health, commits, a clean stop)

    def rebalancing(self) -> bool:
        """Whether the membership is unsettled: offsets cannot be committed until it settles."""
        return is_rebalancing(self.consumer)

    def commit_refused(self, error: BaseException) -> None:
        """A commit failed with ``error``: if the group no longer knows this member, the next
        poll gives its partitions up and rejoins (``join.forget_lost_membership``)."""
        forget_lost_membership(self.consumer, error)

    def stable_member(self) -> bool:
        """Whether the consumer is a settled member of its group (holding partitions or not)."""
        return self.consumer.group_metadata().state == MemberState.STABLE

    def check_membership(self, assigned: bool) -> None:
        """Rebuild a consumer that has been out of its group (not a stable member) for two
        minutes (or the rebalance timeout, if shorter).

        Seen under kafka-python 3.0.12 (test_flood, after test_faults restarted the broker): a
        consumer polling for minutes outside its group (the group Empty, no member) while a new
        client joined the same group at once; the stuck one rejoined only when that other
        member joined."""
        if assigned or self.stable_member():
            self._unjoined_since = None  # a member (merely unassigned, perhaps)
            return
        now = time.monotonic()
        if self._unjoined_since is None:
            self._unjoined_since = now
            return
        s = self.settings
        # The broker allows a join the rebalance timeout (max.poll.interval.ms), but no group of
        # this service needs minutes: two suffice, and a replacement costs one more rebalance.
        limit_s = min(s.max_poll_interval_ms + s.session_timeout_ms,
                      max(120_000, 3 * s.session_timeout_ms)) / 1000
        if now - self._unjoined_since < limit_s:
            return
        log.warning("the consumer has not joined its group; replacing it",
                    extra={"group_id": s.group_id, "waited_s": round(now - self._unjoined_since)})
        self.on_stall()
        try:  # the new one first: with the broker away now, the old one stays for a later try
            fresh = self._subscribe()
        except Exception as exc:  # noqa: BLE001 - e.g. KafkaConnectError: never end the worker
            log.warning("could not open a replacement consumer; trying again later",
                        extra={"error": repr(exc)[:200]})
            self._unjoined_since = now
            return
        self.close()
        self._open(fresh)

    def close(self) -> None:
        """Stop the stall guard and close the consumer without committing (the worker does)."""
        self.stall_guard.close()
        old = self.consumer
        try:
            call_with_deadline(lambda: old.close(autocommit=False), 10.0, "closing the consumer")
        except Exception as exc:  # noqa: BLE001 - closing is best effort
            log.warning("closing the consumer failed", extra={"error": repr(exc)[:200]})


class _Unguarded(ConsumerRebalanceListener):
    """The worker's listener, run with the stall guard paused: a revocation that commits and
    checkpoints a large fleet is the worker's own work inside ``poll``, not kafka-python's
    hang (a handover of 100k changed devices took over the guard's 20 s, and was ended)."""

    def __init__(self, listener: Any, guard: Callable[[], StallGuard]) -> None:
        self.listener, self.guard = listener, guard

    def on_partitions_assigned(self, assigned: list) -> None:
        with self.guard().paused():
            self.listener.on_partitions_assigned(assigned)

    def on_partitions_revoked(self, revoked: list) -> None:
        with self.guard().paused():
            self.listener.on_partitions_revoked(revoked)

    def on_partitions_lost(self, lost: list) -> None:
        with self.guard().paused():
            self.listener.on_partitions_lost(lost)
