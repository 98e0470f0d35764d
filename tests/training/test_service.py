"""``stream-lstm trainer`` (training/service.py) on the real broker: it follows the readings in
its own group into the same windows the workers keep (invalid readings skipped), a retrain with
too little history publishes nothing, and its loop trains in a child process, so it keeps
polling and beating while a model trains, publishes what the gate promotes, survives a failed
retrain, stops on ``stop()`` (a retrain still running too) and leaves its offsets committed. (Publishing a promoted model that a worker follows:
tests/integration/test_retraining.py.)"""

import argparse
import logging
import signal
import socket
import threading
import time

import numpy as np
import pytest
import torch
from kafka.structs import TopicPartition

from stream_lstm import endpoint as metrics_module
from stream_lstm.encoding import encode_reading
from stream_lstm.kafka.clients import make_admin, make_consumer, make_producer
from stream_lstm.kafka.local_broker import free_port
from stream_lstm.kafka.topics import TopicSpec, ensure_topics
from stream_lstm.metrics import HealthState, Metrics
from stream_lstm.models.registry import model_from_bytes
from stream_lstm.models.serving import fresh_model
from stream_lstm.state.normalizer import normalize_sequence
from stream_lstm.training import service as service_module
from stream_lstm.training.service import TrainerService
from tests.integration.helpers import wait_for

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(180)]
T0 = 1_700_000_000.0


def settings(settings_factory, topic, **kw):
    """Small: 8-reading windows, 8 hidden units, 2 steps ahead, unless ``kw`` says otherwise."""
    return settings_factory(input_topic=topic, group_id=f"{topic}-g", models_topic=f"{topic}-models",
                            **{"window": 8, "hidden_size": 8, "horizon": 2, **kw})


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
        # Its group's limits are the settings', as the workers' (kafka-python's own 45 s session
        # was refused by a broker bounding sessions lower; a review).
        assert {k: service.consumer.config[k] for k in ("session_timeout_ms", "max_poll_interval_ms")} == {
            "session_timeout_ms": s.session_timeout_ms, "max_poll_interval_ms": s.max_poll_interval_ms}
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


def test_a_second_trainer_in_its_group_is_said_and_revoked_devices_are_not_trained_on(
        settings_factory, topic_name, caplog):
    """Two trainers split the partitions and published over each other (v0005 -> v0002 ->
    v0003), unsaid; the first trained on the devices it no longer read (a review)."""
    s = settings(settings_factory, topic_name)
    readings = fleet(6, 5)
    produce(s, readings)
    first = TrainerService(s, fresh_model(s))
    consume(first, len(readings))
    assert len(first.table) == 6
    loops = [run_in_thread(first)]  # (each its own loop: a join waits for every member)
    with caplog.at_level("WARNING", logger="stream_lstm.trainer"):
        second = TrainerService(s, fresh_model(s))
        loops.append(run_in_thread(second))
        try:
            wait_for(lambda: len(first.consumer.assignment()) == 1 == len(second.consumer.assignment()),
                     "the partitions split between them", timeout_s=90)
            wait_for(lambda: "this trainer reads 1 of the input's 2 partitions: another runs in its "
                     "group" in caplog.text, "the warning")
            (kept,) = {tp.partition for tp in first.consumer.assignment()}
        finally:
            for service in (first, second):
                service.stop()
            for loop in loops:
                loop.join(60)
    assert {int(first.table.partition[slot]) for slot in first.table.index.values()} <= {kept}


def test_a_batch_it_cannot_read_pauses_that_partition_and_it_reads_the_rest(settings_factory, topic_name,
                                                                          monkeypatch):
    """The trainer ended at the first poll, and again at each restart (kafka/unreadable.py)."""
    import kafka.codec

    s = settings(settings_factory, topic_name)
    ensure_topics(s, [TopicSpec(topic_name, 2)])
    for partition, codec in ((0, "gzip"), (1, "none")):
        producer = make_producer(s.model_copy(update={"compression_type": codec}))
        for k in range(5):
            producer.send(topic_name, encode_reading(f"p{partition}", T0 + 60.0 * k, [1.0 * k]),
                          key=f"p{partition}".encode(), partition=partition)
        producer.flush()
        producer.close()
    monkeypatch.setattr(kafka.codec, "has_gzip", lambda: False)  # (the batch: a codec it lacks)
    torch.manual_seed(0)
    service = TrainerService(s, fresh_model(s))
    try:
        consume(service, 5)
        for _ in range(5):
            service.consume_once(timeout_ms=200)
        assert service.retrainer.readings_since == 5 and sorted(service.table.index) == ["p1"]
        assert service.consumer.paused() == {TopicPartition(topic_name, 0)}
    finally:
        close(service)


def run_in_thread(service):
    loop = threading.Thread(target=service.run, daemon=True)
    loop.start()
    return loop


def committed(s):
    admin = make_admin(s)
    try:
        offsets = admin.list_group_offsets({f"{s.group_id}-trainer": None})[f"{s.group_id}-trainer"]
    finally:
        admin.close()
    return sum(meta.offset for meta in offsets.values())


def test_its_loop_keeps_polling_and_beating_while_a_model_trains(settings_factory, topic_name):
    # A retrain that outlasts the test (epochs without end): only a loop that does not wait
    # for it reads the readings that come meanwhile.
    s = settings(settings_factory, topic_name, retrain_every_readings=40, tbptt_k1=4,
                 max_epochs=1_000_000, early_stopping_patience=1_000_000)
    first = fleet(4, 10)
    produce(s, first)
    metrics, health = Metrics(), HealthState(liveness_timeout_s=30)
    service = TrainerService(s, fresh_model(s), metrics, health)
    loop = run_in_thread(service)
    try:
        wait_for(lambda: service.trainer is not None and service.trainer.busy, "the retrain to start")
        assert service.retrainer.readings_since == 0  # the job took the 40 readings
        more = [(dev, ts + 600.0 * 60, v) for dev, ts, v in fleet(4, 5)]
        produce(s, more)
        wait_for(lambda: service.retrainer.readings_since == len(more), "the readings sent meanwhile")
        assert service.trainer is not None and service.trainer.busy  # still training
        assert health.liveness(stale_after_s=2.0)[0]  # and the loop beats
        assert service.published == 0
    finally:
        service.stop()
        loop.join(30)
    assert not loop.is_alive()  # a retrain still running does not hold the stop up
    assert service.trainer is None  # its child was ended
    assert committed(s) == len(first) + len(more)  # committed on close


def test_a_second_trainer_fences_the_first_which_stops_without_publishing(settings_factory, topic_name, caplog):
    """Two trainers of one group published models of different weights under the same version
    names, and workers kept whichever came first (a review): the one started last now fences
    the other, whose next publish fails and which stops, publishing nothing."""
    s = settings(settings_factory, topic_name)
    produce(s, fleet(2, 3))
    first = TrainerService(s, fresh_model(s))
    second = TrainerService(s, fresh_model(s))  # (its producer takes the group's trainer id)
    try:
        with caplog.at_level("ERROR", logger="stream_lstm.trainer"):
            assert not first._publish(fresh_model(s)) and first.fenced_out and first._stop
        assert f"another trainer of group {s.group_id} took over" in caplog.text
        theirs = fresh_model(s)
        assert second._publish(theirs) and not second.fenced_out
    finally:
        for service in (first, second):
            close(service)
    records = published_records(s)
    (record,) = records  # only the second trainer's
    got = model_from_bytes(record.value)
    assert all(torch.equal(a, b) for a, b in zip(got.model.state_dict().values(),
                                                  theirs.model.state_dict().values(), strict=True))


def test_a_publish_that_fails_with_a_producer_that_cannot_abort_stops_the_trainer_to_be_restarted(
        settings_factory, topic_name, monkeypatch, caplog):
    """A failed publish aborts its transaction. A producer that cannot abort is not replaced in
    the process (its init_transactions would fence a trainer started since, the one that should
    publish; a review): the trainer stops with exit 3, and a restart publishes the model."""
    s = settings(settings_factory, topic_name)
    produce(s, fleet(2, 3))
    service = TrainerService(s, fresh_model(s))
    try:
        def fatal():
            raise RuntimeError("cannot abort")

        monkeypatch.setattr(service.producer._transaction_manager, "begin_abort", fatal)
        monkeypatch.setattr(service_module, "send_model", lambda *a, **k: (_ for _ in ()).throw(
            service_module.ModelPublishError("the broker is away")))
        with caplog.at_level("ERROR", logger="stream_lstm.trainer"):
            assert not service._publish(fresh_model(s))
        assert service.producer_lost and service._stop and not service.fenced_out
        assert "the trainer stops (exit 3); started again, it publishes it" in caplog.text
    finally:
        service.consumer.close()
    monkeypatch.undo()
    assert published_records(s) == []
    again = TrainerService(s, fresh_model(s))  # (a restart: the newest trainer by right)
    try:
        assert again._publish(fresh_model(s)) and len(published_records(s)) == 1
    finally:
        close(again)


@pytest.mark.timeout(240)
def test_a_publish_whose_broker_goes_away_mid_commit_gives_up_in_bounded_time(settings_factory, topic_name,
                                                                             monkeypatch):
    """kafka-python's commit_transaction waits without a deadline: a broker gone after taking
    the model's record held the trainer's loop for good (no /healthz beat, SIGTERM unheard; a
    review). The commit and the abort after it are bounded."""
    from tests.integration.test_faults import own_broker

    with own_broker() as broker:
        s = settings(settings_factory, topic_name).model_copy(update={"bootstrap_servers": broker.bootstrap})
        produce(s, fleet(2, 3))
        service = TrainerService(s, fresh_model(s))
        monkeypatch.setattr(service_module, "PUBLISH_TIMEOUT_S", 3.0)
        send = service_module.send_model

        def then_the_broker_goes(*args, **kw):
            send(*args, **kw)  # (the broker has the record)
            broker.stop()

        monkeypatch.setattr(service_module, "send_model", then_the_broker_goes)
        began = time.monotonic()
        try:
            assert not service._publish(fresh_model(s))
            assert time.monotonic() - began < 30 and not service.fenced_out
            # Not dropped: tried again at a later turn, or (an abort refused after the timed-out
            # commit) the trainer stops with exit 3 and publishes it when started again.
            assert service._unpublished is not None and (service.producer_lost or service._retry_at > began)
        finally:
            threading.Thread(target=close, args=(service,), daemon=True).start()  # (no broker to say bye to)


def test_its_loop_publishes_what_the_gate_promotes(settings_factory, topic_name):
    s = settings(settings_factory, topic_name, retrain_every_readings=600, window=32, hidden_size=16,
                 tbptt_k1=8, tbptt_k2=16, max_epochs=30, early_stopping_patience=5,
                 learning_rate=5e-3)
    rng = np.random.default_rng(0)  # AR noise around a drifting level: an untrained model loses
    produce(s, [(f"d{d}", T0 + 60.0 * k, 50 + d + 0.05 * k + 3 * np.sin(k / 4 + d) + rng.normal())
                for k in range(60) for d in range(10)])
    torch.manual_seed(2)
    metrics = Metrics()
    service = TrainerService(s, fresh_model(s), metrics)
    loop = run_in_thread(service)
    try:
        wait_for(lambda: service.published == 1, "a promoted model", timeout_s=120)
    finally:
        service.stop()
        loop.join(30)
    assert service.champion.version == "v0001"
    assert metrics.retrain_runs.labels("promoted")._value.get() == 1
    assert len(published_records(s)) == 1  # published once


def test_a_rollback_of_its_registry_becomes_the_champion_and_is_published(settings_factory, topic_name,
                                                                         monkeypatch):
    """The README said: roll back with --publish, then restart the trainer, or it gates (and
    publishes) later models against the version rolled back. It now takes the rollback on."""
    from stream_lstm.models.registry import ModelRegistry
    from stream_lstm.training import retrainer as retrainer_module

    monkeypatch.setattr(retrainer_module, "REGISTRY_CHECK_S", 0.0)
    s = settings(settings_factory, topic_name)
    registry = ModelRegistry(s.model_dir)
    first, second = fresh_model(s), fresh_model(s)
    v1, v2 = (registry.register(m.model, m.spec, {}) for m in (first, second))
    registry.promote(v2)
    produce(s, fleet(2, 3))
    publish_models(s, registry.load(v2))  # (what the fleet serves: nothing to publish at start)
    service = TrainerService(s, registry.load(v2))
    sends, send = [], service_module.send_model

    def broker_away_once(*args, **kw):  # (a review: a failed publish dropped the rollback)
        sends.append(1)
        if len(sends) == 1:
            raise service_module.ModelPublishError("the broker is away")
        return send(*args, **kw)

    monkeypatch.setattr(service_module, "send_model", broker_away_once)
    loop = run_in_thread(service)
    try:
        registry.rollback(v1, reason="v0002 drifts")
        wait_for(lambda: service.published == 1, "the rolled-back model published", timeout_s=60)
        assert len(sends) == 2  # tried again at the next look
    finally:
        service.stop()
        loop.join(30)
    assert service.champion.version == v1
    assert published_versions(s) == [v2, v1]  # published once


def publish_models(s, *models):
    from stream_lstm.training.retrainer import ensure_models_topic, send_model

    ensure_models_topic(s)
    producer = make_producer(s)
    try:
        for model in models:
            send_model(producer, s, model)
    finally:
        producer.close()


def published_records(s) -> list:
    """The models topic's committed records (the trainer publishes in transactions: its offsets
    count their commit markers too)."""
    models = TopicPartition(s.models_topic, 0)
    consumer = make_consumer(s, group_id=None, isolation_level="read_committed", enable_auto_commit=False)
    try:
        end = consumer.end_offsets([models])[models]
        consumer.assign([models])
        consumer.seek_to_beginning(models)
        records = []
        wait_for(lambda: records.extend(r for rs in consumer.poll(200).values() for r in rs)
                 or consumer.position(models) >= end, "the models topic's records", timeout_s=30)
    finally:
        consumer.close()
    return records


def published_versions(s) -> list[str]:
    records = published_records(s)
    return [model_from_bytes(r.value).version for r in records]


def test_a_trainer_with_a_new_registry_carries_on_from_the_topics_model(settings_factory, topic_name, tmp_path):
    """Its registry lost (a new volume), it gated its first challenger against an untrained
    model, published it as v0001 over the fleet's v0010, and the fleet went back to a worse
    model under a name it already knew (a review)."""
    from stream_lstm.models.registry import ModelRegistry

    s = settings(settings_factory, topic_name)
    old = ModelRegistry(tmp_path / "lost")
    for _ in range(10):
        v10 = old.register(fresh_model(s).model, fresh_model(s).spec, {})
    publish_models(s, old.load(v10))
    service = TrainerService(s, fresh_model(s))  # (its own registry empty: untrained)
    try:
        service.tick()
        assert service.champion.version == v10 == "v0010"
        registry = ModelRegistry(s.model_dir)
        assert registry.promoted() == v10 and registry.next_version() == "v0011"
        assert service.published == 0 and published_versions(s) == [v10]
    finally:
        service._close_trainer()
        close(service)


def test_the_topics_model_is_not_carried_on_from_against_the_settings_or_the_file(settings_factory, topic_name,
                                                                              tmp_path, caplog):
    """A topic model of another horizon was promoted into its registry (no start after that
    could serve it); with STREAM_LSTM_MODEL_PATH, the file was ignored, then published over
    the fleet's newer models at the next start (a review of the change)."""
    from stream_lstm.models.registry import ModelRegistry, save_model

    s = settings(settings_factory, topic_name)
    other = fresh_model(s.model_copy(update={"horizon": 4}))
    publish_models(s, type(other)(other.model, other.spec, {**other.meta, "version": "v0004"}))
    with caplog.at_level("ERROR", logger="stream_lstm.trainer"):
        service = TrainerService(s, fresh_model(s))
    try:
        assert service.champion.spec.horizon == 2 and service._unpublished is None
        assert ModelRegistry(s.model_dir).promoted() is None and "horizon=4" in caplog.text
        assert ModelRegistry(s.model_dir).next_version() == "v0005"  # (kept: numbered past)
    finally:
        close(service)
    service = TrainerService(s, fresh_model(s))  # (now held by its registry: still refused)
    try:
        assert service.champion.spec.horizon == 2 and ModelRegistry(s.model_dir).promoted() is None
    finally:
        close(service)
    mine = fresh_model(s)
    publish_models(s, type(mine)(mine.model, mine.spec, {**mine.meta, "version": "v0005"}))
    path = save_model(fresh_model(s).model, fresh_model(s).spec, tmp_path / "base", {"version": "base"})
    with_file = s.model_copy(update={"model_path": path})
    for _ in range(2):  # (the second start: the registry holds the topic's, the file still wins)
        service = TrainerService(with_file, load_model_for(with_file))
        try:
            assert service.champion.version == "base" and service._unpublished is None
        finally:
            close(service)
    registry = ModelRegistry(s.model_dir)
    assert registry.promoted() is None and registry.next_version() == "v0006"
    assert published_versions(s) == ["v0004", "v0005"]


def load_model_for(s):
    from stream_lstm.models.serving import load_served_model

    return load_served_model(s)


def test_a_promotion_it_could_not_publish_is_published_when_it_starts_again(settings_factory, topic_name):
    """The broker away when it promoted, then stopped: the registry said v0002, the topic
    v0001, and the fleet never got v0002 (a review). A rollback made while it was stopped is
    the same case."""
    from stream_lstm.models.registry import ModelRegistry

    s = settings(settings_factory, topic_name)
    registry = ModelRegistry(s.model_dir)
    v1, v2 = (registry.register(fresh_model(s).model, fresh_model(s).spec, {}) for _ in range(2))
    publish_models(s, registry.load(v1))
    registry.promote(v2)
    service = TrainerService(s, registry.load(v2))
    try:
        service.tick()
        assert service.published == 1 and published_versions(s) == [v1, v2]
    finally:
        service._close_trainer()
        close(service)


def test_its_loop_survives_a_failed_retrain(settings_factory, topic_name):
    s = settings(settings_factory, topic_name, retrain_every_readings=20, tbptt_k1=4, max_epochs=1)
    readings = fleet(2, 10)
    produce(s, readings)
    metrics = Metrics()
    service = TrainerService(s, fresh_model(s), metrics)
    verdicts, children = [], []

    def broken_publish(result):  # the job ran; publishing its verdict raises (say, the topic is gone)
        verdicts.append(result)
        children.append(service.trainer)
        raise RuntimeError("publish failed")

    service.publish = broken_publish
    loop = run_in_thread(service)
    try:
        wait_for(lambda: metrics.retrain_runs.labels("failed")._value.get() == 1, "the failure counted")
        assert loop.is_alive()  # a failed retrain does not stop the trainer
        assert verdicts[0].error is None  # the training itself went well, in the child
        # The child that trained is replaced (it may be what failed) at the next turn.
        wait_for(lambda: service.trainer is not None and service.trainer is not children[0],
                 "a new child")
    finally:
        service.stop()
        loop.join(30)
    assert not loop.is_alive()
    assert committed(s) == len(readings)


@pytest.fixture
def process_state():
    """``main`` sets the process's logging and signal handlers: put them back afterwards."""
    root, kafka_log = logging.getLogger(), logging.getLogger("kafka")
    saved = root.handlers[:], root.level, kafka_log.level
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        root.handlers[:], level, kafka_level = saved
        root.setLevel(level)
        kafka_log.setLevel(kafka_level)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def test_main_shuts_its_endpoint_down_when_the_loop_fails(settings_factory, topic_name, monkeypatch,
                                                          process_state):
    s = settings(settings_factory, topic_name, metrics_port=free_port(), retrain_every_s=900.0)
    monkeypatch.setattr(service_module, "load_settings", lambda: s)
    servers, real_serve = [], metrics_module.serve_metrics

    def serve(*args):
        servers.append(real_serve(*args))
        return servers[-1]

    monkeypatch.setattr(metrics_module, "serve_metrics", serve)

    def broken_run(service):
        close(service)
        raise RuntimeError("the broker went away")

    monkeypatch.setattr(TrainerService, "run", broken_run)
    with pytest.raises(RuntimeError, match="the broker went away"):
        service_module.main(argparse.Namespace())
    (server,) = servers
    assert server.socket.fileno() == -1  # closed: the port is free again
    with socket.socket() as again:
        again.bind((s.metrics_host, s.metrics_port))


def test_main_exports_the_trainers_series_not_the_workers(settings_factory, topic_name, monkeypatch,
                                                          process_state):
    """A trainer's zero forecasts and lag would read as a worker that does nothing."""
    import urllib.request

    s = settings(settings_factory, topic_name, metrics_port=free_port(), retrain_every_s=900.0)
    monkeypatch.setattr(service_module, "load_settings", lambda: s)
    scraped = []

    def scrape_then_stop(service):
        with urllib.request.urlopen(f"http://{s.metrics_host}:{s.metrics_port}/metrics", timeout=10) as r:
            scraped.append(r.read().decode())
        close(service)

    monkeypatch.setattr(TrainerService, "run", scrape_then_stop)
    assert service_module.main(argparse.Namespace()) == 0
    (text,) = scraped
    assert 'stream_lstm_retrain_runs_total{outcome="promoted"} 0.0' in text
    assert "stream_lstm_model_info{version=" in text and "stream_lstm_ready 1.0" in text
    for worker_only in ("forecasts_published", "consumer_lag", "alerts_open", "active_devices", "swap_pause"):
        assert f"stream_lstm_{worker_only}" not in text


def test_a_stop_lost_before_mains_handlers_stops_the_trainer_at_its_start(settings_factory, topic_name, monkeypatch,
                                                                         process_state):
    """A stop signal raised while the trainer started (signals.interrupt_now) but lost where it
    was raised was forgotten once main put its own handlers in: the trainer ran on."""
    from stream_lstm import signals

    s = settings(settings_factory, topic_name, metrics_port=0, retrain_every_s=900.0)
    monkeypatch.setattr(service_module, "load_settings", lambda: s)
    monkeypatch.setattr(signals, "_interrupted", True)
    asked = []

    def run(service):
        asked.append(service._stop)  # (its loop's first look)
        close(service)

    monkeypatch.setattr(TrainerService, "run", run)
    assert service_module.main(argparse.Namespace()) == 0
    assert asked == [True] and not signals._interrupted
