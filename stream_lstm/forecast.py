"""Turn the engine's normalized output into forecasts in each device's units.

The model predicts, for each of H steps ahead, the *change* of the target channel from the
current reading, in normalized units, as a Laplace distribution with location ``mu`` and
scale ``b``. In the device's own units the forecast is therefore ``x + scale * mu`` and its
interval is ``x + scale * (mu -/+ q * b)``, where ``scale`` is the normalizer's standard
deviation at that reading and ``q = ln(1 / (1 - coverage))`` the two-sided Laplace quantile
of the chosen coverage (``P(|Y - mu| > q b) = exp(-q)``).

Each reading is also scored against the one-step forecast made for it at the previous
reading: ``anomaly_score = |x - forecast_1| / b_1`` (both in the device's units). Under the
model a score of at least ``s`` has probability ``exp(-s)``: 4.6 is one reading in 100,
6.9 one in 1,000.

A one-step forecast follows a slow departure (a machine cooling over hours) step by step, so
its residuals stay small. Each reading is therefore also scored against the forecast made
for it H readings earlier: ``drift_score = |x - forecast_H| / b_H``, which grows with a
sustained departure. On NAB's machine-temperature recording the drift score puts all ten of
its highest values inside the labelled failure windows, the one-step score two
(docs/evaluation.md). A reading is flagged when either score reaches the threshold. A
device's first readings after a reset (or ever) are never flagged, since their hidden state
is not yet informative, and the drift score waits H readings more.

>>> q = interval_quantile(0.9)
>>> round(q, 3)
2.303
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

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
    anomaly_score: np.ndarray  # [m]; NaN when not scored
    expected_b: np.ndarray  # [m]: scale b of the one-step forecast scored against
    drift_score: np.ndarray  # [m]; NaN when not scored
    drift_expected: np.ndarray  # [m]: the forecast made H readings earlier
    drift_b: np.ndarray  # [m]: its scale b
    is_anomaly: np.ndarray  # [m] bool
    publish: np.ndarray  # [m] bool: past warm-up (min_history readings)


def assemble(
    batch: StepBatch,
    mu: np.ndarray,
    log_b: np.ndarray,
    table: DeviceTable,
    *,
    coverage: float,
    min_history: int,
    anomaly_threshold: float,
    anomaly_warmup: int,
) -> ForecastBatch:
    """De-normalize, add intervals, score anomalies; remember each device's next-step forecast.

    Parameters
    ----------
    batch
        The batch the engine just stepped.
    mu, log_b
        The engine's output, ``[m, H]`` each.
    table
        Device state; its ``prev_mu``/``prev_sigma`` (the one-step location and scale ``b``) are updated for the next reading.
    coverage
        Nominal interval coverage, e.g. 0.9.
    min_history
        Readings a device needs before its forecasts are published.
    anomaly_threshold
        Score at or above which a reading is flagged.
    anomaly_warmup
        Readings after a reset that are never flagged.
    """
    table.ensure_horizon(mu.shape[1])
    scale = batch.scale_target[:, None]
    level = batch.x_target[:, None]
    b = np.exp(log_b.astype(np.float64)) * scale
    forecast = level + scale * mu
    q = interval_quantile(coverage)
    lower, upper = forecast - q * b, forecast + q * b

    # The one-step forecast each reading is judged against: made at the device's previous
    # reading, either earlier in this poll (prev_row) or in an earlier poll (table).
    has_prev_row = batch.prev_row >= 0
    prev_idx = np.maximum(batch.prev_row, 0)
    prev_mu = np.where(has_prev_row, forecast[prev_idx, 0], batch.prev_mu)
    prev_b = np.where(has_prev_row, b[prev_idx, 0], batch.prev_sigma)
    residual = np.where(batch.reset, np.nan, batch.x_target - prev_mu)
    with np.errstate(invalid="ignore", divide="ignore"):
        score = np.abs(residual) / prev_b
    score[batch.since_reset <= anomaly_warmup] = np.nan
    drift, drift_expected, drift_b = _drift_scores(batch, forecast[:, -1], b[:, -1], table)
    # The H-step forecast compared with must itself come after the warm-up: the first
    # readings' scale is degenerate (one reading has no spread), so their b is tiny.
    drift[batch.since_reset <= anomaly_warmup + mu.shape[1]] = np.nan
    is_anomaly = np.nan_to_num(np.fmax(score, drift), nan=0.0) >= anomaly_threshold

    # Rows are in round order, so a device's last reading of the poll is written last.
    table.prev_mu[batch.slots] = forecast[:, 0]
    table.prev_sigma[batch.slots] = b[:, 0]
    return ForecastBatch(
        forecast=forecast, lower=lower, upper=upper, residual=residual,
        anomaly_score=score, expected_b=prev_b, drift_score=drift, drift_expected=drift_expected,
        drift_b=drift_b, is_anomaly=is_anomaly, publish=batch.n_seen >= min_history,
    )


def _drift_scores(batch: StepBatch, forecast_h: np.ndarray, b_h: np.ndarray, table: DeviceTable
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(drift_score, expected, b)`` per row: each reading against the H-step forecast made
    H readings earlier, from the device's ring; then this reading's H-step forecast replaces it.

    The ring slot of a device's n-th reading is ``n % H``: the slot written H readings ago.
    Rounds go in order, so a device with several readings in this poll reads what its
    earlier ones wrote.
    """
    m = len(batch)
    score, expected, b = np.full(m, np.nan), np.full(m, np.nan), np.full(m, np.nan)
    if m == 0:
        return score, expected, b
    horizon = table.drift_mu.shape[1]
    pos = batch.n_seen % horizon
    for start, end in batch.rounds:
        slots, p = batch.slots[start:end], pos[start:end]
        expected[start:end] = table.drift_mu[slots, p]
        b[start:end] = table.drift_b[slots, p]
        table.drift_mu[slots, p] = forecast_h[start:end]
        table.drift_b[slots, p] = b_h[start:end]
    # Only entries written since the last reset count (the reset reading has since_reset 1).
    fresh = batch.since_reset > horizon
    expected[~fresh] = np.nan
    with np.errstate(invalid="ignore", divide="ignore"):
        score = np.abs(batch.x_target - expected) / b
    return score, expected, b
