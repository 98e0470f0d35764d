"""StateStore: CRUD, checkpoints, the clean-shutdown flag, atomic batches."""

from __future__ import annotations

import pytest

from stream_lstm.checkpointing.store import StateStore

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
    assert store.get("a") == b"a2" and store.count() == 3
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
    assert store.get("a") == b"old" and store.checkpoint(0) is None
    store.apply(puts=[("b", 0, b"b")], deletes=["a"], checkpoints={0: 5})
    assert store.device_ids() == ["b"] and store.checkpoint(0) == 5


def test_clean_flag(tmp_path):
    path = tmp_path / "s.sqlite"
    st = StateStore(path)
    assert st.opened_clean  # a new store has nothing that could be wrong
    st.put_many([("a", 0, b"x")])
    st.set_checkpoints({0: 3})
    st.close(clean=True)
    st = StateStore(path)
    assert st.opened_clean and st.get("a") == b"x" and st.checkpoint(0) == 3
    st.close(clean=False)
    st = StateStore(path)
    assert not st.opened_clean
    # Opening clears the flag: a crash now (no close at all) also reads as unclean.
    st.db.close()
    st = StateStore(path)
    assert not st.opened_clean
    st.wipe()
    st.close(clean=True)
    st = StateStore(path)
    assert st.opened_clean and st.count() == 0
    st.close(clean=True)
    st.close(clean=True)  # idempotent
