"""``stream-lstm trainer`` (training/service.py) on the real broker: it follows the readings in
its own group into the same windows the workers keep (invalid readings skipped), a retrain with
too little history publishes nothing, and its loop beats, survives a failed retrain, stops on
``stop()`` and leaves its offsets committed. (Publishing a promoted model that a worker follows:
tests/integration/test_retraining.py.)"""

import threading
import time

import numpy as np
import pytest
import torch
from kafka.structs import TopicPartition

from stream_lstm.encoding import encode_reading
from stream_lstm.kafka.clients import make_admin, make_producer
from stream_lstm.kafka.topics import TopicSpec, ensure_topics
from stream_lstm.metrics import HealthState, Metrics
from stream_lstm.models.serving import fresh_model
from stream_lstm.state.normalizer import normalize_sequence
from stream_lstm.training.service import TrainerService

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(180)]
T0 = 1_700_000_000.0


def settings(settings_factory, topic, **kw):
    return settings_factory(input_topic=topic, group_id=f"{topic}-g", models_topic=f"{topic}-models",
                            window=8, hidden_size=8, horizon=2, **kw)


def produce(s, readings, invalid=0):
    """``readings``: (device, ts, value); plus ``invalid`` payloads that are not readings."""
    ensure_topics(s, [TopicSpec(s.input_topic, 2)])
    producer = make_producer(s)
    for dev, ts, value in readings:
        producer.send(s.input_topic, encode_reading(dev, ts, [value]), key=dev.encode())
    for i in range(invalid):
        producer.send(s.input_topic, b"not a reading", key=f"bad-{i}".encode())
    producer.flush()
    producer.close()


def fleet(devices: int, n: int):
    return [(f"d{d}", T0 + 60.0 * k, 10.0 * d + np.sin(k / 2)) for k in range(n) for d in range(devices)]


def consume(service, readings, timeout_s=60.0):
    deadline = time.monotonic() + timeout_s
    while service.retrainer.readings_since < readings:
        assert time.monotonic() < deadline, f"read {service.retrainer.readings_since} of {readings}"
        service.consume_once(timeout_ms=200)


def close(service):
    service.consumer.close()
    service.producer.close()


def test_it_keeps_the_workers_windows_and_skips_invalid_readings(settings_factory, topic_name):
    s = settings(settings_factory, topic_name)
    readings = fleet(3, 12)
    produce(s, readings, invalid=2)
    torch.manual_seed(0)
    service = TrainerService(s, fresh_model(s))
    try:
        consume(service, len(readings))
        for _ in range(3):  # the invalid ones are read too, and never counted
            service.consume_once(timeout_ms=200)
        assert service.retrainer.readings_since == len(readings)
        table = service.table
        assert sorted(table.index) == ["d0", "d1", "d2"] and table.experts.nbytes == 0
        for d in range(3):
            x = np.array([v for dev, _, v in readings if dev == f"d{d}"])[:, None]
            z, _, _ = normalize_sequence(x, s.normalizer, s.normalizer_alpha, s.std_floor)
            window = table.window.ordered(table.index[f"d{d}"])  # the last W, normalized as served
            np.testing.assert_allclose(window, z[-s.window:], atol=1e-5)
        # Too little history (each window 8 < 2 x tbptt_k1): no job, nothing published, and the
        # schedule starts again.
        assert service.retrain() is False and service.published == 0
        assert service.retrainer.readings_since == 0
        models = TopicPartition(s.models_topic, 0)
        assert service.consumer.end_offsets([models]) == {models: 0}  # the models topic is empty
    finally:
        close(service)


def test_its_loop_beats_survives_a_failed_retrain_and_stops_with_its_offsets_committed(
        settings_factory, topic_name):
    s = settings(settings_factory, topic_name, retrain_every_readings=10)
    readings = fleet(2, 10)
    produce(s, readings)
    metrics, health = Metrics(), HealthState(liveness_timeout_s=30)
    service = TrainerService(s, fresh_model(s), metrics, health)
    failed, beaten = threading.Event(), []

    def broken_retrain():  # a retrain that raises (say, the models topic is gone)
        # The loop beat since it started: the last beat is younger than the loop.
        beaten.append(health.liveness(stale_after_s=time.monotonic() - started)[0])
        failed.set()
        raise RuntimeError("publish failed")

    service.retrain = broken_retrain
    loop = threading.Thread(target=service.run, daemon=True)
    started = time.monotonic()
    loop.start()
    assert failed.wait(60), "no retrain was due"
    deadline = time.monotonic() + 60
    while metrics.retrain_runs.labels("failed")._value.get() < 1:  # counted after the raise
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert loop.is_alive()  # a failed retrain does not stop the trainer
    assert beaten[0] is True
    service.stop()
    loop.join(30)
    assert not loop.is_alive()
    admin = make_admin(s)
    try:
        committed = admin.list_group_offsets({f"{s.group_id}-trainer": None})[f"{s.group_id}-trainer"]
    finally:
        admin.close()
    assert sum(meta.offset for meta in committed.values()) == len(readings)  # committed on close
