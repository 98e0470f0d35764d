"""Evaluation metrics and baselines against hand-computed values."""

import math
from datetime import UTC, datetime

import numpy as np
import pytest

from stream_lstm.tools.scoring import (
    coverage,
    ewm_forecast,
    mae,
    mase,
    mse,
    nab_windows,
    persistence,
    rmse,
    seasonal_naive,
    top_k_in_windows,
)

NAN = math.nan


def utc(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def test_mae_mse_rmse_by_hand():
    y, yhat = [1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 1.0, 8.0]       # errors 0, 1, 2, 4
    assert mae(y, yhat) == pytest.approx(7 / 4)
    assert mse(y, yhat) == pytest.approx(21 / 4)
    assert rmse(y, yhat) == pytest.approx(math.sqrt(21 / 4))


def test_nan_pairs_are_left_out_and_all_nan_gives_nan():
    assert mae([1.0, NAN, 3.0], [2.0, 5.0, NAN]) == pytest.approx(1.0)
    assert math.isnan(mae([NAN], [1.0]))
    assert math.isnan(rmse([], []))


def test_misaligned_arrays_are_an_error():
    with pytest.raises(ValueError, match="not aligned"):
        mae([1.0, 2.0], [1.0])


def test_mase_by_hand_and_persistence_scores_one():
    y = [10.0, 12.0, 11.0, 15.0]
    naive = persistence(y, 1)                                    # nan, 10, 12, 11
    model = [NAN, 11.0, 11.5, 14.0]                              # errors 1, 0.5, 1
    assert mase(y, model, naive) == pytest.approx((2.5 / 3) / (7 / 3))
    rng = np.random.default_rng(0)
    x = np.cumsum(rng.normal(size=500))
    for k in (1, 5):
        assert mase(x, persistence(x, k), persistence(x, k)) == pytest.approx(1.0)
    assert mase(x, x, persistence(x, 1)) == 0.0


def test_mase_uses_the_same_pairs_for_model_and_persistence():
    y = [1.0, 2.0, 3.0, 4.0]
    naive = [NAN, 1.0, 2.0, 3.0]                 # error 1 where defined
    model = [0.0, 2.0, NAN, 4.0]                 # error 1, 0, -, 0
    # Pairs 1 and 3 only: model 0/2, naive 2/2.
    assert mase(y, model, naive) == 0.0


def test_mase_when_persistence_is_perfect():
    y = [2.0, 2.0, 2.0]
    assert mase(y, [2.0, 2.5, 2.0], [2.0, 2.0, 2.0]) == math.inf
    assert math.isnan(mase(y, y, y))


def test_coverage_counts_bounds_as_inside():
    y = [1.0, 2.0, 3.0, 4.0, 5.0]
    lower = [1.0, 0.0, 3.5, 4.0, 0.0]
    upper = [2.0, 1.9, 4.0, 4.0, 9.0]
    assert coverage(y, lower, upper) == pytest.approx(3 / 5)


def test_persistence_by_hand():
    x = [1.0, 2.0, 3.0, 4.0]
    np.testing.assert_array_equal(persistence(x, 1), [NAN, 1.0, 2.0, 3.0])
    np.testing.assert_array_equal(persistence(x, 3), [NAN, NAN, NAN, 1.0])
    assert np.isnan(persistence(x, 10)).all()
    with pytest.raises(ValueError):
        persistence(x, 0)


def test_seasonal_naive_by_hand():
    x = np.arange(10.0)
    np.testing.assert_array_equal(seasonal_naive(x, 1, 4), [NAN] * 4 + [0, 1, 2, 3, 4, 5])
    np.testing.assert_array_equal(seasonal_naive(x, 4, 4), [NAN] * 4 + [0, 1, 2, 3, 4, 5])
    # k = 5 > period: the last same-phase value known 5 steps earlier is two seasons back.
    np.testing.assert_array_equal(seasonal_naive(x, 5, 4), [NAN] * 8 + [0, 1])


def test_seasonal_naive_is_exact_on_a_periodic_series():
    period = 24
    x = np.tile(np.sin(2 * np.pi * np.arange(period) / period), 10)
    assert mae(x, seasonal_naive(x, 6, period)) == pytest.approx(0.0)
    assert mae(x, persistence(x, 6)) > 0.5


def test_ewm_forecast_by_hand():
    # level: 4, 0.5*8+0.5*4=6, 0.5*0+0.5*6=3 ; k=1 shifts by one
    np.testing.assert_allclose(ewm_forecast([4.0, 8.0, 0.0, 1.0], 1, 0.5), [NAN, 4.0, 6.0, 3.0])
    np.testing.assert_allclose(ewm_forecast([4.0, 8.0, 0.0, 1.0], 2, 0.5), [NAN, NAN, 4.0, 6.0])
    # a NaN reading leaves the level alone
    np.testing.assert_allclose(ewm_forecast([4.0, NAN, 8.0], 1, 0.5), [NAN, 4.0, 4.0])
    x = np.arange(6.0)
    np.testing.assert_array_equal(ewm_forecast(x, 2, 1.0), persistence(x, 2))
    with pytest.raises(ValueError):
        ewm_forecast(x, 1, 0.0)


def test_top_k_in_windows():
    ts = np.arange(10.0)
    scores = np.array([0, 9, 0, 8, 0, 7, NAN, 0, 6, 0], float)
    windows = [(1.0, 3.0), (8.0, 8.0)]
    assert top_k_in_windows(ts, scores, windows, k=2) == 2          # ts 1 and 3
    assert top_k_in_windows(ts, scores, windows, k=3) == 2          # ts 5 is outside
    assert top_k_in_windows(ts, scores, windows, k=4) == 3          # ts 8 on the bound
    assert top_k_in_windows(ts, scores, [], k=4) == 0


def test_nab_windows_of_the_machine_temperature_file(shared_data):
    path = shared_data / "nab" / "combined_windows.json"
    full = nab_windows(path, "realKnownCause/machine_temperature_system_failure.csv")
    assert len(full) == 4
    assert full[0] == (utc("2013-12-10 06:25:00"), utc("2013-12-12 05:35:00"))
    assert nab_windows(path, "machine_temperature_system_failure.csv") == full
    with pytest.raises(KeyError, match="no such file"):
        nab_windows(path, "no_such.csv")
