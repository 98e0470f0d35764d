"""The layout of a device's expert state (state/expert_state.py): a fresh device's state, the
float32 history, the snapshot packing that restores it bit for bit, and the conversion of the
float16 layout that was briefly current."""

import numpy as np
import pytest

from stream_lstm import experts
from stream_lstm.state import expert_state
from stream_lstm.state.expert_state import (
    EXPERTS,
    F16_PACKED_SIZE,
    N_FEATURES,
    N_HISTORY,
    PACKED_SIZE,
    STATE_SIZE,
    history,
    init_state,
    pack,
    push_history,
    reference,
    unpack,
)
from stream_lstm.state.normalizer import normalize_sequence


def learnt_state(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One device's state after the experts (experts.py) learnt from ``x``, persistence as the
    model; and their forecast of each next reading."""
    _, mean, scale = normalize_sequence(x[:, None], "ewm", 0.02, 1e-3)
    state = init_state(1)
    forecasts = np.empty(len(x))
    for t in range(len(x)):
        forecasts[t] = experts.step(state, np.ones(1, bool), x[t : t + 1], mean[t : t + 1, 0],
                                    scale[t : t + 1, 0], np.zeros(1), x[t : t + 1], rate=0.1)[0]
    return state, forecasts


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


def test_the_history_keeps_each_readings_own_precision_whatever_came_before():
    state = init_state(2)
    readings = [0.0, 21.5, 1e12, -3.3e9, 0.1234567, np.nan, 101325.37]
    for v in readings:  # row 0 sees them, a spike among them; row 1 only 5.0s
        push_history(state, np.array([v, 5.0]))
    assert history(state).shape == (2, N_HISTORY) and history(state).dtype == np.float32
    got = history(state) + reference(state)[:, None]
    assert np.isnan(got[0, : -len(readings)]).all() and np.isnan(got[0, -2])  # unseen, and NaN
    kept = np.array([0.0, 21.5, 1e12, -3.3e9, 0.1234567, 101325.37])
    np.testing.assert_array_equal(got[0, [-7, -6, -5, -4, -3, -1]], kept.astype(np.float32))
    assert abs(got[0, -1] - 101325.37) < 0.01  # air pressure in Pa after a 1e12 spike
    assert abs(got[0, -3] - 0.1234567) < 1e-8
    assert (got[1, -len(readings):] == 5.0).all()  # the other row, untouched


@pytest.mark.parametrize("level", [0.0, 101_325.0, 1e6, 2.4e9, 9e11])
def test_the_experts_forecast_as_well_around_a_large_level(level):
    # A sensor that varies little around a large level (air pressure in Pa, a frequency in Hz,
    # a counter): the experts must forecast its variation as they do around zero (the float16
    # history kept such readings to 64 Pa, and the experts' error rose 37 % at 101,325; the
    # float32 one kept them to 65,536 at 9e11, and the error was 4.5 times the last reading's).
    rng = np.random.default_rng(3)
    t = np.arange(1500)
    x = 10.0 * np.sin(2 * np.pi * t / 50) + rng.normal(0, 3, len(t))
    errors = {}
    for shift in (0.0, level):
        _, forecast = learnt_state(x + shift)
        errors[shift] = np.mean(np.abs(forecast[500:-1] - (x + shift)[501:]))
    assert errors[level] <= errors[0.0] * 1.02, errors


def test_the_packed_state_restores_bit_for_bit():
    rng = np.random.default_rng(6)
    x = 1e9 + np.cumsum(rng.normal(0, 1e6, 300))  # 10 significant digits
    state, _ = learnt_state(x)
    push_history(state, np.array([np.nan]))  # an unseen slot in the history
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


def test_a_snapshot_of_the_float16_layout_is_converted_not_dropped():
    # Changelogs written while the history was float16: four readings to a word, times 2**k
    # (k in the word after them), then the rest as now.
    x = 1e3 + np.cumsum(np.random.default_rng(4).normal(0, 1, 300))
    state, _ = learnt_state(x)
    k = 10.0 - 15  # 1e3 < 2**10: the largest reading stored in [2**14, 2**15)
    halves = (x[-N_HISTORY:] * 2.0 ** -k).astype(np.float16)
    rest = slice(expert_state._W.start, expert_state._REF)  # (that layout had no reference)
    old = np.concatenate([halves.view(np.float64), [k], state[0, rest]])
    assert old.shape == (F16_PACKED_SIZE,) and expert_state.readable(old)
    new = unpack(old)
    assert new.shape == (STATE_SIZE,)
    kept = history(new[None])[0] + reference(new[None])[0]  # (from its newest reading now)
    assert reference(new[None])[0] == halves[-1].astype(np.float64) * 2.0 ** k
    np.testing.assert_allclose(kept, halves.astype(np.float64) * 2.0 ** k, rtol=0, atol=1e-4)
    assert np.max(np.abs(kept - x[-N_HISTORY:])) <= 2.0 ** (10 - 11)
    np.testing.assert_array_equal(new[rest], state[0, rest])
    unseen = np.concatenate([np.full(N_HISTORY // 4, np.nan), [np.nan],
                             state[0, rest]])  # before the first reading
    assert np.isnan(history(unpack(unseen)[None])).all()
    assert np.isnan(reference(unpack(unseen)[None])[0])  # (its first reading will be, as a new device's)


def test_a_snapshot_of_readings_kept_as_they_were_is_kept_from_its_newest_reading():
    """Changelogs written before the reference (2026-12-05 to 12-07): the same readings, now
    kept from the newest (kept from 0, a 2.4 GHz device stayed at 256 Hz steps, a review)."""
    x = 2.4e9 + np.cumsum(np.random.default_rng(5).normal(0, 1, 300))
    state, _ = learnt_state(x)
    absolute = state[0].copy()
    history(absolute[None])[0] = history(state)[0] + reference(state)[0]  # as it was kept then
    old = absolute[: expert_state._REF]
    assert old.shape == (expert_state.ABSOLUTE_PACKED_SIZE,) and expert_state.readable(old)
    new = unpack(old)
    before = history(absolute[None])[0].astype(np.float64)
    assert new.shape == (STATE_SIZE,) and reference(new[None])[0] == before[-1]
    np.testing.assert_array_equal(history(new[None])[0] + reference(new[None])[0], before)
    push_history(new[None], np.array([before[-1] + 1.25]))  # and the next reading to the Hz
    assert history(new[None])[0, -1] + reference(new[None])[0] == before[-1] + 1.25


@pytest.mark.parametrize("size", [PACKED_SIZE - 2, PACKED_SIZE + 1, 0])
def test_a_packed_state_of_another_size_is_refused(size):
    # The table starts such a device afresh (a snapshot of another layout); unpack itself
    # never turns it into a state silently.
    assert not expert_state.readable(np.zeros(size))
    with pytest.raises(ValueError):
        unpack(np.zeros(size))
