import numpy as np

from stream_lstm.forecast import assemble, interval_quantile
from stream_lstm.state.ingest import ingest
from stream_lstm.state.table import DeviceTable


def run(table, ids, ts, x, mu, log_sigma, **kw):
    b = ingest(table, ids, ts, np.array(x, float)[:, None], [0] * len(ids), now=0.0, target=0)
    opts = dict(coverage=0.9, min_history=2, anomaly_threshold=3.0, anomaly_warmup=1) | kw
    return b, assemble(b, np.array(mu, np.float32), np.array(log_sigma, np.float32), table, **opts)


def test_denormalizes_change_forecast_with_interval_and_scores_against_previous():
    table = DeviceTable(max_devices=4, window=4, n_features=1, num_layers=1, hidden_size=2)
    # readings 10, 12 -> mean 11, population std 1; mu=[0.5, 1] -> 12 + 1*[0.5, 1]
    b, fb = run(table, ["a", "a"], [1.0, 2.0], [10, 12], [[0, 0], [0.5, 1.0]],
                [[0, 0], [np.log(2.0), 0]])
    np.testing.assert_allclose(fb.forecast[1], [12.5, 13.0])
    q = interval_quantile(0.9)
    np.testing.assert_allclose(fb.lower[1], [12.5 - q * 2.0, 13.0 - q * 1.0])
    assert fb.publish.tolist() == [False, True]
    # next reading 20.5 vs one-step forecast 12.5 with sigma 2 (original units) -> score 4
    b, fb2 = run(table, ["a"], [3.0], [20.5], [[0, 0]], [[0, 0]])
    assert fb2.residual[0] == 8.0 and abs(fb2.anomaly_score[0] - 4.0) < 1e-6 and fb2.is_anomaly[0]


def test_first_readings_after_reset_are_never_flagged():
    table = DeviceTable(max_devices=4, window=4, n_features=1, num_layers=1, hidden_size=2)
    run(table, ["a"] * 3, [1.0, 2.0, 3.0], [1, 2, 3], np.zeros((3, 2)), np.full((3, 2), -5.0))
    _, fb = run(table, ["a"], [4.0], [100.0], [[0, 0]], [[-5, -5]], anomaly_warmup=5)
    assert np.isnan(fb.anomaly_score[0]) and not fb.is_anomaly[0]
    assert interval_quantile(0.5) < interval_quantile(0.9) < interval_quantile(0.99)
