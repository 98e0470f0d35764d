"""The deep-river peer: an online LSTM per stream, as an optional baseline for evaluation.

The peer is what a user might run instead of this service: deep-river's
``deep_river.forecasting.LSTMForecaster`` [^1], a River [^2] time-series forecaster that keeps
one small LSTM per stream and updates it with one Adam step at every reading. For each reading
``x[t]`` it first forecasts ``x[t]`` from the last ``window`` readings (``forecast(horizon=1)``)
and only then learns from it (``learn_one(y)``): predict-then-learn, so every forecast is
out-of-sample.

Configuration, matching the published peer run: a window of 32 readings, one LSTM layer with
64 hidden units and a linear head, Adam at ``lr=1e-3``, MSE loss, gradient norm clipped at 1
(deep-river's default), one-step-ahead forecasts. Inputs are z-scored online with River's
``preprocessing.StandardScaler``, in River's pipeline order: each reading updates the running
mean and variance before it is scaled and learnt. Forecasts are made in z units and de-scaled
with the statistics of the readings seen so far, so they are in the series' original units.

Details of deep-river 0.3.4 that shape the numbers:

* Until ``window`` readings have been seen, the lag window is left-padded with zeros (z = 0 is
  the running mean), so the peer forecasts from ``t = 1`` on; ``f[0]`` is NaN. At ``t = 1`` the
  variance is still 0, the scaler maps everything to 0 and the forecast is ``x[0]``.
* The stored lag window keeps each reading as it was scaled when it arrived; it is not
  re-scaled as the running statistics move (deep-river keeps the raw target history it is fed).
* A non-finite reading is forecast (``f[t]`` is still set) but neither scaled nor learnt.
* Torch runs single-threaded during the call (restored after): with one small step per
  reading, two intra-op threads were 50x slower on a 2-core machine shared with other work.
* ``LSTMForecaster`` builds its LSTM before it seeds torch, so the weights are seeded here, inside
  ``torch.random.fork_rng``; the caller's global torch RNG is left as it was.

Installation. deep-river is optional: ``pip install -e '.[peer]'`` in the repository. Every deep-river
release pins an old torch (0.3.4: ``torch>=2.5,<2.6``), so in an environment whose torch must
stay as it is, install it without its dependencies and add the two it imports::

    pip install --no-deps 'deep-river==0.3.4'
    pip install 'river>=0.25,<0.26' 'pandas>=2.2,<3'

Examples
--------
The check below runs the real peer when deep-river is installed; without it the stand-in is
persistence, which has the same shape and NaN pattern.

>>> import numpy as np
>>> x = 20.0 + np.sin(np.arange(80) / 4.0)
>>> f = peer_one_step(x, window=8, hidden=8) if peer_available() else np.r_[np.nan, x[:-1]]
>>> f.shape, bool(np.isnan(f[0])), bool(np.isfinite(f[1:]).all())
((80,), True, True)

References
----------
[^1]: Kulbach, C., Cazzonelli, L., Ngo, H.-A., Halford, M., Mastelini, S. M. (2025).
      "DeepRiver: A Deep Learning Library for Data Streams." Journal of Open Source Software
      10(105), 7226. https://doi.org/10.21105/joss.07226
[^2]: Montiel, J. et al. (2021). "River: machine learning for streaming data in Python."
      JMLR 22(110):1-8. https://riverml.xyz
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

__all__ = ["INSTALL_HINT", "peer_available", "peer_one_step"]

INSTALL_HINT = (
    "the deep-river peer baseline needs the optional package deep-river: "
    "pip install -e '.[peer]' && pip install --no-deps 'deep-river==0.3.4' in the repository (the [peer] "
    "extra brings river and pandas; deep-river itself pins an old torch, hence --no-deps; `make venv` does both)"
)


def peer_available() -> bool:
    """True when deep-river (and the River it needs) can be imported.

    >>> isinstance(peer_available(), bool)
    True
    """
    try:
        import deep_river.forecasting  # noqa: F401
        import river.preprocessing  # noqa: F401
    except ImportError:
        return False
    return True


def _import_peer():
    try:
        from deep_river.forecasting import LSTMForecaster
        from river.preprocessing import StandardScaler
    except ImportError as err:
        raise ImportError(INSTALL_HINT) from err
    return LSTMForecaster, StandardScaler


def peer_one_step(
    x: np.ndarray,
    *,
    window: int = 32,
    hidden: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """One-step-ahead forecasts of the deep-river online LSTM over one stream.

    Parameters
    ----------
    x
        1-D series, in time order (one stream).
    window
        Lag window fed to the LSTM (deep-river's ``window_size``).
    hidden
        LSTM hidden units (``hidden_size``; one layer).
    lr
        Adam learning rate.
    seed
        Seeds the LSTM's initial weights. The global torch RNG is restored afterwards.
    progress
        Called with the number of readings processed so far, after each reading.

    Returns
    -------
    np.ndarray
        ``f`` with ``len(f) == len(x)``: ``f[t]`` is the forecast of ``x[t]`` made after the
        peer has seen and learnt ``x[:t]``, in the units of ``x``. ``f[0]`` is NaN.

    Raises
    ------
    ImportError
        When deep-river is not installed (the message says how to install it).
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"x must be 1-D, got shape {x.shape}")
    if window < 1 or hidden < 1:
        raise ValueError("window and hidden must be at least 1")
    LSTMForecaster, StandardScaler = _import_peer()
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LSTMForecaster(
            window_size=window,
            hidden_size=hidden,
            num_layers=1,
            optimizer_fn="adam",
            loss_fn="mse",
            lr=lr,
            seed=seed,
            device="cpu",
        )
    scaler = StandardScaler()
    key = "y"
    f = np.full(x.shape, np.nan)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one tiny step per reading: 2 threads ran 50x slower on 2 cores
    try:
        for t, value in enumerate(x.tolist()):
            if scaler.counts[key]:
                z_hat = model.forecast(horizon=1)[0]
                f[t] = scaler.means[key] + z_hat * math.sqrt(scaler.vars[key])
            if math.isfinite(value):
                sample = {key: value}
                scaler.learn_one(sample)
                model.learn_one(scaler.transform_one(sample)[key])
            if progress is not None:
                progress(t + 1)
    finally:
        torch.set_num_threads(threads)
    return f
