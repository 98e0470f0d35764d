"""The layout of a device's expert state: one float64 vector a device, and its snapshot packing.

The forecasting algorithm that reads and writes this state is ``stream_lstm/experts.py``; the
table (``table.py``) only allocates, moves and snapshots it, so plain state does not depend on
the algorithm. Changing the layout changes :data:`PACKED_SIZE`, and a snapshot of another size
starts a device's experts afresh (``DeviceTable.restore``).

>>> state = init_state(2)
>>> state.shape == (2, STATE_SIZE)
True
>>> bool((unpack(pack(state[0])) == state[0])[~np.isnan(state[0])].all())
True
"""

from __future__ import annotations

import numpy as np

EXPERTS = ("model", "ar", "median", "last", "analog")
N_HISTORY = 256  # readings the analogues are searched in (measured: 128 gave less, 512 no more)
N_LAGS = 16  # readings the median and the autoregression look back over
N_FEATURES = 3 + N_LAGS - 1  # model change, -z, median distance, 15 lagged changes
_P0 = 10.0  # initial inverse-information: a weak prior on the starting weights

# Layout of one device's state vector.
# The last readings, oldest first, NaN where not yet seen: float32, two to a float64 word, read
# and written through history(). 7 digits are what the window keeps too, and the analogues
# only compare them; it halves the biggest part of the state. As float64 these words are only
# ever copied (rows moved, snapshots written), never computed on, so their bits survive.
_HISTORY = slice(0, N_HISTORY // 2)
_W = slice(_HISTORY.stop, _HISTORY.stop + N_FEATURES)
_P = slice(_W.stop, _W.stop + N_FEATURES * N_FEATURES)
_F_PREV = slice(_P.stop, _P.stop + N_FEATURES)  # features of the last forecast
_E_PREV = slice(_F_PREV.stop, _F_PREV.stop + len(EXPERTS))  # each expert's last forecast
_LOG_W = slice(_E_PREV.stop, _E_PREV.stop + len(EXPERTS))
_S_PREV = _LOG_W.stop  # the scale at the last forecast; NaN before the first
STATE_SIZE = _S_PREV + 1
_UPPER = np.triu_indices(N_FEATURES)  # P is symmetric: its upper triangle says it all
PACKED_SIZE = _HISTORY.stop + N_FEATURES + len(_UPPER[0]) + (STATE_SIZE - _F_PREV.start)


def init_state(n: int) -> np.ndarray:
    """``[n, STATE_SIZE]``: devices that have seen nothing. The ``ar`` expert starts as the
    model's change (weight 1 on it), and all experts weigh the same."""
    state = np.zeros((n, STATE_SIZE))
    history(state)[:] = np.nan
    state[:, _W.start] = 1.0
    state[:, _P] = (_P0 * np.eye(N_FEATURES)).ravel()
    state[:, _F_PREV] = np.nan
    state[:, _E_PREV] = np.nan
    state[:, _S_PREV] = np.nan
    return state


def history(state: np.ndarray) -> np.ndarray:
    """``[m, N_HISTORY]`` float32: a writable view of each row's last readings, newest last."""
    return state[:, _HISTORY].view(np.float32)


def pack(row: np.ndarray) -> np.ndarray:
    """One device's state (``[STATE_SIZE]``) as the :data:`PACKED_SIZE` float64 words its
    snapshot carries, restored bit for bit by :func:`unpack`: the RLS matrix is symmetric, so
    only its upper triangle goes."""
    upper = row[_P].reshape(N_FEATURES, N_FEATURES)[_UPPER]
    return np.concatenate([row[_HISTORY], row[_W], upper, row[_F_PREV.start :]])


def unpack(packed: np.ndarray) -> np.ndarray:
    """The ``[STATE_SIZE]`` state that :func:`pack` packed."""
    half = _HISTORY.stop
    row = np.empty(STATE_SIZE)
    row[_HISTORY] = packed[:half]
    row[_W] = packed[half : half + N_FEATURES]
    p = np.zeros((N_FEATURES, N_FEATURES))
    p[_UPPER] = packed[half + N_FEATURES : half + N_FEATURES + len(_UPPER[0])]
    p.T[_UPPER] = p[_UPPER]  # mirror: the lower triangle
    row[_P] = p.ravel()
    row[_F_PREV.start :] = packed[half + N_FEATURES + len(_UPPER[0]) :]
    return row
