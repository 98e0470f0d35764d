"""The optional deep-river peer: predict-then-learn one-step forecasts from an online LSTM."""

import sys

import numpy as np
import pytest

from stream_lstm.tools import peer
from stream_lstm.tools.peer import peer_available, peer_one_step

AWS = "nab/aws/ec2_cpu_utilization_5f5533.csv"


@pytest.fixture
def deep_river():
    return pytest.importorskip("deep_river")


def sine(n: int, period: int = 48) -> np.ndarray:
    return 50.0 + 10.0 * np.sin(2 * np.pi * np.arange(n) / period)


def test_missing_deep_river_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "deep_river", None)
    monkeypatch.setitem(sys.modules, "deep_river.forecasting", None)
    assert not peer_available()
    with pytest.raises(ImportError, match=r"pip install -e '\.\[peer\]'"):
        peer_one_step(np.zeros(5))


def test_learns_a_smooth_sine_well_beyond_the_mean(deep_river):
    x = sine(600)
    f = peer_one_step(x)  # the peer's configuration: window 32, hidden 64, Adam 1e-3
    assert f.shape == x.shape
    assert np.isnan(f[0]) and np.isfinite(f[1:]).all()
    late = slice(200, None)                        # after warm-up
    peer_mae = np.abs(f[late] - x[late]).mean()
    mean_mae = np.abs(x[late] - x.mean()).mean()   # constant forecast at the series mean
    assert peer_mae < 0.5 * mean_mae, (peer_mae, mean_mae)   # measured: 0.34 of it


def test_forecast_is_made_before_learning_the_reading(deep_river):
    # A single jump: the forecast of the jump cannot know it, the next one has learnt from it.
    x = np.r_[np.full(60, 10.0), 1000.0, np.full(5, 10.0)]
    f = peer_one_step(x, window=4, hidden=4)
    assert abs(f[60] - 10.0) < 1.0                 # forecast of x[60] made from x[:60] only
    assert np.isfinite(f[61]) and f[61] != f[60]


def test_real_aws_recording_gives_finite_forecasts_in_range(deep_river, shared_data):
    x = np.loadtxt(shared_data / AWS, delimiter=",", skiprows=1, usecols=1)[:600]
    calls = []
    f = peer_one_step(x, progress=calls.append)
    assert f.shape == (600,)
    assert np.isnan(f[0]) and np.isfinite(f[1:]).all()
    span = x.max() - x.min()
    assert (f[1:] > x.min() - span).all() and (f[1:] < x.max() + span).all()
    assert calls == list(range(1, 601))


def test_same_seed_same_forecasts_and_torch_state_left_alone(deep_river):
    import torch

    x = sine(150)
    threads = torch.get_num_threads()
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    a = peer_one_step(x, window=8, hidden=8, seed=3)
    assert torch.equal(torch.rand(3), expected_draw)     # global RNG untouched
    assert torch.get_num_threads() == threads
    b = peer_one_step(x, window=8, hidden=8, seed=3)
    c = peer_one_step(x, window=8, hidden=8, seed=4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a[1:], c[1:])


def test_non_finite_readings_are_forecast_but_not_learnt(deep_river):
    x = sine(80)
    x[[0, 40]] = np.nan
    f = peer_one_step(x, window=8, hidden=8)
    assert np.isnan(f[:2]).all()                   # nothing seen before x[1]
    assert np.isfinite(f[2:]).all()                # x[40] still gets a forecast


def test_rejects_a_2d_series():
    with pytest.raises(ValueError, match="1-D"):
        peer_one_step(np.zeros((3, 2)))


def test_install_hint_names_the_extra():
    assert "pip install -e '.[peer]'" in peer.INSTALL_HINT  # (not on PyPI: from the repository)
