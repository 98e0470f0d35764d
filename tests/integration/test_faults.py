"""Faults against a real broker: it stops mid-stream, while readings arrive, and comes back.

The default settings, as users run them. The worker reports not-ready and why, rolls back a
transaction the outage broke, retries with backoff, resumes, and loses nothing: every reading
has exactly one forecast under read_committed, equal to an uninterrupted run's.
"""

import contextlib
import json
import tempfile
import threading
import time

import pytest

from stream_lstm.encoding import encode_reading
from stream_lstm.kafka.clients import make_producer
from stream_lstm.kafka.local_broker import LocalBroker, free_port
from stream_lstm.models.serving import fresh_model
from stream_lstm.worker import Worker

from .helpers import assert_exactly_once_and_continuous, guarantee_settings, published, read_topic

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(400)]


@contextlib.contextmanager
def own_broker():
    """A broker of the test's own, which it may stop and start (the shared one must stay up)."""
    with tempfile.TemporaryDirectory() as d:
        broker = LocalBroker(port=free_port(), data_dir=d)
        broker.start()
        try:
            yield broker
        finally:
            broker.stop()


def live_feed(producer, topic: str, total: int, devices: int, history: dict, gap_s: float) -> threading.Thread:
    """Send ``total`` readings of ``devices`` devices, one every ``gap_s``, from a thread (started);
    each device's values go into ``history`` as they are sent, their futures into the thread's
    ``futures``."""
    t0 = 1_700_000_000.0

    def send():
        for i in range(total):
            dev, value = f"d{i % devices}", float((i * 7) % 13)
            key = dev.encode()
            feeder.futures.append(producer.send(topic, encode_reading(dev, t0 + 60 * (i // devices), [value]), key=key))
            history.setdefault(dev, []).append(value)
            time.sleep(gap_s)

    feeder = threading.Thread(target=send, daemon=True)
    feeder.futures = []
    feeder.start()
    return feeder


def test_broker_stop_and_restart_mid_stream(settings_factory, topic_name):
    with own_broker() as broker:
        run(broker, settings_factory, topic_name)


def run(broker, settings_factory, topic_name):
    s = guarantee_settings(settings_factory, topic_name)  # the defaults: exactly-once
    s = s.model_copy(update={"bootstrap_servers": broker.bootstrap})
    served = fresh_model(s)
    worker = Worker(s, served)
    stop = threading.Event()
    wt = threading.Thread(target=lambda: worker.run(until=lambda w: stop.is_set()), daemon=True)
    wt.start()
    producer = make_producer(s, linger_ms=5, delivery_timeout_ms=300_000, request_timeout_ms=10_000,
                             max_block_ms=120_000)
    total, history = 1200, {}
    # Live readings, still arriving while the broker is away (the producer buffers).
    feeder = live_feed(producer, topic_name, total, 10, history, gap_s=0.005)
    try:
        # The outage hits a worker at work: readings flowing and transactions being committed.
        assert wait_for(lambda: worker.totals.consumed >= 300, 120), worker.totals
        assert wait_for(lambda: worker.health.readiness()[0], 30), worker.health.readiness()
        broker.stop()  # a real outage: the broker process is gone
        assert wait_for(lambda: not worker.health.readiness()[0], 60), "the outage was never reported"
        _, parts = worker.health.readiness()
        assert not parts.get("broker", "ok") == "ok", parts  # and it says why
        broker.start()
        feeder.join(180)
        producer.flush()
        assert wait_for(lambda: worker.totals.consumed >= total, 180), why_short(worker, s, feeder.futures)
        # Ready again. (Not necessarily by the last reading: the heartbeat check may still say
        # "no consumer-group heartbeat" for a second after the group is back; a sampler that
        # stopped at the last reading made this test fail now and then.)
        assert wait_for(lambda: worker.health.readiness()[0], 60), worker.health.readiness()
    finally:
        stop.set()
        wt.join(60)
        producer.close()
    # (Whether the outage caught a transaction open depends on where the broker's shutdown fell
    # between the 100 ms commits; either way, nothing may be lost or published twice.)
    assert worker.totals.consumed == total
    out = read_topic(s, s.output_topic, expect=published(history, s), timeout_s=120)
    assert_exactly_once_and_continuous(out, history, served.model, s)


def test_an_idle_worker_reports_a_broker_outage_and_recovers(settings_factory, topic_name):
    """No traffic, so no failed publish: the silent group heartbeat must say the broker is gone."""
    with own_broker() as broker:
        idle_outage(broker, settings_factory, topic_name)


def why_short(worker, s, futures) -> str:
    """What a worker short of the readings sent had read, and what the topic holds: which side
    kept the rest (a flake once stopped at 1,175 of 1,200 with nothing to tell)."""
    from kafka import TopicPartition

    from stream_lstm.kafka.clients import make_consumer

    failed = [repr(f.exception)[:200] for f in futures if f.is_done and f.failed()]
    probe = make_consumer(s)
    try:
        parts = [TopicPartition(s.input_topic, p) for p in probe.partitions_for_topic(s.input_topic) or ()]
        ends = {tp.partition: n for tp, n in probe.end_offsets(parts).items()}
    finally:
        probe.close()
    read = {tp.partition: n for tp, n in dict(worker.tx.next_offsets).items()}
    return (f"{worker.totals}; the test's producer: {len(failed)} of {len(futures)} sends failed "
            f"{failed[:2]}; the input's end offsets {ends}; the worker's committed positions {read}; "
            f"readiness {worker.health.readiness()}")


def wait_for(predicate, timeout_s):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def idle_outage(broker, settings_factory, topic_name):
    s = guarantee_settings(settings_factory, topic_name)
    s = s.model_copy(update={"bootstrap_servers": broker.bootstrap})
    worker = Worker(s, fresh_model(s))
    stop = threading.Event()
    wt = threading.Thread(target=lambda: worker.run(until=lambda w: stop.is_set()), daemon=True)
    wt.start()
    t0 = 1_700_000_000.0

    def send(start, n):
        producer = make_producer(s, max_block_ms=60_000)
        for i in range(start, start + n):
            producer.send(topic_name, encode_reading("d0", t0 + 60 * i, [float(i % 7)]), key=b"d0")
        producer.flush()
        producer.close()

    try:
        send(0, 10)
        assert wait_for(lambda: worker.totals.consumed == 10 and worker.health.readiness()[0], 60)
        forecasts_before = worker.totals.forecasts
        broker.stop()  # the worker is idle: nothing to publish, nothing to fail
        assert wait_for(lambda: not worker.health.readiness()[0], 40)
        _, parts = worker.health.readiness()
        assert parts["broker"].startswith("no consumer-group heartbeat"), parts
        assert worker.totals.forecasts == forecasts_before  # no publish happened to report it
        broker.start()
        assert wait_for(lambda: worker.health.readiness()[0], 90), worker.health.readiness()
        send(10, 10)
        assert wait_for(lambda: worker.totals.consumed == 20, 90)
    finally:
        stop.set()
        wt.join(60)
    fcs = [json.loads(r.value) for r in read_topic(s, s.output_topic, expect=20 - s.min_history + 1,
                                                   timeout_s=60)]
    # nothing lost, nothing twice: one forecast a reading from the min_history-th on
    assert sorted(f["offset"] for f in fcs) == list(range(s.min_history - 1, 20))


def test_a_state_disk_that_refuses_writes_is_reported_and_loses_nothing(settings_factory, topic_name):
    """The state store's disk refuses every write (a volume remounted read-only; a full one
    behaves alike, tests/checkpointing/test_store.py) while readings arrive and devices are
    evicted to it (20 devices, memory for 8). The worker goes on, says on /readyz why it is not
    ready, holds the refused rows in memory up to a table's worth (8), then pauses its input
    (held without bound, a fleet larger than the table would take all memory); once the disk
    takes writes again it is ready, reads on, and has lost nothing: every reading has exactly
    one forecast, equal to an uninterrupted run's."""
    from tests.checkpointing.store_full import read_only, writable

    s = guarantee_settings(settings_factory, topic_name, max_devices=8)  # (evictions: the store is written)
    served = fresh_model(s)
    worker = Worker(s, served)
    stop, actions, turns, read = threading.Event(), [], [0], [0]

    def between_turns(w):  # in the worker's own thread, as a disk fills between two writes
        # What it has read: committed, being committed, and in the open transaction (totals count
        # at commit: one CI run saw 1189 -> 1200 while paused, a transaction read before committed).
        tx = w.tx
        read[0] = (tx.totals.consumed + tx.in_flight().consumed
                   + (tx.open.counts.consumed if tx.open is not None else 0))
        turns[0] += 1
        while actions:
            actions.pop(0)(w.state.store)
        return stop.is_set()

    wt = threading.Thread(target=lambda: worker.run(until=between_turns), daemon=True)
    wt.start()
    producer = make_producer(s, linger_ms=5)
    total, history = 1200, {}
    feeder = live_feed(producer, topic_name, total, 20, history, gap_s=0.004)
    try:
        assert wait_for(lambda: worker.totals.consumed >= 300, 120), worker.totals
        actions.append(read_only)
        assert wait_for(lambda: "state_store" in worker.health.readiness()[1], 60), "the refusal was never reported"
        ready, parts = worker.health.readiness()
        assert not ready and "cannot write" in parts["state_store"] and "readonly" in parts["state_store"], parts
        # Every reading now evicts a device: its row is held, until the table's worth pauses.
        assert wait_for(lambda: "input paused" in worker.health.readiness()[1].get("state_store", ""), 60), \
            worker.health.readiness()
        assert len(worker.state.store.unwritten) >= s.max_devices
        feeder.join(120)
        producer.flush()
        turn = turns[0]
        assert wait_for(lambda: turns[0] >= turn + 2, 60)
        paused_at, turn = read[0], turns[0]
        assert wait_for(lambda: turns[0] >= turn + 10, 60)
        assert read[0] == paused_at < total  # nothing read meanwhile
        # Writable again, and no reading left to bring a write: the store tries again by itself.
        actions.append(writable)
        assert wait_for(lambda: worker.health.readiness()[0], 60), worker.health.readiness()
        assert wait_for(lambda: worker.totals.consumed >= total, 120), worker.totals  # read on
        assert worker.state.store.unwritten == {}
    finally:
        stop.set()
        wt.join(60)
        producer.close()
    assert worker.totals.consumed == total and worker.table.evictions > 0
    out = read_topic(s, s.output_topic, expect=published(history, s), timeout_s=120)
    assert_exactly_once_and_continuous(out, history, served.model, s)


def test_the_loop_stays_live_while_it_rolls_back_against_a_stopped_broker(settings_factory, topic_name):
    """Under load the broker goes away and stays away until the worker's first reconnect has
    failed: the failed commit (20 s), the abort (up to 20 s) and that reconnect (10 s) each wait
    on a broker that is gone. /healthz must stay live through them: a real run went 51 s without a beat and
    answered 503 for 20 s of a 45 s outage (a review)."""
    from stream_lstm.metrics import LIVENESS_TIMEOUT_S

    with own_broker() as broker:
        s = guarantee_settings(settings_factory, topic_name)
        s = s.model_copy(update={"bootstrap_servers": broker.bootstrap})
        worker = Worker(s, fresh_model(s))
        beats, beat = [time.monotonic()], worker.health.beat
        worker.health.beat = lambda: (beats.append(time.monotonic()), beat())
        refused, reconnect = threading.Event(), worker.tx.reconnect

        def reconnect_and_tell():  # (the broker comes back once a reconnect has failed)
            try:
                return reconnect()
            except Exception:
                refused.set()
                raise

        worker.tx.reconnect = reconnect_and_tell
        stop = threading.Event()
        wt = threading.Thread(target=lambda: worker.run(until=lambda w: stop.is_set()), daemon=True)
        wt.start()
        producer = make_producer(s, linger_ms=5, delivery_timeout_ms=300_000, max_block_ms=120_000)
        feeder = live_feed(producer, topic_name, 3000, 10, {}, gap_s=0.01)
        try:
            assert wait_for(lambda: worker.totals.consumed >= 200, 120), worker.totals
            broker.stop()
            assert refused.wait(120), "no rollback"
            broker.start()
            assert wait_for(lambda: worker.health.readiness()[0], 120), worker.health.readiness()
        finally:
            stop.set()
            wt.join(60)
            feeder.join(60)
            producer.close()
    gaps = [b - a for a, b in zip(beats, beats[1:], strict=False)]
    assert max(gaps) <= LIVENESS_TIMEOUT_S, f"the loop went {max(gaps):.0f} s without a beat"
