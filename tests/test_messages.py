"""Reading decoding: one case per error class, good readings, round trips with encode_reading."""

from __future__ import annotations

import json
import math
import pickle

import pytest

from stream_lstm import messages
from stream_lstm.config import Settings
from stream_lstm.encoding import encode_reading
from stream_lstm.messages import ErrorCode, InvalidReading, Reading, ReadingDecoder

TS = 1764183600.0  # 2025-11-26T19:00:00Z
NOW = TS + 100.0
KEY = b"pump-17"

LOADERS = ["std"] + (["orjson"] if messages.orjson is not None else [])


@pytest.fixture(params=LOADERS, autouse=True)
def fast_loader(request, monkeypatch):
    """Run every test with each fast-path JSON parser (stdlib always, orjson when installed)."""
    if request.param == "std":
        monkeypatch.setattr(messages, "_fast_loads", messages._fast_loads_std)
    return request.param


def dec(**kw) -> ReadingDecoder:
    return ReadingDecoder(Settings(**kw))


def body(**fields) -> bytes:
    base = {"device_id": "pump-17", "ts": TS, "value": 71.2}
    base.update(fields)
    return json.dumps({k: v for k, v in base.items() if v is not _DROP}).encode()


_DROP = object()
N2 = {"n_features": 2}

# (id, value bytes | None, key, settings overrides, expected code)
ERROR_CASES = [
    ("tombstone", None, KEY, {}, ErrorCode.TOMBSTONE),
    ("oversized", body(note="x" * 200), KEY, {"max_message_bytes": 64}, ErrorCode.OVERSIZED),
    ("oversized-garbage", b"\xff" * 70, KEY, {"max_message_bytes": 64}, ErrorCode.OVERSIZED),
    ("null-key", body(), None, {}, ErrorCode.NULL_KEY),
    ("empty", b"", KEY, {}, ErrorCode.EMPTY_MESSAGE),
    ("blank", b" \n\t ", KEY, {}, ErrorCode.EMPTY_MESSAGE),
    ("bad-utf8", b'{"device_id": "pump-\xff17"}', KEY, {}, ErrorCode.BAD_UTF8),
    ("not-json", b"hello", KEY, {}, ErrorCode.NOT_JSON),
    ("not-json-colon", b'{"device_id" "pump-17"}', KEY, {}, ErrorCode.NOT_JSON),
    ("not-json-trailing", body() + b"}", KEY, {}, ErrorCode.NOT_JSON),
    ("not-json-bom", b"\xef\xbb\xbf" + body(), KEY, {}, ErrorCode.NOT_JSON),
    ("not-json-deep", b"[" * 50_000 + b"]" * 50_000, KEY, {"max_message_bytes": 200_000}, ErrorCode.NOT_JSON),
    ("not-json-huge-int", b'{"x": 1' + b"0" * 5000 + b"}", KEY, {}, ErrorCode.NOT_JSON),
    ("truncated", body()[:-7], KEY, {}, ErrorCode.TRUNCATED_JSON),
    ("truncated-open", b"{", KEY, {}, ErrorCode.TRUNCATED_JSON),
    ("not-object-array", b"[1, 2]", KEY, {}, ErrorCode.NOT_OBJECT),
    ("not-object-number", b"42", KEY, {}, ErrorCode.NOT_OBJECT),
    ("not-object-string", b'"pump-17"', KEY, {}, ErrorCode.NOT_OBJECT),
    ("duplicate", b'{"device_id":"pump-17","ts":1,"value":1,"value":2}', KEY, {}, ErrorCode.DUPLICATE_JSON_KEYS),
    ("duplicate-spaced", b'{"device_id":"pump-17","ts":1,"value" :1,"value":2}', KEY, {}, ErrorCode.DUPLICATE_JSON_KEYS),
    ("duplicate-nested", b'{"device_id":"pump-17","ts":1,"value":1,"x":{"a":1,"a":2}}', KEY, {}, ErrorCode.DUPLICATE_JSON_KEYS),
    ("duplicate-escaped", b'{"device_id":"pump-17","ts":1,"value":1,"v\\u0061lue":2}', KEY, {}, ErrorCode.DUPLICATE_JSON_KEYS),
    ("missing-id", body(device_id=_DROP), KEY, {}, ErrorCode.MISSING_DEVICE_ID),
    ("id-number", body(device_id=17), KEY, {}, ErrorCode.DEVICE_ID_NOT_STRING),
    ("id-null", body(device_id=None), KEY, {}, ErrorCode.DEVICE_ID_NOT_STRING),
    ("id-empty", body(device_id=""), b"", {}, ErrorCode.EMPTY_DEVICE_ID),
    ("id-too-long", body(device_id="x" * 129), b"x" * 129, {}, ErrorCode.DEVICE_ID_TOO_LONG),
    ("id-control", body(device_id="pump\u000717"), "pump\u000717".encode(), {}, ErrorCode.DEVICE_ID_CONTROL_CHARS),
    ("id-newline", body(device_id="pump-17\n"), b"pump-17\n", {}, ErrorCode.DEVICE_ID_CONTROL_CHARS),
    ("id-c1-control", body(device_id="pump\u008517"), "pump\u008517".encode(), {}, ErrorCode.DEVICE_ID_CONTROL_CHARS),
    ("id-surrogate", b'{"device_id":"pump\\ud80017","ts":1,"value":1}', KEY, {}, ErrorCode.DEVICE_ID_BAD_UNICODE),
    ("key-mismatch", body(), b"pump-18", {}, ErrorCode.KEY_MISMATCH),
    ("key-not-utf8", body(), b"pump-\xff", {}, ErrorCode.KEY_MISMATCH),
    ("missing-ts", body(ts=_DROP), KEY, {}, ErrorCode.MISSING_TS),
    ("ts-true", body(ts=True), KEY, {}, ErrorCode.TS_BOOLEAN),
    ("ts-false", body(ts=False), KEY, {}, ErrorCode.TS_BOOLEAN),
    ("ts-word", body(ts="yesterday"), KEY, {}, ErrorCode.BAD_TS),
    ("ts-null", body(ts=None), KEY, {}, ErrorCode.BAD_TS),
    ("ts-negative", body(ts=-1.0), KEY, {}, ErrorCode.BAD_TS),
    ("ts-nan", body(ts=math.nan), KEY, {}, ErrorCode.BAD_TS),
    ("ts-inf", b'{"device_id":"pump-17","ts":1e999,"value":1}', KEY, {}, ErrorCode.BAD_TS),
    ("ts-huge-int", b'{"device_id":"pump-17","ts":1' + b"0" * 400 + b',"value":1}', KEY, {}, ErrorCode.BAD_TS),
    ("ts-list", body(ts=[TS]), KEY, {}, ErrorCode.BAD_TS),
    ("ts-numeric-string", body(ts=str(TS)), KEY, {}, ErrorCode.BAD_TS),
    ("ts-future", body(ts=NOW + 301.0), KEY, {}, ErrorCode.TS_FAR_FUTURE),
    ("ts-future-huge", b'{"device_id":"pump-17","ts":1' + b"0" * 300 + b',"value":1}', KEY, {}, ErrorCode.TS_FAR_FUTURE),
    ("ts-future-iso", body(ts="2030-01-01T00:00:00Z"), KEY, {}, ErrorCode.TS_FAR_FUTURE),
    ("missing-value", body(value=_DROP), KEY, {}, ErrorCode.MISSING_VALUE),
    ("both", body(values=[1.0]), KEY, {}, ErrorCode.BOTH_VALUE_AND_VALUES),
    ("values-number", body(value=_DROP, values=3.0), KEY, N2, ErrorCode.VALUES_NOT_LIST),
    ("values-object", body(value=_DROP, values={"a": 1}), KEY, N2, ErrorCode.VALUES_NOT_LIST),
    ("values-short", body(value=_DROP, values=[1.0]), KEY, N2, ErrorCode.VALUES_WRONG_LENGTH),
    ("values-long", body(value=_DROP, values=[1.0, 2.0]), KEY, {}, ErrorCode.VALUES_WRONG_LENGTH),
    ("value-for-multi", body(), KEY, N2, ErrorCode.VALUES_WRONG_LENGTH),
    ("value-true", body(value=True), KEY, {}, ErrorCode.VALUE_NOT_NUMBER),
    ("value-null", body(value=None), KEY, {}, ErrorCode.VALUE_NOT_NUMBER),
    ("value-word", body(value="high"), KEY, {}, ErrorCode.VALUE_NOT_NUMBER),
    ("values-item-false", body(value=_DROP, values=[1.0, False]), KEY, N2, ErrorCode.VALUE_NOT_NUMBER),
    ("value-numeric-string", body(value="71.2"), KEY, {}, ErrorCode.VALUE_NUMERIC_STRING),
    ("values-numeric-string", body(value=_DROP, values=[1.0, "2"]), KEY, N2, ErrorCode.VALUE_NUMERIC_STRING),
    ("value-object", body(value={"v": 1}), KEY, {}, ErrorCode.VALUE_NESTED),
    ("value-list", body(value=[71.2]), KEY, {}, ErrorCode.VALUE_NESTED),
    ("values-nested", body(value=_DROP, values=[[1.0], 2.0]), KEY, N2, ErrorCode.VALUE_NESTED),
    ("value-nan", body(value=math.nan), KEY, {}, ErrorCode.VALUE_NOT_FINITE),
    ("value-infinity", b'{"device_id":"pump-17","ts":1,"value":Infinity}', KEY, {}, ErrorCode.VALUE_NOT_FINITE),
    ("value-minus-infinity", body(value=-math.inf), KEY, {}, ErrorCode.VALUE_NOT_FINITE),
    ("value-1e999", b'{"device_id":"pump-17","ts":1,"value":1e999}', KEY, {}, ErrorCode.VALUE_NOT_FINITE),
    ("values-nan", body(value=_DROP, values=[1.0, math.nan]), KEY, N2, ErrorCode.VALUE_NOT_FINITE),
    ("value-too-big", body(value=1e13), KEY, {}, ErrorCode.VALUE_OUT_OF_RANGE),
    ("value-below-min", body(value=-5.0), KEY, {"value_min": 0.0}, ErrorCode.VALUE_OUT_OF_RANGE),
    ("value-huge-int", b'{"device_id":"pump-17","ts":1,"value":1' + b"0" * 400 + b"}", KEY, {}, ErrorCode.VALUE_OUT_OF_RANGE),
]


@pytest.mark.parametrize(("value", "key", "kw", "code"), [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
def test_error_classes(value, key, kw, code):
    with pytest.raises(InvalidReading) as info:
        dec(**kw).decode(value, key, NOW)
    assert info.value.code is code
    assert info.value.reason.strip()
    assert len(info.value.reason) < 200
    assert str(info.value).startswith(f"{code}: ")


def test_every_decoder_code_has_a_case():
    covered = {c[-1] for c in ERROR_CASES}
    assert covered == set(ErrorCode) - {ErrorCode.LATE, ErrorCode.NO_RECORD_TIME}  # (not the decoder's)
    assert len(covered) >= 20
    assert all(c.value == c.value.lower() and " " not in c.value for c in ErrorCode)


@pytest.mark.parametrize("field", ["device_id", "ts", "value", "key"])
def test_reason_never_echoes_long_payload(field):
    long = "Q" * 5000
    payload = body(**{field: long}) if field != "key" else body()
    key = {"device_id": b"other", "key": long.encode()}.get(field, KEY)
    with pytest.raises(InvalidReading) as info:
        dec(max_device_id_length=10_000).decode(payload, key, NOW)
    assert "Q" * 101 not in info.value.reason


GOOD_CASES = [
    ("epoch-float", body(), {}, Reading("pump-17", TS, (71.2,))),
    ("epoch-int", body(ts=int(TS), value=71), {}, Reading("pump-17", TS, (71.0,))),
    ("iso-z", body(ts="2025-11-26T19:00:00Z"), {}, Reading("pump-17", TS, (71.2,))),
    ("iso-offset", body(ts="2025-11-26T20:00:00+01:00"), {}, Reading("pump-17", TS, (71.2,))),
    ("iso-naive-utc", body(ts="2025-11-26T19:00:00"), {}, Reading("pump-17", TS, (71.2,))),
    ("iso-fraction", body(ts="2025-11-26T19:00:00.250Z"), {}, Reading("pump-17", TS + 0.25, (71.2,))),
    ("multi", body(value=_DROP, values=[1, -2.5, 3e-9]), {"n_features": 3}, Reading("pump-17", TS, (1.0, -2.5, 3e-9))),
    ("values-one-channel", body(value=_DROP, values=[4.5]), {}, Reading("pump-17", TS, (4.5,))),
    ("extra-fields", body(site="north", meta={"fw": [1, 2]}, unit=None, seq=7), {}, Reading("pump-17", TS, (71.2,))),
    ("extra-nan-ignored", body(debug=math.nan), {}, Reading("pump-17", TS, (71.2,))),
    ("field-order", b'{"value":71.2,"ts":1764183600.0,"device_id":"pump-17"}', {}, Reading("pump-17", TS, (71.2,))),
    ("whitespace", b' \n{ "device_id" : "pump-17" ,\t"ts":1764183600.0,"value":71.2 }\n', {}, Reading("pump-17", TS, (71.2,))),
    ("escaped-id", b'{"device_id":"pump\\u002d17","ts":1764183600.0,"value":71.2}', {}, Reading("pump-17", TS, (71.2,))),
    ("ts-edge-of-skew", body(ts=NOW + 300.0), {}, Reading("pump-17", NOW + 300.0, (71.2,))),
    ("ts-zero", body(ts=0), {}, Reading("pump-17", 0.0, (71.2,))),
    ("value-at-bounds", body(value=-10.0), {"value_min": -10.0, "value_max": 10.0}, Reading("pump-17", TS, (-10.0,))),
    ("huge-int-value-in-range", b'{"device_id":"pump-17","ts":1764183600,"value":123456789012345678901234567890}',
     {"value_max": 1e30}, Reading("pump-17", TS, (1.2345678901234568e29,))),
]


@pytest.mark.parametrize(("value", "kw", "expected"), [c[1:] for c in GOOD_CASES], ids=[c[0] for c in GOOD_CASES])
def test_good_readings(value, kw, expected):
    d = dec(**kw)
    r = d.decode(value, KEY, NOW)
    assert r == expected
    assert type(r.ts) is float and all(type(v) is float for v in r.values)
    assert d._careful(value, KEY, NOW) == r  # the fast path agrees with the careful one


def test_unicode_device_id():
    dev = "Pumpe-Süd/α 7"
    r = dec().decode(encode_reading(dev, TS, [1.0]), dev.encode(), NOW)
    assert r.device_id == dev


def test_reading_is_frozen_and_hashable():
    r = dec().decode(body(), KEY, NOW)
    with pytest.raises(AttributeError):
        r.ts = 0.0  # type: ignore[misc]
    assert hash(r) == hash(Reading("pump-17", TS, (71.2,)))


@pytest.mark.parametrize("values", [[71.2], [0.1, -1e-300, 123456.789012345678], [1e11, -1e11, 5e-324, 0.0]])
def test_encode_decode_round_trip(values):
    ts = TS + 0.123456789
    d = dec(n_features=len(values))
    r = d.decode(encode_reading("dev-1", ts, values), b"dev-1", NOW)
    assert r == Reading("dev-1", ts, tuple(values))


def test_encode_reading_nan_is_dead_lettered():
    with pytest.raises(InvalidReading) as info:
        dec().decode(encode_reading("a", TS, [math.nan]), b"a", NOW)
    assert info.value.code is ErrorCode.VALUE_NOT_FINITE


def test_invalid_reading_pickles():
    e = pickle.loads(pickle.dumps(InvalidReading(ErrorCode.BAD_TS, "ts 'x' is not ISO-8601")))
    assert e.code is ErrorCode.BAD_TS and e.reason == "ts 'x' is not ISO-8601"


def test_an_out_of_range_reason_shows_the_number_itself():
    # "%g" rounded it: "value=1e+12 is outside [-1e+12, 1e+12]" contradicted itself.
    with pytest.raises(InvalidReading, match=r"value=1000000100000\.0 is outside \[-1e\+12, 1e\+12\]"):
        dec().decode(body(value=1.0000001e12), KEY, NOW)
