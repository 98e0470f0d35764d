"""Training data from device state: normalized windows, split into train and holdout.

The worker trains on exactly what it fed the model: each device's rolling window holds the
normalized readings in arrival order. The holdout is the most recent part of the fleet's
windows' owners: a random but seeded fifth of the devices, so the gate scores both models on
devices the challenger did not train on.
"""

from __future__ import annotations

import numpy as np

from stream_lstm.state.table import DeviceTable


def windows_from_table(table: DeviceTable, min_length: int) -> list[np.ndarray]:
    """Every in-memory device's window (oldest first) with at least ``min_length`` readings."""
    # Sorted by device id: the same fleet gives the same data (and holdout) whatever order its
    # devices happened to arrive in, so retraining is reproducible.
    slots = [table.index[d] for d in sorted(table.index) if table.window.length[table.index[d]] >= min_length]
    return [table.window.ordered(s) for s in slots]


def split_holdout(seqs: list[np.ndarray], fraction: float = 0.2, seed: int = 0
                  ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``(train, holdout)``: a seeded ``fraction`` of the sequences is held out (at least one)."""
    if len(seqs) < 2:
        return seqs, seqs
    order = np.random.default_rng(seed).permutation(len(seqs))
    n_hold = max(1, int(round(len(seqs) * fraction)))
    hold = set(order[:n_hold].tolist())
    return ([s for i, s in enumerate(seqs) if i not in hold], [s for i, s in enumerate(seqs) if i in hold])


def series_windows(z: np.ndarray, length: int, stride: int) -> list[np.ndarray]:
    """Windows ``z[i : i + length]`` of one long series every ``stride`` steps, the last one
    ending at ``len(z)`` so the most recent readings are always used.

    A window needs ``length >= 2`` readings (one to read, the next to forecast); ``stride``
    is at least 1. Raises ``ValueError`` otherwise.

    >>> [w[:, 0].tolist() for w in series_windows(np.arange(7.0)[:, None], 4, 2)]
    [[0.0, 1.0, 2.0, 3.0], [2.0, 3.0, 4.0, 5.0], [3.0, 4.0, 5.0, 6.0]]
    """
    if length < 2:
        raise ValueError(f"series_windows: length is {length}; a window needs at least 2 readings "
                         "(one to read, the next to forecast)")
    if stride < 1:
        raise ValueError(f"series_windows: stride is {stride}; windows must start at least 1 "
                         "step apart")
    if len(z) <= length:
        return [z] if len(z) > 1 else []
    starts = list(range(0, len(z) - length + 1, stride))
    if starts[-1] != len(z) - length:
        starts.append(len(z) - length)
    return [z[i : i + length] for i in starts]
