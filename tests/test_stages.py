"""The forecast as stages (stages.py): each owns declared state, the list follows the
settings, an absent stage leaves the model's forecast, the scores always run, and a new
correction is one class."""

import numpy as np
import pytest
from pydantic import ValidationError

from stream_lstm.config import Settings, load_settings
from stream_lstm.forecast import assemble, interval_quantile
from stream_lstm.stages import (
    STAGES,
    Blend,
    Calibration,
    Experts,
    Round,
    Scores,
    Stage,
    example_round,
    stages_for,
)
from stream_lstm.state.columns import COLUMNS
from stream_lstm.state.ingest import ingest
from stream_lstm.state.table import DeviceTable


def stepped(table, x, mu, log_b, stages=()):
    batch = ingest(table, ["a"] * len(x), [float(i) for i in range(len(x))],
                   np.array(x, float)[:, None], [0] * len(x), now=0.0, target=0)
    return assemble(batch, np.array(mu, np.float32), np.array(log_b, np.float32), table,
                    coverage=0.9, min_history=1, anomaly_warmup=0, stages=list(stages))


def test_every_stage_owns_state_the_table_declares():
    declared = {c.name for c in COLUMNS} | {"experts"}
    for stage in (Blend(0.1), Experts(0.1), Calibration(0.1, 0.9, 2.3), Scores()):
        assert stage.columns and set(stage.columns) <= declared


def test_the_stage_list_comes_from_the_settings():
    s = Settings()
    assert [type(x) for x in stages_for(s, q=2.3)] == [Blend, Experts, Calibration]
    lstm_only = Settings(forecast_stages="")  # "LSTM only" is a shorter list, not zeroed rates
    assert stages_for(lstm_only, q=2.3) == []
    two = Settings(forecast_stages="blend, calibration")
    assert [type(x) for x in stages_for(two, q=2.3)] == [Blend, Calibration]


@pytest.mark.parametrize("bad", ["calibration,blend", "blend,blend", "blend,smoothing"])
def test_a_stage_list_out_of_order_repeated_or_unknown_is_refused(bad):
    with pytest.raises(ValidationError, match="name each of blend, experts, calibration at most once"):
        Settings(forecast_stages=bad)


def test_a_rate_of_zero_is_no_longer_an_off_switch():
    with pytest.raises(ValidationError, match="expert_rate"):
        Settings(expert_rate=0.0)


def test_without_stages_the_forecast_is_the_models():
    table = DeviceTable(4, 4, 1, 1, 2, with_experts=False)
    x = [10.0, 12.0, 11.0, 13.0]
    mu = [[0.5, 1.0]] * 4
    fb = stepped(table, x, mu, [[0.0, np.log(2.0)]] * 4)
    scale = np.std(x)  # the normalizer's population std at the last reading
    np.testing.assert_allclose(fb.forecast[-1], x[-1] + scale * np.array([0.5, 1.0]), rtol=1e-6)
    assert table.blend_w.tolist() == [[1.0, 1.0]] * table.capacity  # nothing learnt
    assert table.interval_log_m.tolist() == [[0.0, 0.0]] * table.capacity


class Offset(Stage):
    """A made-up correction: every forecast of a device moves by that device's offset."""

    columns = ("prev_change",)  # (any declared column; this one is only read)

    def __init__(self, by: float) -> None:
        self.by = by
        self.rounds = 0

    def predict(self, r: Round, table: DeviceTable) -> None:
        self.rounds += 1
        r.forecast = r.forecast + self.by


def test_a_new_correction_is_one_stage_class():
    plain, shifted = (DeviceTable(4, 4, 1, 1, 2, with_experts=False) for _ in range(2))
    x, mu, log_b = [1.0, 2.0, 4.0], [[0.1, 0.2]] * 3, [[0.0, 0.0]] * 3
    before = stepped(plain, x, mu, log_b)
    stage = Offset(5.0)
    after = stepped(shifted, x, mu, log_b, stages=[stage])
    assert stage.rounds == 3  # one reading a round: a device's readings in order
    np.testing.assert_allclose(after.forecast, before.forecast + 5.0)
    # What later readings are scored against is the corrected forecast.
    np.testing.assert_allclose(shifted.prev_mu[0], plain.prev_mu[0] + 5.0)


def test_scores_against_the_forecasts_made_for_the_reading_then_remember_the_new_one():
    table = DeviceTable(4, 4, 1, 1, 2, with_experts=False)
    table.ensure_horizon(2)
    slots = table.slots_for(["a", "b", "c"], [0, 0, 0], now=0.0)
    table.prev_mu[slots], table.prev_sigma[slots] = 10.0, 2.0  # the one-step forecast: 10, b=2
    table.drift_mu[slots, 1], table.drift_b[slots, 1] = 12.0, 3.0  # the H-step one: 12, b=3
    r = example_round(slots, x=18.0, expected_1=np.nan)
    r.x, r.pos = np.array([18.0, 18.0, 18.0]), np.array([1, 1, 1])
    r.scored_1, r.scored_h = np.array([True, True, False]), np.array([True, False, False])
    r.reset = np.array([False, False, True])
    r.forecast = np.array([[20.0, 21.0], [22.0, 23.0], [24.0, 25.0]])
    stage = Scores()
    stage.recall(r, table)
    stage.learn(r, table)
    nan = np.nan
    np.testing.assert_array_equal(r.residual, [8.0, 8.0, nan])  # NaN only at a reset
    np.testing.assert_array_equal(r.anomaly_score, [4.0, 4.0, nan])  # |18 - 10| / 2
    np.testing.assert_array_equal(r.drift_score, [2.0, nan, nan])  # |18 - 12| / 3
    np.testing.assert_array_equal(r.drift_expected, [12.0, nan, nan])
    stage.predict(r, table)  # what later readings are scored against: the forecast as published
    np.testing.assert_array_equal(table.prev_mu[slots], [20.0, 22.0, 24.0])
    np.testing.assert_array_equal(table.drift_mu[slots, 1], [21.0, 23.0, 25.0])


def test_an_empty_stage_list_gives_the_models_forecast_and_still_scores(monkeypatch):
    monkeypatch.setenv("STREAM_LSTM_FORECAST_STAGES", "")
    s = load_settings()
    assert stages_for(s, q=interval_quantile(s.interval_coverage)) == []
    table = DeviceTable(4, 4, 1, 1, 2, with_experts=False)
    x = [10.0, 12.0, 11.0, 14.0]
    fb = stepped(table, x, [[0.5, 1.0]] * 4, [[0.0, np.log(2.0)]] * 4,
                 stages_for(s, q=interval_quantile(s.interval_coverage)))
    scale = [np.std(x[: i + 1]) for i in range(4)]  # the normalizer's population std
    np.testing.assert_allclose(fb.forecast[2:], [[x[i] + 0.5 * scale[i], x[i] + scale[i]]
                                                for i in (2, 3)], rtol=1e-6)
    # Each reading against the model's one-step forecast made at the reading before ...
    np.testing.assert_allclose(fb.anomaly_score[2:], [abs(11.0 - 12.5) / 1.0,
                               abs(14.0 - (11.0 + 0.5 * scale[2])) / scale[2]], rtol=1e-6)
    # ... and against its H-step forecast (H = 2) made two readings before: 13, b = 2.
    assert fb.drift_score[3] == pytest.approx(abs(14.0 - 13.0) / 2.0)
    assert np.isnan(fb.anomaly_score[0]) and np.isnan(fb.drift_score[:2]).all()


@pytest.fixture
def smoothing():
    """A made-up optional stage, declared as a new one would be: one class."""

    class Smoothing(Stage):
        name = "smoothing"

        def __init__(self, rate: float) -> None:
            self.rate = rate

        @classmethod
        def from_settings(cls, settings, q):
            return cls(settings.blend_rate)

    yield Smoothing
    del STAGES["smoothing"]


def test_the_registry_and_the_allowed_order_come_from_the_stage_classes(smoothing):
    assert list(STAGES) == ["blend", "experts", "calibration", "smoothing"]
    assert Settings.model_fields["forecast_stages"].default == "blend,experts,calibration"
    s = Settings(forecast_stages="blend,calibration,smoothing")
    made = stages_for(s, q=2.3)
    assert [type(x) for x in made] == [Blend, Calibration, smoothing]
    assert made[-1].rate == s.blend_rate
    with pytest.raises(ValidationError, match="name each of blend, experts, calibration, "
                                              "smoothing at most once, in that order"):
        Settings(forecast_stages="smoothing,blend")


def test_two_stages_of_one_name_are_refused():
    with pytest.raises(ValueError, match="two stages named 'blend'"):
        type("AnotherBlend", (Stage,), {"name": "blend"})
    assert STAGES["blend"] is Blend


def test_the_calibration_factor_stays_bounded_through_a_flat_spell():
    # A forecast exactly right, reading after reading (a flat signal, persistence): every
    # covered reading shrinks the interval. Unbounded, 20,000 of them left widths of 1e-15
    # that covered nothing for ~2,000 readings of the noise that followed.
    from stream_lstm.stages import LOG_M_BOUND

    table = DeviceTable(4, 4, 1, 1, 2, with_experts=False)
    table.ensure_horizon(2)
    slots = table.slots_for(["flat"], [0], now=0.0)
    stage = Calibration(0.02, 0.9, 1.645)
    for _ in range(20_000):
        r = example_round(slots, x=5.0, expected_1=5.0)  # covered: |5 - 5| <= q b
        r.expected_h, r.b_h = r.expected_1, r.b_1
        r.scored_h = np.ones(1, bool)
        stage.learn(r, table)
    assert table.interval_log_m[slots].min() == pytest.approx(-LOG_M_BOUND)
    for _ in range(400):  # then misses: it recovers from the bound, not from -40
        r = example_round(slots, x=50.0, expected_1=5.0)
        r.expected_h, r.b_h, r.scored_h = r.expected_1, r.b_1, np.ones(1, bool)
        stage.learn(r, table)
    assert (table.interval_log_m[slots] > 0).all()
