"""The layout of a device's expert state (state/expert_state.py): a fresh device's state, the
float32 history view, and the snapshot packing that restores it bit for bit."""

import numpy as np
import pytest

from stream_lstm import experts
from stream_lstm.state import expert_state
from stream_lstm.state.expert_state import (
    EXPERTS,
    N_FEATURES,
    N_HISTORY,
    PACKED_SIZE,
    STATE_SIZE,
    history,
    init_state,
    pack,
    unpack,
)
from stream_lstm.state.normalizer import normalize_sequence


def learnt_state(x: np.ndarray) -> np.ndarray:
    """One device's state after the experts (experts.py) learnt from ``x``, persistence as the model."""
    _, mean, scale = normalize_sequence(x[:, None], "ewm", 0.02, 1e-3)
    state = init_state(1)
    for t in range(len(x)):
        experts.step(state, np.ones(1, bool), x[t : t + 1], mean[t : t + 1, 0], scale[t : t + 1, 0],
                     np.zeros(1), x[t : t + 1], rate=0.1)
    return state


def test_a_fresh_device_has_seen_nothing_and_weighs_every_expert_alike():
    state = init_state(3)
    assert state.shape == (3, STATE_SIZE) and state.dtype == np.float64
    assert np.isnan(history(state)).all()
    w = state[:, expert_state._W]
    assert (w[:, 0] == 1.0).all() and (w[:, 1:] == 0.0).all()  # the ar expert starts as the model's change
    p = expert_state.rls_matrix(state)
    np.testing.assert_array_equal(p, np.broadcast_to(10.0 * np.eye(N_FEATURES), p.shape))
    assert state.nbytes / 3 < 2800  # P's upper triangle only, the history as float32 (was 3,992 B)
    log_w = state[:, expert_state._LOG_W]
    assert log_w.shape == (3, len(EXPERTS)) and (log_w == 0.0).all()
    assert np.isnan(state[:, expert_state._S_PREV]).all()


def test_history_is_a_writable_float32_view_of_each_row():
    state = init_state(2)
    view = history(state)
    assert view.shape == (2, N_HISTORY) and view.dtype == np.float32
    view[1, -1] = 21.5  # written through the view: the state holds it, the other row does not
    assert history(state)[1, -1] == np.float32(21.5) and np.isnan(history(state)[0]).all()
    assert np.shares_memory(view, state)


def test_the_packed_state_restores_bit_for_bit():
    rng = np.random.default_rng(6)
    x = 1e9 + np.cumsum(rng.normal(0, 1e6, 300))  # 10 significant digits
    state = learnt_state(x)
    history(state)[0, -1] = np.nan  # an unseen slot in the history
    row = state[0]
    packed = pack(row)
    assert packed.shape == (PACKED_SIZE,) and not np.shares_memory(packed, row)
    np.testing.assert_array_equal(unpack(packed), row)  # NaN included
    p = expert_state.rls_matrix(state)[0]
    assert np.array_equal(p, p.T) and not np.allclose(p, np.diag(np.diag(p)))  # learnt, symmetric


def test_the_stored_triangle_unfolds_to_the_symmetric_matrix_and_back():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(2, N_FEATURES, N_FEATURES))
    p = a + a.transpose(0, 2, 1)
    upper = expert_state.rls_upper(p)
    assert upper.shape == (2, N_FEATURES * (N_FEATURES + 1) // 2)
    state = init_state(2)
    state[:, expert_state._P] = upper
    np.testing.assert_array_equal(expert_state.rls_matrix(state), p)


def test_a_fresh_state_packs_and_unpacks_unchanged():
    row = init_state(1)[0]
    np.testing.assert_array_equal(unpack(pack(row)), row)


@pytest.mark.parametrize("size", [PACKED_SIZE - 1, PACKED_SIZE + 1, 0])
def test_a_packed_state_of_another_size_is_refused(size):
    # The table starts such a device afresh (a snapshot of another layout); unpack itself
    # never turns it into a state silently.
    with pytest.raises(ValueError):
        unpack(np.zeros(size))
