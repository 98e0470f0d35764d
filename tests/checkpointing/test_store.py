"""StateStore: CRUD, checkpoints, the clean-shutdown flag, atomic batches."""

from __future__ import annotations

import pytest

from stream_lstm.checkpointing import store as store_module
from stream_lstm.checkpointing.codec import decode_snapshot, encode_snapshot
from stream_lstm.checkpointing.store import StateStore
from stream_lstm.config import SettingsError
from stream_lstm.state.snapshot import DeviceSnapshot
from tests.checkpointing.store_full import fill, make_room

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def store(tmp_path):
    st = StateStore(tmp_path / "sub" / "state.sqlite")
    yield st
    st.close(clean=False)


def test_crud(store):
    assert store.get("a") is None and store.count() == 0
    store.put_many([("a", 0, b"a1"), ("b", 1, b"b1"), ("c", 1, b"c1")])
    store.put_many([("a", 0, b"a2")])  # replace
    assert store.get("a")[1] == b"a2" and store.count() == 3
    assert store.device_ids() == ["a", "b", "c"]
    assert store.device_ids({1}) == ["b", "c"] and store.device_ids([]) == []
    store.delete_many(["b", "missing"])
    assert store.get("b") is None and store.device_ids() == ["a", "c"]


def test_checkpoints_and_drop_partitions(store):
    assert store.checkpoint(0) is None
    store.put_many([("a", 0, b"x"), ("b", 1, b"y")])
    store.set_checkpoints({0: 10, 1: 20})
    store.set_checkpoints({1: 25})
    assert (store.checkpoint(0), store.checkpoint(1)) == (10, 25)
    store.drop_partitions([1])
    assert store.device_ids() == ["a"] and store.checkpoint(1) is None and store.checkpoint(0) == 10
    store.wipe()
    assert store.count() == 0 and store.checkpoint(0) is None


def test_apply_is_atomic(store):
    store.put_many([("a", 0, b"old")])

    def rows():
        yield ("a", 0, b"new")
        raise RuntimeError("writer died mid-batch")

    with pytest.raises(RuntimeError):
        store.apply(puts=rows(), checkpoints={0: 99})
    assert store.get("a")[1] == b"old" and store.checkpoint(0) is None
    store.apply(puts=[("b", 0, b"b")], deletes=["a"], checkpoints={0: 5})
    assert store.device_ids() == ["b"] and store.checkpoint(0) == 5


def at(dev: str, partition: int, last_ts: float) -> tuple[str, int, bytes]:
    s = DeviceSnapshot.empty(dev, num_layers=1, hidden_size=2, n_features=1, partition=partition)
    s.last_ts = last_ts
    return dev, partition, encode_snapshot(s)


def test_a_device_that_moved_partitions_keeps_its_later_state_whichever_is_restored_first(store, monkeypatch):
    # Partitions were added to the input: "m"'s readings moved from partition 0 to 1, and its old
    # row stays in partition 0's changelog. Same-partition records replace (the later offset).
    calls = []
    from stream_lstm.checkpointing.codec import later_state as real
    store.db.create_function("later_state", 2, lambda a, b: calls.append(1) or real(a, b))
    old, new = at("m", 0, 100.0), at("m", 1, 200.0)
    store.restore_chunk([new, at("s", 0, 50.0)], [], {1: 5}, {})
    store.restore_chunk([old, at("s", 0, 40.0)], [], {0: 7}, {})  # partition 0 read after
    assert decode_snapshot(store.get("m")[1]).last_ts == 200.0 and store.device_ids({1}) == ["m"]
    assert decode_snapshot(store.get("s")[1]).last_ts == 40.0  # one partition: the later record
    assert len(calls) == 1  # decoded only for the pair of partitions
    store.wipe()
    store.restore_chunk([old, new], [], {0: 7, 1: 5}, {})  # both in one chunk, either order
    assert decode_snapshot(store.get("m")[1]).last_ts == 200.0
    store.restore_chunk([old], [], {}, {})
    assert decode_snapshot(store.get("m")[1]).last_ts == 200.0
    # A tombstone deletes only its own partition's row: the old partition's TTL leaves the
    # moved device's current state alone; its own partition's tombstone deletes it.
    store.restore_chunk([], [("m", 0)], {}, {})
    assert store.get("m")[1] == new[2]
    store.restore_chunk([], [("m", 1)], {}, {})
    assert store.get("m") is None
    # The worker's own writes are its current state: they replace whatever was there.
    store.restore_chunk([new], [], {}, {})
    store.put_many([old])
    assert store.get("m")[1] == old[2] and store.checkpoint(0) == 7


def test_clean_flag(tmp_path):
    path = tmp_path / "s.sqlite"
    st = StateStore(path)
    assert st.opened_clean  # a new store has nothing that could be wrong
    st.put_many([("a", 0, b"x")])
    st.set_checkpoints({0: 3})
    st.close(clean=True)
    st = StateStore(path)
    assert st.opened_clean and st.get("a")[1] == b"x" and st.checkpoint(0) == 3
    st.close(clean=False)
    st = StateStore(path)
    assert not st.opened_clean
    # Opening clears the flag: a crash now (no close at all) also reads as unclean.
    st.db.close()
    st._lock.close()  # (the OS releases a dead process's lock)
    st = StateStore(path)
    assert not st.opened_clean
    st.wipe()
    st.close(clean=True)
    st = StateStore(path)
    assert st.opened_clean and st.count() == 0
    st.close(clean=True)
    st.close(clean=True)  # idempotent


def test_partitions_released_too_long_ago_are_dropped_when_held_again(tmp_path):
    # Past the changelog's tombstone retention, rows kept since a revocation may name devices
    # deleted meanwhile (their tombstones compacted away): that partition restores afresh.
    st = StateStore(tmp_path / "state.sqlite")
    st.put_many([("old", 0, b"x"), ("recent", 1, b"y"), ("held", 2, b"z")])
    st.set_checkpoints({0: 10, 1: 20, 2: 30})
    st.release([0], when=1_000.0)
    st.release([1], when=1_000.0 + 86_000)
    assert st.forget_stale([0, 1, 2], now=1_000.0 + 90_000, max_age_s=43_200) == [0]
    assert st.device_ids() == ["held", "recent"] and st.checkpoint(0) is None
    assert st.checkpoint(1) == 20
    # Held again: no longer released, so a later look keeps them whatever the time.
    assert st.forget_stale([1], now=1e12, max_age_s=43_200) == []
    st.close(clean=True)
    st.release([1], when=2e12)  # a revocation after the stop closed the store: nothing to note


@pytest.mark.kafka
def test_a_revoked_partition_is_stamped_and_an_old_one_restored_afresh(tmp_path, bootstrap, topic_name):
    from stream_lstm.checkpointing import restoring
    from stream_lstm.checkpointing.manager import StateManager
    from stream_lstm.config import Settings
    from stream_lstm.kafka.topics import ensure_changelog_topic
    from stream_lstm.state.table import DeviceTable

    s = Settings(state_dir=tmp_path, bootstrap_servers=bootstrap, changelog_topic=topic_name)
    ensure_changelog_topic(s, 1)
    m = StateManager(s, tmp_path / "m.sqlite")
    m.store.put_many([("a", 0, b"x")])
    m.store.set_checkpoints({0: 0})  # (the store holds the changelog up to its start)
    m.revoke(DeviceTable(4, 4, 1, 1, 2), {0})
    m.assign({0})  # straight back (a cooperative rebalance): the rows are reused
    m.restore_slice()  # (the age is checked as the restore begins: assign writes nothing)
    assert m.store.device_ids() == ["a"]
    m.revoke(DeviceTable(4, 4, 1, 1, 2), {0})
    m.store.release([0], when=0.0)  # as if revoked in 1970
    assert restoring.STALE_STORE_S == 43_200.0  # half of delete.retention.ms, 1 day
    m.assign({0})
    assert m.store.device_ids() == ["a"] and m.restoring == {0}
    m.revoke(DeviceTable(4, 4, 1, 1, 2), {0})  # gone again before its restore began: still 1970's
    m.assign({0})
    m.restore_slice()
    assert m.store.device_ids() == [] and m.restoring == set()
    m.store.close(clean=True)


def test_rows_a_full_disk_refuses_wait_in_memory_and_go_with_the_next_write(tmp_path, caplog):
    path = tmp_path / "s.sqlite"
    st = StateStore(path)
    st.put_many([("a", 0, b"old"), ("gone", 1, b"x")])
    fill(st)
    st.put_many([("a", 0, b"a" * 50_000), ("b", 1, b"b" * 50_000)])  # no exception: an eviction
    st.delete_many(["gone"])
    assert "full" in st.write_error and set(st.unwritten) == {"a", "b", "gone"}
    assert st.get("a")[1] == b"a" * 50_000 and st.get("b")[1] == b"b" * 50_000 and st.get("gone") is None
    assert not st.write_unwritten()  # still full
    assert sum("cannot write" in r.getMessage() for r in caplog.records) == 1  # said once
    make_room(st)
    st.put_many([("c", 0, b"c")])  # the next write takes them along, older first
    assert st.unwritten == {} and st.write_error is None
    assert st.device_ids() == ["a", "b", "c"] and st.get("a")[1] == b"a" * 50_000
    st.close(clean=True)
    again = StateStore(path)
    assert again.opened_clean and again.get("b")[1] == b"b" * 50_000
    again.close(clean=True)


def test_a_store_that_could_not_write_everything_is_not_closed_clean(tmp_path):
    path = tmp_path / "s.sqlite"
    st = StateStore(path)
    st.put_many([("a", 0, b"x")])
    fill(st)
    st.put_many([("b", 0, b"b" * 50_000)])
    st.close(clean=True)  # the file lacks b: the next start must rebuild it from the changelog
    again = StateStore(path)
    assert not again.opened_clean
    fill(again)
    again.release([0], when=5.0)  # a revocation on a full disk: no exception, and not clean either
    again.close(clean=True)
    assert not StateStore(path).opened_clean


def test_a_full_disk_never_leaves_assigned_partitions_unpaused(tmp_path):
    """assign runs in a rebalance callback: it writes nothing (a full disk refuses even a
    delete, whose pages go to the write-ahead log first), so it cannot fail there."""
    from stream_lstm.checkpointing.manager import StateManager
    from stream_lstm.config import Settings
    from stream_lstm.state.table import DeviceTable

    m = StateManager(Settings(state_dir=tmp_path), tmp_path / "m.sqlite")
    m.store.put_many([("a", 0, b"x" * 10_000)])
    m.revoke(DeviceTable(4, 4, 1, 1, 2), {0, 1})  # stamped: the next assign has rows to judge
    writes = m.store.db.total_changes
    m.assign({0, 1})
    assert m.store.db.total_changes == writes and m.restoring == {0, 1}
    fill(m.store)
    m.revoke(DeviceTable(4, 4, 1, 1, 2), {0, 1})  # a release stamp refused: no exception
    m.close(DeviceTable(4, 4, 1, 1, 2), clean=True)


def test_one_holder_at_a_time(tmp_path):
    """Two workers with the same instance id and state directory: the second is refused (it
    would have wiped the first's store, and their producers fenced each other)."""
    from stream_lstm.config import SettingsError

    first = StateStore(tmp_path / "s.sqlite")
    with pytest.raises(SettingsError, match="held by another worker"):
        StateStore(tmp_path / "s.sqlite")
    first.close(clean=True)
    StateStore(tmp_path / "s.sqlite").close(clean=True)  # free again


def test_a_damaged_store_is_set_aside_and_rebuilt(tmp_path, caplog):
    path = tmp_path / "s.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    with caplog.at_level("WARNING", logger="stream_lstm.checkpointing"):
        st = StateStore(path)
    assert st.count() == 0 and st.checkpoint(0) is None  # restored from the changelog
    (aside,) = tmp_path.glob("s.sqlite.corrupt-*")
    assert aside.read_bytes().startswith(b"this is not")
    assert any("damaged" in r.getMessage() for r in caplog.records)
    st.close(clean=True)


def test_a_state_dir_that_cannot_be_written_is_one_line(tmp_path):
    from stream_lstm.config import SettingsError

    (tmp_path / "file").write_text("")
    with pytest.raises(SettingsError, match="STREAM_LSTM_STATE_DIR: cannot write the state store there"):
        StateStore(tmp_path / "file" / "s.sqlite")  # (its parent is a file)


def volume_says(monkeypatch, pragma: str):
    """Every SQLite connection runs ``pragma`` first (a volume's answer, simulated); returns the
    real ``connect``."""
    import sqlite3

    real = sqlite3.connect

    def connect(*args, **kwargs):
        db = real(*args, **kwargs)
        db.execute(pragma)
        return db

    monkeypatch.setattr(store_module.sqlite3, "connect", connect)
    return real


def test_a_store_that_cannot_be_written_at_start_is_one_line_and_kept(tmp_path, monkeypatch):
    """A full or read-only volume at start is not damage: the store used to be set aside as
    corrupt (a good store lost, its bytes still on the full disk) and a second open raised."""

    path = tmp_path / "state.sqlite"
    st = StateStore(path)
    st.put_many([("a", 0, b"x")])
    st.close(clean=True)
    volume_says(monkeypatch, "PRAGMA query_only=ON")  # what SQLite answers on a read-only volume
    with pytest.raises(SettingsError, match="cannot write the state store .*readonly.*the store is kept"):
        StateStore(path)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.sqlite", "state.sqlite.lock"]
    again = StateStore(path)  # room again: the same store, still clean
    assert again.opened_clean and again.get("a")[1] == b"x"
    again.close(clean=True)


def test_a_full_volume_at_start_is_transient_exit_3_not_a_refusal(tmp_path, monkeypatch, capsys):
    """Exit 2 (a refusal) on a full disk: one crashed child's restart stopped every worker of
    its host, and the supervisor never restarted them (a review). Room can come back: exit 3,
    restarted with backoff, and the store is kept."""

    from stream_lstm.checkpointing.store import StateStoreFull
    from stream_lstm.cli import main

    path = tmp_path / "state" / "g-w.sqlite"
    real = volume_says(monkeypatch, "PRAGMA max_page_count=1")  # a write needs a page it cannot have
    with pytest.raises(StateStoreFull, match="database or disk is full .make room on its volume"):
        StateStore(path)
    monkeypatch.setenv("STREAM_LSTM_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("STREAM_LSTM_GROUP_ID", "g")
    monkeypatch.setenv("STREAM_LSTM_INSTANCE_ID", "w")
    monkeypatch.setenv("STREAM_LSTM_METRICS_PORT", "0")
    monkeypatch.setenv("STREAM_LSTM_MODEL_DIR", str(tmp_path / "models"))
    assert main(["run"]) == 3  # (the store opens before any broker is asked)
    assert "run: cannot open the state store" in capsys.readouterr().err
    monkeypatch.setattr(store_module.sqlite3, "connect", real)
    StateStore(path).close(clean=True)  # room again: it opens


def test_only_a_full_or_read_only_volume_is_a_refusal_at_start(tmp_path, monkeypatch):
    """Any other error at open (a passing lock, an I/O error) is not a refusal (exit 2 stops a
    whole host of processes): the store is set aside and rebuilt from the changelog, as before."""
    import sqlite3

    real, calls = StateStore._open, []

    def locked_once(self):
        calls.append(1)
        if len(calls) == 1:
            raise sqlite3.OperationalError("database is locked")
        real(self)

    monkeypatch.setattr(StateStore, "_open", locked_once)
    st = StateStore(tmp_path / "state.sqlite")
    assert len(calls) == 2 and st.count() == 0
    st.close(clean=True)


def test_a_store_damaged_past_its_header_is_rebuilt_after_the_crash_it_caused(tmp_path):
    """Opening reads only the first pages: a store damaged further on opened, the first read
    of a damaged page stopped the worker, and every restart then stopped in ``wipe`` (its
    DELETE read the damaged pages too), a crash loop (a review: pages overwritten under a
    real worker)."""
    import sqlite3

    path = tmp_path / "s.sqlite"
    st = StateStore(path)
    st.put_many([(f"d{i:05d}", 0, bytes([i % 251]) * 1000) for i in range(2000)])
    st.close(clean=False)  # (the crash)
    size = path.stat().st_size
    with open(path, "r+b") as f:
        for offset in range(size // 3, size, 4096 * 5):
            f.seek(offset)
            f.write(b"\xa5" * 4096)
    st = StateStore(path)
    assert not st.opened_clean
    with pytest.raises(sqlite3.DatabaseError, match="malformed"):
        st.count()  # the damage is there
    st.wipe()  # (raised: database disk image is malformed)
    assert not st.opened_clean and st.count() == 0 and st.checkpoint(0) is None
    st.put_many([("a", 0, b"x")])
    st.close(clean=True)
    st = StateStore(path)
    assert st.opened_clean and st.get("a") == (0, b"x")
    st.close(clean=True)
