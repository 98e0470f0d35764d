import numpy as np

from stream_lstm import experts
from stream_lstm.state.normalizer import normalize_sequence


def serve(x, model_change=None, model_forecast=None, rate=0.1, learn=None):
    """Step one device through ``x``; the one-step forecasts (``out[t]`` is for ``x[t+1]``)."""
    n = len(x)
    _, mean, scale = normalize_sequence(x[:, None], "ewm", 0.02, 1e-3)
    model_change = np.zeros(n) if model_change is None else model_change
    model_forecast = x if model_forecast is None else model_forecast  # default: persistence
    learn = np.ones(n, bool) if learn is None else learn
    state = experts.init_state(1)
    out = np.empty(n)
    for t in range(n):
        out[t] = experts.step(state, learn[t : t + 1], x[t : t + 1], mean[t : t + 1, 0],
                              scale[t : t + 1, 0], model_change[t : t + 1],
                              model_forecast[t : t + 1], rate=rate)[0]
    return out, state


def mae(x, out, start):
    return float(np.mean(np.abs(x[start:] - out[start - 1 : -1])))


def test_ar_expert_learns_a_device_s_own_cycle():
    rng = np.random.default_rng(0)
    t = np.arange(2000)
    x = 50 + 10 * np.sin(2 * np.pi * t / 5) + rng.normal(0, 0.5, len(t))  # a 5-reading cycle
    out, state = serve(x)  # the "model" knows nothing: it says "no change"
    persistence = float(np.mean(np.abs(np.diff(x[1499:]))))
    assert mae(x, out, 1500) < 0.1 * persistence
    assert experts.weights(state)[0].argmax() == experts.EXPERTS.index("ar")


def test_median_expert_wins_on_noise_around_a_level():
    rng = np.random.default_rng(1)
    x = 20 + rng.laplace(0, 1, 3000)
    out, state = serve(x)
    # The best forecast is the level itself (the median); persistence is 1.5 times worse.
    oracle = float(np.mean(np.abs(x[2000:] - 20)))
    assert mae(x, out, 2000) < 1.06 * oracle
    assert mae(x, out, 2000) < 0.75 * float(np.mean(np.abs(np.diff(x[1999:]))))
    assert experts.weights(state)[0, experts.EXPERTS.index("last")] < 0.01


def test_a_model_that_is_right_keeps_the_weight():
    t = np.arange(3000.0)
    x = 100 + 10 * np.sin(t / 20) + 3 * np.sin(t / 3)  # a signal the model knows exactly
    exact = np.r_[x[1:], x[-1]]
    out, state = serve(x, model_forecast=exact)
    w = experts.weights(state)[0]  # the ar expert can learn this signal too (two sines: AR(4))
    assert w[experts.EXPERTS.index("model")] + w[experts.EXPERTS.index("ar")] > 0.95
    assert mae(x, out, 2000) < 0.05 * float(np.mean(np.abs(np.diff(x[1999:]))))


def test_a_spike_does_not_derail_the_ar_expert():
    rng = np.random.default_rng(2)
    t = np.arange(2500)
    x = 50 + 10 * np.sin(2 * np.pi * t / 6) + rng.normal(0, 0.5, len(t))
    spiked = x.copy()
    spiked[1500] = 5_000.0
    clean, _ = serve(x)
    out, state = serve(spiked)
    assert np.isfinite(state).all()
    # The spike inflates the normalizer's scale for a few hundred readings (EWM, alpha 0.02),
    # which slows learning, but from 20 readings on the forecasts are far better than the
    # last value, and 300 readings on they are as good as without the spike.
    assert mae(spiked, out, 1520) < 0.5 * float(np.mean(np.abs(np.diff(x[1519:]))))
    assert mae(spiked, out, 1800) < 1.15 * mae(x, clean, 1800)


def test_analog_expert_learns_a_burst_that_repeats_its_shape():
    # Disk writes: idle at 0, then now and then the same ramp (NAB ec2_disk_write_bytes has it).
    rng = np.random.default_rng(5)
    shape = np.array([20.0, 50.0, 430.0, 36.0, 2.5])
    x = np.zeros(3000)
    start = int(rng.integers(8, 40))
    while start < len(x):
        burst = shape[: len(x) - start] * rng.uniform(0.95, 1.05)
        x[start : start + len(burst)] = burst
        start += len(burst) + int(rng.integers(8, 40))
    out, state = serve(x)
    # A burst's first reading cannot be foreseen, but the rest of it can: the analogues' error
    # is what the onsets alone cost, far below persistence and below the median (always 0).
    onsets = (x[2000:] > 0) & (x[1999:-1] == 0)
    onset_cost = float(np.abs(x[2000:][onsets]).sum()) / 1000
    persistence = float(np.mean(np.abs(np.diff(x[1999:]))))
    median_cost = float(np.mean(np.abs(x[2000:])))
    assert mae(x, out, 2000) < onset_cost + 0.1 * (persistence - onset_cost)
    assert mae(x, out, 2000) < 0.5 * median_cost
    assert experts.weights(state)[0].argmax() == experts.EXPERTS.index("analog")


def test_analog_expert_waits_for_enough_history():
    history = np.full((2, experts.N_HISTORY), np.nan)
    history[0, -(experts.PATTERN + experts.N_NEIGHBOURS) :] = [1, 2, 3, 4, 5, 6, 7]
    history[1, -(experts.PATTERN + experts.N_NEIGHBOURS - 1) :] = [1, 2, 3, 4, 5, 6]
    out = experts._analog(history)
    # Row 0 has exactly three windows with a successor: [1..4]->5, [2..5]->6, [3..6]->7.
    assert out[0] == 6.0
    assert np.isnan(out[1])


def test_rows_that_may_not_learn_leave_the_weights_alone():
    x = 10 + np.sin(np.arange(300.0))
    learn = np.ones(300, bool)
    learn[200:] = False
    _, frozen = serve(x[:300], learn=learn)
    _, at_200 = serve(x[:200])
    w, p = experts._W, experts._P
    np.testing.assert_array_equal(frozen[:, w], at_200[:, w])
    np.testing.assert_array_equal(frozen[:, p], at_200[:, p])
    np.testing.assert_array_equal(experts.weights(frozen), experts.weights(at_200))


def test_devices_in_one_call_do_not_affect_each_other():
    rng = np.random.default_rng(4)
    xs = [10 + np.cumsum(rng.normal(size=200)), 3 + rng.laplace(size=200)]
    alone = [serve(x)[0] for x in xs]
    stats = [normalize_sequence(x[:, None], "ewm", 0.02, 1e-3) for x in xs]
    state = experts.init_state(2)
    together = np.empty((200, 2))
    for t in range(200):
        x = np.array([xs[0][t], xs[1][t]])
        mean = np.array([stats[0][1][t, 0], stats[1][1][t, 0]])
        scale = np.array([stats[0][2][t, 0], stats[1][2][t, 0]])
        together[t] = experts.step(state, np.ones(2, bool), x, mean, scale, np.zeros(2), x.copy(),
                                   rate=0.1)
    np.testing.assert_array_equal(together[:, 0], alone[0])
    np.testing.assert_array_equal(together[:, 1], alone[1])


def test_an_expert_that_cannot_forecast_counts_as_the_last_reading():
    x = np.array([1.0, 2.0, 3.0, 4.0])
    out, _ = serve(x, model_forecast=np.full(4, np.nan))
    assert np.isfinite(out).all()


def test_leaders_counts_the_expert_each_device_weighs_most():
    state = experts.init_state(3)
    state[1, experts._LOG_W.start + experts.EXPERTS.index("analog")] = 2.0
    state[2, experts._LOG_W.start + experts.EXPERTS.index("last")] = 1.0
    # A device that has learnt nothing weighs all alike: it counts for the model.
    assert dict(zip(experts.EXPERTS, experts.leaders(state).tolist(), strict=True)) == {
        "model": 1, "ar": 0, "median": 0, "last": 1, "analog": 1}
    assert experts.leaders(state, [1, 2]).tolist() == [0, 0, 0, 1, 1]  # only those rows


def test_prepare_gives_what_step_computes_from_the_readings_for_a_poll_of_many_rounds():
    # Three devices, one with history from an earlier poll; their readings in rounds.
    rng = np.random.default_rng(4)
    state = experts.init_state(3)
    slots = np.array([0, 1, 2])
    for x in 20 + rng.normal(size=(300, 3)):
        experts.step(state, np.ones(3, bool), x, x, np.ones(3), np.zeros(3), x, rate=0.1)
    state[2] = experts.init_state(1)[0]  # a new device: no history yet
    rounds = [slots, slots, slots[:2], slots[:1]]
    poll = np.concatenate(rounds)
    x = 20 + rng.normal(size=len(poll))
    mean, scale, change = x + 0.5, rng.uniform(0.5, 2.0, len(poll)), rng.normal(size=len(poll))
    prepared = experts.prepare(state, poll, x, mean, scale, change)
    plain, ahead = state.copy(), state.copy()
    start = 0
    for rnd in rounds:
        rows = slice(start, start + len(rnd))
        start += len(rnd)
        args = (np.ones(len(rnd), bool), x[rows], mean[rows], scale[rows], change[rows], x[rows])
        sub = plain[rnd]
        want = experts.step(sub, *args, rate=0.1)
        plain[rnd] = sub
        sub = ahead[rnd]
        got = experts.step(sub, *args, rate=0.1, prepared=tuple(p[rows] for p in prepared))
        ahead[rnd] = sub
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(ahead, plain)
