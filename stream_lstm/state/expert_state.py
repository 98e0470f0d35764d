"""The layout of a device's expert state: one float64 vector a device, which is also its
snapshot's form.

The forecasting algorithm that reads and writes this state is ``stream_lstm/experts.py``; the
table (``table.py``) only allocates, moves and snapshots it, so plain state does not depend on
the algorithm. Changing the layout changes :data:`PACKED_SIZE`; a snapshot of the float16
layout that was briefly current (:data:`F16_PACKED_SIZE`) is converted, one of any other size
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
# through history() and written by push_history(). 24 significant bits, as the window keeps.
# Not float16 under a per-device scale (tried on 2026-12-05, 512 B a device less): 11 bits of
# the reading itself are too few where a sensor varies little around a large level (air
# pressure in Pa: readings kept to 64 Pa), and one spike set the scale for good; the experts
# then forecast from the coarse values (docs/benchmarks.md). As float64 these words are only
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
# The float16 layout (2026-12-05, 12:26 to 14:10): the history as float16, four to a
# word, times 2**k for the device's exponent k in the word after it; then W, P, F, E, log W and
# the scale as here. A snapshot of it is converted on restore.
F16_PACKED_SIZE = N_HISTORY // 4 + 1 + (STATE_SIZE - _W.start)


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
    """``[m, N_HISTORY]`` float32: a view of each row's last readings, newest last (no copy:
    written only by :func:`push_history`)."""
    return state[:, _HISTORY].view(np.float32)


def push_history(state: np.ndarray, x: np.ndarray) -> None:
    """Append reading ``x[i]`` to row ``i``'s history (a shift register, newest last). A NaN
    reading is kept as NaN.

    >>> state = init_state(1)
    >>> for v in (3.0, 1e12, 101325.25):
    ...     push_history(state, np.array([v]))
    >>> history(state)[0, -3:].tolist()  # each reading's own 24 bits, whatever came before
    [3.0, 999999995904.0, 101325.25]
    """
    stored = history(state)
    stored[:, :-1] = stored[:, 1:]
    stored[:, -1] = x


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
    """The ``[STATE_SIZE]`` state that :func:`pack` packed, or that the float16 layout
    (:data:`F16_PACKED_SIZE` words) held: its readings are stored again as float32 (exactly:
    float16 times a power of two fits). A snapshot of another layout is refused (the table then
    starts the device's experts afresh)."""
    packed = np.asarray(packed, np.float64)
    if packed.shape == (F16_PACKED_SIZE,):
        state = init_state(1)
        n16 = N_HISTORY // 4
        k = packed[n16]  # NaN before the device's first reading: the history stays unseen
        if np.isfinite(k):
            halves = np.ascontiguousarray(packed[:n16]).view(np.float16).astype(np.float64)
            history(state)[0] = halves * np.exp2(k)
        state[0, _W.start :] = packed[n16 + 1 :]
        return state[0]
    if packed.shape != (PACKED_SIZE,):
        raise ValueError(f"expert state of {packed.shape} words, expected ({PACKED_SIZE},) "
                         f"or the float16 layout's ({F16_PACKED_SIZE},)")
    return np.array(packed, np.float64)


def readable(packed: np.ndarray) -> bool:
    """Whether :func:`unpack` reads ``packed`` (this layout or the float16 one)."""
    return np.shape(packed) in ((PACKED_SIZE,), (F16_PACKED_SIZE,))
