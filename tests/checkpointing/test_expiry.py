"""The TTL (checkpointing/expiry.py): devices idle past it are forgotten whether memory or only
the local store holds them (evicted, or restored after a restart and not seen since), and an
open alert of theirs closes."""

import json
from pathlib import Path

import numpy as np

from stream_lstm.checkpointing import expiry
from stream_lstm.checkpointing.codec import encode_snapshot
from stream_lstm.checkpointing.manager import StateManager
from stream_lstm.checkpointing.replay import REPLAY_MARKER, decode_marker
from stream_lstm.config import Settings
from stream_lstm.engine import BatchedEngine
from stream_lstm.models import SimpleLSTM
from stream_lstm.pipeline import BatchPipeline
from stream_lstm.state.table import DeviceTable


def stored(devices: dict[str, float], open_alert: str) -> list[tuple[str, int, bytes]]:
    """Store rows of devices last seen at the given times, one with an open alert."""
    other = DeviceTable(8, 8, 1, 1, 8)
    rows = []
    for dev, seen in devices.items():
        (slot,) = other.slots_for([dev], [3], now=seen)
        if dev == open_alert:
            other.alert[slot] = [100.0, 160.0, 0.9999, 130.0, 42.0, 1.0, 2.0]
        rows.append((dev, 3, encode_snapshot(other.snapshot(slot))))
    return rows


def test_idle_devices_in_the_store_expire_too(tmp_path: Path):
    s = Settings(alerts_topic="alerts", device_ttl_s=60.0, state_dir=tmp_path)
    table = DeviceTable(8, 8, 1, 1, 8)
    pipe = BatchPipeline(s, table, BatchedEngine(SimpleLSTM(1, 8, 1, 4), table), lambda: "v1")
    manager = StateManager(s, tmp_path / "state.sqlite")
    manager.ready.add(3)  # the stored devices' partition is ours, restored
    manager.store.put_many(stored({"evicted-idle": 100.0, "evicted-recent": 990.0}, "evicted-idle"))
    table.slots_for(["in-memory-idle"], [3], now=0.0)
    records = manager.expire(table, now=1000.0, farewell=pipe.farewell)
    gone = sorted(r[1] for r in records if r[0] == manager.topic and r[2] is None)
    assert gone == [b"evicted-idle", b"in-memory-idle"]
    (close,) = [json.loads(r[2]) for r in records if r[0] == "alerts"]
    assert (close["device_id"], close["event"], close["reason"]) == ("evicted-idle", "close", "expired")
    assert len(table) == 0 and manager.store.count() == 2  # the rows stay until the commit
    manager.committed({})  # the tombstones committed
    assert manager.store.device_ids() == ["evicted-recent"]
    manager.store.close(clean=True)


def test_a_stored_device_is_forgotten_in_the_partition_of_its_row(tmp_path: Path):
    """A row kept under partition 3 whose snapshot names partition 5 (written before the
    device moved): its tombstone, close and replay marker are partition 3's, the row this worker
    owns; the snapshot's partition sent the tombstone where it deleted nothing (a review)."""
    s = Settings(alerts_topic="alerts", device_ttl_s=60.0, state_dir=tmp_path)
    manager = StateManager(s, tmp_path / "state.sqlite")
    manager.ready.add(3)
    other = DeviceTable(8, 8, 1, 1, 8)
    (slot,) = other.slots_for(["moved"], [5], now=100.0)
    other.alert[slot] = [100.0, 160.0, 0.9999, 130.0, 42.0, 1.0, 2.0]
    manager.store.put_many([("moved", 3, encode_snapshot(other.snapshot(slot)))])
    table = DeviceTable(8, 8, 1, 1, 8)
    pipe = BatchPipeline(s, table, BatchedEngine(SimpleLSTM(1, 8, 1, 4), table), lambda: "v1")
    records = manager.expire(table, now=1000.0, farewell=pipe.farewell)
    (close,) = [json.loads(r[2]) for r in records if r[0] == "alerts"]
    (gone,) = [r for r in records if r[0] == manager.topic]
    assert (gone[1], gone[4], close["partition"]) == (b"moved", 3, 3)
    assert manager.next_flush[3] == 0.0 and 5 not in manager.next_flush
    manager.committed({})
    assert manager.store.device_ids() == []
    manager.store.close(clean=True)


def test_the_commit_forgetting_a_device_moves_its_partitions_replay_marker_past_it(tmp_path: Path):
    """Its partition not due, the marker stayed before the device's readings: after a crash, a
    replay from it stepped them again and the forgotten device came back, forecast at once
    where an uninterrupted worker started it afresh (a review, through a real broker)."""
    s = Settings(device_ttl_s=60.0, state_dir=tmp_path)
    table = DeviceTable(8, 8, 1, 1, 8)
    manager = StateManager(s, tmp_path / "state.sqlite")
    manager.ready |= {3, 4}
    table.slots_for(["idle"], [3], now=0.0)
    manager.touch(table, table.slots_for(["busy"], [4], now=990.0))  # (dirty, not due for 30 s)
    assert manager.records_for_commit(table, {3: 42, 4: 7}) == []
    manager.committed({})
    (gone,) = manager.expire(table, now=1000.0)
    markers = [(r[4], decode_marker(r[2])) for r in manager.records_for_commit(table, {3: 42, 4: 7})
               if r[1] == REPLAY_MARKER]
    assert gone[1] == b"idle" and markers == [(3, 42)]
    manager.store.close(clean=True)


def test_the_store_is_read_a_slice_a_pass_and_a_full_memory_does_not_stop_it(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(expiry, "SWEEP_ROWS", 2)
    s = Settings(device_ttl_s=60.0, state_dir=tmp_path)
    manager = StateManager(s, tmp_path / "state.sqlite")
    manager.ready.add(3)
    manager.store.put_many(stored({f"d{i}": 0.0 for i in range(5)}, open_alert=""))
    table = DeviceTable(8, 8, 1, 1, 8)
    passes = []
    for _ in range(3):
        passes.append(sorted(r[1] for r in manager.expire(table, now=1000.0)))
        manager.committed({})
    assert passes == [[b"d0", b"d1"], [b"d2", b"d3"], [b"d4"]]  # then a new round
    # Memory full of recent devices (a fleet larger than MAX_DEVICES: every poll evicts): a
    # silent device only the store holds is forgotten all the same, its open alert closed,
    # and memory keeps its devices. (It waited for room that never came, a review.)
    manager.store.put_many(stored({"late": 0.0}, open_alert="late"))
    full = DeviceTable(2, 8, 1, 1, 8)
    full.slots_for(["a", "b"], [0, 0], now=999.0)
    pipe = BatchPipeline(s.model_copy(update={"alerts_topic": "alerts"}), full,
                         BatchedEngine(SimpleLSTM(1, 8, 1, 4), full), lambda: "v1")
    records = manager.expire(full, now=1000.0, farewell=pipe.farewell)
    assert [(r[0], r[1]) for r in records] == [("alerts", b"late"), (manager.topic, b"late")]
    assert json.loads(records[0][2])["event"] == "close" and sorted(full.index) == ["a", "b"]
    manager.committed({})
    assert manager.store.device_ids() == []
    manager.store.close(clean=True)


def test_a_stored_alert_of_another_width_reads_as_none_open_as_a_restore_reads_it(tmp_path: Path):
    """Forged or damaged: farewell raised on it, every expiry commit rolled back (a review)."""
    s = Settings(alerts_topic="alerts", device_ttl_s=60.0, state_dir=tmp_path)
    other = DeviceTable(8, 8, 1, 1, 8)
    snap = other.snapshot(other.slots_for(["odd"], [3], now=100.0)[0])
    snap.columns["alert"] = np.array([100.0, 160.0])
    table = DeviceTable(8, 8, 1, 1, 8)
    pipe = BatchPipeline(s, table, BatchedEngine(SimpleLSTM(1, 8, 1, 4), table), lambda: "v1")
    manager = StateManager(s, tmp_path / "state.sqlite")
    manager.ready.add(3)
    manager.store.put_many([("odd", 3, encode_snapshot(snap))])
    records = manager.expire(table, now=1000.0, farewell=pipe.farewell)
    assert [(r[0], r[1]) for r in records] == [(manager.topic, b"odd")]  # forgotten, nothing to close
    manager.store.close(clean=True)


def test_stored_devices_of_partitions_not_ours_or_still_restoring_are_left_alone(tmp_path: Path):
    s = Settings(alerts_topic="alerts", device_ttl_s=60.0, state_dir=tmp_path)
    table = DeviceTable(8, 8, 1, 1, 8)
    pipe = BatchPipeline(s, table, BatchedEngine(SimpleLSTM(1, 8, 1, 4), table), lambda: "v1")
    manager = StateManager(s, tmp_path / "state.sqlite")
    # Partition 3 was revoked (its rows kept for a later reassignment): its new owner may have
    # seen the device since, so no tombstone and no close event from here; nor while it is
    # being restored, when the rows are not current yet.
    manager.store.put_many(stored({"theirs-idle": 100.0}, "theirs-idle"))
    assert manager.expire(table, now=1000.0, farewell=pipe.farewell) == []
    manager.restoring.add(3)
    assert manager.expire(table, now=1000.0, farewell=pipe.farewell) == []
    assert manager.store.device_ids() == ["theirs-idle"] and len(table) == 0
    manager.store.close(clean=True)


def test_an_expired_device_leaves_the_store_only_when_its_tombstone_commits(tmp_path: Path):
    """Deleted at once, a rolled-back commit would lose the device with no tombstone on the
    changelog and no close for its open alert. Until the commit it is gone all the same: a
    reading of it meanwhile starts it afresh, not from the expired state."""
    s = Settings(device_ttl_s=60.0, state_dir=tmp_path)
    manager = StateManager(s, tmp_path / "state.sqlite")
    manager.ready.add(3)
    manager.store.put_many(stored({"idle": 0.0, "back": 0.0}, open_alert=""))
    table = DeviceTable(8, 8, 1, 1, 8)
    assert len(manager.expire(table, now=1000.0)) == 2
    manager.rollback(table, {3})  # the commit failed
    assert manager.store.device_ids() == ["back", "idle"] and not manager.expiring
    manager.ready.add(3)  # (restored again)
    assert len(manager.expire(table, now=2000.0)) == 2  # the next pass expires them again
    (slot,) = table.slots_for(["back"], [3], now=2001.0, load=manager.load)
    assert "back" in manager.unwritten and table.last_seen[slot] == 2001.0  # afresh
    manager.committed({})
    assert manager.store.count() == 0 and not manager.expiring
    manager.store.close(clean=True)


def test_a_stored_device_whose_newer_row_waits_for_a_full_disk_is_not_judged_by_its_old_one(tmp_path: Path):
    from tests.checkpointing.store_full import fill, make_room

    s = Settings(alerts_topic="alerts", device_ttl_s=60.0, state_dir=tmp_path)
    table = DeviceTable(8, 8, 1, 1, 8)
    pipe = BatchPipeline(s, table, BatchedEngine(SimpleLSTM(1, 8, 1, 4), table), lambda: "v1")
    manager = StateManager(s, tmp_path / "state.sqlite")
    manager.ready.add(3)
    manager.store.put_many(stored({"busy": 100.0}, "busy"))  # on disk: idle since 100
    fill(manager.store)
    # Evicted again, seen at 990, with another device (a batch's evictions): held, both.
    newer, other = stored({"busy": 990.0, "other": 995.0}, "busy")
    manager.store.put_many([newer, (other[0], other[1], other[2] + b"\0" * 50_000)])
    assert "busy" in manager.store.unwritten
    assert manager.expire(table, now=1000.0, farewell=pipe.farewell) == []  # not expired, no close
    make_room(manager.store)
    assert manager.store.write_unwritten() and manager.expire(table, now=1000.0, farewell=pipe.farewell) == []
    assert manager.store.device_ids() == ["busy", "other"]
    manager.store.close(clean=True)
