"""Crash recovery: kill -9 the worker at chosen moments; exactly-once output and exact state.

The default settings, as users run them, with readings arriving live. Every reading from a
device's ``min_history``-th on must have exactly one forecast under read_committed, none
missing, and each device's forecasts and final h/c must equal an uninterrupted run (the offline
reference) within 1e-5. The kills are placed by the worker's own events, not by sleeps: half
while it restores its checkpoints or replays the input since them (right after it logs
"partitions assigned" or "restored state"), half mid-stream (after this incarnation has
committed output of its own); with the default 30 s checkpoint interval most restores replay.
Each kill's moment is checked afterwards from that incarnation's log.
"""

import random
import signal
import threading
import time

import numpy as np
import pytest
import torch

from stream_lstm.kafka.clients import make_consumer
from stream_lstm.models.registry import save_model
from stream_lstm.models.serving import fresh_model
from stream_lstm.worker import Worker

from .helpers import (
    assert_exactly_once_and_continuous,
    guarantee_settings,
    produce_readings,
    published,
    read_topic,
    wait_for,
)
from .workers import start_worker

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(600)]


KILLS = 8
# Where each kill lands, in turn: while restoring or replaying (placed by a log line), or
# mid-stream (after this incarnation's own committed output).
MOMENTS = ("partitions assigned", "mid-stream", "restored state", "mid-stream") * 2
N_DEVICES, N_READINGS = 30, 100
ROUND_S = 0.3  # one reading from every device this often: ~100 readings/s, live
WAIT_S = 90.0  # for the moment a kill waits for


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


def test_kill_9_eight_times_then_finish(settings_factory, topic_name, tmp_path):
    s = guarantee_settings(settings_factory, topic_name, processing_guarantee="exactly_once",
                           model_path=tmp_path / "model.safetensors")
    torch.manual_seed(5)
    served = fresh_model(s)
    save_model(served.model, served.spec, s.model_path, {"version": "v-crash"})
    readings = fleet(N_DEVICES, N_READINGS)
    produce_readings(s, topic_name, readings[:N_DEVICES])  # the topic exists before the worker
    # The rest arrives live, paced, and spread over the incarnations: each kill lets the next
    # share of rounds through, so every incarnation has new readings to work on.
    per_kill = N_READINGS // (KILLS + 1)
    allowed = threading.Semaphore(per_kill)

    def feed():
        for i in range(N_DEVICES, len(readings), N_DEVICES):
            assert allowed.acquire(timeout=300)
            time.sleep(ROUND_S)
            produce_readings(s, topic_name, readings[i : i + N_DEVICES])

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    rng = random.Random(7)
    log = tmp_path / "worker.log"
    log.touch()
    landed = []
    probe = make_consumer(s, isolation_level="read_committed")  # no group; end offsets = LSO
    for moment in MOMENTS:
        mark = log.stat().st_size  # this incarnation's lines start here

        def own(mark=mark):
            return log.read_text()[mark:]
        proc = start_worker(s, "w0", log)
        try:
            if moment == "mid-stream":
                # Its producer aborted the last incarnation's open transaction when it started
                # (which moves the end offsets too): count only output after its assignment.
                wait_for(lambda own=own: "partitions assigned" in own(), "the assignment", WAIT_S)
                before = output_end(probe, s.output_topic)
                wait_for(lambda before=before: output_end(probe, s.output_topic) > before, "output of its own", WAIT_S)
                time.sleep(rng.uniform(0.0, 0.3))  # (somewhere in its next transactions)
            else:
                wait_for(lambda own=own, moment=moment: moment in own(), moment, WAIT_S)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            for _ in range(per_kill):
                allowed.release()
        text = own()
        landed.append((moment, "restored state" in text, "replayed readings since" in text))
    for _ in range(N_READINGS):
        allowed.release()
    probe.close()
    feeder.join(120)
    assert not feeder.is_alive()
    # The kills landed where they were meant to: one at least before its restore finished, and
    # the mid-stream ones after it.
    assert any(not restored for m, restored, _ in landed if m == "partitions assigned"), landed
    assert all(restored for m, restored, _ in landed if m == "mid-stream"), landed
    proc = start_worker(s, "w0", log)
    history = {}
    for dev, _, v in readings:
        history.setdefault(dev, []).append(v)
    try:
        out = read_topic(s, s.output_topic, expect=published(history, s), timeout_s=240, idle_s=10)
    finally:
        proc.terminate()
        proc.wait(60)
    assert_exactly_once_and_continuous(out, history, served.model, s, log.read_text())
    # The state a restore ends with (checkpoints, then the input replayed since them) equals
    # the uninterrupted run's: restored by a fresh worker, which publishes nothing new.
    restored = {}

    def until(w):
        if w.assigned and not w.partitions.busy() and not restored:  # restored and replayed
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
