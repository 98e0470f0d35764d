"""The per-device anomaly likelihood (likelihood.py): calibrated whatever the noise level."""

import numpy as np
import pytest

from stream_lstm import likelihood

SCALES = np.array([0.01, 1.0, 100.0, 10_000.0])  # devices with very different noise levels


def flag_rates(draw, n: int = 30_000, skip: int = 3_000, rates=(1e-2, 1e-3)) -> dict[float, np.ndarray]:
    """Per device, the fraction of readings flagged at each false-alarm rate, over pure noise."""
    state = np.tile(likelihood.channel_state(), (len(SCALES), 1))
    liks = np.array([likelihood.update(state, draw() * SCALES) for _ in range(n)])[skip:]
    return {rate: ((1.0 - liks) <= rate).mean(axis=0) for rate in rates}


@pytest.mark.parametrize("shape", ["half-normal", "exponential", "log-normal"])
def test_the_alert_rate_matches_the_stated_false_alarm_rate_on_every_device(shape):
    rng = np.random.default_rng(7)
    draw = {"half-normal": lambda: np.abs(rng.standard_normal(len(SCALES))),
            "exponential": lambda: rng.exponential(1.0, len(SCALES)),
            "log-normal": lambda: rng.lognormal(0.0, 1.0, len(SCALES))}[shape]
    for rate, observed in flag_rates(draw).items():
        assert np.all(observed <= 2 * rate) and np.all(observed >= rate / 2), (rate, observed / rate)


def test_a_short_run_of_moderate_scores_is_more_unusual_than_one_of_them():
    state = np.tile(likelihood.channel_state(), (1, 1))
    rng = np.random.default_rng(1)
    for _ in range(1000):
        likelihood.update(state, rng.exponential(1.0, 1))
    single = likelihood.update(state.copy(), np.array([4.0]))[0]
    for _ in range(5):
        run = likelihood.update(state, np.array([4.0]))[0]
    assert run > single and 1 - run < 1e-3 < 1 - single


def test_unscored_readings_leave_the_state_alone_and_warm_up_gives_nan():
    state = np.tile(likelihood.channel_state(), (2, 1))
    before = state.copy()
    assert np.isnan(likelihood.update(state, np.array([np.nan, np.nan]))).all()
    np.testing.assert_array_equal(state, before)
    for _ in range(likelihood.WARMUP):
        lik = likelihood.update(state, np.array([1.0, np.nan]))
    assert np.isnan(lik).all()  # the first device has just completed its warm-up readings
    assert np.isfinite(likelihood.update(state, np.array([1.0, np.nan]))[0])


def test_gamma_cdf_matches_the_exponential_case():
    x = np.array([0.5, 1.0, 3.0])
    np.testing.assert_allclose(likelihood.gamma_cdf(x, np.ones(3), np.ones(3)), 1 - np.exp(-x), rtol=1e-6)


def test_the_level_channel_sees_a_value_far_outside_the_device_history_that_scores_do_not():
    rng = np.random.default_rng(3)
    state = np.tile(likelihood.initial_state(), (1, 1))
    for _ in range(3000):
        lik = likelihood.judge(state, rng.exponential(1.0, 1), 20.0 + rng.standard_normal(1))
    assert 1 - lik[0] > 1e-3
    # An ordinary score (the forecaster followed the value there), at a level 15 sd away.
    assert 1 - likelihood.judge(state, np.array([1.0]), np.array([35.0]))[0] < 1e-4


def test_all_channels_together_flag_no_more_than_the_stated_rate_on_noise():
    rng = np.random.default_rng(5)
    state = np.tile(likelihood.initial_state(), (len(SCALES), 1))
    liks = np.array([likelihood.judge(state, rng.exponential(1.0, len(SCALES)),
                                      SCALES * rng.standard_normal(len(SCALES)))
                     for _ in range(30_000)])[3_000:]
    for rate in (1e-2, 1e-3):
        observed = ((1.0 - liks) <= rate).mean(axis=0)
        assert np.all(observed <= 2 * rate) and np.all(observed >= rate / 4), (rate, observed / rate)


def test_noise_too_small_to_square_is_judged_as_noise_of_any_other_scale():
    """Readings of 1e-200 or subnormal 1e-310 (their squares underflow to 0): half of them
    were flagged, the device's channels thinking it had never varied (a numerics review)."""
    scales = np.array([1.0, 1e-100, 1e-200, 1e-310])
    rng = np.random.default_rng(7)
    state = np.tile(likelihood.initial_state(), (len(scales), 1))
    liks = np.array([likelihood.judge(state, rng.exponential(1.0, len(scales)),
                                      scales * rng.standard_normal(len(scales)))
                     for _ in range(5_000)])[500:]
    assert np.all(((1.0 - liks) <= 1e-3).mean(axis=0) <= 2e-3)


def test_a_change_of_one_ulp_after_a_long_constant_run_is_no_change():
    """0.1 + 0.2 for 0.3 after weeks of 0.3 opened an alert at likelihood 1 (the channels had
    only ever seen 0); a real change after that run is still certain."""
    state = np.tile(likelihood.initial_state(), (3, 1))
    likelihood.judge(state, np.full(3, np.nan), np.full(3, 0.3))  # (no forecast, no score yet)
    for _ in range(3000):
        likelihood.judge(state, np.full(3, 0.5), np.full(3, 0.3))
    lik = likelihood.judge(state, np.full(3, 0.5), np.array([0.1 + 0.2, np.nextafter(0.3, 1.0), 0.3003]))
    assert lik[0] == lik[1] == 0.0 and 1.0 - lik[2] <= 1e-3


def test_a_change_below_any_sensors_resolution_after_a_constant_run_is_no_change_a_larger_one_is():
    """A change in the 11th digit of a reading held for weeks (a unit conversion's last digits)
    opened an alert at likelihood 1 too; below RESOLUTION of the reading it is none to channels
    that never saw a change, and a device that does vary keeps judging such changes as before."""
    state = np.tile(likelihood.initial_state(), (3, 1))
    for _ in range(3000):
        likelihood.judge(state, np.full(3, 0.5), np.full(3, 20.0))
    lik = likelihood.judge(state, np.full(3, 0.5), np.array([20.0000000002, 20.0 * (1 - 5e-10), 20.00002]))
    assert lik[0] == lik[1] == 0.0 and 1.0 - lik[2] <= 1e-3
    assert likelihood.changed(np.array([20.0000000002]), np.array([20.0])).item() > 0  # (varied: as before)


def test_observing_round_by_round_then_concluding_once_is_judging_each_round():
    rng = np.random.default_rng(9)
    one, many = (np.tile(likelihood.initial_state(), (3, 1)) for _ in range(2))
    scores, values = rng.exponential(1.0, (400, 3)), 5 + rng.normal(size=(400, 3))
    scores[::17, 1] = np.nan  # unscored readings
    judged = np.array([likelihood.judge(one, s, v) for s, v in zip(scores, values, strict=True)])
    observed = [likelihood.observe(many, s, v) for s, v in zip(scores, values, strict=True)]
    stacked = [np.stack([o[i] for o in observed]) for i in range(4)]  # [rounds, rows, ...]
    concluded = likelihood.combine(likelihood.conclude(*stacked).reshape(-1, 3)).reshape(400, 3)
    # The same numbers, but for the last bits of torch's gamma function over longer arrays.
    np.testing.assert_allclose(concluded, judged, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(many, one)
    assert np.isfinite(judged[-1]).all()


@pytest.mark.parametrize("shape", ["normal", "lognormal", "student_t3"])
def test_the_range_rule_adds_at_most_a_tenth_of_the_default_rate_on_noise(shape):
    rng = np.random.default_rng(11)
    draw = {"normal": lambda: rng.standard_normal(20), "lognormal": lambda: rng.lognormal(0.0, 1.0, 20),
            "student_t3": lambda: rng.standard_t(3, 20)}[shape]
    state, held = np.full((20, len(likelihood.RANGE_FIELDS)), np.nan), np.full(20, np.nan)
    outside = np.array([likelihood.beyond_range(state, 5.0 * draw(), held) for _ in range(30_000)])[3_000:]
    assert outside.mean() <= 1.5e-4, outside.mean()  # per reading, over the 20 devices


def test_a_reading_past_the_devices_whole_range_is_flagged_whatever_the_channels_say():
    rng = np.random.default_rng(4)
    state, value_range = np.tile(likelihood.initial_state(), (2, 1)), np.full((2, 3), np.nan)
    held = np.full(2, np.nan)
    for _ in range(likelihood.RANGE_WARMUP + 200):
        values = rng.uniform(19.0, 21.0, 2)
        lik = likelihood.overrule(likelihood.judge(state, rng.exponential(1.0, 2), values),
                                  likelihood.beyond_range(value_range, values, held))
    # 21.3 is past the range [~19, ~21] by more than 10% of it, yet only ~2 sd from the mean:
    # the channels alone do not flag it; 20.9, inside, stays ordinary.
    channels = state.copy()
    alone = likelihood.judge(channels, np.array([1.0, 1.0]), np.array([21.3, 20.9]))
    assert (1 - alone > 1e-3).all()
    lik = likelihood.overrule(likelihood.judge(state, np.array([1.0, 1.0]), np.array([21.3, 20.9])),
                              likelihood.beyond_range(value_range, np.array([21.3, 20.9]), held))
    assert lik[0] >= 1 - likelihood.RANGE_TAIL and 1 - lik[1] > 1e-3


def test_one_absurd_glitch_does_not_switch_the_range_rule_off_but_a_new_regime_is_learnt():
    """A sensor's 1e12 glitch used to widen the device's range for good: no reading would
    ever be outside it again. Held out until the next reading confirms it, it is forgotten;
    two in a row (a device that really moved) are taken in."""
    rng = np.random.default_rng(5)
    value_range, held = np.full((2, 3), np.nan), np.full(2, np.nan)
    for _ in range(likelihood.RANGE_WARMUP + 200):
        likelihood.beyond_range(value_range, rng.uniform(19.0, 21.0, 2), held)
    assert likelihood.beyond_range(value_range, np.array([1e12, 1e12]), held).all()
    # Device 0 comes back to normal: the glitch is forgotten, and 21.5 is outside again.
    assert likelihood.beyond_range(value_range, np.array([20.0, 2e12]), held).tolist() == [False, True]
    assert value_range[0, 1] < 21.0 and value_range[1, 1] == 2e12  # device 1 moved: learnt
    assert likelihood.beyond_range(value_range, np.array([21.5, 1.5e12]), held).tolist() == [True, False]
    assert np.isnan(held).all()


def test_a_step_channel_that_never_observed_a_step_does_not_take_its_first_from_a_fill():
    """A state whose step channel and previous reading are at their fill (a fresh state, or one
    restored from before the channel) on a device reading 2.4e9: its first step is not
    |2.4e9 - 0|, after which every ordinary step was flagged for about a week."""
    rng = np.random.default_rng(3)
    state = likelihood.initial_state()[None].copy()
    flagged = 0
    for _ in range(15_000):
        lik = likelihood.judge(state, rng.exponential(1.0, 1), 2.4e9 + rng.normal(0.0, 1.0, 1))
        flagged += int(np.nan_to_num(lik[0]) > 0.999)
    assert flagged < 0.005 * 15_000  # (0.7 of them before)


def test_a_devices_first_reading_teaches_neither_the_level_nor_the_step_channel():
    """The first reading has no level to be measured against (the mean is that reading, so
    its distance is 0 by construction) and no previous reading to step from: both channels
    stay as they were. (The level's guard read its count after the update, always 1 or more, so
    every device's level model began with a 0 it never saw.)"""
    state = likelihood.initial_state()[None].copy()
    likelihood.judge(state, np.array([1.0]), np.array([20.0]))
    width = len(likelihood.CHANNEL_FIELDS)
    level, step = (state[0, i * width:(i + 1) * width] for i in (1, 2))
    assert level.tolist() == likelihood.channel_state().tolist()
    assert step.tolist() == likelihood.channel_state().tolist()
    assert state[0, likelihood.LEVEL_N] == 1.0  # the level itself did take the reading in
    likelihood.judge(state, np.array([1.0]), np.array([21.0]))
    assert state[0, width + likelihood.CHANNEL_FIELDS.index("n")] == 1.0


def test_a_glitch_followed_by_a_reading_merely_outside_the_range_is_forgotten():
    state, held = np.full((1, len(likelihood.RANGE_FIELDS)), np.nan), np.full(1, np.nan)
    for v in np.linspace(0.0, 10.0, likelihood.RANGE_WARMUP):
        likelihood.beyond_range(state, np.array([v]), held)
    likelihood.beyond_range(state, np.array([1e12]), held)  # held out
    assert likelihood.beyond_range(state, np.array([11.5]), held).tolist() == [True]  # outside, mildly
    assert state[0, 1] == 11.5 and np.isnan(held[0])  # the glitch forgotten, 11.5 taken in
    assert likelihood.beyond_range(state, np.array([5e11]), held).tolist() == [True]  # the next one held
    assert state[0, 1] == 11.5 and held[0] == 5e11
    assert likelihood.beyond_range(state, np.array([-1e12]), held).tolist() == [True]  # other side: held instead
    assert state[0].tolist()[:2] == [0.0, 11.5] and held[0] == -1e12
    likelihood.beyond_range(state, np.array([-30.0]), held)  # 2.6 widths: not a tenth as far
    assert state[0].tolist()[:2] == [-30.0, 11.5] and np.isnan(held[0])
    likelihood.beyond_range(state, np.array([-1e4]), held)  # held again, then confirmed
    likelihood.beyond_range(state, np.array([-2e3]), held)  # (a tenth as far out, and more)
    assert state[0].tolist()[:2] == [-1e4, 11.5] and np.isnan(held[0])
