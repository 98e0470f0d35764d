"""A local state store knows which changelog topic its rows came from (checkpointing/identity.py),
through the real broker: a recreated changelog that outgrew the store's checkpoint was merged
with the old topic's rows (a review)."""

from __future__ import annotations

import time

import pytest

from stream_lstm.checkpointing.changelog import changelog_records, restore
from stream_lstm.checkpointing.identity import keep_only_this_topics_rows, topic_id
from stream_lstm.checkpointing.store import StateStore
from stream_lstm.config import Settings
from stream_lstm.kafka.clients import make_admin
from stream_lstm.kafka.topics import ensure_changelog_topic
from tests.checkpointing.test_changelog import produce, snap, stored_versions

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(120)]


def write(settings: Settings, versions: dict[str, int]) -> None:
    produce(settings, changelog_records([snap(dev, 0, v) for dev, v in versions.items()]))


def recreate(settings: Settings, partitions: int = 1) -> None:
    topic = settings.changelog_topic_name()
    admin = make_admin(settings)
    try:
        admin.delete_topics([topic])
        deadline = time.monotonic() + 30  # (a deletion is asynchronous)
        while topic in admin.list_topics():
            assert time.monotonic() < deadline, "the changelog was never deleted"
            time.sleep(0.1)
    finally:
        admin.close()
    while True:  # (its name may be refused for a moment after the deletion)
        try:
            ensure_changelog_topic(settings, partitions)
            return
        except Exception:  # noqa: BLE001
            assert time.monotonic() < deadline, "the changelog was never made again"
            time.sleep(0.2)


def restored(settings: Settings, store: StateStore) -> dict[str, int]:
    keep_only_this_topics_rows(settings, settings.changelog_topic_name(), store, 10.0)
    assert restore(settings, settings.changelog_topic_name(), [0], store).complete
    return stored_versions(store)


def test_a_store_of_a_recreated_changelog_is_rebuilt_from_the_new_topic_only(bootstrap, topic_name, tmp_path, caplog):
    s = Settings(bootstrap_servers=bootstrap, changelog_topic=topic_name)
    ensure_changelog_topic(s, 1)
    write(s, {f"a{i}": 111 for i in range(10)})
    store = StateStore(tmp_path / "state.sqlite")
    assert restored(s, store) == {f"a{i}": 111 for i in range(10)}
    first = store.changelog_id()
    assert (first, [0]) == topic_id(s, topic_name, 10.0) and first is not None
    write(s, {"a0": 112})  # the same topic again: kept, read from the checkpoint on
    assert restored(s, store)["a0"] == 112 and len(store.device_ids()) == 10
    store.close(clean=True)

    # Deleted and made again, then written past the old store's checkpoint (11 records).
    recreate(s)
    write(s, {"a0": 7} | {f"b{i}": 7 for i in range(29)})
    store = StateStore(tmp_path / "state.sqlite")
    assert store.opened_clean
    with caplog.at_level("WARNING", logger="stream_lstm.checkpointing"):
        got = restored(s, store)
    assert got == {"a0": 7} | {f"b{i}": 7 for i in range(29)}  # none of the old topic's devices
    assert store.changelog_id() not in (None, first)
    assert "written from another changelog topic" in caplog.text
    store.close(clean=True)


def test_a_store_from_before_ids_were_kept_adopts_the_topics_id_and_keeps_its_rows(bootstrap, topic_name, tmp_path):
    s = Settings(bootstrap_servers=bootstrap, changelog_topic=topic_name)
    ensure_changelog_topic(s, 1)
    write(s, {"a": 1, "b": 1})
    store = StateStore(tmp_path / "state.sqlite")
    assert restore(s, topic_name, [0], store).complete and store.changelog_id() is None
    assert not keep_only_this_topics_rows(s, topic_name, store, 10.0)
    assert store.changelog_id() == topic_id(s, topic_name, 10.0)[0] and stored_versions(store) == {"a": 1, "b": 1}
    assert topic_id(s, f"{topic_name}-never-made", 10.0) is None
    store.close(clean=True)


def test_the_partitions_a_worker_serves_keep_their_rows_when_the_changelog_was_recreated(
        bootstrap, topic_name, tmp_path):
    """A rebalance hands a worker a partition after the changelog was recreated: the rows of
    the partitions it serves are its own live state (an evicted device's, say), not the old
    topic's; only the others are dropped (a review: the whole store was emptied)."""
    s = Settings(bootstrap_servers=bootstrap, changelog_topic=topic_name)
    ensure_changelog_topic(s, 2)
    produce(s, changelog_records([snap("p0-dev", 0, 42), snap("p1-dev", 1, 42)]))
    store = StateStore(tmp_path / "state.sqlite")
    keep_only_this_topics_rows(s, topic_name, store, 10.0)
    assert restore(s, topic_name, [0, 1], store).complete and len(store.device_ids()) == 2
    recreate(s, partitions=2)
    assert keep_only_this_topics_rows(s, topic_name, store, 10.0, serving={0})
    assert stored_versions(store) == {"p0-dev": 42} and store.checkpoint(1) is None
    assert store.changelog_id() == topic_id(s, topic_name, 10.0)[0]
    store.close(clean=True)
