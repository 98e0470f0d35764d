"""Restore throughput: 100k device snapshots (~1.3 KB each) must restore in <= 10 s.

Opt-in (it produces 130 MB first, ~25 s): ``STREAM_LSTM_BENCH=1 pytest -s
tests/checkpointing/test_restore_perf.py``. The changelog is written the way the worker
writes it: transactions of 2000 records over 4 partitions.
"""

from __future__ import annotations

import os
import time
import uuid

import numpy as np
import pytest

from stream_lstm.checkpointing.changelog import changelog_records, restore
from stream_lstm.checkpointing.store import StateStore
from stream_lstm.config import Settings
from stream_lstm.kafka.clients import make_producer
from stream_lstm.kafka.topics import ensure_changelog_topic
from stream_lstm.state.snapshot import DeviceSnapshot

pytestmark = [
    pytest.mark.kafka, pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("STREAM_LSTM_BENCH") != "1", reason="set STREAM_LSTM_BENCH=1"),
]

N, PARTITIONS, TXN = 100_000, 4, 2000


@pytest.mark.timeout(300, func_only=True)
def test_restore_100k_devices_within_10s(bootstrap, topic_name, tmp_path):
    settings = Settings(bootstrap_servers=bootstrap, changelog_topic=topic_name)
    ensure_changelog_topic(settings, PARTITIONS)
    rng = np.random.default_rng(0)
    prod = make_producer(settings, transactional_id=f"bench-{uuid.uuid4().hex[:8]}")
    prod.init_transactions()
    for i0 in range(0, N, TXN):
        snaps = []
        for i in range(i0, min(N, i0 + TXN)):
            s = DeviceSnapshot.empty(f"device-{i:07d}", num_layers=1, hidden_size=80,
                                     n_features=2, partition=i % PARTITIONS)
            s.h[:] = rng.standard_normal(s.h.shape)
            s.window = rng.standard_normal((64, 2)).astype(np.float32)
            snaps.append(s)
        prod.begin_transaction()
        for key, value, partition in changelog_records(snaps):
            prod.send(topic_name, key=key, value=value, partition=partition)
        prod.commit_transaction()
    prod.close()
    assert 1200 <= len(value) <= 1400

    store = StateStore(tmp_path / "state.sqlite")
    t0 = time.perf_counter()
    result = restore(settings, topic_name, list(range(PARTITIONS)), store)
    seconds = time.perf_counter() - t0
    print(f"\nrestored {sum(result.restored.values())} snapshots of {len(value)} B "
          f"in {seconds:.2f} s ({N / seconds:,.0f}/s)")
    assert result.complete and store.count() == N and result.skipped == 0
    assert seconds <= 10.0
    store.close(clean=True)
