"""The models topic, followed (stream_lstm/training/models_follower.py), on the real broker."""

import time

import pytest

from stream_lstm.kafka.clients import make_producer
from stream_lstm.models.lstm import LoadedModel, ModelSpec, SimpleLSTM
from stream_lstm.models.registry import model_to_bytes
from stream_lstm.training.models_follower import ModelsFollower
from stream_lstm.training.retrainer import MODEL_RECORD_MAX_BYTES, MODELS_PARTITION, send_model

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(180)]


def model(version: str, horizon: int = 12) -> LoadedModel:
    spec = ModelSpec(hidden_size=4, horizon=horizon)
    return LoadedModel.of(SimpleLSTM.from_spec(spec), spec, version)


def test_a_start_serves_the_latest_loadable_model(settings_factory, topic_name):
    """It began at the last record only: one damaged record at the end, and a restarted worker
    served its own registry's model while the running ones kept the one before it."""
    s = settings_factory(models_topic=f"{topic_name}-models", trainer="external")
    ModelsFollower(s).close()  # (creates the topic)
    producer = make_producer(s, max_request_size=MODEL_RECORD_MAX_BYTES)
    try:
        send_model(producer, s, model("v0001"))
        send_model(producer, s, model("v0002"))
        producer.send(s.models_topic, b"garbage", key=b"model", partition=MODELS_PARTITION).get(timeout=30)
        # One with no version: it was served as "unknown", and the next unnamed one never
        # swapped in (a swap compares names); one named as a host's untrained model. Refused.
        spec = ModelSpec(hidden_size=4, horizon=12)
        for meta in ({}, {"version": "v0000-untrained"}):  # (the latter would replace the host's own)
            forged = model_to_bytes(SimpleLSTM.from_spec(spec), spec, meta)
            producer.send(s.models_topic, forged, key=b"model", partition=MODELS_PARTITION).get(timeout=30)
        follower = ModelsFollower(s)
        try:
            assert follower.latest is not None and follower.latest.version == "v0002"
            assert follower.to_serve(s).version == "v0002"
            assert follower.poll() is None  # served from the start: not news
            send_model(producer, s, model("v0003"))
            got = None
            for _ in range(300):
                if (got := follower.poll()) is not None:
                    break
                time.sleep(0.1)  # (poll does not wait)
            assert got is not None and got.version == "v0003"
        finally:
            follower.close()
        # One the settings contradict is not served at start (said; the registry's is).
        send_model(producer, s, model("v0004", horizon=6))
        follower = ModelsFollower(s)
        try:
            assert follower.latest.version == "v0004" and follower.to_serve(s) is None
        finally:
            follower.close()
        # A worker started on another model (given one) hears of the latest at its first poll.
        follower = ModelsFollower(s)
        try:
            assert follower.poll().version == "v0004" and follower.poll() is None
        finally:
            follower.close()
    finally:
        producer.close()


def test_a_worker_of_an_external_trainer_serves_the_topics_model_from_its_first_reading(
        settings_factory, topic_name):
    """It began with its registry's model (an empty registry's is untrained) and swapped a poll
    later: thousands of forecasts of a backlog said v0000-untrained."""
    from stream_lstm.worker import Worker

    s = settings_factory(models_topic=f"{topic_name}-models", trainer="external",
                         input_topic=topic_name, output_topic=f"{topic_name}-out")
    ModelsFollower(s).close()
    producer = make_producer(s, max_request_size=MODEL_RECORD_MAX_BYTES)
    send_model(producer, s, model("v0007"))
    producer.close()
    worker = Worker(s)
    try:
        assert worker.lifecycle.version == "v0007" and worker.engine.models.keys() == {"v0007"}
    finally:
        worker.lifecycle.close()
        worker.state.store.close(clean=True)
