"""Snapshot codec, format 2: bit-exact round trips of every column whatever its name and dtype,
schema-change tolerance (newer and older writers), clear errors. Format 1: test_codec_v1.py."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from stream_lstm.checkpointing.codec import (
    FORMAT,
    MAGIC,
    SCHEMA_ID,
    SnapshotDecodeError,
    check_snapshot,
    decode_for_table,
    decode_snapshot,
    encode_snapshot,
    snapshot_schema,
)
from stream_lstm.state.snapshot import DeviceSnapshot

pytestmark = pytest.mark.timeout(120)

_PREFIX = struct.Struct("<3sBH")
_HEADER = struct.Struct("<IHHHIHHHHHId")
any_f64 = st.floats(allow_nan=True, allow_infinity=True)  # NaNs of either sign
DTYPES = [np.dtype(d) for d in ("<f8", "<f4", "<f2", "<i8", "<i4", "<i2", "<u8", "<u1", "?")]


def _bits(x: float) -> bytes:
    return struct.pack("<d", x)


@st.composite
def column_values(draw):
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.sampled_from([(), (0,), (1,), (2,), (12,), (28,)]))
    # Any bit pattern of the dtype (NaN payloads included), read back as that dtype.
    raw = draw(st.binary(min_size=dtype.itemsize * int(np.prod(shape)),
                         max_size=dtype.itemsize * int(np.prod(shape))))
    if dtype.kind == "b":
        raw = bytes(b & 1 for b in raw)
    value = np.frombuffer(raw, dtype).reshape(shape).copy()
    return value[()] if shape == () else value  # a numpy scalar for a width-0 column


@st.composite
def snapshots(draw) -> DeviceSnapshot:
    layers = draw(st.integers(0, 3))
    hidden = draw(st.integers(0, 16)) if layers else 0
    nf = draw(st.integers(1, 4))
    w = draw(st.integers(0, 8))
    f32 = st.floats(width=32, allow_nan=True, allow_infinity=True)
    arr32 = lambda shape: hnp.arrays(np.float32, shape, elements=f32)  # noqa: E731
    arr64 = lambda shape: hnp.arrays(np.float64, shape, elements=any_f64)  # noqa: E731
    names = st.text(min_size=1, max_size=40).filter(lambda s: len(s.encode()) <= 255)
    return DeviceSnapshot(
        device_id=draw(st.text(min_size=0, max_size=40)),
        h=draw(arr32((layers, hidden))), c=draw(arr32((layers, hidden))),
        count=draw(any_f64), mean=draw(arr64((nf,))), var=draw(arr64((nf,))),
        window=draw(arr32((w, nf))), model_version=draw(st.text(max_size=12)),
        experts=draw(arr64((draw(st.integers(0, 24)),))),
        columns=draw(st.dictionaries(names, column_values(), max_size=20)),
        schema=draw(st.integers(0, 2**32 - 1)),
    )


def assert_bit_exact(a: DeviceSnapshot, b: DeviceSnapshot) -> None:
    assert (a.device_id, a.model_version, a.schema) == (b.device_id, b.model_version, b.schema)
    assert _bits(a.count) == _bits(b.count)
    for name in ("h", "c", "mean", "var", "window", "experts"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert x.tobytes() == y.tobytes(), name
    assert list(a.columns) == list(b.columns)
    for name, x in a.columns.items():
        y = b.columns[name]
        assert x.dtype == y.dtype and x.shape == y.shape and type(x) is type(y), name
        assert x.tobytes() == y.tobytes(), name


@settings(max_examples=300, deadline=None)
@given(snapshots())
def test_round_trip_is_bit_exact(snap):
    data = encode_snapshot(snap)
    assert check_snapshot(data) is None and snapshot_schema(data) == snap.schema
    back = decode_snapshot(data)
    assert_bit_exact(snap, back)
    assert encode_snapshot(back) == data
    # Decoded arrays own their memory: writable, and not views of the input bytes.
    assert back.h.flags.writeable and back.window.flags.writeable
    assert all(v.flags.writeable for v in back.columns.values() if isinstance(v, np.ndarray))


def test_nan_payloads_survive():
    odd_nan = struct.unpack("<d", b"\x01\x00\x00\x00\x00\x00\xf8\xff")[0]  # negative, payload 1
    s = DeviceSnapshot.empty("d", num_layers=1, hidden_size=2, n_features=1)
    s.h[0] = np.frombuffer(b"\x01\x00\xc0\x7f\x02\x00\x80\xff", np.float32)  # quiet + signalling
    s.prev_mu = odd_nan  # a float64 scalar (written through struct)
    s.drift_mu = np.frombuffer(b"\x02\x00\x80\xff\x03\x00\xc0\x7f", np.float32)
    s.columns["f4_scalar"] = np.frombuffer(b"\x02\x00\x80\xff", np.float32)[0]
    back = decode_snapshot(encode_snapshot(s))
    assert _bits(back.prev_mu) == _bits(odd_nan)
    assert back.h.tobytes() == s.h.tobytes() and back.drift_mu.tobytes() == s.drift_mu.tobytes()
    assert back.columns["f4_scalar"].tobytes() == b"\x02\x00\x80\xff"


def _sample() -> DeviceSnapshot:
    s = DeviceSnapshot.empty("pump-7", num_layers=2, hidden_size=3, n_features=2, partition=5)
    s.h[:] = 0.25
    s.window = np.arange(8, dtype=np.float32).reshape(4, 2)
    s.model_version, s.n_seen, s.last_ts, s.blend_w = "v0002", 17, 1.7e9, [0.5, 0.75]
    s.drift_mu = [1.0, 2.0, 3.0]
    s.experts = np.arange(5, dtype=np.float64)
    return s


def test_the_header_carries_the_format_and_the_schema_and_plain_values_are_accepted():
    data = encode_snapshot(_sample())
    assert data[:4] == MAGIC + bytes([FORMAT]) and snapshot_schema(data) == SCHEMA_ID
    assert snapshot_schema(b"nope") is None and snapshot_schema(b"SLS\x07" + bytes(60)) is None
    s = _sample()
    s.columns["plain"] = 2.5  # not a numpy value: written as numpy would hold it
    s.columns["big_endian"] = np.array([1.0, -2.0], ">f8")  # written little-endian
    back = decode_snapshot(encode_snapshot(s))
    assert back.columns["plain"].dtype == np.float64 and back.columns["plain"] == 2.5
    assert back.columns["big_endian"].dtype == np.dtype("<f8")
    assert back.columns["big_endian"].tolist() == [1.0, -2.0]


def _directory_entry(name: str, code: int, n: int) -> bytes:
    return bytes([len(name.encode())]) + name.encode() + struct.pack("<BH", code, n)


def _with_columns(data: bytes, entries: bytes, values: bytes, n: int, *, append=True) -> bytes:
    """``data`` with directory entries and their values added (after its own, or instead)."""
    _, fmt, header_len = _PREFIX.unpack_from(data)
    fields = list(_HEADER.unpack_from(data, 6))
    dir_len, data_len = fields[9], fields[10]
    end = len(data) - dir_len - data_len
    old_dir, old_data = data[end : end + dir_len], data[end + dir_len :]
    if not append:
        old_dir, old_data, fields[8] = b"", b"", 0
    fields[8] += n
    fields[9], fields[10] = len(old_dir + entries), len(old_data + values)
    return (data[:6] + _HEADER.pack(*fields) + data[6 + header_len : end] + old_dir + entries
            + old_data + values)


def test_a_column_of_a_kind_this_version_does_not_know_is_skipped():
    data = encode_snapshot(_sample())
    # A newer writer's column of kind 7 (8-byte items), then a float64 pair after it.
    newer = _with_columns(data, _directory_entry("quaternion", 0x78, 2)
                          + _directory_entry("after", 0x08, 2),
                          bytes(range(16)) + np.array([4.5, -1.0]).tobytes(), 2)
    back = decode_snapshot(newer)
    assert "quaternion" not in back.columns and back.columns["after"].tolist() == [4.5, -1.0]
    assert_bit_exact(_sample(), decode_snapshot(data))
    assert back.n_seen == 17 and back.blend_w.tolist() == [0.5, 0.75]


def test_an_older_writer_without_some_columns_leaves_them_absent_and_they_read_as_the_fill():
    only = _with_columns(encode_snapshot(_sample()), _directory_entry("n_seen", 0x98, 1),
                         np.int64(4).tobytes(), 1, append=False)
    back = decode_snapshot(only)
    assert list(back.columns) == ["n_seen"] and back.n_seen == 4
    assert back.partition == 0 and np.isnan(back.last_ts) and back.blend_w.tolist() == [1.0, 1.0]


def test_newer_writer_with_longer_header_and_trailing_bytes_decodes():
    data = encode_snapshot(_sample())
    _, fmt, header_len = _PREFIX.unpack_from(data)
    # A newer writer appended 12 bytes of header fields and something after the columns.
    newer = (_PREFIX.pack(MAGIC, fmt, header_len + 12) + data[6 : 6 + header_len] + b"\xab" * 12
             + data[6 + header_len :] + b"future section")
    assert_bit_exact(_sample(), decode_snapshot(newer))


@pytest.mark.parametrize("mutate, message", [
    (lambda d: b"XYZ" + d[3:], "not a stream-lstm snapshot"),
    (lambda d: d[:3] + bytes([FORMAT + 1]) + d[4:], f"format {FORMAT + 1} is not supported"),
    (lambda d: d[:3] + b"\x00" + d[4:], "format 0 is not supported"),
    (lambda d: d[:4] + struct.pack("<H", 10) + d[6:], "header of 10 bytes"),
    (lambda d: d[:4] + struct.pack("<H", 60_000) + d[6:], "truncated"),
    (lambda d: b"", "truncated"),
    (lambda d: d + b"\x00" * 4, None),  # trailing bytes: fine
])
def test_bad_bytes_raise_decode_error(mutate, message):
    data = mutate(encode_snapshot(_sample()))
    if message is None:
        assert check_snapshot(data) is None
        assert_bit_exact(_sample(), decode_snapshot(data))
        return
    with pytest.raises(SnapshotDecodeError, match=message):
        decode_snapshot(data)
    assert check_snapshot(data) is not None


def test_a_corrupt_column_directory_raises_decode_error():
    data = encode_snapshot(_sample())
    with pytest.raises(SnapshotDecodeError, match="directory describes 24 bytes of values, the header 16"):
        decode_snapshot(_with_columns(data, _directory_entry("x", 0x08, 3), bytes(16), 1, append=False))
    with pytest.raises(SnapshotDecodeError, match="column directory unreadable"):
        decode_snapshot(_with_columns(data, b"\x20xy", b"", 1))  # a name running past the end
    with pytest.raises(SnapshotDecodeError, match="column directory unreadable"):
        decode_snapshot(_with_columns(data, _directory_entry("x", 0x03, 1), bytes(3), 1))  # float24
    with pytest.raises(SnapshotDecodeError, match="column directory unreadable"):
        decode_snapshot(_with_columns(data, b"\x02\xff\xfe" + b"\x08\x01\x00", bytes(8), 1))  # not UTF-8
    with pytest.raises(SnapshotDecodeError, match="holds 5 bytes of 1 entries"):
        decode_snapshot(_with_columns(data, _directory_entry("x", 0x08, 0) + b"\x00", b"", 1, append=False))


def test_every_truncation_raises_decode_error():
    data = encode_snapshot(_sample())
    for n in range(len(data)):
        with pytest.raises(SnapshotDecodeError):
            decode_snapshot(data[:n])
        assert check_snapshot(data[:n]) is not None


def test_invalid_utf8_device_id_raises_decode_error():
    data = bytearray(encode_snapshot(_sample()))
    i = data.index(b"pump-7")
    data[i] = 0xFF
    with pytest.raises(SnapshotDecodeError, match="UTF-8"):
        decode_snapshot(bytes(data))


def test_encode_refuses_inconsistent_shapes_and_values_the_format_cannot_hold():
    s = _sample()
    s.c = np.zeros((1, 3), np.float32)
    with pytest.raises(ValueError, match="h .* and c"):
        encode_snapshot(s)
    s = _sample()
    s.window = np.zeros((4, 3), np.float32)
    with pytest.raises(ValueError, match="n_features"):
        encode_snapshot(s)
    s = _sample()
    s.device_id = "x" * 70_000
    with pytest.raises(ValueError, match="does not fit"):
        encode_snapshot(s)
    for name, value, message in (("x" * 256, np.float64(1.0), "does not fit"),
                                 ("grid", np.zeros((2, 2)), "does not fit"),
                                 ("long", np.zeros(70_000), "does not fit"),
                                 ("z", np.array([1j]), "cannot be saved"),
                                 ("s", np.array(["a"]), "cannot be saved")):
        s = _sample()
        s.columns[name] = value
        with pytest.raises(ValueError, match=message):
            encode_snapshot(s)


@pytest.mark.parametrize("field, value, said", [
    ("h", np.nan, "h is not finite"), ("c", np.inf, "c is not finite"),
    ("mean", np.nan, "mean is not finite"), ("var", -1.0, "var is not finite and non-negative"),
    ("count", np.nan, "count is not finite and non-negative"),
    # finite, but past what readings can give: the next update overflowed (a review's 1e308)
    ("mean", 1e308, "mean is not finite within what readings"), ("mean", -2e30, "mean is not finite within"),
    ("var", 1e300, "var is not finite and non-negative within what readings")])
def test_a_snapshot_whose_state_would_poison_its_device_is_refused_for_the_table(field, value, said):
    """The codec round-trips it (bit for bit); the worker's decode refuses it: NaN h, c or
    normalizer stayed in the recurrence and the device forecast null for good (a review)."""
    snap = DeviceSnapshot("d", np.zeros((1, 4), np.float32), np.zeros((1, 4), np.float32), 3.0,
                          np.zeros(1), np.ones(1), np.full((2, 1), np.nan, np.float32), "v1")
    assert decode_for_table(encode_snapshot(snap), 1).device_id == "d"  # (NaN in the window: a gap)
    if field == "count":
        snap.count = value
    else:
        getattr(snap, field)[...] = value
    assert decode_snapshot(encode_snapshot(snap), 1).device_id == "d"
    with pytest.raises(SnapshotDecodeError, match=f"corrupt snapshot: its {said}"):
        decode_for_table(encode_snapshot(snap), 1)


def test_the_normalizers_bound_is_the_settings_outer_limit_on_readings():
    """READINGS_BOUND refuses only what no reading can give: VALUE_MIN / VALUE_MAX stop there."""
    from stream_lstm.checkpointing.codec import READINGS_BOUND
    from stream_lstm.config import Settings, SettingsError

    Settings(value_min=-READINGS_BOUND, value_max=READINGS_BOUND)
    for past in ({"value_max": 2 * READINGS_BOUND}, {"value_min": -2 * READINGS_BOUND}):
        with pytest.raises((SettingsError, ValueError)):
            Settings(**past)
