"""Training data from device state: normalized windows, split into train and holdout.

The worker trains on exactly what it fed the model: each device's rolling window holds the
normalized readings in arrival order. The holdout is a fifth of the devices, so the gate scores
both models on devices the challenger did not train on: the first in the order of a hash of
their ids (:func:`device_order`). That order does not change when devices join or leave, so
neither does the holdout, but for a device at its edge; a fresh random draw at each retrain
(seeded, over the sorted list) held out, at a fleet's growth by one device, 57-100% devices
the champion had been trained on in the retrain before, whose windows still overlapped what
it had learnt.
"""

from __future__ import annotations

import hashlib

import numpy as np

from stream_lstm.state.table import DeviceTable


def windows_from_table(table: DeviceTable, min_length: int) -> list[np.ndarray]:
    """Every in-memory device's window (oldest first) with at least ``min_length`` readings, in
    :func:`device_order`: the same fleet gives the same data (and holdout) whatever order its
    devices happened to arrive in, so retraining is reproducible. A window begins at the
    device's last reset (a gap, ``STREAM_LSTM_MAX_GAP_S``) where that is inside it: serving
    started from zero state there, and a sequence across it would teach what it never did."""
    windows = []
    for d in device_order(table.index):
        slot = table.index[d]
        since = int(table.since_reset[slot])
        window = table.window.ordered(slot)
        window = window[-since:] if 0 < since < len(window) else window
        if len(window) >= min_length:
            windows.append(window)
    return windows


def device_order(device_ids) -> list[str]:
    """The ids in the order of a hash of each: a device's place among the others depends on no
    other device, and neither on its name's alphabetical neighbours.

    >>> device_order(["pump-1", "pump-2", "pump-3"]) == device_order(["pump-3", "pump-1", "pump-2"])
    True
    """
    return sorted(device_ids, key=lambda d: (hashlib.blake2b(d.encode("utf-8", "surrogatepass"),
                                                             digest_size=8).digest(), d))


def split_holdout(seqs: list[np.ndarray], fraction: float = 0.2) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``(train, holdout)``: the first ``fraction`` of the sequences (at least one) is held out.
    Given in :func:`device_order`, a device joining or leaving moves at most one other across
    the line.

    >>> train, hold = split_holdout([np.zeros(2) + i for i in range(10)])
    >>> [int(s[0]) for s in hold], len(train)
    ([0, 1], 8)
    """
    if len(seqs) < 2:
        return seqs, seqs
    n_hold = max(1, int(round(len(seqs) * fraction)))
    return seqs[n_hold:], seqs[:n_hold]


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
