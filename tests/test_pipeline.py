"""BatchPipeline pieces that need no broker: the alert events of devices forgotten by TTL."""

import json
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
