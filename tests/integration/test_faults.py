"""Faults against a real broker: it stops for ~20 s mid-stream and comes back.

The worker reports not-ready, retries with backoff, resumes, and loses nothing: every reading
has exactly one forecast under read_committed.
"""

import json
import tempfile
import threading
import time

import pytest

from stream_lstm.encoding import encode_reading
from stream_lstm.kafka.clients import make_producer
from stream_lstm.kafka.local_broker import LocalBroker, free_port
from stream_lstm.startup import fresh_model
from stream_lstm.worker import Worker

from .helpers import read_topic

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(400)]


def test_broker_stop_and_restart_mid_stream(settings_factory, topic_name):
    with tempfile.TemporaryDirectory() as d:
        broker = LocalBroker(port=free_port(), data_dir=d)
        broker.start()
        try:
            run(broker, settings_factory, topic_name)
        finally:
            broker.stop()


def run(broker, settings_factory, topic_name):
    s = settings_factory(input_topic=topic_name, output_topic=f"{topic_name}-out", dlq_topic=f"{topic_name}-dlq",
                         group_id=f"{topic_name}-g", min_history=1, poll_max_records=20, window=8,
                         hidden_size=8, horizon=2)
    s = s.model_copy(update={"bootstrap_servers": broker.bootstrap})
    worker = Worker(s, fresh_model(s))
    ready_seen = []
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            ready_seen.append(worker.health.readiness()[0])
            time.sleep(0.2)

    threading.Thread(target=sample, daemon=True).start()
    wt = threading.Thread(target=lambda: worker.run(until=lambda w: stop.is_set()), daemon=True)
    wt.start()
    producer = make_producer(s, linger_ms=5, delivery_timeout_ms=300_000, request_timeout_ms=10_000,
                             max_block_ms=120_000)
    sent = 0
    t0 = 1_700_000_000.0

    def send(n):
        nonlocal sent
        for _ in range(n):
            dev = f"d{sent % 10}"
            producer.send(topic_name, encode_reading(dev, t0 + 60 * (sent // 10), [float(sent % 13)]),
                          key=dev.encode())
            sent += 1
            time.sleep(0.005)

    send(600)
    broker.stop()  # a real outage: the broker process is gone
    time.sleep(20)
    broker.start()
    send(600)
    producer.flush()
    producer.close()
    deadline = time.time() + 180
    while worker.totals.consumed < sent and time.time() < deadline:
        time.sleep(0.5)
    stop.set()
    wt.join(60)
    assert worker.totals.consumed == sent
    fcs = [json.loads(r.value) for r in read_topic(s, s.output_topic, expect=sent, timeout_s=120)]
    keys = {(f["partition"], f["offset"]) for f in fcs}
    assert len(fcs) == sent and len(keys) == sent  # nothing lost, nothing twice
    assert True in ready_seen
