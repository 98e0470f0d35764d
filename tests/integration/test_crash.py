"""Crash recovery: kill -9 the worker at random points; exactly-once output and exact state.

Every reading must have exactly one forecast under read_committed, none missing, and each
device's forecasts and final h/c must equal an uninterrupted run (the offline reference) within
1e-5. Half the kills land mid-stream, half early (while the worker joins, restores its
checkpoints or replays the input since them); with the default 30 s checkpoint interval most
restores here replay.
"""

import random
import signal
import time

import numpy as np
import pytest
import torch

from stream_lstm.kafka.clients import make_consumer
from stream_lstm.models.registry import save_model
from stream_lstm.models.serving import fresh_model
from stream_lstm.worker import Worker

from .helpers import assert_exactly_once_and_continuous, produce_readings, read_topic
from .workers import start_worker

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(600)]


KILLS = 8


def fleet(n_devices, n_readings, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n_readings):
        for d in range(n_devices):
            out.append((f"dev-{d}", 1_700_000_000.0 + 60 * k, float(20 + d + 5 * np.sin(k / 6) + rng.normal())))
    return out


def output_end(probe, topic) -> int:
    """The output topic's last stable offsets, summed: committed output (markers included)."""
    from kafka import TopicPartition

    parts = [TopicPartition(topic, p) for p in probe.partitions_for_topic(topic) or ()]
    return sum(probe.end_offsets(parts).values()) if parts else 0


def wait_for_progress(probe, topic, after: int, timeout=60):
    """Until the worker has committed more output than ``after`` (so kills land mid-stream).

    End offsets answer in milliseconds; reading the topic back through a consumer group takes
    seconds, long enough for the worker to finish the whole stream before the kill. The probe
    is read_committed, so an open transaction (which a kill aborts) does not count.
    """
    deadline = time.time() + timeout
    while time.time() < deadline:
        if output_end(probe, topic) > after:
            return
        time.sleep(0.05)
    raise AssertionError("the worker made no progress")


def test_kill_9_eight_times_then_finish(settings_factory, topic_name, tmp_path):
    s = settings_factory(input_topic=topic_name, output_topic=f"{topic_name}-out", dlq_topic=f"{topic_name}-dlq",
                         group_id=f"{topic_name}-g", window=16, hidden_size=16, horizon=3, min_history=1,
                         poll_max_records=40, processing_guarantee="exactly_once",
                         model_path=tmp_path / "model.safetensors")
    torch.manual_seed(5)
    served = fresh_model(s)
    save_model(served.model, served.spec, s.model_path, {"version": "v-crash"})
    readings = fleet(30, 100)
    produce_readings(s, topic_name, readings)
    rng = random.Random(7)
    log = tmp_path / "worker.log"
    kills = 0
    at_kill = []
    probe = make_consumer(s, isolation_level="read_committed")  # no group; end offsets = LSO
    for _ in range(KILLS):
        before = output_end(probe, s.output_topic)
        proc = start_worker(s, "w0", log)
        try:
            if kills % 2:
                wait_for_progress(probe, s.output_topic, before)
                time.sleep(rng.uniform(0.0, 0.5))
            else:  # early: while it joins, restores or replays
                time.sleep(rng.uniform(0.5, 3.0))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
        at_kill.append(len(read_topic(s, s.output_topic, idle_s=0.5, timeout_s=3)))
    probe.close()
    assert kills == KILLS
    assert sum(0 < n < len(readings) for n in at_kill) >= 3, at_kill  # the kills landed mid-stream
    proc = start_worker(s, "w0", log)
    try:
        out = read_topic(s, s.output_topic, expect=len(readings), timeout_s=240, idle_s=10)
    finally:
        proc.terminate()
        proc.wait(60)
    history = {}
    for dev, _, v in readings:
        history.setdefault(dev, []).append(v)
    assert_exactly_once_and_continuous(out, history, served.model, s, log.read_text())
    # The state a restore ends with (checkpoints, then the input replayed since them) equals
    # the uninterrupted run's: restored by a fresh worker, which publishes nothing new.
    restored = {}

    def until(w):
        if w.assigned and not w.state.restoring and not restored:
            for dev in history:
                slot = w.table.index.get(dev)
                restored[dev] = (w.table.snapshot(slot) if slot is not None else w.state.load(dev))
        return bool(restored)

    Worker(s, served).run(until=until)
    for dev, xs in history.items():
        snap = restored[dev]
        from stream_lstm.state.normalizer import normalize_sequence

        z, _, _ = normalize_sequence(np.array(xs)[:, None], s.normalizer, s.normalizer_alpha, s.std_floor)
        with torch.no_grad():
            _, _, (h, c) = served.model(torch.from_numpy(z)[None])
        np.testing.assert_allclose(snap.h, h[:, 0].numpy(), atol=1e-5)
        np.testing.assert_allclose(snap.c, c[:, 0].numpy(), atol=1e-5)
        assert snap.n_seen == len(xs)
