"""Turn the engine's normalized output into forecasts in each device's units.

The model predicts, for each of H steps ahead, the *change* of the target channel from the
current reading, in normalized units, as a Laplace distribution with location ``mu`` and
scale ``b``. In the device's own units the forecast is therefore ``x + scale * mu`` and its
interval is ``x + scale * (mu -/+ q * b)``, where ``scale`` is the normalizer's standard
deviation at that reading and ``q = ln(1 / (1 - coverage))`` the two-sided Laplace quantile
of the chosen coverage (``P(|Y - mu| > q b) = exp(-q)``).

The fleet model's forecast is then shaped for each device by the stages of ``stages.py``,
in order: the corrections ``STREAM_LSTM_FORECAST_STAGES`` lists (the blend with persistence,
the per-device experts, the interval calibration), then, always, the scores
(:class:`~stream_lstm.stages.Scores`): each reading's anomaly score against the one-step
forecast made for it (``|x - forecast_1| / b_1``), and its drift score against the one made
H readings earlier (``|x - forecast_H| / b_H``). Each stage owns the per-device state it
learns or remembers. Whether a reading is anomalous is judged from both scores afterwards
(alerts.judge, likelihood.py).

>>> q = interval_quantile(0.9)
>>> round(q, 3)
2.303
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from stream_lstm.stages import Round, Scores, Stage
from stream_lstm.state.ingest import StepBatch
from stream_lstm.state.table import DeviceTable


def interval_quantile(coverage: float) -> float:
    """Laplace quantile ``q`` such that ``mu +/- q*b`` covers ``coverage``."""
    return math.log(1.0 / (1.0 - coverage))


@dataclass
class ForecastBatch:
    """Per accepted reading (batch row order): forecasts in original units and scores.

    Parameters
    ----------
    forecast, lower, upper
        ``[m, H]``: the forecast of each step ahead and its interval.
    residual, forecast_scored, anomaly_score, expected_b
        ``[m]``: the reading minus the one-step forecast made for it, that forecast, the
        score ``|residual| / b`` and that forecast's scale ``b`` (NaN where not scored).
    drift_score, drift_expected, drift_b
        ``[m]``: the same against the forecast made H readings earlier (NaN where not scored).
    publish
        ``[m]`` bool: past warm-up (``min_history`` readings).
    q
        The interval's quantile: a range is expected -/+ ``q * b``.
    anomaly_likelihood, is_anomaly, corroborated
        Filled in by the next stage (``alerts.judge``): ``[m]`` in [0, 1] (NaN when not
        judged), ``[m]`` bool, and ``[m]`` bool (a second view agrees: an alert may open on
        this reading alone).

    Examples
    --------
    With the model's change at zero the forecast is the last reading (persistence):

    >>> from stream_lstm.state.ingest import ingest
    >>> table = DeviceTable(max_devices=4, window=4, n_features=1, num_layers=1, hidden_size=2)
    >>> batch = ingest(table, ["a", "a"], [1.0, 2.0], np.array([[10.0], [11.0]]), [0, 0], 0.0, 0)
    >>> fb = assemble(batch, np.zeros((2, 2)), np.zeros((2, 2)), table, coverage=0.9,
    ...               min_history=1, anomaly_warmup=0, stages=[])
    >>> fb.forecast.tolist(), fb.residual.tolist(), fb.forecast_scored.tolist()
    ([[10.0, 10.0], [11.0, 11.0]], [nan, 1.0], [nan, 10.0])
    """

    forecast: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    residual: np.ndarray
    forecast_scored: np.ndarray
    anomaly_score: np.ndarray
    expected_b: np.ndarray
    drift_score: np.ndarray
    drift_expected: np.ndarray
    drift_b: np.ndarray
    publish: np.ndarray
    q: float
    anomaly_likelihood: np.ndarray | None = None
    is_anomaly: np.ndarray | None = None
    corroborated: np.ndarray | None = None

    def expected_range(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``[m]`` each: the one-step forecast's interval (low, high) that each reading was
        scored against, then the H-step one's (NaN where it was not scored)."""
        expected_1 = self.forecast_scored
        return (expected_1 - self.q * self.expected_b, expected_1 + self.q * self.expected_b,
                self.drift_expected - self.q * self.drift_b, self.drift_expected + self.q * self.drift_b)


def assemble(
    batch: StepBatch,
    mu: np.ndarray,
    log_b: np.ndarray,
    table: DeviceTable,
    *,
    coverage: float,
    min_history: int,
    anomaly_warmup: int,
    stages: list[Stage],
) -> ForecastBatch:
    """De-normalize, add intervals, run the stages (corrections, then the scores).

    Parameters
    ----------
    batch
        The batch the engine just stepped.
    mu, log_b
        The engine's output, ``[m, H]`` each.
    table
        Device state: each stage reads and updates its own columns.
    coverage
        Nominal interval coverage, e.g. 0.9.
    min_history
        Readings a device needs before its forecasts are published.
    anomaly_warmup
        Readings after a reset that are not scored (nor used to calibrate).
    stages
        The corrections to run, in order (``stages.stages_for``, from
        ``STREAM_LSTM_FORECAST_STAGES``; empty: the model's forecast alone).
        :class:`~stream_lstm.stages.Scores` runs after them.
    """
    horizon = mu.shape[1]
    table.ensure_horizon(horizon)
    q = interval_quantile(coverage)
    change = batch.scale_target[:, None] * mu  # the model's change, in the device's units
    b_model = np.exp(log_b.astype(np.float64)) * batch.scale_target[:, None]
    forecast, b = np.empty_like(change), np.empty_like(b_model)
    out = {name: np.full(len(batch), np.nan) for name in
           ("expected_1", "b_1", "b_h", "residual", "anomaly_score", "drift_score", "drift_expected")}
    # Only forecasts made past the warm-up count: the first readings' scale is degenerate.
    scored_1 = ~batch.reset & (batch.since_reset > anomaly_warmup)
    scored_h = batch.since_reset > anomaly_warmup + horizon
    ring_pos = batch.n_seen % horizon  # the slot written H readings ago
    along = np.arange(horizon) / max(horizon - 1, 1)  # where each step lies between h=1 and h=H
    pipeline = [*stages, Scores()]
    # Each stage's phases, in order (those it leaves to Stage, which do nothing, left out).
    phases = [getattr(stage, phase) for phase in ("recall", "learn", "predict") for stage in pipeline
              if getattr(type(stage), phase) is not getattr(Stage, phase)]
    prepared = {name: values for stage in pipeline for name, values in stage.prepare(batch, mu, table).items()}
    # Round by round: a device with several readings in this poll sees what its earlier ones
    # wrote, so the numbers do not depend on how readings were split into polls.
    for start, end in batch.rounds:
        rows = slice(start, end)
        x = batch.x_taken[rows]
        r = Round(slots=batch.slots[rows], x=x, actual=batch.x_target[rows], reset=batch.reset[rows], mean=batch.mean_target[rows],
                  scale=batch.scale_target[rows], mu=mu[rows], change=change[rows], along=along,
                  pos=ring_pos[rows], scored_1=scored_1[rows], scored_h=scored_h[rows],
                  forecast=x[:, None] + change[rows], b=b_model[rows],
                  prepared={name: values[rows] for name, values in prepared.items()})
        for run in phases:
            run(r, table)
        forecast[rows], b[rows] = r.forecast, r.b
        for name, values in out.items():
            values[rows] = getattr(r, name)
    return ForecastBatch(
        forecast=forecast, lower=forecast - q * b, upper=forecast + q * b, residual=out["residual"],
        forecast_scored=out["expected_1"], anomaly_score=out["anomaly_score"], expected_b=out["b_1"],
        drift_score=out["drift_score"], drift_expected=out["drift_expected"], drift_b=out["b_h"],
        publish=batch.n_seen >= min_history, q=q,
    )
