"""Checkpoints plus input replay, through the real broker (checkpointing/replay.py).

The crash, rebalance and continuity tests (tests/integration) run the default settings, so
every restore there replays the input since the last checkpoint; here: the pieces on their own.
"""

from __future__ import annotations

import pytest
import torch
from kafka.structs import OffsetAndMetadata, TopicPartition

from stream_lstm.checkpointing.changelog import changelog_records
from stream_lstm.checkpointing.replay import (
    REPLAY_MARKER,
    check_retention,
    decode_marker,
    replay_input,
)
from stream_lstm.config import SettingsError
from stream_lstm.kafka.clients import make_consumer, make_producer
from stream_lstm.kafka.topics import TopicSpec, ensure_changelog_topic, ensure_topics
from stream_lstm.models.serving import fresh_model
from stream_lstm.state.snapshot import DeviceSnapshot
from stream_lstm.worker import Worker
from tests.conftest import free_port
from tests.integration.helpers import produce_readings, read_topic, tiny_worker_settings

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(300)]

T0 = 1_700_000_000.0


def worker_settings(settings_factory, topic, **kw):
    return tiny_worker_settings(settings_factory, topic, **({"min_history": 1, "topic_partitions": 1} | kw))


@pytest.mark.parametrize("config, says", [
    ({"retention.ms": "60000"}, "retention.ms=60000"),
    ({"cleanup.policy": "compact"}, "cleanup.policy=compact"),
])
def test_an_input_that_may_delete_what_a_replay_needs_is_refused_at_start(
        settings_factory, topic_name, config, says):
    s = worker_settings(settings_factory, topic_name)
    ensure_topics(s, [TopicSpec(topic_name, 1, config)])
    assert says in (check_retention(s) or "")
    worker = Worker(s, fresh_model(s))
    with pytest.raises(SettingsError, match="refusing to start.*" + says.replace(".", r"\.")):
        worker.connect()
    # With checkpoints in every commit, nothing is replayed: the same topic is fine.
    assert check_retention(s.model_copy(update={"checkpoint_interval_s": 0})) is None


def test_the_brokers_default_retention_is_checked_too(settings_factory, topic_name):
    """A topic with no retention of its own keeps the broker's 7 days, less than 10 intervals
    of a day: it was read as "keeps for ever" and the worker started (a review)."""
    s = worker_settings(settings_factory, topic_name, checkpoint_interval_s=86_400.0)
    ensure_topics(s, [TopicSpec(topic_name, 1)])
    assert "retention.ms=604800000, less than the 864000000 ms" in (check_retention(s) or "")
    assert check_retention(s.model_copy(update={"checkpoint_interval_s": 30.0})) is None


def test_the_retention_refusal_names_what_would_do(settings_factory, topic_name):
    s = worker_settings(settings_factory, topic_name, checkpoint_interval_s=600.0)
    ensure_topics(s, [TopicSpec(topic_name, 1, {"retention.ms": "3600000"})])
    said = check_retention(s) or ""
    assert "Raise retention.ms to at least 6000000, lower the interval to at most 360 s, or" in said
    assert check_retention(s.model_copy(update={"checkpoint_interval_s": 360.0})) is None


def test_an_input_that_also_deletes_by_size_is_said_at_start(settings_factory, topic_name, caplog):
    # A size limit cannot be checked against the replay window without the rate: said, not
    # refused; what a replay then misses is counted (test below).
    s = worker_settings(settings_factory, topic_name)
    ensure_topics(s, [TopicSpec(topic_name, 1, {"retention.bytes": "1073741824"})])
    with caplog.at_level("WARNING", logger="stream_lstm.checkpointing"):
        assert check_retention(s) is None
    said = [r.getMessage() for r in caplog.records if "retention.bytes" in r.getMessage()]
    assert len(said) == 1 and "retention.bytes=1073741824 a partition" in said[0]
    caplog.clear()
    ensure_topics(s, [TopicSpec(f"{topic_name}-2", 1, {})])
    with caplog.at_level("WARNING", logger="stream_lstm.checkpointing"):
        assert check_retention(s.model_copy(update={"input_topic": f"{topic_name}-2"})) is None
    assert not [r for r in caplog.records if "retention.bytes" in r.getMessage()]


def test_replay_reads_the_range_and_counts_what_retention_deleted(settings_factory, topic_name):
    s = worker_settings(settings_factory, topic_name)
    ensure_topics(s, [TopicSpec(topic_name, 1)])
    produce_readings(s, topic_name, [("d", T0 + i, float(i)) for i in range(50)])
    got = []
    done = replay_input(s, 0, 10, 30, lambda recs: got.extend(r.offset for r in recs))
    assert got == list(range(10, 30)) and done.readings == 20 and done.missing == 0
    # Delete the first 20 readings, as retention would: a replay from 10 misses 10 of them.
    from stream_lstm.kafka.clients import make_admin

    admin = make_admin(s)
    try:
        admin.delete_records({TopicPartition(topic_name, 0): 20})
    finally:
        admin.close()
    got.clear()
    done = replay_input(s, 0, 10, 30, lambda recs: got.extend(r.offset for r in recs))
    assert got == list(range(20, 30)) and done.missing == 10


def test_readings_retention_deletes_while_a_replay_runs_are_counted_missing(settings_factory, topic_name,
                                                                             monkeypatch, caplog):
    """Retention reaching the replay's position mid-replay (a worker down about as long as the
    retention): the readings it deleted are counted and said, as those deleted before the
    replay began are, not skipped silently (a review: "earliest" jumped over them)."""
    from stream_lstm.checkpointing import replay
    from stream_lstm.kafka.clients import make_admin

    s = worker_settings(settings_factory, topic_name)
    ensure_topics(s, [TopicSpec(topic_name, 1)])
    for i in range(0, 100, 5):  # batches of 5 (a fetch returns whole batches)
        produce_readings(s, topic_name, [("d", T0 + j, float(j)) for j in range(i, i + 5)])
    # Small fetches: the replay holds a few records at a time, as it does of a large backlog.
    monkeypatch.setattr(replay, "make_consumer", lambda settings, **kw: make_consumer(
        settings, **(kw | {"max_partition_fetch_bytes": 1024, "fetch_max_bytes": 1024})))
    got: list[int] = []

    def handle(records):
        if not got:  # retention deletes the next 60 readings as the replay begins
            admin = make_admin(s)
            try:
                admin.delete_records({TopicPartition(topic_name, 0): 60})
            finally:
                admin.close()
        got.extend(r.offset for r in records)

    with caplog.at_level("ERROR", logger="stream_lstm"):
        done = replay_input(s, 0, 0, 100, handle)
    assert got == sorted(set(got)) and set(range(60, 100)) <= set(got) and got[0] == 0
    assert 0 < done.missing == 100 - len(got) and done.position == 100
    assert "deleted by the input topic's retention" in caplog.text


def test_a_replay_in_time_slices_hands_on_every_record_once(settings_factory, topic_name):
    """A long replay goes on over several loop turns: each slice stops after the poll that
    passes its budget and says where the next one starts."""
    s = worker_settings(settings_factory, topic_name).model_copy(update={"poll_max_records": 7})
    ensure_topics(s, [TopicSpec(topic_name, 1)])
    produce_readings(s, topic_name, [("d", T0 + i, float(i)) for i in range(50)])
    got, start, slices = [], 10, 0
    while start < 40:
        done = replay_input(s, 0, start, 40, lambda recs: got.extend(r.offset for r in recs), budget_s=0.0)
        assert start < done.position <= 40 and done.position - start == done.readings <= 7
        start, slices = done.position, slices + 1
    assert got == list(range(10, 40)) and slices >= 5


def test_a_changelog_without_markers_restores_as_complete_and_gets_its_first_marker(
        settings_factory, topic_name):
    """Today's changelog (written before checkpoints had markers: state with every commit)."""
    s = worker_settings(settings_factory, topic_name)
    ensure_topics(s, [TopicSpec(topic_name, 1)])
    produce_readings(s, topic_name, [("pump", T0 + 60 * i, 20.0 + i) for i in range(5)])
    # The old worker's legacy: the device after 5 readings, and the group's offsets at 5.
    ensure_changelog_topic(s, 1)
    old = DeviceSnapshot.empty("pump", num_layers=1, hidden_size=8, n_features=1, partition=0)
    old.n_seen, old.last_ts, old.count = 5, T0 + 240, 5
    producer = make_producer(s)
    for key, value, partition in changelog_records([old]):
        producer.send(s.changelog_topic_name(), key=key, value=value, partition=partition)
    producer.flush()
    producer.close()
    committer = make_consumer(s, group_id=s.group_id, enable_auto_commit=False)
    committer.commit({TopicPartition(topic_name, 0): OffsetAndMetadata(5, "", -1)})
    committer.close()
    produce_readings(s, topic_name, [("pump", T0 + 300, 25.0)])
    torch.manual_seed(1)
    worker = Worker(s, fresh_model(s))
    worker.run(until=lambda w: w.totals.consumed >= 1)
    assert worker.totals.consumed == 1  # nothing replayed, nothing read twice
    changelog = read_topic(s, s.changelog_topic_name(), idle_s=1)
    markers = [decode_marker(r.value) for r in changelog if r.key == REPLAY_MARKER]
    assert markers[0] == 5  # complete up to the old commit
    latest = [r for r in changelog if r.key == b"pump"][-1]
    from stream_lstm.checkpointing.codec import decode_snapshot

    assert decode_snapshot(latest.value).n_seen == 6  # the old state, one reading on


def test_a_swap_writes_nothing_and_each_rewarm_is_checkpointed_with_the_next_commit(
        settings_factory, topic_name):
    """No barrier at a swap; a device re-warmed under the new model is written (naming it) by
    the next commit, without a replay marker: a replay from the older marker skips its
    readings up to its checkpoint's last_ts (docs/architecture.md, "Hot-swaps")."""
    from stream_lstm.checkpointing.codec import decode_snapshot
    from stream_lstm.models.registry import LoadedModel

    s = worker_settings(settings_factory, topic_name)
    ensure_topics(s, [TopicSpec(topic_name, 1)])
    produce_readings(s, topic_name, [(f"d{i % 4}", T0 + 60 * (i // 4), float(i)) for i in range(40)])
    torch.manual_seed(2)
    worker = Worker(s, fresh_model(s))
    worker.connect()
    worker.run(until=lambda w: w.totals.consumed >= 40)
    assert not worker.state.dirty  # the clean stop checkpointed every changed device
    before = len(read_topic(s, s.changelog_topic_name(), idle_s=1))
    worker = Worker(s, fresh_model(s))
    worker.connect()
    produce_readings(s, topic_name, [(f"d{i % 4}", T0 + 3000 + 60 * (i // 4), float(i)) for i in range(8)])
    seen = {}

    def until(w):
        if w.totals.consumed >= 8 and "markers" not in seen:
            dirty, seen["markers"] = dict(w.state.dirty), dict(w.state.markers)
            assert dirty  # changed since the restore, not yet checkpointed
            torch.manual_seed(3)
            new = fresh_model(s)
            w.lifecycle.swap(LoadedModel(new.model, new.spec, {"version": "v-new"}))
            assert w.state.dirty == dirty and w.state.markers == seen["markers"]  # no barrier
            return False
        # The swap's turn re-warmed all four (a slice), and a later commit wrote them.
        return "markers" in seen and not w.lifecycle.rewarming and not w.state.marked

    worker.run(until=until)
    after = read_topic(s, s.changelog_topic_name(), idle_s=1)[before:]
    snaps = [decode_snapshot(r.value) for r in after if r.key != REPLAY_MARKER]
    assert {(snap.device_id, snap.model_version) for snap in snaps} >= {
        (f"d{i}", "v-new") for i in range(4)}
    # No marker came with them (each partition's checkpoint is 30 s away); the clean stop's
    # checkpoint at the end writes the marker at the input's end.
    markers = [decode_marker(r.value) for r in after if r.key == REPLAY_MARKER]
    assert markers in ([], [48])


def test_a_replay_slice_that_reads_nothing_gives_the_turn_back(settings_factory, topic_name, monkeypatch):
    """A slice whose range never arrives (here: past the log end, as when the broker goes
    away mid-replay) returns where it started once the grace is over, instead of holding the
    loop, /healthz and SIGTERM for the whole replay timeout."""
    from stream_lstm.checkpointing import replay

    monkeypatch.setattr(replay, "FIRST_READ_GRACE_S", 1.0)
    s = worker_settings(settings_factory, topic_name)
    ensure_topics(s, [TopicSpec(topic_name, 1)])
    produce_readings(s, topic_name, [("d", T0 + i, float(i)) for i in range(5)])
    done = replay_input(s, 0, 5, 50, lambda recs: None, timeout_s=60.0, budget_s=0.0)
    assert done.position == 5 and done.readings == 0 and done.seconds < 30.0


def test_a_replay_or_restore_against_a_broker_that_is_down_fails_within_the_liveness_limit(tmp_path):
    """Clients made while the loop runs bootstrap within LOOP_BOOTSTRAP_TIMEOUT_MS, not
    kafka-python's 30 s, which is the liveness limit itself: the loop then beats, and hears
    SIGTERM, between attempts."""
    import time

    from stream_lstm.checkpointing.changelog import restore
    from stream_lstm.checkpointing.store import StateStore
    from stream_lstm.config import Settings
    from stream_lstm.kafka.clients import KafkaConnectError
    from stream_lstm.metrics import HealthState

    s = Settings(bootstrap_servers=f"127.0.0.1:{free_port()}",  # nothing listens there
                 state_dir=tmp_path / "state", model_dir=tmp_path / "m")
    limit = HealthState().liveness_timeout_s / 2
    store = StateStore(tmp_path / "store.db")
    try:
        for attempt in (lambda: restore(s, "x-changelog", [0], store),
                        lambda: replay_input(s, 0, 0, 10, lambda recs: None, budget_s=1.0)):
            began = time.monotonic()
            with pytest.raises(KafkaConnectError):
                attempt()
            assert time.monotonic() - began < limit
    finally:
        store.close(clean=True)


def test_a_marker_no_commit_could_write_is_no_marker():
    # A negative offset (a forged record) made a replay report readings lost to retention.
    from stream_lstm.checkpointing.replay import encode_marker

    assert decode_marker(encode_marker(42)) == 42 and decode_marker(encode_marker(0)) == 0
    assert decode_marker(encode_marker(-5)) is None and decode_marker(b"\x01") is None
