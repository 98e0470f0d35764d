"""The synthetic fleet: deterministic, seasonal, with gaps and anomalies at the asked frequency."""

import itertools

import numpy as np
import pytest

from stream_lstm.tools.fleet import Fleet

START = 1_700_000_000.0
DAY_STEPS_5MIN = 288


def lag_correlation(x: np.ndarray, lag: int) -> float:
    return float(np.corrcoef(x[lag:], x[:-lag])[0, 1])


def test_same_seed_same_readings_different_seed_different():
    a = Fleet(7, seed=42, start_ts=START, n_features=2).readings(500)
    b = Fleet(7, seed=42, start_ts=START, n_features=2).readings(500)
    c = Fleet(7, seed=43, start_ts=START, n_features=2).readings(500)
    assert a.device_ids == b.device_ids
    np.testing.assert_array_equal(a.ts, b.ts)
    np.testing.assert_array_equal(a.values, b.values)
    assert len(a) != len(c) or not np.array_equal(a.values, c.values)


def test_stream_and_readings_agree_across_block_boundaries():
    fleet = Fleet(3, seed=9, start_ts=START, gap_prob=0.01, spike_prob=0.01, shift_prob=0.005)
    n_steps = fleet.block_steps * 2 + 17           # crosses two block boundaries
    at_once = list(fleet.readings(n_steps))
    streamed = list(itertools.islice(Fleet(3, seed=9, start_ts=START, gap_prob=0.01, spike_prob=0.01,
                                           shift_prob=0.005).stream(), len(at_once)))
    assert streamed == at_once
    assert list(fleet.readings(n_steps)) == at_once  # asking again regenerates the same


def test_readings_are_time_ordered_and_each_device_strictly_increasing():
    fleet = Fleet(25, seed=1, step_s=60, start_ts=START, gap_prob=0.01)
    r = fleet.readings(400)
    assert np.all(np.diff(r.ts) > 0)
    for d in range(25):
        ts = r.ts[r.device_index == d]
        assert np.all(np.diff(ts) > 0)
        assert np.all(ts >= START) and np.all(ts < START + 400 * 60)
    assert r.ts[0] == START and r.device_ids[0] == "sim-0000"


def test_daily_seasonality_is_present():
    fleet = Fleet(20, seed=5, step_s=300, start_ts=START, spike_prob=0.0, shift_prob=0.0, gap_prob=0.0)
    r = fleet.readings(DAY_STEPS_5MIN * 4)
    per_device = r.values[:, 0].reshape(-1, 20)          # no gaps: a full [steps, devices] grid
    day = [lag_correlation(per_device[:, d], DAY_STEPS_5MIN) for d in range(20)]
    half_day = [lag_correlation(per_device[:, d], DAY_STEPS_5MIN // 2) for d in range(20)]
    assert np.median(day) > 0.8
    assert np.median(half_day) < -0.5     # a sine is anti-correlated half a period later
    # Devices differ: their own amplitude and phase.
    peaks = per_device[:DAY_STEPS_5MIN].argmax(axis=0)
    assert len(set(peaks.tolist())) > 10


def test_gaps_appear_at_the_requested_frequency_and_match_the_missing_readings():
    n_devices, n_steps, gap_prob = 50, 2000, 0.01
    fleet = Fleet(n_devices, seed=3, start_ts=START, gap_prob=gap_prob)
    r = fleet.readings(n_steps)
    gaps = fleet.gaps
    # One Bernoulli trial per step while a device reports: about gap_prob x reporting steps.
    expected = gap_prob * len(r)
    assert 0.8 * expected < len(gaps) < 1.2 * expected
    missing = n_devices * n_steps - len(r)
    assert missing == sum(min(g.n_missing, n_steps - g.step) for g in gaps)
    # No reading of a device falls inside one of its gaps.
    for g in gaps[:50]:
        d = fleet.device_ids.index(g.device_id)
        ts = r.ts[r.device_index == d]
        assert not np.any((ts >= g.start_ts) & (ts <= g.end_ts))


def test_spikes_appear_at_the_requested_frequency_and_are_where_recorded():
    common = dict(n_devices=30, seed=11, start_ts=START, gap_prob=0.002, shift_prob=0.0)
    spiky = Fleet(**common, spike_prob=0.005)
    clean = Fleet(**common, spike_prob=0.0)
    a, b = spiky.readings(2000), clean.readings(2000)
    spikes = spiky.anomalies
    assert all(s.kind == "spike" for s in spikes)
    expected = 0.005 * len(a)
    assert 0.75 * expected < len(spikes) < 1.25 * expected
    # Identical fleets but for the spikes: the difference is exactly the recorded spikes.
    np.testing.assert_array_equal(a.ts, b.ts)
    differs = np.flatnonzero(a.values[:, 0] != b.values[:, 0])
    assert sorted(a.ts[differs].tolist()) == [s.start_ts for s in spikes]
    for s in spikes[:20]:
        d = spiky.device_ids.index(s.device_id)
        assert abs(s.magnitude) >= 6 * spiky.noise[d] - 1e-9
        i = np.flatnonzero(a.ts == s.start_ts)[0]
        assert a.values[i, 0] - b.values[i, 0] == pytest.approx(s.magnitude)


def test_level_shifts_are_recorded_as_windows():
    fleet = Fleet(20, seed=2, start_ts=START, spike_prob=0.0, shift_prob=0.002)
    fleet.readings(3000)
    shifts = fleet.anomalies
    assert shifts and all(s.kind == "level_shift" for s in shifts)
    assert 0.5 * 0.002 * 20 * 3000 < len(shifts) < 1.5 * 0.002 * 20 * 3000
    for s in shifts:
        assert 29 * fleet.step_s <= s.end_ts - s.start_ts <= 300 * fleet.step_s
        assert abs(s.magnitude) > 0


def test_extra_channels_are_correlated_with_the_first():
    fleet = Fleet(6, seed=4, step_s=300, start_ts=START, n_features=3, gap_prob=0.0)
    r = fleet.readings(1000)
    assert r.values.shape == (6000, 3)
    for d in range(6):
        v = r.values[r.device_index == d]
        assert np.corrcoef(v[:, 0], v[:, 1])[0, 1] > 0.9
        assert np.corrcoef(v[:, 0], v[:, 2])[0, 1] > 0.9
    first = next(iter(r))
    assert len(first[2]) == 3 and all(isinstance(x, float) for x in first[2])


def test_100k_readings_come_in_one_vectorised_call():
    # (How fast is a benchmark's business: `stream-lstm bench` drives the fleet.)
    r = Fleet(100, seed=0, start_ts=START).readings(1000)
    assert len(r) > 95_000


def test_invalid_parameters_are_rejected():
    with pytest.raises(ValueError):
        Fleet(0)
    with pytest.raises(ValueError):
        Fleet(3, step_s=0)
