"""A synthetic sensor fleet: daily seasonality, noise, drift, gaps and anomalies.

Deterministic for a seed, vectorised with numpy. Each device has its own level, daily
amplitude and phase, noise, and a slow random-walk drift; now and then it goes silent for a
stretch (a gap) or shows a spike (an anomaly, recorded in :attr:`Fleet.anomalies`).

>>> f = Fleet(n_devices=3, seed=1, step_s=300)
>>> batch = f.take(4)                   # 4 readings per device, interleaved in time order
>>> len(batch), batch[0][0], batch[0][1] < batch[-1][1]
(12, 'sim-0000', True)
"""

from __future__ import annotations

import numpy as np

DAY_S = 86_400.0


class Fleet:
    """Synthetic devices producing readings at a fixed step.

    Parameters
    ----------
    n_devices
        Number of devices.
    seed
        Random seed (same seed, same fleet).
    step_s
        Seconds between a device's readings.
    start_ts
        Event time of the first reading (epoch seconds); default: now minus one day.
    drift
        Standard deviation of the drift's random walk per step.
    gap_prob
        Chance per step that a device starts a gap (silence of 5-50 steps).
    anomaly_prob
        Chance per reading of a spike of 6-10 noise levels.
    n_features
        Channels per reading; extra channels are correlated with the first.
    """

    def __init__(self, n_devices: int, seed: int = 0, step_s: float = 60.0,
                 start_ts: float | None = None, drift: float = 0.02, gap_prob: float = 0.002,
                 anomaly_prob: float = 0.001, n_features: int = 1) -> None:
        import time

        self.rng = np.random.default_rng(seed)
        self.n = n_devices
        self.ids = [f"sim-{i:04d}" for i in range(n_devices)]
        self.step_s = step_s
        self.t0 = time.time() - DAY_S if start_ts is None else start_ts
        self.level = self.rng.uniform(10, 90, n_devices)
        self.amp = self.rng.uniform(1, 10, n_devices)
        self.phase = self.rng.uniform(0, 2 * np.pi, n_devices)
        self.noise = self.rng.uniform(0.1, 1.0, n_devices)
        self.drift_sd = drift
        self.drift = np.zeros(n_devices)
        self.gap_prob, self.anomaly_prob = gap_prob, anomaly_prob
        self.gap_left = np.zeros(n_devices, np.int64)
        self.n_features = n_features
        self.step = 0
        self.anomalies: list[tuple[str, float]] = []

    def take(self, steps: int) -> list[tuple[str, float, list[float]]]:
        """The next ``steps`` time steps of every device: ``(device_id, ts, values)`` in time order."""
        out: list[tuple[str, float, list[float]]] = []
        for _ in range(steps):
            ts = self.t0 + self.step * self.step_s
            self.drift += self.rng.normal(0, self.drift_sd, self.n)
            season = self.amp * np.sin(2 * np.pi * ts / DAY_S + self.phase)
            x = self.level + self.drift + season + self.rng.normal(0, 1, self.n) * self.noise
            spikes = self.rng.random(self.n) < self.anomaly_prob
            x = x + spikes * self.rng.choice([-1, 1], self.n) * self.rng.uniform(6, 10, self.n) * self.noise
            start_gap = (self.gap_left == 0) & (self.rng.random(self.n) < self.gap_prob)
            self.gap_left[start_gap] = self.rng.integers(5, 50, int(start_gap.sum()))
            live = self.gap_left == 0
            self.gap_left[~live] -= 1
            extra = [x * (1 + 0.1 * k) + self.rng.normal(0, 0.1, self.n) for k in range(1, self.n_features)]
            for d in np.flatnonzero(live).tolist():
                values = [float(x[d])] + [float(e[d]) for e in extra]
                out.append((self.ids[d], float(ts + d * 1e-3), values))
                if spikes[d]:
                    self.anomalies.append((self.ids[d], float(ts + d * 1e-3)))
            self.step += 1
        return out
