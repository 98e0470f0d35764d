"""The changelog and restore, against the real local Kafka broker (never mocked); the topic's
creation and configuration: tests/kafka/test_topics.py."""

from __future__ import annotations

import time
import uuid

import pytest
from kafka.structs import TopicPartition

from stream_lstm.checkpointing import changelog
from stream_lstm.checkpointing.changelog import (
    RestoreTimeout,
    changelog_records,
    restore,
    tombstone,
)
from stream_lstm.checkpointing.codec import decode_snapshot
from stream_lstm.checkpointing.store import StateStore
from stream_lstm.config import Settings
from stream_lstm.kafka.clients import make_admin, make_producer
from stream_lstm.kafka.topics import (
    CHANGELOG_CONFIG,
    TopicSpec,
    ensure_changelog_topic,
    ensure_topics,
    partition_count,
)
from stream_lstm.state.snapshot import DeviceSnapshot

pytestmark = pytest.mark.kafka


@pytest.fixture
def settings(bootstrap, topic_name) -> Settings:
    return Settings(bootstrap_servers=bootstrap, changelog_topic=topic_name)


@pytest.fixture
def store(tmp_path):
    st = StateStore(tmp_path / "state.sqlite")
    yield st
    st.close(clean=False)


def snap(dev: str, partition: int, version: int) -> DeviceSnapshot:
    s = DeviceSnapshot.empty(dev, num_layers=1, hidden_size=4, n_features=1, partition=partition)
    s.n_seen = version  # which write this is: the store must hold the latest
    return s


def produce(settings: Settings, records, transactional: bool = False) -> None:
    """Send ``(key, value, partition)`` records; in one committed transaction if asked."""
    topic = settings.changelog_topic_name()
    if transactional:
        prod = make_producer(settings, transactional_id=f"test-{uuid.uuid4().hex[:8]}")
        prod.init_transactions()
        prod.begin_transaction()
    else:
        prod = make_producer(settings)
    for key, value, partition in records:
        prod.send(topic, key=key, value=value, partition=partition)
    if transactional:
        prod.commit_transaction()
    prod.flush()
    prod.close()
    if transactional:
        wait_for_markers(settings, topic)


def wait_for_markers(settings: Settings, topic: str, timeout_s: float = 30.0) -> None:
    """Until read_committed readers see the committed transaction whole.

    ``commit_transaction`` returns once the coordinator has decided; it writes the commit
    markers into the partitions after that, and until then a read_committed reader's end (the
    last stable offset) is still before the transaction. On a loaded machine a restore run at
    once could stop there. (The worker does not depend on this: a restore short of a
    transaction also misses its replay marker, and replays the input from the older one.)"""
    tps = [TopicPartition(topic, p) for p in range(partition_count(settings, topic))]
    deadline = time.monotonic() + timeout_s

    def ends(committed: bool) -> dict[TopicPartition, int]:
        return changelog._list_offsets(settings, tps, ("latest",), 15_000, committed)[0]

    while ends(True) != ends(False):
        assert time.monotonic() < deadline, "the transaction's markers never arrived"
        time.sleep(0.05)  # (no event to wait on: the broker writes the markers)


def stored_versions(store: StateStore) -> dict[str, int]:
    return {d: decode_snapshot(store.get(d)[1]).n_seen for d in store.device_ids()}


@pytest.mark.timeout(60, func_only=True)  # the broker fixture may start first
def test_empty_changelog_completes_immediately(settings, store):
    ensure_changelog_topic(settings, 2)
    calls = []
    r = restore(settings, settings.changelog_topic_name(), [0, 1], store,
                progress=lambda *a: calls.append(a))
    assert r.complete and r.restored == {0: 0, 1: 0} and store.count() == 0
    assert r.seconds < 10
    assert store.checkpoint(0) == 0 and store.checkpoint(1) == 0
    assert sorted(calls) == [(0, 0, 0), (1, 0, 0)]
    assert restore(settings, settings.changelog_topic_name(), [], store).complete


@pytest.mark.timeout(90, func_only=True)  # the broker fixture may start first
def test_restore_keeps_latest_value_per_key_and_applies_tombstones(settings, store):
    ensure_changelog_topic(settings, 2)
    devs = [f"dev-{i}" for i in range(1500)]
    records = []
    for version in (1, 2):
        records += changelog_records([snap(d, i % 2, version) for i, d in enumerate(devs)])
    gone = devs[::7]
    records += [tombstone(d, i % 2) for i, d in enumerate(devs) if d in set(gone)]
    records += [(b"dev-bad", b"not a snapshot", 0), (b"\xff\xfe", records[0][1], 1)]
    newer = snap("dev-newer", 1, 2)
    newer.schema = 0x1234ABCD  # written by a version that declares other columns
    records += changelog_records([newer])
    produce(settings, records)
    progress = []
    r = restore(settings, settings.changelog_topic_name(), [0, 1], store,
                progress=lambda *a: progress.append(a))
    assert r.complete and r.skipped == 2 and r.other_schemas == {"1234abcd": 1}
    assert sum(r.restored.values()) == len(records)
    expected = {d: 2 for d in devs if d not in set(gone)} | {"dev-newer": 2}
    assert stored_versions(store) == expected
    assert set(store.device_ids({0})) == {d for i, d in enumerate(devs) if i % 2 == 0} - set(gone)
    # The last report per partition says done == total, and checkpoints are at the end.
    last = {p: (done, total) for p, done, total in progress}
    assert all(done == total > 0 for done, total in last.values())
    assert store.checkpoint(0) + store.checkpoint(1) == len(records)


@pytest.mark.timeout(90, func_only=True)  # the broker fixture may start first
def test_aborted_and_open_transactions_are_skipped_without_hanging(settings, store):
    ensure_changelog_topic(settings, 1)
    topic = settings.changelog_topic_name()
    prod = make_producer(settings, transactional_id=f"test-{uuid.uuid4().hex[:8]}")
    prod.init_transactions()

    def txn(snaps, commit):
        prod.begin_transaction()
        for k, v, p in changelog_records(snaps):
            prod.send(topic, key=k, value=v, partition=p)
        prod.flush()
        prod.commit_transaction() if commit else prod.abort_transaction()

    txn([snap(f"d{i}", 0, 1) for i in range(100)], commit=True)
    txn([snap(f"d{i}", 0, 99) for i in range(100)] + [snap("ghost", 0, 99)], commit=False)
    txn([snap(f"d{i}", 0, 2) for i in range(50)], commit=True)
    txn([snap(f"d{i}", 0, 98) for i in range(100)], commit=False)  # the log ends in an abort
    wait_for_markers(settings, topic)
    t0 = time.monotonic()
    r = restore(settings, topic, [0], store, timeout_s=30)
    assert r.complete and time.monotonic() - t0 < 10
    assert stored_versions(store) == {f"d{i}": 2 if i < 50 else 1 for i in range(100)}
    assert r.restored[0] == 150  # aborted records never reach us
    assert store.checkpoint(0) == 355  # past 351 records and 4 transaction markers

    # An open transaction: restore stops at the last stable offset instead of waiting for it.
    prod.begin_transaction()
    for k, v, p in changelog_records([snap("d0", 0, 77)]):
        prod.send(topic, key=k, value=v, partition=p)
    prod.flush()
    other = make_producer(settings)
    other.send(topic, key=b"late", value=changelog_records([snap("late", 0, 5)])[0][1], partition=0)
    other.flush()
    other.close()
    r = restore(settings, topic, [0], store, timeout_s=30)
    assert r.complete and r.restored[0] == 0 and stored_versions(store)["d0"] == 2
    prod.abort_transaction()
    prod.close()
    wait_for_markers(settings, topic)
    r = restore(settings, topic, [0], store, timeout_s=30)
    assert r.complete and r.restored[0] == 1
    assert stored_versions(store)["d0"] == 2 and stored_versions(store)["late"] == 5


@pytest.mark.timeout(90, func_only=True)  # the broker fixture may start first
def test_truncated_changelog_is_rebuilt_from_log_start(settings, store, caplog):
    # Only a topic that also deletes can be truncated (DeleteRecords is refused on
    # compact-only topics), e.g. a changelog someone gave a retention.
    topic = settings.changelog_topic_name()
    ensure_topics(settings, [TopicSpec(topic, 1, {**CHANGELOG_CONFIG,
                                                  "cleanup.policy": "compact,delete"})])
    produce(settings, changelog_records([snap(f"d{i}", 0, 1) for i in range(200)]))
    assert restore(settings, topic, [0], store).complete and store.checkpoint(0) == 200
    produce(settings, changelog_records([snap(f"d{i}", 0, 2) for i in range(100)]))
    admin = make_admin(settings)
    try:
        admin.delete_records({TopicPartition(topic, 0): 250})  # log start past checkpoint 200
    finally:
        admin.close()
    with caplog.at_level("WARNING", logger="stream_lstm.checkpointing"):
        r = restore(settings, topic, [0], store)
    assert r.complete and r.rebuilt == [0] and r.restored[0] == 50
    # Said: the store held state the changelog no longer has (also a deleted, recreated or
    # renamed changelog topic; a settings review found that silent).
    (said,) = [m for m in caplog.messages if "local state store's checkpoint" in m]
    assert f"changelog {topic} partition 0 is not in the topic (offset 200; it holds 250 to 300)" in said
    # Only what the log still holds: rows the truncation may have invalidated are gone.
    assert stored_versions(store) == {f"d{i}": 2 for i in range(50, 100)}
    assert store.checkpoint(0) == 300


@pytest.mark.timeout(90, func_only=True)  # the broker fixture may start first
def test_cancel_returns_promptly_and_a_later_restore_resumes(settings, store, monkeypatch):
    ensure_changelog_topic(settings, 2)
    topic = settings.changelog_topic_name()
    produce(settings, changelog_records([snap(f"d{i}", i % 2, 1) for i in range(3000)]))
    monkeypatch.setitem(changelog._FETCH, "max_poll_records", 200)  # many small polls
    revoked = {"flag": False, "at": 0.0}

    def on_progress(partition, done, total):
        if not revoked["flag"]:
            revoked.update(flag=True, at=time.monotonic())  # a rebalance revokes them

    r = restore(settings, topic, [0, 1], store, progress=on_progress,
                cancelled=lambda: revoked["flag"])
    assert not r.complete and revoked["flag"]
    assert time.monotonic() - revoked["at"] < 2.0
    first = sum(r.restored.values())
    assert 0 < first < 3000 and store.count() == first
    assert store.checkpoint(0) + store.checkpoint(1) == first  # progress is kept
    r = restore(settings, topic, [0, 1], store)
    assert r.complete and sum(r.restored.values()) == 3000 - first and store.count() == 3000


@pytest.mark.timeout(90, func_only=True)  # the broker fixture may start first
def test_incremental_restore_reads_only_new_records(settings, store):
    ensure_changelog_topic(settings, 2)
    topic = settings.changelog_topic_name()
    produce(settings, changelog_records([snap(f"d{i}", i % 2, 1) for i in range(400)]),
            transactional=True)
    assert sum(restore(settings, topic, [0, 1], store).restored.values()) == 400
    produce(settings, changelog_records([snap(f"d{i}", i % 2, 2) for i in range(30)]),
            transactional=True)
    r = restore(settings, topic, [0, 1], store)
    assert r.complete and r.rebuilt == [] and sum(r.restored.values()) == 30
    assert sum(v == 2 for v in stored_versions(store).values()) == 30
    assert sum(restore(settings, topic, [0, 1], store).restored.values()) == 0
    # Restoring one partition leaves the other's rows and checkpoint alone.
    cp1 = store.checkpoint(1)
    produce(settings, changelog_records([snap("d0", 0, 3)]))
    assert restore(settings, topic, [0], store).restored == {0: 1}
    assert store.checkpoint(1) == cp1 and store.count() == 400


@pytest.mark.timeout(90, func_only=True)  # the broker fixture may start first
def test_a_device_that_moved_partitions_restores_its_later_state(settings, store, tmp_path):
    # Partitions were added to the input: "moved"'s readings went from partition 0 to 1, where a
    # worker wrote its later state; its old row stays in partition 0 (until that partition's TTL
    # tombstone, which must not delete the later row). Whichever partition a worker restores
    # last, it keeps the later state (the old code kept whichever it read last).
    ensure_changelog_topic(settings, 2)
    topic = settings.changelog_topic_name()
    old, new = snap("moved", 0, 1), snap("moved", 1, 2)
    old.last_ts, new.last_ts = 1000.0, 2000.0
    produce(settings, changelog_records([new]) + changelog_records([old]) + [tombstone("moved", 0)]
            + changelog_records([old]))  # (an older row again: a worker restored before the TTL)
    assert restore(settings, topic, [1], store).complete and restore(settings, topic, [0], store).complete
    assert stored_versions(store) == {"moved": 2} and store.device_ids({1}) == ["moved"]
    both = StateStore(tmp_path / "both.sqlite")  # a worker that restores both at once
    try:
        assert restore(settings, topic, [0, 1], both).complete
        assert stored_versions(both) == {"moved": 2}
    finally:
        both.close(clean=False)


@pytest.mark.timeout(60, func_only=True)  # the broker fixture may start first
def test_restore_gives_up_after_its_timeout(settings, store):
    ensure_changelog_topic(settings, 1)
    produce(settings, changelog_records([snap(f"d{i}", 0, 1) for i in range(10)]))
    with pytest.raises(RestoreTimeout, match="did not finish|could not list"):
        restore(settings, settings.changelog_topic_name(), [0], store, timeout_s=0.001)


@pytest.mark.timeout(90, func_only=True)  # the broker fixture may start first
def test_truncation_during_restore_restarts_from_new_log_start(settings, store, monkeypatch):
    topic = settings.changelog_topic_name()
    ensure_topics(settings, [TopicSpec(topic, 1, {**CHANGELOG_CONFIG,
                                                  "cleanup.policy": "compact,delete"})])
    produce(settings, changelog_records([snap(f"d{i}", 0, 1) for i in range(2000)]))
    # Small fetches, so restore is still fetching when the log start moves.
    monkeypatch.setitem(changelog._FETCH, "max_partition_fetch_bytes", 8192)
    monkeypatch.setitem(changelog._FETCH, "fetch_max_bytes", 8192)
    monkeypatch.setitem(changelog._FETCH, "max_poll_records", 20)
    monkeypatch.setattr(changelog, "_PROGRESS_EVERY_S", 0.0)
    truncated = []

    def on_progress(partition, done, total):
        if not truncated:
            admin = make_admin(settings)
            try:
                admin.delete_records({TopicPartition(topic, 0): 1500})
            finally:
                admin.close()
            truncated.append(done)

    r = restore(settings, topic, [0], store, progress=on_progress, timeout_s=60)
    assert r.complete and r.rebuilt == [0] and truncated[0] < 1500
    assert stored_versions(store) == {f"d{i}": 1 for i in range(1500, 2000)}
    assert store.checkpoint(0) == 2000
