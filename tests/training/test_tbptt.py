import math

import numpy as np
import pytest
import torch

from stream_lstm.models.lstm import SimpleLSTM
from stream_lstm.state.normalizer import normalize_sequence
from stream_lstm.training.tbptt import (
    chunk_bounds,
    evaluate,
    evaluate_mae,
    evaluate_nll,
    laplace_nll,
    targets_from_z,
    tbptt_chunks,
    train_tbptt,
)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models train fastest on one thread (and do not fight other test processes)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def sine_seqs(n: int = 2000, period: float = 20.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    x = np.sin(2 * np.pi * t / period) + 0.05 * rng.standard_normal(n)
    z, _, _ = normalize_sequence(x[:, None])
    z = z[50:]
    seqs = [z[i : i + 64] for i in range(0, len(z) - 64, 32)]
    return seqs[:40], seqs[45:]


def test_targets_are_future_changes_masked_per_length():
    z = torch.tensor([[[0.0], [1.0], [3.0], [6.0]], [[0.0], [2.0], [0.0], [0.0]]])
    y, mask = targets_from_z(z, horizon=2, lengths=[4, 2])
    assert y[0].tolist() == [[1.0, 3.0], [2.0, 5.0], [3.0, 0.0], [0.0, 0.0]]
    assert mask[1].tolist() == [[True, False], [False, False], [False, False], [False, False]]
    assert y[1, 0].tolist() == [2.0, 0.0]  # the padding is never a target


def test_chunks_cover_every_output_once_and_windows_are_k2_long():
    for t_len, k1, k2 in [(40, 5, 12), (37, 8, 8), (10, 4, 3), (5, 16, 32)]:
        bounds = chunk_bounds(t_len, k1, k2)
        covered = [t for _, lo, hi in bounds for t in range(lo, hi)]
        assert covered == list(range(t_len))
        for start, lo, end in bounds:
            assert end - lo <= k1 and start == max(0, end - max(k1, k2))


def test_tbptt_gradients_reach_back_exactly_k2_steps():
    torch.manual_seed(0)
    model = SimpleLSTM(n_features=1, hidden_size=4, num_layers=1, horizon=2)
    t_len, k1, k2 = 40, 5, 12
    x = torch.randn(2, t_len, 1, requires_grad=True)
    y, mask = targets_from_z(x.detach(), 2)
    seen = 0
    for start, end, loss, _ in tbptt_chunks(model, x, y, mask, k1, k2):
        x.grad = None
        loss.backward()
        g = x.grad.abs().sum(dim=(0, 2))  # per time step
        assert torch.all(g[:start] == 0), f"gradient leaked before the k2 window of chunk {end}"
        assert torch.all(g[end:] == 0)
        assert torch.all(g[start : min(end, t_len - 1)] > 0), f"no gradient inside window {start}:{end}"
        if end >= k2:
            assert end - start == k2
        seen += 1
    assert seen == len(chunk_bounds(t_len, k1, k2))


def test_chunks_carry_the_state_the_whole_sequence_would_have():
    torch.manual_seed(1)
    model = SimpleLSTM(1, 8, 2, 3).eval()
    x = torch.randn(3, 50, 1)
    y, mask = targets_from_z(x, 3)
    with torch.no_grad():
        total = sum(float(loss) * n for _, _, loss, n in tbptt_chunks(model, x, y, mask, 7, 11))
        mu, ls, _ = model(x)
        full, n_full = laplace_nll(mu, ls, y, mask)
    assert total == pytest.approx(float(full), rel=1e-5)
    assert n_full == int(mask.sum())


def test_padded_evaluation_equals_separate_evaluation():
    torch.manual_seed(2)
    model = SimpleLSTM(1, 8, 1, 3).eval()
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(30, 1)).astype(np.float32), rng.normal(size=(55, 1)).astype(np.float32)
    both = evaluate(model, [a, b])
    ea, eb = evaluate(model, [a]), evaluate(model, [b])
    n_a, n_b = sum(30 - k - 1 for k in range(3)), sum(55 - k - 1 for k in range(3))
    assert both["nll"] == pytest.approx((ea["nll"] * n_a + eb["nll"] * n_b) / (n_a + n_b), rel=1e-5)
    assert both["mae"] == pytest.approx((ea["mae"] * 29 + eb["mae"] * 54) / 83, rel=1e-5)
    assert math.isnan(evaluate_mae(model, []))


def test_training_reduces_validation_loss_on_a_sine():
    torch.manual_seed(0)
    train, val = sine_seqs()
    model = SimpleLSTM(1, 16, 1, 3)
    before = evaluate(model, val)
    res = train_tbptt(model, train, val, k1=8, k2=16, lr=1e-2, max_epochs=8, patience=3,
                      batch_size=16)
    after = evaluate(model, val)
    assert res.best_val == pytest.approx(after["nll"], rel=1e-6)  # best weights restored
    assert after["nll"] < before["nll"] - 1.0
    assert after["mae"] < 0.6 * after["persistence_mae"]
    assert evaluate_nll(model, val) == pytest.approx(after["nll"])
    assert len(res.train_losses) == len(res.val_losses) == res.epochs >= 3
    assert not model.training


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_without_validation_sequences_each_epoch_is_judged_as_the_start_was(dropout):
    # A small fleet's retrain has no validation devices: the epoch's running loss (over weights
    # that moved during it, with dropout on where set) ran above what its final weights score,
    # against a start scored by those final-weights terms.
    torch.manual_seed(0)
    train, _ = sine_seqs()
    model = SimpleLSTM(1, 16, 1, 3, dropout=dropout)
    judged = []

    def progress(epoch, train_nll, val_nll):
        judged.append((val_nll, evaluate(model, train)["nll"], train_nll))

    result = train_tbptt(model, train, [], k1=8, k2=16, lr=1e-2, max_epochs=3, patience=3,
                         batch_size=16, progress=progress)
    assert result.initial_val < math.inf
    for val_nll, scored, running in judged:
        assert val_nll == pytest.approx(scored, rel=1e-6) and running != pytest.approx(scored, rel=1e-3)


def test_should_stop_ends_training_and_keeps_the_best_weights():
    train, val = sine_seqs(600)
    model = SimpleLSTM(1, 8, 1, 2)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []
    res = train_tbptt(model, train, val, k1=8, k2=16, max_epochs=50, batch_size=4,
                      should_stop=lambda: calls.append(1) or True,
                      progress=lambda *a: calls.append(a))
    assert res.stopped and res.epochs == 1 and len(calls) == 2
    if res.best_epoch == 0:  # the stopped epoch did not help: the starting weights come back
        assert all(torch.equal(start[k], v) for k, v in model.state_dict().items())


def test_a_diverged_model_hands_back_the_starting_weights():
    train, val = sine_seqs(600)
    model = SimpleLSTM(1, 8, 1, 2)
    with torch.no_grad():
        model.head.bias.fill_(float("nan"))
    res = train_tbptt(model, train, val, max_epochs=2, patience=1)
    assert res.skipped_updates > 0 and math.isinf(res.best_val) and res.best_epoch == 0


def test_the_progress_bar_redraws_on_a_terminal_and_writes_an_epoch_a_line_elsewhere(monkeypatch, capsys):
    """A log got every batch's redraw (a review)."""
    from stream_lstm.training import tbptt

    bar = tbptt._Bar(max_epochs=2)
    bar.batch(1, 3, 10, 0.5)
    bar.epoch(1, 0.5, 0.6)
    err = capsys.readouterr().err
    assert "\r" not in err and err.startswith("  epoch 1/2  train nll 0.5000  val nll 0.6000") and err.count("\n") == 1
    monkeypatch.setattr(tbptt.sys.stderr, "isatty", lambda: True)
    bar.batch(1, 3, 10, 0.5)
    bar.epoch(1, 0.5, 0.6)
    err = capsys.readouterr().err
    assert err.startswith("\r  epoch 1/2 [######") and "\r  epoch 1/2  train nll" in err
