"""Training data from device state (training/data.py): every long-enough window of the table,
oldest first and in a stable order of their ids; a holdout of whole devices that a fleet's
growth leaves in place; and the windows of one long series, the last always ending at its newest reading."""

import numpy as np
import pytest

from stream_lstm.state.ingest import ingest
from stream_lstm.state.table import DeviceTable
from stream_lstm.training.data import (
    device_order,
    series_windows,
    split_holdout,
    windows_from_table,
)


def fleet_table(readings: dict[str, int], window: int = 5) -> DeviceTable:
    """A table whose devices have seen ``readings[dev]`` readings each (values 0, 1, 2, ...)."""
    table = DeviceTable(max_devices=8, window=window, n_features=1, num_layers=1, hidden_size=2)
    for k in range(max(readings.values())):
        devs = [d for d, n in readings.items() if k < n]
        ingest(table, devs, [1_700_000_000.0 + 60 * k] * len(devs),
               np.full((len(devs), 1), float(k)), [0] * len(devs), now=0.0, target=0)
    return table


def test_windows_from_table_are_the_long_enough_ones_oldest_first_in_device_order():
    # Arrival order z, a, m; m has too few readings.
    table = fleet_table({"z": 7, "a": 3, "m": 2})
    windows = windows_from_table(table, min_length=3)
    order = [d for d in device_order(["z", "a", "m"]) if d != "m"]
    assert [len(w) for w in windows] == [{"a": 3, "z": 5}[d] for d in order]  # z's window holds 5
    assert all(w.shape[1] == 1 and w.dtype == np.float32 for w in windows)
    for d, w in zip(order, windows, strict=True):  # oldest first
        np.testing.assert_array_equal(w, table.window.ordered(table.index[d]))
    assert windows_from_table(table, min_length=6) == []  # no window is longer than W


def test_the_same_fleet_gives_the_same_windows_whatever_order_it_arrived_in():
    a = windows_from_table(fleet_table({"x": 4, "y": 5, "w": 4}), 1)
    b = windows_from_table(fleet_table({"w": 4, "y": 5, "x": 4}), 1)
    assert len(a) == len(b) == 3
    for wa, wb in zip(a, b, strict=True):
        np.testing.assert_array_equal(wa, wb)


def seqs(n: int) -> list[np.ndarray]:
    return [np.full((3, 1), float(i)) for i in range(n)]


def ids(part: list[np.ndarray]) -> list[int]:
    return [int(s[0, 0]) for s in part]


def test_the_holdout_is_the_first_fraction_of_whole_sequences():
    train, hold = split_holdout(seqs(10), fraction=0.2)
    assert ids(hold) == [0, 1] and ids(train) == list(range(2, 10))  # disjoint, nothing lost, in order


def test_a_device_joining_moves_at_most_one_other_across_the_holdout_line():
    # The gate must not score on devices the champion was trained on in the retrain before: a
    # fresh draw each time held out 57-100% such devices after one device joined.
    rng = np.random.default_rng(0)
    fleet = [f"dev-{k}" for k in range(200)]
    for new in (f"new-{k}" for k in range(20)):
        before = set(split_holdout(device_order(fleet))[1])
        fleet.insert(int(rng.integers(len(fleet) + 1)), new)  # arrival order does not matter
        after = set(split_holdout(device_order(fleet))[1])
        assert len(after - before - {new}) <= 1 and len(before - after) <= 1
    assert device_order(fleet) == device_order(sorted(fleet)) != sorted(fleet)


def test_the_holdout_holds_at_least_one_and_a_single_sequence_serves_both():
    train, hold = split_holdout(seqs(3), fraction=0.01)
    assert len(hold) == 1 and len(train) == 2
    only = seqs(1)
    assert split_holdout(only) == (only, only)
    assert split_holdout([]) == ([], [])


def test_series_windows_cover_the_series_and_end_at_its_newest_reading():
    z = np.arange(10.0)[:, None]
    windows = series_windows(z, 4, 3)
    assert [w[0, 0] for w in windows] == [0.0, 3.0, 6.0]  # 6..9 ends at the last reading: no extra
    assert all(len(w) == 4 for w in windows)
    assert [w[0, 0] for w in series_windows(z, 4, 4)] == [0.0, 4.0, 6.0]  # the last one added
    assert np.shares_memory(windows[0], z)  # views, not copies of a long series


def test_a_series_no_longer_than_a_window_is_one_window_and_one_reading_none():
    z = np.arange(5.0)[:, None]
    (whole,) = series_windows(z, 5, 2)
    np.testing.assert_array_equal(whole, z)
    assert len(series_windows(z, 9, 2)[0]) == 5
    assert series_windows(z[:1], 4, 2) == [] and series_windows(z[:0], 4, 2) == []


@pytest.mark.parametrize("length, stride, message", [
    (4, 0, "stride is 0"), (4, -1, "stride is -1"),
    (0, 2, "length is 0"), (1, 2, "length is 1"), (-3, 2, "length is -3")])
def test_a_bad_length_or_stride_is_a_clear_error(length, stride, message):
    for z in (np.arange(10.0)[:, None], np.arange(1.0)[:, None]):  # whatever the series' length
        with pytest.raises(ValueError, match=message):
            series_windows(z, length, stride)


def test_a_window_begins_at_the_devices_last_gap_reset():
    # Serving started from zero state after the gap: a training sequence across it would teach
    # the model a continuity serving never had.
    table = DeviceTable(max_devices=4, window=8, n_features=1, num_layers=1, hidden_size=2)
    for k, t in enumerate([0.0, 60.0, 120.0, 180.0, 99_000.0, 99_060.0, 99_120.0]):
        ingest(table, ["gap", "calm"], [t, 60.0 * k], np.full((2, 1), float(k)), [0, 0], now=0.0,
               target=0, max_gap_s=3600.0)
    windows = dict(zip(device_order(["gap", "calm"]), windows_from_table(table, min_length=2), strict=True))
    np.testing.assert_array_equal(windows["gap"], table.window.ordered(table.index["gap"])[-3:])
    np.testing.assert_array_equal(windows["calm"], table.window.ordered(table.index["calm"]))
    assert len(windows["calm"]) == 7
    (only,) = windows_from_table(table, min_length=4)  # gap's 3 since its reset are too few
    np.testing.assert_array_equal(only, windows["calm"])
