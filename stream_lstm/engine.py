"""The batched stateful engine: one LSTM step for every device in a batch, no I/O.

For all devices that received readings in a poll, the engine gathers their ``h``/``c`` rows
from the :class:`~stream_lstm.state.table.DeviceTable`, runs **one** ``SimpleLSTM.step`` for
the whole batch, and scatters the new rows back. When a device sent several readings in one
poll, its readings are applied in order, one per *round*: round ``r`` holds every device's
``r``-th reading, so each round is still one batched step and rounds run in sequence.

The inputs of all rounds travel to the compute device in **one** host-to-device copy, and the
outputs of all rounds come back in one copy; between them everything stays on the device.

>>> import numpy as np, torch
>>> from stream_lstm.models import SimpleLSTM
>>> from stream_lstm.state.table import DeviceTable
>>> model = SimpleLSTM(n_features=1, hidden_size=8, num_layers=1, horizon=2)
>>> table = DeviceTable(max_devices=10, window=4, n_features=1, num_layers=1, hidden_size=8)
>>> slots = table.slots_for(["a", "b"], [0, 0], now=0.0)
>>> engine = BatchedEngine(model, table)
>>> mu, log_b = engine.step(slots, np.zeros((2, 1), np.float32), [(0, 2)])
>>> mu.shape
(2, 2)
"""

from __future__ import annotations

import numpy as np
import torch

from stream_lstm.models.lstm import SimpleLSTM
from stream_lstm.state.table import DeviceTable

# Slots travel packed as float32 beside the inputs (one copy per batch); float32 holds
# every integer below 2**24 exactly.
MAX_PACKED_SLOT = 2**24


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available, else CPU; ``cuda`` fails clearly when absent."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("STREAM_LSTM_DEVICE=cuda but torch sees no CUDA device")
    return torch.device(name)


def set_inference_threads(threads: int) -> int:
    """Set torch's intra-op threads for this process (``STREAM_LSTM_TORCH_THREADS``); returns
    the number in force.

    ``0`` means the CPUs this process may run on (its affinity mask, which a container's
    cpuset narrows), where torch by itself would take every core of the host.

    >>> set_inference_threads(1)
    1
    """
    import os

    n = threads if threads > 0 else len(os.sched_getaffinity(0))
    torch.set_num_threads(n)
    return torch.get_num_threads()


class BatchedEngine:
    """Runs one batched ``step`` per round over a :class:`DeviceTable`'s state.

    Parameters
    ----------
    model
        The served :class:`SimpleLSTM` (moved to the table's device, eval mode).
    table
        Holds ``h``/``c`` for all devices; updated in place.
    """

    def __init__(self, model: SimpleLSTM, table: DeviceTable) -> None:
        self.table = table
        self.model = model.to(table.device).eval()
        self.horizon = model.horizon

    def swap_model(self, model: SimpleLSTM) -> None:
        """Serve new weights from the next batch on (call between batches)."""
        self.model = model.to(self.table.device).eval()
        self.horizon = model.horizon

    @torch.inference_mode()
    def step(
        self,
        slots: np.ndarray,
        z: np.ndarray,
        rounds: list[tuple[int, int]],
        reset: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Advance devices by one reading per row.

        Parameters
        ----------
        slots
            ``[N]`` table slots, sorted so that each round is a contiguous range.
        z
            ``[N, F]`` normalized readings.
        rounds
            ``(start, end)`` row ranges; a slot appears at most once per round.
        reset
            ``[N]`` booleans: zero the device's ``h``/``c`` before this row (a gap).

        Returns ``mu`` and ``log_b``, each ``[N, H]`` float32 numpy arrays.
        """
        n, f = z.shape
        if n == 0:
            return np.zeros((0, self.horizon), np.float32), np.zeros((0, self.horizon), np.float32)
        packed = np.empty((n, f + 2), np.float32)
        packed[:, :f] = z
        packed[:, f] = slots
        packed[:, f + 1] = 0.0 if reset is None else reset
        x = torch.from_numpy(packed).to(self.table.device, non_blocking=True)
        slot_t = x[:, f].long()
        any_reset = reset is not None and bool(reset.any())
        h, c = self.table.h, self.table.c
        out = torch.empty(n, 2 * self.horizon, device=self.table.device)
        for start, end in rounds:
            sl = slot_t[start:end]
            hr, cr = h.index_select(1, sl), c.index_select(1, sl)
            if any_reset:
                keep = (x[start:end, f + 1] == 0).to(hr.dtype)[None, :, None]
                hr, cr = hr * keep, cr * keep
            mu, log_b, hr, cr = self.model.step(x[start:end, :f], hr, cr)
            h.index_copy_(1, sl, hr)
            c.index_copy_(1, sl, cr)
            out[start:end, : self.horizon] = mu
            out[start:end, self.horizon :] = log_b
        res = out.cpu().numpy()
        return res[:, : self.horizon], res[:, self.horizon :]

    @torch.inference_mode()
    def rewarm(self, slots: np.ndarray) -> None:
        """Recompute ``h``/``c`` of ``slots`` by replaying their windows from zero state.

        Used after a hot-swap (and for restored state from an older model shape): each
        device's rolling window goes through the current weights in one batched pass, so no
        device mixes hidden state from old weights with new ones. Windows are right-aligned;
        a device joins the pass at its first real reading.
        """
        if len(slots) == 0:
            return
        windows, lengths = self.table.window.right_aligned(slots)
        size = windows.shape[1]
        x = torch.from_numpy(windows).to(self.table.device)
        h, c = self.model.zero_state(len(slots), self.table.device)
        full = torch.from_numpy(np.flatnonzero(lengths == size)).to(self.table.device)
        if len(full):
            # Full windows: one fused forward over the whole sequence (much faster on CPU).
            _, _, (hf, cf) = self.model(x.index_select(0, full))
            h, c = h.index_copy(1, full, hf), c.index_copy(1, full, cf)
        part = np.flatnonzero(lengths < size)
        if len(part):
            start = torch.from_numpy(size - lengths).to(self.table.device)
            for t in range(int((size - lengths[part]).min()), size):
                active = ((start <= t) & (start > 0)).nonzero().squeeze(1)
                if len(active) == 0:
                    continue
                _, _, ha, ca = self.model.step(
                    x[active, t], h.index_select(1, active), c.index_select(1, active)
                )
                h = h.index_copy(1, active, ha)
                c = c.index_copy(1, active, ca)
        idx = torch.as_tensor(slots, device=self.table.device)
        self.table.h.index_copy_(1, idx, h)
        self.table.c.index_copy_(1, idx, c)
