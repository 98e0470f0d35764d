"""Sequential online normalization of one recording, exactly as serving does it.

Serving sees one reading at a time per device. For each channel it first folds the reading
into running statistics, then scales the reading with the *updated* statistics. Training must
feed the model the very same numbers, so this module replays that recursion step by step over
a whole recording ``x[T, F]`` (it is *not* a batch z-score: ``z[t]`` only depends on
``x[0..t]``).

The recursion, per channel, in float64, for the n-th reading ``x`` (n = 1, 2, ...)::

    a     = 1 / n                         Welford
    a     = max(alpha, 1 / n)             EWM
    delta = x - mean                      (mean, var start at 0)
    mean  = mean + a * delta
    var   = (1 - a) * (var + a * delta * delta)
    std   = sqrt(var)
    z     = float32((x - mean) / max(std, std_floor))

**Welford** (B. P. Welford, "Note on a method for calculating corrected sums of squares and
products", Technometrics 4(3), 1962; D. Knuth, TAOCP vol. 2, 3rd ed., §4.2.2). The textbook
form keeps ``M2 += delta * (x - mean_new)`` and the population variance is ``var = M2 / n``;
dividing that update by ``n`` gives, algebraically, the line above with ``a = 1/n``, which is the form
used here (and in :mod:`stream_lstm.state.normalizer`), so ``var`` *is* ``M2 / n``, the
population variance (``ddof=0``) of the readings so far. With one reading ``var = 0``
exactly, so the first reading is scaled by ``std_floor`` (and gives ``z = 0``).

**EWM** (T. Finch, "Incremental calculation of weighted mean and variance", University of
Cambridge, 2009):
``mean += alpha * delta; var = (1 - alpha) * (var + alpha * delta**2)``: recent readings weigh
more, so the statistics follow drift. Using ``a = max(alpha, 1/n)`` makes the first
``1/alpha`` readings plain Welford, so a new device's statistics do not start biased towards
its first reading (a plain EWM started at ``mean = x0, var = 0`` would take ~``1/alpha``
readings to forget it).

The operations, their order and the float64 -> float32 cast are part of the contract:
:class:`stream_lstm.state.normalizer.OnlineNormalizer` (vectorised over devices) must give
the same bits, which ``tests/training/test_normalize.py`` checks.

>>> import numpy as np
>>> z, mean, std = running_normalize(np.array([[1.0], [2.0], [3.0]]))
>>> [round(float(v), 4) for v in z[:, 0]]      # 0, (2-1.5)/0.5, (3-2)/sqrt(2/3)
[0.0, 1.0, 1.2247]
>>> mean[:, 0].tolist(), std[:, 0].round(4).tolist()
([1.0, 1.5, 2.0], [0.0, 0.5, 0.8165])
"""

from __future__ import annotations

import numpy as np

KINDS = ("welford", "ewm")


def running_normalize(
    x: np.ndarray,
    kind: str = "welford",
    alpha: float = 0.01,
    std_floor: float = 1e-3,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normalize a recording ``x[T, F]`` step by step, as serving does.

    Parameters
    ----------
    x
        Readings in arrival order, ``[T, F]`` (a 1-d array is taken as one channel).
    kind
        ``"welford"`` (every reading weighs the same) or ``"ewm"`` (weight ``alpha`` on the
        newest reading once more than ``1/alpha`` readings were seen).
    alpha
        EWM weight of a new reading, in ``(0, 1]``; ignored by Welford.
    std_floor
        Smallest scale used, so a flat channel does not divide by zero.

    Returns
    -------
    ``(z, mean, std)``: ``z`` float32 ``[T, F]``, the normalized readings;
    ``mean`` and ``std`` float64 ``[T, F]``, the statistics *after* reading ``t`` (``std`` is
    not floored). A forecast made at ``t`` is de-normalized with
    ``x[t] + max(std[t], std_floor) * mu``.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown normalizer kind {kind!r} (expected one of {KINDS})")
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    if not std_floor > 0.0:
        raise ValueError(f"std_floor must be > 0, got {std_floor}")
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2:
        raise ValueError(f"x must be [T, F], got shape {x.shape}")
    t_len, n_features = x.shape
    z = np.empty((t_len, n_features), np.float32)
    means = np.empty((t_len, n_features), np.float64)
    stds = np.empty((t_len, n_features), np.float64)
    mean = np.zeros(n_features, np.float64)
    var = np.zeros(n_features, np.float64)
    n = 0.0
    for t in range(t_len):
        n += 1.0
        a = 1.0 / n if kind == "welford" else max(alpha, 1.0 / n)
        xt = x[t]
        delta = xt - mean
        mean = mean + a * delta
        var = (1.0 - a) * (var + a * delta * delta)
        std = np.sqrt(var)
        z[t] = ((xt - mean) / np.maximum(std, std_floor)).astype(np.float32)
        means[t] = mean
        stds[t] = std
    return z, means, stds
