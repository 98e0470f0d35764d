"""DeviceSnapshot: everything the service knows about one device, as plain values.

This is the unit that leaves memory: it is what the changelog topic and the local state
store hold, and what eviction and restore move between the in-memory table and disk.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class DeviceSnapshot:
    """One device's state.

    Parameters
    ----------
    device_id
        The device key.
    partition
        Input-topic partition the device's readings arrive on.
    h, c
        LSTM state, ``float32 [num_layers, hidden_size]``.
    count
        Readings folded into the normalizer (Welford ``n``; for EWM the number seen).
    mean, var
        Normalizer statistics per channel, ``float64 [n_features]``.
    window
        The last readings in arrival order, oldest first, ``float32 [n <= W, n_features]``.
    last_ts
        Event time of the last applied reading (epoch seconds); NaN if none.
    step_s
        Estimated sampling interval in seconds (EWMA of the gaps); NaN if unknown.
    n_seen
        Readings applied since the device was first seen.
    since_reset
        Readings applied since h/c was last reset (gap) or created.
    prev_mu, prev_sigma
        The one-step forecast made at the last reading (original units): what the next
        reading is scored against. NaN when none.
    model_version
        Version of the model whose weights produced ``h``/``c``.
    drift_mu, drift_b, drift_change
        The H-step forecasts (location and Laplace scale, original units; and the model's own
        normalized change) made at the last H readings, as a ring indexed by ``n_seen % H``:
        what a reading's drift score compares it with. ``float32 [H]``; empty when none.
    experts
        The per-device one-step experts and their weights (``stream_lstm.experts``), packed
        by ``experts.pack``: ``float64 [PACKED_SIZE]``; empty when none.
    last_seen
        Wall-clock time the device last sent (for the TTL).
    extra
        The declared columns saved under their own keys (state/columns.py ``extra_keys``).

    Examples
    --------
    >>> import numpy as np
    >>> s = DeviceSnapshot.empty("pump-1", num_layers=1, hidden_size=4, n_features=2)
    >>> s.h.shape, s.window.shape, s.mean.dtype
    ((1, 4), (0, 2), dtype('float64'))
    """

    device_id: str
    partition: int
    h: np.ndarray
    c: np.ndarray
    count: float
    mean: np.ndarray
    var: np.ndarray
    window: np.ndarray
    last_ts: float = float("nan")
    step_s: float = float("nan")
    n_seen: int = 0
    since_reset: int = 0
    prev_mu: float = float("nan")
    prev_sigma: float = float("nan")
    model_version: str = ""
    last_seen: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)
    drift_mu: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    drift_b: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    drift_change: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    experts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))

    @classmethod
    def empty(
        cls, device_id: str, *, num_layers: int, hidden_size: int, n_features: int, partition: int = 0
    ) -> DeviceSnapshot:
        """The state of a device never seen before."""
        return cls(
            device_id=device_id,
            partition=partition,
            h=np.zeros((num_layers, hidden_size), np.float32),
            c=np.zeros((num_layers, hidden_size), np.float32),
            count=0.0,
            mean=np.zeros(n_features, np.float64),
            var=np.zeros(n_features, np.float64),
            window=np.zeros((0, n_features), np.float32),
        )
