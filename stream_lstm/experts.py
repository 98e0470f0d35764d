"""Per-device experts for the one-step forecast, and their online combination.

One fleet model cannot know every device's own habits: a 5-reading cycle on one server, noise
around a flat level on another, a burst of disk writes that always ramps up the same way on a
third. Each device therefore keeps five *experts* for its next reading and mixes them by how
well each has done **on that device**:

``model``
    the fleet model's forecast (after the per-device blend with persistence, forecast.py);
``ar``
    a per-device linear model of the next change, on the model's change, the distance to the
    normalizer's mean, to the median of the last readings, and the last 15 changes (a local
    autoregression). It is fitted by recursive least squares with forgetting and Huber
    weights, so it follows slow change and a spike does not drag it (S. Haykin, *Adaptive
    Filter Theory*, ch. 10; P. J. Huber, *Robust Statistics*, 1981);
``median``
    the median of the device's last 16 readings: what a noisy but level series is best
    forecast by;
``last``
    the last reading (persistence);
``analog``
    the method of analogues: find the :data:`N_NEIGHBOURS` places in the device's last
    :data:`N_HISTORY` readings whose :data:`PATTERN` readings look most like the latest ones,
    and forecast the median of what followed them (E. N. Lorenz, "Atmospheric predictability as
    revealed by naturally occurring analogues", 1969; a k-nearest-neighbour forecast). It is
    what learns a device's repeating shapes, such as bursts, that no linear expert can.

The published one-step forecast is the weighted mean of the four, with weights from the
exponentially weighted forecaster on the absolute error in normalized units, plus a small
fixed share so a device can move to another expert when its behaviour changes (N.
Cesa-Bianchi & G. Lugosi, *Prediction, Learning, and Games*, 2006, ch. 2; M. Herbster & M.
Warmuth, "Tracking the best expert", 1998)::

    log_w_k <- log_w_k - rate * |x - expert_k| / scale

Its loss is then close to that of the best expert on each device, whichever that is. On the
19 NAB recordings, through the real pipeline, the first four took the one-step forecasts from
beating deep-river's online LSTM on 8 recordings to 12, and the analogues took them further
(docs/evaluation.md).

All of a device's expert state is one float64 vector of :data:`STATE_SIZE` values (2.8 KB,
the history float32: state/expert_state.py), held in the device
table. It moves with the device in its snapshot as it is in memory (:func:`pack`).

>>> import numpy as np
>>> state = init_state(1)
>>> x = np.array([10.0]); mean = np.array([10.0]); scale = np.array([1.0])
>>> out = step(state, np.array([True]), x, mean, scale, np.array([0.0]), x.copy(), rate=0.1)
>>> out.tolist()    # nothing learnt yet: every expert says 10
[10.0]
>>> state.shape == (1, STATE_SIZE)
True
"""

from __future__ import annotations

import numpy as np

from stream_lstm.state.expert_state import (
    _E_PREV,
    _F_PREV,
    _LOG_W,
    _P,
    _S_PREV,
    _W,
    EXPERTS,
    N_FEATURES,
    N_HISTORY,
    N_LAGS,
    PACKED_SIZE,
    STATE_SIZE,
    history,
    init_state,
    pack,
    push_history,
    reference,
    referenced,
    rls_matrix,
    rls_upper,
    unpack,
)

# The state's layout lives with the state (state/expert_state.py); it is part of this API.
__all__ = [
    "EXPERTS", "N_HISTORY", "N_LAGS", "N_FEATURES", "STATE_SIZE", "PACKED_SIZE", "init_state",
    "history", "pack", "unpack", "PATTERN", "N_NEIGHBOURS", "FORGETTING", "HUBER", "SHARE",
    "previous", "weights", "leaders", "step", "prepare",
]

PATTERN = 4  # readings compared when looking for analogues
N_NEIGHBOURS = 3  # analogues whose successors are pooled (by their median)
# Measured on the NAB recordings (docs/evaluation.md): forgetting 0.998 (a memory of about 500
# readings), Huber cut 0.3 (normalized units) and share 0.001.
FORGETTING = 0.998
HUBER = 0.3
SHARE = 0.001
_P_TRACE_MAX = 1e4  # without fresh information, forgetting would grow P without bound
_FEATURE_MAX = 50.0  # a near-zero scale must not produce huge features


def previous(state: np.ndarray, expert: str) -> np.ndarray:
    """Each row's last forecast by ``expert`` (NaN if none yet)."""
    return state[:, _E_PREV.start + EXPERTS.index(expert)]


def weights(state: np.ndarray) -> np.ndarray:
    """``[n, len(EXPERTS)]``: each device's current mixing weights (rows sum to 1)."""
    return _normalized(state[:, _LOG_W])


def leaders(state: np.ndarray, rows: list[int] | None = None) -> np.ndarray:
    """``[len(EXPERTS)]``: how many of ``rows`` (default all) weigh each expert most (ties,
    such as a device that has learnt nothing yet, go to the first: the model). Only the
    weight columns of those rows are read, not copies of whole rows."""
    log_w = state[:, _LOG_W] if rows is None else state[np.asarray(rows, np.int64), _LOG_W]
    return np.bincount(_normalized(log_w).argmax(axis=1), minlength=len(EXPERTS))


def _normalized(log_w: np.ndarray) -> np.ndarray:
    w = np.exp(log_w - log_w.max(axis=1, keepdims=True))  # shifted: no overflow
    return w / w.sum(axis=1, keepdims=True)


def step(
    state: np.ndarray,
    learn: np.ndarray,
    x: np.ndarray,
    mean: np.ndarray,
    scale: np.ndarray,
    model_change: np.ndarray,
    model_forecast: np.ndarray,
    *,
    rate: float,
    prepared: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Learn from readings ``x`` and forecast the next one, for one reading per row.

    Parameters
    ----------
    state
        ``[m, STATE_SIZE]``, one row per device, updated in place.
    learn
        ``[m]``: rows whose reading may be learnt from (False right after a gap reset: the
        change across a gap is not a one-step change).
    x, mean, scale
        The reading (target channel, device units) and the normalizer's mean and scale there.
    model_change
        The model's one-step change, normalized (a feature of the ``ar`` expert).
    model_forecast
        The ``model`` expert's forecast of the next reading, device units.
    rate
        Step of the expert weights.
    prepared
        This round's rows of :func:`prepare` for the poll, if computed (else computed here).
    """
    learn = learn & np.isfinite(state[:, _S_PREV]) & np.isfinite(x)
    if learn.any():
        _learn(state, learn, x, rate)
    # The new reading joins the history (a shift register, newest last).
    push_history(state, x)
    analog, median, feats = _from_readings(history(state), reference(state), x, mean, scale, model_change) \
        if prepared is None else prepared
    ar = x + scale * np.einsum("mf,mf->m", feats, state[:, _W])
    experts = np.stack([model_forecast, ar, median, x, analog], axis=1)
    # An expert that cannot forecast (NaN) counts as the last reading.
    experts = np.where(np.isfinite(experts), experts, x[:, None])
    state[:, _F_PREV], state[:, _E_PREV], state[:, _S_PREV] = feats, experts, scale
    return np.einsum("mk,mk->m", weights(state), experts)


def prepare(state: np.ndarray, slots: np.ndarray, x: np.ndarray, mean: np.ndarray, scale: np.ndarray,
            model_change: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What :func:`step` computes from the readings alone (the analog and median forecasts and
    the ``ar`` expert's features), for many readings of each device at once: ``slots`` ``[n]``
    (a device's rows in reading order, as a poll's rounds hold them; ``state`` its rows in the
    table, before the first), the rest as :func:`step` takes them. Pass each round's rows of
    the result to :func:`step` as ``prepared``: the same numbers as without.

    >>> state = init_state(1)
    >>> x = np.array([1.0, 2.0, 3.0]); ones = np.ones(3)
    >>> analog, median, feats = prepare(state, np.zeros(3, np.int64), x, ones, ones, np.zeros(3))
    >>> median.tolist(), analog.tolist()  # a new device: mostly its latest reading; no analogues yet
    ([1.0, 2.0, 3.0], [nan, nan, nan])
    """
    n = len(x)
    order = np.argsort(slots, kind="stable")
    by_device = slots[order]
    first = np.ones(n, bool)
    first[1:] = by_device[1:] != by_device[:-1]
    starts = np.flatnonzero(first)
    device = np.cumsum(first) - 1
    k = np.arange(n) - starts[device]  # each row's place among its device's readings
    counts = np.diff(np.append(starts, n))
    # One block a device: its history before the poll, then its readings of the poll; the
    # history at its k-th reading is the N_HISTORY values ending with that reading.
    block = np.concatenate([[0], np.cumsum(N_HISTORY + counts)])
    buf = np.empty(int(block[-1]), np.float32)
    before = state[by_device[starts]]
    buf[block[:-1, None] + np.arange(N_HISTORY)] = history(before)
    # Each device's reference: its own, or (a new device) its first finite reading of the poll.
    xs = x[order]
    first_finite = np.minimum.reduceat(np.where(np.isfinite(xs), np.arange(n), n), starts)
    ref = referenced(before, xs[np.minimum(first_finite, n - 1)])
    ref = np.where(np.isnan(reference(before)) & (first_finite >= starts + counts), np.nan, ref)[device]
    at = block[device] + k
    buf[at + N_HISTORY] = xs - ref  # (float32: as push_history stores them)
    readings = np.empty((n, N_HISTORY), np.float32)
    readings[order] = np.lib.stride_tricks.sliding_window_view(buf, N_HISTORY)[at + 1]
    refs = np.empty(n)
    refs[order] = ref
    return _from_readings(readings, refs, x, mean, scale, model_change)


def _from_readings(readings: np.ndarray, ref: np.ndarray, x: np.ndarray, mean: np.ndarray, scale: np.ndarray,
                   model_change: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The analog and median forecasts and the ``ar`` features, from each row's history
    (``readings`` less ``ref``, ending with ``x``'s)."""
    analog = _analog(readings) + ref
    lags = readings[:, N_HISTORY - N_LAGS :].astype(np.float64) + ref[:, None]
    lags = np.where(np.isnan(lags), x[:, None], lags)
    median = np.median(lags, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        feats = np.concatenate([
            model_change[:, None], ((mean - x) / scale)[:, None], ((median - x) / scale)[:, None],
            (lags[:, :-1] - x[:, None]) / scale[:, None]], axis=1)
    return analog, median, np.clip(np.nan_to_num(feats), -_FEATURE_MAX, _FEATURE_MAX)


def _learn(state: np.ndarray, rows: np.ndarray, x: np.ndarray, rate: float) -> None:
    """What the readings ``x[rows]`` say about the forecasts made at the previous ones."""
    every = bool(rows.all())  # the usual case: work on the state itself, not on a copy of it
    s = state if every else state[rows]
    x = x if every else x[rows]
    scale = s[:, _S_PREV]
    # Expert weights: the exponentially weighted forecaster, then a fixed share.
    loss = np.abs(x[:, None] - s[:, _E_PREV]) / scale[:, None]
    w = _normalized(s[:, _LOG_W] - rate * np.nan_to_num(loss, nan=0.0))
    s[:, _LOG_W] = np.log((1.0 - SHARE) * w + SHARE / len(EXPERTS))
    # The ar expert: one step of recursive least squares with forgetting and Huber weights.
    f = s[:, _F_PREV]
    p = rls_matrix(s)
    target = (x - (history(s)[:, -1] + reference(s))) / scale  # the change, in the last forecast's units
    err = target - np.einsum("mf,mf->m", f, s[:, _W])
    huber = np.minimum(1.0, HUBER / np.maximum(np.abs(err), 1e-12))
    pf = np.einsum("mij,mj->mi", p, f)
    c = huber / (FORGETTING + huber * np.einsum("mf,mf->m", f, pf))
    new_w = s[:, _W] + (c * err)[:, None] * pf
    # P <- (P - c pf pf') / forgetting. pf_i * pf_j is the same number as pf_j * pf_i, so P stays
    # exactly symmetric without a symmetrizing pass, and a finite trace means a finite P (no
    # |pf_i pf_j| exceeds the larger of pf_i^2 and pf_j^2).
    new_p = pf[:, :, None] * pf[:, None, :]
    new_p *= -c[:, None, None]
    new_p += p
    trace = np.trace(new_p, axis1=1, axis2=2) / FORGETTING
    new_p *= (np.minimum(1.0, _P_TRACE_MAX / np.maximum(trace, 1e-12)) / FORGETTING)[:, None, None]
    ok = np.isfinite(new_w).all(axis=1) & np.isfinite(trace)
    if ok.all():
        s[:, _W], s[:, _P] = new_w, rls_upper(new_p)
    else:
        s[ok, _W] = new_w[ok]
        s[ok, _P] = rls_upper(new_p[ok])
    if not every:
        state[rows] = s


def _analog(history: np.ndarray) -> np.ndarray:
    """The analog forecast for each row of ``history`` (float32 ``[m, N_HISTORY]``, newest last): the
    median of the readings that followed the :data:`N_NEIGHBOURS` patterns nearest (in L1) to
    the latest one; NaN while fewer than that many patterns have been seen."""
    out = np.empty(len(history))
    for start in range(0, len(history), _ROWS_PER_CHUNK):  # bounds the [rows, windows] buffers
        out[start : start + _ROWS_PER_CHUNK] = _analog_chunk(history[start : start + _ROWS_PER_CHUNK])
    return out


_ROWS_PER_CHUNK = 1024  # [1024, 252] float32 buffers stay in cache: 2x faster than 4096
# Ties (a flat signal has many equal patterns) go to the most recent pattern, where a device's
# behaviour is likeliest to be the current one.
_N_WINDOWS = N_HISTORY - PATTERN  # windows with a successor still in the history
_RECENCY = np.arange(_N_WINDOWS, 0, -1, dtype=np.float32) * np.float32(1e-9)


def _analog_chunk(history: np.ndarray) -> np.ndarray:
    # float32 distances (as the history is): they only rank the windows, and it halves the
    # memory traffic of the costliest part of the experts (measured: 54 -> 28 ms, 10k devices).
    latest = history[:, N_HISTORY - PATTERN :]
    # Window j is history[j : j+PATTERN], followed by history[j+PATTERN]; summing the shifted
    # differences avoids a [rows, windows, PATTERN] array.
    dist = np.abs(history[:, :_N_WINDOWS] - latest[:, :1])
    diff = np.empty_like(dist)
    for i in range(1, PATTERN):
        np.subtract(history[:, i : i + _N_WINDOWS], latest[:, i : i + 1], out=diff)
        dist += np.abs(diff, out=diff)
    dist[np.isnan(dist)] = np.inf  # windows not yet seen
    dist += _RECENCY * (1.0 + np.nanmax(np.abs(latest), axis=1, initial=0.0))[:, None]
    nearest = np.argpartition(dist, N_NEIGHBOURS - 1, axis=1)[:, :N_NEIGHBOURS]
    successors = np.take_along_axis(history[:, PATTERN:], nearest, axis=1)
    seen = np.isfinite(np.take_along_axis(dist, nearest, axis=1))
    return np.median(np.where(seen, successors, np.nan), axis=1)
