import numpy as np
import pytest
import torch

from stream_lstm.engine import FUSE_MIN_ROUNDS, BatchedEngine
from stream_lstm.models import SimpleLSTM
from stream_lstm.state.ingest import ingest
from stream_lstm.state.table import DeviceTable


def setup(hidden=8, layers=2, window=6):
    torch.manual_seed(0)
    model = SimpleLSTM(n_features=2, hidden_size=hidden, num_layers=layers, horizon=3).eval()
    table = DeviceTable(max_devices=64, window=window, n_features=2, num_layers=layers,
                        hidden_size=hidden, initial_capacity=4)
    return model, table, BatchedEngine(model, table)


def test_interleaved_batches_equal_one_offline_sequence_per_device():
    model, table, engine = setup()
    rng = np.random.default_rng(0)
    devices = [f"d{i}" for i in range(13)]
    history = {d: [] for d in devices}
    outputs = {d: [] for d in devices}
    clock = {d: 0.0 for d in devices}
    for _ in range(20):  # 20 polls of random size with repeats of a device within a poll
        ids = list(rng.choice(devices, size=rng.integers(1, 30)))
        ts = []
        for d in ids:
            clock[d] += 1.0
            ts.append(clock[d])
        x = rng.normal(size=(len(ids), 2)) * 3 + 10
        b = ingest(table, ids, ts, x, [0] * len(ids), now=0.0, target=0)
        mu, _ = engine.step(b.slots, b.z, b.rounds, b.reset)
        for j, row in enumerate(b.rows):
            history[ids[row]].append(b.z[j])
            outputs[ids[row]].append(mu[j])
    for d in devices:
        if not history[d]:
            continue
        z = torch.from_numpy(np.stack(history[d]))[None]
        with torch.no_grad():
            mu_ref, _, (h, c) = model(z)
        np.testing.assert_allclose(np.stack(outputs[d]), mu_ref[0].numpy(), atol=1e-5)
        slot = table.index[d]
        np.testing.assert_allclose(table.h[:, slot].numpy(), h[:, 0].numpy(), atol=1e-5)


def test_reset_zeroes_state_before_the_step():
    model, table, engine = setup()
    x = np.ones((1, 2))
    for t in range(3):
        b = ingest(table, ["a"], [float(t)], x, [0], now=0.0, target=0)
        engine.step(b.slots, b.z, b.rounds, b.reset)
    b = ingest(table, ["a"], [1e6], x, [0], now=0.0, target=0, max_gap_s=10)
    assert b.reset.all()
    mu, _ = engine.step(b.slots, b.z, b.rounds, b.reset)
    with torch.no_grad():
        mu_ref, _, _, _ = model.step(torch.from_numpy(b.z), *model.zero_state(1))
    np.testing.assert_allclose(mu, mu_ref.numpy(), atol=1e-6)


def test_rewarm_equals_fresh_replay_of_each_window():
    model, table, engine = setup(window=5)
    rng = np.random.default_rng(2)
    for t in range(8):
        ids = ["a", "b"] if t < 3 else ["a"]  # b has a partial window (3 < 5)
        b = ingest(table, ids, [float(t)] * len(ids), rng.normal(size=(len(ids), 2)),
                   [0] * len(ids), now=0.0, target=0)
        engine.step(b.slots, b.z, b.rounds, b.reset)
    new_model = SimpleLSTM(n_features=2, hidden_size=8, num_layers=2, horizon=3).eval()
    engine.swap_model(new_model)
    slots = np.array([table.index["a"], table.index["b"]])
    engine.rewarm(slots)
    for slot in slots:
        win = torch.from_numpy(table.window.ordered(int(slot)))[None]
        with torch.no_grad():
            _, _, (h, c) = new_model(win)
        np.testing.assert_allclose(table.h[:, slot].numpy(), h[:, 0].numpy(), atol=1e-6)
        np.testing.assert_allclose(table.c[:, slot].numpy(), c[:, 0].numpy(), atol=1e-6)


def test_rewarm_is_one_fused_pass_whatever_the_devices_window_lengths(monkeypatch):
    """Young devices (windows of 1 to 5 readings of 6) and a full one: one packed pass, no step
    loop. The loop over the longest partial window cost a chunk of one young device as much as
    one of a hundred, and a re-warm slice sized by its time a device shrank to one device a turn
    (2,000 young devices took 45 s to convert, a review)."""
    model, table, engine = setup(window=6)
    rng = np.random.default_rng(5)
    ids = [f"d{i}" for i in range(12)]
    for t in range(6):
        now = [d for i, d in enumerate(ids) if t < i % 6 + 1]  # d{i} gets i % 6 + 1 readings
        b = ingest(table, now, [float(t)] * len(now), rng.normal(size=(len(now), 2)), [0] * len(now),
                   now=0.0, target=0)
        engine.step(b.slots, b.z, b.rounds, b.reset)
    new_model = SimpleLSTM(n_features=2, hidden_size=8, num_layers=2, horizon=3).eval()
    engine.swap_model(new_model)
    calls = []
    for name in ("step", "forward_packed", "forward"):
        real = getattr(new_model, name)
        monkeypatch.setattr(new_model, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    slots = np.array([table.index[d] for d in ids])
    engine.rewarm(slots)
    assert calls == ["forward", "forward_packed"]  # (the full window; the others packed)
    for d, slot in zip(ids, slots, strict=True):
        win = torch.from_numpy(table.window.ordered(int(slot)))[None]
        assert win.shape[1] == int(d[1:]) % 6 + 1
        with torch.no_grad():
            _, _, (h, c) = SimpleLSTM.forward(new_model, win)
        np.testing.assert_allclose(table.h[:, slot].numpy(), h[:, 0].numpy(), atol=1e-6)
        np.testing.assert_allclose(table.c[:, slot].numpy(), c[:, 0].numpy(), atol=1e-6)


def test_rewarm_under_the_same_weights_changes_nothing_also_after_a_gap_reset():
    # Serving stepped the reading after a gap from zero state: a re-warm that replayed the
    # whole window through the gap gave a state serving never had.
    model, table, engine = setup(window=6)
    rng = np.random.default_rng(4)
    for k, t in enumerate([0.0, 1.0, 2.0, 1000.0, 1001.0, 1002.0]):  # a: a reset at its fourth
        b = ingest(table, ["a", "b"], [t, float(k)], rng.normal(size=(2, 2)), [0, 0], now=0.0,
                   target=0, max_gap_s=10)
        engine.step(b.slots, b.z, b.rounds, b.reset)
    slots = np.array([table.index["a"], table.index["b"]])
    assert table.since_reset[slots].tolist() == [3, 6]  # a was reset; b's steps stayed under 10 s
    served_h, served_c = table.h[:, slots].clone(), table.c[:, slots].clone()
    engine.rewarm(slots)
    torch.testing.assert_close(table.h[:, slots], served_h, atol=1e-6, rtol=0)
    torch.testing.assert_close(table.c[:, slots], served_c, atol=1e-6, rtol=0)


def backlog_polls(seed=3, polls=12):
    """Polls of a small fleet's backlog: many readings per device per poll, in arrival order;
    devices joining mid-poll, gaps that reset (max_gap_s=50), and a duplicate now and then."""
    rng = np.random.default_rng(seed)
    devices = [f"d{i}" for i in range(9)]
    clock = {d: 0.0 for d in devices}
    out = []
    for p in range(polls):
        # The fleet grows: device 3 + p // 2 and on are not sent yet.
        ids = list(rng.choice(devices[: 3 + p // 2], size=int(rng.integers(20, 80))))
        ts = []
        for d in ids:
            clock[d] += 100.0 if rng.random() < 0.05 else (0.0 if rng.random() < 0.02 else 1.0)
            ts.append(clock[d])
        out.append((ids, ts, rng.normal(size=(len(ids), 2)) * 3 + 10))
    return out


def test_the_fused_path_equals_the_step_path():
    (_, step_table, stepped), (_, fused_table, fused) = setup(), setup()
    stepped.fuse_min_rounds, fused.fuse_min_rounds = 10**9, 1
    paths, resets = set(), 0
    for ids, ts, x in backlog_polls():
        outs = []
        for table, engine in ((step_table, stepped), (fused_table, fused)):
            b = ingest(table, ids, ts, x, [0] * len(ids), now=0.0, target=0, max_gap_s=50)
            outs.append(engine.step(b.slots, b.z, b.rounds, b.reset))
            paths.add(engine.last_path)
        resets += int(b.reset.sum())
        for a, f in zip(*outs, strict=True):
            np.testing.assert_allclose(f, a, atol=1e-5, rtol=0)
        for a, f in ((step_table.h, fused_table.h), (step_table.c, fused_table.c)):
            np.testing.assert_allclose(f.numpy(), a.numpy(), atol=1e-5, rtol=0)
    assert paths == {"step", "fused"} and resets > 3  # both paths ran, across resets


def test_a_reset_at_a_devices_first_reading_of_the_poll_starts_it_from_zero():
    model, table, engine = setup()
    engine.fuse_min_rounds = 1
    x = np.ones((3, 2))
    b = ingest(table, ["a"] * 3, [1.0, 2.0, 3.0], x, [0] * 3, now=0.0, target=0)
    engine.step(b.slots, b.z, b.rounds, b.reset)
    b = ingest(table, ["a", "a"], [1e6, 1e6 + 1], x[:2], [0, 0], now=0.0, target=0, max_gap_s=10)
    assert b.reset.tolist() == [True, False]
    mu, _ = engine.step(b.slots, b.z, b.rounds, b.reset)
    with torch.no_grad():
        mu_ref, _, (h, _) = model(torch.from_numpy(b.z)[None])
    np.testing.assert_allclose(mu, mu_ref[0].numpy(), atol=1e-6)
    np.testing.assert_allclose(table.h[:, b.slots[0]].numpy(), h[:, 0].numpy(), atol=1e-6)


def test_a_poll_of_fuse_min_rounds_rounds_or_more_takes_the_fused_path(monkeypatch):
    model, table, engine = setup()
    assert engine.fuse_min_rounds == FUSE_MIN_ROUNDS
    one_round, deep = [(0, 2000)], [(r, r + 1) for r in range(FUSE_MIN_ROUNDS)]
    assert engine.path_for(one_round) == "step" and engine.path_for(deep) == "fused"
    assert engine.path_for(deep[:-1]) == "step"  # a live poll: a few readings per device at most
    steps = []
    monkeypatch.setattr(model, "step", lambda *a: steps.append(1) or SimpleLSTM.step(model, *a))
    ids = ["a"] * FUSE_MIN_ROUNDS + ["b"] * (FUSE_MIN_ROUNDS - 1)
    ts = [float(t) for t in range(FUSE_MIN_ROUNDS)] + [float(t) for t in range(FUSE_MIN_ROUNDS - 1)]
    b = ingest(table, ids, ts, np.ones((len(ids), 2)), [0] * len(ids), now=0.0, target=0)
    assert len(b.rounds) == FUSE_MIN_ROUNDS
    engine.step(b.slots, b.z, b.rounds, b.reset)
    assert engine.last_path == "fused" and steps == []  # one packed forward, no step per round
    b = ingest(table, ["a", "b"], [100.0, 100.0], np.ones((2, 2)), [0, 0], now=0.0, target=0)
    engine.step(b.slots, b.z, b.rounds, b.reset)
    assert engine.last_path == "step" and steps == [1]


def test_after_a_swap_the_fused_path_steps_with_the_new_weights():
    model, table, engine = setup()
    engine.fuse_min_rounds = 1
    new_model = SimpleLSTM(n_features=2, hidden_size=8, num_layers=2, horizon=3).eval()
    engine.swap_model(new_model)
    x = np.random.default_rng(4).normal(size=(5, 2))
    b = ingest(table, ["a"] * 5, [float(t) for t in range(5)], x, [0] * 5, now=0.0, target=0)
    mu, _ = engine.step(b.slots, b.z, b.rounds, b.reset)
    with torch.no_grad():
        mu_ref, _, _ = new_model(torch.from_numpy(b.z)[None])
    assert engine.last_path == "fused"
    np.testing.assert_allclose(mu, mu_ref[0].numpy(), atol=1e-6)


def test_a_batch_of_two_versions_steps_each_device_under_its_own_weights():
    """After a swap, devices not yet re-warmed step under the old weights and the others under
    the new ones, in one batch: each group's outputs and h/c equal stepping that group alone
    with its own weights, on the step path and the fused path, across resets."""
    torch.manual_seed(7)
    new = SimpleLSTM(n_features=2, hidden_size=8, num_layers=2, horizon=3).eval()
    for fuse_min_rounds in (10**9, 1):
        (old, mixed_table, mixed), (_, alone_table, alone) = setup(), setup()
        mixed.fuse_min_rounds = alone.fuse_min_rounds = fuse_min_rounds
        mixed.version = "v1"
        mixed.models = {"v1": old}
        mixed.swap_model(new, "v2")
        assert sorted(mixed.models) == ["v1", "v2"] and mixed.model is new
        old_engine = BatchedEngine(old, alone_table, fuse_min_rounds=fuse_min_rounds)
        new_engine = BatchedEngine(new, alone_table, fuse_min_rounds=fuse_min_rounds)
        groups, resets = set(), 0
        for ids, ts, x in backlog_polls(seed=5):
            b = ingest(mixed_table, ids, ts, x, [0] * len(ids), now=0.0, target=0, max_gap_s=50)
            for slot in np.unique(b.slots).tolist():  # d0, d2, d4... on v1; the rest on v2
                dev = mixed_table.ids[slot]
                mixed_table.model_version[slot] = "v1" if int(dev[1:]) % 2 == 0 else "v2"
            mu, log_b = mixed.step(b.slots, b.z, b.rounds, b.reset)
            groups.add(mixed.last_groups)
            resets += int(b.reset.sum())
            a = ingest(alone_table, ids, ts, x, [0] * len(ids), now=0.0, target=0, max_gap_s=50)
            on_v1 = np.array([int(alone_table.ids[s][1:]) % 2 == 0 for s in a.slots])
            for engine, rows in ((old_engine, on_v1), (new_engine, ~on_v1)):
                if not rows.any():
                    continue
                ends = np.concatenate([[0], np.cumsum(rows)])
                rounds = [(int(ends[s]), int(ends[e])) for s, e in a.rounds if ends[e] > ends[s]]
                want_mu, want_log_b = engine.step(a.slots[rows], a.z[rows], rounds, a.reset[rows])
                np.testing.assert_allclose(mu[rows], want_mu, atol=1e-6, rtol=0)
                np.testing.assert_allclose(log_b[rows], want_log_b, atol=1e-6, rtol=0)
            np.testing.assert_allclose(mixed_table.h.numpy(), alone_table.h.numpy(), atol=1e-6)
            np.testing.assert_allclose(mixed_table.c.numpy(), alone_table.c.numpy(), atol=1e-6)
        assert groups == {2} and resets > 3  # every poll mixes both versions


def test_a_device_of_a_version_not_held_steps_under_the_served_weights():
    model, table, engine = setup()
    b = ingest(table, ["a", "b"], [1.0, 1.0], np.ones((2, 2)), [0, 0], now=0.0, target=0)
    table.model_version[b.slots[0]] = "gone"  # the caller re-warms such a device first
    engine.hold("v0", SimpleLSTM(n_features=2, hidden_size=8, num_layers=2, horizon=3))
    assert [m is model for m, _ in engine.groups(b.slots)] == [True]
    engine.release("v0")
    engine.release("")  # never the served weights
    assert list(engine.models) == [""]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_cuda_asked_for_without_one_is_a_settings_error():
    """A SettingsError: the CLI says it in one line naming the variable, not a traceback."""
    from stream_lstm.config import SettingsError
    from stream_lstm.engine import resolve_device

    with pytest.raises(SettingsError, match="STREAM_LSTM_DEVICE: cuda, but torch sees no CUDA device"):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu"


def test_rounds_of_every_size_step_as_a_few_batch_sizes_with_the_same_forecasts():
    """torch's CPU LSTM compiles and keeps a kernel per batch size it meets: rounds of every
    size up to a poll's grew a worker's memory without bound. Padded to a few sizes, the rows'
    forecasts and states are what an unpadded step gives."""
    from stream_lstm.engine import step_rows

    torch.manual_seed(0)
    table = DeviceTable(400, 8, 1, 1, 16)
    table.slots_for([f"d{i}" for i in range(400)], [0] * 400, now=0.0)
    model = SimpleLSTM(1, 16, 1, 4)
    engine = BatchedEngine(model, table)
    seen, real_step = set(), model.step

    def step(x, h, c):
        seen.add(len(x))
        return real_step(x, h, c)

    model.step = step
    rng = np.random.default_rng(1)
    for rows in range(1, 301):
        slots = np.sort(rng.choice(400, rows, replace=False))
        z = rng.normal(size=(rows, 1)).astype(np.float32)
        h0, c0 = table.h[:, slots].clone(), table.c[:, slots].clone()
        mu, _ = engine.step(slots, z, [(0, rows)])
        want, _, h1, c1 = real_step(torch.from_numpy(z), h0, c0)
        np.testing.assert_allclose(mu, want.detach().numpy(), atol=1e-6)
        np.testing.assert_allclose(table.h[:, slots].numpy(), h1.detach().numpy(), atol=1e-6)
    assert seen == {step_rows(n) for n in range(1, 301)} and len(seen) <= 24


def test_rewarm_chunks_of_every_size_run_as_a_few_batch_sizes_with_the_same_states(monkeypatch):
    """Re-warm chunks are sized by their time, so each swap met new batch sizes, and torch's
    CPU LSTM kept a compiled kernel for every one (a worker's memory grew with each swap).
    Padded to the step path's sizes, each device's h/c is what its own window gives."""
    from stream_lstm.engine import step_rows

    model, table, engine = setup(window=6)
    ids = [f"d{i}" for i in range(40)]
    rng = np.random.default_rng(2)
    for t in range(6):  # every window full: the full-window forward
        b = ingest(table, ids, [float(t)] * len(ids), rng.normal(size=(len(ids), 2)), [0] * len(ids),
                   now=0.0, target=0)
        engine.step(b.slots, b.z, b.rounds, b.reset)
    new_model = SimpleLSTM(n_features=2, hidden_size=8, num_layers=2, horizon=3).eval()
    engine.swap_model(new_model)
    seen, real = set(), new_model.forward
    monkeypatch.setattr(new_model, "forward", lambda x, *a: seen.add(len(x)) or real(x, *a))
    slots = np.array([table.index[d] for d in ids])
    for size in range(1, 41):
        engine.rewarm(slots[:size])
        with torch.no_grad():
            wins = torch.from_numpy(np.stack([table.window.ordered(int(s)) for s in slots[:size]]))
            _, _, (h, c) = SimpleLSTM.forward(new_model, wins)
        np.testing.assert_allclose(table.h[:, slots[:size]].numpy(), h.numpy(), atol=1e-6)
        np.testing.assert_allclose(table.c[:, slots[:size]].numpy(), c.numpy(), atol=1e-6)
    assert seen == {step_rows(n) for n in range(1, 41)} and len(seen) <= 8
