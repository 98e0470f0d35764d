"""The wire contract's input side: decoding and validating readings.

A **reading** is UTF-8 JSON keyed by its device id (the Kafka key is the id's UTF-8 bytes)::

    {"device_id": "pump-17", "ts": 1764183600.0, "value": 71.2}

``ts`` is epoch seconds (number) or an ISO-8601 string (naive means UTC, ``Z`` accepted).
Multi-channel devices send ``"values": [..]`` (``settings.n_features`` numbers) instead of
``"value"``, which is valid only when ``n_features == 1``. **Unknown extra fields are accepted
and ignored**, so producers can add context without breaking the worker; they must still be
valid JSON, free of duplicate keys, and count towards the size limit. See docs/wire-contract.md.

:meth:`ReadingDecoder.decode` raises only :class:`InvalidReading`, whose ``code`` is one of the
stable :class:`ErrorCode` values; the worker sends such readings to the dead-letter topic with
:func:`~stream_lstm.encoding.dlq_headers`. The size limit is checked before any parsing. What
the service writes (forecasts, dead-letter headers, and readings for producers) is encoded in
:mod:`stream_lstm.encoding`.

Performance (best of 5 timeit runs, this 2-core VM, CPython 3.11; 1 channel [4 channels]):
parsing alone costs 1.8 us [2.4] with ``json`` + ``object_pairs_hook`` (duplicate check),
2.3 us [2.9] with plain ``json.loads`` and 0.25 us [0.35] with ``orjson.loads``, which cannot
see duplicate keys. A whole ``decode`` costs 1.4 us [2.1] on the fast path with ``orjson``,
2.2 us [2.9] with the stdlib scanner, and 3.6 us [6.0] on the careful path alone (extra
fields, escapes, errors). So ``orjson`` is used when installed, with an exact stdlib
fallback (the same holds for encoding forecasts: see :mod:`stream_lstm.encoding`).

Duplicate keys without the hook: in a payload without backslashes, a flat object has exactly
``2 * (keys + string values)`` quote characters, and any duplicate key adds more. The fast
path accepts only such clean readings; anything else (every error included) goes through
the careful path, which alone decides what is rejected and why. The fuzz tests check that
both paths (and both parsers) agree.

>>> from stream_lstm.config import Settings
>>> dec = ReadingDecoder(Settings())
>>> dec.decode(b'{"device_id": "pump-17", "ts": 1764183600, "value": 71.2}', b"pump-17", now=1764183600)
Reading(device_id='pump-17', ts=1764183600.0, values=(71.2,))
>>> try:
...     dec.decode(b'{"device_id": "pump-17", "ts": 1, "value": "71.2"}', b"pump-17", now=2.0)
... except InvalidReading as e:
...     print(e.code, "-", e.reason)
value_numeric_string - value is the string '71.2'; send a JSON number
"""

from __future__ import annotations

import json
import math
import unicodedata
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

from stream_lstm.config import Settings

try:  # optional speed-up (see the table above); the stdlib path gives identical results
    import orjson
except ImportError:  # pragma: no cover - exercised where orjson is not installed
    orjson = None  # type: ignore[assignment]


class ErrorCode(StrEnum):
    """Why a reading went to the dead-letter topic. The values are stable API.

    Examples
    --------
    >>> ErrorCode.KEY_MISMATCH == "key_mismatch"
    True
    """

    TOMBSTONE = "tombstone"
    OVERSIZED = "oversized"
    NULL_KEY = "null_key"
    EMPTY_MESSAGE = "empty_message"
    BAD_UTF8 = "bad_utf8"
    NOT_JSON = "not_json"
    TRUNCATED_JSON = "truncated_json"
    NOT_OBJECT = "not_object"
    DUPLICATE_JSON_KEYS = "duplicate_json_keys"
    MISSING_DEVICE_ID = "missing_device_id"
    DEVICE_ID_NOT_STRING = "device_id_not_string"
    EMPTY_DEVICE_ID = "empty_device_id"
    DEVICE_ID_TOO_LONG = "device_id_too_long"
    DEVICE_ID_CONTROL_CHARS = "device_id_control_chars"
    DEVICE_ID_BAD_UNICODE = "device_id_bad_unicode"
    KEY_MISMATCH = "key_mismatch"
    MISSING_TS = "missing_ts"
    TS_BOOLEAN = "ts_boolean"
    BAD_TS = "bad_ts"
    TS_FAR_FUTURE = "ts_far_future"
    MISSING_VALUE = "missing_value"
    BOTH_VALUE_AND_VALUES = "both_value_and_values"
    VALUES_NOT_LIST = "values_not_list"
    VALUES_WRONG_LENGTH = "values_wrong_length"
    VALUE_NOT_NUMBER = "value_not_number"
    VALUE_NUMERIC_STRING = "value_numeric_string"
    VALUE_NESTED = "value_nested"
    VALUE_NOT_FINITE = "value_not_finite"
    VALUE_OUT_OF_RANGE = "value_out_of_range"
    LATE = "late"  # set by the worker (late_policy=dlq), never by the decoder
    NO_RECORD_TIME = "no_record_time"  # set by decode_records (pipeline.py), never by the decoder


class InvalidReading(ValueError):
    """A reading that breaks the wire contract.

    Parameters
    ----------
    code
        Stable machine-readable reason.
    reason
        What was wrong and where, for a person; quotes at most ~60 characters of payload.

    Examples
    --------
    >>> e = InvalidReading(ErrorCode.MISSING_TS, "ts is missing")
    >>> str(e), e.code is ErrorCode.MISSING_TS
    ('missing_ts: ts is missing', True)
    """

    def __init__(self, code: ErrorCode, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason

    def __reduce__(self):  # picklable across processes
        return (type(self), (self.code, self.reason))


@dataclass(slots=True, frozen=True)
class Reading:
    """A valid reading: device id, event time (epoch seconds), one value per channel.

    Examples
    --------
    >>> Reading("pump-17", 1764183600.0, (71.2,)).values
    (71.2,)
    """

    device_id: str
    ts: float
    values: tuple[float, ...]


_set_id, _set_ts, _set_values = Reading.device_id.__set__, Reading.ts.__set__, Reading.values.__set__  # type: ignore[attr-defined]


def _new_reading(device_id: str, ts: float, values: tuple[float, ...]) -> Reading:
    # The frozen dataclass __init__ costs ~0.5 us (3 object.__setattr__ calls); setting the
    # slots directly costs half that. Only for values the fast path has already checked.
    r = object.__new__(Reading)
    _set_id(r, device_id)
    _set_ts(r, ts)
    _set_values(r, values)
    return r


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _reject_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise InvalidReading(ErrorCode.DUPLICATE_JSON_KEYS, f"key {_short(dup)} appears twice in an object")
    return obj


_careful_json = json.JSONDecoder(object_pairs_hook=_reject_duplicates)
_scan = json.JSONDecoder().scan_once


def _fast_loads_std(value: bytes) -> object:
    text = value.decode()
    obj, end = _scan(text, 0)
    if end != len(text):
        raise ValueError("trailing data")
    return obj


_fast_loads = orjson.loads if orjson is not None else _fast_loads_std


def _iso_ts(raw: str) -> float:
    parsed = datetime.fromisoformat(raw)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


class ReadingDecoder:
    """Decodes and validates readings against the wire contract.

    Parameters
    ----------
    settings
        Uses ``n_features``, ``max_message_bytes``, ``max_device_id_length``,
        ``value_min``/``value_max`` and ``max_future_skew_s``.

    Examples
    --------
    >>> from stream_lstm.config import Settings
    >>> dec = ReadingDecoder(Settings(n_features=2))
    >>> dec.decode(b'{"device_id":"a","ts":"2025-11-26T19:00:00Z","values":[1,2.5]}', b"a", now=2e9)
    Reading(device_id='a', ts=1764183600.0, values=(1.0, 2.5))
    >>> try:
    ...     dec.decode(b'{"device_id":"a","ts":1,"values":[1]}', b"a", now=2e9)
    ... except InvalidReading as e:
    ...     print(e.code)
    values_wrong_length
    """

    def __init__(self, settings: Settings) -> None:
        self.n_features = settings.n_features
        self.max_bytes = settings.max_message_bytes
        self.max_id = settings.max_device_id_length
        self.lo, self.hi = float(settings.value_min), float(settings.value_max)
        self.max_skew = settings.max_future_skew_s
        self._value_key = "value" if self.n_features == 1 else "values"

    def decode(self, value: bytes | None, key: bytes | None, now: float) -> Reading:
        """Return the reading in ``value`` (keyed by ``key``) or raise :class:`InvalidReading`.

        ``now`` (epoch seconds) is what the far-future check measures against: the record's
        Kafka timestamp, or the worker's clock for a record without one (``decode_records``).
        """
        # Fast path: clean common readings only. Anything else, every error included, falls
        # through to the careful path, which alone decides what is rejected and why.
        if key is not None and value is not None and len(value) <= self.max_bytes and value.find(92) < 0:  # 92: no backslash
            try:
                obj = _fast_loads(value)
                dev, ts, x = obj["device_id"], obj["ts"], obj[self._value_key]
                if (len(obj) == 3 and type(dev) is str and 0 < len(dev) <= self.max_id
                        and dev.isprintable() and key == dev.encode()):
                    quotes = 8  # 3 keys and the device id: more means a duplicate key
                    if type(ts) is float or type(ts) is int:
                        ts = float(ts)
                    elif type(ts) is str:
                        ts, quotes = _iso_ts(ts), 10
                    else:
                        quotes = -1
                    # (comparisons with NaN are false)
                    if 0.0 <= ts <= now + self.max_skew and value.count(b'"') == quotes:
                        lo, hi = self.lo, self.hi
                        if self.n_features == 1:
                            if (type(x) is float or type(x) is int) and lo <= (x := float(x)) <= hi:
                                return _new_reading(dev, ts, (x,))
                        elif type(x) is list and len(x) == self.n_features:
                            vals = []
                            for v in x:
                                if (type(v) is not float and type(v) is not int) or not lo <= (v := float(v)) <= hi:
                                    break
                                vals.append(v)
                            else:
                                return _new_reading(dev, ts, tuple(vals))
            except Exception:  # noqa: BLE001 - the careful path decides what is wrong
                pass
        return self._careful(value, key, now)

    def _careful(self, value: bytes | None, key: bytes | None, now: float) -> Reading:
        if value is None:
            raise InvalidReading(ErrorCode.TOMBSTONE, "the message has no value (a tombstone)")
        if len(value) > self.max_bytes:
            raise InvalidReading(ErrorCode.OVERSIZED, f"{len(value)} bytes is over the {self.max_bytes}-byte limit")
        if key is None:
            raise InvalidReading(ErrorCode.NULL_KEY, "the message has no key; key it by device_id")
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidReading(ErrorCode.BAD_UTF8, f"invalid UTF-8 at byte {exc.start}") from None
        if not text.strip():
            raise InvalidReading(ErrorCode.EMPTY_MESSAGE, "the message value is empty")
        try:
            obj = _careful_json.decode(text)
        except InvalidReading:
            raise
        except json.JSONDecodeError as exc:
            truncated = exc.pos >= len(text.rstrip())
            code = ErrorCode.TRUNCATED_JSON if truncated else ErrorCode.NOT_JSON
            raise InvalidReading(code, f"{exc.msg} at char {exc.pos}") from None
        except RecursionError:
            raise InvalidReading(ErrorCode.NOT_JSON, "JSON nested too deeply") from None
        except ValueError as exc:  # e.g. an integer literal over 4300 digits
            raise InvalidReading(ErrorCode.NOT_JSON, f"unparseable JSON: {_short(str(exc), 80)}") from None
        if not isinstance(obj, dict):
            kind = "array" if isinstance(obj, list) else "scalar"
            raise InvalidReading(ErrorCode.NOT_OBJECT, f"expected a JSON object, got a JSON {kind}")
        device_id = self._device_id(obj, key)
        ts = self._ts(obj, now)
        return Reading(device_id, ts, self._values(obj))

    def _device_id(self, obj: dict, key: bytes) -> str:
        if "device_id" not in obj:
            raise InvalidReading(ErrorCode.MISSING_DEVICE_ID, "device_id is missing")
        raw = obj["device_id"]
        if not isinstance(raw, str):
            raise InvalidReading(ErrorCode.DEVICE_ID_NOT_STRING, f"device_id is {_short(raw)}, not a string")
        if not raw:
            raise InvalidReading(ErrorCode.EMPTY_DEVICE_ID, "device_id is empty")
        if len(raw) > self.max_id:
            raise InvalidReading(ErrorCode.DEVICE_ID_TOO_LONG, f"device_id has {len(raw)} chars (max {self.max_id})")
        if not raw.isprintable():
            for i, ch in enumerate(raw):
                cat = unicodedata.category(ch)
                if cat == "Cc":
                    raise InvalidReading(ErrorCode.DEVICE_ID_CONTROL_CHARS, f"device_id has control character U+{ord(ch):04X} at {i}")
                if cat == "Cs":
                    raise InvalidReading(ErrorCode.DEVICE_ID_BAD_UNICODE, f"device_id has a lone surrogate at {i}")
        if key != raw.encode("utf-8"):
            raise InvalidReading(ErrorCode.KEY_MISMATCH, f"key {_short(key)} is not device_id {_short(raw)} in UTF-8")
        return raw

    def _ts(self, obj: dict, now: float) -> float:
        if "ts" not in obj:
            raise InvalidReading(ErrorCode.MISSING_TS, "ts is missing")
        raw = obj["ts"]
        if isinstance(raw, bool):
            raise InvalidReading(ErrorCode.TS_BOOLEAN, "ts is a boolean; send epoch seconds or ISO-8601")
        if isinstance(raw, int | float):
            try:
                ts = float(raw)
            except OverflowError:
                raise InvalidReading(ErrorCode.BAD_TS, "ts is an integer too large for a float") from None
        elif isinstance(raw, str):
            try:
                ts = _iso_ts(raw)
            except (ValueError, OverflowError):
                raise InvalidReading(ErrorCode.BAD_TS, f"ts {_short(raw)} is not ISO-8601") from None
        else:
            raise InvalidReading(ErrorCode.BAD_TS, f"ts is {_short(raw)}; send epoch seconds or ISO-8601")
        if not math.isfinite(ts) or ts < 0:
            raise InvalidReading(ErrorCode.BAD_TS, f"ts {_short(raw)} is negative or not finite")
        if ts > now + self.max_skew:
            raise InvalidReading(ErrorCode.TS_FAR_FUTURE, f"ts {ts:.6g} is {ts - now:.6g}s ahead of its record's time (max {self.max_skew:g}s)")
        return ts

    def _values(self, obj: dict) -> tuple[float, ...]:
        has_value, has_values = "value" in obj, "values" in obj
        if has_value and has_values:
            raise InvalidReading(ErrorCode.BOTH_VALUE_AND_VALUES, "send value or values, not both")
        if has_value:
            if self.n_features != 1:
                raise InvalidReading(ErrorCode.VALUES_WRONG_LENGTH, f"one value given; send values with {self.n_features} channels")
            return (self._number(obj["value"], "value"),)
        if not has_values:
            raise InvalidReading(ErrorCode.MISSING_VALUE, "value (or values) is missing")
        raw = obj["values"]
        if not isinstance(raw, list):
            raise InvalidReading(ErrorCode.VALUES_NOT_LIST, f"values is {_short(raw)}, not an array")
        if len(raw) != self.n_features:
            raise InvalidReading(ErrorCode.VALUES_WRONG_LENGTH, f"values has {len(raw)} channels, expected {self.n_features}")
        return tuple(self._number(v, f"values[{i}]") for i, v in enumerate(raw))

    def _number(self, raw: object, name: str) -> float:
        if isinstance(raw, bool) or raw is None:
            raise InvalidReading(ErrorCode.VALUE_NOT_NUMBER, f"{name} is {json.dumps(raw)}, not a number")
        if isinstance(raw, str):
            try:
                float(raw)
            except ValueError:
                raise InvalidReading(ErrorCode.VALUE_NOT_NUMBER, f"{name} is the string {_short(raw)}") from None
            raise InvalidReading(ErrorCode.VALUE_NUMERIC_STRING, f"{name} is the string {_short(raw)}; send a JSON number")
        if isinstance(raw, dict | list):
            kind = "object" if isinstance(raw, dict) else "array"
            raise InvalidReading(ErrorCode.VALUE_NESTED, f"{name} is a nested JSON {kind}")
        try:
            v = float(raw)  # type: ignore[arg-type]  # int or float: nothing else comes from JSON
        except OverflowError:
            raise InvalidReading(ErrorCode.VALUE_OUT_OF_RANGE, f"{name} is an integer too large for a float") from None
        if not math.isfinite(v):  # NaN / Infinity literals, or 1e999
            raise InvalidReading(ErrorCode.VALUE_NOT_FINITE, f"{name} is {v}, not a finite number")
        if not self.lo <= v <= self.hi:
            # (repr: the shortest text that is this number; %g said 1.0000001e12 was 1e+12)
            raise InvalidReading(ErrorCode.VALUE_OUT_OF_RANGE, f"{name}={v!r} is outside [{self.lo:g}, {self.hi:g}]")
        return v
