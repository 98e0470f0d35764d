"""Device TTL (forgotten: gone from memory and store, tombstoned in the changelog), and a
burst of 10x the sustainable rate: lag grows then drains, memory stays bounded, no rebalance."""

import json
import resource
import threading
import time

import pytest

from stream_lstm.encoding import encode_reading
from stream_lstm.kafka.clients import make_producer
from stream_lstm.models.serving import fresh_model
from stream_lstm.worker import Worker

from .helpers import produce_readings, read_topic

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(300)]


def test_idle_device_is_forgotten_after_its_ttl(settings_factory, topic_name):
    s = settings_factory(input_topic=topic_name, output_topic=f"{topic_name}-out", dlq_topic=f"{topic_name}-dlq",
                         group_id=f"{topic_name}-g", min_history=1, device_ttl_s=2.0, window=8, hidden_size=8)
    t0 = time.time() - 3600
    produce_readings(s, topic_name, [("idle", t0, 1.0), ("busy", t0, 1.0)])
    worker = Worker(s, fresh_model(s))
    seen = {}

    def until(w):  # runs in the worker's loop, between batches
        if "idle" in w.table.index:
            seen["idle_was_in_memory"] = True
        elif seen.get("idle_was_in_memory") and "busy" in w.table.index:
            seen["forgotten"] = True
        return seen.get("forgotten", False) or seen.get("give_up", False)

    th = threading.Thread(target=lambda: worker.run(until=until), daemon=True)
    th.start()
    deadline = time.time() + 30
    k = 1
    producer = make_producer(s)
    # "busy" keeps sending, often enough for the input to count as flowing (no gap of half the
    # TTL: housekeeping.py), and "idle" does not.
    while time.time() < deadline and not seen.get("forgotten"):
        producer.send(topic_name, encode_reading("busy", t0 + 60 * k, [1.0 + k]), key=b"busy")
        producer.flush()
        k += 1
        time.sleep(0.2)
    producer.close()
    seen["give_up"] = True
    th.join(30)
    assert seen.get("forgotten"), seen
    assert worker.metrics.expired_devices._value.get() >= 1
    records = read_topic(s, s.changelog_topic_name(), idle_s=2)
    idle = [r for r in records if r.key == b"idle"]
    assert idle and idle[-1].value is None  # tombstoned: compaction will drop it
    assert worker.state.store.path.exists()
    from stream_lstm.checkpointing.store import StateStore

    store = StateStore(worker.state.store.path)
    assert store.get("idle") is None


def test_a_pause_of_the_whole_input_longer_than_the_ttl_forgets_nobody(settings_factory, topic_name):
    """A soak test found it: by the wall clock, every device looked idle after a pause of the
    input (or a stopped worker) longer than the TTL, and the first commit after the input
    resumed forgot those whose readings had not come in yet: their state, their open alerts."""
    s = settings_factory(input_topic=topic_name, output_topic=f"{topic_name}-out", dlq_topic=f"{topic_name}-dlq",
                         group_id=f"{topic_name}-g", min_history=1, device_ttl_s=3.0, window=8, hidden_size=8)
    worker = Worker(s, fresh_model(s))
    sent, stop, held_at_the_end = [0], threading.Event(), set()
    both_in_memory = threading.Event()

    def until(w):
        if {"a", "b"} <= set(w.table.index):
            both_in_memory.set()
        done = stop.is_set() and w.totals.consumed >= sent[0]
        if done:
            held_at_the_end.update(w.table.index)
        return done

    th = threading.Thread(target=lambda: worker.run(until=until), daemon=True)
    th.start()
    producer, t0, k = make_producer(s), time.time() - 3600, [0]

    def send(devices, seconds):
        end = time.time() + seconds
        while time.time() < end:
            for dev in devices:
                producer.send(topic_name, encode_reading(dev, t0 + 60 * k[0], [1.0 + k[0] % 5]), key=dev.encode())
                sent[0] += 1
            producer.flush()
            k[0] += 1
            time.sleep(0.2)

    send(["a", "b"], 2.0)
    assert both_in_memory.wait(60)
    time.sleep(4.5)  # the pause itself (longer than the TTL): the scenario, not a synchronisation
    send(["a"], 1.5)  # the input resumes, "b" a little later
    send(["a", "b"], 1.0)
    producer.close()
    stop.set()
    th.join(60)
    assert not th.is_alive() and worker.totals.consumed == sent[0]
    assert worker.metrics.expired_devices._value.get() == 0
    assert held_at_the_end == {"a", "b"}


def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def test_burst_lag_grows_then_drains_without_rebalances(settings_factory, topic_name):
    s = settings_factory(input_topic=topic_name, output_topic=f"{topic_name}-out", dlq_topic=f"{topic_name}-dlq",
                         group_id=f"{topic_name}-g", min_history=1, window=8, hidden_size=8,
                         processing_guarantee="at_least_once")
    worker = Worker(s, fresh_model(s))
    revoked, assigned = [], []
    original_revoked, original_lost, original_assigned = worker.on_revoked, worker.on_lost, worker.on_assigned
    stop = threading.Event()
    # Revocations while running (closing at the end revokes everything, which does not count),
    # and partitions lost: a member thrown out of its group (what a burst that stalls the poll
    # would cause) loses them without a revocation.
    worker.on_revoked = lambda parts: (None if stop.is_set() else revoked.append(parts), original_revoked(parts))  # type: ignore[method-assign]
    worker.on_lost = lambda parts: (revoked.append(("lost", parts)), original_lost(parts))  # type: ignore[method-assign]
    worker.on_assigned = lambda parts: (parts and assigned.append(parts), original_assigned(parts))  # type: ignore[method-assign]
    lags = []

    def watch():
        while not stop.is_set():
            text = worker.metrics.exposition().decode()
            lags.append(sum(float(line.split()[-1]) for line in text.splitlines()
                            if line.startswith("stream_lstm_consumer_lag_messages{")))
            time.sleep(0.2)

    th = threading.Thread(target=lambda: worker.run(until=lambda w: stop.is_set()), daemon=True)
    th.start()
    threading.Thread(target=watch, daemon=True).start()
    deadline = time.time() + 60  # the burst starts once the worker holds every partition
    while (len(worker.assigned) < s.topic_partitions or worker.state.restoring) and time.time() < deadline:
        time.sleep(0.05)
    assert len(worker.assigned) == s.topic_partitions, "the worker was never assigned its partitions"
    rss0 = rss_mb()
    # The sustainable rate here is a few thousand readings/s; the burst lands 40k at once.
    producer = make_producer(s, linger_ms=20)
    t0 = time.time() - 86400
    n = 40_000
    for i in range(n):
        dev = f"b{i % 500}"
        producer.send(topic_name, encode_reading(dev, t0 + 60 * (i // 500), [float(i % 9)]), key=dev.encode())
    producer.flush()
    producer.close()
    deadline = time.time() + 180
    while worker.totals.consumed < n and time.time() < deadline:
        time.sleep(0.5)
    while (not lags or lags[-1] > 0) and time.time() < deadline:  # the gauge catches up
        time.sleep(0.2)
    stop.set()
    th.join(60)
    assert worker.totals.consumed == n
    assert max(lags) > 2000, "the burst should build a backlog"
    assert lags[-1] == 0, "and the backlog drains"
    assert not revoked and len(assigned) == 1, f"no rebalance during the burst: {revoked} {assigned}"
    assert rss_mb() - rss0 < 300
    fcs = read_topic(s, s.output_topic, expect=n, timeout_s=120)
    assert len({(json.loads(r.value)["partition"], json.loads(r.value)["offset"]) for r in fcs}) == n
