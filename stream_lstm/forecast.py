"""Turn the engine's normalized output into forecasts in each device's units.

The model predicts, for each of H steps ahead, the *change* of the target channel from the
current reading, in normalized units, as a Laplace distribution with location ``mu`` and
scale ``b``. In the device's own units the forecast is therefore ``x + scale * mu`` and its
interval is ``x + scale * (mu -/+ q * b)``, where ``scale`` is the normalizer's standard
deviation at that reading and ``q = ln(1 / (1 - coverage))`` the two-sided Laplace quantile
of the chosen coverage (``P(|Y - mu| > q b) = exp(-q)``).

The fleet model's forecast is then corrected for each device by the stages of
``stages.py``, in order: the blend with persistence, the per-device experts, and the interval
calibration. Each owns the per-device state it learns.

Each reading is also scored against the one-step forecast made for it at the previous
reading: ``anomaly_score = |x - forecast_1| / b_1`` (both in the device's units). Under a
calibrated Laplace, a score of at least ``s`` has probability ``exp(-s)``: 4.6 is one reading
in 100, 6.9 one in 1,000.

A one-step forecast follows a slow departure (a machine cooling over hours) step by step, so
its residuals stay small. Each reading is therefore also scored against the forecast made
for it H readings earlier: ``drift_score = |x - forecast_H| / b_H``, which grows with a
sustained departure. On NAB's machine-temperature recording the drift score puts all ten of
its highest values inside the labelled failure windows, the one-step score two
(docs/evaluation.md). A device's first readings after a reset (or ever) are not scored,
since their hidden state is not yet informative, and the drift score waits H readings more.
Whether a reading is anomalous is judged from both scores against the device's own history
of them, in the next stage (alerts.judge, likelihood.py).

>>> q = interval_quantile(0.9)
>>> round(q, 3)
2.303
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from stream_lstm.stages import Round, Stage, stages_for
from stream_lstm.state.ingest import StepBatch
from stream_lstm.state.table import DeviceTable


def interval_quantile(coverage: float) -> float:
    """Laplace quantile ``q`` such that ``mu +/- q*b`` covers ``coverage``."""
    return math.log(1.0 / (1.0 - coverage))


@dataclass
class ForecastBatch:
    """Per accepted reading (batch row order): forecasts in original units and scores."""

    forecast: np.ndarray  # [m, H]
    lower: np.ndarray  # [m, H]
    upper: np.ndarray  # [m, H]
    residual: np.ndarray  # [m]; NaN when there was no earlier forecast to compare with
    forecast_scored: np.ndarray  # [m]: the one-step forecast it was compared with
    anomaly_score: np.ndarray  # [m]; NaN when not scored
    expected_b: np.ndarray  # [m]: scale b of the one-step forecast scored against
    drift_score: np.ndarray  # [m]; NaN when not scored
    drift_expected: np.ndarray  # [m]: the forecast made H readings earlier
    drift_b: np.ndarray  # [m]: its scale b
    publish: np.ndarray  # [m] bool: past warm-up (min_history readings)
    q: float  # the interval's quantile: a range is expected -/+ q * b
    # Filled in by the next stage (alerts.judge): [m] in [0, 1] (NaN when not judged), [m] bool.
    anomaly_likelihood: np.ndarray | None = None
    is_anomaly: np.ndarray | None = None

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
    adapt_rate: float = 0.0,
    blend_rate: float = 0.0,
    expert_rate: float = 0.0,
    stages: list[Stage] | None = None,
) -> ForecastBatch:
    """De-normalize, add intervals, score anomalies; remember what later readings need.

    Parameters
    ----------
    batch
        The batch the engine just stepped.
    mu, log_b
        The engine's output, ``[m, H]`` each.
    table
        Device state: the one-step forecast (``prev_mu``, ``prev_sigma``) and the ring of H-step
        forecasts are read and updated here, each stage's own columns by the stage.
    coverage
        Nominal interval coverage, e.g. 0.9.
    min_history
        Readings a device needs before its forecasts are published.
    anomaly_warmup
        Readings after a reset that are not scored (nor used to calibrate).
    adapt_rate, blend_rate, expert_rate
        Without ``stages``: the stages whose rate is above 0 run (:class:`~stream_lstm.stages.Blend`,
        :class:`~stream_lstm.stages.Experts`, :class:`~stream_lstm.stages.Calibration`).
    stages
        The stages to run, in order (the worker's come from ``STREAM_LSTM_FORECAST_STAGES``).
    """
    horizon = mu.shape[1]
    table.ensure_horizon(horizon)
    q = interval_quantile(coverage)
    if stages is None:  # the stages whose rate is given
        names = [n for n, rate in (("blend", blend_rate), ("experts", expert_rate),
                                   ("calibration", adapt_rate)) if rate]
        stages = stages_for(names, blend_rate=blend_rate, expert_rate=expert_rate,
                            adapt_rate=adapt_rate, coverage=coverage, q=q)
    change = batch.scale_target[:, None] * mu  # the model's change, in the device's units
    b_model = np.exp(log_b.astype(np.float64)) * batch.scale_target[:, None]
    forecast = np.empty_like(change)
    b = np.empty_like(b_model)
    m = len(batch)
    expected_1, b_1, expected_h, b_h = (np.full(m, np.nan) for _ in range(4))
    # Only forecasts made past the warm-up count: the first readings' scale is degenerate.
    scored_1 = ~batch.reset & (batch.since_reset > anomaly_warmup)
    scored_h = batch.since_reset > anomaly_warmup + horizon
    ring_pos = batch.n_seen % horizon  # the slot written H readings ago
    along = np.arange(horizon) / max(horizon - 1, 1)  # where each step lies between h=1 and h=H
    # Round by round: a device with several readings in this poll sees what its earlier ones
    # wrote, so the numbers do not depend on how readings were split into polls.
    for start, end in batch.rounds:
        rows, slots, pos = slice(start, end), batch.slots[start:end], ring_pos[start:end]
        x = batch.x_target[rows]
        expected_1[rows], b_1[rows] = table.prev_mu[slots], table.prev_sigma[slots]
        expected_h[rows], b_h[rows] = table.drift_mu[slots, pos], table.drift_b[slots, pos]
        r = Round(slots=slots, x=x, mean=batch.mean_target[rows], scale=batch.scale_target[rows],
                  mu=mu[rows], change=change[rows], along=along, pos=pos,
                  scored_1=scored_1[rows], scored_h=scored_h[rows],
                  expected_1=expected_1[rows], b_1=b_1[rows], expected_h=expected_h[rows],
                  b_h=b_h[rows], forecast=x[:, None] + change[rows], b=b_model[rows])
        for phase in ("recall", "learn", "predict"):
            for stage in stages:
                getattr(stage, phase)(r, table)
        forecast[rows], b[rows] = r.forecast, r.b
        # What the next readings are scored against, and the model's own change in it.
        table.prev_mu[slots], table.prev_sigma[slots] = forecast[rows, 0], b[rows, 0]
        table.drift_mu[slots, pos], table.drift_b[slots, pos] = forecast[rows, -1], b[rows, -1]
        table.prev_change[slots], table.drift_change[slots, pos] = mu[rows, 0], mu[rows, -1]

    residual = np.where(batch.reset, np.nan, batch.x_target - expected_1)
    with np.errstate(invalid="ignore", divide="ignore"):
        score = np.where(scored_1, np.abs(residual) / b_1, np.nan)
        drift = np.where(scored_h, np.abs(batch.x_target - expected_h) / b_h, np.nan)
    expected_h[~scored_h] = np.nan
    return ForecastBatch(
        forecast=forecast, lower=forecast - q * b, upper=forecast + q * b, residual=residual,
        forecast_scored=expected_1, anomaly_score=score, expected_b=b_1, drift_score=drift,
        drift_expected=expected_h, drift_b=b_h, publish=batch.n_seen >= min_history, q=q,
    )
