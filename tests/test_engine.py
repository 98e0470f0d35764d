import numpy as np
import torch

from stream_lstm.engine import BatchedEngine
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
