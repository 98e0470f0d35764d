"""Online per-channel normalization for many devices at once.

Every device keeps, per channel, a running mean and (population) variance. A reading first
updates its device's statistics, then it is scaled with the updated ones::

    n     <- n + 1
    a     <- 1 / n                      (Welford)   or   max(alpha, 1 / n)   (EWM)
    delta <- x - mean
    mean  <- mean + a * delta
    var   <- (1 - a) * (var + a * delta**2)
    z     <- (x - mean) / max(sqrt(var), std_floor)

With ``a = 1/n`` this is Welford's algorithm (B. P. Welford, "Note on a method for
calculating corrected sums of squares and products", Technometrics 4(3), 1962; Knuth, TAOCP
vol. 2, §4.2.2), written in its variance form: it equals the population variance of all
readings so far, without the cancellation of the textbook sum-of-squares formula. With a
fixed ``a = alpha`` it is the exponentially weighted mean and variance of T. Finch,
"Incremental calculation of weighted mean and variance" (2009), which follows drift; using
``max(alpha, 1/n)`` makes the first ``1/alpha`` readings plain Welford so a new device does not
start biased towards its first value.

The statistics are float64 and vectorised over *slots* (rows), so one call updates a whole
batch of devices. The same code normalizes a single offline sequence (:func:`normalize_sequence`),
which is how training and the continuity test reproduce serving exactly.
"""

from __future__ import annotations

import numpy as np


class OnlineNormalizer:
    """Running mean/variance per (slot, channel), Welford or exponentially weighted.

    Parameters
    ----------
    capacity
        Number of slots (devices) to hold; see :meth:`grow`.
    n_features
        Channels per reading.
    kind
        ``"welford"`` (all history weighs the same) or ``"ewm"`` (recent readings weigh more).
    alpha
        EWM weight of a new reading; ignored for Welford.
    std_floor
        Smallest scale used, so a flat channel does not divide by zero.

    Examples
    --------
    >>> import numpy as np
    >>> norm = OnlineNormalizer(capacity=2, n_features=1)
    >>> for v in [1.0, 2.0, 3.0]:
    ...     z, mean, scale = norm.update(np.array([0]), np.array([[v]]))
    >>> float(norm.mean[0, 0]), round(float(norm.var[0, 0]), 6)     # mean and population var
    (2.0, 0.666667)
    >>> round(float(z[0, 0]), 4)                                        # (3 - 2) / sqrt(2/3)
    1.2247
    """

    def __init__(
        self,
        capacity: int,
        n_features: int,
        kind: str = "welford",
        alpha: float = 0.01,
        std_floor: float = 1e-3,
    ) -> None:
        if kind not in ("welford", "ewm"):
            raise ValueError(f"unknown normalizer kind {kind!r}")
        self.kind = kind
        self.alpha = alpha
        self.std_floor = std_floor
        self.count = np.zeros(capacity, np.float64)
        self.mean = np.zeros((capacity, n_features), np.float64)
        self.var = np.zeros((capacity, n_features), np.float64)

    def grow(self, capacity: int) -> None:
        """Make room for ``capacity`` slots, keeping the existing statistics."""
        extra = capacity - len(self.count)
        if extra > 0:
            self.count = np.concatenate([self.count, np.zeros(extra)])
            self.mean = np.concatenate([self.mean, np.zeros((extra, self.mean.shape[1]))])
            self.var = np.concatenate([self.var, np.zeros((extra, self.var.shape[1]))])

    def reset(self, slots: np.ndarray) -> None:
        """Forget the statistics of ``slots`` (a device leaving or a new device)."""
        self.count[slots] = 0.0
        self.mean[slots] = 0.0
        self.var[slots] = 0.0

    def update(
        self, slots: np.ndarray, x: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Fold one reading per slot into the statistics and normalize it.

        ``slots`` must not repeat within one call (one reading per device per round).
        Returns ``(z float32 [n, F], mean float64 [n, F], scale float64 [n, F])``: the
        normalized readings and the statistics they were scaled with, which de-normalize the
        forecast made from them.
        """
        n = self.count[slots] + 1.0
        a = 1.0 / n if self.kind == "welford" else np.maximum(self.alpha, 1.0 / n)
        a = a[:, None]
        mean = self.mean[slots]
        delta = x - mean
        mean = mean + a * delta
        var = (1.0 - a) * (self.var[slots] + a * delta * delta)
        self.count[slots] = n
        self.mean[slots] = mean
        self.var[slots] = var
        scale = np.maximum(np.sqrt(var), self.std_floor)
        z = ((x - mean) / scale).astype(np.float32)
        return z, mean, scale


def normalize_sequence(
    x: np.ndarray, kind: str = "welford", alpha: float = 0.01, std_floor: float = 1e-3
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normalize one device's whole history ``x [T, F]`` exactly as serving does, step by step.

    Returns ``(z [T, F] float32, mean [T, F], scale [T, F])``.

    >>> z, mean, scale = normalize_sequence(np.array([[1.0], [2.0], [3.0]]))
    >>> [round(float(v), 4) for v in z[:, 0]]
    [0.0, 1.0, 1.2247]
    """
    x = np.asarray(x, np.float64)
    norm = OnlineNormalizer(1, x.shape[1], kind, alpha, std_floor)
    slot = np.zeros(1, np.int64)
    out = [norm.update(slot, x[t : t + 1]) for t in range(len(x))]
    return (
        np.concatenate([o[0] for o in out]),
        np.concatenate([o[1] for o in out]),
        np.concatenate([o[2] for o in out]),
    )
