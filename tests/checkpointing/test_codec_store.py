import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_lstm.checkpointing.codec import SnapshotDecodeError, decode_snapshot, encode_snapshot
from stream_lstm.checkpointing.store import StateStore
from stream_lstm.state.snapshot import DeviceSnapshot

floats = st.floats(allow_nan=True, allow_infinity=False, width=64)


@settings(max_examples=60, deadline=None)
@given(layers=st.integers(1, 3), hidden=st.integers(1, 16), nf=st.integers(1, 4), wlen=st.integers(0, 20),
       dev=st.text(min_size=1, max_size=40), ts=floats, seed=st.integers(0, 2**31))
def test_round_trip_is_bit_exact(layers, hidden, nf, wlen, dev, ts, seed):
    rng = np.random.default_rng(seed)
    s = DeviceSnapshot(
        device_id=dev, partition=int(rng.integers(0, 64)),
        h=rng.normal(size=(layers, hidden)).astype(np.float32),
        c=rng.normal(size=(layers, hidden)).astype(np.float32),
        count=float(rng.integers(0, 10**6)), mean=rng.normal(size=nf), var=rng.random(nf),
        window=rng.normal(size=(wlen, nf)).astype(np.float32), last_ts=ts, step_s=float("nan"),
        n_seen=int(rng.integers(0, 10**9)), since_reset=3, prev_mu=1.5, prev_sigma=float("nan"),
        model_version="v0007", last_seen=123.25,
    )
    t = decode_snapshot(encode_snapshot(s))
    for name in ("device_id", "partition", "count", "n_seen", "since_reset", "model_version", "last_seen", "prev_mu"):
        assert getattr(t, name) == getattr(s, name)
    for name in ("h", "c", "mean", "var", "window"):
        assert np.array_equal(getattr(t, name), getattr(s, name))
    assert (np.isnan(t.last_ts) and np.isnan(s.last_ts)) or t.last_ts == s.last_ts
    assert np.isnan(t.step_s) and np.isnan(t.prev_sigma)


def test_schema_tolerance_and_corruption():
    s = DeviceSnapshot.empty("a", num_layers=1, hidden_size=2, n_features=1)
    data = bytearray(encode_snapshot(s))
    # A newer writer appended 8 bytes to the header: old readers skip them.
    header_len = int.from_bytes(data[4:6], "little")
    newer = data[:4] + (header_len + 8).to_bytes(2, "little") + data[6 : 6 + header_len] + b"\x01" * 8 + data[6 + header_len :]
    assert decode_snapshot(bytes(newer)).device_id == "a"
    with pytest.raises(SnapshotDecodeError, match="bad magic"):
        decode_snapshot(b"XYZ" + bytes(data[3:]))
    with pytest.raises(SnapshotDecodeError, match="truncated"):
        decode_snapshot(bytes(data[:-3]))
    with pytest.raises(SnapshotDecodeError, match="format 9"):
        decode_snapshot(bytes(data[:3]) + b"\x09" + bytes(data[4:]))


def test_store_crud_checkpoints_and_clean_flag(tmp_path):
    path = tmp_path / "s.sqlite"
    st_ = StateStore(path)
    assert st_.opened_clean
    st_.put_many([("a", 0, b"1"), ("b", 1, b"2"), ("c", 1, b"3")])
    st_.put_many([("a", 0, b"9")])
    st_.delete_many(["b"])
    st_.set_checkpoints({0: 10, 1: 20})
    assert (st_.get("a"), st_.get("b"), st_.count()) == (b"9", None, 2)
    st_.drop_partitions([1])
    assert st_.device_ids() == ["a"] and st_.checkpoint(1) is None and st_.checkpoint(0) == 10
    st_.close(clean=False)  # a crash
    again = StateStore(path)
    assert not again.opened_clean
    again.wipe()
    assert again.count() == 0 and again.checkpoint(0) is None
    again.close(clean=True)
    assert StateStore(path).opened_clean
