"""Alert events (alerts.py): an alert opens at two flagged readings in a row, or at one sure
alone, keeps its peak, closes after ``hold_s`` of event time below the threshold, and has one
id from open to close; ``judge``
runs the likelihood and the alerts over a stepped batch, round by round, in reading order.
(Through the real worker and the alerts topic: tests/integration/test_alerts.py.)"""

import copy

import numpy as np
import pytest

from stream_lstm import alerts, likelihood
from stream_lstm.alerts import HIGH, LAST_ABOVE, LOW, PEAK, PEAK_TS, SINCE, VALUE
from stream_lstm.forecast import ForecastBatch
from stream_lstm.state.ingest import ingest
from stream_lstm.state.table import DeviceTable

T0 = 1_700_000_000.0
HOLD = 600.0


def one(state, ts, lik, flagged=None, value=5.0, low=0.0, high=1.0, hold_s=HOLD, sure=None):
    """Step every row by one reading (the same for all rows unless arrays are given); a flagged
    reading is sure alone (opens an alert by itself) unless ``sure`` says otherwise."""
    n = len(state)

    def arr(v):
        return np.broadcast_to(np.asarray(v, np.float64), (n,)).copy()

    lik = arr(lik)
    flagged = lik >= 0.9999 if flagged is None else np.broadcast_to(flagged, (n,))
    sure = flagged if sure is None else np.broadcast_to(sure, (n,))
    opened, closed = alerts.step(state, ts=arr(ts), flagged=flagged, lik=lik, sure=sure, value=arr(value),
                                 low=arr(low), high=arr(high), hold_s=hold_s)
    return opened.tolist(), closed.tolist()


def fresh(rows=1):
    return np.tile(alerts.initial_state(), (rows, 1))


def test_no_alert_is_open_at_first_and_the_id_is_the_device_and_start_in_ms():
    assert alerts.initial_state().shape == (len(alerts.FIELDS),)
    assert not alerts.is_open(fresh(3)).any()
    assert alerts.alert_id("pump-1", T0 + 1.5) == "pump-1@1700000001500"


def test_an_alert_opens_once_keeps_its_peak_and_closes_after_the_hold():
    s = fresh()
    assert one(s, T0, 0.5) == ([], [])
    assert one(s, T0 + 60, 0.99995, value=9.0, low=1.0, high=2.0) == ([0], [])
    assert s[0, SINCE] == T0 + 60 and alerts.is_open(s).tolist() == [True]
    assert one(s, T0 + 120, 0.99999, value=12.0, low=1.5, high=2.5) == ([], [])  # open already
    assert one(s, T0 + 180, 0.99991, value=7.0) == ([], [])  # flagged, below the peak
    assert s[0, [PEAK, PEAK_TS, VALUE, LOW, HIGH]].tolist() == [0.99999, T0 + 120, 12.0, 1.5, 2.5]
    assert s[0, LAST_ABOVE] == T0 + 180 and s[0, SINCE] == T0 + 60  # the id does not move
    assert one(s, T0 + 180 + HOLD - 1, 0.2) == ([], [])  # calm, but not for hold_s yet
    assert one(s, T0 + 180 + HOLD, 0.2) == ([], [0])  # hold_s of calm: closed
    assert alerts.is_open(s).tolist() == [True]  # kept until the close event is out ...
    alerts.clear(s, np.array([0]))
    assert not alerts.is_open(s).any() and np.isnan(s).all()  # ... then forgotten


def test_a_marginal_flag_arms_the_device_and_a_calm_reading_next_disarms_it():
    s = fresh()
    assert one(s, T0, 0.99995, sure=False) == ([], [])
    assert alerts.is_armed(s).tolist() == [True] and not alerts.is_open(s).any()
    assert one(s, T0 + 60, 0.2) == ([], [])  # the next reading is calm: forgotten
    assert not alerts.is_armed(s).any() and np.isnan(s).all()
    assert one(s, T0 + 120, 0.99995, sure=False) == ([], [])  # armed again, from scratch ...
    assert one(s, T0 + 180, np.nan, flagged=np.array([False])) == ([], [])  # ... unscored: calm
    assert np.isnan(s).all()


def test_two_marginal_flags_in_a_row_open_an_alert_from_the_first_with_the_peak_of_both():
    s = fresh()
    assert one(s, T0, 0.99998, value=9.0, sure=False) == ([], [])
    assert one(s, T0 + 60, 0.99995, value=7.0, sure=False) == ([0], [])
    assert s[0, SINCE] == T0 and s[0, LAST_ABOVE] == T0 + 60
    assert s[0, [PEAK, PEAK_TS, VALUE]].tolist() == [0.99998, T0, 9.0]  # the first was higher


def test_a_sure_reading_opens_alone_and_an_armed_device_opens_from_its_first_flag():
    s = fresh(2)
    one(s, T0, [0.2, 0.99995], sure=np.array([False, False]))  # row 1 armed
    assert one(s, T0 + 60, [0.9999999, 0.9999999], sure=np.array([True, True])) == ([0, 1], [])
    assert s[:, SINCE].tolist() == [T0 + 60, T0]


def test_a_flagged_reading_during_the_hold_starts_the_hold_again():
    s = fresh()
    one(s, T0, 1.0)
    one(s, T0 + HOLD - 60, 0.1)
    assert one(s, T0 + HOLD - 30, 1.0) == ([], [])  # above again: the same alert, held
    assert one(s, T0 + HOLD + 60, 0.1) == ([], [])  # HOLD after the start, not after the last
    assert one(s, T0 + 2 * HOLD - 30, 0.1) == ([], [0])
    assert alerts.alert_id("d", s[0, SINCE]) == f"d@{int(T0 * 1000)}"


def test_after_a_close_a_new_alert_has_a_new_id():
    s = fresh()
    one(s, T0, 1.0)
    _, closed = one(s, T0 + HOLD, 0.0)
    alerts.clear(s, np.array(closed))
    assert one(s, T0 + HOLD + 60, 1.0) == ([0], [])
    assert s[0, SINCE] == T0 + HOLD + 60


def test_rows_are_independent():
    s = fresh(3)
    opened, _ = one(s, T0, [1.0, 0.1, 1.0])
    assert opened == [0, 2] and alerts.is_open(s).tolist() == [True, False, True]
    assert one(s, T0 + HOLD, [0.1, 1.0, 1.0]) == ([1], [0])


def test_an_unscored_reading_is_never_flagged_nor_a_peak():
    s = fresh()
    one(s, T0, 1.0)
    assert one(s, T0 + 60, np.nan, flagged=np.array([False])) == ([], [])
    assert s[0, PEAK] == 1.0 and s[0, PEAK_TS] == T0


# ---- judge: over a stepped batch, with the table's likelihood models ------------------------
def forecasts(batch, score, q=2.0):
    """The forecast stage's output for ``batch``: each reading forecast at its value minus 1 with
    scale 1, scored ``score`` (no drift score)."""
    m = len(batch)
    nan, x = np.full(m, np.nan), batch.x_target
    return ForecastBatch(forecast=np.zeros((m, 1)), lower=np.zeros((m, 1)), upper=np.zeros((m, 1)),
                         residual=np.ones(m), forecast_scored=x - 1.0, anomaly_score=np.asarray(score, float),
                         expected_b=np.ones(m), drift_score=nan, drift_expected=nan, drift_b=nan,
                         publish=np.ones(m, bool), q=q)


def judged(table, devices, ts, values, score, hold_s=HOLD):
    batch = ingest(table, devices, ts, np.asarray(values, float)[:, None], [0] * len(devices), now=0.0,
                   target=0)
    fb = forecasts(batch, np.asarray(score, float)[batch.rows])
    events = alerts.judge(batch, fb, table, false_alarm_rate=1e-4, hold_s=hold_s,
                          ts=np.asarray(ts, float)[batch.rows])
    return batch, fb, events


@pytest.fixture
def warmed():
    """Two devices whose likelihood models have seen 150 ordinary readings each."""
    table = DeviceTable(max_devices=4, window=4, n_features=1, num_layers=1, hidden_size=2)
    rng = np.random.default_rng(0)
    for k in range(150):
        _, fb, events = judged(table, ["a", "b"], [T0 + 60 * k] * 2, 20 + rng.normal(0, 0.1, 2),
                               rng.uniform(0.5, 1.5, 2))
        assert events == [] and not fb.is_anomaly.any()
    return table, T0 + 60 * 150


def test_judge_sets_likelihood_and_flag_and_nothing_before_the_warm_up():
    table = DeviceTable(max_devices=4, window=4, n_features=1, num_layers=1, hidden_size=2)
    _, fb, events = judged(table, ["a"], [T0], [20.0], [1e6])
    assert events == [] and np.isnan(fb.anomaly_likelihood).all() and not fb.is_anomaly.any()


def test_judge_opens_on_a_spike_with_its_expected_range_and_closes_after_the_hold(warmed):
    table, t = warmed
    batch, fb, events = judged(table, ["a", "b"], [t, t], [80.0, 20.0], [500.0, 1.0])
    assert fb.is_anomaly.tolist() == [True, False] and fb.anomaly_likelihood[0] >= 1 - 1e-4
    ((row, kind, state),) = events
    assert (batch.rows[row], kind) == (0, "open")
    assert state[SINCE] == t and state[VALUE] == 80.0
    assert (state[LOW], state[HIGH]) == (79.0 - 2.0, 79.0 + 2.0)  # forecast -/+ q b
    assert alerts.is_open(table.alert[[table.index["a"]]]).tolist() == [True]
    events, k = [], 1
    while not events:  # calm readings until the hold has passed since the last flagged one
        assert k < 100, "the alert never closed"
        _, fb, events = judged(table, ["a"], [t + 60 * k], [20.0], [1.0])
        k += 1
    ((_, kind, state),) = events
    assert kind == "close" and state[SINCE] == t
    assert t + 60 * (k - 1) - state[LAST_ABOVE] >= HOLD > t + 60 * (k - 2) - state[LAST_ABOVE]
    assert not alerts.is_open(table.alert[[table.index["a"]]]).any()  # cleared in the table


def test_judge_opens_on_a_marginal_reading_only_when_the_next_one_is_flagged_too(warmed):
    table, t = warmed
    a = table.index["a"]

    def marginal(at):
        """A score past the threshold at rate 1e-4 but not sure alone (1e-6) at ``at``, found on
        a copy of the table (the likelihood's tail is steep: a grid of scores)."""
        for score in np.arange(1.5, 20.0, 0.05):
            _, fb, _ = judged(copy.deepcopy(table), ["a"], [at], [20.0], [score])
            if 1e-6 < 1 - fb.anomaly_likelihood[0] <= 1e-4:
                return score
        raise AssertionError("no marginal score")

    # One marginal flag arms ...
    _, fb, events = judged(table, ["a"], [t], [20.0], [marginal(t)])
    assert fb.is_anomaly.tolist() == [True] and events == []
    assert alerts.is_armed(table.alert[[a]]).tolist() == [True]
    # ... the next poll's calm reading (the device is still stepped: it is armed) disarms ...
    _, fb, events = judged(table, ["a"], [t + 60], [20.0], [1.0])
    assert events == [] and not alerts.is_armed(table.alert[[a]]).any()
    # ... and two in a row, across two polls, open one alert from the first.
    _, fb, events = judged(table, ["a"], [t + 120], [20.0], [marginal(t + 120)])
    assert fb.is_anomaly.tolist() == [True] and events == []
    _, fb, events = judged(table, ["a"], [t + 180], [20.0], [marginal(t + 180)])
    assert fb.is_anomaly.tolist() == [True]
    ((_, kind, state),) = events
    assert kind == "open" and state[SINCE] == t + 120


def test_judge_takes_a_devices_readings_of_one_poll_in_order(warmed):
    table, t = warmed
    # One poll, device a three times: the spike opens an alert; an hour later a calm reading is
    # still flagged (the spike is in the recent run's short average); the next closes it.
    batch, _, events = judged(table, ["a"] * 3, [t, t + 3600, t + 7200], [80.0, 20.0, 20.0], [500.0, 1.0, 1.0])
    assert batch.rounds == [(0, 1), (1, 2), (2, 3)]
    assert [(int(batch.rows[row]), kind) for row, kind, _ in events] == [(0, "open"), (2, "close")]
    assert events[0][2][SINCE] == events[1][2][SINCE] == t


def test_judge_flags_a_reading_past_the_devices_whole_range_and_keeps_the_range_in_the_table():
    table = DeviceTable(max_devices=4, window=4, n_features=1, num_layers=1, hidden_size=2)
    rng = np.random.default_rng(2)
    for k in range(300):
        judged(table, ["a", "b"], [T0 + 60 * k] * 2, rng.uniform(19.0, 21.0, 2), rng.uniform(0.5, 1.5, 2))
    a, b = table.index["a"], table.index["b"]
    assert table.value_range[a, 0] >= 19.0 and table.value_range[a, 1] <= 21.0
    assert table.value_range[a, 2] == 300
    # Ordinary scores, an ordinary step; only a's value leaves everything it has shown.
    _, fb, events = judged(table, ["a", "b"], [T0 + 60 * 300] * 2, [21.4, 20.5], [1.0, 1.0])
    assert fb.is_anomaly.tolist() == [True, False]
    assert fb.anomaly_likelihood[0] >= 1 - likelihood.RANGE_TAIL
    assert [kind for _, kind, _ in events] == ["open"]
    assert table.value_range[a, 1] == 21.4 and table.value_range[b, 1] <= 21.0


def test_judge_waits_for_a_second_reading_when_one_channel_alone_is_extreme(warmed):
    table, t = warmed
    a = table.index["a"]
    # A broken forecast on an ordinary value: only the scores' channel is extreme. Flagged, but
    # not sure alone: its alert needs the next reading flagged too.
    _, fb, events = judged(table, ["a"], [t], [20.0], [500.0])
    assert fb.is_anomaly.tolist() == [True] and events == []
    assert 1 - fb.anomaly_likelihood[0] <= 1e-4 * alerts.SURE  # sure by its likelihood ...
    assert fb.corroborated.tolist() == [False]  # ... but one view alone
    assert alerts.is_armed(table.alert[[a]]).tolist() == [True]
    _, fb, events = judged(table, ["a"], [t + 60], [20.0], [5000.0])  # worse still: flagged again
    ((_, kind, state),) = events
    assert kind == "open" and state[SINCE] == t
    # The same score with the value far off too (the level and the steps agree): opens alone.
    _, fb, events = judged(table, ["b"], [t], [80.0], [500.0])
    assert [kind for _, kind, _ in events] == ["open"] and fb.corroborated.tolist() == [True]
