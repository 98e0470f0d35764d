"""The batched stateful engine: one LSTM step for every device in a batch, no I/O.

For all devices that received readings in a poll, the engine gathers their ``h``/``c`` rows
from the :class:`~stream_lstm.state.table.DeviceTable`, runs **one** ``SimpleLSTM.step`` for
the whole batch, and scatters the new rows back. When a device sent several readings in one
poll, its readings are applied in order, one per *round*: round ``r`` holds every device's
``r``-th reading, so each round is still one batched step and rounds run in sequence.

The inputs of all rounds travel to the compute device in **one** host-to-device copy, and the
outputs of all rounds come back in one copy; between them everything stays on the device.

A poll of many rounds (a backlog: catch-up after downtime, a replay, a small fleet) takes the
**fused** path instead: the model's input at a reading is the normalized reading alone (the
normalizer learns from readings, never from the model), so every round's input is known up
front, and each device's readings of the poll run as one sequence through **one** packed
``forward`` (cuDNN on the GPU) rather than one ``step`` per round. A reset (a gap) starts a
new sequence from zero state, as the step path zeroes h/c there. ``forecast.assemble`` then
runs its rounds on the outputs as before. Which path a poll takes is ``path_for(rounds)``:
fused from :data:`FUSE_MIN_ROUNDS` rounds on.

Weights by version: after a hot swap the engine holds the weights served before beside the new
ones (``models``, keyed by version). A device steps under the weights its h/c came from
(``table.model_version[slot]``) until it is re-warmed (:meth:`BatchedEngine.rewarm`, under the
served weights), so a batch runs in at most two groups, one per version held, each taking the
batch's path. A device with no version yet (new) steps under the served weights.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from stream_lstm.config import SettingsError
from stream_lstm.models.lstm import SimpleLSTM
from stream_lstm.state.table import DeviceTable

# Slots travel packed as float32 beside the inputs (one copy per batch); float32 holds
# every integer below 2**24 exactly, so settings bound max_devices by config.MAX_PACKED_SLOT.
# A poll with at least this many rounds runs through one packed forward (the fused path).
# Measured on CPU (docs/benchmarks.md, "Deep backlogs"): each step costs about 0.1 ms of calls
# whatever its size, and the packed forward of a 2,000-reading poll about 0.3 ms more than
# one step. From 4 rounds on, the fused path is faster when devices send evenly (1.5x at 4
# rounds of 500, 20x at 200 rounds of 10); at worst (one device with 4 readings among 2,000
# with one) it is 0.25 ms slower, about 1% of that poll's time in the pipeline.
FUSE_MIN_ROUNDS = 4


def step_rows(rows: int) -> int:
    """The batch a round of ``rows`` devices is stepped as: at least 16, then four sizes an
    octave (at most a quarter more rows than needed, the extra ones zeros and dropped).

    Why: torch's CPU LSTM (oneDNN) compiles and caches a kernel, ~230 KB, for every batch
    size it meets; a worker's rounds come in every size up to its poll, so its memory grew
    for an hour (a soak: ~55 MB at 800 devices), and past oneDNN's 1,024 cached sizes the
    eviction churn fragmented the heap without bound (1 GB after 16,000 steps of random sizes
    up to 2,000). Rounded, a poll of 2,000 is ~30 sizes.

    >>> [step_rows(n) for n in (1, 16, 17, 33, 100, 1100, 2000)]
    [16, 16, 20, 40, 112, 1280, 2048]
    """
    if rows <= 16:
        return 16
    quarter = 1 << (rows.bit_length() - 3)  # a quarter of the octave's base
    return -(-rows // quarter) * quarter


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available, else CPU; ``cuda`` fails clearly when absent."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        # (a SettingsError: the CLI says it in one line, not a traceback)
        raise SettingsError("invalid setting STREAM_LSTM_DEVICE: cuda, but torch sees no CUDA "
                            "device (set auto or cpu, or check the driver and the torch build)")
    return torch.device(name)


def set_inference_threads(threads: int) -> int:
    """Set torch's intra-op threads for this process (``STREAM_LSTM_TORCH_THREADS``); returns
    the number in force.

    ``0`` (auto) means one. The worker's steps are small (a poll's devices, hidden 64), and
    torch's extra intra-op threads spin between them: on the 2-core machine a second thread
    took a live worker at 500 readings/s from 0.22 to 0.39 ms of CPU a reading, and made a
    4,000-device backlog no faster (13.2k against 13.1k readings/s; docs/benchmarks.md). A
    bigger machine is used by more worker processes (``STREAM_LSTM_PROCESSES``), not threads.

    >>> set_inference_threads(0)
    1
    """
    n = threads if threads > 0 else 1
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
    fuse_min_rounds
        Polls of at least this many rounds take the fused path (one packed ``forward``).
    version
        The served model's version: the weights a device of this version, or of none yet, or
        of a version not held (see :meth:`hold`), steps under.

    Examples
    --------
    >>> import numpy as np, torch
    >>> from stream_lstm.models import SimpleLSTM
    >>> from stream_lstm.state.table import DeviceTable
    >>> model = SimpleLSTM(n_features=1, hidden_size=8, num_layers=1, horizon=2)
    >>> table = DeviceTable(max_devices=10, window=4, n_features=1, num_layers=1, hidden_size=8)
    >>> slots = table.slots_for(["a", "b"], [0, 0], now=0.0)
    >>> engine = BatchedEngine(model, table)
    >>> mu, log_b = engine.step(slots, np.zeros((2, 1), np.float32), [(0, 2)])
    >>> mu.shape, engine.last_path
    ((2, 2), 'step')
    >>> slots = table.slots_for(["a", "b"] * 4, [0] * 8, now=0.0)  # a backlog: 4 readings each
    >>> rounds = [(0, 2), (2, 4), (4, 6), (6, 8)]
    >>> mu, log_b = engine.step(slots, np.zeros((8, 1), np.float32), rounds)
    >>> mu.shape, engine.last_path
    ((8, 2), 'fused')
    """

    def __init__(self, model: SimpleLSTM, table: DeviceTable,
                 fuse_min_rounds: int = FUSE_MIN_ROUNDS, version: str = "") -> None:
        self.table = table
        self.version = version
        self.models: dict[str, SimpleLSTM] = {version: model.to(table.device).eval()}
        self.horizon = model.horizon
        self.fuse_min_rounds = fuse_min_rounds
        self.last_path = ""  # the path the last batch took: "step" or "fused"
        self.last_groups = 0  # how many weight groups the last batch ran in

    @property
    def model(self) -> SimpleLSTM:
        """The served weights (new devices, and re-warms, use them)."""
        return self.models[self.version]

    def swap_model(self, model: SimpleLSTM, version: str = "") -> None:
        """Serve ``model`` as ``version`` from the next batch on (call between batches).

        The weights served so far stay held under their version: devices whose h/c they made
        go on stepping under them until re-warmed; :meth:`release` drops them."""
        self.hold(version, model)
        self.version = version
        self.horizon = model.horizon

    def hold(self, version: str, model: SimpleLSTM) -> None:
        """Hold ``model``'s weights for the devices of ``version`` (not served)."""
        self.models[version] = model.to(self.table.device).eval()

    def release(self, version: str) -> None:
        """Drop a version's weights (never the served one's): no device holds its h/c."""
        if version != self.version:
            self.models.pop(version, None)

    @torch.inference_mode()
    def step(
        self,
        slots: np.ndarray,
        z: np.ndarray,
        rounds: list[tuple[int, int]],
        reset: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Advance devices by one reading per row, round after round: one batched ``step``
        per round, or, from ``fuse_min_rounds`` rounds on, one packed ``forward`` over every
        round (the same numbers to float rounding; ``last_path`` says which ran).

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
        if len(z) == 0:
            return np.zeros((0, self.horizon), np.float32), np.zeros((0, self.horizon), np.float32)
        self.last_path = path = self.path_for(rounds)
        groups = self.groups(slots)
        self.last_groups = len(groups)
        if len(groups) == 1:
            res = self._run(path, groups[0][0], slots, z, rounds, reset)
        else:
            # Devices are independent, so each version's rows run alone, rounds and all: a
            # round is stepped in one group per version, and a device's rows stay in order.
            res = np.empty((len(z), 2 * self.horizon), np.float32)
            for model, rows in groups:
                ends = np.concatenate([[0], np.cumsum(rows)])
                sub = [(int(ends[a]), int(ends[b])) for a, b in rounds if ends[b] > ends[a]]
                res[rows] = self._run(path, model, slots[rows], z[rows], sub,
                                      None if reset is None else reset[rows])
        return res[:, : self.horizon], res[:, self.horizon :]

    def groups(self, slots: np.ndarray) -> list[tuple[SimpleLSTM, np.ndarray | None]]:
        """The weights each row steps under: ``[(model, rows)]``, one entry a version held
        among the rows' devices (``rows`` a boolean mask; ``None``: every row)."""
        served = self.models[self.version]
        if len(self.models) == 1:
            return [(served, None)]
        mv = self.table.model_version
        by_version: dict[str, list[int]] = {}
        for slot in np.unique(slots).tolist():
            v = mv[slot]
            if v != self.version and v in self.models:
                by_version.setdefault(v, []).append(slot)
        if not by_version:
            return [(served, None)]
        out, rest = [], np.ones(len(slots), bool)
        for v, held in by_version.items():
            rows = np.isin(slots, held)
            out.append((self.models[v], rows))
            rest &= ~rows
        if rest.any():
            out.append((served, rest))
        return out

    def _run(self, path: str, model: SimpleLSTM, slots: np.ndarray, z: np.ndarray,
             rounds: list[tuple[int, int]], reset: np.ndarray | None) -> np.ndarray:
        if path == "fused":
            return self._fused(model, slots, z, reset)
        return self._stepped(model, slots, z, rounds, reset)

    def path_for(self, rounds: list[tuple[int, int]]) -> str:
        """``"fused"`` (one packed forward) for a poll of at least ``fuse_min_rounds`` rounds,
        else ``"step"`` (one batched step per round)."""
        return "fused" if len(rounds) >= self.fuse_min_rounds else "step"

    def _stepped(self, model: SimpleLSTM, slots: np.ndarray, z: np.ndarray,
                 rounds: list[tuple[int, int]], reset: np.ndarray | None) -> np.ndarray:
        """One batched ``step`` per round; ``[N, 2H]`` (``mu`` then ``log_b``)."""
        n, f = z.shape
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
            xr, rows = x[start:end, :f], end - start
            if (pad := step_rows(rows) - rows) > 0:  # (zeros, dropped: one kernel a size)
                xr = torch.nn.functional.pad(xr, (0, 0, 0, pad))
                hr, cr = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (hr, cr))
            mu, log_b, hr, cr = model.step(xr, hr, cr)
            mu, log_b, hr, cr = mu[:rows], log_b[:rows], hr[:, :rows], cr[:, :rows]
            h.index_copy_(1, sl, hr)
            c.index_copy_(1, sl, cr)
            out[start:end, : self.horizon] = mu
            out[start:end, self.horizon :] = log_b
        return out.cpu().numpy()

    def _fused(self, model: SimpleLSTM, slots: np.ndarray, z: np.ndarray,
               reset: np.ndarray | None) -> np.ndarray:
        """All rounds in one packed ``forward``; ``[N, 2H]`` (``mu`` then ``log_b``).

        Each device's rows (in round order) form one sequence, split at each reset: the part
        from a reset on starts from zero state (as the step path zeroes h/c there), so it
        does not depend on the part before it and all parts run side by side. A device's
        first part starts from its h/c in the table, and its last part's final h/c go back.
        """
        n, f = z.shape
        order = np.argsort(slots, kind="stable")  # by device, each device's rows in round order
        dev_slots = slots[order]
        first = np.ones(n, bool)
        first[1:] = dev_slots[1:] != dev_slots[:-1]
        zeroed = np.zeros(n, bool) if reset is None else reset[order]
        begins = first | zeroed
        seg_start = np.flatnonzero(begins)  # sequences, by device
        n_seq = len(seg_start)
        seq = np.cumsum(begins) - 1
        t = np.arange(n) - seg_start[seq]  # each row's place in its sequence
        lengths = np.diff(np.append(seg_start, n))
        # A PackedSequence is time-major with the sequences longest first: at time t it holds
        # the batch_sizes[t] sequences longer than t.
        by_length = np.argsort(-lengths, kind="stable")
        rank = np.empty(n_seq, np.int64)
        rank[by_length] = np.arange(n_seq)
        batch_sizes = n_seq - np.cumsum(np.bincount(lengths, minlength=int(lengths.max()) + 1))[:-1]
        offsets = np.concatenate([[0], np.cumsum(batch_sizes)[:-1]])
        pos = np.empty(n, np.int64)
        pos[order] = offsets[t] + rank[seq]  # each row's place in the packed data
        last = np.append(first[seg_start[1:]], True)  # the last sequence of each device
        # One host-to-device copy: the packed inputs, then (packed order) each sequence's slot
        # and whether it starts from the table's h/c, then the last sequences' places and slots.
        k = int(last.sum())
        host = np.empty(n * f + 2 * n_seq + 2 * k, np.float32)
        host[: n * f].reshape(n, f)[pos] = z
        i = n * f
        host[i : i + n_seq] = dev_slots[seg_start][by_length]
        host[i + n_seq : i + 2 * n_seq] = ~zeroed[seg_start][by_length]
        i += 2 * n_seq
        host[i : i + k] = rank[last]
        host[i + k :] = dev_slots[seg_start[last]]
        x = torch.from_numpy(host).to(self.table.device, non_blocking=True)
        seq_slot = x[i - 2 * n_seq : i - n_seq].long()
        h0, c0 = self.table.h.index_select(1, seq_slot), self.table.c.index_select(1, seq_slot)
        if zeroed.any():
            keep = x[i - n_seq : i][None, :, None]
            h0, c0 = h0 * keep, c0 * keep
        data = PackedSequence(x[: n * f].view(n, f), torch.from_numpy(batch_sizes))
        mu, log_b, (h, c) = model.forward_packed(data, (h0, c0))
        cols, dest = x[i : i + k].long(), x[i + k :].long()
        self.table.h.index_copy_(1, dest, h.index_select(1, cols))
        self.table.c.index_copy_(1, dest, c.index_select(1, cols))
        return torch.cat([mu, log_b], dim=1).cpu().numpy()[pos]

    @torch.inference_mode()
    def rewarm(self, slots: np.ndarray) -> None:
        """Recompute ``h``/``c`` of ``slots`` by replaying their windows from zero state.

        Used after a hot-swap (and for restored state from an older model shape): each
        device's rolling window goes through the served weights in one batched pass, so no
        device mixes hidden state from old weights with new ones (the caller then stamps the
        devices with the served version). Windows are right-aligned; a device joins the pass
        at its first real reading, or at its last reset (a gap, ``STREAM_LSTM_MAX_GAP_S``)
        where that is later: serving stepped that reading from zero state, and so does this.
        """
        if len(slots) == 0:
            return
        windows, lengths = self.table.window.right_aligned(slots)
        since = self.table.since_reset[slots]
        lengths = np.where(since > 0, np.minimum(lengths, since), lengths)
        size = windows.shape[1]
        h, c = self.model.zero_state(len(slots), self.table.device)
        full = np.flatnonzero(lengths == size)
        if len(full):
            # Full windows: one fused forward over the whole sequence (much faster on CPU),
            # padded to a step_rows batch as the step path is: re-warm chunks are sized by time,
            # so every swap met new batch sizes and oneDNN kept a kernel for each (+384 MiB over
            # 600 chunks of random sizes up to 1,500, flat with the padding: docs/benchmarks.md).
            rows = torch.from_numpy(full).to(self.table.device)
            x = np.zeros((step_rows(len(full)), *windows.shape[1:]), windows.dtype)
            x[: len(full)] = windows[full]
            _, _, (hf, cf) = self.model(torch.from_numpy(x).to(self.table.device))
            h, c = h.index_copy(1, rows, hf[:, : len(full)]), c.index_copy(1, rows, cf[:, : len(full)])
        part = np.flatnonzero((lengths > 0) & (lengths < size))
        if len(part):
            # Partial ones: one packed pass, each window from its first reading (left-aligned,
            # the padding after it ignored). A step loop over the longest of them cost a chunk
            # of one young device as much as one of a hundred, and a re-warm slice sized by its
            # time a device shrank to one device a turn (2,000 young devices: 45 s, a review).
            # (1.5x slower than the plain fused forward on full windows: kept for those.)
            take = np.minimum((size - lengths[part])[:, None] + np.arange(size)[None, :], size - 1)
            x = torch.from_numpy(np.take_along_axis(windows[part], take[:, :, None], axis=1)).to(self.table.device)
            packed = pack_padded_sequence(x, torch.from_numpy(lengths[part]), batch_first=True, enforce_sorted=False)
            _, _, (hp, cp) = self.model.forward_packed(packed, self.model.zero_state(len(part), self.table.device))
            rows = torch.from_numpy(part).to(self.table.device)
            h, c = h.index_copy(1, rows, hp), c.index_copy(1, rows, cp)
        idx = torch.as_tensor(slots, device=self.table.device)
        self.table.h.index_copy_(1, idx, h)
        self.table.c.index_copy_(1, idx, c)
