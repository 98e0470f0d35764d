"""The layout of a device's expert state: one float64 vector a device, which is also its
snapshot's form.

The forecasting algorithm that reads and writes this state is ``stream_lstm/experts.py``; the
table (``table.py``) only allocates, moves and snapshots it, so plain state does not depend on
the algorithm. Changing the layout changes :data:`PACKED_SIZE`; a snapshot of the layout before
this one (:data:`V1_PACKED_SIZE`) is converted, one of any other size starts a device's
experts afresh (``DeviceTable.restore``).

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
# The last readings, oldest first, NaN where not yet seen: float16, four to a float64 word,
# each the reading times 2**-k for the device's exponent k (_SCALE), read through history()
# and written by push_history(). float16 keeps 11 significant bits; measured on the 19 NAB
# recordings (docs/benchmarks.md, issue 18 item 5) that moved no one-step MASE by more than
# +0.0006, where 8 or 9 bits cost up to 0.005; the scale keeps any range (raw float16 stops at
# 65,504). As float64 these words are only ever copied (rows moved, snapshots written), never
# computed on, so their bits survive.
_HISTORY = slice(0, N_HISTORY // 4)
# k: the largest reading so far is stored in [2**14, 2**15), so 29 binary orders of magnitude
# below it keep float16's full precision. It only grows (push_history rescales the stored
# readings, exactly in float16's normal range); NaN before the first reading.
_SCALE = _HISTORY.stop
_HEADROOM = 15  # a stored value stays below 2**15 (float16's largest is 65,504)
_W = slice(_SCALE + 1, _SCALE + 1 + N_FEATURES)
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
# The layout before (to 2026-12-05): the history as float32, two to a word (128 words), no
# scale, then W, P, F, E, log W and the scale as here. A snapshot of it is converted on restore.
V1_PACKED_SIZE = N_HISTORY // 2 + (STATE_SIZE - _W.start)


def init_state(n: int) -> np.ndarray:
    """``[n, STATE_SIZE]``: devices that have seen nothing. The ``ar`` expert starts as the
    model's change (weight 1 on it), and all experts weigh the same."""
    state = np.zeros((n, STATE_SIZE))
    _stored(state)[:] = np.nan
    state[:, _SCALE] = np.nan
    state[:, _W.start] = 1.0
    state[:, _P] = (_P0 * np.eye(N_FEATURES))[_UPPER]
    state[:, _F_PREV] = np.nan
    state[:, _E_PREV] = np.nan
    state[:, _S_PREV] = np.nan
    return state


def _stored(state: np.ndarray) -> np.ndarray:
    """``[m, N_HISTORY]`` float16: a writable view of each row's stored (scaled) readings."""
    return state[:, _HISTORY].view(np.float16)


def history(state: np.ndarray) -> np.ndarray:
    """``[m, N_HISTORY]`` float32: each row's last readings, newest last (a new array)."""
    scale = np.exp2(state[:, _SCALE]).astype(np.float32)[:, None]
    return np.multiply(_stored(state), scale, dtype=np.float32)  # one pass, no float32 copy first


def last_reading(state: np.ndarray) -> np.ndarray:
    """``[m]``: each row's newest reading in its history (NaN if none)."""
    return _stored(state)[:, -1] * np.exp2(state[:, _SCALE])


def _exponent_for(x: np.ndarray) -> np.ndarray:
    """The scale exponent that stores ``|x|`` in [2**14, 2**15) (NaN for a non-finite x)."""
    with np.errstate(invalid="ignore"):
        need = np.frexp(np.abs(x))[1].astype(np.float64) - _HEADROOM
    need[~np.isfinite(x)] = np.nan
    return need


def rounded(x: np.ndarray) -> np.ndarray:
    """``x`` as the history keeps it: rounded to float16's 11 significant bits, whatever the
    scale (the same numbers :func:`push_history` stores, in float16's normal range).

    >>> rounded(np.array([1.0, 1000.1, 1e9 + 12345.0, np.nan])).tolist()
    [1.0, 1000.0, 999817216.0, nan]
    """
    mantissa, exponent = np.frexp(np.asarray(x, np.float64))
    return np.ldexp(np.round(mantissa * 2048.0) / 2048.0, exponent)


def push_history(state: np.ndarray, x: np.ndarray) -> None:
    """Append reading ``x[i]`` to row ``i``'s history (a shift register, newest last), raising
    the row's scale first if it is the largest so far. A NaN reading is kept as NaN.

    >>> state = init_state(1)
    >>> for v in (3.0, 1e6, 2.5):
    ...     push_history(state, np.array([v]))
    >>> history(state)[0, -3:].tolist()  # 11 significant bits: 1e6 is kept as 999,936
    [3.0, 999936.0, 2.5]
    """
    k = state[:, _SCALE]
    new_k = np.fmax(k, _exponent_for(x))  # a row with neither (no reading yet, a NaN one) stays NaN
    stored = _stored(state)
    grown = new_k > k  # (False where k is NaN: nothing stored to rescale)
    if grown.any():
        shift = np.exp2(k[grown] - new_k[grown]).astype(np.float32)[:, None]
        stored[grown] = (stored[grown].astype(np.float32) * shift).astype(np.float16)
    state[:, _SCALE] = new_k
    stored[:, :-1] = stored[:, 1:]
    stored[:, -1] = (x * np.exp2(-new_k)).astype(np.float16)


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
    """The ``[STATE_SIZE]`` state that :func:`pack` packed, or that the layout before
    (:data:`V1_PACKED_SIZE` words, a float32 history) held: its readings are stored again as
    this layout stores them. A snapshot of another layout is refused (the table then starts
    the device's experts afresh)."""
    packed = np.asarray(packed, np.float64)
    if packed.shape == (V1_PACKED_SIZE,):
        state = init_state(1)
        readings = np.ascontiguousarray(packed[: N_HISTORY // 2]).view(np.float32).astype(np.float64)
        k = np.fmax.reduce(_exponent_for(readings))  # the scale push_history would have reached
        if np.isfinite(k):  # then every reading stored under it
            state[0, _SCALE] = k
            _stored(state)[0] = (readings * np.exp2(-k)).astype(np.float16)
        state[0, _W.start :] = packed[N_HISTORY // 2 :]
        return state[0]
    if packed.shape != (PACKED_SIZE,):
        raise ValueError(f"expert state of {packed.shape} words, expected ({PACKED_SIZE},) "
                         f"or the earlier ({V1_PACKED_SIZE},)")
    return np.array(packed, np.float64)


def readable(packed: np.ndarray) -> bool:
    """Whether :func:`unpack` reads ``packed`` (this layout or the one before)."""
    return np.shape(packed) in ((PACKED_SIZE,), (V1_PACKED_SIZE,))
