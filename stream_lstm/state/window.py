"""Rolling window: a ring buffer of each device's last W model inputs.

The window holds the *normalized* readings exactly as they were fed to the model. That is
what retraining learns from, and what a hot-swap replays through new weights to re-warm a
device's hidden state, so no device mixes old state with new weights.
"""

from __future__ import annotations

import numpy as np


class RollingWindow:
    """Ring buffers ``[capacity, size, n_features]`` with a write position and fill per slot.

    Parameters
    ----------
    capacity
        Number of slots (devices).
    size
        W, readings kept per device.
    n_features
        Channels per reading.

    Examples
    --------
    >>> import numpy as np
    >>> win = RollingWindow(capacity=1, size=3, n_features=1)
    >>> for v in [1, 2, 3, 4]:
    ...     win.push(np.array([0]), np.array([[v]], np.float32))
    >>> win.ordered(0)[:, 0].tolist()     # oldest first; 1 fell out
    [2.0, 3.0, 4.0]
    """

    def __init__(self, capacity: int, size: int, n_features: int) -> None:
        self.size = size
        self.data = np.zeros((capacity, size, n_features), np.float32)
        self.pos = np.zeros(capacity, np.int64)  # where the next reading goes
        self.length = np.zeros(capacity, np.int64)  # readings held, <= size

    def grow(self, capacity: int) -> None:
        extra = capacity - len(self.pos)
        if extra > 0:
            self.data = np.concatenate([self.data, np.zeros((extra,) + self.data.shape[1:], np.float32)])
            self.pos = np.concatenate([self.pos, np.zeros(extra, np.int64)])
            self.length = np.concatenate([self.length, np.zeros(extra, np.int64)])

    def reset(self, slots: np.ndarray) -> None:
        self.pos[slots] = 0
        self.length[slots] = 0

    def push(self, slots: np.ndarray, z: np.ndarray) -> None:
        """Append one reading per slot (slots must not repeat within a call)."""
        self.data[slots, self.pos[slots]] = z
        self.pos[slots] = (self.pos[slots] + 1) % self.size
        self.length[slots] = np.minimum(self.length[slots] + 1, self.size)

    def ordered(self, slot: int) -> np.ndarray:
        """The slot's readings, oldest first, ``[length, n_features]`` (a copy)."""
        n = int(self.length[slot])
        idx = (self.pos[slot] - n + np.arange(n)) % self.size
        return self.data[slot, idx].copy()

    def right_aligned(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Windows of many slots as ``[n, size, F]``, newest last, left-padded with zeros.

        Also returns each slot's length, so a caller can start each device at its first
        real reading (``size - length``).
        """
        lengths = self.length[slots]
        steps = np.arange(self.size)
        idx = (self.pos[slots, None] - self.size + steps[None, :]) % self.size
        out = self.data[slots[:, None], idx]
        out[steps[None, :] < (self.size - lengths)[:, None]] = 0.0
        return out, lengths

    def load(self, slot: int, readings: np.ndarray) -> None:
        """Set a slot's window from ``readings [n, F]`` (oldest first), keeping the last W."""
        readings = readings[-self.size :]
        n = len(readings)
        self.data[slot, :n] = readings
        self.pos[slot] = n % self.size
        self.length[slot] = n
