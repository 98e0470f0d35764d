"""When device state is checkpointed (checkpointing/manager.py): at most once per interval per
partition, a dirty device evicted meanwhile on the next commit, and a replay marker with each
partition's checkpoint. No broker: what goes into the transaction is checked directly."""

from __future__ import annotations

import numpy as np

from stream_lstm.checkpointing.codec import decode_snapshot
from stream_lstm.checkpointing.manager import StateManager
from stream_lstm.checkpointing.replay import REPLAY_MARKER, decode_marker
from stream_lstm.config import Settings
from stream_lstm.state.table import DeviceTable


def setup(tmp_path, interval_s, max_devices=8):
    s = Settings(group_id="g", state_dir=tmp_path, checkpoint_interval_s=interval_s)
    manager = StateManager(s, tmp_path / "state.sqlite")
    table = DeviceTable(max_devices, 4, 1, 1, 2)
    table.on_evict = manager.on_evict
    return manager, table


def touch(manager, table, devices, partition=0):
    slots = table.slots_for(devices, [partition] * len(devices), now=0.0, load=manager.load)
    table.n_seen[slots] += 1  # a change the snapshot shows
    manager.touch(table, slots)


def written(records):
    devices = sorted(k.decode() for _, k, v, _, _ in records if k != REPLAY_MARKER)
    markers = {p: decode_marker(v) for _, k, v, _, p in records if k == REPLAY_MARKER}
    return devices, markers


def test_a_partition_checkpoints_once_per_interval_with_its_replay_marker(tmp_path, monkeypatch):
    clock = [100.0]
    monkeypatch.setattr("stream_lstm.checkpointing.manager.time.monotonic", lambda: clock[0])
    manager, table = setup(tmp_path, interval_s=30)
    touch(manager, table, ["a", "b"], partition=0)
    touch(manager, table, ["c"], partition=1)
    # Not due yet: nothing is written, the devices stay dirty.
    assert manager.records_for_commit(table, {0: 10, 1: 5}) == []
    manager.committed({})
    assert sorted(manager.dirty) == ["a", "b", "c"]
    clock[0] += 31  # partition 0's turn (each at its phase of the interval: schedule.py)
    touch(manager, table, ["a"], partition=0)  # dirty again: still one write
    devices, markers = written(manager.records_for_commit(table, {0: 12, 1: 5}))
    assert devices == ["a", "b"] and markers == {0: 12}
    manager.committed({})
    clock[0] += 10  # partition 1's, within one and a half intervals of its change
    devices, markers = written(manager.records_for_commit(table, {0: 12, 1: 5}))
    assert devices == ["c"] and markers == {1: 5}
    manager.committed({})
    assert manager.dirty == {} and manager.markers == {0: 12, 1: 5}
    # A forced checkpoint (revocation, a swap, a clean stop) writes at once.
    touch(manager, table, ["b"], partition=0)
    devices, markers = written(manager.records_for_commit(table, {0: 13}, flush={0}))
    assert devices == ["b"] and markers == {0: 13}


def test_interval_zero_checkpoints_every_commit(tmp_path):
    manager, table = setup(tmp_path, interval_s=0)
    touch(manager, table, ["a"])
    devices, markers = written(manager.records_for_commit(table, {0: 1}))
    assert devices == ["a"] and markers == {0: 1}


def test_a_dirty_device_evicted_waits_for_the_next_commit_not_the_store(tmp_path):
    manager, table = setup(tmp_path, interval_s=3600, max_devices=2)
    touch(manager, table, ["a"])
    touch(manager, table, ["b", "c"])  # evicts "a", dirty
    assert manager.store.get("a") is None  # the store is never ahead of the changelog
    devices, markers = written(manager.records_for_commit(table, {0: 3}))
    assert devices == ["a"] and markers == {}  # written, but its partition is not checkpointed
    manager.committed({})
    assert decode_snapshot(manager.store.get("a")[1]).n_seen == 1
    assert sorted(manager.dirty) == ["b", "c"]


def test_an_evicted_dirty_device_loaded_back_keeps_its_changes(tmp_path):
    manager, table = setup(tmp_path, interval_s=3600, max_devices=2)
    touch(manager, table, ["a"])
    touch(manager, table, ["b", "c"])  # evicts "a"
    touch(manager, table, ["a"])  # back from beside the table, not from the (older) store
    slot = table.index["a"]
    assert int(table.n_seen[slot]) == 2 and "a" in manager.dirty


def test_a_clean_stop_with_unwritten_changes_does_not_vouch_for_them(tmp_path):
    manager, table = setup(tmp_path, interval_s=3600)
    manager.ready = {0}
    touch(manager, table, ["a"])
    manager.close(table, clean=True)
    from stream_lstm.checkpointing.store import StateStore

    store = StateStore(tmp_path / "state.sqlite")
    assert not store.opened_clean and store.get("a") is None
    store.close(clean=False)


def test_revoking_a_partition_forgets_its_dirty_devices(tmp_path):
    manager, table = setup(tmp_path, interval_s=0)
    touch(manager, table, ["a"], partition=0)
    touch(manager, table, ["b"], partition=1)
    manager.revoke(table, {0})
    devices, _ = written(manager.records_for_commit(table, {1: 1}))
    assert devices == ["b"] and np.all([d != "a" for d in manager.dirty])


def test_changes_made_while_a_commit_is_in_flight_wait_for_the_next_one(tmp_path):
    # The worker computes the next batch while the broker completes a commit (transaction.py,
    # wait=False). What that batch changes must not count as written by the commit in flight.
    manager, table = setup(tmp_path, interval_s=0, max_devices=2)
    touch(manager, table, ["a", "b"])
    devices, _ = written(manager.records_for_commit(table, {0: 2}))
    assert devices == ["a", "b"]
    manager.commit_started()
    touch(manager, table, ["a"])  # changed again after its snapshot was taken
    touch(manager, table, ["c"])  # evicts "b", clean once the commit lands
    assert manager.store.get("b") is None  # not before the commit that wrote it
    manager.committed({})
    assert decode_snapshot(manager.store.get("b")[1]).n_seen == 1
    assert sorted(manager.dirty) == ["a", "c"]
    devices, _ = written(records := manager.records_for_commit(table, {0: 4}))
    assert devices == ["a", "c"]
    snaps = {k: decode_snapshot(v) for _, k, v, _, _ in records if k != REPLAY_MARKER}
    assert snaps[b"a"].n_seen == 2


def test_a_rollback_forgets_what_happened_while_a_commit_was_in_flight(tmp_path):
    manager, table = setup(tmp_path, interval_s=0, max_devices=1)
    touch(manager, table, ["a"])
    manager.records_for_commit(table, {0: 1})
    manager.commit_started()
    touch(manager, table, ["b"])  # evicts "a"
    manager.rollback(table, {0})  # the commit failed: memory goes back to the changelog
    assert manager.dirty == {} and manager.store.get("a") is None
    manager.committed({})  # (a later commit) sees nothing of the lost batch
    assert manager.dirty == {}


def test_a_forged_stored_snapshot_starts_its_device_afresh_and_its_partition_is_the_stores(tmp_path):
    """A changelog record holding a NaN count stopped the worker at every start (the table
    could not take it in); one naming partition 999 made every transaction of its partition
    fail (a tombstone for a partition that does not exist)."""
    from stream_lstm.checkpointing.codec import encode_snapshot

    manager, table = setup(tmp_path, interval_s=30)
    touch(manager, table, ["nan", "far", "fine"], partition=2)
    snaps = {d: table.snapshot(table.index[d]) for d in ("nan", "far", "fine")}
    snaps["nan"].columns["n_seen"] = np.float64("nan")
    snaps["far"].columns["partition"] = np.int64(999)
    manager.store.put_many([(d, 2, encode_snapshot(s)) for d, s in snaps.items()])
    fresh, _ = setup(tmp_path / "again", interval_s=30)
    fresh.store = manager.store
    assert fresh.load("nan") is None and "nan" in fresh.unwritten  # afresh (counted, logged)
    assert fresh.load("far").partition == 2 and fresh.load("fine").n_seen == 1


def test_a_marker_never_goes_below_the_floor_the_groups_moved_back_offsets_left_it_at(tmp_path):
    """After the group's offsets moved back below the changelog's marker (partitions.py sets the
    floor), a checkpoint of the partition part-way through the re-read (a clean stop's, or one
    due because another device of it changed) keeps the marker: written at the committed
    offset, the next owner saw no re-read and counted the rest of it late."""
    manager, table = setup(tmp_path, interval_s=30)
    manager.marker_floor[0] = 500  # the state has every reading of partition 0 below 500
    touch(manager, table, ["a"], partition=0)
    touch(manager, table, ["b"], partition=1)
    devices, markers = written(manager.records_for_commit(table, {0: 120, 1: 40}, flush={0, 1}))
    assert devices == ["a", "b"] and markers == {0: 500, 1: 40}
    manager.committed({})
    touch(manager, table, ["a"], partition=0)  # past the floor: the offset itself again
    assert written(manager.records_for_commit(table, {0: 640}, flush={0}))[1] == {0: 640}
    manager.committed({})
    manager.revoke(table, {0})
    assert 0 not in manager.marker_floor
