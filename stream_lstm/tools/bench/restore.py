"""``bench``: restoring a worker's devices after a crash, the changelog and then the replay.

A worker that takes over partitions restores their devices' checkpoints from the changelog,
then replays the input committed since each partition's last checkpoint (at most one
``STREAM_LSTM_CHECKPOINT_INTERVAL_S``) through the pipeline, publishing nothing. Both parts
are measured here on the real broker, at the scale the goal names (issue 16: 100k devices,
one checkpoint interval of replay at the fleet's rate, in at most 10 s):

* ``restore_s_<n>k``: ``n`` device snapshots (hidden 64, window 64) from a 4-partition
  changelog into the local store;
* ``replay_s_<n>k``: one checkpoint interval of readings at one reading a device a minute
  (``n / 60 * interval`` readings), read back under read_committed and applied: decoded,
  their devices loaded from that store, stepped;
* ``restore_and_replay_s_<n>k``: the two together, what a partition's takeover costs.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def bench_restore(settings: Any, topic: str, messages: int, result: dict, quick: bool,
                  devices: int | None = None) -> dict:
    from stream_lstm.bring_in import BringIn
    from stream_lstm.checkpointing.changelog import changelog_records, restore
    from stream_lstm.checkpointing.codec import decode_snapshot
    from stream_lstm.checkpointing.replay import replay_input
    from stream_lstm.checkpointing.store import StateStore
    from stream_lstm.encoding import encode_reading
    from stream_lstm.engine import BatchedEngine
    from stream_lstm.kafka.clients import make_consumer, make_producer
    from stream_lstm.kafka.topics import TopicSpec, ensure_changelog_topic, ensure_topics
    from stream_lstm.models.lstm import SimpleLSTM
    from stream_lstm.pipeline import BatchPipeline
    from stream_lstm.state.snapshot import DeviceSnapshot
    from stream_lstm.state.table import DeviceTable

    n = devices or (25_000 if quick else 100_000)
    replay_n = int(n / 60 * settings.checkpoint_interval_s)  # one reading a device a minute
    s = settings.model_copy(update={"changelog_topic": f"{topic}-changelog",
                                    "input_topic": f"{topic}-replay", "max_devices": n,
                                    "window": 64, "hidden_size": 64, "min_history": 1})
    ensure_changelog_topic(s, 4)
    ensure_topics(s, [TopicSpec(s.input_topic, 4)])
    rng = np.random.default_rng(0)
    producer = make_producer(s, linger_ms=20, compression_type=None)
    template = DeviceSnapshot.empty("x", num_layers=1, hidden_size=64, n_features=1)
    template.h[:] = rng.normal(size=template.h.shape)
    template.window = rng.normal(size=(64, 1)).astype(np.float32)
    _say(f"restore: writing {n:,} device snapshots to the changelog, {replay_n:,} readings to replay ...")
    for i in range(n):
        template.device_id, template.partition = f"dev-{i}", i % 4
        key, value, part = changelog_records([template])[0]
        producer.send(s.changelog_topic_name(), value, key=key, partition=part)
    t_read = 1_700_000_000.0
    for i in range(replay_n):
        dev = f"dev-{i}"
        producer.send(s.input_topic, encode_reading(dev, t_read, [float(i % 7)]), key=dev.encode(),
                      partition=i % 4)
    producer.flush()
    producer.close()
    with tempfile.TemporaryDirectory() as d:
        store = StateStore(Path(d) / "s.sqlite")
        t0 = time.perf_counter()
        res = restore(s, s.changelog_topic_name(), [0, 1, 2, 3], store)
        restore_s = time.perf_counter() - t0
        assert res.complete and store.count() == n, (res, store.count())

        table = DeviceTable(n, 64, 1, 1, 64, initial_capacity=1024, with_experts="experts" in s.stage_names)
        pipe = BatchPipeline(s, table, BatchedEngine(SimpleLSTM(1, 64, 1, s.horizon), table), lambda: "v")
        # The worker's own steps: load each device from the store (it was restored there), and
        # nothing to re-warm (one model).
        bring_in = BringIn(table, SimpleNamespace(load=lambda dev: _load(store, dev, decode_snapshot)),
                           SimpleNamespace(admit=lambda slots: None))

        def apply(records: list) -> None:
            bring_in.handle(pipe, records, time.time())

        ends = _end_offsets(s, make_consumer)
        t1 = time.perf_counter()
        replayed = sum(replay_input(s, p, 0, ends[p], apply).readings for p in range(4))
        replay_s = time.perf_counter() - t1
        assert replayed == replay_n and len(table) == replay_n, (replayed, len(table))
        store.close(clean=True)
    _say(f"  restored {n:,} devices in {restore_s:.2f} s, replayed {replay_n:,} readings in "
         f"{replay_s:.2f} s: {restore_s + replay_s:.2f} s in all")
    k = n // 1000
    return {f"restore_s_{k}k": round(restore_s, 2), f"replay_s_{k}k": round(replay_s, 2),
            f"restore_and_replay_s_{k}k": round(restore_s + replay_s, 2)}


def _load(store: Any, device_id: str, decode: Any) -> Any:
    row = store.get(device_id)
    return decode(row[1]) if row is not None else None


def _end_offsets(settings: Any, make_consumer: Any) -> dict[int, int]:
    from kafka.structs import TopicPartition

    consumer = make_consumer(settings, enable_auto_commit=False)
    try:
        tps = [TopicPartition(settings.input_topic, p) for p in range(4)]
        return {tp.partition: off for tp, off in consumer.end_offsets(tps).items()}
    finally:
        consumer.close()
