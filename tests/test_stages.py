"""The forecast's per-device corrections as stages (stages.py): each owns declared state, the
list follows the settings, an absent stage leaves the model's forecast, and a new correction
is one class."""

import numpy as np
import pytest
from pydantic import ValidationError

from stream_lstm.config import Settings
from stream_lstm.forecast import assemble
from stream_lstm.stages import Blend, Calibration, Experts, Round, Stage, stages_for
from stream_lstm.state.columns import COLUMNS
from stream_lstm.state.ingest import ingest
from stream_lstm.state.table import DeviceTable


def stepped(table, x, mu, log_b, **kw):
    batch = ingest(table, ["a"] * len(x), [float(i) for i in range(len(x))],
                   np.array(x, float)[:, None], [0] * len(x), now=0.0, target=0)
    return assemble(batch, np.array(mu, np.float32), np.array(log_b, np.float32), table,
                    coverage=0.9, min_history=1, anomaly_warmup=0, **kw)


def test_every_stage_owns_state_the_table_declares():
    declared = {c.name for c in COLUMNS} | {"experts"}
    for stage in (Blend(0.1), Experts(0.1), Calibration(0.1, 0.9, 2.3)):
        assert stage.columns and set(stage.columns) <= declared


def rates(s):
    return dict(blend_rate=s.blend_rate, expert_rate=s.expert_rate, adapt_rate=s.interval_adapt_rate,
                coverage=s.interval_coverage, q=2.3)


def test_the_stage_list_comes_from_the_settings():
    s = Settings()
    assert [type(x) for x in stages_for(s.stage_names, **rates(s))] == [Blend, Experts, Calibration]
    lstm_only = Settings(forecast_stages="")  # "LSTM only" is a shorter list, not zeroed rates
    assert stages_for(lstm_only.stage_names, **rates(lstm_only)) == []
    two = Settings(forecast_stages="blend, calibration")
    assert [type(x) for x in stages_for(two.stage_names, **rates(two))] == [Blend, Calibration]


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
