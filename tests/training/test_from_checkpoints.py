"""The trainer's start from the workers' checkpoints (training/from_checkpoints.py), on the real
broker: a trainer restarted at its group's offsets ends with the windows and normalizer
statistics of one that never stopped, not with a device rebuilt from nothing."""

import numpy as np
import pytest
import torch
from kafka.structs import OffsetAndMetadata, TopicPartition

from stream_lstm.kafka.clients import make_consumer
from stream_lstm.kafka.topics import TopicSpec, ensure_topics
from stream_lstm.models.serving import fresh_model
from stream_lstm.training.service import TrainerService
from stream_lstm.worker import Worker
from tests.integration.helpers import produce_readings, tiny_worker_settings

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(240)]
T0 = 1_700_000_000.0
DEVICES = 4


def readings(first: int, n: int):
    return [(f"d{d}", T0 + 60.0 * k, 10.0 * d + 3.0 * np.sin(k / 3) + 0.05 * k)
            for k in range(first, first + n) for d in range(DEVICES)]


def consume(service: TrainerService, n: int) -> None:
    for _ in range(600):
        if service.retrainer.readings_since >= n:
            return
        service.consume_once(timeout_ms=200)
    raise AssertionError(f"read {service.retrainer.readings_since} of {n}")


def close(service: TrainerService) -> None:
    service.consumer.close()
    service.producer.close()


@pytest.mark.parametrize("read_on", [0, 20], ids=["at-the-marker", "past-the-marker"])
def test_a_restarted_trainer_holds_the_windows_of_one_that_never_stopped(settings_factory, topic_name, read_on):
    s = tiny_worker_settings(settings_factory, topic_name, models_topic=f"{topic_name}-models")
    ensure_topics(s, [TopicSpec(topic_name, 2)])
    first = readings(0, 60)
    produce_readings(s, topic_name, first)
    torch.manual_seed(0)
    twin = TrainerService(s, fresh_model(s))  # never stops; no changelog yet: starts afresh
    assert twin.replay_from == {}
    consume(twin, len(first))
    # The workers read the same and checkpoint at their clean stop, with the replay markers.
    worker = Worker(s, fresh_model(s))
    worker.run(until=lambda w: w.totals.consumed >= len(first))
    tps = [TopicPartition(topic_name, p) for p in (0, 1)]
    restarted = s.model_copy(update={"group_id": f"{topic_name}-other",
                                     "changelog_topic": s.changelog_topic_name()})
    committer = make_consumer(restarted, group_id=f"{topic_name}-other-trainer", enable_auto_commit=False)
    markers = committer.end_offsets(tps)
    # A trainer restarted after ``read_on`` readings a device past the workers' checkpoint:
    # its group's offsets are there (the usual case: it had read on since that checkpoint).
    produce_readings(s, topic_name, readings(60, read_on))
    committer.commit({tp: OffsetAndMetadata(offset, "", -1) for tp, offset in committer.end_offsets(tps).items()})
    committer.close()
    later = readings(60 + read_on, 20)
    produce_readings(s, topic_name, later)
    service = TrainerService(restarted, fresh_model(s))
    try:
        assert service.replay_from == {tp.partition: offset for tp, offset in markers.items()}
        consume(service, DEVICES * read_on + len(later))  # everything since the checkpoint
        consume(twin, len(first) + DEVICES * read_on + len(later))
        for d in (f"d{k}" for k in range(DEVICES)):
            a, b = twin.table.index[d], service.table.index[d]
            np.testing.assert_allclose(service.table.window.ordered(b), twin.table.window.ordered(a), atol=1e-6)
            np.testing.assert_allclose(service.table.norm.mean[b], twin.table.norm.mean[a], rtol=1e-12)
            np.testing.assert_allclose(service.table.norm.var[b], twin.table.norm.var[a], rtol=1e-12)
            assert service.table.n_seen[b] == twin.table.n_seen[a] == 80 + read_on
    finally:
        close(service)
        close(twin)


def test_taking_in_stops_at_a_full_table_and_gives_up_past_the_deadline(tmp_path):
    import time

    from stream_lstm.checkpointing.codec import encode_snapshot
    from stream_lstm.checkpointing.store import StateStore
    from stream_lstm.state.snapshot import DeviceSnapshot
    from stream_lstm.state.table import DeviceTable
    from stream_lstm.training.from_checkpoints import _take_in

    store = StateStore(tmp_path / "s.sqlite")
    store.put_many((f"d{k}", 0, encode_snapshot(DeviceSnapshot.empty(
        f"d{k}", num_layers=1, hidden_size=2, n_features=1, partition=0)))
                   for k in range(5))
    table = DeviceTable(max_devices=3, window=4, n_features=1, num_layers=1, hidden_size=2)
    assert _take_in(store, table, time.monotonic() + 60) == 0
    assert len(table.index) == 3  # no more decoded (each would evict another)
    with pytest.raises(TimeoutError):  # a start past its deadline: afresh instead
        _take_in(store, DeviceTable(max_devices=8, window=4, n_features=1, num_layers=1, hidden_size=2),
                 time.monotonic() - 1)
    store.close(clean=True)


def test_the_start_keeps_the_health_fresh_while_it_works(monkeypatch):
    import threading

    from stream_lstm.training import from_checkpoints

    monkeypatch.setattr(from_checkpoints, "BEAT_S", 0.01)
    three = threading.Event()
    beats = []

    def beat():
        beats.append(1)
        if len(beats) >= 3:
            three.set()

    with from_checkpoints._beating(beat):
        assert three.wait(10), "no beats while the start worked"
    assert not any(t.name == "trainer-start-beat" for t in threading.enumerate())  # ended with it
    with from_checkpoints._beating(None):  # no endpoint: nothing beats
        assert not any(t.name == "trainer-start-beat" for t in threading.enumerate())
