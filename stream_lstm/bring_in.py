"""The one step that brings a batch's devices into memory before the pipeline applies it.

In order: **load** the devices that are not in memory from the state store (evicting the
least recently used when the table is full; the table saves what it evicts), then **re-warm**
every device of the batch whose h/c came from another model (saved under an older one, or
waiting since a hot-swap), by replaying its window under the served weights.

All of the batch's devices are brought in by one ``slots_for`` call, so every one of them is
pinned while the missing ones load: loading never evicts another device of the same batch
(which the pipeline would then have started afresh, or, before this step existed, loaded back
without the re-warm: after a swap it stepped on the old model's h/c under the new version).
"""

from __future__ import annotations

import numpy as np

from stream_lstm.checkpointing.manager import StateManager
from stream_lstm.pipeline import BatchOutput, BatchPipeline, Decoded
from stream_lstm.state.table import DeviceTable
from stream_lstm.training.lifecycle import ModelLifecycle


class BringIn:
    """Loads and re-warms a decoded batch's devices.

    Parameters
    ----------
    table
        The in-memory device state.
    state
        Where evicted and restored devices wait (``StateManager.load``).
    lifecycle
        The served model (``ModelLifecycle.rewarm_stale``).
    """

    def __init__(self, table: DeviceTable, state: StateManager, lifecycle: ModelLifecycle) -> None:
        self.table = table
        self.state = state
        self.lifecycle = lifecycle

    def __call__(self, batch: Decoded, now: float) -> None:
        index = self.table.index
        if any(d not in index for d in batch.ids):
            devices = dict(zip(batch.ids, batch.partitions, strict=True))
            self.table.slots_for(list(devices), list(devices.values()), now, self.state.load)
        present = {index[d] for d in batch.ids if d in index}
        self.lifecycle.rewarm_stale(np.fromiter(present, np.int64, len(present)))

    def handle(self, pipeline: BatchPipeline, records: list, now: float) -> BatchOutput:
        """Decode, bring in, apply: one batch as the worker and a replay run it."""
        decoded = pipeline.decode(records, now)
        self(decoded, now)
        return pipeline.apply(decoded, now)
