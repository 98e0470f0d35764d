"""A hot-swap inside the replay range, with the default settings (experts, blend, calibration).

A worker serves readings, swaps to a new model, serves more, and crashes before its next
checkpoint: a new worker restores the checkpoints and replays the readings since, under the
model they were served with. Its forecasts from then on must equal an uninterrupted twin's
that saw the same readings and the same swap (docs/architecture.md: the swap barrier).
"""

import numpy as np
import pytest
import torch

from stream_lstm.models.lstm import SimpleLSTM
from stream_lstm.models.registry import LoadedModel
from stream_lstm.models.serving import fresh_model
from stream_lstm.worker import Worker

from .helpers import forecasts_by_device, produce_readings, read_topic

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(300)]


class Crash(Exception):
    """Ends a worker's loop the way a kill does: nothing is flushed or committed on the way out."""


def phase(devices, readings, start, seed):
    rng = np.random.default_rng(seed)
    out = []
    for k in range(start, start + readings):
        for d in range(devices):
            out.append((f"dev-{d}", 1_700_000_000.0 + 60 * k, float(50 + 10 * np.sin(k / 4 + d) + rng.normal())))
    return out


def settings_for(settings_factory, topic):
    return settings_factory(input_topic=topic, output_topic=f"{topic}-out", dlq_topic=f"{topic}-dlq",
                            group_id=f"{topic}-g", window=16, hidden_size=16)


def serve(s, served, new, a, b, c, crash: bool):
    """Serve a, swap to ``new``, serve b; then crash and serve c with a fresh worker, or go on."""
    produce_readings(s, s.input_topic, a)
    swapped = []

    def until(w):
        if not swapped and w.totals.consumed >= len(a):
            swapped.append(w.lifecycle.swap(new))  # its barrier checkpoints every device first
            produce_readings(s, s.input_topic, b if crash else b + c)
        if swapped and w.totals.consumed >= len(a) + len(b) and crash:
            # Past the barrier, before the next checkpoint (30 s by default). Like a kill, the
            # worker commits nothing on its way out: no revocation commit when its consumer
            # leaves the group (that one would checkpoint every device, and nothing would replay).
            w.partitions.on_revoked = lambda partitions: None
            raise Crash
        return w.totals.consumed >= len(a) + len(b) + len(c)

    worker = Worker(s, served)
    if not crash:
        worker.run(until=until)
        return
    with pytest.raises(Crash):
        worker.run(until=until)
    produce_readings(s, s.input_topic, c)
    second = Worker(s, new)
    second.run(until=lambda w: w.totals.consumed >= len(c))
    assert second.metrics.replayed_readings._value.get() > 0  # b came back by replay


def test_a_swap_inside_the_replay_range_replays_as_it_happened(settings_factory, topic_name):
    a, b, c = phase(6, 20, 0, seed=1), phase(6, 8, 20, seed=2), phase(6, 8, 28, seed=3)
    crashed, twin = settings_for(settings_factory, topic_name), settings_for(settings_factory, f"{topic_name}-twin")
    torch.manual_seed(5)
    served = fresh_model(crashed)
    torch.manual_seed(6)
    new = LoadedModel.of(SimpleLSTM.from_spec(served.spec), served.spec, "v0002")
    serve(crashed, served, new, a, b, c, crash=True)
    serve(twin, served, new, a, b, c, crash=False)

    # (Each worker has committed all it published: read until the topics stay quiet.)
    got = forecasts_by_device(read_topic(crashed, crashed.output_topic))
    want = forecasts_by_device(read_topic(twin, twin.output_topic))
    assert set(got) == set(want) == {f"dev-{d}" for d in range(6)}
    for dev, fs in want.items():
        # Exactly once: one forecast per reading on both sides, the crash notwithstanding.
        assert [f["ts"] for f in got[dev]] == [f["ts"] for f in fs]
        after = [f for f in fs if f["ts"] >= c[0][1]]
        assert len(after) == len(c) // 6
        got_after = [f for f in got[dev] if f["ts"] >= c[0][1]]
        assert all(f["model_version"] == "v0002" for f in got_after)
        np.testing.assert_allclose([f["forecast"] for f in got_after], [f["forecast"] for f in after],
                                   rtol=1e-5, atol=1e-5, err_msg=dev)
        np.testing.assert_allclose([f["upper"] for f in got_after], [f["upper"] for f in after],
                                   rtol=1e-5, atol=1e-5, err_msg=dev)
