import numpy as np
import pytest

from stream_lstm.forecast import assemble, interval_quantile
from stream_lstm.stages import Blend, Calibration, Experts
from stream_lstm.state.ingest import ingest
from stream_lstm.state.normalizer import normalize_sequence
from stream_lstm.state.table import DeviceTable


def run(table, ids, ts, x, mu, log_b, **kw):
    b = ingest(table, ids, ts, np.array(x, float)[:, None], [0] * len(ids), now=0.0, target=0)
    opts = dict(coverage=0.9, min_history=2, anomaly_warmup=1, stages=[]) | kw
    return b, assemble(b, np.array(mu, np.float32), np.array(log_b, np.float32), table, **opts)


def test_denormalizes_change_forecast_with_interval_and_scores_against_previous():
    table = DeviceTable(max_devices=4, window=4, n_features=1, num_layers=1, hidden_size=2)
    # readings 10, 12 -> mean 11, population std 1; mu=[0.5, 1] -> 12 + 1*[0.5, 1]
    b, fb = run(table, ["a", "a"], [1.0, 2.0], [10, 12], [[0, 0], [0.5, 1.0]],
                [[0, 0], [np.log(2.0), 0]])
    np.testing.assert_allclose(fb.forecast[1], [12.5, 13.0])
    q = interval_quantile(0.9)
    np.testing.assert_allclose(fb.lower[1], [12.5 - q * 2.0, 13.0 - q * 1.0])
    assert fb.publish.tolist() == [False, True]
    # next reading 20.5 vs one-step forecast 12.5 with Laplace scale b = 2 (original units) -> score 4
    b, fb2 = run(table, ["a"], [3.0], [20.5], [[0, 0]], [[0, 0]])
    assert fb2.residual[0] == 8.0 and abs(fb2.anomaly_score[0] - 4.0) < 1e-6
    low, high = fb2.expected_range()[:2]
    np.testing.assert_allclose([low[0], high[0]], [12.5 - q * 2.0, 12.5 + q * 2.0])


def test_first_readings_after_reset_are_never_scored():
    table = DeviceTable(max_devices=4, window=4, n_features=1, num_layers=1, hidden_size=2)
    run(table, ["a"] * 3, [1.0, 2.0, 3.0], [1, 2, 3], np.zeros((3, 2)), np.full((3, 2), -5.0))
    _, fb = run(table, ["a"], [4.0], [100.0], [[0, 0]], [[-5, -5]], anomaly_warmup=5)
    assert np.isnan(fb.anomaly_score[0])
    assert interval_quantile(0.5) < interval_quantile(0.9) < interval_quantile(0.99)


def test_laplace_interval_covers_the_nominal_share_of_laplace_draws():
    draws = np.random.default_rng(0).laplace(0.0, 2.0, 200_000)
    for coverage in (0.5, 0.9, 0.99):
        inside = np.abs(draws) <= interval_quantile(coverage) * 2.0
        assert abs(inside.mean() - coverage) < 0.005


def test_drift_score_compares_with_the_forecast_made_h_readings_earlier():
    x = [10.0, 12.0, 11.0, 15.0, 9.0, 30.0]
    rng = np.random.default_rng(1)
    mu, log_b = rng.normal(size=(6, 2)), rng.normal(size=(6, 2)) * 0.3
    one_by_one = DeviceTable(max_devices=4, window=4, n_features=1, num_layers=1, hidden_size=2)
    made, drift = [], []
    for i in range(6):
        _, fb = run(one_by_one, ["a"], [float(i)], [x[i]], mu[i : i + 1], log_b[i : i + 1])
        q = interval_quantile(0.9)
        made.append((fb.forecast[0, 1], (fb.upper[0, 1] - fb.lower[0, 1]) / (2 * q)))
        drift.append(fb.drift_score[0])
    # H = 2 and a warm-up of 1: the first forecast past the warm-up is made at reading 2.
    assert np.isnan(drift[:3]).all()
    for i in range(3, 6):
        forecast_h, b_h = made[i - 2]
        assert drift[i] == pytest.approx(abs(x[i] - forecast_h) / b_h, rel=1e-5)
    # All six readings in one poll (six rounds) give the same scores.
    in_one_poll = DeviceTable(max_devices=4, window=4, n_features=1, num_layers=1, hidden_size=2)
    _, fb = run(in_one_poll, ["a"] * 6, [float(i) for i in range(6)], x, mu, log_b)
    np.testing.assert_allclose(fb.drift_score, drift, rtol=1e-6)


def calibrated():
    return [Calibration(rate=0.02, coverage=0.9, q=interval_quantile(0.9))]


def calibration_run(stages, readings_per_poll=1, n=3000, horizon=3):
    """A model whose scale is 5x too small, on Laplace noise; the intervals it publishes."""
    rng = np.random.default_rng(7)
    x = 50.0 + rng.laplace(0.0, 1.0, n)
    table = DeviceTable(max_devices=2, window=4, n_features=1, num_layers=1, hidden_size=2)
    lower, upper = [], []
    for s in range(0, n, readings_per_poll):
        k = min(readings_per_poll, n - s)
        _, fb = run(table, ["a"] * k, list(range(s, s + k)), x[s : s + k], np.zeros((k, horizon)),
                    np.full((k, horizon), np.log(0.2)), stages=stages, anomaly_warmup=10)
        lower.append(fb.lower)
        upper.append(fb.upper)
    return x, np.concatenate(lower), np.concatenate(upper)


def covered(x, lower, upper, k, start):
    """Share of readings from ``start`` on inside the interval made k readings before them."""
    return float(np.mean((x[start:] >= lower[start - k : -k, k - 1]) & (x[start:] <= upper[start - k : -k, k - 1])))


def test_per_device_calibration_brings_coverage_to_nominal():
    x, lo, hi = calibration_run([])
    assert covered(x, lo, hi, 1, 1000) < 0.6  # the model's own scale is far too narrow
    x, lo, hi = calibration_run(calibrated())
    assert abs(covered(x, lo, hi, 1, 1000) - 0.9) < 0.03
    assert abs(covered(x, lo, hi, 3, 1000) - 0.9) < 0.03  # h=H has its own factor


def test_calibration_does_not_depend_on_how_readings_were_split_into_polls():
    _, lo1, hi1 = calibration_run(calibrated(), n=400)
    _, lo7, hi7 = calibration_run(calibrated(), readings_per_poll=7, n=400)
    np.testing.assert_array_equal(lo1, lo7)
    np.testing.assert_array_equal(hi1, hi7)


def blend_run(x, mu, stages, readings_per_poll=1):
    table = DeviceTable(max_devices=2, window=4, n_features=1, num_layers=1, hidden_size=2)
    out = []
    for s in range(0, len(x), readings_per_poll):
        k = min(readings_per_poll, len(x) - s)
        _, fb = run(table, ["a"] * k, list(range(s, s + k)), x[s : s + k], mu[s : s + k],
                    np.zeros((k, mu.shape[1])), stages=stages, anomaly_warmup=5)
        out.append(fb.forecast)
    return np.concatenate(out), table.blend_w[table.index["a"]]


def one_step_mae(x, forecast, start):
    return float(np.mean(np.abs(x[start:] - forecast[start - 1 : -1, 0])))


def test_blend_falls_back_to_persistence_where_the_model_only_adds_noise():
    rng = np.random.default_rng(3)
    x = np.cumsum(rng.normal(size=3000))  # a random walk: the last value is the best forecast
    noise = rng.normal(size=(3000, 2))  # a "model" whose change is pure noise
    model_only, w0 = blend_run(x, noise, [])
    blended, w = blend_run(x, noise, [Blend(0.005)])
    persistence = float(np.mean(np.abs(np.diff(x[1999:]))))
    assert w0.tolist() == [1.0, 1.0] and w.max() < 0.2
    assert one_step_mae(x, model_only, 2000) > 1.3 * persistence
    assert one_step_mae(x, blended, 2000) < 1.05 * persistence


def test_blend_keeps_a_model_that_helps_and_does_not_depend_on_polls():
    t = np.arange(1500.0)
    x = 10 * np.sin(t / 20)
    _, _, scale = normalize_sequence(x[:, None], "welford")
    exact = np.stack([(np.roll(x, -k) - x) / scale[:, 0] for k in (1, 2)], 1)  # the true change
    exact[-2:] = 0.0
    forecast, w = blend_run(x, exact, [Blend(0.005)])
    assert w.min() > 0.95  # the model is right: its change keeps its full weight
    chunked, _ = blend_run(x[:300], exact[:300], [Blend(0.005)], readings_per_poll=9)
    np.testing.assert_array_equal(chunked, blend_run(x[:300], exact[:300], [Blend(0.005)])[0])


def test_experts_need_a_table_that_holds_them():
    table = DeviceTable(max_devices=2, window=4, n_features=1, num_layers=1, hidden_size=2,
                        with_experts=False)
    with pytest.raises(ValueError, match="with_experts"):
        run(table, ["a"], [0.0], [1.0], [[0.0, 0.0]], [[0.0, 0.0]], stages=[Experts(0.1)])


def test_every_stage_gives_the_same_forecasts_whatever_the_polls_a_backlog_comes_in():
    # A backlog of three devices with uneven runs (the experts prepare their readings' part for
    # a poll of several rounds at once, alerts and likelihood conclude once a poll): polls of
    # 37 readings give what one reading a poll gives.
    from stream_lstm import alerts

    rng = np.random.default_rng(11)
    n = 600
    ids = [["a", "b", "c"][i] for i in rng.choice(3, n, p=[0.5, 0.3, 0.2])]
    x = 20 + np.sin(np.arange(n) / 7) + rng.normal(0, 0.2, n)
    x[450] += 15.0  # a spike: an alert opens
    mu, log_b = rng.normal(0, 0.1, (n, 3)), rng.normal(-1, 0.1, (n, 3))
    results = []
    for per_poll in (1, 37):
        table = DeviceTable(max_devices=4, window=4, n_features=1, num_layers=1, hidden_size=2)
        stages = [Blend(0.01), Experts(0.1), Calibration(0.05, 0.9, interval_quantile(0.9))]
        fcs, liks, events = [], [], []
        for s in range(0, n, per_poll):
            rows = slice(s, min(s + per_poll, n))
            b = ingest(table, ids[rows], [60.0 * i for i in range(s, rows.stop)], x[rows, None],
                       [0] * len(ids[rows]), now=0.0, target=0)
            fb = assemble(b, mu[rows][b.rows].astype(np.float32), log_b[rows][b.rows].astype(np.float32),
                          table, coverage=0.9, min_history=1, anomaly_warmup=1, stages=stages)
            ev = alerts.judge(b, fb, table, false_alarm_rate=1e-2, hold_s=600.0,
                              ts=60.0 * (s + b.rows))
            order = np.argsort(b.rows)  # back to reading order
            fcs.append(fb.forecast[order])
            liks.append(fb.anomaly_likelihood[order])
            events += [(s + int(b.rows[row]), kind) for row, kind, _ in ev]
        results.append((np.concatenate(fcs), np.concatenate(liks), sorted(events)))
    (f1, l1, e1), (f37, l37, e37) = results
    np.testing.assert_allclose(f37, f1, rtol=0, atol=1e-9)
    np.testing.assert_allclose(l37, l1, rtol=0, atol=1e-9)
    assert e37 == e1 and any(kind == "open" for _, kind in e1)
