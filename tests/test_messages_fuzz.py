"""Fuzzing the reading decoder: whatever the bytes and key, it returns a valid Reading or raises
InvalidReading, and its fast path agrees with its careful path.

Profiles (chosen here, not globally, so other test modules keep their own settings):

* default: ~300 examples per test, a few seconds in all;
* ``HYPOTHESIS_PROFILE=fuzz``: 25,000 examples per test over 5 tests (125k payloads), e.g.
  ``HYPOTHESIS_PROFILE=fuzz pytest -s tests/test_messages_fuzz.py`` (``-s`` prints the count).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import unicodedata

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stream_lstm import messages
from stream_lstm.config import Settings
from stream_lstm.encoding import encode_reading
from stream_lstm.messages import ErrorCode, InvalidReading, Reading, ReadingDecoder

settings.register_profile(
    "messages-default", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "fuzz", max_examples=25_000, deadline=None, suppress_health_check=list(HealthCheck)
)
PROFILE = settings.get_profile("fuzz" if os.environ.get("HYPOTHESIS_PROFILE") == "fuzz" else "messages-default")

NOW = 1764183600.0
DECODERS = [
    ReadingDecoder(Settings()),
    ReadingDecoder(Settings(n_features=3, max_device_id_length=8, value_min=-100.0, value_max=100.0)),
    ReadingDecoder(Settings(max_message_bytes=64, max_future_skew_s=1.0)),
]
LOADERS = [messages._fast_loads_std] + ([messages.orjson.loads] if messages.orjson is not None else [])
PAYLOADS = {"n": 0}


@pytest.fixture(scope="module", autouse=True)
def _report():
    t0 = time.perf_counter()
    yield
    print(f"\n[messages fuzz] {PAYLOADS['n']} payloads decoded in {time.perf_counter() - t0:.1f}s", file=sys.stderr)


def check(dec: ReadingDecoder, value: bytes | None, key: bytes | None, now: float = NOW) -> Reading | None:
    """Decode with every fast-path parser and the careful path; check they agree and the invariants."""
    PAYLOADS["n"] += 1
    outcomes = []
    saved = messages._fast_loads
    try:
        for loader in LOADERS:
            messages._fast_loads = loader
            outcomes.append(_outcome(dec.decode, value, key, now))
    finally:
        messages._fast_loads = saved
    outcomes.append(_outcome(dec._careful, value, key, now))
    assert all(o == outcomes[0] for o in outcomes), (value, key, outcomes)
    r = outcomes[0]
    if isinstance(r, Reading):
        _assert_invariants(dec, r, key, now)
        return r
    return None


def _outcome(fn, value, key, now) -> Reading | ErrorCode:
    try:
        return fn(value, key, now)
    except InvalidReading as e:  # anything else fails the test
        assert isinstance(e.code, ErrorCode) and e.code is not ErrorCode.LATE
        assert e.reason and len(e.reason) < 300
        return e.code


def _assert_invariants(dec: ReadingDecoder, r: Reading, key: bytes | None, now: float) -> None:
    assert type(r.device_id) is str and 0 < len(r.device_id) <= dec.max_id
    assert not any(unicodedata.category(c) in ("Cc", "Cs") for c in r.device_id)
    assert key == r.device_id.encode("utf-8")
    assert type(r.ts) is float and math.isfinite(r.ts) and 0.0 <= r.ts <= now + dec.max_skew
    assert type(r.values) is tuple and len(r.values) == dec.n_features
    for v in r.values:
        assert type(v) is float and math.isfinite(v) and dec.lo <= v <= dec.hi


decoders = st.sampled_from(DECODERS)
device_ids = st.one_of(
    st.sampled_from(["pump-17", "a", "Pumpe-Süd", "x" * 9, ""]),
    st.text(max_size=12),
)
numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-200, max_value=200),
    st.integers(),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.sampled_from([0, -0.0, 1e12, -1e12, 1e12 + 1, 5e-324, 2**53 + 1, 2**64, -(2**63)]),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, st.text(max_size=20),
                    st.sampled_from(["71.2", "nan", "1e999", "2025-11-26T19:00:00Z", "2025-11-26T19:00:00+01:00",
                                     "2025-11-26", "9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00+05:00"]))
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12,
)
timestamps = st.one_of(json_values, st.floats(min_value=0, max_value=NOW + 400),
                       st.integers(min_value=-5, max_value=int(NOW) + 400))


def keys_for(device_id: object):
    """Mostly the matching key, sometimes none, another id or raw bytes."""
    own = device_id.encode("utf-8", "surrogatepass") if isinstance(device_id, str) else b"x"
    return st.one_of(st.just(own), st.just(own), st.none(), st.binary(max_size=12), device_ids.map(str.encode))


@st.composite
def reading_like(draw):
    """A dict shaped like a reading, each field maybe missing, wrong, or fine."""
    dec = draw(decoders)
    obj: dict[str, object] = {}
    dev = draw(st.one_of(device_ids, json_values))
    if draw(st.integers(0, 9)):
        obj["device_id"] = dev
    if draw(st.integers(0, 9)):
        obj["ts"] = draw(timestamps)
    which = draw(st.sampled_from(["value", "values", "both", "none"]))
    if which in ("value", "both"):
        obj["value"] = draw(st.one_of(numbers, json_values))
    if which in ("values", "both"):
        n = draw(st.sampled_from([dec.n_features, dec.n_features, 0, 1, 2, 3, 4]))
        obj["values"] = draw(st.one_of(st.lists(st.one_of(numbers, numbers, json_values), min_size=n, max_size=n),
                                       json_values))
    obj.update(draw(st.dictionaries(st.text(max_size=6), json_values, max_size=2)))
    return dec, obj, draw(keys_for(dev))


@PROFILE
@given(dec=decoders, value=st.one_of(st.none(), st.binary(max_size=200)), key=st.one_of(st.none(), st.binary(max_size=16)))
def test_arbitrary_bytes(dec, value, key):
    check(dec, value, key)


@PROFILE
@given(dec=decoders, doc=json_values, key=st.one_of(st.none(), st.binary(max_size=8), st.just(b"pump-17")))
def test_arbitrary_json(dec, doc, key):
    check(dec, json.dumps(doc).encode("utf-8", "surrogatepass"), key)


@PROFILE
@given(case=reading_like(), compact=st.booleans(), now=st.sampled_from([NOW, 0.0, NOW + 1e6]))
def test_reading_shaped_objects(case, compact, now):
    dec, obj, key = case
    text = json.dumps(obj, separators=(",", ":") if compact else None, ensure_ascii=compact)
    check(dec, text.encode("utf-8", "surrogatepass"), key, now)


good_readings = st.builds(
    lambda dev, ts, vals: (dev, ts, vals),
    st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=8),
    st.one_of(st.floats(0, NOW), st.integers(0, int(NOW))),
    st.lists(st.floats(-100, 100), min_size=1, max_size=3),
)
tokens = st.sampled_from([b'"', b"\\", b",", b":", b"{", b"}", b"[", b"]", b"NaN", b"-Infinity", b"true", b"null",
                          b'"1"', b"1e999", b"\x00", b"\xff", b"\xc3", b'"value":1,', b'"ts":"2025-11-26T19:00:00Z",',
                          b'"device_id":"a",', b" ", b"\\u0000", b"\\ud800", b"0" * 30])


@st.composite
def mutated(draw):
    dev, ts, vals = draw(good_readings)
    payload = bytearray(encode_reading(dev, ts, vals))
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["flip", "delete", "insert", "truncate", "duplicate"]))
        i = draw(st.integers(0, len(payload)))
        if op == "flip" and i < len(payload):
            payload[i] = draw(st.integers(0, 255))
        elif op == "delete":
            del payload[i : i + draw(st.integers(1, 8))]
        elif op == "insert":
            payload[i:i] = draw(st.one_of(tokens, st.binary(min_size=1, max_size=4)))
        elif op == "truncate":
            del payload[i:]
        elif op == "duplicate":
            j = draw(st.integers(i, len(payload)))
            payload[j:j] = payload[i:j]
    key = draw(st.one_of(st.just(dev.encode()), st.just(dev.encode()), st.none(), st.binary(max_size=8)))
    return bytes(payload), key, len(vals)


@PROFILE
@given(case=mutated())
def test_mutated_valid_readings(case):
    payload, key, n = case
    check(ReadingDecoder(Settings(n_features=n, value_min=-100, value_max=100)), payload, key)


@PROFILE
@given(reading=good_readings, spaces=st.booleans(), extra=st.dictionaries(st.text(max_size=5), json_values, max_size=2))
def test_valid_readings_round_trip(reading, spaces, extra):
    dev, ts, vals = reading
    obj = json.loads(encode_reading(dev, ts, vals))
    obj.update({k: v for k, v in extra.items() if k not in ("device_id", "ts", "value", "values")})
    text = json.dumps(obj, separators=(", ", ": ") if spaces else (",", ":"))
    dec = ReadingDecoder(Settings(n_features=len(vals), value_min=-100, value_max=100))
    r = check(dec, text.encode(), dev.encode())
    assert r == Reading(dev, float(ts), tuple(vals))
