"""The worker's chores on a clock (housekeeping.py): TTL expiry and the per-device gauges."""

from collections import namedtuple
from pathlib import Path

import numpy as np

from stream_lstm.checkpointing.manager import StateManager
from stream_lstm.config import Settings
from stream_lstm.housekeeping import Housekeeping
from stream_lstm.metrics import Metrics
from stream_lstm.state.table import DeviceTable


def make(tmp_path: Path, ttl: float):
    s = Settings(device_ttl_s=ttl, state_dir=tmp_path, alerts_topic="alerts")
    table = DeviceTable(8, 4, 1, 1, 8)
    manager = StateManager(s, tmp_path / "state.sqlite")
    metrics = Metrics()
    farewells: list[list[str]] = []

    def farewell(devices, stored):
        farewells.append(devices + [snap.device_id for snap in stored])
        return [("alerts", d.encode(), b"{}", None) for d in devices]

    return Housekeeping(s, manager, table, metrics, farewell), table, manager, metrics, farewells


Record = namedtuple("Record", "timestamp")  # what saw() reads of a ConsumerRecord
Part = namedtuple("Part", "partition")  # and of a TopicPartition


def flowing(chores, start: float, end: float, every: float = 10.0, partitions=(0, 1), lag: float = 0.0):
    """The input flows from ``start`` to ``end``: a turn every ``every`` s with records of each
    partition, ``lag`` s old by their Kafka timestamp."""
    t = start
    while t <= end:
        chores.saw({Part(p): [Record((t - lag) * 1000)] for p in partitions}, now=t)
        t += every


def test_idle_devices_expire_on_the_schedule_with_tombstones_and_farewells(tmp_path):
    chores, table, manager, metrics, farewells = make(tmp_path, ttl=600.0)
    slots = table.slots_for(["old", "fresh"], partitions=[0, 1], now=0.0)
    table.last_seen[slots] = [1000.0, 1900.0]  # wall clock of the last reading
    flowing(chores, 1000.0, 2061.0)  # the input flows throughout
    out = chores.expired(now=2000.0)  # "old" is 1000 s idle, past the 600 s TTL
    tombstones = [r for r in out if r[0] == manager.topic]
    assert [(r[1], r[2], r[4]) for r in tombstones] == [(b"old", None, 0)]
    assert farewells == [["old"]] and [r[0] for r in out].count("alerts") == 1
    assert list(table.index) == ["fresh"]
    assert metrics.expired_devices._value.get() == 1
    # The next pass waits a quarter of the TTL (at most a minute): nothing before then.
    table.last_seen[table.index["fresh"]] = 0.0
    assert chores.expired(now=2059.0) == []
    assert [r[1] for r in chores.expired(now=2061.0) if r[0] == manager.topic] == [b"fresh"]
    manager.store.close(clean=True)


def test_a_pause_a_restart_or_a_backlog_longer_than_the_ttl_forgets_nobody(tmp_path):
    """By the wall clock alone, a pause of the whole input (or a stopped worker) longer than the
    TTL made every device look idle: most of the fleet was forgotten at the first commit after
    the input resumed, before its readings came in (a soak test). The TTL runs on the input's
    own time (input_clock.py): a pause adds at most a quarter of it."""
    chores, table, manager, metrics, farewells = make(tmp_path, ttl=600.0)
    flowing(chores, 400.0, 1000.0)
    table.slots_for(["a", "b"], partitions=[0, 1], now=1000.0)
    # A pause from 1000 to 3000: both 2,000 s "idle", yet nobody is forgotten, during it ...
    assert chores.expired(now=2500.0) == []
    # ... nor after it: the input resumes at 3000, "a" at once, "b" 300 s later.
    flowing(chores, 3000.0, 3300.0)
    table.slots_for(["a"], partitions=[0], now=3300.0)
    assert chores.expired(now=3300.0) == []
    flowing(chores, 3310.0, 3400.0)
    table.slots_for(["b"], partitions=[1], now=3400.0)
    flowing(chores, 3410.0, 3500.0)
    assert chores.expired(now=3500.0) == [] and sorted(table.index) == ["a", "b"]
    # A restart (a fresh clock) with a backlog read at 10 records' worth of time a turn: the
    # devices come back as their readings are read, and are not forgotten meanwhile.
    chores2 = Housekeeping(manager.settings, manager, table, metrics, chores.farewell)
    flowing(chores2, 10_000.0, 10_050.0, every=1.0, lag=3600.0)  # 50 s of reading: 50 s of input
    assert chores2.expired(now=10_050.0) == []
    # "b" never comes back: forgotten once a TTL of input time has passed without it.
    for t in range(10_050, 10_800, 10):
        flowing(chores2, float(t), float(t), partitions=(0, 1))
        table.slots_for(["a"], partitions=[0], now=float(t))
    out = chores2.expired(now=10_800.0)
    assert [r[1] for r in out if r[0] == manager.topic] == [b"b"] and list(table.index) == ["a"]
    assert farewells == [["b"]]
    manager.store.close(clean=True)


def test_readings_in_bursts_further_apart_than_half_the_ttl_still_expire_a_silent_device(tmp_path):
    """The first fix gated expiry on a whole TTL of input with no gap of half a TTL: a fleet
    reporting together every 60 s with a 90 s TTL never forgot anything (a review)."""
    chores, table, manager, _, _ = make(tmp_path, ttl=90.0)
    forgotten_at = None
    for t in range(0, 600, 60):
        flowing(chores, float(t), float(t), partitions=(0,))
        table.slots_for(["alive"] + (["dead"] if t < 120 else []), partitions=[0] * (1 + (t < 120)), now=float(t))
        for s in range(t, t + 60, 5):
            if forgotten_at is None and [r for r in chores.expired(now=float(s)) if r[1] == b"dead"]:
                forgotten_at = s
    assert forgotten_at is not None and 60 + 90 <= forgotten_at <= 60 + 90 + 3 * 60  # (learnt by the 4th)
    assert list(table.index) == ["alive"]
    manager.store.close(clean=True)


def test_without_a_ttl_nothing_expires(tmp_path):
    chores, table, manager, _, farewells = make(tmp_path, ttl=0.0)
    table.slots_for(["a"], partitions=[0], now=0.0)
    assert chores.expired(now=1e12) == [] and farewells == [] and len(table) == 1
    manager.store.close(clean=True)


def test_the_device_gauges_are_a_pass_on_a_clock_not_every_turn(tmp_path):
    chores, table, manager, metrics, _ = make(tmp_path, ttl=0.0)
    slot = table.slots_for(["pump"], partitions=[0], now=0.0)[0]
    table.alert[slot] = [100.0, 160.0, 0.9999, 130.0, 42.0, 1.0, 2.0]  # an open alert
    chores.count_devices()
    assert metrics.alerts_open._value.get() == 1
    table.drop(["pump"])
    chores.count_devices()  # within gauge_every_s: not recomputed
    assert metrics.alerts_open._value.get() == 1
    chores.gauge_every_s, chores._next_gauges = 0.0, 0.0
    chores.count_devices()
    assert metrics.alerts_open._value.get() == 0
    # The devices held too: a worker whose partitions were revoked commits no more, and its last
    # commit's count stayed in the fleet's sum.
    metrics.active_devices.set(1)
    chores.count_devices()
    assert metrics.active_devices._value.get() == 0
    manager.store.close(clean=True)


class Consumer:
    """What update_lag reads of a KafkaConsumer: its assignment and each partition's end."""

    def __init__(self, highwater):
        self.high = highwater

    def assignment(self):
        from kafka.structs import TopicPartition
        return {TopicPartition("in", p) for p in self.high}

    def highwater(self, tp):
        return self.high[tp.partition]


def test_the_lag_says_which_silent_partitions_move_with_the_input_and_which_are_kept(tmp_path):
    from kafka.structs import TopicPartition

    chores, table, manager, metrics, _ = make(tmp_path, ttl=600.0)
    flowing(chores, 0.0, 10.0, partitions=(0, 1, 2))
    committed = {TopicPartition("in", p): off for p, off in ((0, 100), (1, 49), (2, 10))}
    chores.update_lag(Consumer({0: 100, 1: 50, 2: 90}), committed)
    assert chores.clock.caught_up == {0, 1}  # 1: a commit marker after its last reading
    assert metrics.consumer_lag.labels("2")._value.get() == 80
    flowing(chores, 20.0, 100.0, partitions=(3,))  # only partition 3 reads: 0 and 1 move with it
    idle = chores.clock.idle(np.array([0, 1, 2]), np.array([10.5] * 3)).tolist()
    assert idle[0] == idle[1] > 0 and idle[2] == 0.0  # 2 still has a backlog: its devices wait
    chores.update_lag(Consumer({0: 100, 3: 5}), committed)  # 1 and 2 revoked: their time forgotten
    assert chores.clock.idle(np.array([1, 2]), np.array([10.5, 10.5])).tolist() == [0.0, 0.0]
    manager.store.close(clean=True)


def test_records_without_a_kafka_time_count_as_read_now(tmp_path):
    chores, *_, manager, _, _ = make(tmp_path, ttl=600.0)
    Untimed = namedtuple("Untimed", "timestamp")
    for t in (0.0, 10.0, 20.0):
        chores.saw({Part(0): [Untimed(None), Untimed(-1)]}, now=t)  # (v0 records: None; -1)
    assert chores.clock.idle(np.array([0]), np.array([0.5])).tolist() == [20.0]
    manager.store.close(clean=True)


def test_an_expiry_pass_over_an_empty_table_forgets_nobody_and_raises_nothing(tmp_path):
    """No device in memory (an input of dead letters only, or every device gone): the sweep's
    lookup raised inside the worker's commit, which rolled back at every pass (a review)."""
    chores, table, manager, _, farewells = make(tmp_path, ttl=600.0)
    try:
        flowing(chores, 1000.0, 2061.0)
        assert len(table) == 0
        assert chores.expired(now=2000.0) == [] and farewells == []
    finally:
        manager.store.close(clean=True)


def test_a_paused_partition_the_worker_has_committed_nothing_of_still_reports_its_lag(
        tmp_path, bootstrap, topic_name):
    """A partition paused while its state is restored is never fetched (no high watermark) and
    has no commit of this worker: its lag is asked of the broker, on the gauges' clock."""
    from kafka import KafkaConsumer, KafkaProducer
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.structs import OffsetAndMetadata, TopicPartition

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin.create_topics([NewTopic(topic_name, 2, 1)])
    admin.close()
    producer = KafkaProducer(bootstrap_servers=bootstrap)
    for p, n in ((0, 7), (1, 3)):
        for _ in range(n):
            producer.send(topic_name, b"x", partition=p)
    producer.flush()
    tp0, tp1 = TopicPartition(topic_name, 0), TopicPartition(topic_name, 1)
    group = f"g-{topic_name}"
    committer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    committer.commit({tp0: OffsetAndMetadata(2, "", -1)})  # the group's position: 2 of 7
    committer.close()

    chores, *_, manager, metrics, _ = make(tmp_path, ttl=0.0)
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    consumer.assign([tp0, tp1])
    consumer.pause(tp0, tp1)  # as while restoring: nothing is fetched
    assert consumer.highwater(tp0) is None
    manager.assign({0, 1})  # (restoring: only such partitions are asked about)
    try:
        chores.update_lag(consumer, committed={})
        assert metrics.consumer_lag.labels("0")._value.get() == 5
        sampled = {s.labels["partition"] for s in metrics.consumer_lag.collect()[0].samples}
        assert sampled == {"0"}  # partition 1: never committed by the group, so no figure
        chores.update_lag(consumer, committed={tp0: 6})  # the worker's own commit wins
        assert metrics.consumer_lag.labels("0")._value.get() == 5  # but not before the clock
        chores._next_lag_lookup = 0.0
        chores.update_lag(consumer, committed={tp0: 6})
        assert metrics.consumer_lag.labels("0")._value.get() == 1
        manager.restoring.clear()  # restored, not yet fetched nor committed: not asked about
        chores._next_lag_lookup = 0.0
        chores.update_lag(consumer, committed={})
        assert metrics.consumer_lag.labels("0")._value.get() == 1
    finally:
        consumer.close()
        producer.close()
        manager.store.close(clean=True)


def test_a_store_larger_than_a_slice_is_swept_in_passes_seconds_apart_not_a_minute(tmp_path):
    """One slice of the store a minute forgot at most 2,000 stored devices a minute: a fleet
    bringing new ids faster than 33 a second, TTL set, grew its store and changelog without
    bound (a review). While a round is under way, passes come every SWEEP_PASS_S."""
    from stream_lstm.checkpointing.codec import encode_snapshot
    from stream_lstm.checkpointing.expiry import SWEEP_PASS_S, SWEEP_ROWS

    chores, table, manager, _, _ = make(tmp_path, ttl=600.0)
    manager.ready.add(0)
    other = DeviceTable(1, 4, 1, 1, 8)
    (slot,) = other.slots_for(["x"], [0], now=0.0)
    snap = other.snapshot(slot)
    rows = []
    for i in range(2 * SWEEP_ROWS + 500):  # three slices' worth, all idle since 0
        snap.device_id = f"gone-{i:05d}"
        rows.append((snap.device_id, 0, encode_snapshot(snap)))
    manager.store.put_many(rows)
    flowing(chores, 0.0, 1000.0, partitions=(0,))
    forgotten, t = 0, 1000.0
    while t < 1060.0:  # one minute of turns, a second apart
        forgotten += sum(r[0] == manager.topic for r in chores.expired(now=t))
        manager.committed({})
        t += 1.0
    assert forgotten == len(rows) and manager.store.count() == 0  # (2,000 before: one pass a minute)
    assert SWEEP_PASS_S <= 10.0
    manager.store.close(clean=True)
