import copy

import numpy as np
import torch

from stream_lstm.models import SimpleLSTM
from stream_lstm.training.gate import decide
from stream_lstm.training.tbptt import change_targets, evaluate, tbptt_step, train_tbptt


def test_change_targets_by_hand():
    z = torch.tensor([[[1.0], [3.0], [6.0]]])
    y, mask = change_targets(z, horizon=2)
    assert y[0, 0].tolist() == [2.0, 5.0] and y[0, 1, 0] == 3.0
    assert mask[0].tolist() == [[True, True], [True, False], [False, False]]


def test_gradients_do_not_flow_past_k2_steps():
    torch.manual_seed(0)
    model = SimpleLSTM(1, 4, 1, 1)
    x = torch.randn(1, 8, 1, requires_grad=True)
    y = torch.randn(1, 8, 1)
    mask = torch.zeros(1, 8, 1, dtype=torch.bool)
    mask[0, 6:8] = True  # only the last chunk (k1=2: outputs 6, 7) carries loss
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    tbptt_step(model, x, y, mask, k1=2, k2=3, optimizer=opt, grad_clip=1.0)
    grad = x.grad[0, :, 0]
    assert torch.all(grad[:5] == 0), grad  # steps before end - k2 = 5 get nothing
    assert torch.all(grad[5:] != 0), grad  # the k2 steps of the window all get gradient


def sine_seqs(n, length=48, noise=0.05, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(length)
    return [(np.sin(t / 3 + rng.uniform(0, 6)) + rng.normal(0, noise, length))[:, None].astype(np.float32)
            for _ in range(n)]


def test_training_beats_persistence_and_gate_decides():
    torch.manual_seed(0)
    train, hold = sine_seqs(40), sine_seqs(10, seed=1)
    champion = SimpleLSTM(1, 16, 1, 3)
    challenger = copy.deepcopy(champion)
    res = train_tbptt(challenger, train, hold, k1=8, k2=16, max_epochs=15, patience=4, lr=5e-3)
    assert res.val_losses[-1] < res.val_losses[0]
    m = evaluate(challenger, hold)
    assert m["mae"] < 0.7 * m["persistence_mae"]
    assert decide(champion, challenger, hold, margin=0.05).promote
    corrupted = copy.deepcopy(challenger)
    with torch.no_grad():
        for p in corrupted.parameters():
            p.mul_(50).add_(torch.randn_like(p))
    verdict = decide(challenger, corrupted, hold, margin=0.05)
    assert not verdict.promote and "does not beat" in verdict.reason
