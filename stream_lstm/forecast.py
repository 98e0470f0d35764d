"""Turn the engine's normalized output into forecasts in each device's units.

The model predicts, for each of H steps ahead, the *change* of the target channel from the
current reading, in normalized units, as a Gaussian ``N(mu, sigma^2)``. In the device's own
units the forecast is therefore ``x + scale * mu`` and its interval is
``x + scale * (mu -/+ q * sigma)``, where ``scale`` is the normalizer's standard deviation at
that reading and ``q`` the two-sided Gaussian quantile of the chosen coverage.

Each reading is also scored against the one-step forecast made for it at the previous
reading: ``anomaly_score = |x - forecast_1| / sigma_1``. A device's first readings after a
reset (or ever) are never flagged, since their hidden state is not yet informative.

>>> import numpy as np
>>> q = interval_quantile(0.9)
>>> round(q, 3)
1.645
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from stream_lstm.state.ingest import StepBatch
from stream_lstm.state.table import DeviceTable


def interval_quantile(coverage: float) -> float:
    """Gaussian quantile ``q`` such that ``mu +/- q*sigma`` covers ``coverage``."""
    return NormalDist().inv_cdf(0.5 + coverage / 2.0)


@dataclass
class ForecastBatch:
    """Per accepted reading (batch row order): forecasts in original units and scores."""

    forecast: np.ndarray  # [m, H]
    lower: np.ndarray  # [m, H]
    upper: np.ndarray  # [m, H]
    residual: np.ndarray  # [m]; NaN when there was no earlier forecast to compare with
    anomaly_score: np.ndarray  # [m]; NaN when not scored
    is_anomaly: np.ndarray  # [m] bool
    publish: np.ndarray  # [m] bool: past warm-up (min_history readings)


def assemble(
    batch: StepBatch,
    mu: np.ndarray,
    log_sigma: np.ndarray,
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
    mu, log_sigma
        The engine's output, ``[m, H]`` each.
    table
        Device state; its ``prev_mu``/``prev_sigma`` are updated for the next reading.
    coverage
        Nominal interval coverage, e.g. 0.9.
    min_history
        Readings a device needs before its forecasts are published.
    anomaly_threshold
        Score at or above which a reading is flagged.
    anomaly_warmup
        Readings after a reset that are never flagged.
    """
    scale = batch.scale_target[:, None]
    level = batch.x_target[:, None]
    sigma = np.exp(log_sigma.astype(np.float64)) * scale
    forecast = level + scale * mu
    q = interval_quantile(coverage)
    lower, upper = forecast - q * sigma, forecast + q * sigma

    # The one-step forecast each reading is judged against: made at the device's previous
    # reading, either earlier in this poll (prev_row) or in an earlier poll (table).
    has_prev_row = batch.prev_row >= 0
    prev_idx = np.maximum(batch.prev_row, 0)
    prev_mu = np.where(has_prev_row, forecast[prev_idx, 0], batch.prev_mu)
    prev_sigma = np.where(has_prev_row, sigma[prev_idx, 0], batch.prev_sigma)
    residual = np.where(batch.reset, np.nan, batch.x_target - prev_mu)
    with np.errstate(invalid="ignore", divide="ignore"):
        score = np.abs(residual) / prev_sigma
    score[batch.since_reset <= anomaly_warmup] = np.nan
    is_anomaly = np.nan_to_num(score, nan=0.0) >= anomaly_threshold

    # Rows are in round order, so a device's last reading of the poll is written last.
    table.prev_mu[batch.slots] = forecast[:, 0]
    table.prev_sigma[batch.slots] = sigma[:, 0]
    return ForecastBatch(
        forecast=forecast, lower=lower, upper=upper, residual=residual,
        anomaly_score=score, is_anomaly=is_anomaly, publish=batch.n_seen >= min_history,
    )
