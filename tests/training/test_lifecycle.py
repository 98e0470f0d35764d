"""Hot-swap without a fleet-sized pause: every device is re-warmed before its next step."""

import numpy as np
import torch

from stream_lstm.config import Settings
from stream_lstm.engine import BatchedEngine
from stream_lstm.metrics import Metrics
from stream_lstm.models.lstm import ModelSpec, SimpleLSTM
from stream_lstm.models.registry import LoadedModel
from stream_lstm.state.ingest import ingest
from stream_lstm.state.table import DeviceTable
from stream_lstm.training.lifecycle import REWARM_SLICE, ModelLifecycle


def fresh_replay(model, table, slot):
    with torch.no_grad():
        _, _, (h, c) = model(torch.from_numpy(table.window.ordered(slot))[None])
    return h[:, 0].numpy(), c[:, 0].numpy()


def test_swap_rewarms_batch_devices_first_and_idle_ones_in_slices(tmp_path):
    torch.manual_seed(0)
    spec = ModelSpec(hidden_size=8, horizon=2)
    s = Settings(trainer="off", model_dir=tmp_path, window=6, min_history=2)
    n = REWARM_SLICE * 2 + 100
    table = DeviceTable(n, 6, 1, 1, 8)
    old = SimpleLSTM.from_spec(spec).eval()
    engine = BatchedEngine(old, table)
    life = ModelLifecycle(s, LoadedModel.of(old, spec, "v1"), engine, table, Metrics())
    ids = [f"d{i}" for i in range(n)]
    rng = np.random.default_rng(0)
    for k in range(8):
        b = ingest(table, ids, [float(k)] * n, rng.normal(size=(n, 1)), [0] * n, now=0.0, target=0)
        engine.step(b.slots, b.z, b.rounds, b.reset)
        for slot in b.slots.tolist():
            table.model_version[slot] = "v1"
    new = SimpleLSTM.from_spec(spec).eval()
    pause = life.swap(LoadedModel(new, spec, {"version": "v2"}))
    assert pause < 0.05  # no fleet-sized work inside the swap itself
    assert life.version == "v2" and sum(v == "v1" for v in table.model_version if v) == n

    # The pipeline re-warms a batch's devices before stepping them.
    batch = np.array([table.index[d] for d in ids[:50]])
    life.rewarm_stale(batch)
    for slot in batch.tolist():
        h, c = fresh_replay(new, table, slot)
        np.testing.assert_allclose(table.h[:, slot].numpy(), h, atol=1e-5)
        np.testing.assert_allclose(table.c[:, slot].numpy(), c, atol=1e-5)
        assert table.model_version[slot] == "v2"

    # Idle devices follow in bounded slices between batches, until none is left.
    done = [life.rewarm_idle() for _ in range(4)]
    assert done[0] == REWARM_SLICE and sum(done) == n - 50 and done[-1] == 0
    assert all(v == "v2" for v in table.model_version if v)
    for slot in [table.index[d] for d in ids[-5:]]:
        h, _ = fresh_replay(new, table, slot)
        np.testing.assert_allclose(table.h[:, slot].numpy(), h, atol=1e-5)
