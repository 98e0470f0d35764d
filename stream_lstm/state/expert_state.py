"""The layout of a device's expert state: one float64 vector a device, which is also its
snapshot's form.

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
# The RLS matrix P is symmetric: only its upper triangle, row by row, is kept (171 words, not
# 324: 1.2 KB a device less), unfolded by rls_matrix() for the one step that computes with it.
_UPPER = np.triu_indices(N_FEATURES)
_P = slice(_W.stop, _W.stop + len(_UPPER[0]))
_F_PREV = slice(_P.stop, _P.stop + N_FEATURES)  # features of the last forecast
_E_PREV = slice(_F_PREV.stop, _F_PREV.stop + len(EXPERTS))  # each expert's last forecast
_LOG_W = slice(_E_PREV.stop, _E_PREV.stop + len(EXPERTS))
_S_PREV = _LOG_W.stop  # the scale at the last forecast; NaN before the first
STATE_SIZE = _S_PREV + 1
PACKED_SIZE = STATE_SIZE  # the snapshot carries the state as it is in memory


def init_state(n: int) -> np.ndarray:
    """``[n, STATE_SIZE]``: devices that have seen nothing. The ``ar`` expert starts as the
    model's change (weight 1 on it), and all experts weigh the same."""
    state = np.zeros((n, STATE_SIZE))
    history(state)[:] = np.nan
    state[:, _W.start] = 1.0
    state[:, _P] = (_P0 * np.eye(N_FEATURES))[_UPPER]
    state[:, _F_PREV] = np.nan
    state[:, _E_PREV] = np.nan
    state[:, _S_PREV] = np.nan
    return state


def history(state: np.ndarray) -> np.ndarray:
    """``[m, N_HISTORY]`` float32: a writable view of each row's last readings, newest last."""
    return state[:, _HISTORY].view(np.float32)


def rls_matrix(state: np.ndarray) -> np.ndarray:
    """``[m, N_FEATURES, N_FEATURES]``: each row's RLS matrix P, unfolded from its upper
    triangle (a new array; :func:`rls_upper` folds it back).

    >>> p = rls_matrix(init_state(1))
    >>> p.shape == (1, N_FEATURES, N_FEATURES) and bool((p[0] == 10.0 * np.eye(N_FEATURES)).all())
    True
    """
    upper = state[:, _P]
    p = np.empty((len(state), N_FEATURES, N_FEATURES))
    p[:, _UPPER[0], _UPPER[1]] = upper
    p[:, _UPPER[1], _UPPER[0]] = upper
    return p


def rls_upper(p: np.ndarray) -> np.ndarray:
    """The stored form of symmetric matrices ``p`` (``[m, N_FEATURES, N_FEATURES]``): their
    upper triangles, row by row (what ``state[:, _P]`` holds)."""
    return p[:, _UPPER[0], _UPPER[1]]


def pack(row: np.ndarray) -> np.ndarray:
    """One device's state (``[STATE_SIZE]``) as the :data:`PACKED_SIZE` float64 words its
    snapshot carries, restored bit for bit by :func:`unpack`. The memory layout is already
    compact (float32 history, P's upper triangle), so this is a copy."""
    return np.array(row, np.float64)


def unpack(packed: np.ndarray) -> np.ndarray:
    """The ``[STATE_SIZE]`` state that :func:`pack` packed; a snapshot of another layout is
    refused (the table then starts the device's experts afresh)."""
    if packed.shape != (PACKED_SIZE,):
        raise ValueError(f"expert state of {packed.shape} words, expected ({PACKED_SIZE},)")
    return np.array(packed, np.float64)
