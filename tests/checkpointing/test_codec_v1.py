"""Format 1, read-only (checkpointing/codec_v1.py): bytes written by earlier versions decode to
today's snapshot, bit-exact, with every variant of its header; format 2 is no larger."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from stream_lstm.checkpointing import codec_v1
from stream_lstm.checkpointing.codec import (
    SnapshotDecodeError,
    check_snapshot,
    decode_snapshot,
    encode_snapshot,
    snapshot_schema,
)
from stream_lstm.state.snapshot import DeviceSnapshot
from stream_lstm.state.table import DeviceTable

_PREFIX = struct.Struct("<3sBH")
# Columns declared after format 1 was last written: never in its bytes.
AFTER_FORMAT_1 = ("value_range", "range_held", "last_value")
# The header fields appended, in turn, to the first format-1 header (u16 each).
APPENDED = ("n_extra", "n_ring", "n_experts")


def encode_v1(snap: DeviceSnapshot, extra: dict[str, float] | None = None, appended: int = 3) -> bytes:
    """What the format-1 encoder wrote for ``snap`` (the columns format 1 had; ``extra`` added to
    its extras), its header with the first ``appended`` of APPENDED: format 1, frozen here."""
    extras = {}
    for name, (keys, _, _) in codec_v1.EXTRAS.items():
        if name in snap.columns:
            extras.update(zip(keys, np.atleast_1d(snap.columns[name]).tolist(), strict=True))
    extras.update(extra or {})
    ring = snap.drift_mu if len(snap.drift_mu) else np.zeros(0, np.float32)
    assert (appended > 0 or not extras) and (appended > 1 or not len(ring))
    assert appended > 2 or not len(snap.experts)
    dev, ver = snap.device_id.encode(), snap.model_version.encode()
    layers, hidden = snap.h.shape
    w_len, nf = snap.window.shape
    header = struct.pack(
        "<HHHIiqqHHddddddHHH", layers, hidden, nf, w_len, snap.partition, snap.n_seen,
        snap.since_reset, len(dev), len(ver), snap.count, snap.last_ts, snap.step_s, snap.prev_mu,
        snap.prev_sigma, snap.last_seen, len(extras), len(ring), len(snap.experts),
    )[: 82 + 2 * appended]
    return b"".join((
        _PREFIX.pack(b"SLS", 1, len(header)), header, dev, ver, snap.h.astype("<f4").tobytes(),
        snap.c.astype("<f4").tobytes(), snap.mean.tobytes(), snap.var.tobytes(),
        snap.window.astype("<f4").tobytes(),
        *(bytes([len(k.encode())]) + k.encode() + struct.pack("<d", v) for k, v in extras.items()),
        *(np.asarray(x, "<f4").tobytes() for x in (ring, snap.drift_b, snap.drift_change) if len(ring)),
        snap.experts.tobytes(),
    ))


# Written by the format-1 encode_snapshot of git 7bc1275: pump-7 on partition 3, 1 layer of 2, one
# channel, a window of 2, a ring of 3, 2 expert values, and extras for prev_change, blend_w,
# interval_log_m, one likelihood value, two of an open alert and a key no column claims.
GOLDEN = bytes.fromhex(
    "534c5301580001000200010002000000030000000400000000000000030000000000000006000500000000000000"
    "104000000040fc54d9410000000000004e400000000000803540000000000000e83f00004041fc54d94109000300"
    "020070756d702d3776303030320000003f000080bf000000400000c07f0000000000803440000000000000f43f00"
    "00a0410000a8410b707265765f6368616e6765000000000000c03f08626c656e645f7731000000000000e03f0862"
    "6c656e645f7748000000000000ec3f0f696e74657276616c5f6c6f675f6d31000000000000d0bf0f696e746572"
    "76616c5f6c6f675f6d48000000000000b03f0d6c696b5f73636f72655f72756e000000000000f83f0b616c6572"
    "745f73696e636500000031fc54d9410a616c6572745f7065616b2b8716d9cef7ef3f046761696e000000000000"
    "1c400000a0410000a8410000b0410000003f0000003f0000803e00000000cdcccc3dcdccccbd000000000000f0"
    "3f0000000000000040"
)


def test_bytes_written_by_the_last_format_1_encoder_decode_to_todays_snapshot():
    assert check_snapshot(GOLDEN) is None and snapshot_schema(GOLDEN) == 0
    s = decode_snapshot(GOLDEN)
    assert (s.device_id, s.model_version, s.schema, s.partition) == ("pump-7", "v0002", 0, 3)
    assert s.h.tolist() == [[0.5, -1.0]] and s.c[0, 0] == 2.0 and np.isnan(s.c[0, 1])
    assert (s.count, s.mean.tolist(), s.var.tolist(), s.window.tolist()) == (4.0, [20.5], [1.25], [[20.0], [21.0]])
    assert (s.last_ts, s.step_s, s.n_seen, s.since_reset) == (1.7e9, 60.0, 4, 3)
    assert (s.prev_mu, s.prev_sigma, s.last_seen) == (21.5, 0.75, 1.7e9 + 5)
    assert s.drift_mu.tolist() == [20.0, 21.0, 22.0] and s.drift_b.tolist() == [0.5, 0.5, 0.25]
    assert s.drift_mu.dtype == np.float64 and s.drift_change[1] == np.float32(0.1)  # (as the columns hold them)
    assert s.experts.tolist() == [1.0, 2.0]
    assert (s.prev_change, s.blend_w.tolist(), s.interval_log_m.tolist()) == (0.125, [0.5, 0.875], [-0.25, 0.0625])
    # Keys a snapshot lacks read as the column's fill (the previous reading: unknown, NaN, not a
    # 0 its first step would be measured from); a key no column claims is dropped.
    assert s.likelihood[0] == 1.5 and not s.likelihood[1:-1].any() and len(s.likelihood) == 28
    assert np.isnan(s.likelihood[-1])
    assert s.alert[0] == 1.7e9 - 60 and s.alert[2] == 0.999 and np.isnan(s.alert[[1, 3, 4, 5, 6]]).all()
    assert "gain" not in s.columns
    # Written again, it is format 2 with the same columns.
    again = decode_snapshot(encode_snapshot(s))
    assert encode_snapshot(again)[:4] == b"SLS\x02" and again.columns.keys() == s.columns.keys()


def _table_snapshot() -> DeviceSnapshot:
    """A device of a table with the default settings (window 64, hidden 64, H=12, experts on),
    every column away from its fill and its alert open."""
    t = DeviceTable(max_devices=4, window=64, n_features=1, num_layers=1, hidden_size=64)
    t.ensure_horizon(12)
    (a,) = t.slots_for(["pump-000001"], partitions=[3], now=1.7e9)
    rng = np.random.default_rng(0)
    t.h[:, a] = 0.5
    for _ in range(64):
        t.window.push(np.array([a]), rng.normal(size=(1, 1)).astype(np.float32))
    for col in t.columns:
        if col.name not in ("partition", "last_seen", *AFTER_FORMAT_1):
            table = getattr(t, col.name)
            table[a] = rng.integers(1, 100, size=table.shape[1:]).astype(col.dtype)
    t.prev_mu[a] = struct.unpack("<d", b"\x01\x00\x00\x00\x00\x00\xf8\xff")[0]  # a NaN payload
    t.experts[a, :4] = 1.0
    snap = t.snapshot(a)
    for name in AFTER_FORMAT_1:  # a format-1 writer had no such column
        snap.columns.pop(name, None)  # (a sparse one at its fill is not there anyway)
    return snap


def test_a_table_snapshot_in_format_1_decodes_bit_exact_and_restores_the_same_state():
    snap = _table_snapshot()
    back = decode_snapshot(encode_v1(snap))
    for name, value in snap.columns.items():
        got = back.columns[name]
        assert got.dtype == value.dtype and got.shape == value.shape, name
        assert got.tobytes() == value.tobytes(), name
    assert back.columns.keys() == snap.columns.keys()
    a = DeviceTable(max_devices=4, window=64, n_features=1, num_layers=1, hidden_size=64)
    b = DeviceTable(max_devices=4, window=64, n_features=1, num_layers=1, hidden_size=64)
    sa, sb = a.restore(snap), b.restore(back)
    for col in a.columns:
        assert getattr(a, col.name)[sa].tobytes() == getattr(b, col.name)[sb].tobytes(), col.name
    np.testing.assert_array_equal(a.experts[sa], b.experts[sb])


def test_format_2_is_no_larger_than_format_1():
    snap = _table_snapshot()
    # (Format 1 kept drift_mu in float32, 48 B fewer than format 2's float64 since 2026-12-06.)
    assert len(encode_snapshot(snap)) < len(encode_v1(snap)) - 150  # the alert open
    del snap.columns["alert"]
    assert len(encode_snapshot(snap)) < len(encode_v1(snap)) - 150  # the usual case


@pytest.mark.parametrize("appended", range(len(APPENDED) + 1))
def test_every_format_1_header_decodes_with_defaults_for_what_it_lacks(appended):
    s = DeviceSnapshot.empty("pump", num_layers=1, hidden_size=2, n_features=1, partition=1)
    s.n_seen, s.last_ts = 5, 1.7e9
    if appended > 1:
        s.drift_mu = s.drift_b = s.drift_change = [1.0, 2.0]
    if appended > 2:
        s.experts = np.array([3.0])
    extra = {"blend_w1": 0.5} if appended else {}
    data = encode_v1(s, extra, appended)
    back = decode_snapshot(data)
    assert (back.n_seen, back.last_ts, back.partition) == (5, 1.7e9, 1)
    assert back.blend_w.tolist() == ([0.5, 1.0] if appended else [1.0, 1.0])  # blend_wH absent: fill
    assert back.drift_mu.tolist() == ([1.0, 2.0] if appended > 1 else [])
    assert back.experts.tolist() == ([3.0] if appended > 2 else [])
    if appended == len(APPENDED):  # fields and bytes a later writer might have added: skipped
        header_len = _PREFIX.unpack_from(data)[2]
        longer = (_PREFIX.pack(b"SLS", 1, header_len + 12) + data[6 : 6 + header_len] + bytes(12)
                  + data[6 + header_len :] + b"later")
        assert decode_snapshot(longer).experts.tolist() == [3.0]


def test_corrupt_or_truncated_format_1_bytes_raise_decode_error():
    for n in range(len(GOLDEN)):
        with pytest.raises(SnapshotDecodeError):
            decode_snapshot(GOLDEN[:n])
    assert "header of 16 bytes" in codec_v1.check(b"SLS\x01\x10\x00")
    with pytest.raises(SnapshotDecodeError, match="extras"):
        decode_snapshot(GOLDEN.replace(b"\x0bprev_change", b"\xffprev_change"))
    with pytest.raises(SnapshotDecodeError, match="UTF-8"):
        decode_snapshot(GOLDEN.replace(b"pump-7", b"\xffump-7"))


def test_reading_format_1_says_once_that_an_earlier_versions_state_is_converted(caplog, monkeypatch):
    """After an upgrade on the same STREAM_LSTM_STATE_DIR, a worker restored its devices from the
    format-1 rows of its local store (the changelog had nothing newer to read) and never said that it
    read an older format (a rolling-upgrade review, on a real broker: f9e9261 stopped, this version
    started on its group, store and registry). It says so once a process, naming a device."""
    monkeypatch.setattr(codec_v1, "_said", [False])
    with caplog.at_level("INFO", logger="stream_lstm.checkpointing"):
        decode_snapshot(GOLDEN)
        decode_snapshot(GOLDEN)
        decode_snapshot(encode_snapshot(decode_snapshot(GOLDEN)))  # format 2: nothing to say
    said = [r for r in caplog.records if "format 1" in r.getMessage()]
    assert len(said) == 1 and "earlier stream-lstm" in said[0].getMessage()
    assert said[0].device == "pump-7"
