"""BatchPipeline pieces that need no broker: the alert events of devices forgotten by TTL."""

import json
import time
from pathlib import Path

from stream_lstm.checkpointing.manager import StateManager
from stream_lstm.config import Settings
from stream_lstm.engine import BatchedEngine
from stream_lstm.models import SimpleLSTM
from stream_lstm.pipeline import BatchPipeline
from stream_lstm.state.table import DeviceTable


def test_a_device_forgotten_by_ttl_closes_its_open_alert(tmp_path: Path):
    s = Settings(alerts_topic="alerts", device_ttl_s=60.0, state_dir=tmp_path)
    table = DeviceTable(4, 8, 1, 1, 8)
    pipe = BatchPipeline(s, table, BatchedEngine(SimpleLSTM(1, 8, 1, 4), table), lambda: "v1")
    open_, _ = table.slots_for(["pump-1", "pump-2"], partitions=[3, 3], now=0.0)
    table.alert[open_] = [100.0, 160.0, 0.9999, 130.0, 42.0, 1.0, 2.0]
    table.last_ts[open_] = 170.0
    manager = StateManager(s, tmp_path / "state.sqlite")
    records = manager.expire(table, now=1000.0, farewell=pipe.farewell)
    changelog = [r for r in records if r[0] == manager.topic]
    closes = [r for r in records if r[0] == "alerts"]
    assert sorted(r[1] for r in changelog) == [b"pump-1", b"pump-2"]  # both forgotten
    assert all(r[2] is None for r in changelog)  # tombstones
    assert len(closes) == 1 and closes[0][1] == b"pump-1" and closes[0][4] is None
    event = json.loads(closes[0][2])
    assert (event["event"], event["reason"], event["alert_id"]) == ("close", "expired", "pump-1@100000")
    assert event["ts"] == 170.0 and event["peak_likelihood"] == 0.9999 and event["value"] == 42.0
    assert len(table) == 0
    manager.store.close(clean=True)


def test_bring_in_never_evicts_a_device_of_the_same_batch_so_every_one_is_rewarmed():
    """With a full table, loading a batch's missing devices used to be free to evict another
    device of the same batch; ingest then loaded it back without a re-warm, and after a swap
    it stepped on the old model's h/c under the new version."""
    from stream_lstm.encoding import encode_reading
    from stream_lstm.tools.bench import _Rec

    store = {}
    s = Settings(max_devices=3, min_history=1, window=4, hidden_size=8)
    table = DeviceTable(3, 4, 1, 1, 8, initial_capacity=3,
                        on_evict=lambda snap: store.__setitem__(snap.device_id, snap))
    rewarmed: list[str] = []

    def rewarm(slots):  # what the lifecycle does: re-warm devices of another model's h/c
        for slot in slots.tolist():
            if table.model_version[slot] != "new":
                rewarmed.append(table.ids[slot])
                table.model_version[slot] = "new"

    pipe = BatchPipeline(s, table, BatchedEngine(SimpleLSTM(1, 8, 1, 4), table), lambda: "new",
                         load=store.get, rewarm_loaded=rewarm)

    t0 = time.time() - 3600

    def batch(devices, step):
        return [_Rec(0, step * 10 + i, d.encode(), encode_reading(d, t0 + 60 * step, [1.0 + step]))
                for i, d in enumerate(devices)]

    for step in range(2):
        assert pipe.handle(batch(["a", "b", "c"], step), now=t0 + step).counts.forecasts == 3
    for slot in table.index.values():
        table.model_version[slot] = "old"  # a hot-swap: every device holds the old model's h/c
    rewarmed.clear()
    assert pipe.handle(batch(["a", "d", "e"], 2), now=t0 + 10).counts.forecasts == 3  # a: the LRU
    assert "a" in rewarmed
    assert all(table.model_version[slot] == "new" for slot in table.index.values())
