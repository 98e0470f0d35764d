"""StateManager: commits' checkpoints, unusable stored state, the clean stop (its restore
slices: test_restoring.py)."""

from __future__ import annotations

import numpy as np
import pytest

from stream_lstm.checkpointing.manager import StateManager
from stream_lstm.config import Settings
from stream_lstm.metrics import Metrics

pytestmark = pytest.mark.kafka


def test_marked_and_never_written_devices_go_with_the_next_commit(tmp_path):
    """A hot swap marks every device not yet in the changelog, and each re-warmed one (mark):
    the next commit writes them, whatever their partition's checkpoint schedule, and without
    a replay marker (no broker: records_for_commit and committed are the two halves)."""
    from stream_lstm.state.table import DeviceTable

    s = Settings(state_dir=tmp_path)
    manager = StateManager(s, tmp_path / "state.sqlite")
    table = DeviceTable(8, 4, 1, 1, 4)
    slots = table.slots_for(["new", "idle-new"], [0, 1], now=0.0, load=manager.load)
    assert manager.unwritten == {"new", "idle-new"}  # no state anywhere
    manager.touch(table, slots[:1])  # only "new" has a reading since
    manager.mark_unwritten()  # a swap: a flag, nothing a device
    assert manager.waiting() == 2  # at most ("idle-new" has nothing new to write)
    old = table.slots_for(["old"], [1], now=0.0)  # in memory, as if restored
    manager.mark(table, old)  # re-warmed
    assert manager.marked == {"old"} and manager.waiting() == 3 and not manager.flush_due()
    records = manager.records_for_commit(table, {0: 7, 1: 9})
    assert sorted(r[1] for r in records) == [b"new", b"old"]  # no marker among them
    manager.committed({})
    assert not manager.marked and not manager.dirty and manager.unwritten == {"idle-new"}
    assert manager.waiting() == 0
    manager.store.close(clean=True)


def test_stored_state_that_cannot_be_used_starts_the_device_afresh_counted_and_logged(
        tmp_path, caplog):
    """Restore checks only a snapshot's header and lengths: a value corrupt past them, or of
    another number of channels, must not crash the worker when its device's next reading
    arrives (a crash loop: the same record restored again after every restart)."""
    import numpy as np

    from stream_lstm.checkpointing.codec import (
        SnapshotDecodeError,
        check_snapshot,
        decode_snapshot,
        encode_snapshot,
    )
    from stream_lstm.state.table import DeviceTable

    def corrupt_past_the_header(data: bytes) -> bytes:
        # The first single flipped byte that the cheap check lets through and decode refuses
        # (in the column directory).
        for i in range(len(data)):
            bad = bytearray(data)
            bad[i] ^= 0xFF
            if check_snapshot(bad) is None:
                try:
                    decode_snapshot(bad)
                except SnapshotDecodeError:
                    return bytes(bad)
        raise AssertionError("no such byte")

    metrics = Metrics()
    manager = StateManager(Settings(state_dir=tmp_path), tmp_path / "state.sqlite", metrics)
    two = DeviceTable(4, 4, 2, 1, 4)  # a snapshot of two channels; the settings say one
    two.slots_for(["two-channels"], [0], now=0.0)
    good = DeviceTable(4, 4, 1, 1, 4)
    good.slots_for(["flipped", "fine"], [0, 0], now=0.0)
    flipped = corrupt_past_the_header(encode_snapshot(good.snapshot(good.index["flipped"])))
    good.slots_for(["nan-h"], [0], now=0.0)
    poisoned = good.snapshot(good.index["nan-h"])
    poisoned.h[:] = np.nan  # (forged: the device's forecasts were null for good after it)
    rows = [("two-channels", 0, encode_snapshot(two.snapshot(0))), ("flipped", 0, bytes(flipped)),
            ("fine", 0, encode_snapshot(good.snapshot(good.index["fine"]))),
            ("nan-h", 0, encode_snapshot(poisoned))]
    assert all(check_snapshot(value) is None for _, _, value in rows)  # restore stores them
    manager.store.put_many(rows)
    table = DeviceTable(8, 4, 1, 1, 4)
    with caplog.at_level("WARNING", logger="stream_lstm.checkpointing"):
        slots = table.slots_for(["two-channels", "flipped", "fine", "nan-h"], [0, 0, 0, 0], now=1.0,
                                load=manager.load)
    assert len(slots) == 4 and np.isfinite(table.last_seen[slots]).all()
    assert manager.unwritten == {"two-channels", "flipped", "nan-h"}  # afresh; "fine" came back
    assert metrics.unreadable_snapshots._value.get() == 3
    assert np.isfinite(table.h[:, slots[3]].cpu().numpy()).all()
    # Logged once a minute with how many were held back (a settings review: a changed
    # N_FEATURES logged a line a device, 100k lines for a fleet); counted every time.
    (said,) = [r for r in caplog.records if "cannot be used" in r.getMessage()]
    assert said.device == "two-channels" and said.held_back == 0
    manager.store.close(clean=True)


def test_a_clean_stop_stamps_the_partitions_still_restoring_as_well_as_the_ready_ones(tmp_path):
    """assign() removed their earlier stamp: left unstamped, a restoring partition's rows would
    be trusted however long the worker stayed away (no broker needed)."""
    import time

    from stream_lstm.state.table import DeviceTable

    s = Settings(state_dir=tmp_path)
    manager = StateManager(s, tmp_path / "state.sqlite")
    manager.ready, manager.restoring = {0}, {1}
    manager.close(DeviceTable(8, 4, 1, 1, 4), clean=True)
    again = StateManager(s, tmp_path / "state.sqlite")
    # A day later, both are older than the half-day a store row may wait: both restore afresh.
    assert again.store.forget_stale([0, 1, 2], now=time.time() + 86_400, max_age_s=43_200) == [0, 1]
    again.store.close(clean=True)


def test_no_replay_marker_names_a_partition_still_replaying(tmp_path):
    """A commit mid-replay (its checkpoint interval due, a revocation, a clean stop) writes the
    devices replayed so far, but no marker for their partition: the readings before the
    position it would name are not all in memory yet, and a restore from it would skip them."""
    from stream_lstm.checkpointing.replay import REPLAY_MARKER
    from stream_lstm.state.table import DeviceTable

    state = StateManager(Settings(state_dir=tmp_path), tmp_path / "state.sqlite")
    table = DeviceTable(4, 4, 1, 1, 2)
    try:
        state.ready, state.replaying = {0}, {0}
        state.touch(table, table.slots_for(["a"], [0], now=0.0))
        records = state.records_for_commit(table, next_offsets={0: 1000}, flush={0})
        assert [key for _, key, _, _, _ in records] == [b"a"]
        state.committed({})
        assert state.markers == {}
        state.replaying = set()  # the replay is done: the next commit names its position
        state.touch(table, table.slots_for(["a"], [0], now=1.0))
        records = state.records_for_commit(table, next_offsets={0: 1000}, flush={0})
        assert [key for _, key, _, _, _ in records] == [b"a", REPLAY_MARKER]
    finally:
        state.store.close(clean=False)


def test_a_device_that_moves_partitions_goes_with_the_next_commit_beside_a_tombstone_for_its_old_row(tmp_path):
    """Partitions were added to the input and a device's readings moved from 0 to 1 while some
    of partition 0's were not yet checkpointed. Partition 0's next marker vouches for them, so
    the device is written with the next commit, not on partition 1's later schedule (a crash
    in between would restore partition 0 past readings that no checkpoint holds); and its old
    row gets a tombstone (once the TTL had tombstoned its new row, a restore from the
    changelog brought the old one back)."""
    from stream_lstm.state.table import DeviceTable

    state = StateManager(Settings(state_dir=tmp_path), tmp_path / "state.sqlite")
    table = DeviceTable(4, 4, 1, 1, 2)
    try:
        state.ready = {0, 1}
        slots = table.slots_for(["moved", "stays"], [0, 0], now=0.0)
        state.touch(table, slots)
        assert state.records_for_commit(table, next_offsets={0: 5, 1: 5}) == []  # none due
        state.committed({})
        table.partition[slots[0]] = 1  # as ingest files it, its next reading having come on 1
        state.touch(table, slots[:1], moved=[("moved", 0)])
        records = state.records_for_commit(table, next_offsets={0: 5, 1: 5})
        assert [(key, value is None, p) for _, key, value, _, p in records] == [
            (b"moved", False, 1), (b"moved", True, 0)]  # its new row, its old one's tombstone
        state.committed({})
        assert state.moved == set() and state.records_for_commit(table, next_offsets={0: 5, 1: 5}) == []
    finally:
        state.store.close(clean=False)


def test_a_device_back_on_the_partition_it_left_within_a_commit_keeps_its_row(tmp_path):
    """Readings of one device came on partitions 0, 1, then 0 again within one transaction
    (two producers with different partitioners): its snapshot went to partition 0 and then a
    tombstone for its "old" row on partition 0 deleted it; a crash later lost its state."""
    from stream_lstm.state.table import DeviceTable

    state = StateManager(Settings(state_dir=tmp_path), tmp_path / "state.sqlite")
    table = DeviceTable(4, 4, 1, 1, 2)
    try:
        state.ready = {0, 1}
        (slot,) = table.slots_for(["x"], [0], now=0.0)
        state.touch(table, np.array([slot]))
        state.committed({})
        state.touch(table, np.array([slot]), moved=[("x", 0), ("x", 1)])  # 0 -> 1 -> 0, as ingest files it
        records = state.records_for_commit(table, next_offsets={0: 5, 1: 5})
        assert [(key, value is None, p) for _, key, value, _, p in records] == [
            (b"x", False, 0), (b"x", True, 1)]  # its row on 0, and only 1's tombstone
        state.committed({})
        assert state.moved == set()
    finally:
        state.store.close(clean=False)


def test_a_state_dir_that_cannot_be_made_is_one_line(tmp_path):
    # The manager made the directory itself before the store could say so: a traceback.
    from stream_lstm.config import SettingsError

    (tmp_path / "a-file").write_text("")
    with pytest.raises(SettingsError, match="STREAM_LSTM_STATE_DIR: cannot write the state store there"):
        StateManager(Settings(), tmp_path / "a-file" / "state" / "s.sqlite")
