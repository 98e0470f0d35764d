"""Hot-swap with no fleet-sized pause: devices keep stepping under the weights their h/c came
from until a time-bounded slice re-warms them, and each re-warm is checkpointed with the next
commit (training/lifecycle.py)."""

import copy

import numpy as np
import pytest
import torch

from stream_lstm.checkpointing.manager import StateManager
from stream_lstm.config import Settings
from stream_lstm.engine import BatchedEngine
from stream_lstm.metrics import Metrics
from stream_lstm.models.lstm import ModelSpec, SimpleLSTM
from stream_lstm.models.registry import LoadedModel, ModelRegistry, model_from_bytes, model_to_bytes
from stream_lstm.models.serving import load_served_model
from stream_lstm.state.ingest import ingest
from stream_lstm.state.table import DeviceTable
from stream_lstm.training import lifecycle as lifecycle_module
from stream_lstm.training.lifecycle import ModelLifecycle

SPEC = ModelSpec(hidden_size=8, horizon=2)


def model(version: str, seed: int) -> LoadedModel:
    torch.manual_seed(seed)
    return LoadedModel.of(SimpleLSTM.from_spec(SPEC).eval(), SPEC, version)


def fleet(tmp_path, n: int, readings: int = 8, **kw):
    """``n`` devices (two partitions) that stepped ``readings`` readings under v1."""
    s = Settings(trainer="off", model_dir=tmp_path / "models", state_dir=tmp_path / "state",
                 window=6, min_history=2, **kw)
    table = DeviceTable(n, 6, 1, 1, 8, initial_capacity=n)
    v1 = model("v1", 0)
    engine = BatchedEngine(v1.model, table)
    life = ModelLifecycle(s, v1, engine, table, Metrics())
    ids = [f"d{i}" for i in range(n)]
    rng = np.random.default_rng(0)
    for k in range(readings):
        b = ingest(table, ids, [float(k)] * n, rng.normal(size=(n, 1)), [i % 2 for i in range(n)],
                   now=0.0, target=0)
        for slot in b.slots.tolist():
            table.model_version[slot] = "v1"
        engine.step(b.slots, b.z, b.rounds, b.reset)
    return s, table, engine, life, ids


def fresh_replay(m, table, slot):
    with torch.no_grad():
        _, _, (h, c) = m(torch.from_numpy(table.window.ordered(slot))[None])
    return h[:, 0].numpy(), c[:, 0].numpy()


def versions(table, ids):
    return [table.model_version[table.index[d]] for d in ids]


def test_a_swap_keeps_the_old_weights_and_each_device_steps_under_its_own_until_rewarmed(tmp_path):
    s, table, engine, life, ids = fleet(tmp_path, 50)
    v2 = model("v2", 1)
    h_before = table.h.clone()
    life.swap(v2)  # nothing re-warmed inside it: every device still on v1, its h/c untouched
    assert life.version == "v2" and sorted(engine.models) == ["v1", "v2"] and life.rewarming
    assert versions(table, ids) == ["v1"] * 50 and torch.equal(table.h, h_before)
    # A device not yet re-warmed steps under v1, on its v1 h/c: what v1 alone gives.
    slot = table.index["d0"]
    h, c = table.h[:, slot : slot + 1].clone(), table.c[:, slot : slot + 1].clone()
    b = ingest(table, ["d0"], [100.0], np.ones((1, 1)), [0], now=0.0, target=0)
    mu, _ = engine.step(b.slots, b.z, b.rounds, b.reset)
    with torch.no_grad():
        want, _, _, _ = life.engine.models["v1"].step(torch.from_numpy(b.z), h, c)
    np.testing.assert_allclose(mu, want.numpy(), atol=1e-6)
    # Once re-warmed, a device's h/c are its window replayed under v2, and it is stamped v2.
    while life.rewarming:
        life.rewarm_slice()
    assert versions(table, ids) == ["v2"] * 50 and not life.rewarming
    for d in ("d0", "d49"):
        h, c = fresh_replay(v2.model, table, table.index[d])
        np.testing.assert_allclose(table.h[:, table.index[d]].numpy(), h, atol=1e-5)
        np.testing.assert_allclose(table.c[:, table.index[d]].numpy(), c, atol=1e-5)


def test_a_slice_rewarms_for_its_time_budget_and_at_least_one_chunk(tmp_path, monkeypatch):
    # Binary fractions throughout, so that the test's clock adds up exactly.
    s, table, engine, life, ids = fleet(tmp_path, 300, rewarm_slice_ms=7.8125)
    clock = [0.0]
    monkeypatch.setattr(lifecycle_module.time, "perf_counter", lambda: clock[0])
    real = engine.rewarm

    def rewarm(slots):  # each device's re-warm "takes" 1/1024 s on the test's clock
        clock[0] += len(slots) / 1024
        real(slots)

    monkeypatch.setattr(engine, "rewarm", rewarm)
    life.swap(model("v2", 1))
    # The first chunk is sized by a first guess (50 us a device), then by the measured cost:
    # 8 devices fill the 8/1024 s budget.
    first = life.rewarm_slice()
    assert first == int(life.slice_s / lifecycle_module.FIRST_COST_S) == 156
    assert [life.rewarm_slice() for _ in range(3)] == [8, 8, 8]
    assert life.longest_slice_s == first / 1024
    # A budget too small for one device still re-warms one a turn: the swap always completes.
    life.slice_s = 1e-6
    assert life.rewarm_slice() == 1
    done = first + 3 * 8 + 1
    while life.rewarming:
        done += life.rewarm_slice()
    assert done == 300 and versions(table, ids) == ["v2"] * 300


def test_rewarmed_devices_are_checkpointed_with_the_next_commit(tmp_path, monkeypatch):
    s, table, engine, life, ids = fleet(tmp_path, 40)
    manager = StateManager(s, tmp_path / "state.sqlite")
    life.checkpoints = manager
    monkeypatch.setattr(lifecycle_module, "MAX_UNSAVED", 16)
    life.slice_s = 60.0  # only the cap limits a slice here
    life.swap(model("v2", 1))
    assert not manager.marked  # the swap itself writes nothing
    assert life.rewarm_slice() == 16  # no more than MAX_UNSAVED wait for a commit
    assert life.rewarm_slice() == 0
    marked = {d for d in ids if table.model_version[table.index[d]] == "v2"}
    assert manager.marked == marked and set(manager.dirty) >= marked
    # The next commit writes them, though neither partition's checkpoint is due, and no marker.
    assert not manager.flush_due()
    records = manager.records_for_commit(table, {0: 10, 1: 10})
    written = {r[1].decode() for r in records}
    assert written == marked
    manager.committed({})
    assert not manager.marked and not set(manager.dirty) & marked
    assert life.rewarm_slice() == 16  # the slices go on after the commit
    manager.store.close(clean=True)


def test_a_third_swap_rewarms_the_devices_still_on_the_oldest_at_once(tmp_path):
    s, table, engine, life, ids = fleet(tmp_path, 30)
    manager = StateManager(s, tmp_path / "state.sqlite")
    life.checkpoints = manager
    life.slice_s = 1e-9  # one chunk a slice
    life.swap(model("v2", 1))
    life._cost_s = 1.0  # so that the chunk is one device
    assert life.rewarm_slice() == 1
    on_v2 = [d for d in ids if table.model_version[table.index[d]] == "v2"]
    assert len(on_v2) == 1
    v3 = model("v3", 2)
    life.swap(v3)
    # The 29 devices on v1 were re-warmed under v3 inside the swap; the one on v2 keeps v2.
    assert sorted(engine.models) == ["v2", "v3"]
    assert sorted(set(versions(table, ids))) == ["v2", "v3"] and versions(table, ids).count("v3") == 29
    for d in ids:
        if d not in on_v2:
            h, _ = fresh_replay(v3.model, table, table.index[d])
            np.testing.assert_allclose(table.h[:, table.index[d]].numpy(), h, atol=1e-5)
    assert len(manager.marked) == 30  # every re-warm is checkpointed with the next commit
    life.slice_s = 1.0
    while life.rewarming:
        life.rewarm_slice()
    assert versions(table, ids) == ["v3"] * 30 and sorted(engine.models) == ["v3"]
    manager.store.close(clean=True)


def test_older_weights_are_dropped_only_once_a_pass_finds_no_device_holding_them(tmp_path):
    s, table, engine, life, ids = fleet(tmp_path, 20)
    life.swap(model("v2", 1))
    life.slice_s = 1e-9  # one device a slice
    life._cost_s = 1.0
    assert [life.rewarm_slice() for _ in range(20)] == [1] * 20
    assert versions(table, ids) == ["v2"] * 20 and life.rewarming  # a check pass follows
    # A device back on v1 behind the first pass (restored without being admitted, say).
    straggler = table.index["d19"]
    table.model_version[straggler] = "v1"
    while life.rewarming:
        life.rewarm_slice()
    assert not life.rewarming and sorted(engine.models) == ["v2"]
    assert versions(table, ids) == ["v2"] * 20  # the check pass found it


def test_a_restored_device_of_an_older_version_steps_under_it_loaded_from_the_registry(tmp_path):
    s, table, engine, life, ids = fleet(tmp_path, 4)
    registry = ModelRegistry(s.model_dir)
    v1 = life.served
    registry.register(v1.model, SPEC, {"version": "v1"})
    snap = table.snapshot(table.index["d0"])
    life.swap(model("v2", 1))
    while life.rewarming:
        life.rewarm_slice()
    assert sorted(engine.models) == ["v2"]  # v1 dropped: nothing in memory holds it
    table.drop(["d0"])
    manager = StateManager(s, tmp_path / "state.sqlite")
    life.checkpoints = manager
    slot = table.restore(snap)  # back from the store, on v1
    life.admit(np.array([slot]))
    assert sorted(engine.models) == ["v1", "v2"] and table.model_version[slot] == "v1"
    assert torch.equal(table.h[:, slot], torch.from_numpy(snap.h)) and not manager.marked
    assert life.rewarm_slice() == 1  # a later slice re-warms it, and marks it
    assert table.model_version[slot] == "v2" and manager.marked == {"d0"}
    while life.rewarming:  # the checking pass
        life.rewarm_slice()
    assert sorted(engine.models) == ["v2"]
    manager.store.close(clean=True)


def test_a_restored_device_whose_version_cannot_be_loaded_is_rewarmed_at_once(tmp_path):
    s, table, engine, life, ids = fleet(tmp_path, 4)
    manager = StateManager(s, tmp_path / "state.sqlite")
    life.checkpoints = manager
    snap = table.snapshot(table.index["d1"])
    snap.model_version = "v0007"  # from another host's registry
    table.drop(["d1"])
    slot = table.restore(snap)
    life.admit(np.array([slot]))
    assert table.model_version[slot] == "v1" and sorted(engine.models) == ["v1"]
    h, _ = fresh_replay(life.served.model, table, slot)
    np.testing.assert_allclose(table.h[:, slot].numpy(), h, atol=1e-5)
    assert manager.marked == {"d1"} and life.metrics.rewarm_fallbacks._value.get() == 1
    manager.store.close(clean=True)


def test_a_restored_device_of_a_third_version_is_rewarmed_at_once(tmp_path):
    """Two versions live (a re-warm under way) and a device comes back on a third: it cannot
    step under its own weights, so it is re-warmed under the served ones at once."""
    s, table, engine, life, ids = fleet(tmp_path, 4)
    registry = ModelRegistry(s.model_dir)
    registry.register(model("v0", 3).model, SPEC, {"version": "v0"})
    snap = table.snapshot(table.index["d3"])
    snap.model_version = "v0"
    life.swap(model("v2", 1))  # v1 and v2 live, nothing re-warmed yet
    table.drop(["d3"])
    slot = table.restore(snap)
    life.admit(np.array([slot]))
    assert sorted(engine.models) == ["v1", "v2"] and table.model_version[slot] == "v2"
    assert life.metrics.rewarm_fallbacks._value.get() == 1


@pytest.mark.parametrize("source", ["fresh", "models topic"])
def test_a_device_restored_after_a_swap_from_an_unregistered_model_steps_as_if_uninterrupted(tmp_path,
                                                                                            source):
    """The model a worker swaps away from was in no registry: the fresh one it starts with
    when none is given, or one from the models topic. It was kept as it was served, so a
    restarted worker (a new lifecycle, the same model dir) that restores a device checkpointed
    under it steps the device under those weights: its forecasts are an uninterrupted run's."""
    s = Settings(trainer="off", model_dir=tmp_path / "models", window=6, min_history=2,
                 hidden_size=8, horizon=2)
    torch.manual_seed(4)
    if source == "fresh":
        old = load_served_model(s)  # no model given, none promoted
    else:
        spec = load_served_model(s).spec
        old = model_from_bytes(model_to_bytes(SimpleLSTM.from_spec(spec), spec, {"version": "v0005"}))
    assert not ModelRegistry(s.model_dir).versions()
    torch.manual_seed(5)
    new = LoadedModel.of(SimpleLSTM.from_spec(old.spec).eval(), old.spec, "v0006")
    ids, rng = ["d0", "d1", "d2"], np.random.default_rng(0)
    readings = rng.normal(size=(14, 3, 1))

    def worker(served):
        table = DeviceTable(4, 6, 1, 1, 8, initial_capacity=4)
        engine = BatchedEngine(served.model, table, version=served.version)
        return table, engine, ModelLifecycle(s, served, engine, table, Metrics())

    def step(table, engine, k):
        b = ingest(table, ids, [float(k)] * 3, readings[k], [0, 0, 1], now=0.0, target=0)
        for slot in b.slots.tolist():  # a new device starts under the served model (the pipeline's)
            table.model_version[slot] = table.model_version[slot] or old.version
        return engine.step(b.slots, b.z, b.rounds, b.reset)[0]

    table, engine, life = worker(old)
    for k in range(8):
        step(table, engine, k)
    life.swap(new)  # no device re-warmed yet: each checkpoint names the old version
    checkpoints = [table.snapshot(table.index[d]) for d in ids]
    want = [step(table, engine, k) for k in range(8, 14)]  # the first worker goes on

    table2, engine2, life2 = worker(copy.deepcopy(new))  # a restart, serving the new model
    life2.admit(np.array([table2.restore(snap) for snap in checkpoints]))
    assert versions(table2, ids) == [old.version] * 3 and sorted(engine2.models) == sorted([old.version, "v0006"])
    got = [step(table2, engine2, k) for k in range(8, 14)]
    np.testing.assert_allclose(np.array(got), np.array(want), atol=1e-6)
    assert life2.metrics.rewarm_fallbacks._value.get() == 0
    assert versions(table2, ids) == versions(table, ids) == [old.version] * 3  # until a re-warm


def test_a_retrain_schedule_with_the_trainer_off_is_said_at_start(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="stream_lstm.training"):
        *_, life, _ = fleet(tmp_path, 2, readings=1, retrain_every_readings=1000)
    assert life.trainer is None
    said = [r.getMessage() for r in caplog.records]
    assert said == ["STREAM_LSTM_RETRAIN_EVERY_* is set but STREAM_LSTM_TRAINER=off: this worker never retrains"]
    caplog.clear()
    with caplog.at_level("WARNING", logger="stream_lstm.training"):
        fleet(tmp_path, 2, readings=1)  # no schedule: nothing to say
    assert not caplog.records


def test_a_model_that_differs_only_in_training_dropout_is_served(tmp_path):
    """Dropout is read only by training: a trainer started with STREAM_LSTM_DROPOUT (a setting
    given to the trainer alone) published models every worker refused, and the fleet kept
    serving its untrained model."""
    s, table, engine, life, ids = fleet(tmp_path, 4)
    torch.manual_seed(1)
    spec = ModelSpec(hidden_size=8, horizon=2, dropout=0.1)
    assert life.swap(LoadedModel.of(SimpleLSTM.from_spec(spec).eval(), spec, "v2")) > 0.0
    assert life.version == "v2"
    other = ModelSpec(hidden_size=16, horizon=2)  # another shape is still refused
    assert life.swap(LoadedModel.of(SimpleLSTM.from_spec(other).eval(), other, "v3")) == 0.0
    assert life.version == "v2"
    assert life.metrics.models_refused.labels("shape")._value.get() == 1  # (an alert rule pages on it)


def test_a_swap_says_when_the_model_was_made_as_a_restart_does(tmp_path):
    """A swap set the promotion time to the swap's, a restart to the model's created_at: the
    restart after a swap moved it back, and the dashboard drew a promotion there."""
    s, table, engine, life, ids = fleet(tmp_path, 2)
    v2 = model("v2", 1)
    v2.meta["created_at"] = "2026-01-02T03:04:05Z"
    life.swap(v2)
    assert life.metrics.model_promoted_timestamp_seconds._value.get() == 1767323045.0


def test_a_running_worker_serves_what_the_registry_is_rolled_back_to(tmp_path, monkeypatch):
    """``models rollback`` took effect only at the worker's next start: until then it served
    the model rolled back, and its next retrain promoted a child of it over the rollback."""
    from stream_lstm.training import retrainer as retrainer_module

    monkeypatch.setattr(retrainer_module, "REGISTRY_CHECK_S", 0.0)
    s, table, engine, life, ids = fleet(tmp_path, 4)
    registry = ModelRegistry(s.model_dir)
    good = registry.register(model("x", 2).model, SPEC, {})
    life.tick(0)
    assert life.version == "v1"  # registered, not promoted: nothing to serve
    registry.rollback(good, reason="v1 drifts")
    life.tick(0)
    assert life.version == good and life.swaps == 1
    assert versions(table, ids) == [good] * 4  # re-warmed by the tick's slice
    life.tick(0)
    assert life.swaps == 1  # once


@pytest.mark.parametrize(("kw", "said", "off_line"), [
    ({}, "off", True),  # the defaults: no schedule, so no retraining (was said nowhere)
    ({"retrain_every_readings": 5000}, "every_5000_readings", False),
    ({"retrain_every_readings": 5000, "retrain_every_s": 600.0}, "every_5000_readings_or_600s", False),
    ({"trainer": "external"}, "external", False),
    ({"trainer": "off", "retrain_every_s": 60.0}, "off", False),
])
def test_the_start_up_line_says_whether_and_when_it_retrains(tmp_path, caplog, kw, said, off_line):
    s = Settings(**{"model_dir": tmp_path / "models", "state_dir": tmp_path / "state", **kw})
    table = DeviceTable(4, 6, 1, 1, 8, initial_capacity=4)
    v1 = model("v1", 0)
    with caplog.at_level("INFO", logger="stream_lstm.training"):
        life = ModelLifecycle(s, v1, BatchedEngine(v1.model, table), table, Metrics())
    try:
        assert life.retraining == said
        assert any(r.getMessage().startswith("retraining is off: set STREAM_LSTM_RETRAIN_EVERY_READINGS")
                   for r in caplog.records) is off_line
    finally:
        life.close()
