"""Per-device state columns (state/columns.py): what a new device starts with, which rows count
as untouched, how a row goes into a snapshot's extras and back, and that the declared columns
fit the snapshot they are saved in."""

import dataclasses

import numpy as np
import pytest

from stream_lstm.state.columns import COLUMNS, HORIZON, Column
from stream_lstm.state.snapshot import DeviceSnapshot


@pytest.mark.parametrize("width, shape", [(0, (4,)), (3, (4, 3)), (HORIZON, (4, 12))])
def test_rows_have_the_declared_width_dtype_and_fill(width, shape):
    rows = Column("c", width=width, dtype=np.float32, fill=2.5).rows(4, horizon=12)
    assert rows.shape == shape and rows.dtype == np.float32 and (rows == 2.5).all()
    assert Column("n", dtype=np.int64, fill=0).rows(2, horizon=12).tolist() == [0, 0]
    assert Column("h", width=HORIZON).rows(1, horizon=5).shape == (1, 5)  # follows the model's H


def test_is_fill_treats_nan_as_equal_to_a_nan_fill():
    nan_fill, zero_fill = Column("a", width=2), Column("b", width=2, fill=0.0)
    assert nan_fill.is_fill(np.array([np.nan, np.nan]))
    assert not nan_fill.is_fill(np.array([np.nan, 1.0]))
    assert zero_fill.is_fill(np.zeros(2)) and not zero_fill.is_fill(np.array([0.0, 1e-300]))
    assert not zero_fill.is_fill(np.array([np.nan, 0.0]))


def test_a_row_goes_to_its_extra_keys_and_back():
    col = Column("gain", width=2, fill=1.0, extra_keys=("gain_a", "gain_b"))
    extra = col.to_extra(np.array([0.25, 3.0]))
    assert extra == {"gain_a": 0.25, "gain_b": 3.0}
    assert all(type(v) is float for v in extra.values())  # plain floats for the codec
    assert col.from_extra(extra) == [0.25, 3.0]
    assert col.to_extra(np.ones(2)) == {"gain_a": 1.0, "gain_b": 1.0}  # not sparse: saved at its fill
    # A key absent from an older snapshot reads as the fill.
    assert col.from_extra({"gain_a": 0.5}) == [0.5, 1.0] and col.from_extra({}) == [1.0, 1.0]
    one = Column("prev_change", extra_keys=("prev_change",))
    assert one.to_extra(np.float64(-0.5)) == {"prev_change": -0.5}
    assert one.from_extra({"prev_change": -0.5}) == -0.5 and np.isnan(one.from_extra({}))


def test_a_sparse_column_is_saved_only_while_it_differs_from_its_fill():
    alert = Column("alert", width=2, extra_keys=("since", "peak"), sparse=True)
    assert alert.to_extra(np.array([np.nan, np.nan])) == {}
    assert alert.to_extra(np.array([100.0, np.nan]))["since"] == 100.0


def test_a_row_that_does_not_fit_its_keys_is_an_error():
    with pytest.raises(ValueError):
        Column("gain", width=2, extra_keys=("only_one",)).to_extra(np.array([1.0, 2.0]))


def test_the_declared_columns_fit_the_snapshot():
    names = [c.name for c in COLUMNS]
    assert len(set(names)) == len(names)
    keys = [k for c in COLUMNS for k in c.extra_keys]
    assert len(set(keys)) == len(keys), "two columns would overwrite each other's extras"
    fields = {f.name for f in dataclasses.fields(DeviceSnapshot)}
    for col in COLUMNS:
        if col.extra_keys:
            width = len(col.rows(1, horizon=4)[0]) if col.width else 1
            assert len(col.extra_keys) == width, col.name  # one key per element
            assert not set(col.extra_keys) & fields, col.name
        else:  # saved as the snapshot field of the same name
            assert col.name in fields, col.name
        assert not (col.sparse and not col.extra_keys), col.name  # only extras can be left out
