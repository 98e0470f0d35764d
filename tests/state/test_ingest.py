import numpy as np

from stream_lstm.state.ingest import ACCEPTED, DUPLICATE, LATE, ingest
from stream_lstm.state.normalizer import normalize_sequence
from stream_lstm.state.table import DeviceTable


def table():
    return DeviceTable(max_devices=16, window=8, n_features=1, num_layers=1, hidden_size=2)


def test_rounds_preserve_per_device_order_and_normalization():
    t = table()
    ids = ["a", "b", "a", "c", "a", "b"]
    ts = [1.0, 1.0, 2.0, 1.0, 3.0, 2.0]
    x = np.array([[1.0], [10.0], [2.0], [5.0], [4.0], [20.0]])
    b = ingest(t, ids, ts, x, [0] * 6, now=0.0, target=0)
    assert b.rounds == [(0, 3), (3, 5), (5, 6)]
    assert [ids[r] for r in b.rows] == ["a", "b", "c", "a", "b", "a"]
    a_rows = [j for j, r in enumerate(b.rows) if ids[r] == "a"]
    z_ref, _, _ = normalize_sequence(np.array([[1.0], [2.0], [4.0]]))
    np.testing.assert_array_equal(b.z[a_rows], z_ref)
    assert t.window.ordered(t.index["a"])[:, 0].tolist() == z_ref[:, 0].tolist()


def test_duplicate_and_late_do_not_touch_state():
    t = table()
    ingest(t, ["a", "a"], [10.0, 20.0], np.array([[1.0], [2.0]]), [0, 0], now=0.0, target=0)
    before = (t.norm.mean.copy(), t.window.ordered(t.index["a"]))
    b = ingest(t, ["a", "a", "a"], [20.0, 15.0, 30.0], np.array([[9.0], [9.0], [3.0]]),
               [0] * 3, now=0.0, target=0)
    assert b.outcome.tolist() == [DUPLICATE, LATE, ACCEPTED]
    assert t.norm.count[t.index["a"]] == 3
    assert before[1].shape[0] == 2 and t.window.length[t.index["a"]] == 3
    assert t.last_ts[t.index["a"]] == 30.0


def test_gap_marks_reset_and_step_estimate():
    t = table()
    ingest(t, ["a"] * 3, [0.0, 60.0, 120.0], np.ones((3, 1)), [0] * 3, now=0.0, target=0)
    assert t.step_s[t.index["a"]] == 60.0
    b = ingest(t, ["a", "a"], [10_000.0, 10_060.0], np.ones((2, 1)), [0, 0], now=0.0, target=0,
               max_gap_s=3600.0)
    assert b.reset.tolist() == [True, False]
    assert b.since_reset.tolist() == [1, 2]


def test_a_device_belongs_to_the_partition_its_accepted_readings_come_on():
    # Partitions were added to the input and the device's readings moved from 0 to 1: its
    # state is checkpointed with partition 1's from then on. A late or duplicate reading on
    # the old partition (a replay of it) moves nothing.
    t = table()
    ingest(t, ["a", "b"], [10.0, 10.0], np.ones((2, 1)), [0, 0], now=0.0, target=0)
    moved = ingest(t, ["a"], [20.0], np.ones((1, 1)), [1], now=0.0, target=0).moved
    assert t.partition[t.index["a"]] == 1 and t.partition[t.index["b"]] == 0
    assert moved == [(t.index["a"], 0)]  # (its old partition's row gets a tombstone)
    b = ingest(t, ["a", "a"], [15.0, 20.0], np.ones((2, 1)), [0, 0], now=0.0, target=0)
    assert b.outcome.tolist() == [LATE, DUPLICATE] and t.partition[t.index["a"]] == 1 and b.moved == []
    assert t.devices_in_partitions({1}) == ["a"]
