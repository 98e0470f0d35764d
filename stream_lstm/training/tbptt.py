"""Training with truncated backpropagation through time (TBPTT).

The network runs forward over a sequence ``k1`` steps at a time, carrying its hidden state
across chunks; after each chunk it backpropagates the chunk's loss through the last ``k2``
steps only (Williams & Peng, 1990; Sutskever, 2013, §2.8.6). In practice: the state entering
the backward window (``k2`` steps before the chunk end) is detached, so no gradient flows
further back.

* ``k1`` (``STREAM_LSTM_TBPTT_K1``): how often the weights update. Smaller = more updates per
  sequence, noisier and slower per epoch.
* ``k2`` (``STREAM_LSTM_TBPTT_K2``, ``>= k1``): how far back credit is assigned. Larger = longer
  dependencies can be learnt, at more memory and compute per update (and a greater risk of
  exploding gradients, which clipping tames).

The loss is the Gaussian negative log-likelihood of the change of the target channel from
each step to the next H steps (see :mod:`stream_lstm.models.lstm`), with AdamW (weight decay),
gradient-norm clipping, ReduceLROnPlateau on validation loss and early stopping that keeps the
best weights.

>>> import numpy as np, torch
>>> from stream_lstm.models import SimpleLSTM
>>> _ = torch.manual_seed(0)
>>> t = np.arange(400, dtype=np.float32)
>>> seqs = [np.sin(t[i:i + 64] / 4)[:, None] for i in range(0, 320, 8)]
>>> model = SimpleLSTM(1, 16, 1, 2)
>>> res = train_tbptt(model, seqs[:30], seqs[30:], k1=8, k2=16, max_epochs=8, patience=3)
>>> res.val_losses[-1] < res.val_losses[0]
True
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from stream_lstm.models.lstm import SimpleLSTM


@dataclass
class TrainResult:
    model: SimpleLSTM
    train_losses: list[float] = field(default_factory=list)
    val_losses: list[float] = field(default_factory=list)
    epochs: int = 0
    best_val: float = math.inf
    seconds: float = 0.0


def change_targets(z: Tensor, horizon: int, target: int = 0) -> tuple[Tensor, Tensor]:
    """Targets ``y[b, t, k] = z[b, t+k+1, target] - z[b, t, target]`` and their validity mask."""
    b, t, _ = z.shape
    y = torch.zeros(b, t, horizon, dtype=z.dtype)
    mask = torch.zeros(b, t, horizon, dtype=torch.bool)
    zt = z[:, :, target]
    for k in range(horizon):
        if k + 1 < t:
            y[:, : t - k - 1, k] = zt[:, k + 1 :] - zt[:, : t - k - 1]
            mask[:, : t - k - 1, k] = True
    return y, mask


def gaussian_nll(mu: Tensor, log_sigma: Tensor, y: Tensor, mask: Tensor) -> Tensor:
    """Mean Gaussian NLL (without the constant) over valid entries."""
    nll = 0.5 * ((y - mu) * torch.exp(-log_sigma)) ** 2 + log_sigma
    return nll[mask].mean() if mask.any() else mu.sum() * 0.0


def tbptt_step(model: SimpleLSTM, x: Tensor, y: Tensor, mask: Tensor, k1: int, k2: int,
               optimizer: torch.optim.Optimizer, grad_clip: float) -> float:
    """One pass of TBPTT(k1, k2) over a batch of sequences; returns the mean chunk loss."""
    k2 = max(k2, k1)
    t_len = x.shape[1]
    state = None  # detached state at `pos`
    pos = 0
    losses = []
    for end in range(min(k1, t_len), t_len + k1, k1):
        end = min(end, t_len)
        start = max(0, end - k2)
        if start > pos:  # advance the carried state, without gradient, to the window start
            with torch.no_grad():
                _, _, state = model(x[:, pos:start], state)
            pos = start
        mu, log_sigma, _ = model(x[:, start:end], _detach(state))
        first = max(0, end - k1) - start  # the loss covers this chunk's k1 outputs only
        loss = gaussian_nll(mu[:, first:], log_sigma[:, first:], y[:, start + first : end],
                            mask[:, start + first : end])
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        losses.append(loss.item())
        if end >= t_len:
            break
    return float(np.mean(losses)) if losses else 0.0


def _detach(state: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor] | None:
    return None if state is None else (state[0].detach(), state[1].detach())


def _batches(seqs: list[np.ndarray], batch_size: int, rng: np.random.Generator | None):
    """Group equal-length sequences into tensors (shuffled when ``rng`` is given)."""
    by_len: dict[int, list[np.ndarray]] = {}
    for s in seqs:
        by_len.setdefault(len(s), []).append(s)
    out = []
    for group in by_len.values():
        order = rng.permutation(len(group)) if rng is not None else np.arange(len(group))
        for i in range(0, len(group), batch_size):
            out.append(torch.from_numpy(np.stack([group[j] for j in order[i : i + batch_size]])).float())
    if rng is not None:
        out = [out[i] for i in rng.permutation(len(out))]
    return out


@torch.no_grad()
def evaluate(model: SimpleLSTM, seqs: list[np.ndarray], target: int = 0) -> dict[str, float]:
    """Holdout metrics in normalized units: Gaussian NLL, one-step MAE, and persistence's MAE."""
    model.eval()
    nll_sum = mae_sum = persist_sum = 0.0
    n_nll = n_mae = 0
    for x in _batches(seqs, 256, None):
        mu, log_sigma, _ = model(x)
        y, mask = change_targets(x, model.horizon, target)
        nll = 0.5 * ((y - mu) * torch.exp(-log_sigma)) ** 2 + log_sigma
        nll_sum += float(nll[mask].sum())
        n_nll += int(mask.sum())
        m0 = mask[:, :, 0]
        mae_sum += float((mu[:, :, 0] - y[:, :, 0]).abs()[m0].sum())
        persist_sum += float(y[:, :, 0].abs()[m0].sum())
        n_mae += int(m0.sum())
    n_nll, n_mae = max(n_nll, 1), max(n_mae, 1)
    return {"nll": nll_sum / n_nll, "mae": mae_sum / n_mae, "persistence_mae": persist_sum / n_mae}


def train_tbptt(
    model: SimpleLSTM,
    train_seqs: list[np.ndarray],
    val_seqs: list[np.ndarray],
    *,
    k1: int = 16,
    k2: int = 32,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    grad_clip: float = 1.0,
    max_epochs: int = 20,
    patience: int = 3,
    batch_size: int = 64,
    target: int = 0,
    seed: int = 0,
    progress: Callable[[int, float, float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Train ``model`` (in place, best weights restored) on normalized sequences ``[T, F]``."""
    t0 = time.monotonic()
    rng = np.random.default_rng(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=1)
    result = TrainResult(model=model)
    best_state = copy.deepcopy(model.state_dict())
    stale = 0
    for epoch in range(max_epochs):
        model.train()
        losses = []
        for x in _batches(train_seqs, batch_size, rng):
            y, mask = change_targets(x, model.horizon, target)
            losses.append(tbptt_step(model, x, y, mask, k1, k2, optimizer, grad_clip))
            if should_stop is not None and should_stop():
                break
        val = evaluate(model, val_seqs, target)["nll"] if val_seqs else float(np.mean(losses))
        scheduler.step(val)
        result.train_losses.append(float(np.mean(losses)) if losses else math.nan)
        result.val_losses.append(val)
        result.epochs = epoch + 1
        if progress is not None:
            progress(epoch + 1, result.train_losses[-1], val)
        if val < result.best_val - 1e-6:
            result.best_val, stale = val, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            stale += 1
            if stale >= patience:
                break
        if should_stop is not None and should_stop():
            break
    model.load_state_dict(best_state)
    model.eval()
    result.seconds = time.monotonic() - t0
    return result
