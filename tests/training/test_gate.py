import copy

import numpy as np
import pytest
import torch

from stream_lstm.models.lstm import SimpleLSTM
from stream_lstm.state.normalizer import normalize_sequence
from stream_lstm.training.gate import decide, decide_from_errors
from stream_lstm.training.tbptt import train_tbptt


@pytest.fixture(scope="module")
def trained():
    """A small model trained on a noisy sine, and held-out sequences of the same signal."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rng = np.random.default_rng(3)
        t = np.arange(1500)
        x = np.sin(2 * np.pi * t / 20) + 0.05 * rng.standard_normal(len(t))
        z, _, _ = normalize_sequence(x[:, None])
        seqs = [z[i : i + 64] for i in range(50, len(z) - 64, 32)]
        torch.manual_seed(0)
        model = SimpleLSTM(1, 16, 1, 3)
        train_tbptt(model, seqs[:30], seqs[30:36], k1=8, k2=16, lr=1e-2, max_epochs=6,
                    batch_size=16)
        yield model, seqs[36:]
    finally:
        torch.set_num_threads(threads)


def corrupted(model: SimpleLSTM, how: str) -> SimpleLSTM:
    bad = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in bad.parameters():
            if how == "scaled":
                p.mul_(50.0)
            elif how == "noise":
                p.copy_(torch.randn(p.shape, generator=gen) * 3.0)
            else:
                p.fill_(float("nan"))
    return bad


@pytest.mark.parametrize("how", ["scaled", "noise", "nan"])
def test_a_corrupted_challenger_is_rejected(trained, how):
    model, holdout = trained
    d = decide(model, corrupted(model, how), holdout, margin=0.02)
    assert not d.promote
    assert np.isfinite(d.champion_error)
    if how == "nan":
        assert "not finite" in d.reason
    else:
        assert d.challenger_error > d.champion_error


def test_a_clearly_better_challenger_is_promoted(trained):
    model, holdout = trained
    torch.manual_seed(5)
    fresh = SimpleLSTM(1, 16, 1, 3)  # untrained: about persistence
    d = decide(fresh, model, holdout, margin=0.05)
    assert d.promote, d.reason
    assert d.challenger_error < d.champion_error * 0.95


def test_an_equal_challenger_does_not_clear_the_margin(trained):
    model, holdout = trained
    d = decide(model, copy.deepcopy(model), holdout, margin=0.02)
    assert not d.promote and d.challenger_error == pytest.approx(d.champion_error)
    assert decide_from_errors(1.0, 1.0, margin=0.0).promote is False  # strictly better only


def test_no_holdout_means_no_promotion(trained):
    model, _ = trained
    assert not decide(corrupted(model, "scaled"), model, [], margin=0.02).promote


def test_a_broken_champion_loses_to_any_finite_challenger():
    assert decide_from_errors(float("nan"), 5.0, margin=0.1).promote
    with pytest.raises(ValueError):
        decide_from_errors(1.0, 0.5, margin=-0.1)
