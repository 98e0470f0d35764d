"""SimpleLSTM and ModelSpec (models/lstm.py): a whole sequence through ``forward`` (or, with
others of other lengths, through ``forward_packed``) equals the same readings one by one through
``step``, ``step`` leaves the caller's state alone, the scale is kept in range, and the spec
builds the model it describes."""

import pytest
import torch
from torch.nn.utils.rnn import pack_sequence

from stream_lstm.models.lstm import LOG_B_MAX, LOG_B_MIN, ModelSpec, SimpleLSTM


@pytest.mark.parametrize("layers", [1, 2])
def test_forward_over_a_sequence_equals_stepping_it_from_any_state(layers):
    torch.manual_seed(0)
    model = SimpleLSTM(n_features=2, hidden_size=8, num_layers=layers, horizon=3).eval()
    x = torch.randn(4, 7, 2)
    start = (torch.randn(layers, 4, 8), torch.randn(layers, 4, 8))  # a device seen before
    with torch.no_grad():
        mu, log_b, (h, c) = model(x, start)
        h1, c1 = start
        for t in range(7):
            mu_t, log_b_t, h1, c1 = model.step(x[:, t], h1, c1)
            torch.testing.assert_close(mu_t, mu[:, t], atol=1e-6, rtol=0)
            torch.testing.assert_close(log_b_t, log_b[:, t], atol=1e-6, rtol=0)
    assert mu.shape == log_b.shape == (4, 7, 3) and h.shape == c.shape == (layers, 4, 8)
    torch.testing.assert_close(h1, h, atol=1e-6, rtol=0)
    torch.testing.assert_close(c1, c, atol=1e-6, rtol=0)


@pytest.mark.parametrize("layers", [1, 2])
def test_sequences_of_other_lengths_packed_together_equal_stepping_each(layers):
    torch.manual_seed(0)
    model = SimpleLSTM(n_features=2, hidden_size=8, num_layers=layers, horizon=3).eval()
    lengths = [2, 6, 1, 6]  # not sorted: pack_sequence sorts them and forward_packed keeps order
    seqs = [torch.randn(n, 2) for n in lengths]
    start = (torch.randn(layers, 4, 8), torch.randn(layers, 4, 8))
    packed = pack_sequence(seqs, enforce_sorted=False)
    with torch.no_grad():
        mu, log_b, (h, c) = model.forward_packed(packed, start)
        assert mu.shape == log_b.shape == (sum(lengths), 3) and h.shape == (layers, 4, 8)
        # Rows of packed.data: time-major over the sequences sorted longest first.
        row = {}
        for t in range(max(lengths)):
            for k in packed.sorted_indices.tolist():
                if t < lengths[k]:
                    row[k, t] = len(row)
        for k, seq in enumerate(seqs):
            h1, c1 = start[0][:, k : k + 1], start[1][:, k : k + 1]
            for t in range(lengths[k]):
                mu_t, log_b_t, h1, c1 = model.step(seq[t : t + 1], h1, c1)
                torch.testing.assert_close(mu_t[0], mu[row[k, t]], atol=1e-6, rtol=0)
                torch.testing.assert_close(log_b_t[0], log_b[row[k, t]], atol=1e-6, rtol=0)
            torch.testing.assert_close(h1[:, 0], h[:, k], atol=1e-6, rtol=0)
            torch.testing.assert_close(c1[:, 0], c[:, k], atol=1e-6, rtol=0)


def test_step_returns_new_state_and_leaves_the_callers_alone():
    model = SimpleLSTM(1, 4, 2, 2).eval()
    h, c = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    h_before, c_before = h.clone(), c.clone()
    with torch.no_grad():
        mu, log_b, h2, c2 = model.step(torch.randn(3, 1), h, c)
    assert mu.shape == log_b.shape == (3, 2)
    assert torch.equal(h, h_before) and torch.equal(c, c_before)
    assert not torch.equal(h2, h)


def test_devices_in_one_batch_do_not_affect_each_other():
    torch.manual_seed(1)
    model = SimpleLSTM(1, 8, 1, 3).eval()
    x = torch.randn(3, 1)
    h, c = model.zero_state(3)
    with torch.no_grad():
        together = model.step(x, h, c)[0]
        alone = model.step(x[1:2], *model.zero_state(1))[0]
    torch.testing.assert_close(together[1:2], alone, atol=1e-6, rtol=0)


def test_the_log_scale_is_clamped_so_intervals_stay_finite():
    model = SimpleLSTM(1, 4, 1, 2).eval()
    with torch.no_grad():
        model.head.bias[2:] = 100.0  # the log-scale half of the head
        _, high, _ = model(torch.zeros(1, 3, 1))
        model.head.bias[2:] = -100.0
        _, low, _ = model(torch.zeros(1, 3, 1))
    assert (high == LOG_B_MAX).all() and (low == LOG_B_MIN).all()
    assert torch.isfinite(torch.exp(high)).all() and (torch.exp(low) > 0).all()


def test_zero_state_is_a_device_never_seen():
    h, c = SimpleLSTM(1, 5, 3, 2).zero_state(4)
    assert h.shape == c.shape == (3, 4, 5) and not h.any() and not c.any()
    assert h.data_ptr() != c.data_ptr()  # two tensors: updating one leaves the other


def test_the_spec_builds_the_model_it_describes():
    spec = ModelSpec(n_features=3, hidden_size=6, num_layers=2, horizon=4, target_channel=1, dropout=0.1)
    model = SimpleLSTM.from_spec(spec)
    assert (model.n_features, model.hidden_size, model.num_layers, model.horizon) == (3, 6, 2, 4)
    assert model.lstm.dropout == 0.1 and model.dropout.p == 0.1
    assert model.head.out_features == 2 * 4  # a location and a log-scale per step ahead
    assert ModelSpec(**spec.to_dict()) == spec  # what the registry stores beside the weights
    assert spec.to_dict()["target_channel"] == 1
    # One layer: nothing between layers to drop out of (torch would warn and ignore it).
    assert SimpleLSTM(1, 4, 1, 2, dropout=0.5).lstm.dropout == 0.0


def test_a_reading_with_the_wrong_number_of_channels_is_refused():
    model = SimpleLSTM(2, 4, 1, 2)
    with pytest.raises(RuntimeError, match="input.size\\(-1\\) must be equal to input_size"):
        model(torch.zeros(1, 3, 1))
    with pytest.raises(RuntimeError):
        model.step(torch.zeros(1, 3), *model.zero_state(1))
