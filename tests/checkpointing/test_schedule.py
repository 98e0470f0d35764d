"""When partitions are checkpointed (checkpointing/schedule.py): in turn, once an interval each."""

import time

import numpy as np
import pytest

from stream_lstm.checkpointing.manager import StateManager
from stream_lstm.checkpointing.schedule import next_checkpoint
from stream_lstm.config import Settings
from stream_lstm.state.table import DeviceTable


@pytest.mark.parametrize("partitions", [2, 4, 12, 48])
def test_partitions_changed_together_come_due_spread_over_the_interval_then_once_an_interval_each(partitions):
    interval, now = 30.0, 1234.5
    due = np.array([next_checkpoint(p, now, interval) for p in range(partitions)])
    assert ((due >= now + interval / 2) & (due < now + 1.5 * interval)).all()
    gaps = np.diff(np.sort(due))
    assert gaps.min() > interval / (3 * partitions)  # none bunched: a P-th of the devices each
    for p, at in enumerate(due):  # checkpointed when due, changed right after: one interval on
        assert next_checkpoint(p, at + 0.01, interval) == pytest.approx(at + interval)
        assert next_checkpoint(p, at + 0.4 * interval, interval) == pytest.approx(at + interval)
    assert next_checkpoint(5, now, 0.0) == now  # 0: every commit


def test_a_worker_whose_first_batch_changed_every_partition_checkpoints_them_in_turn(tmp_path):
    s = Settings(state_dir=tmp_path, checkpoint_interval_s=30.0)
    state = StateManager(s, tmp_path / "state.sqlite")
    table = DeviceTable(max_devices=64, window=4, n_features=1, num_layers=1, hidden_size=2)
    devices = [f"d{i}" for i in range(40)]
    before = time.monotonic()
    state.touch(table, table.slots_for(devices, [i % 4 for i in range(40)], now=0.0))
    due = sorted(state.next_flush.values())
    assert len(due) == 4 and due[0] >= before + 15.0 and np.diff(due).min() > 2.5
    # The first to come due writes its own partition's devices alone, with its marker.
    first = min(state.next_flush, key=state.next_flush.get)
    records = state.records_for_commit(table, next_offsets={p: 10 for p in range(4)}, flush={first})
    written = {key for _, key, value, _, p in records if value is not None and not key.startswith(b"\x00")}
    assert written == {f"d{i}".encode() for i in range(first, 40, 4)}
    state.committed({})
    assert set(state.next_flush) == {0, 1, 2, 3} - {first} and state.markers == {first: 10}
    state.store.close(clean=True)
