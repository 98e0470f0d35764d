"""The one retrainer (training/retrainer.py): its schedule, its job, and what a verdict does."""

import time

import numpy as np
import pytest
import torch

from stream_lstm.config import Settings
from stream_lstm.metrics import Metrics
from stream_lstm.models.lstm import ModelSpec, SimpleLSTM
from stream_lstm.models.registry import LoadedModel, ModelRegistry
from stream_lstm.state.ingest import ingest
from stream_lstm.state.table import DeviceTable
from stream_lstm.training.background import RetrainResult, decode_job
from stream_lstm.training.retrainer import Retrainer


def champion():
    spec = ModelSpec(hidden_size=4, horizon=2)
    return LoadedModel.of(SimpleLSTM.from_spec(spec), spec, "v0001")


def result(promote: bool, error: str | None = None) -> RetrainResult:
    c = champion()
    challenger = LoadedModel(c.model, c.spec, {"trained_on": 3})
    return RetrainResult(promote, "because", 1.0, 0.5, 2.0, 0.4, challenger if promote else None, error)


def test_a_job_holds_the_fleets_windows_and_restarts_the_schedule(tmp_path, caplog):
    s = Settings(retrain_every_readings=10, model_dir=tmp_path, window=8, tbptt_k1=2)
    r = Retrainer(s)
    table = DeviceTable(8, 8, 1, 1, 4)
    with caplog.at_level("INFO", logger="stream_lstm.training"):
        assert r.job(table, champion()) is None  # no device has history yet: said
    assert "a retrain was due but skipped" in caplog.text
    for k in range(6):
        ingest(table, ["a", "b", "c"], [float(k)] * 3, np.ones((3, 1)) * k, [0] * 3, now=0.0, target=0)
    r.count(12)
    assert r.due()
    data, devices = r.job(table, champion())
    assert devices == 3 and not r.due()  # counting starts again
    loaded, seqs, params = decode_job(data)
    assert loaded.version == "v0001" and len(seqs) == 3 and params["k1"] == 2


def test_a_promoted_challenger_is_registered_promoted_and_counted(tmp_path):
    metrics = Metrics()
    r = Retrainer(Settings(model_dir=tmp_path), metrics)
    promoted = r.verdict(result(promote=True))
    registry = ModelRegistry(tmp_path)
    assert promoted is not None and promoted.version == registry.promoted() == "v0001"
    assert promoted.meta["trained_on"] == 3
    assert r.verdict(result(promote=False)) is None
    assert r.verdict(result(promote=False, error="Traceback ...")) is None
    assert registry.promoted() == "v0001"  # a rejection changes nothing
    runs = {k: metrics.retrain_runs.labels(k)._value.get() for k in ("promoted", "rejected", "failed")}
    assert runs == {"promoted": 1, "rejected": 1, "failed": 1}


def test_two_processes_promoting_at_once_both_land(tmp_path, monkeypatch):
    """Another process registered v0001 between this one's choice of a number and its write
    (STREAM_LSTM_PROCESSES, each child retraining): the promotion was dropped as 'could not be
    registered'."""
    registry = ModelRegistry(tmp_path)
    registry.register(champion().model, champion().spec, {})  # v0001, the other process's
    r = Retrainer(Settings(model_dir=tmp_path), Metrics())
    answers = iter(["v0001", "v0002"])  # this process looked before the other wrote
    monkeypatch.setattr(ModelRegistry, "next_version", lambda self: next(answers))
    promoted = r.verdict(result(promote=True))
    assert promoted is not None and promoted.version == "v0002" == registry.promoted()


def test_a_retrain_that_finishes_after_a_rollback_is_not_promoted_over_it(tmp_path, caplog, monkeypatch):
    """An operator rolled v0002 back to v0001 while the worker retrained from v0002: the
    challenger was promoted, and the rollback undone by the very model it rolled back."""
    metrics = Metrics()
    registry = ModelRegistry(tmp_path)
    v1, v2 = (registry.register(champion().model, champion().spec, {}) for _ in range(2))
    registry.promote(v2)
    r = Retrainer(Settings(model_dir=tmp_path, retrain_every_readings=1), metrics)  # serving v0002
    table = DeviceTable(8, 8, 1, 1, 4)
    r.job(table, champion())  # a retrain from v0002 starts (too little history: the job is empty)
    registry.rollback(v1, reason="v0002 drifts")
    monkeypatch.setattr(time, "monotonic", lambda: 1e12)  # a look at PROMOTED while it trains
    assert r.moved(served=v2).version == v1  # (a review: it then passed, having moved the pointer)
    monkeypatch.undo()
    with caplog.at_level("WARNING", logger="stream_lstm.training"):
        assert r.verdict(result(promote=True)) is None
    assert registry.promoted() == v1 and [m["version"] for m in registry.versions()] == [v1, v2]
    assert "moved from v0002 to v0001 while it trained" in caplog.text
    assert metrics.retrain_runs.labels("superseded")._value.get() == 1
    assert metrics.retrain_runs.labels("promoted")._value.get() == 0
    assert r.moved(served=v1) is None  # nothing new
    r.job(table, champion())  # the next retrain, from v0001
    promoted = r.verdict(result(promote=True))
    assert promoted is not None and promoted.version == "v0003" == registry.promoted()
    monkeypatch.setattr(time, "monotonic", lambda: 2e12)  # later: its own promotion is no news
    assert r.moved(served="v0003") is None


def test_a_promoted_file_removed_lets_the_next_promotion_through(tmp_path, monkeypatch):
    """The README's way back to STREAM_LSTM_MODEL_PATH's model (remove PROMOTED) made every
    later retrain a conflict, for ever (a review)."""
    registry = ModelRegistry(tmp_path)
    registry.promote(registry.register(champion().model, champion().spec, {}))
    r = Retrainer(Settings(model_dir=tmp_path))
    (tmp_path / "PROMOTED").unlink()
    monkeypatch.setattr(time, "monotonic", lambda: 1e12)
    assert r.moved(served="v0001") is None  # nothing to serve instead
    r.job(DeviceTable(8, 8, 1, 1, 4), champion())
    assert r.verdict(result(promote=True)).version == "v0002" == registry.promoted()


def test_a_promoted_version_that_does_not_load_is_said_once_and_served_on(tmp_path, caplog, monkeypatch):
    registry = ModelRegistry(tmp_path)
    v1, v2 = (registry.register(champion().model, champion().spec, {}) for _ in range(2))
    registry.promote(v1)
    metrics = Metrics()
    r = Retrainer(Settings(model_dir=tmp_path), metrics)
    registry.promote(v2)
    (tmp_path / f"{v2}.safetensors").write_bytes(b"damaged")
    clock = iter(range(int(time.monotonic()) + 100, int(time.monotonic()) + 10_000, 100))
    monkeypatch.setattr(time, "monotonic", lambda: float(next(clock)))
    with caplog.at_level("ERROR", logger="stream_lstm.training"):
        assert r.moved(served=v1) is None and r.moved(served=v1) is None
    assert [rec.getMessage()[:43] for rec in caplog.records] == ["the registry's newly promoted v0002 cannot "]
    assert metrics.models_refused.labels("unloadable")._value.get() == 1


def test_a_model_directory_that_cannot_be_written_fails_the_retrain_not_the_worker(tmp_path, caplog):
    """A full or read-only registry: the promotion is lost, said and counted; the worker
    serves its champion on (it had raised out of the loop, at every retrain after a restart)."""
    metrics = Metrics()
    (tmp_path / "models").write_text("")  # a file where the directory should be
    r = Retrainer(Settings(model_dir=tmp_path / "models"), metrics)
    with caplog.at_level("ERROR", logger="stream_lstm.training"):
        assert r.verdict(result(promote=True)) is None
    assert any("could not be registered" in rec.getMessage() for rec in caplog.records)
    assert metrics.retrain_runs.labels("failed")._value.get() == 1


@pytest.mark.kafka
@pytest.mark.timeout(120)
def test_a_model_over_the_brokers_record_limit_still_travels_on_the_models_topic(settings_factory, topic_name):
    """A model is one record: one of hidden size 600 (5.8 MB) is over this broker's
    message.max.bytes (4 MiB; a real broker's default is 1 MiB), so the models topic carries
    its own limit. One over that fails with an error that says so, not a silent flush."""
    from stream_lstm.kafka.clients import make_producer
    from stream_lstm.models.registry import model_to_bytes
    from stream_lstm.training.models_follower import ModelsFollower
    from stream_lstm.training.retrainer import MODEL_RECORD_MAX_BYTES, ModelPublishError, send_model

    s = settings_factory(models_topic=f"{topic_name}-models")
    spec = ModelSpec(hidden_size=600, horizon=2)
    big = LoadedModel.of(SimpleLSTM.from_spec(spec), spec, "v0002")
    assert 4 * 1024 * 1024 < len(model_to_bytes(*big)) < MODEL_RECORD_MAX_BYTES
    follower = ModelsFollower(s)  # creates the topic
    producer = make_producer(s, max_request_size=MODEL_RECORD_MAX_BYTES)
    try:
        send_model(producer, s, big)
        got, deadline = None, time.monotonic() + 60  # (a new consumer fetching 5.8 MB)
        while got is None and time.monotonic() < deadline:
            got = follower.poll()
            if got is None:
                time.sleep(0.1)  # (the follower's poll does not wait)
        assert got is not None and got.version == "v0002"
        assert torch.equal(got.model.state_dict()["head.weight"], big.model.state_dict()["head.weight"])
        huge_spec = ModelSpec(hidden_size=1100, horizon=2)
        huge = LoadedModel.of(SimpleLSTM.from_spec(huge_spec), huge_spec, "v0003")
        with pytest.raises(ModelPublishError, match="max.message.bytes"):
            send_model(producer, s, huge)
    finally:
        producer.close()
        follower.close()


def test_with_a_model_file_only_promotions_retrained_from_it_are_followed(tmp_path, caplog, monkeypatch):
    """As at start (models/serving.py): a promotion not retrained from STREAM_LSTM_MODEL_PATH's
    model is not served, or a worker would serve it until its next restart and then the file."""
    from stream_lstm.models.registry import save_model
    from stream_lstm.training import retrainer as retrainer_module

    monkeypatch.setattr(retrainer_module, "REGISTRY_CHECK_S", 0.0)
    c = champion()
    path = save_model(c.model, c.spec, tmp_path / "initial", {"version": "offline-1"})
    registry = ModelRegistry(tmp_path / "registry")
    child = registry.register(c.model, c.spec, {"parent": "offline-1"})
    other = registry.register(c.model, c.spec, {"parent": "elsewhere"})
    r = Retrainer(Settings(model_dir=tmp_path / "registry", model_path=path))
    registry.promote(other)
    with caplog.at_level("WARNING", logger="stream_lstm.training"):
        assert r.moved(served="offline-1") is None
    assert f"changed to {other}, which was not retrained from STREAM_LSTM_MODEL_PATH" in caplog.text
    registry.promote(child)
    assert r.moved(served="offline-1").version == child


def test_a_time_schedule_retrains_only_when_readings_came_since_the_last(tmp_path, monkeypatch):
    """On an idle fleet it retrained the same windows into the same model, 20 times in 80 s."""
    clock = [1e12]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    r = Retrainer(Settings(model_dir=tmp_path, retrain_every_s=60.0))
    clock[0] += 61
    assert not r.due()
    r.count(1)
    assert r.due()


@pytest.mark.kafka
@pytest.mark.timeout(120)
@pytest.mark.parametrize("configs", [{"cleanup.policy": "delete"}, {}], ids=["delete", "the broker's default"])
def test_a_models_topic_that_deletes_is_refused(bootstrap, topic_name, configs):
    """Deleted under a trainer, it came back with the broker's defaults: on a quiet fleet its
    only model went with its retention, and workers started later served their own registry's."""
    from stream_lstm.kafka.topics import ChangelogTopicError, TopicSpec, ensure_topics
    from stream_lstm.training.retrainer import ensure_models_topic

    s = Settings(bootstrap_servers=bootstrap, models_topic=topic_name)
    ensure_topics(s, [TopicSpec(topic_name, 1, configs)])
    with pytest.raises(ChangelogTopicError, match=f"the models topic {topic_name} has cleanup.policy=delete"):
        ensure_models_topic(s)
    ensure_models_topic(s.model_copy(update={"models_topic": f"{topic_name}-new"}))  # (created compacted)


def test_the_verdict_names_the_model_its_job_trained_from(tmp_path, caplog):
    """A rollback while it trained: the verdict named the version rolled back to beside the
    errors of the model the job had trained from (a review)."""
    r = Retrainer(Settings(model_dir=tmp_path))
    r.job(DeviceTable(8, 8, 1, 1, 4), champion())  # from v0001 (too little history: empty)
    with caplog.at_level("INFO", logger="stream_lstm.training"):
        r.verdict(result(promote=False))
    (line,) = [rec for rec in caplog.records if rec.getMessage().startswith("promotion gate")]
    assert line.champion == "v0001"


def test_a_tbptt_window_past_the_devices_windows_is_said_where_it_retrains(tmp_path, caplog):
    """A retrain here trains on the devices' windows: a TBPTT_K2 longer than them did nothing
    more, silently (a review). `train` on a CSV honours it, so it is said, not refused; and only
    by a process that retrains (a worker following the models topic does not)."""
    import logging

    from stream_lstm.engine import BatchedEngine
    from stream_lstm.training.lifecycle import ModelLifecycle

    def said(**kw) -> list[str]:
        caplog.clear()
        s = Settings(model_dir=tmp_path, window=32, hidden_size=8, **kw)
        spec = ModelSpec(hidden_size=8, horizon=s.horizon)
        served = LoadedModel.of(SimpleLSTM.from_spec(spec), spec, "v1")
        table = DeviceTable(8, 32, 1, 1, 8)
        with caplog.at_level(logging.WARNING, logger="stream_lstm.training"):
            life = ModelLifecycle(s, served, BatchedEngine(served.model, table), table, Metrics())
        if life.trainer is not None:
            life.trainer.close()
        return [r.getMessage() for r in caplog.records if "TBPTT_K2" in r.getMessage()]

    assert said(tbptt_k2=32, retrain_every_readings=100) == []
    (line,) = said(tbptt_k2=64, retrain_every_readings=100)
    assert line.startswith("STREAM_LSTM_TBPTT_K2=64 is past STREAM_LSTM_WINDOW=32")
    assert said(tbptt_k2=64, retrain_every_readings=100, trainer="external") == []
    assert said(tbptt_k2=64) == []  # (no schedule: it never retrains)


def test_promotions_prune_the_weights_of_old_versions(tmp_path, monkeypatch):
    """A retrain on a schedule registered a version a promotion, and none ever went."""
    from stream_lstm.models import retention

    monkeypatch.setattr(retention, "KEEP", 3)
    r = Retrainer(Settings(model_dir=tmp_path))
    for _ in range(5):
        assert r.verdict(result(promote=True)) is not None
    registry = ModelRegistry(tmp_path)
    assert sorted(p.stem for p in tmp_path.glob("*.safetensors")) == ["v0003", "v0004", "v0005"]
    assert registry.promoted() == "v0005" and len(registry.versions()) == 5
