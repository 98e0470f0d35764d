"""DeviceSnapshot (state/snapshot.py): the state of a device never seen, with the shapes and
dtypes the table, the codec and the store expect; the declared columns as attributes, kept in
``columns`` in their dtypes; and no state shared between snapshots."""

import math

import numpy as np
import pytest

from stream_lstm.state.columns import COLUMNS, HORIZON
from stream_lstm.state.snapshot import DeviceSnapshot


def test_an_empty_snapshot_is_a_device_never_seen():
    s = DeviceSnapshot.empty("pump-1", num_layers=2, hidden_size=4, n_features=3, partition=5)
    assert (s.device_id, s.partition) == ("pump-1", 5)
    for hc in (s.h, s.c):
        assert hc.shape == (2, 4) and hc.dtype == np.float32 and not hc.any()
    assert s.count == 0.0
    for stat in (s.mean, s.var):
        assert stat.shape == (3,) and stat.dtype == np.float64 and not stat.any()
    assert s.window.shape == (0, 3) and s.window.dtype == np.float32
    assert math.isnan(s.last_ts) and math.isnan(s.step_s)
    assert math.isnan(s.prev_mu) and math.isnan(s.prev_sigma)
    assert (s.n_seen, s.since_reset, s.model_version, s.last_seen) == (0, 0, "", 0.0)
    assert list(s.columns) == ["partition"]  # every other column is at its fill
    for ring, dtype in ((s.drift_mu, np.float64), (s.drift_b, np.float32), (s.drift_change, np.float32)):
        assert ring.shape == (0,) and ring.dtype == dtype
    assert s.experts.shape == (0,) and s.experts.dtype == np.float64
    assert DeviceSnapshot.empty("d", num_layers=1, hidden_size=2, n_features=1).partition == 0


def test_every_declared_column_is_an_attribute_that_reads_its_fill_until_set():
    s = DeviceSnapshot.empty("d", num_layers=1, hidden_size=2, n_features=1)
    for col in COLUMNS:
        value = getattr(s, col.name)
        if col.width == 0:
            assert type(value) in (int, float), col.name  # plain Python values
            assert value == col.fill or (math.isnan(value) and math.isnan(col.fill)), col.name
        else:
            assert value.dtype == col.dtype, col.name
            assert value.shape == ((0,) if col.width == HORIZON else (col.width,)), col.name
    assert s.alert.tolist() != s.alert.tolist()  # NaN: no open alert
    s.n_seen, s.blend_w, s.drift_b = 17, [0.5, 1.0], [1.0, 2.0, 3.0]
    assert type(s.columns["n_seen"]) is np.int64 and s.n_seen == 17
    assert s.columns["blend_w"].dtype == np.float64 and s.blend_w.tolist() == [0.5, 1.0]
    assert s.columns["drift_b"].dtype == np.float32  # the column's dtype, not the value's
    with pytest.raises(AttributeError):
        s.not_a_column  # noqa: B018


def test_snapshots_share_no_state():
    a = DeviceSnapshot.empty("a", num_layers=1, hidden_size=2, n_features=1)
    b = DeviceSnapshot.empty("b", num_layers=1, hidden_size=2, n_features=1)
    a.blend_w = [0.5, 1.0]
    a.h[0, 0] = 1.0
    a.mean[0] = 3.0
    assert "blend_w" not in b.columns and not b.h.any() and not b.mean.any()
    assert a.columns is not b.columns and a.experts is not b.experts
    b.blend_w[0] = 9.0  # an absent column reads as a fresh fill: writing into it changes nothing
    assert b.blend_w.tolist() == [1.0, 1.0] and "blend_w" not in b.columns
