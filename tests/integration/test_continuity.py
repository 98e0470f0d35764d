"""The key test: h/c is carried correctly across messages, polls and batches.

Interleaved readings for many devices go through the real broker and the worker, with the
default settings, in many polls of varied size: the readings arrive in parts, each produced
once the worker has consumed the last. Each device's published forecasts must equal, within
1e-5, what the same model gives offline over that device's whole history in one sequence with
the same normalization.
"""

import numpy as np
import pytest
import torch

from stream_lstm.models.serving import fresh_model
from stream_lstm.worker import Worker

from .helpers import (
    ATOL_NORMALIZED,
    forecasts_by_device,
    guarantee_settings,
    produce_readings,
    published,
    read_topic,
    served_forecasts,
)

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(300)]


def fleet(n_devices=30, n_readings=40, seed=0):
    """Interleaved per-device time-ordered readings; a third of the devices join mid-stream."""
    rng = np.random.default_rng(seed)
    events = []
    for d in range(n_devices):
        start = 0 if d % 3 else n_readings // 2
        base, amp = rng.uniform(10, 90), rng.uniform(1, 10)
        for k in range(n_readings):
            t = 1_700_000_000 + (start + k) * 60 + d
            events.append((t + rng.uniform(0, 30), f"dev-{d}", t,
                           base + amp * np.sin(k / 5) + rng.normal()))
    events.sort()
    return [(dev, float(ts), float(v)) for _, dev, ts, v in events]


@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
def test_streamed_forecasts_equal_offline_sequence(settings_factory, topic_name, guarantee):
    s = guarantee_settings(settings_factory, topic_name, processing_guarantee=guarantee)
    readings = fleet()
    rng = np.random.default_rng(11)
    parts, i = [], 0
    while i < len(readings):  # polls of 1 to 60 readings
        n = int(rng.integers(1, 61))
        parts.append(readings[i : i + n])
        i += n
    produce_readings(s, topic_name, parts[0])
    sent = [len(parts[0])]
    torch.manual_seed(3)
    served = fresh_model(s)
    worker = Worker(s, served)

    def until(w) -> bool:  # the next part once the worker has consumed every reading sent
        if w.totals.consumed >= sum(sent) and len(sent) < len(parts):
            produce_readings(s, topic_name, parts[len(sent)])
            sent.append(len(parts[len(sent)]))
        return w.totals.consumed >= len(readings)

    totals = worker.run(until=until)
    history: dict[str, list] = {}
    for dev, ts, v in readings:
        history.setdefault(dev, []).append((ts, v))
    expected = published(history, s)
    assert totals.consumed == len(readings) and totals.forecasts == expected
    batches = sum(x.value for m in worker.metrics.batch_size.collect() for x in m.samples
                  if x.name.endswith("_count"))
    assert batches >= 30, batches  # many polls, of varied size

    got = forecasts_by_device(read_topic(s, s.output_topic, expect=expected))
    assert set(got) == set(history)
    polls_seen = {(f["partition"], f["offset"]) for fs in got.values() for f in fs}
    assert len(polls_seen) == expected  # one forecast per reading, none duplicated
    warm = s.min_history - 1  # the first forecast is for this reading
    for dev, hist in history.items():
        fs = got[dev]
        assert [f["ts"] for f in fs] == [t for t, _ in hist[warm:]]
        x = np.array([v for _, v in hist])
        ref, _, scale = served_forecasts(served.model, x, s)
        fc = np.array([f["forecast"] for f in fs])
        np.testing.assert_allclose((fc - ref[warm:]) / scale[warm:, None], 0.0, atol=ATOL_NORMALIZED,
                                   err_msg=dev)
        assert all(f["model_version"] == served.version for f in fs)
