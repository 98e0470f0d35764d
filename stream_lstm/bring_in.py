"""The one step that brings a batch's devices into memory before the pipeline applies it.

In order: **load** the devices that are not in memory from the state store (evicting the
least recently used when the table is full; the table saves what it evicts), then **admit**
the loaded ones (``ModelLifecycle.admit``): a device whose h/c came from an older model steps
under that model's weights (loaded by version when the engine does not hold them) until a
re-warm slice converts it, or, when they cannot be had, is re-warmed under the served weights
at once. Devices already in memory need nothing: their version is held since the swap.

All of the batch's devices are brought in by one ``slots_for`` call, so every one of them is
pinned while the missing ones load: loading never evicts another device of the same batch
(which the pipeline would then have started afresh, or, before this step existed, loaded back
unadmitted: after a swap it stepped on the old model's h/c under the new weights).
"""

from __future__ import annotations

import numpy as np

from stream_lstm.checkpointing.manager import StateManager
from stream_lstm.pipeline import BatchCounts, BatchOutput, BatchPipeline, Decoded
from stream_lstm.state.table import DeviceTable
from stream_lstm.training.lifecycle import ModelLifecycle


class BringIn:
    """Loads a decoded batch's missing devices and admits them (their model version).

    Parameters
    ----------
    table
        The in-memory device state.
    state
        Where evicted and restored devices wait (``StateManager.load``).
    lifecycle
        The served model and the older ones held (``ModelLifecycle.admit``).

    Examples
    --------
    Any ``load`` (a store) and ``admit`` (a lifecycle) will do:

    >>> from types import SimpleNamespace
    >>> table = DeviceTable(max_devices=4, window=4, n_features=1, num_layers=1, hidden_size=2)
    >>> admitted = []
    >>> bring_in = BringIn(table, SimpleNamespace(load=lambda device: None),
    ...                    SimpleNamespace(admit=admitted.append))
    >>> bring_in(Decoded(consumed=2, ids=["a", "b"], partitions=[0, 1]), now=0.0)
    >>> sorted(table.index), sorted(admitted[0].tolist())  # both new: allocated, admitted
    (['a', 'b'], [0, 1])
    """

    def __init__(self, table: DeviceTable, state: StateManager, lifecycle: ModelLifecycle) -> None:
        self.table = table
        self.state = state
        self.lifecycle = lifecycle

    def __call__(self, batch: Decoded, now: float) -> None:
        index = self.table.index
        missing = {d for d in batch.ids if d not in index}
        if missing:
            devices = dict(zip(batch.ids, batch.partitions, strict=True))
            self.table.slots_for(list(devices), list(devices.values()), now, self.state.load)
            loaded = [index[d] for d in missing if d in index]
            self.lifecycle.admit(np.array(loaded, np.int64))

    def handle(self, pipeline: BatchPipeline, records: list, now: float) -> BatchOutput:
        """Decode, bring in, apply: one batch as the worker and a replay run it.

        A batch of more devices than memory holds (``STREAM_LSTM_MAX_DEVICES`` below
        ``STREAM_LSTM_POLL_MAX_RECORDS``, and a flood of new ids) is applied in consecutive
        parts that each fit: failing instead, every restart would fail on the same poll. Each
        part's devices are marked changed (``StateManager.touch``) before the next part may
        evict them; the output's ``touched`` is the last part's."""
        decoded = pipeline.decode(records, now)
        parts = split_to_fit(decoded, self.table.max_devices)
        if len(parts) == 1:  # (the normal case)
            self(decoded, now)
            return pipeline.apply(decoded, now)
        total = BatchOutput([], BatchCounts(), np.zeros(0, np.int64))
        for k, part in enumerate(parts):
            self(part, now)
            out = pipeline.apply(part, now)
            total.records.extend(out.records)
            total.counts.add(out.counts)
            total.oldest_ts = min(total.oldest_ts, out.oldest_ts)
            if k + 1 < len(parts):
                self.state.touch(self.table, out.touched, out.moved)
            total.touched, total.moved = out.touched, out.moved
        return total


def split_to_fit(d: Decoded, max_devices: int) -> list[Decoded]:
    """``d`` as consecutive parts of at most ``max_devices`` distinct devices each (one part,
    ``d`` itself, when it fits); the dead letters and the count of records go with the first.

    >>> d = Decoded(consumed=4, ids=["a", "b", "a", "c"], ts=[1.0, 1.0, 2.0, 1.0],
    ...             values=[(0.0,)] * 4, partitions=[0] * 4, sources=[None] * 4)
    >>> [(p.consumed, p.ids) for p in split_to_fit(d, 2)]
    [(3, ['a', 'b', 'a']), (1, ['c'])]
    """
    if len(set(d.ids)) <= max_devices:
        return [d]
    parts, start, seen = [], 0, set()
    for i, dev in enumerate(d.ids):
        if dev not in seen and len(seen) == max_devices:
            parts.append((start, i))
            start, seen = i, set()
        seen.add(dev)
    parts.append((start, len(d.ids)))
    out = [Decoded(consumed=b - a, ids=d.ids[a:b], ts=d.ts[a:b], values=d.values[a:b],
                   partitions=d.partitions[a:b], sources=d.sources[a:b]) for a, b in parts]
    out[0].consumed += len(d.dead)
    out[0].dead = list(d.dead)
    return out
