"""The worker's chores on a clock (housekeeping.py): TTL expiry and the per-device gauges."""

from pathlib import Path

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

    def farewell(devices):
        farewells.append(devices)
        return [("alerts", d.encode(), b"{}", None) for d in devices]

    return Housekeeping(s, manager, table, metrics, farewell), table, manager, metrics, farewells


def test_idle_devices_expire_on_the_schedule_with_tombstones_and_farewells(tmp_path):
    chores, table, manager, metrics, farewells = make(tmp_path, ttl=600.0)
    slots = table.slots_for(["old", "fresh"], partitions=[0, 1], now=0.0)
    table.last_seen[slots] = [1000.0, 1900.0]  # wall clock of the last reading
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
