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
from stream_lstm.pipeline import BatchOutput, BatchPipeline, Decoded
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
        """Decode, bring in, apply: one batch as the worker and a replay run it."""
        decoded = pipeline.decode(records, now)
        self(decoded, now)
        return pipeline.apply(decoded, now)
