"""The wire contract: reading decoding and validation, forecast encoding, dead-letter headers.

A **reading** is UTF-8 JSON keyed by its device id::

    {"device_id": "pump-17", "ts": 1764183600.0, "value": 71.2}

``ts`` is epoch seconds or an ISO-8601 string (naive means UTC). Multi-channel devices send
``"values": [..]`` instead of ``"value"``. Unknown extra fields are accepted and ignored, so
producers can add context without breaking the worker.

:meth:`ReadingDecoder.decode` raises only :class:`InvalidReading`, whose ``code`` is one of the
stable :class:`ErrorCode` values; the worker sends such readings to the dead-letter topic with
:func:`dlq_headers`. The size limit is checked before any parsing.

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
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

from stream_lstm.config import Settings


class ErrorCode(StrEnum):
    """Why a reading went to the dead-letter topic. The values are stable API."""

    OVERSIZED = "oversized"
    TOMBSTONE = "tombstone"
    BAD_UTF8 = "bad_utf8"
    NOT_JSON = "not_json"
    TRUNCATED_JSON = "truncated_json"
    NOT_OBJECT = "not_object"
    DUPLICATE_JSON_KEYS = "duplicate_json_keys"
    NULL_KEY = "null_key"
    KEY_MISMATCH = "key_mismatch"
    MISSING_DEVICE_ID = "missing_device_id"
    DEVICE_ID_NOT_STRING = "device_id_not_string"
    EMPTY_DEVICE_ID = "empty_device_id"
    DEVICE_ID_TOO_LONG = "device_id_too_long"
    DEVICE_ID_CONTROL_CHARS = "device_id_control_chars"
    MISSING_TS = "missing_ts"
    TS_BOOLEAN = "ts_boolean"
    BAD_TS = "bad_ts"
    TS_FAR_FUTURE = "ts_far_future"
    MISSING_VALUE = "missing_value"
    BOTH_VALUE_AND_VALUES = "both_value_and_values"
    VALUE_NOT_NUMBER = "value_not_number"
    VALUE_NUMERIC_STRING = "value_numeric_string"
    VALUE_NESTED = "value_nested"
    VALUE_NOT_FINITE = "value_not_finite"
    VALUES_WRONG_LENGTH = "values_wrong_length"
    VALUE_OUT_OF_RANGE = "value_out_of_range"
    LATE = "late"


class InvalidReading(ValueError):
    """A reading that breaks the wire contract.

    Parameters
    ----------
    code
        Stable machine-readable reason.
    reason
        What was wrong, for a person.
    """

    def __init__(self, code: ErrorCode, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason


@dataclass(slots=True, frozen=True)
class Reading:
    """A valid reading: device id, event time (epoch seconds), one value per channel."""

    device_id: str
    ts: float
    values: tuple[float, ...]


def _reject_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise InvalidReading(ErrorCode.DUPLICATE_JSON_KEYS, f"key {_short(dup)} appears twice")
    return obj


def _no_constants(name: str) -> float:
    # Python's json accepts NaN/Infinity literals, which JSON does not; refuse them here.
    raise InvalidReading(ErrorCode.VALUE_NOT_FINITE, f"{name} is not a finite number")


_json_decoder = json.JSONDecoder(object_pairs_hook=_reject_duplicates, parse_constant=_no_constants)


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _parse_ts(raw: object, now: float, max_skew: float) -> float:
    if raw is None:
        raise InvalidReading(ErrorCode.MISSING_TS, "ts is missing")
    if isinstance(raw, bool):
        raise InvalidReading(ErrorCode.TS_BOOLEAN, "ts is a boolean; send epoch seconds or ISO-8601")
    if isinstance(raw, int | float):
        ts = float(raw)
    elif isinstance(raw, str):
        try:
            parsed = datetime.fromisoformat(raw.strip())
        except ValueError:
            raise InvalidReading(ErrorCode.BAD_TS, f"ts {_short(raw)} is not ISO-8601") from None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        ts = parsed.timestamp()
    else:
        raise InvalidReading(ErrorCode.BAD_TS, f"ts has type {type(raw).__name__}")
    if not math.isfinite(ts) or ts < 0:
        raise InvalidReading(ErrorCode.BAD_TS, f"ts {_short(raw)} is not a valid time")
    if ts > now + max_skew:
        raise InvalidReading(
            ErrorCode.TS_FAR_FUTURE, f"ts {ts:.0f} is {ts - now:.0f}s ahead of the worker's clock"
        )
    return ts


def _number(raw: object, name: str, lo: float, hi: float) -> float:
    if isinstance(raw, bool) or raw is None:
        raise InvalidReading(ErrorCode.VALUE_NOT_NUMBER, f"{name} is {_short(raw)}, not a number")
    if isinstance(raw, int | float):
        v = float(raw)
    elif isinstance(raw, str):
        try:
            float(raw)
        except ValueError:
            raise InvalidReading(ErrorCode.VALUE_NOT_NUMBER, f"{name} is {_short(raw)}") from None
        raise InvalidReading(
            ErrorCode.VALUE_NUMERIC_STRING, f"{name} is the string {_short(raw)}; send a JSON number"
        )
    elif isinstance(raw, dict | list):
        raise InvalidReading(ErrorCode.VALUE_NESTED, f"{name} is a nested {type(raw).__name__}")
    else:
        raise InvalidReading(ErrorCode.VALUE_NOT_NUMBER, f"{name} has type {type(raw).__name__}")
    if not math.isfinite(v):  # large ints overflow to inf
        raise InvalidReading(ErrorCode.VALUE_NOT_FINITE, f"{name} is not finite")
    if not lo <= v <= hi:
        raise InvalidReading(ErrorCode.VALUE_OUT_OF_RANGE, f"{name}={v} outside [{lo}, {hi}]")
    return v


class ReadingDecoder:
    """Decodes and validates readings against the wire contract.

    Parameters
    ----------
    settings
        Uses ``n_features``, ``max_message_bytes``, ``max_device_id_length``,
        ``value_min``/``value_max`` and ``max_future_skew_s``.
    """

    def __init__(self, settings: Settings) -> None:
        self.n_features = settings.n_features
        self.max_bytes = settings.max_message_bytes
        self.max_id = settings.max_device_id_length
        self.lo, self.hi = settings.value_min, settings.value_max
        self.max_skew = settings.max_future_skew_s

    def decode(self, value: bytes | None, key: bytes | None, now: float) -> Reading:
        """Return the reading in ``value`` (keyed by ``key``) or raise :class:`InvalidReading`."""
        if value is None:
            raise InvalidReading(ErrorCode.TOMBSTONE, "the message has no value (a tombstone)")
        if len(value) > self.max_bytes:
            raise InvalidReading(
                ErrorCode.OVERSIZED, f"{len(value)} bytes is over the {self.max_bytes}-byte limit"
            )
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidReading(ErrorCode.BAD_UTF8, f"invalid UTF-8 at byte {exc.start}") from None
        try:
            obj = _json_decoder.decode(text)
        except json.JSONDecodeError as exc:
            truncated = exc.pos >= len(text.rstrip())
            code = ErrorCode.TRUNCATED_JSON if truncated else ErrorCode.NOT_JSON
            raise InvalidReading(code, f"{exc.msg} at char {exc.pos}") from None
        except RecursionError:
            raise InvalidReading(ErrorCode.NOT_JSON, "JSON nested too deeply") from None
        if not isinstance(obj, dict):
            raise InvalidReading(ErrorCode.NOT_OBJECT, f"expected a JSON object, got {type(obj).__name__}")
        device_id = self._device_id(obj.get("device_id"), key)
        ts = _parse_ts(obj.get("ts"), now, self.max_skew)
        return Reading(device_id, ts, self._values(obj))

    def _device_id(self, raw: object, key: bytes | None) -> str:
        if raw is None:
            raise InvalidReading(ErrorCode.MISSING_DEVICE_ID, "device_id is missing")
        if not isinstance(raw, str):
            raise InvalidReading(ErrorCode.DEVICE_ID_NOT_STRING, f"device_id is {type(raw).__name__}")
        if not raw:
            raise InvalidReading(ErrorCode.EMPTY_DEVICE_ID, "device_id is empty")
        if len(raw) > self.max_id:
            raise InvalidReading(
                ErrorCode.DEVICE_ID_TOO_LONG, f"device_id has {len(raw)} chars (max {self.max_id})"
            )
        if not raw.isprintable() and any(unicodedata.category(ch) == "Cc" for ch in raw):
            raise InvalidReading(ErrorCode.DEVICE_ID_CONTROL_CHARS, "device_id has control characters")
        if key is None:
            raise InvalidReading(ErrorCode.NULL_KEY, "the message has no key; key it by device_id")
        if key != raw.encode("utf-8"):
            raise InvalidReading(
                ErrorCode.KEY_MISMATCH, f"key {_short(key)} differs from device_id {_short(raw)}"
            )
        return raw

    def _values(self, obj: dict) -> tuple[float, ...]:
        has_value, has_values = "value" in obj, "values" in obj
        if has_value and has_values:
            raise InvalidReading(ErrorCode.BOTH_VALUE_AND_VALUES, "send value or values, not both")
        if has_value:
            if self.n_features != 1:
                raise InvalidReading(
                    ErrorCode.VALUES_WRONG_LENGTH,
                    f"one value given; this service expects values with {self.n_features} channels",
                )
            return (_number(obj["value"], "value", self.lo, self.hi),)
        if not has_values:
            raise InvalidReading(ErrorCode.MISSING_VALUE, "value (or values) is missing")
        raw = obj["values"]
        if not isinstance(raw, list):
            raise InvalidReading(ErrorCode.VALUE_NESTED if isinstance(raw, dict) else ErrorCode.VALUE_NOT_NUMBER,
                                 f"values is {type(raw).__name__}, not a list")
        if len(raw) != self.n_features:
            raise InvalidReading(
                ErrorCode.VALUES_WRONG_LENGTH, f"values has {len(raw)} channels, expected {self.n_features}"
            )
        return tuple(_number(v, f"values[{i}]", self.lo, self.hi) for i, v in enumerate(raw))


def encode_reading(device_id: str, ts: float, values: Sequence[float]) -> bytes:
    """A reading in wire format (for producers: simulator, replay, tests)."""
    if len(values) == 1:
        return json.dumps({"device_id": device_id, "ts": ts, "value": values[0]}).encode()
    return json.dumps({"device_id": device_id, "ts": ts, "values": list(values)}).encode()


def dlq_headers(code: str, reason: str, topic: str, partition: int, offset: int) -> list[tuple[str, bytes]]:
    """Dead-letter headers: error code and reason, and where the message came from."""
    return [
        ("error.code", str(code).encode()),
        ("error.reason", reason.encode("utf-8", "replace")),
        ("source.topic", topic.encode()),
        ("source.partition", str(partition).encode()),
        ("source.offset", str(offset).encode()),
    ]


def _finite_or_none(obj: object) -> object:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, list):
        return [_finite_or_none(v) for v in obj]
    return obj


_encoder = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


def encode_forecast(record: dict) -> bytes:
    """Compact JSON for a forecast (or alert); NaN and infinities become ``null``.

    >>> encode_forecast({"device_id": "a", "residual": float("nan"), "forecast": [1.5]})
    b'{"device_id":"a","residual":null,"forecast":[1.5]}'
    """
    try:
        return _encoder.encode(record).encode()
    except ValueError:  # a NaN somewhere (e.g. no residual yet): the slow, careful path
        return _encoder.encode({k: _finite_or_none(v) for k, v in record.items()}).encode()
