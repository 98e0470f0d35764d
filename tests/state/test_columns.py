"""Per-device state columns (state/columns.py): what a new device starts with, which rows count
as untouched, what a snapshot without a column reads as, the schema id, and that the declared
columns fit the snapshot and the codec they are saved with."""

import dataclasses

import numpy as np
import pytest

from stream_lstm.state.columns import COLUMNS, HORIZON, SCHEMA_ID, Column, schema_id
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


def test_a_column_absent_from_a_snapshot_reads_as_its_fill():
    n = Column("n", dtype=np.int64, fill=3).absent()
    assert n.dtype == np.int64 and n.shape == () and n == 3  # a numpy scalar, in the column's dtype
    gain = Column("gain", width=2, dtype=np.float32, fill=0.5).absent()
    assert gain.dtype == np.float32 and gain.tolist() == [0.5, 0.5]
    assert Column("ring", width=HORIZON).absent().shape == (0,)  # no ring


def test_the_schema_id_follows_names_dtypes_and_widths_not_fills():
    base = (Column("a"), Column("b", width=2))
    assert schema_id(base) == schema_id((Column("a", fill=0.0), Column("b", width=2, sparse=True)))
    for changed in ((Column("a"),), (Column("a"), Column("b", width=3)),
                    (Column("a"), Column("b", width=2, dtype=np.float32)),
                    (Column("b", width=2), Column("a")), (*base, Column("c"))):
        assert schema_id(changed) != schema_id(base), changed
    assert SCHEMA_ID == schema_id(COLUMNS) and 0 < SCHEMA_ID < 2**32
    # Stable across runs and versions of Python (a CRC, not hash()).
    assert schema_id((Column("a"),)) == 0x46D81B41


def test_the_declared_columns_fit_the_snapshot_and_its_bytes():
    names = [c.name for c in COLUMNS]
    assert len(set(names)) == len(names)
    fields = {f.name for f in dataclasses.fields(DeviceSnapshot)}
    for col in COLUMNS:
        assert col.name not in fields, col.name  # the attribute would hide the field
        assert 0 < len(col.name.encode()) <= 255, col.name  # the codec's name length
        assert np.dtype(col.dtype).kind in "fiub", col.name  # what the codec can write
        assert col.width == HORIZON or 0 <= col.width <= 0xFFFF, col.name
