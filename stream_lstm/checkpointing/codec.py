"""A compact, versioned binary encoding of one :class:`DeviceSnapshot`.

Layout (little-endian)::

    magic b"SLS" | format u8 | header_len u16 | header | device_id | model_version | arrays

The header is a fixed ``struct`` whose length travels with it, so a newer writer can append
fields that an older reader skips, and an older snapshot still decodes (missing trailing
fields take defaults). Arrays follow in a fixed order: h, c (float32), mean, var (float64),
window (float32). A different *format* byte means an incompatible layout and is refused.

>>> import numpy as np
>>> from stream_lstm.state.snapshot import DeviceSnapshot
>>> s = DeviceSnapshot.empty("pump-1", num_layers=1, hidden_size=4, n_features=1, partition=2)
>>> s.h[0, 1] = 0.5
>>> t = decode_snapshot(encode_snapshot(s))
>>> t.device_id, t.partition, float(t.h[0, 1])
('pump-1', 2, 0.5)
"""

from __future__ import annotations

import struct

import numpy as np

from stream_lstm.state.snapshot import DeviceSnapshot

MAGIC = b"SLS"
FORMAT = 1
# layers, hidden, features, window_len, partition, n_seen, since_reset, id_len, version_len,
# count, last_ts, step_s, prev_mu, prev_sigma, last_seen
_HEADER = struct.Struct("<HHHIiqqHHdddddd")
_PREFIX = struct.Struct("<3sBH")


class SnapshotDecodeError(ValueError):
    """The bytes are not a snapshot this version can read."""


def encode_snapshot(s: DeviceSnapshot) -> bytes:
    dev = s.device_id.encode()
    ver = s.model_version.encode()
    layers, hidden = s.h.shape if s.h.ndim == 2 else (0, 0)
    n_features = s.mean.shape[0]
    header = _HEADER.pack(
        layers, hidden, n_features, s.window.shape[0], s.partition, s.n_seen, s.since_reset,
        len(dev), len(ver), s.count, s.last_ts, s.step_s, s.prev_mu, s.prev_sigma, s.last_seen,
    )
    return b"".join((
        _PREFIX.pack(MAGIC, FORMAT, len(header)), header, dev, ver,
        np.ascontiguousarray(s.h, "<f4").tobytes(), np.ascontiguousarray(s.c, "<f4").tobytes(),
        np.ascontiguousarray(s.mean, "<f8").tobytes(), np.ascontiguousarray(s.var, "<f8").tobytes(),
        np.ascontiguousarray(s.window, "<f4").tobytes(),
    ))


def decode_snapshot(data: bytes) -> DeviceSnapshot:
    try:
        magic, fmt, header_len = _PREFIX.unpack_from(data, 0)
    except struct.error:
        raise SnapshotDecodeError("too short to be a snapshot") from None
    if magic != MAGIC:
        raise SnapshotDecodeError("not a stream-lstm snapshot (bad magic)")
    if fmt != FORMAT:
        raise SnapshotDecodeError(f"snapshot format {fmt} is not supported (this reads {FORMAT})")
    pos = _PREFIX.size
    raw_header = bytes(data[pos : pos + header_len])
    if len(raw_header) < header_len:
        raise SnapshotDecodeError("truncated snapshot header")
    # Tolerate schema change: pad a shorter (older) header with zeros, ignore a longer tail.
    raw_header = raw_header[: _HEADER.size].ljust(_HEADER.size, b"\0")
    (layers, hidden, nf, wlen, partition, n_seen, since_reset, id_len, ver_len,
     count, last_ts, step_s, prev_mu, prev_sigma, last_seen) = _HEADER.unpack(raw_header)
    pos += header_len
    need = pos + id_len + ver_len + 4 * 2 * layers * hidden + 8 * 2 * nf + 4 * wlen * nf
    if len(data) < need:
        raise SnapshotDecodeError(f"truncated snapshot: {len(data)} of {need} bytes")
    try:
        dev = bytes(data[pos : pos + id_len]).decode()
        pos += id_len
        ver = bytes(data[pos : pos + ver_len]).decode()
    except UnicodeDecodeError:
        raise SnapshotDecodeError("snapshot has an invalid device id or version") from None
    pos += ver_len

    def take(dtype: str, n: int, shape: tuple[int, ...]) -> np.ndarray:
        nonlocal pos
        arr = np.frombuffer(data, dtype, n, pos).reshape(shape).copy()
        pos += arr.nbytes
        return arr

    h = take("<f4", layers * hidden, (layers, hidden))
    c = take("<f4", layers * hidden, (layers, hidden))
    mean = take("<f8", nf, (nf,))
    var = take("<f8", nf, (nf,))
    window = take("<f4", wlen * nf, (wlen, nf))
    return DeviceSnapshot(
        device_id=dev, partition=partition, h=h, c=c, count=count, mean=mean, var=var,
        window=window, last_ts=last_ts, step_s=step_s, n_seen=n_seen, since_reset=since_reset,
        prev_mu=prev_mu, prev_sigma=prev_sigma, model_version=ver, last_seen=last_seen,
    )
