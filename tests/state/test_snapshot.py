"""DeviceSnapshot (state/snapshot.py): the state of a device never seen, with the shapes and
dtypes the table, the codec and the store expect, and no state shared between snapshots."""

import math

import numpy as np

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
    assert (s.n_seen, s.since_reset, s.model_version, s.last_seen, s.extra) == (0, 0, "", 0.0, {})
    for ring in (s.drift_mu, s.drift_b, s.drift_change):
        assert ring.shape == (0,) and ring.dtype == np.float32
    assert s.experts.shape == (0,) and s.experts.dtype == np.float64
    assert DeviceSnapshot.empty("d", num_layers=1, hidden_size=2, n_features=1).partition == 0


def test_snapshots_share_no_state():
    a = DeviceSnapshot.empty("a", num_layers=1, hidden_size=2, n_features=1)
    b = DeviceSnapshot.empty("b", num_layers=1, hidden_size=2, n_features=1)
    a.extra["blend_w1"] = 0.5
    a.h[0, 0] = 1.0
    a.mean[0] = 3.0
    assert b.extra == {} and not b.h.any() and not b.mean.any()
    assert a.drift_mu is not b.drift_mu and a.experts is not b.experts
