"""A compact, versioned binary encoding of one :class:`DeviceSnapshot`.

This is the byte format of the changelog topic's values and of the local state store's
rows, so it must be fast (the worker encodes one snapshot per touched device per batch),
bit-exact (NaN payloads included: a restored device must continue exactly where it
stopped), and able to survive schema change across a rolling upgrade.

Layout, all little-endian::

    magic b"SLS" | format u8 | header_len u16 | header (header_len bytes)
    | device_id (UTF-8) | model_version (UTF-8)
    | h f32[L*H] | c f32[L*H] | mean f64[F] | var f64[F] | window f32[W*F]
    | extras: n_extra x (key_len u8 | key UTF-8 | value f64)
    | drift ring: drift_mu f32[R] | drift_b f32[R] | drift_change f32[R]   (R = n_ring; 0.1.1)
    | experts f64[E]   (E = n_experts; 0.1.2)
    | (anything a newer writer appends; ignored)

The header is a fixed ``struct`` whose length travels with it. A newer writer may append
header fields (an older reader skips them) or trailing sections (ignored); a reader given an
older, shorter header uses defaults for the fields it lacks. The *format* byte is the major
version: a different one means an incompatible layout and is refused with
:class:`SnapshotDecodeError`, as are bad magic, truncated or otherwise corrupt bytes.

>>> import numpy as np
>>> from stream_lstm.state.snapshot import DeviceSnapshot
>>> s = DeviceSnapshot.empty("pump-1", num_layers=1, hidden_size=4, n_features=1, partition=2)
>>> s.h[0, 1] = 0.5
>>> s.extra["gain"] = 1.5
>>> data = encode_snapshot(s)
>>> data[:4]
b'SLS\\x01'
>>> t = decode_snapshot(data)
>>> t.device_id, t.partition, float(t.h[0, 1]), t.extra
('pump-1', 2, 0.5, {'gain': 1.5})
>>> decode_snapshot(data[:20])
Traceback (most recent call last):
...
stream_lstm.checkpointing.codec.SnapshotDecodeError: truncated snapshot: 20 bytes, need at least 94
"""

from __future__ import annotations

import struct

import numpy as np

from stream_lstm.state.snapshot import DeviceSnapshot

MAGIC = b"SLS"
FORMAT = 1  # major version; bump only for a layout an older reader cannot skip over

_PREFIX = struct.Struct("<3sBH")  # magic, format, header_len
# The header as first written (format 1). Its fields never move; new fields go after it.
# layers, hidden, n_features, window_len, partition, n_seen, since_reset, id_len, version_len,
# count, last_ts, step_s, prev_mu, prev_sigma, last_seen
_BASE = struct.Struct("<HHHIiqqHHdddddd")
# Fields appended later, each with a default for snapshots written before it existed.
_EXT = struct.Struct("<HHH")  # n_extra (0.1.0), n_ring (0.1.1), n_experts (0.1.2)
_EXT_DEFAULTS = (0, 0, 0)
_HEADER = struct.Struct(_BASE.format + _EXT.format[1:])  # what this version writes
_EXTRA_KEY = struct.Struct("<B")
_F64 = struct.Struct("<d")


class SnapshotDecodeError(ValueError):
    """The bytes are not a snapshot this version can read (the message says why)."""


def encode_snapshot(snap: DeviceSnapshot) -> bytes:
    """The snapshot as bytes (see the module docstring for the layout).

    Raises ``ValueError`` when the snapshot's arrays disagree in shape or a field does not
    fit its slot (e.g. a device id longer than 65535 bytes).
    """
    dev = snap.device_id.encode()
    ver = snap.model_version.encode()
    h, c, window = snap.h, snap.c, snap.window
    layers, hidden = h.shape if h.ndim == 2 else (0, 0)
    n_features = snap.mean.shape[0]
    w_len = window.shape[0] if window.size else 0
    n_ring = len(snap.drift_mu)
    # Validate shapes here: a bad snapshot must fail when written, not when restored.
    if c.shape != h.shape or (h.ndim != 2 and h.size):
        raise ValueError(f"h {h.shape} and c {c.shape} must both be [num_layers, hidden_size]")
    if snap.drift_b.shape != (n_ring,) or snap.drift_change.shape != (n_ring,):
        raise ValueError(f"drift_mu {snap.drift_mu.shape}, drift_b {snap.drift_b.shape} and "
                         f"drift_change {snap.drift_change.shape} differ")
    if snap.var.shape != (n_features,) or (window.size and window.shape != (w_len, n_features)):
        raise ValueError(f"mean {snap.mean.shape}, var {snap.var.shape} and window "
                         f"{window.shape} disagree on n_features")
    extra = b""
    try:
        if snap.extra:
            parts = []
            for key, value in snap.extra.items():
                k = key.encode()
                parts += (_EXTRA_KEY.pack(len(k)), k, _F64.pack(value))
            extra = b"".join(parts)
        header = _HEADER.pack(
            layers, hidden, n_features, w_len, snap.partition, snap.n_seen, snap.since_reset,
            len(dev), len(ver), snap.count, snap.last_ts, snap.step_s, snap.prev_mu,
            snap.prev_sigma, snap.last_seen, len(snap.extra), n_ring, len(snap.experts),
        )
    except struct.error as exc:
        raise ValueError(f"snapshot of {snap.device_id[:64]!r} does not fit the format: {exc}") from None
    # ascontiguousarray is a no-op for arrays already of the right dtype and layout, so the
    # usual cost is one memcpy per array into the joined bytes.
    return b"".join((
        _PREFIX.pack(MAGIC, FORMAT, len(header)), header, dev, ver,
        np.ascontiguousarray(h, "<f4").tobytes(), np.ascontiguousarray(c, "<f4").tobytes(),
        np.ascontiguousarray(snap.mean, "<f8").tobytes(),
        np.ascontiguousarray(snap.var, "<f8").tobytes(),
        np.ascontiguousarray(window, "<f4").tobytes(), extra,
        np.ascontiguousarray(snap.drift_mu, "<f4").tobytes(),
        np.ascontiguousarray(snap.drift_b, "<f4").tobytes(),
        np.ascontiguousarray(snap.drift_change, "<f4").tobytes(),
        np.ascontiguousarray(snap.experts, "<f8").tobytes(),
    ))


def _parse_header(data: bytes | bytearray | memoryview) -> tuple:
    """Validate the prefix, header and total length; the header fields and where the
    device id starts. Raises :class:`SnapshotDecodeError`."""
    size = len(data)
    if size < _PREFIX.size:
        raise SnapshotDecodeError(f"truncated snapshot: {size} bytes, need at least "
                                  f"{_PREFIX.size + _BASE.size}")
    magic, fmt, header_len = _PREFIX.unpack_from(data, 0)
    if magic != MAGIC:
        raise SnapshotDecodeError(f"not a stream-lstm snapshot (bad magic {bytes(magic)!r}, "
                                  f"expected {MAGIC!r})")
    if fmt != FORMAT:
        raise SnapshotDecodeError(f"snapshot format {fmt} is not supported (this version "
                                  f"reads format {FORMAT}); upgrade stream-lstm")
    pos = _PREFIX.size
    if header_len < _BASE.size:
        raise SnapshotDecodeError(f"corrupt snapshot: header of {header_len} bytes is shorter "
                                  f"than the {_BASE.size} every format-{FORMAT} header has")
    if size < pos + header_len:
        raise SnapshotDecodeError(f"truncated snapshot: {size} bytes, need at least "
                                  f"{pos + header_len}")
    fields = _BASE.unpack_from(data, pos)
    # Appended header fields: present if this writer knew them, else their defaults. Bytes
    # past what this reader knows belong to a newer writer and are skipped.
    n_known = min(len(_EXT_DEFAULTS), max(0, (header_len - _BASE.size) // 2))  # u16 fields
    ext = struct.unpack_from(f"<{n_known}H", data, pos + _BASE.size) + _EXT_DEFAULTS[n_known:]
    layers, hidden, nf, w_len, _, _, _, id_len, ver_len = fields[:9]
    need = pos + header_len + id_len + ver_len + 8 * layers * hidden + 16 * nf + 4 * w_len * nf
    if size < need:
        raise SnapshotDecodeError(f"truncated snapshot: {size} bytes, need at least {need}")
    return fields, ext, pos + header_len


def check_snapshot(data: bytes | bytearray | memoryview) -> str | None:
    """Why ``data`` is not a readable snapshot, or None if its structure is sound.

    A cheap check (header and lengths, no arrays built) for paths that store bytes without
    decoding them, such as restore.

    >>> check_snapshot(b"SLS\\x09..."), check_snapshot(b"nope")
    ('snapshot format 9 is not supported (this version reads format 1); upgrade stream-lstm', 'truncated snapshot: 4 bytes, need at least 88')
    """
    try:
        _parse_header(data)
    except SnapshotDecodeError as exc:
        return str(exc)
    return None


def decode_snapshot(data: bytes | bytearray | memoryview) -> DeviceSnapshot:
    """The snapshot encoded in ``data``; :class:`SnapshotDecodeError` if it cannot be read.

    The arrays are fresh, writable copies (not views of ``data``), so callers may modify them
    or hand them to ``torch.from_numpy``.
    """
    fields, (n_extra, n_ring, n_experts), pos = _parse_header(data)
    (layers, hidden, nf, w_len, partition, n_seen, since_reset, id_len, ver_len,
     count, last_ts, step_s, prev_mu, prev_sigma, last_seen) = fields
    size = len(data)
    n_state = layers * hidden
    try:
        dev = bytes(data[pos : pos + id_len]).decode()
        pos += id_len
        ver = bytes(data[pos : pos + ver_len]).decode()
        pos += ver_len
    except UnicodeDecodeError:
        raise SnapshotDecodeError("corrupt snapshot: device id or model version is not UTF-8") from None

    # frombuffer + copy: one small memcpy per array, and the copies are aligned and writable.
    h = np.frombuffer(data, "<f4", n_state, pos).reshape(layers, hidden).copy()
    pos += 4 * n_state
    c = np.frombuffer(data, "<f4", n_state, pos).reshape(layers, hidden).copy()
    pos += 4 * n_state
    mean = np.frombuffer(data, "<f8", nf, pos).copy()
    pos += 8 * nf
    var = np.frombuffer(data, "<f8", nf, pos).copy()
    pos += 8 * nf
    window = np.frombuffer(data, "<f4", w_len * nf, pos).reshape(w_len, nf).copy()
    pos += 4 * w_len * nf

    extra: dict[str, float] = {}
    try:
        for _ in range(n_extra):
            (k_len,) = _EXTRA_KEY.unpack_from(data, pos)
            key = bytes(data[pos + 1 : pos + 1 + k_len]).decode()
            (extra[key],) = _F64.unpack_from(data, pos + 1 + k_len)
            pos += 1 + k_len + 8
    except (struct.error, UnicodeDecodeError):
        raise SnapshotDecodeError(f"truncated or corrupt snapshot extras ({n_extra} announced, "
                                  f"{size} bytes)") from None
    if size < pos + 12 * n_ring:
        raise SnapshotDecodeError(f"truncated snapshot: drift ring of {n_ring} announced, "
                                  f"{size - pos} bytes left")
    drift_mu = np.frombuffer(data, "<f4", n_ring, pos).copy()
    drift_b = np.frombuffer(data, "<f4", n_ring, pos + 4 * n_ring).copy()
    drift_change = np.frombuffer(data, "<f4", n_ring, pos + 8 * n_ring).copy()
    pos += 12 * n_ring
    if size < pos + 8 * n_experts:
        raise SnapshotDecodeError(f"truncated snapshot: {n_experts} expert values announced, "
                                  f"{size - pos} bytes left")
    experts = np.frombuffer(data, "<f8", n_experts, pos).copy()
    return DeviceSnapshot(
        device_id=dev, partition=partition, h=h, c=c, count=count, mean=mean, var=var,
        window=window, last_ts=last_ts, step_s=step_s, n_seen=n_seen, since_reset=since_reset,
        prev_mu=prev_mu, prev_sigma=prev_sigma, model_version=ver, last_seen=last_seen,
        extra=extra, drift_mu=drift_mu, drift_b=drift_b, drift_change=drift_change,
        experts=experts,
    )
