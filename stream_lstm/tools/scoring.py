"""Forecast scores and simple baselines for evaluation: pure numpy, no Kafka.

Conventions
-----------
* Forecast arrays are **aligned with their targets**: ``yhat[t]`` is the forecast *of*
  ``y[t]`` (made ``k`` steps earlier), so a score is just ``mae(y, yhat)``.
* Pairs where any input is NaN (or infinite) are left out of a score, so a baseline's
  undefined start (NaN) or a model's warm-up does not need trimming by hand. In :func:`mase`
  the model and the persistence forecast are scored on the same pairs.
* Baselines take a 1-D history ``x`` and a horizon ``k >= 1`` and return an array as long as
  ``x``; positions with too little history are NaN.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path

import numpy as np


def _finite_pairs(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    arrays = tuple(np.asarray(a, np.float64) for a in arrays)
    shape = arrays[0].shape
    for a in arrays[1:]:
        if a.shape != shape:
            raise ValueError(f"arrays are not aligned: shapes {shape} and {a.shape}")
    keep = np.logical_and.reduce([np.isfinite(a) for a in arrays])
    return tuple(a[keep] for a in arrays)


def mae(y, yhat) -> float:
    """Mean absolute error; NaN when no pair is finite.

    Parameters
    ----------
    y
        Targets.
    yhat
        Forecasts aligned with ``y``.

    Examples
    --------
    >>> mae([1.0, 2.0, 3.0], [2.0, 2.0, 1.0])
    1.0
    >>> mae([1.0, 2.0, float("nan")], [1.5, 3.0, 0.0])     # the NaN pair is left out
    0.75
    """
    y, yhat = _finite_pairs(y, yhat)
    return float(np.mean(np.abs(y - yhat))) if y.size else math.nan


def mse(y, yhat) -> float:
    """Mean squared error (the metric of the ETTh1 reference table).

    Examples
    --------
    >>> mse([1.0, 2.0, 3.0], [2.0, 2.0, 1.0])
    1.6666666666666667
    """
    y, yhat = _finite_pairs(y, yhat)
    return float(np.mean((y - yhat) ** 2)) if y.size else math.nan


def rmse(y, yhat) -> float:
    """Root mean squared error.

    Examples
    --------
    >>> rmse([0.0, 0.0, 0.0, 0.0], [1.0, -1.0, 3.0, -3.0])
    2.23606797749979
    """
    return math.sqrt(mse(y, yhat))


def mase(y, yhat, y_naive) -> float:
    """Mean absolute scaled error against persistence, on the same targets.

    ``MAE(y, yhat) / MAE(y, y_naive)``, where ``y_naive`` is the persistence forecast for the
    same horizon (``persistence(x, k)``), scored on the pairs where all three are finite. Below 1
    the model beats "the last value"; persistence itself scores exactly 1. Unlike Hyndman's
    in-sample scaling, the denominator is the naive forecast's error on the *evaluated* targets,
    so the ratio is a direct head-to-head comparison. ``inf`` when persistence is perfect and the
    model is not.

    Parameters
    ----------
    y
        Targets.
    yhat
        The model's forecasts, aligned with ``y``.
    y_naive
        Persistence forecasts, aligned with ``y``.

    Examples
    --------
    >>> y = [1.0, 2.0, 4.0, 8.0]
    >>> naive = [float("nan"), 1.0, 2.0, 4.0]                 # persistence, k=1
    >>> mase(y, [0.0, 2.5, 3.5, 7.0], naive)                  # (0.5+0.5+1) / (1+2+4)
    0.2857142857142857
    >>> mase(y, naive, naive)
    1.0
    """
    y, yhat, y_naive = _finite_pairs(y, yhat, y_naive)
    if not y.size:
        return math.nan
    model_error = float(np.mean(np.abs(y - yhat)))
    naive_error = float(np.mean(np.abs(y - y_naive)))
    if naive_error == 0.0:
        return math.nan if model_error == 0.0 else math.inf
    return model_error / naive_error


def coverage(y, lower, upper) -> float:
    """Share of targets inside their interval ``[lower, upper]`` (bounds included).

    Compare with the nominal coverage (``STREAM_LSTM_INTERVAL_COVERAGE``, 0.9 by default).

    Examples
    --------
    >>> coverage([1.0, 2.0, 3.0, 4.0], [0.0, 2.0, 3.5, 0.0], [2.0, 3.0, 4.0, 3.0])
    0.5
    """
    y, lower, upper = _finite_pairs(y, lower, upper)
    return float(np.mean((lower <= y) & (y <= upper))) if y.size else math.nan


def _check_horizon(x, k: int) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.ndim != 1:
        raise ValueError(f"history must be 1-D, got shape {x.shape}")
    if k < 1:
        raise ValueError(f"horizon k must be >= 1, got {k}")
    return x


def persistence(x, k: int) -> np.ndarray:
    """Last-value forecast for horizon ``k``, aligned with ``x``: ``f[t] = x[t - k]``.

    Examples
    --------
    >>> persistence([1.0, 2.0, 4.0, 8.0], 2).tolist()
    [nan, nan, 1.0, 2.0]
    """
    x = _check_horizon(x, k)
    out = np.full_like(x, np.nan)
    if k < len(x):
        out[k:] = x[:-k]
    return out


def seasonal_naive(x, k: int, period: int) -> np.ndarray:
    """The value one season earlier, as known ``k`` steps ahead: ``f[t] = x[t - m * period]``.

    ``m = ceil(k / period)`` is the fewest whole seasons that reach back to data available
    when the forecast was made (``t - k``). ``period`` is in steps: a day is 288 five-minute
    steps or 24 hourly ones; a week is 2016 or 168.

    Examples
    --------
    >>> seasonal_naive([1.0, 2.0, 3.0, 1.1, 2.1, 3.1, 1.2], 1, 3).tolist()
    [nan, nan, nan, 1.0, 2.0, 3.0, 1.1]
    >>> seasonal_naive([1.0, 2.0, 3.0, 1.1, 2.1, 3.1, 1.2], 4, 3).tolist()    # two seasons back
    [nan, nan, nan, nan, nan, nan, 1.0]
    """
    x = _check_horizon(x, k)
    if period < 1:
        raise ValueError(f"period must be >= 1, got {period}")
    lag = period * math.ceil(k / period)
    return persistence(x, lag) if lag else x.copy()


def ewm_forecast(x, k: int, alpha: float) -> np.ndarray:
    """Exponentially weighted mean as the forecast for horizon ``k``: ``f[t] = s[t - k]``.

    ``s[0] = x[0]``, ``s[t] = alpha * x[t] + (1 - alpha) * s[t - 1]``; a NaN reading leaves
    the mean unchanged. ``alpha = 1`` is persistence.

    Examples
    --------
    >>> ewm_forecast([2.0, 4.0, 8.0, 0.0], 1, 0.5).tolist()
    [nan, 2.0, 3.0, 5.5]
    >>> np.array_equal(ewm_forecast([2.0, 4.0, 8.0], 1, 1.0), persistence([2.0, 4.0, 8.0], 1), equal_nan=True)
    True
    """
    x = _check_horizon(x, k)
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    level = np.full_like(x, np.nan)
    current = math.nan
    # A plain loop: the recursion is sequential, and 20k steps take a few milliseconds.
    for t, value in enumerate(x.tolist()):
        if math.isfinite(value):
            current = value if math.isnan(current) else alpha * value + (1.0 - alpha) * current
        level[t] = current
    return persistence(level, k)


def _parse_utc(text: str) -> float:
    parsed = datetime.fromisoformat(text.strip())
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()


def nab_windows(windows_json: str | Path, file_key: str) -> list[tuple[float, float]]:
    """NAB's labelled anomaly windows of one file, as ``(start_ts, end_ts)`` epoch seconds (UTC).

    Parameters
    ----------
    windows_json
        Path to NAB's ``combined_windows.json``.
    file_key
        The file's key, e.g. ``realKnownCause/machine_temperature_system_failure.csv``, or
        just its file name when that is unambiguous.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "combined_windows.json"
    >>> _ = p.write_text('{"realKnownCause/m.csv": [["2013-12-10 06:25:00.000000", "2013-12-10 07:25:00.000000"]]}')
    >>> nab_windows(p, "m.csv")
    [(1386656700.0, 1386660300.0)]
    """
    table = json.loads(Path(windows_json).read_text())
    if file_key not in table:
        matches = [key for key in table if Path(key).name == Path(file_key).name]
        if len(matches) != 1:
            raise KeyError(f"{file_key!r} is not a key of {windows_json} "
                           f"({'ambiguous: ' + ', '.join(matches) if matches else 'no such file'})")
        file_key = matches[0]
    return [(_parse_utc(start), _parse_utc(end)) for start, end in table[file_key]]


def top_k_in_windows(ts, scores, windows, k: int = 10) -> int:
    """How many of the ``k`` highest anomaly scores fall inside a labelled window.

    NaN scores are never among the top; ties keep the earlier reading. Windows include both
    ends.

    Parameters
    ----------
    ts
        Event times of the scored readings.
    scores
        Anomaly scores (higher = more anomalous), aligned with ``ts``.
    windows
        ``(start_ts, end_ts)`` pairs, e.g. from :func:`nab_windows`.
    k
        How many top scores to check.

    Examples
    --------
    >>> top_k_in_windows([0, 1, 2, 3, 4], [0.1, 5.0, 0.2, 4.0, float("nan")], [(1, 2)], k=2)
    1
    """
    ts = np.asarray(ts, np.float64)
    scores = np.asarray(scores, np.float64)
    if ts.shape != scores.shape:
        raise ValueError(f"ts and scores are not aligned: {ts.shape} and {scores.shape}")
    finite = np.flatnonzero(np.isfinite(scores))
    top = finite[np.argsort(-scores[finite], kind="stable")[:k]]
    inside = np.zeros(len(top), bool)
    for start, end in windows:
        inside |= (ts[top] >= start) & (ts[top] <= end)
    return int(inside.sum())
