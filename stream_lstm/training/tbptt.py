"""Training with truncated backpropagation through time, TBPTT(k1, k2).

The network runs forward over a sequence ``k1`` steps at a time, carrying its hidden state
from chunk to chunk; after each chunk it backpropagates that chunk's loss through the last
``k2`` steps only, then updates the weights (R. J. Williams & J. Peng, "An efficient
gradient-based algorithm for on-line training of recurrent network trajectories", Neural
Computation 2(4), 1990; I. Sutskever, "Training recurrent neural networks", PhD thesis,
Toronto 2013, §2.8.6).

How it is done here (:func:`tbptt_chunks`): the chunk ending at ``e`` covers the window
``[s, e)`` with ``s = max(0, e - k2)``; it starts from the hidden state at ``s``, *detached*,
so no gradient reaches an input before ``s``, and its loss covers the chunk's own outputs
``[e - k1, e)``. While running the window, the state at the next chunk's window start is kept
(detached), so each reading is run forward about ``k2 / k1`` times and never from scratch.

* ``k1`` (``STREAM_LSTM_TBPTT_K1``): how often the weights update. Smaller = more updates per
  sequence, noisier and slower per epoch.
* ``k2`` (``STREAM_LSTM_TBPTT_K2``): how far back credit is assigned; ``k2 < k1`` is raised
  to ``k1`` (every output of a chunk then still sees its own chunk). Larger = longer
  dependencies can be learnt, at more memory and compute per update (and a greater risk of
  exploding gradients, which clipping tames).

The loss is the Laplace negative log-likelihood (without the constant ``log 2``),
``|y - mu| / b + log b`` with ``b = exp(log_b)``, of the change of the target channel
``z[t+k+1] - z[t]`` for every valid ``(t, k)``, ``t + k + 1 < T``. Training
uses AdamW (weight decay), gradient-norm clipping, ReduceLROnPlateau on the validation loss
and early stopping that restores the best weights (the starting weights count as a
candidate, so training never hands back a model worse on validation than it was given).
Sequences of different lengths are padded at the end and masked: the network is causal, so
padding after a sequence never changes its outputs.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from stream_lstm.models.lstm import SimpleLSTM
from stream_lstm.signals import raise_if_interrupted

ProgressFn = Callable[[int, float, float], None]


@dataclass
class TrainResult:
    """What :func:`train_tbptt` did. ``model`` holds the best weights (already restored).

    Parameters
    ----------
    model
        The trained model, with the best weights.
    train_losses, val_losses
        Mean NLL per epoch.
    epochs, seconds
        Epochs run, and the wall time.
    best_val, best_epoch, initial_val
        The best validation NLL and its epoch (0: the starting weights were never beaten);
        the starting weights' validation NLL.
    stopped
        ``should_stop()`` ended training early.
    skipped_updates
        Chunks whose loss was not finite (no update made).

    Examples
    --------
    >>> import numpy as np, torch
    >>> from stream_lstm.models import SimpleLSTM
    >>> _ = torch.manual_seed(0)
    >>> t = np.arange(400, dtype=np.float32)
    >>> seqs = [np.sin(t[i:i + 64] / 4)[:, None] for i in range(0, 320, 16)]
    >>> model = SimpleLSTM(1, 8, 1, 2)
    >>> res = train_tbptt(model, seqs[:16], seqs[16:], k1=16, k2=32, lr=2e-2, max_epochs=2)
    >>> res.best_val < res.initial_val, res.epochs
    (True, 2)
    """

    model: SimpleLSTM
    train_losses: list[float] = field(default_factory=list)
    val_losses: list[float] = field(default_factory=list)
    epochs: int = 0
    best_val: float = math.inf
    best_epoch: int = 0
    initial_val: float = math.nan
    stopped: bool = False
    skipped_updates: int = 0
    seconds: float = 0.0


def targets_from_z(z, horizon: int, target: int = 0, lengths=None):
    """Targets ``y[..., t, k] = z[..., t+k+1, target] - z[..., t, target]`` and their mask.

    ``z`` is ``[T, F]`` or ``[B, T, F]`` (numpy or torch; the result has the same kind).
    ``mask[..., t, k]`` is true where ``t + k + 1 < T`` (or ``< lengths[b]`` for a padded
    batch); ``y`` is 0 elsewhere.

    >>> y, mask = targets_from_z(np.array([[0.0], [1.0], [3.0]]), horizon=2)
    >>> y.tolist(), mask.tolist()
    ([[1.0, 3.0], [2.0, 0.0], [0.0, 0.0]], [[True, True], [True, False], [False, False]])
    """
    as_numpy = isinstance(z, np.ndarray)
    zt = torch.as_tensor(z)
    squeeze = zt.dim() == 2
    if squeeze:
        zt = zt.unsqueeze(0)
    b, t_len, _ = zt.shape
    if lengths is None:
        lens = torch.full((b,), t_len, dtype=torch.long)
    else:
        lens = torch.as_tensor(lengths, dtype=torch.long).reshape(b)
    zc = zt[:, :, target]
    y = torch.zeros(b, t_len, horizon, dtype=zt.dtype, device=zt.device)
    steps = torch.arange(t_len).view(1, t_len, 1)
    ks = torch.arange(horizon).view(1, 1, horizon)
    mask = (steps + ks + 1 < lens.view(b, 1, 1)).to(zt.device)
    for k in range(min(horizon, t_len - 1)):
        y[:, : t_len - k - 1, k] = zc[:, k + 1 :] - zc[:, : t_len - k - 1]
    y = y * mask
    if squeeze:
        y, mask = y[0], mask[0]
    return (y.numpy(), mask.numpy()) if as_numpy else (y, mask)


def laplace_nll(mu: Tensor, log_b: Tensor, y: Tensor, mask: Tensor) -> tuple[Tensor, int]:
    """``(sum of the NLL over mask, number of entries)``; NLL = ``|y - mu| / b + log b``.

    Its minimiser in ``mu`` is the median of ``y``, and in ``b`` the mean absolute deviation
    from it, so a well-trained head is calibrated for Laplace intervals.

    >>> total, n = laplace_nll(torch.zeros(2), torch.zeros(2), torch.tensor([1.0, -3.0]),
    ...                        torch.tensor([True, True]))
    >>> float(total), n
    (4.0, 2)
    """
    nll = (y - mu).abs() * torch.exp(-log_b) + log_b
    return nll[mask].sum(), int(mask.sum())


def chunk_bounds(t_len: int, k1: int, k2: int) -> list[tuple[int, int, int]]:
    """``(window_start, loss_start, end)`` of every TBPTT chunk of a ``t_len`` sequence.

    >>> chunk_bounds(10, k1=4, k2=6)
    [(0, 0, 4), (2, 4, 8), (4, 8, 10)]
    """
    if k1 < 1:
        raise ValueError(f"k1 must be >= 1, got {k1}")
    k2 = max(k2, k1)
    return [(max(0, min(b + k1, t_len) - k2), b, min(b + k1, t_len)) for b in range(0, t_len, k1)]


def tbptt_chunks(model: SimpleLSTM, x: Tensor, y: Tensor, mask: Tensor, k1: int, k2: int
                 ) -> Iterator[tuple[int, int, Tensor, int]]:
    """Yield ``(window_start, end, loss, n)`` for each chunk of a batch ``x[B, T, F]``.

    ``loss`` is the mean NLL of the chunk's own outputs, with its graph reaching back to
    ``window_start`` only; the caller backpropagates it and may update the weights before
    asking for the next chunk. Chunks without a valid target are skipped.
    """
    bounds = chunk_bounds(x.shape[1], k1, k2)
    state: tuple[Tensor, Tensor] | None = None  # detached state at bounds[i][0]
    for i, (start, loss_start, end) in enumerate(bounds):
        nxt = bounds[i + 1][0] if i + 1 < len(bounds) else end  # next window start, in [start, end]
        mus, log_bs = [], []
        carried = state
        if nxt > start:
            mu, ls, carried = model(x[:, start:nxt], carried)
            mus.append(mu)
            log_bs.append(ls)
        state = None if carried is None else (carried[0].detach(), carried[1].detach())
        if end > nxt:
            mu, ls, _ = model(x[:, nxt:end], carried)
            mus.append(mu)
            log_bs.append(ls)
        first = loss_start - start
        mu, ls = torch.cat(mus, 1)[:, first:], torch.cat(log_bs, 1)[:, first:]
        total, n = laplace_nll(mu, ls, y[:, loss_start:end], mask[:, loss_start:end])
        if n:
            yield start, end, total / n, n


def _device(model: SimpleLSTM) -> torch.device:
    return next(model.parameters()).device


def _padded_batches(seqs: list[np.ndarray], batch_size: int, rng: np.random.Generator | None,
                    max_elements: int = 1 << 18) -> list[tuple[Tensor, Tensor]]:
    """``[(x[B, T, F] float32, lengths[B])]``: sequences of similar length, padded at the end."""
    order = np.arange(len(seqs)) if rng is None else rng.permutation(len(seqs))
    order = sorted(order, key=lambda i: len(seqs[i]))  # stable: shuffled within a length
    out, i = [], 0
    while i < len(order):
        longest = len(seqs[order[min(i + batch_size, len(order)) - 1]])
        size = max(1, min(batch_size, max_elements // max(longest, 1)))
        group = [np.asarray(seqs[j], np.float32) for j in order[i : i + size]]
        i += size
        t_len = max(len(g) for g in group)
        x = np.zeros((len(group), t_len, group[0].shape[1]), np.float32)
        for b, g in enumerate(group):
            x[b, : len(g)] = g
        out.append((torch.from_numpy(x), torch.tensor([len(g) for g in group])))
    if rng is not None:
        out = [out[j] for j in rng.permutation(len(out))]
    return out


@torch.no_grad()
def evaluate(model: SimpleLSTM, seqs: list[np.ndarray], target: int = 0) -> dict[str, float]:
    """Held-out scores in normalized units, each sequence run from a zero state.

    ``nll``: mean Laplace NLL over every valid ``(t, k)``; ``mae``: one-step-ahead MAE of the
    target channel (``|mu[t, 0] - (z[t+1] - z[t])|``); ``persistence_mae``: the same for the
    all-zero forecast ("no change"). NaN when there is nothing to score.
    """
    was_training = model.training
    model.eval()
    dev = _device(model)
    nll_sum = mae_sum = persist_sum = 0.0
    n_nll = n_mae = 0
    for x, lengths in _padded_batches([s for s in seqs if len(s) > 1], 256, None):
        x = x.to(dev)
        mu, log_b, _ = model(x)
        y, mask = targets_from_z(x, model.horizon, target, lengths)
        total, n = laplace_nll(mu, log_b, y, mask)
        nll_sum += float(total)
        n_nll += n
        m0 = mask[:, :, 0]
        mae_sum += float((mu[:, :, 0] - y[:, :, 0]).abs()[m0].sum())
        persist_sum += float(y[:, :, 0].abs()[m0].sum())
        n_mae += int(m0.sum())
    model.train(was_training)
    nan = math.nan
    return {"nll": nll_sum / n_nll if n_nll else nan, "mae": mae_sum / n_mae if n_mae else nan,
            "persistence_mae": persist_sum / n_mae if n_mae else nan}


def evaluate_nll(model: SimpleLSTM, seqs: list[np.ndarray], target: int = 0) -> float:
    """Mean Laplace NLL over all valid ``(t, k)`` of ``seqs`` (see :func:`evaluate`)."""
    return evaluate(model, seqs, target)["nll"]


def evaluate_mae(model: SimpleLSTM, seqs: list[np.ndarray], target: int = 0) -> float:
    """One-step-ahead MAE of the target channel, normalized units (the promotion gate's score)."""
    return evaluate(model, seqs, target)["mae"]


class _Bar:
    """A one-line progress bar on stderr (no dependency); elsewhere than a terminal, a line an
    epoch."""

    def __init__(self, max_epochs: int) -> None:
        self.max_epochs, self.t0 = max_epochs, time.monotonic()

    def batch(self, epoch: int, done: int, total: int, loss: float) -> None:
        if not sys.stderr.isatty():  # (a log got every redraw; the epoch lines are enough there)
            return
        filled = int(20 * done / max(total, 1))
        print(f"\r  epoch {epoch}/{self.max_epochs} [{'#' * filled}{'.' * (20 - filled)}] "
              f"{done}/{total}  train nll {loss:.4f}  {time.monotonic() - self.t0:.0f}s   ",
              end="", file=sys.stderr, flush=True)

    def epoch(self, epoch: int, train: float, val: float) -> None:
        print(f"{chr(13) * sys.stderr.isatty()}  epoch {epoch}/{self.max_epochs}  train nll {train:.4f}  val nll {val:.4f}  "
              f"{time.monotonic() - self.t0:.0f}s" + " " * 20 * sys.stderr.isatty(), file=sys.stderr, flush=True)


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
    progress: bool | ProgressFn = False,
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Train ``model`` in place on normalized sequences ``[T, F]``; the best weights are kept.

    ``val_seqs`` drive the LR schedule, early stopping (``patience`` epochs without a better
    validation NLL) and the choice of weights; without them the training sequences, scored the
    same way after each epoch.
    ``progress``: ``True`` draws a bar on stderr; a callable gets ``(epoch, train_nll,
    val_nll)`` after each epoch. ``should_stop()`` is asked after every batch: when true,
    training ends early (``result.stopped``), still restoring the best weights.
    """
    t0 = time.monotonic()
    if k1 < 1 or batch_size < 1 or max_epochs < 0 or patience < 1:
        raise ValueError("need k1 >= 1, batch_size >= 1, max_epochs >= 0, patience >= 1")
    rng = np.random.default_rng(seed)
    dev = _device(model)
    train_seqs = [s for s in train_seqs if len(s) > 1]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, factor=0.5, patience=max(0, patience // 2))
    bar = _Bar(max_epochs) if progress is True else None
    callback = progress if callable(progress) else None

    def validate(fallback: float) -> float:
        # Without validation sequences, the training sequences scored as the start was (the
        # epoch's final weights, no dropout): the epoch's running loss, over weights that moved
        # during it (and with dropout on), runs above what the final weights score, so a better
        # epoch could count as worse than the start (measured: by up to 0.47 nats).
        seqs = val_seqs or train_seqs
        return evaluate(model, seqs, target)["nll"] if seqs else fallback

    result = TrainResult(model=model)
    result.initial_val = validate(math.nan)
    result.best_val = result.initial_val if math.isfinite(result.initial_val) else math.inf
    best_state = copy.deepcopy(model.state_dict())
    stale = 0
    for epoch in range(1, max_epochs + 1):
        model.train()
        batches = _padded_batches(train_seqs, batch_size, rng)
        loss_sum, n_sum = 0.0, 0
        for b, (x, lengths) in enumerate(batches):
            x = x.to(dev)
            y, mask = targets_from_z(x, model.horizon, target, lengths)
            for _, _, loss, n in tbptt_chunks(model, x, y, mask, k1, k2):
                raise_if_interrupted()  # (a stop signal's KeyboardInterrupt can be lost: signals.py)
                if not torch.isfinite(loss):
                    result.skipped_updates += 1
                    continue
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
                optimizer.step()
                loss_sum += loss.detach().item() * n
                n_sum += n
            if bar is not None:
                bar.batch(epoch, b + 1, len(batches), loss_sum / max(n_sum, 1))
            if should_stop is not None and should_stop():
                result.stopped = True
                break
        train = loss_sum / n_sum if n_sum else math.nan
        val = validate(train)
        result.train_losses.append(train)
        result.val_losses.append(val)
        result.epochs = epoch
        if bar is not None:
            bar.epoch(epoch, train, val)
        if callback is not None:
            callback(epoch, train, val)
        if math.isfinite(val):
            scheduler.step(val)
        if math.isfinite(val) and val < result.best_val - 1e-6:
            result.best_val, result.best_epoch, stale = val, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            stale += 1
        if result.stopped or stale >= patience:
            break
    model.load_state_dict(best_state)
    model.eval()
    result.seconds = time.monotonic() - t0
    return result
