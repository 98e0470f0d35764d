"""Restore from the real changelog never hangs: empty, aborted transactions, truncation, cancel."""

import time
import uuid

import pytest
from kafka import KafkaAdminClient, KafkaProducer
from kafka.structs import TopicPartition

from stream_lstm.checkpointing.changelog import ensure_changelog_topic, restore
from stream_lstm.checkpointing.store import StateStore

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(120)]


@pytest.fixture
def changelog(settings_factory, topic_name):
    s = settings_factory(changelog_topic=f"{topic_name}-changelog")
    ensure_changelog_topic(s, 2)
    return s, s.changelog_topic_name()


def send(bootstrap, topic, records, transactional=None, commit=True):
    kw = {"transactional_id": transactional} if transactional else {}
    p = KafkaProducer(bootstrap_servers=bootstrap, **kw)
    if transactional:
        p.init_transactions()
        p.begin_transaction()
    for key, value, part in records:
        p.send(topic, key=key.encode(), value=value, partition=part)
    if transactional:
        (p.commit_transaction if commit else p.abort_transaction)()
    p.flush()
    p.close()


def test_empty_changelog_completes_at_once(changelog, tmp_path):
    s, topic = changelog
    store = StateStore(tmp_path / "s.sqlite")
    t0 = time.monotonic()
    res = restore(s, topic, [0, 1], store)
    assert res.complete and res.restored == {0: 0, 1: 0} and time.monotonic() - t0 < 10
    assert store.checkpoint(0) == 0


def test_latest_value_wins_tombstones_delete_and_incremental(changelog, tmp_path, bootstrap):
    s, topic = changelog
    records = [(f"d{i % 50}", f"v{i}".encode(), i % 50 % 2) for i in range(500)]
    records += [("d3", None, 1)]
    send(bootstrap, topic, records)
    store = StateStore(tmp_path / "s.sqlite")
    res = restore(s, topic, [0, 1], store)
    assert res.complete and sum(res.restored.values()) == 501
    assert store.get("d3") is None and store.get("d7") == b"v457" and store.count() == 49
    send(bootstrap, topic, [("d7", b"newer", 1)])
    res = restore(s, topic, [0, 1], store)
    assert res.restored == {0: 0, 1: 1} and store.get("d7") == b"newer"


def test_aborted_transaction_is_skipped_without_hanging(changelog, tmp_path, bootstrap):
    s, topic = changelog
    tid = f"t-{uuid.uuid4().hex[:6]}"
    send(bootstrap, topic, [("a", b"committed", 0)], transactional=tid)
    send(bootstrap, topic, [("a", b"aborted", 0), ("b", b"aborted", 0)], transactional=tid, commit=False)
    store = StateStore(tmp_path / "s.sqlite")
    res = restore(s, topic, [0], store, timeout_s=30)
    assert res.complete
    assert store.get("a") == b"committed" and store.get("b") is None


def test_truncated_changelog_rebuilds_from_log_start(changelog, tmp_path, bootstrap):
    s, topic = changelog
    send(bootstrap, topic, [(f"d{i}", b"old", 0) for i in range(10)])
    store = StateStore(tmp_path / "s.sqlite")
    restore(s, topic, [0], store)
    store.set_checkpoints({0: 3})  # pretend we were behind
    send(bootstrap, topic, [("late", b"new", 0)])
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin.delete_records({TopicPartition(topic, 0): 8})  # log start moves past our checkpoint
    admin.close()
    res = restore(s, topic, [0], store)
    assert res.complete and res.restored[0] == 3  # offsets 8, 9, 10
    assert store.get("d0") is None and store.get("late") == b"new" and store.get("d9") == b"old"


def test_rebalance_during_restore_returns_promptly(changelog, tmp_path, bootstrap):
    s, topic = changelog
    send(bootstrap, topic, [(f"d{i}", b"x" * 2000, i % 2) for i in range(20000)])
    store = StateStore(tmp_path / "s.sqlite")
    calls = []
    t0 = time.monotonic()
    res = restore(s, topic, [0, 1], store, progress=lambda *a: calls.append(a), cancelled=lambda: bool(calls))
    assert not res.complete and time.monotonic() - t0 < 10
    done_so_far = store.count()
    res = restore(s, topic, [0, 1], store)  # resumes from the checkpoints it reached
    assert res.complete and store.count() == 20000 and sum(res.restored.values()) == 20000 - done_so_far
