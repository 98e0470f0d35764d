"""The one retrainer (training/retrainer.py): its schedule, its job, and what a verdict does."""

import numpy as np

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


def test_a_job_holds_the_fleets_windows_and_restarts_the_schedule(tmp_path):
    s = Settings(retrain_every_readings=10, model_dir=tmp_path, window=8, tbptt_k1=2)
    r = Retrainer(s)
    table = DeviceTable(8, 8, 1, 1, 4)
    assert r.job(table, champion()) is None  # no device has history yet
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
    promoted = r.verdict(result(promote=True), champion="v0000")
    registry = ModelRegistry(tmp_path)
    assert promoted is not None and promoted.version == registry.promoted() == "v0001"
    assert promoted.meta["trained_on"] == 3
    assert r.verdict(result(promote=False), champion="v0001") is None
    assert r.verdict(result(promote=False, error="Traceback ..."), champion="v0001") is None
    assert registry.promoted() == "v0001"  # a rejection changes nothing
    runs = {k: metrics.retrain_runs.labels(k)._value.get() for k in ("promoted", "rejected", "failed")}
    assert runs == {"promoted": 1, "rejected": 1, "failed": 1}
