"""Hot-swaps with no pause, through the real broker, with the default forecast settings
(experts, blend, calibration) and the default 30 s checkpoint interval, so every restore
replays readings served before and after a swap.

After a swap each device steps under the model its h/c came from until a re-warm slice
converts it; the checkpoint written with the next commit names the new version
(docs/architecture.md, "Hot-swaps"). So each device's published forecasts must equal an
offline replay that switches its weights at its re-warm point, its forecasts' versions never
go back, and a worker killed between two re-warm slices is replaced without a break.
"""

import numpy as np
import pytest
import torch

from stream_lstm import partitions
from stream_lstm.encoding import encode_reading
from stream_lstm.kafka.clients import make_producer
from stream_lstm.kafka.topics import TopicSpec, ensure_topics
from stream_lstm.models.lstm import SimpleLSTM
from stream_lstm.models.registry import LoadedModel, ModelRegistry, model_from_bytes, model_to_bytes
from stream_lstm.models.serving import fresh_model
from stream_lstm.training import lifecycle
from stream_lstm.worker import Worker

from .helpers import (
    ATOL_NORMALIZED,
    forecasts_by_device,
    produce_readings,
    read_topic,
    served_forecasts,
)

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(300)]


class Crash(Exception):
    """Ends a worker's loop the way a kill does: nothing is flushed or committed on the way out."""


def crash(w):
    # Like a kill, the worker commits nothing on its way out: no revocation commit when its
    # consumer leaves the group (that one would checkpoint every changed device).
    w.partitions.on_revoked = lambda partitions: None
    raise Crash


def phase(devices, readings, start, seed):
    rng = np.random.default_rng(seed)
    out = []
    for k in range(start, start + readings):
        for d in range(devices):
            out.append((f"dev-{d}", 1_700_000_000.0 + 60 * k, float(50 + 10 * np.sin(k / 4 + d) + rng.normal())))
    return out


def settings_for(settings_factory, topic, **kw):
    return settings_factory(input_topic=topic, output_topic=f"{topic}-out", dlq_topic=f"{topic}-dlq",
                            group_id=f"{topic}-g", window=16, hidden_size=16, **kw)


def one_partition(settings_factory, topic, **kw):
    """Settings for an input of one partition, created first: the readings are processed in
    the order produced, so every device is in memory at the swap."""
    s = settings_for(settings_factory, topic, topic_partitions=1, **kw)
    ensure_topics(s, [TopicSpec(topic, 1)])
    return s


def all_committed(w, total):
    """Every reading of the input is committed (the offsets after the last commit)."""
    return sum(w.tx.next_offsets.values()) >= total


def assert_continuous_across_the_swap(s, readings, old, new, forecasts):
    """Per device: the versions go old -> new once and never back, and the forecasts equal an
    offline replay that re-warms the device under ``new`` at its first ``new`` forecast."""
    history: dict[str, list[tuple[float, float]]] = {}
    for dev, ts, v in readings:
        history.setdefault(dev, []).append((ts, v))
    assert set(forecasts) == set(history)
    switched_at = {}
    for dev, fs in forecasts.items():
        hist = sorted(history[dev])
        ts_index = {ts: i for i, (ts, _) in enumerate(hist)}
        # Exactly once: one forecast a reading past the warm-up, none twice.
        assert [f["ts"] for f in fs] == [ts for ts, _ in hist[s.min_history - 1 :]], dev
        versions = [f["model_version"] for f in fs]
        # (A device re-warmed after its last reading has no forecast of the new model.)
        k = versions.index(new.version) if new.version in versions else len(versions)
        assert set(versions[:k]) == {old.version} and set(versions[k:]) <= {new.version}, dev
        rewarm = None
        if k < len(fs):
            switched_at[dev] = ts_index[fs[k]["ts"]]
            rewarm = (new.model, switched_at[dev])
        ref, _, scale = served_forecasts(old.model, [v for _, v in hist], s, rewarm=rewarm)
        rows = [ts_index[f["ts"]] for f in fs]
        got = np.array([f["forecast"] for f in fs])
        np.testing.assert_allclose((got - ref[rows]) / scale[rows, None], 0.0, atol=ATOL_NORMALIZED,
                                   err_msg=dev)
    return switched_at


class Feed:
    """Sends readings a round (one a device) at a time, from the worker's own thread."""

    def __init__(self, s, readings, devices):
        self.s, self.producer, self.sent = s, make_producer(s), 0
        self.rounds = [readings[i : i + devices] for i in range(0, len(readings), devices)]

    def send(self, rounds):
        for _ in range(min(rounds, len(self.rounds))):
            for dev, ts, v in self.rounds.pop(0):
                self.producer.send(self.s.input_topic, encode_reading(dev, ts, [v]), key=dev.encode())
                self.sent += 1
        self.producer.flush()


def test_a_swap_under_load_switches_each_device_at_its_rewarm_and_never_back(settings_factory, topic_name):
    # A slice re-warms one device (its budget is below one device's re-warm), and the test
    # lets the next slice run only once two more rounds of the fleet's readings are committed:
    # devices switch one by one at different readings, in batches of both versions.
    s = one_partition(settings_factory, topic_name, poll_max_records=10, rewarm_slice_ms=0.001)
    before, after = phase(12, 20, 0, seed=1), phase(12, 30, 20, seed=2)
    torch.manual_seed(5)
    old = fresh_model(s)
    torch.manual_seed(6)
    new = LoadedModel.of(SimpleLSTM.from_spec(old.spec), old.spec, "v0002")
    produce_readings(s, s.input_topic, before)
    feed = Feed(s, after, 12)
    seen = {"groups": set(), "pending": [12]}
    gate = {"open": False}

    def until(w):
        seen["groups"].add(w.engine.last_groups)
        if "pause" not in seen and w.totals.consumed >= len(before):
            seen["pause"] = w.lifecycle.swap(new)
            feed.send(2)
        if "pause" in seen:
            on_old = sum(v == old.version for v in w.table.model_version)
            if on_old < seen["pending"][-1]:  # a slice re-warmed one: two rounds before the next
                feed.send(2 if on_old else len(after))  # (then the rest)
                gate["open"] = False
            seen["pending"].append(on_old)
            gate["open"] = gate["open"] or w.totals.consumed >= len(before) + feed.sent
        return all_committed(w, len(before) + len(after)) and not w.lifecycle.rewarming

    worker = Worker(s, old)
    rewarm_slice = worker.lifecycle.rewarm_slice
    worker.lifecycle.rewarm_slice = lambda: rewarm_slice() if gate["open"] else 0
    worker.run(until=until)
    feed.producer.close()
    assert 2 in seen["groups"]  # batches of both versions (the swap re-warmed nothing itself)
    assert sorted(worker.engine.models) == ["v0002"]  # the old weights dropped at the end
    assert worker.metrics.rewarm_pending_devices._value.get() == 0
    assert len(set(seen["pending"])) == 13  # one device at a time, between batches
    got = forecasts_by_device(read_topic(s, s.output_topic))
    switched_at = assert_continuous_across_the_swap(s, before + after, old, new, got)
    assert len(switched_at) == 12 and len(set(switched_at.values())) == 12  # each at its own reading


@pytest.mark.parametrize("registered", [True, False], ids=["registered", "unregistered"])
def test_a_kill_between_rewarm_slices_keeps_every_device_continuous(settings_factory, topic_name,
                                                                    monkeypatch, registered):
    """Killed while some devices are re-warmed (some of them committed, some not) and others
    still step under the old model: the next worker restores each device's checkpoint, loads
    the old weights by version for those that name them (from the registry, or, for a model
    in no registry, from the served models kept beside it), replays the readings since under
    the model each checkpoint names, and re-warms the rest itself."""
    s = one_partition(settings_factory, topic_name, poll_max_records=10, rewarm_slice_ms=0.001)
    # At most two re-warmed devices wait for a commit: the conversion spans several commits.
    monkeypatch.setattr(lifecycle, "MAX_UNSAVED", 2)
    # And the second worker's replay spans many loop turns (one poll of 10 readings a turn),
    # the partition paused and not ready until it is done.
    monkeypatch.setattr(partitions, "REPLAY_SLICE_S", 0.0)
    registry = ModelRegistry(s.model_dir)
    torch.manual_seed(5)
    spec = fresh_model(s).spec
    if registered:
        for seed in (5, 6):
            torch.manual_seed(seed)
            registry.register(SimpleLSTM.from_spec(spec), spec, {})
        old, new = registry.load("v0001"), registry.load("v0002")
    else:  # the fresh model a worker starts with, then one from the models topic
        torch.manual_seed(5)
        old = fresh_model(s)
        torch.manual_seed(6)
        new = model_from_bytes(model_to_bytes(SimpleLSTM.from_spec(spec), spec, {"version": "v0002"}))
    a, b, c = phase(12, 20, 0, seed=1), phase(12, 30, 20, seed=2), phase(12, 10, 50, seed=3)
    produce_readings(s, s.input_topic, a)
    feed = Feed(s, b, 12)  # two rounds of the fleet after each device converts
    seen = {"on_new": 0}

    def until(w):
        if "pause" not in seen and w.totals.consumed >= len(a):
            seen["pause"] = w.lifecycle.swap(new)
            feed.send(2)
        on_new = sum(v == new.version for v in w.table.model_version)
        if on_new > seen["on_new"]:
            feed.send(2)
            seen["on_new"] = on_new
        # Between slices: some converted and committed (the next commit wrote them), some
        # converted since the last commit, and some not yet converted.
        if on_new >= 5 and w.state.marked:
            seen["at_crash"] = (on_new, len(w.state.marked), w.totals.consumed)
            crash(w)
        assert "pause" not in seen or w.lifecycle.rewarming, "converted before a crash point"
        return False

    first = Worker(s, old)
    with pytest.raises(Crash):
        first.run(until=until)
    on_new, unsaved, consumed = seen["at_crash"]
    assert on_new < 12 and unsaved <= 2 and on_new - unsaved >= 3 and consumed < len(a + b)
    feed.send(len(b))  # the rest of b
    feed.producer.close()
    produce_readings(s, s.input_topic, c)
    second = Worker(s, new)
    turns = {"replaying": 0}

    def replayed_and_done(w):
        if w.state.replaying:
            turns["replaying"] += 1
            assert not w.health.readiness()[0]  # paused: not ready while it replays
        return all_committed(w, len(a + b + c)) and not w.lifecycle.rewarming

    second.run(until=replayed_and_done)
    replayed = second.metrics.replayed_readings._value.get()
    assert replayed > 50 and turns["replaying"] >= replayed // 10 - 1  # one poll of 10 a turn
    assert second.metrics.rewarm_fallbacks._value.get() == 0  # the old weights were found
    assert registered or not registry.versions()  # (in no registry)
    got = forecasts_by_device(read_topic(s, s.output_topic))
    assert_continuous_across_the_swap(s, a + b + c, old, new, got)


def test_a_swap_inside_the_replay_range_replays_as_it_happened(settings_factory, topic_name):
    """A worker serves readings, swaps, serves more, and crashes before its next checkpoint:
    the next worker's forecasts equal an uninterrupted twin's that saw the same readings and
    the same swap."""
    a, b, c = phase(6, 20, 0, seed=1), phase(6, 8, 20, seed=2), phase(6, 8, 28, seed=3)
    crashed, twin = settings_for(settings_factory, topic_name), settings_for(settings_factory, f"{topic_name}-twin")
    torch.manual_seed(5)
    served = fresh_model(crashed)
    torch.manual_seed(6)
    new = LoadedModel.of(SimpleLSTM.from_spec(served.spec), served.spec, "v0002")
    serve(crashed, served, new, a, b, c, crash_after_b=True)
    serve(twin, served, new, a, b, c, crash_after_b=False)

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


def serve(s, served, new, a, b, c, crash_after_b: bool):
    """Serve a, swap to ``new``, serve b; then crash and serve c with a fresh worker, or go on."""
    produce_readings(s, s.input_topic, a)
    swapped = []

    def until(w):
        if not swapped and w.totals.consumed >= len(a):
            swapped.append(w.lifecycle.swap(new))  # no checkpoint: re-warms mark theirs
            produce_readings(s, s.input_topic, b if crash_after_b else b + c)
        if swapped and w.totals.consumed >= len(a) + len(b) and crash_after_b:
            crash(w)  # before the next checkpoint (30 s by default)
        return w.totals.consumed >= len(a) + len(b) + len(c)

    worker = Worker(s, served)
    if not crash_after_b:
        worker.run(until=until)
        return
    with pytest.raises(Crash):
        worker.run(until=until)
    produce_readings(s, s.input_topic, c)
    second = Worker(s, new)
    second.run(until=lambda w: w.totals.consumed >= len(c))
    assert second.metrics.replayed_readings._value.get() > 0  # b came back by replay
