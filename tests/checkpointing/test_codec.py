"""Snapshot codec: bit-exact round trips, schema-change tolerance, clear errors."""

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
    SnapshotDecodeError,
    check_snapshot,
    decode_snapshot,
    encode_snapshot,
)
from stream_lstm.state.snapshot import DeviceSnapshot

pytestmark = pytest.mark.timeout(120)

_PREFIX = struct.Struct("<3sBH")
any_f64 = st.floats(allow_nan=True, allow_infinity=True)  # NaNs of either sign


def _bits(x: float) -> bytes:
    return struct.pack("<d", x)


@st.composite
def snapshots(draw) -> DeviceSnapshot:
    layers = draw(st.integers(0, 3))
    hidden = draw(st.integers(0, 16)) if layers else 0
    nf = draw(st.integers(1, 4))
    w = draw(st.integers(0, 8))
    ring = draw(st.integers(0, 12))
    f32 = st.floats(width=32, allow_nan=True, allow_infinity=True)
    arr32 = lambda shape: hnp.arrays(np.float32, shape, elements=f32)  # noqa: E731
    arr64 = lambda shape: hnp.arrays(np.float64, shape, elements=any_f64)  # noqa: E731
    return DeviceSnapshot(
        device_id=draw(st.text(min_size=0, max_size=40)),
        partition=draw(st.integers(0, 2**31 - 1)),
        h=draw(arr32((layers, hidden))), c=draw(arr32((layers, hidden))),
        count=draw(any_f64), mean=draw(arr64((nf,))), var=draw(arr64((nf,))),
        window=draw(arr32((w, nf))),
        last_ts=draw(any_f64), step_s=draw(any_f64),
        n_seen=draw(st.integers(-(2**63), 2**63 - 1)),
        since_reset=draw(st.integers(-(2**63), 2**63 - 1)),
        prev_mu=draw(any_f64), prev_sigma=draw(any_f64),
        model_version=draw(st.text(max_size=12)), last_seen=draw(any_f64),
        extra=draw(st.dictionaries(st.text(max_size=20), any_f64, max_size=3)),
        drift_mu=draw(arr32((ring,))), drift_b=draw(arr32((ring,))),
        drift_change=draw(arr32((ring,))), experts=draw(arr64((draw(st.integers(0, 24)),))),
    )


def assert_bit_exact(a: DeviceSnapshot, b: DeviceSnapshot) -> None:
    assert (a.device_id, a.partition, a.model_version) == (b.device_id, b.partition, b.model_version)
    assert (a.n_seen, a.since_reset) == (b.n_seen, b.since_reset)
    for name in ("count", "last_ts", "step_s", "prev_mu", "prev_sigma", "last_seen"):
        assert _bits(getattr(a, name)) == _bits(getattr(b, name)), name
    for name in ("h", "c", "mean", "var", "window", "drift_mu", "drift_b", "drift_change",
                 "experts"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert x.tobytes() == y.tobytes(), name
    assert a.extra.keys() == b.extra.keys()
    assert all(_bits(a.extra[k]) == _bits(b.extra[k]) for k in a.extra)


@settings(max_examples=300, deadline=None)
@given(snapshots())
def test_round_trip_is_bit_exact(snap):
    data = encode_snapshot(snap)
    assert check_snapshot(data) is None
    back = decode_snapshot(data)
    assert_bit_exact(snap, back)
    assert encode_snapshot(back) == data
    # Decoded arrays own their memory: writable, and not views of the input bytes.
    assert back.h.flags.writeable and back.window.flags.writeable


def test_nan_payloads_survive():
    odd_nan = struct.unpack("<d", b"\x01\x00\x00\x00\x00\x00\xf8\xff")[0]  # negative, payload 1
    s = DeviceSnapshot.empty("d", num_layers=1, hidden_size=2, n_features=1)
    s.h[0] = np.frombuffer(b"\x01\x00\xc0\x7f\x02\x00\x80\xff", np.float32)  # quiet + signalling
    s.prev_mu = odd_nan
    back = decode_snapshot(encode_snapshot(s))
    assert _bits(back.prev_mu) == _bits(odd_nan)
    assert back.h.tobytes() == s.h.tobytes()


def _sample() -> DeviceSnapshot:
    s = DeviceSnapshot.empty("pump-7", num_layers=2, hidden_size=3, n_features=2, partition=5)
    s.h[:] = 0.25
    s.window = np.arange(8, dtype=np.float32).reshape(4, 2)
    s.model_version, s.n_seen, s.extra = "v0002", 17, {"k": 2.5}
    return s


def test_newer_writer_with_longer_header_and_trailing_section_decodes():
    data = encode_snapshot(_sample())
    _, fmt, header_len = _PREFIX.unpack_from(data)
    # A newer writer appended 12 bytes of header fields and a trailing section.
    newer = (_PREFIX.pack(MAGIC, fmt, header_len + 12) + data[6 : 6 + header_len] + b"\xab" * 12
             + data[6 + header_len :] + b"future section")
    assert_bit_exact(_sample(), decode_snapshot(newer))


def test_older_writer_without_appended_fields_decodes_with_defaults():
    s = _sample()
    s.extra = {}
    data = encode_snapshot(s)
    _, fmt, header_len = _PREFIX.unpack_from(data)
    base = header_len - 6  # the first format-1 header had no n_extra, n_ring or n_experts
    older = _PREFIX.pack(MAGIC, fmt, base) + data[6 : 6 + base] + data[6 + header_len :]
    back = decode_snapshot(older)
    assert back.extra == {} and len(back.drift_mu) == 0
    assert_bit_exact(s, back)


def test_writer_from_before_the_drift_ring_keeps_its_extras():
    s = _sample()
    s.extra = {"gain": 2.5}
    data = encode_snapshot(s)  # no drift ring: nothing trails the extras
    _, fmt, header_len = _PREFIX.unpack_from(data)
    v010 = header_len - 4  # 0.1.0 wrote n_extra but not n_ring or n_experts
    older = _PREFIX.pack(MAGIC, fmt, v010) + data[6 : 6 + v010] + data[6 + header_len :]
    back = decode_snapshot(older)
    assert back.extra == {"gain": 2.5} and len(back.drift_mu) == 0


def test_writer_from_before_the_experts_keeps_its_drift_ring():
    s = _sample()
    s.drift_mu = s.drift_b = s.drift_change = np.array([1.0, 2.0, 3.0], np.float32)
    data = encode_snapshot(s)  # no experts: nothing trails the drift ring
    _, fmt, header_len = _PREFIX.unpack_from(data)
    v011 = header_len - 2  # 0.1.1 wrote n_extra and n_ring but not n_experts
    older = _PREFIX.pack(MAGIC, fmt, v011) + data[6 : 6 + v011] + data[6 + header_len :]
    back = decode_snapshot(older)
    assert back.drift_change.tolist() == [1.0, 2.0, 3.0] and len(back.experts) == 0


@pytest.mark.parametrize("mutate, message", [
    (lambda d: b"XYZ" + d[3:], "not a stream-lstm snapshot"),
    (lambda d: d[:3] + bytes([FORMAT + 1]) + d[4:], f"format {FORMAT + 1} is not supported"),
    (lambda d: d[:4] + struct.pack("<H", 10) + d[6:], "header of 10 bytes"),
    (lambda d: d[:4] + struct.pack("<H", 60_000) + d[6:], "truncated"),
    (lambda d: b"", "truncated"),
])
def test_bad_bytes_raise_decode_error(mutate, message):
    data = mutate(encode_snapshot(_sample()))
    with pytest.raises(SnapshotDecodeError, match=message):
        decode_snapshot(data)
    assert check_snapshot(data) is not None


def test_every_truncation_raises_decode_error():
    data = encode_snapshot(_sample())
    for n in range(len(data)):
        with pytest.raises(SnapshotDecodeError):
            decode_snapshot(data[:n])


def test_invalid_utf8_device_id_raises_decode_error():
    data = bytearray(encode_snapshot(_sample()))
    i = data.index(b"pump-7")
    data[i] = 0xFF
    with pytest.raises(SnapshotDecodeError, match="UTF-8"):
        decode_snapshot(bytes(data))


def test_encode_refuses_inconsistent_shapes():
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
