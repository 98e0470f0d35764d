"""Faults against a real broker: it stops for ~20 s mid-stream and comes back.

The worker reports not-ready, retries with backoff, resumes, and loses nothing: every reading
has exactly one forecast under read_committed.
"""

import contextlib
import json
import tempfile
import threading
import time

import pytest

from stream_lstm.encoding import encode_reading
from stream_lstm.kafka.clients import make_producer
from stream_lstm.kafka.local_broker import LocalBroker, free_port
from stream_lstm.models.serving import fresh_model
from stream_lstm.worker import Worker

from .helpers import read_topic

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(400)]


@contextlib.contextmanager
def own_broker():
    """A broker of the test's own, which it may stop and start (the shared one must stay up)."""
    with tempfile.TemporaryDirectory() as d:
        broker = LocalBroker(port=free_port(), data_dir=d)
        broker.start()
        try:
            yield broker
        finally:
            broker.stop()


def test_broker_stop_and_restart_mid_stream(settings_factory, topic_name):
    with own_broker() as broker:
        run(broker, settings_factory, topic_name)


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


def test_an_idle_worker_reports_a_broker_outage_and_recovers(settings_factory, topic_name):
    """No traffic, so no failed publish: the silent group heartbeat must say the broker is gone."""
    with own_broker() as broker:
        idle_outage(broker, settings_factory, topic_name)


def wait_for(predicate, timeout_s):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def idle_outage(broker, settings_factory, topic_name):
    s = settings_factory(input_topic=topic_name, output_topic=f"{topic_name}-out", dlq_topic=f"{topic_name}-dlq",
                         group_id=f"{topic_name}-g", min_history=1, window=8, hidden_size=8, horizon=2,
                         session_timeout_ms=6000)
    s = s.model_copy(update={"bootstrap_servers": broker.bootstrap})
    worker = Worker(s, fresh_model(s))
    stop = threading.Event()
    wt = threading.Thread(target=lambda: worker.run(until=lambda w: stop.is_set()), daemon=True)
    wt.start()
    t0 = 1_700_000_000.0

    def send(start, n):
        producer = make_producer(s, max_block_ms=60_000)
        for i in range(start, start + n):
            producer.send(topic_name, encode_reading("d0", t0 + 60 * i, [float(i % 7)]), key=b"d0")
        producer.flush()
        producer.close()

    try:
        send(0, 10)
        assert wait_for(lambda: worker.totals.consumed == 10 and worker.health.readiness()[0], 60)
        published = worker.totals.forecasts
        broker.stop()  # the worker is idle: nothing to publish, nothing to fail
        assert wait_for(lambda: not worker.health.readiness()[0], 40)
        _, parts = worker.health.readiness()
        assert parts["broker"].startswith("no consumer-group heartbeat"), parts
        assert worker.totals.forecasts == published  # no publish happened to report it
        broker.start()
        assert wait_for(lambda: worker.health.readiness()[0], 90), worker.health.readiness()
        send(10, 10)
        assert wait_for(lambda: worker.totals.consumed == 20, 90)
    finally:
        stop.set()
        wt.join(60)
    fcs = [json.loads(r.value) for r in read_topic(s, s.output_topic, expect=20, timeout_s=60)]
    assert sorted(f["offset"] for f in fcs) == list(range(20))  # nothing lost, nothing twice
