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
# through history() and written by push_history(), each as its difference from the device's
# reference (its first reading, float64, in the last word): 24 significant bits of how far it
# moved, not of the reading itself. Readings of 2.4e9 Hz kept as float32 were 256 Hz apart, and
# a sensor a few units about 9e11 was forecast 4.5x worse than by its last reading (a numerics
# review, 2026-12-07).
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
_REF = _S_PREV + 1  # the reference the history is kept from; NaN before a finite reading
STATE_SIZE = _REF + 1
PACKED_SIZE = STATE_SIZE  # the snapshot carries the state as it is in memory
# The layout before the reference (2026-12-05 to 12-07): the history of readings as they were.
# Read as this one, kept from its newest reading. (The reference is a device's first reading:
# one far off its later level, a 1e9 sentinel before readings of 20, keeps its history coarse,
# 64 apart there, until the TTL forgets the device; moving it within a poll would make the
# fused path's numbers depend on where polls split.)
ABSOLUTE_PACKED_SIZE = STATE_SIZE - 1
# The float16 layout (2026-12-05, 12:26 to 14:10): the history as float16, four to a
# word, times 2**k for the device's exponent k in the word after it; then W, P, F, E, log W and
# the scale as here. A snapshot of it is converted on restore.
F16_PACKED_SIZE = N_HISTORY // 4 + 1 + (_REF - _W.start)


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
    state[:, _REF] = np.nan
    return state


def history(state: np.ndarray) -> np.ndarray:
    """``[m, N_HISTORY]`` float32: a view of each row's last readings less its
    :func:`reference`, newest last (no copy: written only by :func:`push_history`)."""
    return state[:, _HISTORY].view(np.float32)


def reference(state: np.ndarray) -> np.ndarray:
    """``[m]``: what each row's :func:`history` is kept from (NaN before a finite reading)."""
    return state[:, _REF]


def referenced(state: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``[m]``: each row's reference once it has seen ``x`` (its first finite reading, if none
    before), as :func:`push_history` sets it."""
    ref = state[:, _REF]
    return np.where(np.isnan(ref) & np.isfinite(x), x, ref)


def push_history(state: np.ndarray, x: np.ndarray) -> None:
    """Append reading ``x[i]`` to row ``i``'s history (a shift register, newest last). A NaN
    reading is kept as NaN.

    >>> state = init_state(1)
    >>> for v in (2.4e9 + 1.0, 2.4e9 + 3.5, 2.4e9 - 2.25):
    ...     push_history(state, np.array([v]))
    >>> (history(state)[0, -3:] + reference(state)[0] - 2.4e9).tolist()  # Hz, not 256 Hz apart
    [1.0, 3.5, -2.25]
    """
    state[:, _REF] = referenced(state, x)
    stored = history(state)
    stored[:, :-1] = stored[:, 1:]
    stored[:, -1] = x - state[:, _REF]


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
    """The ``[STATE_SIZE]`` state that :func:`pack` packed, or that an earlier layout held
    (kept from its newest reading): the readings as they were (:data:`ABSOLUTE_PACKED_SIZE`
    words), or as float16
    (:data:`F16_PACKED_SIZE`: stored again as float32, exactly, as float16 times a power of two
    fits). A snapshot of another layout is refused (the table then starts the device's experts
    afresh)."""
    packed = np.asarray(packed, np.float64)
    if packed.shape == (ABSOLUTE_PACKED_SIZE,):
        return _from_newest(np.append(packed, 0.0))
    if packed.shape == (F16_PACKED_SIZE,):
        state = init_state(1)
        n16 = N_HISTORY // 4
        k = packed[n16]  # NaN before the device's first reading: the history stays unseen
        if np.isfinite(k):
            halves = np.ascontiguousarray(packed[:n16]).view(np.float16).astype(np.float64)
            history(state)[0] = halves * np.exp2(k)
        state[0, _W.start : _REF] = packed[n16 + 1 :]
        return _from_newest(state[0])
    if packed.shape != (PACKED_SIZE,):
        raise ValueError(f"expert state of {packed.shape} words, expected ({PACKED_SIZE},) or "
                         f"an earlier layout's ({ABSOLUTE_PACKED_SIZE},) / ({F16_PACKED_SIZE},)")
    return np.array(packed, np.float64)


def _from_newest(row: np.ndarray) -> np.ndarray:
    """``row`` (its history the readings themselves, whatever its reference says) kept from its
    newest reading instead: a device restored from an earlier layout gains the reference's
    precision from then on (from 0 it kept 2.4 GHz to 256 Hz for good, a review)."""
    readings = history(row[None])[0].astype(np.float64)
    seen = readings[np.isfinite(readings)]
    row[_REF] = seen[-1] if len(seen) else np.nan  # (none yet: its first reading, as a new device's)
    if len(seen):
        history(row[None])[0] = readings - row[_REF]
    return row


def readable(packed: np.ndarray) -> bool:
    """Whether :func:`unpack` reads ``packed`` (this layout or an earlier one)."""
    return np.shape(packed) in ((PACKED_SIZE,), (ABSOLUTE_PACKED_SIZE,), (F16_PACKED_SIZE,))
