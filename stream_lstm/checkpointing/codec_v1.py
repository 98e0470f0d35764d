"""Snapshot format 1, read-only: what earlier versions wrote to the changelog and the store.

The codec (checkpointing/codec.py) writes format 2 only and hands the bytes of a format-1
snapshot to :func:`decode`, which maps them onto today's :class:`DeviceSnapshot`: the header's
scalars and the drift rings become the columns of the same name, and the extras (one key a
value) the columns their keys were written for (:data:`EXTRAS`, frozen as format 1 wrote
them). An extra no column claims is dropped, as the table always ignored it. Nothing here
changes with the declared columns: a column added later reads as its fill, as for any
snapshot written before it.

Layout, all little-endian::

    magic b"SLS" | format u8 = 1 | header_len u16 | header (header_len bytes)
    | device_id (UTF-8) | model_version (UTF-8)
    | h f32[L*H] | c f32[L*H] | mean f64[F] | var f64[F] | window f32[W*F]
    | extras: n_extra x (key_len u8 | key UTF-8 | value f64)
    | drift ring: drift_mu f32[R] | drift_b f32[R] | drift_change f32[R]   (R = n_ring)
    | experts f64[E]   (E = n_experts)
    | (anything after; ignored)

The header is ``_BASE`` then n_extra, n_ring and n_experts (u16 each, appended in turn as
the extras, the ring and the experts came; 0 when the header ends before them). Errors are ``ValueError`` with the
reason; the codec raises them as its ``SnapshotDecodeError``.

>>> check(b"SLS\\x01\\x10\\x00")
'corrupt snapshot: header of 16 bytes is shorter than the 82 every format-1 header has'
"""

from __future__ import annotations

import logging
import struct

import numpy as np

from stream_lstm.state.columns import COLUMNS
from stream_lstm.state.snapshot import DeviceSnapshot

DTYPES = {c.name: c.dtype for c in COLUMNS}  # a format-1 value read as today's column holds it

_PREFIX = struct.Struct("<3sBH")  # magic, format, header_len
# layers, hidden, n_features, window_len, partition, n_seen, since_reset, id_len, version_len,
# count, last_ts, step_s, prev_mu, prev_sigma, last_seen
_BASE = struct.Struct("<HHHIiqqHHdddddd")
_N_EXT = 3  # n_extra, n_ring, n_experts: u16 each, default 0
_EXTRA_KEY = struct.Struct("<B")
_F64 = struct.Struct("<d")

_LIKELIHOOD = (*(f"lik_{c}_{f}" for c in ("score", "level", "step")
                 for f in ("run", "mean", "var", "n", "p", "xmean", "xvar", "xn")),
               "lik_value_mean", "lik_value_var", "lik_value_n", "lik_value_prev")
_ALERT = ("alert_since", "alert_last_above", "alert_peak", "alert_peak_ts", "alert_value",
          "alert_low", "alert_high")
EXTRAS: dict[str, tuple[tuple[str, ...], float, bool]] = {
    # column: (its extras' keys, one a value; the fill of a key a snapshot lacks; a scalar)
    "prev_change": (("prev_change",), float("nan"), True),
    "blend_w": (("blend_w1", "blend_wH"), 1.0, False),
    "interval_log_m": (("interval_log_m1", "interval_log_mH"), 0.0, False),
    "likelihood": (_LIKELIHOOD, 0.0, False),
    "alert": (_ALERT, float("nan"), False),
}
"""Which format-1 extras each column was written as (frozen: format 1 is no longer written)."""
# Keys whose fill is not their column's: a previous reading the snapshot lacks (written before
# the likelihood's step channel) is unknown, not 0 (a step from 0 to 2.4e9 flooded the channel).
KEY_FILLS = {"lik_value_prev": float("nan")}


def _header(data: bytes | bytearray | memoryview) -> tuple[tuple, tuple, int]:
    """The base header's fields, the appended ones and where the device id starts; checks the
    total length of the fixed parts. Raises ``ValueError``."""
    size = len(data)
    if size < _PREFIX.size:
        raise ValueError(f"truncated snapshot: {size} bytes, need at least {_PREFIX.size + _BASE.size}")
    _, _, header_len = _PREFIX.unpack_from(data, 0)
    pos = _PREFIX.size
    if header_len < _BASE.size:
        raise ValueError(f"corrupt snapshot: header of {header_len} bytes is shorter than the "
                         f"{_BASE.size} every format-1 header has")
    if size < pos + header_len:
        raise ValueError(f"truncated snapshot: {size} bytes, need at least {pos + header_len}")
    fields = _BASE.unpack_from(data, pos)
    n_known = min(_N_EXT, (header_len - _BASE.size) // 2)  # bytes past these: skipped
    ext = struct.unpack_from(f"<{n_known}H", data, pos + _BASE.size) + (0,) * (_N_EXT - n_known)
    layers, hidden, nf, w_len, _, _, _, id_len, ver_len = fields[:9]
    need = pos + header_len + id_len + ver_len + 8 * layers * hidden + 16 * nf + 4 * w_len * nf
    if size < need:
        raise ValueError(f"truncated snapshot: {size} bytes, need at least {need}")
    return fields, ext, pos + header_len


def read_core(data: bytes | bytearray | memoryview, pos: int, id_len: int, ver_len: int,
              layers: int, hidden: int, nf: int, w_len: int) -> tuple:
    """The part formats 1 and 2 lay out alike, from ``pos``: device id and model version
    (UTF-8), h and c (f32), the normalizer's mean and var (f64), the window (f32). Returns them
    and the position after. The arrays are fresh copies (one small memcpy each: aligned and
    writable). Raises ``ValueError`` on a device id or version that is not UTF-8."""
    try:
        dev = bytes(data[pos : pos + id_len]).decode()
        ver = bytes(data[pos + id_len : pos + id_len + ver_len]).decode()
    except UnicodeDecodeError:
        raise ValueError("corrupt snapshot: device id or model version is not UTF-8") from None
    pos += id_len + ver_len
    n_state = layers * hidden
    h = np.frombuffer(data, "<f4", n_state, pos).reshape(layers, hidden).copy()
    c = np.frombuffer(data, "<f4", n_state, pos + 4 * n_state).reshape(layers, hidden).copy()
    pos += 8 * n_state
    mean = np.frombuffer(data, "<f8", nf, pos).copy()
    var = np.frombuffer(data, "<f8", nf, pos + 8 * nf).copy()
    pos += 16 * nf
    window = np.frombuffer(data, "<f4", w_len * nf, pos).reshape(w_len, nf).copy()
    return dev, ver, h, c, mean, var, window, pos + 4 * w_len * nf


log = logging.getLogger("stream_lstm.checkpointing")
# Whether this process has said that it reads format 1 (once: a store of them is read a row at a time).
_said = [False]


def _say_converted(device_id: str) -> None:
    """Log, once a process, that state an earlier version wrote is read and converted: a worker
    restoring from its own local store after an upgrade read format-1 rows without a word (the
    changelog's restore names only the schemas of the records it reads, and a clean store
    reads none; a review)."""
    if not _said[0]:
        _said[0] = True
        log.info("reading device state written by an earlier stream-lstm (snapshot format 1): "
                 "converted as it is read, and written as format 2 at the device's next checkpoint",
                 extra={"device": device_id[:128]})


def check(data: bytes | bytearray | memoryview) -> str | None:
    """Why ``data`` is not a readable format-1 snapshot (header and lengths), or None."""
    try:
        _header(data)
    except ValueError as exc:
        return str(exc)
    return None


def decode(data: bytes | bytearray | memoryview) -> DeviceSnapshot:
    """The format-1 snapshot in ``data`` as today's :class:`DeviceSnapshot` (fresh arrays;
    ``schema`` 0). Raises ``ValueError``."""
    fields, (n_extra, n_ring, n_experts), pos = _header(data)
    (layers, hidden, nf, w_len, partition, n_seen, since_reset, id_len, ver_len,
     count, last_ts, step_s, prev_mu, prev_sigma, last_seen) = fields
    size = len(data)
    dev, ver, h, c, mean, var, window, pos = read_core(data, pos, id_len, ver_len, layers,
                                                       hidden, nf, w_len)
    extra: dict[str, float] = {}
    try:
        for _ in range(n_extra):
            (k_len,) = _EXTRA_KEY.unpack_from(data, pos)
            key = bytes(data[pos + 1 : pos + 1 + k_len]).decode()
            (extra[key],) = _F64.unpack_from(data, pos + 1 + k_len)
            pos += 1 + k_len + 8
    except (struct.error, UnicodeDecodeError):
        raise ValueError(f"truncated or corrupt snapshot extras ({n_extra} announced, "
                         f"{size} bytes)") from None
    if size < pos + 12 * n_ring:
        raise ValueError(f"truncated snapshot: drift ring of {n_ring} announced, {size - pos} bytes left")
    f64, i64 = np.float64, np.int64
    columns: dict = {
        "last_ts": f64(last_ts), "step_s": f64(step_s), "n_seen": i64(n_seen),
        "since_reset": i64(since_reset), "prev_mu": f64(prev_mu), "prev_sigma": f64(prev_sigma),
        "partition": i64(partition), "last_seen": f64(last_seen),
    }
    if n_ring:
        for i, name in enumerate(("drift_mu", "drift_b", "drift_change")):
            ring = np.frombuffer(data, "<f4", n_ring, pos + 4 * i * n_ring)
            columns[name] = ring.astype(DTYPES[name])  # (drift_mu is float64 since)
    pos += 12 * n_ring
    if size < pos + 8 * n_experts:
        raise ValueError(f"truncated snapshot: {n_experts} expert values announced, {size - pos} bytes left")
    experts = np.frombuffer(data, "<f8", n_experts, pos).copy()
    for name, (keys, fill, scalar) in EXTRAS.items():
        if any(k in extra for k in keys):  # none: the column did not exist (or, sparse, was at its fill)
            row = np.array([extra.get(k, KEY_FILLS.get(k, fill)) for k in keys])
            columns[name] = row[0] if scalar else row
    _say_converted(dev)
    return DeviceSnapshot(device_id=dev, h=h, c=c, count=count, mean=mean, var=var, window=window,
                          model_version=ver, experts=experts, columns=columns, schema=0)
