"""The practical limit of the Kafka client, and the worker measured against it (issue 16).

``relay``: kafka-python alone, doing the Kafka half of the worker's job and nothing else: read
the readings with ``read_committed`` in a consumer group, send one ~500 B record per reading,
and commit each poll as one transaction with its input offsets. Nothing the worker does can be
faster through this client, so ``worker ÷ relay`` says how much of the client's speed the
worker keeps.

The worker runs with the default settings, exactly-once, on the same pre-filled topic in the
same run, at 1k, 4k and 10k devices (``--quick``: 4k only). Alongside: the bytes of state
(changelog) the worker wrote for each byte of forecasts.
"""

from __future__ import annotations

import sys
import time
import uuid
from typing import Any

_RECORD = b"x" * 500  # about a forecast's size


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def relay(settings: Any, topic: str, messages: int) -> float:
    """Readings/s of the transactional relay, from its first batch to its last commit."""
    from kafka.structs import OffsetAndMetadata

    from stream_lstm.kafka.clients import make_consumer, make_producer

    group = f"bench-relay-{uuid.uuid4().hex[:8]}"
    consumer = make_consumer(settings, topic, group_id=group, auto_offset_reset="earliest",
                             enable_auto_commit=False, isolation_level="read_committed",
                             fetch_max_bytes=16 * 1024 * 1024,
                             max_partition_fetch_bytes=4 * 1024 * 1024)
    producer = make_producer(settings, transactional_id=group)
    producer.init_transactions()
    out = f"{topic}-relay"
    seen, t0 = 0, None
    deadline = time.time() + 300
    try:
        while seen < messages and time.time() < deadline:
            polled = consumer.poll(timeout_ms=500, max_records=settings.poll_max_records)
            if not polled:
                continue
            if t0 is None:
                t0 = time.perf_counter()
            producer.begin_transaction()
            offsets = {}
            for tp, records in polled.items():
                for rec in records:
                    producer.send(out, _RECORD, key=rec.key)
                offsets[tp] = OffsetAndMetadata(records[-1].offset + 1, "", -1)
                seen += len(records)
            producer.send_offsets_to_transaction(offsets, consumer.group_metadata())
            producer.commit_transaction()
        elapsed = time.perf_counter() - (t0 or time.perf_counter())
    finally:
        consumer.close(autocommit=False)
        producer.close(timeout=10)
    return seen / elapsed if elapsed > 0 else 0.0


def worker_run(settings: Any, topic: str, messages: int) -> dict[str, float]:
    """The worker on ``topic`` with the default settings, exactly-once: readings/s and the
    bytes of changelog and forecasts it sent per reading."""
    import tempfile
    from pathlib import Path

    from stream_lstm.models.serving import fresh_model
    from stream_lstm.worker import Worker

    home = Path(tempfile.mkdtemp(prefix="bench-worker-"))  # not the user's model or state dir
    s = settings.model_copy(update={
        "input_topic": topic, "output_topic": f"{topic}-out", "dlq_topic": f"{topic}-dlq",
        "group_id": f"bench-w-{uuid.uuid4().hex[:8]}", "processing_guarantee": "exactly_once",
        "metrics_port": 0, "min_history": 1, "model_dir": home / "models", "state_dir": home / "state",
    })
    worker = Worker(s, fresh_model(s))
    deadline = time.time() + 300
    publishers = []

    def until(w: Any) -> bool:
        if not publishers or publishers[-1] is not w.publisher:
            publishers.append(w.publisher)
        # (a commit may still be in flight: the time is taken once it has completed)
        if w.totals.consumed + w.tx.in_flight().consumed >= messages or time.time() > deadline:
            w.settle()
            publishers.append(time.perf_counter())
            return True
        return False

    totals = worker.run(until=until)  # its clean stop checkpoints every changed device
    assert worker.first_batch_at is not None, "the worker processed nothing"
    rate = totals.consumed / (publishers.pop() - worker.first_batch_at)
    sent: dict[str, int] = {}
    for publisher in publishers:  # the bytes of the final checkpoint included
        for topic, n in publisher.sent_bytes.items():
            sent[topic] = sent.get(topic, 0) + n
    state = sent.get(s.changelog_topic_name(), 0) / max(1, totals.consumed)
    forecasts = sent.get(s.output_topic, 0) / max(1, totals.consumed)
    import shutil

    shutil.rmtree(home, ignore_errors=True)
    return {"rate": rate, "state_bytes": state, "forecast_bytes": forecasts}


def bench_relay(settings: Any, topic: str, messages: int, result: dict, quick: bool) -> dict:
    from stream_lstm.tools.bench.core import prefill

    out: dict[str, Any] = {}
    for devices in (4_000,) if quick else (1_000, 4_000, 10_000):
        t = f"bench-relay-{devices}-{uuid.uuid4().hex[:6]}"
        n = max(messages, devices * 15) if not quick else min(messages, devices * 10)
        _say(f"relay vs worker: {n:,} readings from {devices:,} devices ...")
        prefill(settings, t, n, devices)
        r = relay(settings, t, n)
        w = worker_run(settings, t, n)
        ratio = w["rate"] / r if r else 0.0
        state_ratio = w["state_bytes"] / w["forecast_bytes"] if w["forecast_bytes"] else 0.0
        _say(f"  relay {r:,.0f}/s, worker {w['rate']:,.0f}/s -> worker_vs_relay {ratio:.2f}; "
             f"state {w['state_bytes']:,.0f} B and forecasts {w['forecast_bytes']:,.0f} B a "
             f"reading -> state_vs_forecast_bytes {state_ratio:.2f}")
        out.update({
            f"relay_msgs_per_s_{devices}": round(r), f"worker_eos_msgs_per_s_{devices}": round(w["rate"]),
            f"worker_vs_relay_{devices}": round(ratio, 3),
            f"state_bytes_per_reading_{devices}": round(w["state_bytes"]),
            f"forecast_bytes_per_reading_{devices}": round(w["forecast_bytes"]),
            f"state_vs_forecast_bytes_{devices}": round(state_ratio, 3),
        })
    return out
