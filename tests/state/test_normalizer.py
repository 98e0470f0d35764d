import numpy as np
import pytest

from stream_lstm.state.normalizer import OnlineNormalizer, normalize_sequence


def test_welford_matches_population_stats_of_every_prefix():
    rng = np.random.default_rng(0)
    x = rng.normal(50.0, 7.0, size=(200, 2))
    z, mean, scale = normalize_sequence(x)
    for t in [1, 2, 10, 199]:
        np.testing.assert_allclose(mean[t], x[: t + 1].mean(axis=0), rtol=1e-12)
        np.testing.assert_allclose(scale[t], np.maximum(x[: t + 1].std(axis=0), 1e-3), rtol=1e-10)
        np.testing.assert_allclose(z[t], (x[t] - mean[t]) / scale[t], rtol=1e-6)


def test_ewm_hand_computed():
    # alpha=0.5: n=1 -> a=1: mean=2, var=0; n=2 -> a=0.5: delta=2, mean=3, var=0.5*(0+0.5*4)=1
    # n=3 -> a=0.5: delta=5, mean=5.5, var=0.5*(1+0.5*25)=6.75
    norm = OnlineNormalizer(1, 1, kind="ewm", alpha=0.5)
    for v in [2.0, 4.0, 8.0]:
        z, mean, scale = norm.update(np.array([0]), np.array([[v]]))
    assert mean[0, 0] == pytest.approx(5.5)
    assert norm.var[0, 0] == pytest.approx(6.75)
    assert z[0, 0] == pytest.approx((8.0 - 5.5) / np.sqrt(6.75), rel=1e-6)


def test_ewm_follows_drift_faster_than_welford():
    x = np.concatenate([np.zeros(500), np.full(100, 10.0)])[:, None]
    _, mean_w, _ = normalize_sequence(x, "welford")
    _, mean_e, _ = normalize_sequence(x, "ewm", alpha=0.05)
    assert mean_e[-1, 0] > 9.0 > mean_w[-1, 0]


def test_vectorised_update_equals_one_device_at_a_time():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(30, 3, 1))
    norm = OnlineNormalizer(3, 1)
    zs = np.stack([norm.update(np.arange(3), x[t])[0] for t in range(30)])
    for d in range(3):
        z_d, _, _ = normalize_sequence(x[:, d])
        np.testing.assert_array_equal(zs[:, d], z_d)


def test_flat_channel_uses_std_floor():
    z, _, scale = normalize_sequence(np.full((5, 1), 3.0), std_floor=0.5)
    assert (scale == 0.5).all() and (z == 0).all()
