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


def test_a_poll_of_more_new_devices_than_memory_holds_is_applied_in_parts(tmp_path):
    """max_devices below poll_max_records and a flood of new ids: the table could not hold the
    poll's devices at once and raised, and the worker failed on the same poll at every start.
    Now the poll is applied in parts that fit; every reading ends as a forecast or warm-up, and
    the parts' devices pushed out of memory before their commit wait for it (dirty)."""
    from stream_lstm.checkpointing.manager import StateManager

    s = Settings(max_devices=4, min_history=1, window=4, hidden_size=8, state_dir=tmp_path)
    manager = StateManager(s, tmp_path / "state.sqlite")
    table = DeviceTable(4, 4, 1, 1, 8, initial_capacity=4, on_evict=manager.on_evict)
    pipe = BatchPipeline(s, table, BatchedEngine(SimpleLSTM(1, 8, 1, 4), table), lambda: "v1")
    bring_in = BringIn(table, manager, SimpleNamespace(admit=lambda slots: None))
    t0 = time.time() - 3600
    devices = [f"d{i}" for i in range(10)]
    records = [Record(0, k, d.encode(), encode_reading(d, t0 + k, [float(k)]))
               for k, d in enumerate(devices + devices[:3])]  # three come back at the end
    records.append(Record(0, 99, b"bad", b"not json"))
    out = bring_in.handle(pipe, records, now=t0 + 100)
    c = out.counts
    assert c.consumed == len(records) == c.forecasts + c.warmup + c.dlq and c.dlq == 1
    manager.touch(table, out.touched)  # as the transaction does with the last part
    assert set(manager.dirty) == set(devices)  # every device's new state waits for the commit
    assert set(table.index) | set(manager._evicted_dirty) == set(devices)
    assert table.n_seen[table.index["d0"]] == 2  # d0 came back with its state, not afresh
    manager.store.close(clean=True)
