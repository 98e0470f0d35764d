"""A compact, versioned binary encoding of one :class:`DeviceSnapshot`.

This is the byte format of the changelog topic's values and of the local state store's
rows, so it must be fast (the worker encodes one snapshot per touched device per commit),
bit-exact (NaN payloads included: a restored device must continue exactly where it
stopped), and able to survive schema change across a rolling upgrade.

Format 2 (what this version writes), all little-endian::

    magic b"SLS" | format u8 = 2 | header_len u16 | header (header_len bytes)
    | device_id (UTF-8) | model_version (UTF-8)
    | h f32[L*H] | c f32[L*H] | mean f64[F] | var f64[F] | window f32[W*F] | experts f64[E]
    | column directory (dir_len bytes): n_columns x (name_len u8 | name UTF-8 | code u8 | n u16)
    | column data (data_len bytes): each column's n elements, in directory order
    | (anything a newer writer appends; ignored)

    header: schema u32 | L u16 | H u16 | F u16 | W u32 | E u16 | id_len u16 | version_len u16
            | n_columns u16 | dir_len u16 | data_len u32 | count f64

The fixed part holds what is not a declared column (the LSTM state, the normalizer, the
window, the experts). The declared columns (state/columns.py) follow as self-describing
entries, whatever the snapshot's ``columns`` holds: a column's dtype ``code`` is its kind
(bits 4-6: 0 float, 1 signed int, 2 unsigned int, 3 bool) and item size in bytes (bits 0-3),
bit 7 set for a width-0 column (one value: a numpy scalar, not an array). So a new column is
written and read with no edit here, and a reader keeps every entry it can read: the table
ignores names it does not declare (a newer writer's), restores a declared column the bytes
lack (an older writer's, or a sparse one at its fill) or hold with another width to its fill;
an entry of a kind this reader does not know is skipped (its size is still known).

``schema`` is :data:`~stream_lstm.state.columns.SCHEMA_ID`, a fingerprint of the declared
columns' names, dtypes and widths: it identifies, not gates. In a rolling upgrade old and new
workers read each other's snapshots: a column only the new version declares restores to its
fill on the new side and is ignored by the old one; to change a column's width or meaning,
give it a new name (the old entry is then ignored and the new column starts at its fill).
:func:`snapshot_schema` reads it without decoding (restore logs the schemas it met that are
not this version's). A newer writer may append header fields (an older reader skips them)
and trailing bytes; only a layout an older reader cannot skip over takes a new *format* byte,
which older readers refuse with :class:`SnapshotDecodeError`, as they refuse bad magic,
truncated or otherwise corrupt bytes. Format 1 (earlier versions: a fixed header of scalars and
one key a value in "extras") is still read, by checkpointing/codec_v1.py, and never written.

>>> import numpy as np
>>> from stream_lstm.state.snapshot import DeviceSnapshot
>>> s = DeviceSnapshot.empty("pump-1", num_layers=1, hidden_size=4, n_features=1, partition=2)
>>> s.h[0, 1], s.blend_w = 0.5, [0.25, 1.0]
>>> data = encode_snapshot(s)
>>> data[:4], snapshot_schema(data) == SCHEMA_ID
(b'SLS\\x02', True)
>>> t = decode_snapshot(data)
>>> t.device_id, t.partition, float(t.h[0, 1]), t.blend_w.tolist(), sorted(t.columns)
('pump-1', 2, 0.5, [0.25, 1.0], ['blend_w', 'partition'])
>>> decode_snapshot(data[:20])
Traceback (most recent call last):
...
stream_lstm.checkpointing.codec.SnapshotDecodeError: truncated snapshot: 20 bytes, need at least 42
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

from stream_lstm.checkpointing import codec_v1
from stream_lstm.state.columns import COLUMNS, SCHEMA_ID
from stream_lstm.state.snapshot import DeviceSnapshot

__all__ = ["FORMAT", "MAGIC", "SCHEMA_ID", "SnapshotDecodeError", "check_snapshot", "decode_for_table",
           "decode_snapshot", "encode_snapshot", "later_state", "snapshot_schema"]

MAGIC = b"SLS"
FORMAT = 2  # major version; bump only for a layout an older reader cannot skip over
_READS = (1, 2)

_PREFIX = struct.Struct("<3sBH")  # magic, format, header_len
# schema, layers, hidden, n_features, window_len, n_experts, id_len, version_len, n_columns,
# dir_len, data_len, count. Its fields never move; new fields go after it.
_HEADER = struct.Struct("<IHHHIHHHHHId")
_ENTRY = struct.Struct("<BH")  # a directory entry after its name: code, element count
_SCALAR = 0x80
_KINDS = "fiub"  # code bits 4-6
_NEED = _PREFIX.size + _HEADER.size


class SnapshotDecodeError(ValueError):
    """The bytes are not a snapshot this version can read (the message says why)."""


def _code(dtype: np.dtype) -> int:
    kind = _KINDS.find(dtype.kind)
    if kind < 0 or not 0 < dtype.itemsize < 16:
        raise ValueError(f"a column of dtype {dtype} cannot be saved (float, int, uint or bool only)")
    return kind << 4 | dtype.itemsize


# Memo of the directory entries written ((name, dtype, shape) -> entry, and how to write the
# value) and of the directories read (their bytes -> plan): a worker meets a handful of each,
# one per schema and horizon.
_entries: dict[tuple, tuple[bytes, Any]] = {}
_plans: dict[bytes, tuple[list[tuple[str, np.dtype | None, int, int, bool]], int]] = {}
_ARRAY = (np.ndarray, np.generic)
# A float64 or int64 scalar packs faster through struct than through numpy, bits unchanged.
_PACK = {np.dtype("<f8"): struct.Struct("<d").pack, np.dtype("<i8"): struct.Struct("<q").pack}


def _tobytes(value: Any) -> bytes:
    return value.tobytes()


def _entry(name: str, dtype: np.dtype, shape: tuple) -> tuple[bytes, Any]:
    """The directory entry of a column and the function that writes its value's bytes."""
    b = name.encode()
    if len(b) > 255 or len(shape) > 1 or (shape and shape[0] > 0xFFFF):
        raise ValueError(f"column {name!r} of shape {shape} does not fit the format "
                         "(a name of at most 255 bytes, at most 65535 values)")
    little = dtype.newbyteorder("<")
    code = _code(little) | (0 if shape else _SCALAR)
    if little != dtype:  # a big-endian value: written little-endian
        write = lambda v: v.astype(little).tobytes()  # noqa: E731
    else:
        write = _PACK.get(dtype, _tobytes) if not shape else _tobytes
    out = (bytes((len(b),)) + b + _ENTRY.pack(code, shape[0] if shape else 1), write)
    if len(_entries) < 1024:
        _entries[(name, dtype, shape)] = out
    return out


def _plan(directory: bytes, n_columns: int) -> tuple[list, int]:
    """(name, dtype or None to skip, count, offset in the data, scalar) per entry; data size."""
    plan = _plans.get(directory)
    if plan is not None:
        return plan
    out, pos, offset = [], 0, 0
    try:
        for _ in range(n_columns):
            k = directory[pos]
            name = directory[pos + 1 : pos + 1 + k].decode()
            code, n = _ENTRY.unpack_from(directory, pos + 1 + k)
            pos += 1 + k + _ENTRY.size
            size = code & 0x0F
            kind = (code >> 4) & 0x07
            dtype = np.dtype(f"<{_KINDS[kind]}{size}") if kind < len(_KINDS) else None
            out.append((name, dtype, n, offset, bool(code & _SCALAR)))
            offset += size * n
    except (IndexError, struct.error, UnicodeDecodeError, TypeError) as exc:
        raise SnapshotDecodeError(f"corrupt snapshot: column directory unreadable ({exc})") from None
    if pos != len(directory):
        raise SnapshotDecodeError(f"corrupt snapshot: column directory of {len(directory)} bytes "
                                  f"holds {pos} bytes of {n_columns} entries")
    if len(_plans) >= 256:
        _plans.clear()
    _plans[directory] = (out, offset)
    return out, offset


def encode_snapshot(snap: DeviceSnapshot) -> bytes:
    """The snapshot as format-2 bytes (see the module docstring for the layout).

    Raises ``ValueError`` when the snapshot's arrays disagree in shape or a field does not
    fit its slot (e.g. a device id longer than 65535 bytes).
    """
    dev = snap.device_id.encode()
    ver = snap.model_version.encode()
    h, c, window = snap.h, snap.c, snap.window
    layers, hidden = h.shape if h.ndim == 2 else (0, 0)
    n_features = snap.mean.shape[0]
    w_len = window.shape[0] if window.size else 0
    # Validate shapes here: a bad snapshot must fail when written, not when restored.
    if c.shape != h.shape or (h.ndim != 2 and h.size):
        raise ValueError(f"h {h.shape} and c {c.shape} must both be [num_layers, hidden_size]")
    if snap.var.shape != (n_features,) or (window.size and window.shape != (w_len, n_features)):
        raise ValueError(f"mean {snap.mean.shape}, var {snap.var.shape} and window "
                         f"{window.shape} disagree on n_features")
    entries, data = [], []
    for name, value in snap.columns.items():
        if not isinstance(value, _ARRAY):
            value = np.asarray(value)
        entry, write = _entries.get((name, value.dtype, value.shape)) or _entry(name, value.dtype, value.shape)
        entries.append(entry)
        data.append(write(value))
    directory, values = b"".join(entries), b"".join(data)
    try:
        header = _HEADER.pack(snap.schema, layers, hidden, n_features, w_len, len(snap.experts),
                              len(dev), len(ver), len(entries), len(directory), len(values),
                              snap.count)
    except struct.error as exc:
        raise ValueError(f"snapshot of {snap.device_id[:64]!r} does not fit the format: {exc}") from None
    # ascontiguousarray is a no-op for arrays already of the right dtype and layout, so the
    # usual cost is one memcpy per array into the joined bytes.
    return b"".join((
        _PREFIX.pack(MAGIC, FORMAT, _HEADER.size), header, dev, ver,
        np.ascontiguousarray(h, "<f4").tobytes(), np.ascontiguousarray(c, "<f4").tobytes(),
        np.ascontiguousarray(snap.mean, "<f8").tobytes(),
        np.ascontiguousarray(snap.var, "<f8").tobytes(),
        np.ascontiguousarray(window, "<f4").tobytes(),
        np.ascontiguousarray(snap.experts, "<f8").tobytes(), directory, values,
    ))


def _parse_header(data: bytes | bytearray | memoryview) -> tuple[int, tuple, int]:
    """Validate the prefix, header and total length: the format, the format-2 header's fields
    (empty for format 1) and where the device id starts. Raises :class:`SnapshotDecodeError`."""
    size = len(data)
    if size < _PREFIX.size:
        raise SnapshotDecodeError(f"truncated snapshot: {size} bytes, need at least {_NEED}")
    magic, fmt, header_len = _PREFIX.unpack_from(data, 0)
    if magic != MAGIC:
        raise SnapshotDecodeError(f"not a stream-lstm snapshot (bad magic {bytes(magic)!r}, "
                                  f"expected {MAGIC!r})")
    if fmt not in _READS:
        raise SnapshotDecodeError(f"snapshot format {fmt} is not supported (this version "
                                  f"reads formats {_READS[0]} to {_READS[-1]}); upgrade stream-lstm")
    if fmt == 1:
        why = codec_v1.check(data)
        if why is not None:
            raise SnapshotDecodeError(why)
        return fmt, (), 0
    pos = _PREFIX.size
    if header_len < _HEADER.size:
        raise SnapshotDecodeError(f"corrupt snapshot: header of {header_len} bytes is shorter "
                                  f"than the {_HEADER.size} every format-{FORMAT} header has")
    if size < pos + header_len:
        raise SnapshotDecodeError(f"truncated snapshot: {size} bytes, need at least "
                                  f"{pos + header_len}")
    fields = _HEADER.unpack_from(data, pos)  # bytes past it: a newer writer's, skipped
    _, layers, hidden, nf, w_len, n_exp, id_len, ver_len, _, dir_len, data_len, _ = fields
    need = (pos + header_len + id_len + ver_len + 8 * layers * hidden + 16 * nf + 4 * w_len * nf
            + 8 * n_exp + dir_len + data_len)
    if size < need:
        raise SnapshotDecodeError(f"truncated snapshot: {size} bytes, need at least {need}")
    return fmt, fields, pos + header_len


def check_snapshot(data: bytes | bytearray | memoryview) -> str | None:
    """Why ``data`` is not a readable snapshot, or None if its structure is sound.

    A cheap check (header and lengths, no arrays built) for paths that store bytes without
    decoding them, such as restore.

    >>> check_snapshot(b"SLS\\x09..."), check_snapshot(b"nope")
    ('snapshot format 9 is not supported (this version reads formats 1 to 2); upgrade stream-lstm', 'truncated snapshot: 4 bytes, need at least 42')
    """
    try:
        _parse_header(data)
    except SnapshotDecodeError as exc:
        return str(exc)
    return None


def snapshot_schema(data: bytes | bytearray | memoryview) -> int | None:
    """The schema id in a snapshot's header without decoding it: 0 for format 1 (from before
    schemas), None when the bytes are too short or not a snapshot of a known format."""
    if len(data) < _NEED or data[:3] != MAGIC or data[3] not in _READS:
        return None
    return 0 if data[3] == 1 else int.from_bytes(data[6:10], "little")


def decode_snapshot(data: bytes | bytearray | memoryview, n_features: int | None = None
                    ) -> DeviceSnapshot:
    """The snapshot encoded in ``data``; :class:`SnapshotDecodeError` if it cannot be read, or
    if it holds another number of channels than ``n_features`` (when given).

    The arrays are fresh, writable copies (not views of ``data``), so callers may modify them
    or hand them to ``torch.from_numpy``.
    """
    snap = _decode(data)
    if n_features is not None and (snap.mean.shape != (n_features,) or (
            snap.window.size and snap.window.shape[-1] != n_features)):
        raise SnapshotDecodeError(f"a snapshot of {snap.mean.size} channels; the settings "
                                  f"say {n_features} (STREAM_LSTM_N_FEATURES)")
    return snap


_DECLARED = {c.name: np.dtype(c.dtype) for c in COLUMNS}
_MAX_PARTITION = 2**31 - 1  # (a Kafka partition number is an int32)
READINGS_BOUND = 1e30  # no reading is larger in size (config.py bounds VALUE_MIN and VALUE_MAX)


def decode_for_table(data: bytes | bytearray | memoryview, n_features: int) -> DeviceSnapshot:
    """:func:`decode_snapshot`, refusing as well (:class:`SnapshotDecodeError`) a snapshot whose
    declared columns a :class:`~stream_lstm.state.table.DeviceTable` could not take in: what
    the worker restores devices from. (The codec itself round-trips any snapshot.)"""
    snap = decode_snapshot(data, n_features)
    _check_columns(snap.columns)
    # A NaN in h, c or the normalizer stays in the recurrence: the device's forecasts were null
    # for good (a review forged one). So did a finite mean or variance past what any readings
    # can give (readings are within +-1e30 whatever the settings): the next update overflowed
    # (a review's 1e308). The window and the experts may hold NaN (gaps, unseen).
    with np.errstate(all="ignore"):
        for name, ok in (("h", np.isfinite(snap.h).all()), ("c", np.isfinite(snap.c).all()),
                         ("mean", (np.abs(snap.mean) <= READINGS_BOUND).all()),
                         ("var", ((snap.var >= 0) & (snap.var <= (2 * READINGS_BOUND) ** 2)).all()),
                         ("count", np.isfinite(snap.count) and snap.count >= 0)):
            if not ok:
                raise SnapshotDecodeError(f"corrupt snapshot: its {name} is not finite"
                                          + (" and non-negative" if name in ("var", "count") else "")
                                          + (" within what readings can give" if name in ("mean", "var") else ""))
    return snap


def _check_columns(columns: dict[str, Any]) -> None:
    """Refuse a snapshot whose declared columns the table could not take in: a value that does
    not convert exactly to the column's type (a NaN where a count belongs, 1e300 for a
    partition) is a corrupt or forged snapshot. Refused here, it starts its device afresh;
    failing the restore into the table instead stopped the worker at every start. (Values
    stay as written: the codec round-trips any snapshot bit for bit.)

    >>> _check_columns({"n_seen": np.array(3.0), "partition": np.int64(2)})
    >>> _check_columns({"n_seen": np.float64("nan")})
    Traceback (most recent call last):
    ...
    stream_lstm.checkpointing.codec.SnapshotDecodeError: corrupt snapshot: its n_seen holds nan, not int64 values
    """
    for name, value in columns.items():
        want = _DECLARED.get(name)
        arr = np.asarray(value)
        if want is None or arr.dtype == want:
            continue
        ok = arr.dtype.kind in "biuf"
        if ok and want.kind in "iu":
            limits = np.iinfo(want)
            with np.errstate(all="ignore"):
                ok = bool(np.all(np.isfinite(arr) & (arr == np.round(arr)) & (arr >= limits.min) & (arr <= limits.max)))
        if not ok:
            shown = np.array2string(arr.ravel()[:3], threshold=3)[1:-1] if arr.dtype.kind in "biufc" else arr.dtype
            raise SnapshotDecodeError(f"corrupt snapshot: its {name} holds {shown}, not {want} values")
    partition = columns.get("partition")
    if partition is not None and not (np.ndim(partition) == 0 and 0 <= partition <= _MAX_PARTITION):
        raise SnapshotDecodeError(f"corrupt snapshot: partition {partition}")


def _decode(data: bytes | bytearray | memoryview) -> DeviceSnapshot:
    fmt, fields, pos = _parse_header(data)
    if fmt == 1:
        try:
            return codec_v1.decode(data)
        except ValueError as exc:
            raise SnapshotDecodeError(str(exc)) from None
    (schema, layers, hidden, nf, w_len, n_exp, id_len, ver_len, n_columns, dir_len, data_len,
     count) = fields
    try:  # (the fixed part, laid out as in format 1)
        dev, ver, h, c, mean, var, window, pos = codec_v1.read_core(
            data, pos, id_len, ver_len, layers, hidden, nf, w_len)
    except ValueError as exc:
        raise SnapshotDecodeError(str(exc)) from None
    experts = np.frombuffer(data, "<f8", n_exp, pos).copy()
    pos += 8 * n_exp
    plan, total = _plan(bytes(data[pos : pos + dir_len]), n_columns)
    if total != data_len:
        raise SnapshotDecodeError(f"corrupt snapshot: the column directory describes {total} "
                                  f"bytes of values, the header {data_len}")
    pos += dir_len
    columns: dict[str, Any] = {}
    for name, dtype, n, offset, scalar in plan:
        if dtype is not None:  # else a kind this version does not know: skipped
            values = np.frombuffer(data, dtype, n, pos + offset)
            columns[name] = values[0] if scalar and n == 1 else values.copy()
    return DeviceSnapshot(device_id=dev, h=h, c=c, count=count, mean=mean, var=var,
                          window=window, model_version=ver, experts=experts, columns=columns,
                          schema=schema)


def _reading_times(data: bytes) -> tuple[float, float]:
    """A snapshot's last reading's event time and its wall clock (NaN counts as never)."""
    try:
        snap = decode_snapshot(data)
    except ValueError:  # (SnapshotDecodeError is one) an unreadable row loses to any other
        return (float("-inf"), float("-inf"))
    times = (float(snap.last_ts), float(snap.last_seen))
    return tuple(float("-inf") if t != t else t for t in times)  # type: ignore[return-value]


def later_state(incoming: bytes, existing: bytes) -> bool:
    """Whether ``incoming`` is a later state of its device than ``existing``: its last reading
    is later in event time, or as late and seen later (wall clock).

    >>> from stream_lstm.state.snapshot import DeviceSnapshot
    >>> def at(ts):
    ...     s = DeviceSnapshot.empty("d", num_layers=1, hidden_size=2, n_features=1)
    ...     s.last_ts = ts
    ...     return encode_snapshot(s)
    >>> later_state(at(200.0), at(100.0)), later_state(at(100.0), at(200.0)), later_state(at(1.0), b"junk")
    (True, False, True)
    """
    return _reading_times(incoming) > _reading_times(existing)
