"""The worker's housekeeping on a clock: device TTL expiry, the per-device gauges, the lag.

Each runs on its own schedule rather than every loop turn: a pass over all devices costs the
same whatever a turn carried, and a live turn carries few readings. The TTL runs on the
input's own time, not the wall clock (``input_clock.py``): a paused input, a stopped worker or
a restart makes no device idle.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

from kafka import KafkaConsumer
from kafka.structs import TopicPartition

from stream_lstm import alerts, experts
from stream_lstm.checkpointing.expiry import SWEEP_PASS_S
from stream_lstm.checkpointing.manager import StateManager
from stream_lstm.config import Settings
from stream_lstm.input_clock import InputClock
from stream_lstm.metrics import Metrics
from stream_lstm.state.table import DeviceTable

log = logging.getLogger("stream_lstm.housekeeping")
# How long the loop may wait on the broker for the lag of a restoring partition, every few
# seconds at most (the turn is otherwise idle: its partitions are paused).
LAG_LOOKUP_TIMEOUT_MS = 1_000


class Housekeeping:
    """Scheduled chores of a worker.

    Parameters
    ----------
    settings
        ``STREAM_LSTM_DEVICE_TTL_S`` (0: devices never expire).
    state, table
        Where devices live.
    metrics
        The gauges and counters it sets.
    farewell
        Records that close a departing device's open alerts (``BatchPipeline.farewell``).
    gauge_every_s
        How often the per-device gauges are recomputed.

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> tmp, s = tempfile.TemporaryDirectory(), Settings(device_ttl_s=600.0)
    >>> state = StateManager(s, Path(tmp.name) / "state.sqlite")
    >>> table = DeviceTable(max_devices=4, window=4, n_features=1, num_layers=1, hidden_size=2)
    >>> chores = Housekeeping(s, state, table, Metrics(), farewell=lambda devices, stored: [])
    >>> _ = table.slots_for(["old"], [0], now=1000.0), table.slots_for(["new"], [0], now=1900.0)
    >>> from collections import namedtuple
    >>> Rec, Part = namedtuple("Rec", "timestamp"), namedtuple("Part", "partition")
    >>> for t in range(1000, 2001, 100):  # readings (of "new") for 1,000 s: the input flows
    ...     chores.saw({Part(0): [Rec(t * 1000)]}, now=t)
    >>> [(key, value) for topic, key, value, *_ in chores.expired(now=2000.0)]  # a tombstone
    [(b'old', None)]
    >>> list(table.index); state.store.close(clean=True); tmp.cleanup()
    ['new']
    """

    def __init__(self, settings: Settings, state: StateManager, table: DeviceTable,
                 metrics: Metrics, farewell: Callable[..., list],
                 gauge_every_s: float = 5.0) -> None:
        self.settings = settings
        self.state = state
        self.table = table
        self.metrics = metrics
        self.farewell = farewell
        self.gauge_every_s = gauge_every_s
        self._next_expiry = 0.0
        self._next_gauges = 0.0
        self._next_lag_lookup = 0.0
        # What the TTL runs on; its history spans ~1,000-4,000 points of a TTL's 1/1024 each.
        self.clock = InputClock(cap_s=settings.device_ttl_s / 4, resolution_s=max(1.0, settings.device_ttl_s / 1024))

    def saw(self, polled: Mapping[object, list], now: float) -> None:
        """A turn's records (``{TopicPartition: [ConsumerRecord]}``), before they are applied:
        their Kafka times move the input clock on (a record without one: read ``now``)."""
        if self.settings.device_ttl_s <= 0 or not polled:
            return
        newest = {}
        for tp, records in polled.items():
            if records:
                stamps = [r.timestamp for r in records if r.timestamp is not None and r.timestamp >= 0]
                newest[tp.partition] = max(stamps) / 1000.0 if stamps else now  # type: ignore[attr-defined]
        self.clock.saw(newest, now)

    def expired(self, now: float) -> list:
        """Changelog tombstones and alert-closing records of devices idle past the TTL, when an
        expiry pass is due (at most every minute, or a quarter of the TTL; sooner while a round
        over the store is under way); else nothing.
        Call it only for a transaction that will be committed: the devices leave memory now."""
        ttl = self.settings.device_ttl_s
        if ttl <= 0 or now < self._next_expiry:
            return []
        every = min(60.0, ttl / 4)
        records = self.state.expire(self.table, now, farewell=self.farewell, idle=self.clock.idle)
        # A round over the store under way comes back sooner (checkpointing/expiry.py).
        self._next_expiry = now + (min(every, SWEEP_PASS_S) if self.state.expiry.sweeping else every)
        tombstones = sum(r[0] == self.state.topic for r in records)
        if tombstones:
            log.info("devices forgotten: idle past the TTL (input time)",
                     extra={"devices": tombstones, "ttl_s": ttl})
        self.metrics.expired_devices.inc(tombstones)
        self.metrics.alerts_closed.inc(len(records) - tombstones)
        return records

    def count_devices(self) -> None:
        """The device gauges: a pass over all devices, so not every turn. (The devices held
        too, which commits also set: a worker left with no partitions commits no more, and its
        last count, with the revoked devices, stayed in the fleet's sum.)"""
        if time.monotonic() < self._next_gauges:
            return
        self._next_gauges = time.monotonic() + self.gauge_every_s
        slots = list(self.table.index.values())
        self.metrics.active_devices.set(len(slots))
        self.metrics.alerts_open.set(int(alerts.is_open(self.table.alert[slots]).sum()))
        if self.table.with_experts:
            counts = experts.leaders(self.table.experts, slots)
            self.metrics.set_expert_leaders(dict(zip(experts.EXPERTS, counts.tolist(), strict=True)))

    def update_lag(self, consumer: KafkaConsumer, committed: dict[TopicPartition, int],
                   unreadable: int = 0) -> None:
        """The lag gauge from what the worker committed: ``consumer.position()`` may go to the
        broker, and raises when it is down, which must not end an idle worker's loop. (Behind a
        transactional producer, a commit marker after the last reading shows as a lag of 1.)
        Beside it, how many partitions wait at a batch the client cannot read."""
        self.metrics.input_unreadable_partitions.set(unreadable)
        assigned, caught_up, unknown = set(), set(), []
        for tp in consumer.assignment():
            assigned.add(tp.partition)
            high, position = consumer.highwater(tp), committed.get(tp)
            if high is not None and position is not None:
                self.metrics.consumer_lag.labels(str(tp.partition)).set(max(0, high - position))
                if high - position <= 1:  # read to its end: nothing of it queued, so a silent
                    caught_up.add(tp.partition)  # one moves on with the whole input (input_clock.py)
            elif tp.partition in self.state.restoring | self.state.replaying:
                unknown.append(tp)  # (a live one never committed gets its figure at its commit)
        if unknown:
            self._look_up_lag(consumer, unknown, committed)
        if self.settings.device_ttl_s > 0:  # (the clock is read by the TTL alone)
            self.clock.caught_up = caught_up
            self.clock.keep_only(assigned)

    def _look_up_lag(self, consumer: KafkaConsumer, partitions: list[TopicPartition],
                     committed: Mapping[TopicPartition, int]) -> None:
        """The lag of partitions the fetcher knows nothing of yet, asked of the broker on the
        gauges' clock: a partition paused while its state is restored and replayed is not
        fetched, so it has no high watermark, and the worker has committed nothing of it. Its
        backlog grows while it waits, which is when the lag alert must see it (a failover of
        a large fleet); without this, its series was absent until the restore ended."""
        if time.monotonic() < self._next_lag_lookup:
            return
        self._next_lag_lookup = time.monotonic() + self.gauge_every_s
        try:
            ends = consumer.end_offsets(partitions, timeout_ms=LAG_LOOKUP_TIMEOUT_MS)
            # The group's positions in one request (kafka-python's public committed() asks one
            # partition a request: 0.4-0.7 s for 64 partitions here, against 3-6 ms).
            coordinator = getattr(consumer, "_coordinator", None)
            if coordinator is not None:
                found = coordinator.fetch_committed_offsets(partitions, timeout_ms=LAG_LOOKUP_TIMEOUT_MS)
                group = {tp: om.offset for tp, om in found.items() if om is not None and om.offset >= 0}
            else:
                group = {tp: off for tp in partitions
                         if (off := consumer.committed(tp, timeout_ms=LAG_LOOKUP_TIMEOUT_MS)) is not None}
            for tp in partitions:
                position = committed.get(tp, group.get(tp))  # (none: never committed, no figure)
                if position is not None and ends.get(tp) is not None:
                    self.metrics.consumer_lag.labels(str(tp.partition)).set(max(0, ends[tp] - position))
        except Exception as exc:  # noqa: BLE001 - a broker that does not answer: asked again later
            log.debug("the lag of restoring partitions could not be asked", extra={"error": repr(exc)[:200]})
