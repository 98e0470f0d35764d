"""Restore slices (checkpointing/restoring.py), against the real local Kafka broker; the
store's age check: test_store.py."""

from __future__ import annotations

import pytest

from stream_lstm.checkpointing.changelog import changelog_records
from stream_lstm.checkpointing.manager import StateManager
from stream_lstm.config import Settings
from stream_lstm.kafka.clients import make_producer
from stream_lstm.kafka.topics import ensure_changelog_topic
from stream_lstm.metrics import Metrics
from stream_lstm.state.snapshot import DeviceSnapshot

pytestmark = pytest.mark.kafka


def test_every_restore_slice_makes_progress_even_when_set_up_outlasts_its_budget(bootstrap, topic_name, tmp_path,
                                                                                caplog):
    """A slice's budget starts at its first poll. It used to start before set-up (an admin and
    a consumer connecting), so on a loaded machine, where set-up took longer than the 1 s
    budget, every slice was cancelled before it read a record and the partitions stayed
    paused for ever. A budget of zero is the extreme: each slice must still read something."""
    s = Settings(bootstrap_servers=bootstrap, changelog_topic=topic_name, state_dir=tmp_path)
    ensure_changelog_topic(s, 1)
    producer = make_producer(s)
    snaps = []
    for i in range(3000):
        snap = DeviceSnapshot.empty(f"d{i}", num_layers=1, hidden_size=4, n_features=1, partition=0)
        snaps.append(snap)
    for key, value, partition in changelog_records(snaps):
        producer.send(topic_name, key=key, value=value, partition=partition)
    producer.flush()
    producer.close()
    metrics = Metrics()
    manager = StateManager(s, tmp_path / "state.sqlite", metrics)
    manager.assign({0})
    slices = 0
    with caplog.at_level("INFO", logger="stream_lstm.checkpointing"):
        while manager.restoring and slices < 200:
            manager.restore_slice(budget_s=0.0)
            slices += 1
    # Its one line says what the whole restore did (it said the last slice's records alone).
    (line,) = [r for r in caplog.records if r.getMessage() == "restored state"]
    assert line.devices == 3000 and 0 < line.last_slice_records <= 3000
    assert not manager.restoring, f"not restored after {slices} slices"
    assert manager.store.count() == manager.store.count({0}) == 3000
    assert manager.store.count({1}) == 0
    assert metrics.restored_records._value.get() == 3000  # over every slice
    assert metrics.restored_devices._value.get() == 3000
    manager.store.close(clean=True)
