import math

import numpy as np
import pytest

from stream_lstm.state.normalizer import normalize_sequence
from stream_lstm.training.normalize import running_normalize


def test_welford_matches_numpy_on_every_prefix():
    rng = np.random.default_rng(1)
    x = rng.normal([100.0, -3.0], [5.0, 0.01], size=(60, 2))
    z, mean, std = running_normalize(x, std_floor=1e-3)
    for t in range(60):
        np.testing.assert_allclose(mean[t], x[: t + 1].mean(axis=0), rtol=1e-12)
        np.testing.assert_allclose(std[t], x[: t + 1].std(axis=0), rtol=1e-9, atol=1e-12)  # ddof=0
        expected = (x[t] - x[: t + 1].mean(axis=0)) / np.maximum(x[: t + 1].std(axis=0), 1e-3)
        np.testing.assert_allclose(z[t], expected, rtol=1e-5, atol=1e-6)
    assert z.dtype == np.float32 and mean.dtype == np.float64 and std.dtype == np.float64


def test_welford_hand_checked():
    z, mean, std = running_normalize(np.array([2.0, 4.0, 9.0]))
    assert mean[:, 0].tolist() == [2.0, 3.0, 5.0]
    # population variances: 0, 1, ((2-5)^2 + (4-5)^2 + (9-5)^2) / 3 = 26/3
    np.testing.assert_allclose(std[:, 0] ** 2, [0.0, 1.0, 26 / 3], rtol=1e-12)
    np.testing.assert_allclose(z[:, 0], [0.0, 1.0, 4 / math.sqrt(26 / 3)], rtol=1e-6)


def test_first_reading_is_scaled_by_the_floor_and_a_flat_channel_stays_finite():
    z, _, std = running_normalize(np.full((5, 1), 7.0), std_floor=0.5)
    assert std[0, 0] == 0.0 and np.all(z == 0.0)
    z, _, _ = running_normalize(np.array([[1.0], [1.0], [1.0 + 1e-9]]), std_floor=0.5)
    assert np.all(np.isfinite(z)) and abs(z[2, 0]) < 1e-8


def test_ewm_three_values_by_hand():
    # alpha = 0.5, a = max(alpha, 1/n):
    # n=1: a=1,   mean=0,                 var=0
    # n=2: a=0.5, delta=2, mean=1,        var=0.5*(0 + 0.5*4)   = 1
    # n=3: a=0.5, delta=3, mean=1+1.5=2.5 var=0.5*(1 + 0.5*9)   = 2.75  (Finch 2009)
    z, mean, std = running_normalize(np.array([0.0, 2.0, 4.0]), kind="ewm", alpha=0.5)
    assert mean[:, 0].tolist() == [0.0, 1.0, 2.5]
    assert (std[:, 0] ** 2).tolist() == pytest.approx([0.0, 1.0, 2.75], rel=1e-15)
    np.testing.assert_allclose(z[:, 0], [0.0, 1.0, 1.5 / math.sqrt(2.75)], rtol=1e-6)
    _, mean_w, _ = running_normalize(np.array([0.0, 2.0, 4.0]), kind="welford")
    assert mean_w[2, 0] == 2.0  # Welford weighs all three the same


def test_ewm_follows_a_level_shift_faster_than_welford():
    x = np.concatenate([np.zeros(500), np.full(100, 10.0)])[:, None]
    _, mean_w, _ = running_normalize(x, "welford")
    _, mean_e, _ = running_normalize(x, "ewm", alpha=0.05)
    assert mean_e[-1, 0] > 9.9 > mean_w[-1, 0]


@pytest.mark.parametrize("kind, alpha", [("welford", 0.01), ("ewm", 0.01), ("ewm", 0.3)])
def test_bit_for_bit_equal_to_the_serving_normalizer(kind, alpha):
    rng = np.random.default_rng(7)
    x = np.cumsum(rng.normal(0, 1, size=(300, 3)), axis=0) * 1e3 + 5e4
    z, mean, std = running_normalize(x, kind, alpha, std_floor=1e-3)
    z_s, mean_s, scale_s = normalize_sequence(x, kind, alpha, 1e-3)
    assert np.array_equal(z, z_s)
    assert np.array_equal(mean, mean_s)
    assert np.array_equal(np.maximum(std, 1e-3), scale_s)


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="kind"):
        running_normalize(np.zeros((3, 1)), kind="median")
    with pytest.raises(ValueError, match="alpha"):
        running_normalize(np.zeros((3, 1)), kind="ewm", alpha=0.0)
    with pytest.raises(ValueError, match=r"\[T, F\]"):
        running_normalize(np.zeros((3, 1, 1)))
