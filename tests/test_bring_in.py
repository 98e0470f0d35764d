"""The bring-in step (bring_in.py): a batch's missing devices are loaded, then admitted (the
model their h/c came from), before the pipeline applies it; loading never evicts another
device of the same batch."""

import time
from types import SimpleNamespace

from stream_lstm.bring_in import BringIn
from stream_lstm.config import Settings
from stream_lstm.encoding import encode_reading
from stream_lstm.engine import BatchedEngine
from stream_lstm.models import SimpleLSTM
from stream_lstm.pipeline import BatchPipeline
from stream_lstm.state.table import DeviceTable
from stream_lstm.tools.bench.core import Record


def test_bring_in_never_evicts_a_device_of_the_same_batch_and_admits_every_loaded_one():
    """With a full table, loading a batch's missing devices used to be free to evict another
    device of the same batch; ingest then loaded it back unadmitted, and after a swap it
    stepped on the old model's h/c under the new weights."""
    store = {}
    s = Settings(max_devices=3, min_history=1, window=4, hidden_size=8)
    table = DeviceTable(3, 4, 1, 1, 8, initial_capacity=3,
                        on_evict=lambda snap: store.__setitem__(snap.device_id, snap))
    admitted: list[list[str]] = []

    def admit(slots):  # what the lifecycle is told: these devices were just brought in
        admitted.append(sorted(table.ids[slot] for slot in slots.tolist()))

    pipe = BatchPipeline(s, table, BatchedEngine(SimpleLSTM(1, 8, 1, 4), table), lambda: "new")
    bring_in = BringIn(table, SimpleNamespace(load=store.get), SimpleNamespace(admit=admit))
    t0 = time.time() - 3600

    def run(devices, step, now):
        records = [Record(0, step * 10 + i, d.encode(), encode_reading(d, t0 + 60 * step, [1.0 + step]))
                   for i, d in enumerate(devices)]
        decoded = pipe.decode(records, now)
        bring_in(decoded, now)
        return pipe.apply(decoded, now)

    for step in range(2):
        assert run(["a", "b", "c"], step, now=t0 + step).counts.forecasts == 3
    assert admitted == [["a", "b", "c"]]  # new devices, once; in memory after that
    admitted.clear()
    assert run(["a", "d", "e"], 2, now=t0 + 10).counts.forecasts == 3  # a: the LRU
    assert admitted == [["d", "e"]] and "a" in table.index  # a stayed: pinned by its batch
    assert table.n_seen[table.index["a"]] == 3
    # An evicted device comes back from the store with its state, not afresh, and is admitted.
    assert store["b"].n_seen == 2
    run(["b"], 3, now=t0 + 20)
    assert table.n_seen[table.index["b"]] == 3 and admitted[-1] == ["b"]
