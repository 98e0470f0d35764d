"""The paced sender the live and latency benchmarks share (tools/bench/core.py)."""

import json
import time

from stream_lstm.tools.bench.core import send_paced


class Sent:
    """Collects what a producer would send (the pacing, not Kafka, is under test here)."""

    def __init__(self) -> None:
        self.records: list[tuple[str, bytes, bytes]] = []

    def send(self, topic, value, key=None):
        self.records.append((topic, key, value))


def test_readings_go_out_at_the_rate_and_the_gaps_are_used():
    producer, waits = Sent(), []
    t0 = time.perf_counter()
    n = send_paced(producer, "in", 500.0, count=100, devices=7, while_waiting=lambda: waits.append(1))
    took = time.perf_counter() - t0
    assert n == len(producer.records) == 100
    assert 0.19 <= took < 2.0  # 100 readings at 500/s: the last is due at 0.198 s
    keys = [k for _, k, _ in producer.records]
    assert keys[:8] == [f"dev-{i % 7}".encode() for i in range(8)]
    stamps = [json.loads(v)["ts"] for _, _, v in producer.records]
    assert stamps == sorted(stamps)  # each timestamped when sent
    assert waits  # the gaps between sends ran the caller's work
