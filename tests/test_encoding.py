"""Encoding what the service writes: forecasts (NaN as null, full precision) and DLQ headers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from stream_lstm import encoding
from stream_lstm.encoding import dlq_headers, encode_forecast
from stream_lstm.messages import ErrorCode

TS = 1764183600.0  # 2025-11-26T19:00:00Z


FORECAST = {
    "device_id": "pump-17", "ts": TS, "value": 71.2,
    "forecast": [71.23456789012345, math.nan, 1e-7], "lower": [70.1, -math.inf, 0.0],
    "upper": [72.3, math.inf, 1.0000001234567], "step_s": 60.0, "model_version": "v0003",
    "partition": 3, "offset": 1234567890123, "residual": math.nan, "anomaly_score": 0.123456789123,
    "is_anomaly": False, "reset": True,
}


@pytest.mark.parametrize("encoder", ["default", "std"])
def test_forecast_encoding(encoder):
    enc = encode_forecast if encoder == "default" else encoding._encode_forecast_std
    out = enc(FORECAST)
    assert b"NaN" not in out and b"Infinity" not in out and b" " not in out
    back = json.loads(out)
    assert back["residual"] is None
    assert back["forecast"][1] is None and back["lower"][1] is None and back["upper"][1] is None
    assert back["forecast"][0] == FORECAST["forecast"][0]  # full precision, not 7 digits
    assert back["upper"][2] == pytest.approx(1.0000001234567, abs=1e-12)
    assert back["anomaly_score"] == FORECAST["anomaly_score"]
    for k in ("device_id", "ts", "step_s", "model_version", "partition", "offset", "is_anomaly", "reset"):
        assert back[k] == FORECAST[k]


def test_forecast_encoding_numpy_and_fallbacks():
    rec = {"a": np.array([1.5, np.nan]), "b": np.float64(2.25), "big": 10**30, "t": (1.0, math.inf)}
    back = json.loads(encode_forecast(rec))
    assert back == {"a": [1.5, None], "b": 2.25, "big": 10**30, "t": [1.0, None]}


def test_dlq_headers():
    h = dlq_headers(ErrorCode.KEY_MISMATCH, "key b'x' is not device_id 'y' in UTF-8 — ü", "sensor-readings", 3, 42)
    assert [n for n, _ in h] == ["error.code", "error.reason", "source.topic", "source.partition", "source.offset"]
    assert all(isinstance(v, bytes) for _, v in h)
    d = dict(h)
    assert d["error.code"] == b"key_mismatch"
    assert d["error.reason"].decode("utf-8").endswith("— ü")
    assert (d["source.topic"], d["source.partition"], d["source.offset"]) == (b"sensor-readings", b"3", b"42")
