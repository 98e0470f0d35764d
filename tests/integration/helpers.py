"""Shared helpers for integration tests: produce readings, read topics back, offline reference."""

from __future__ import annotations

import json
import time
import uuid

import numpy as np
import torch

from stream_lstm.config import Settings
from stream_lstm.encoding import encode_reading
from stream_lstm.kafka.clients import make_consumer, make_producer
from stream_lstm.models import SimpleLSTM
from stream_lstm.state.normalizer import normalize_sequence


def produce_readings(settings: Settings, topic: str, readings) -> None:
    """readings: iterable of (device_id, ts, value or list of values)."""
    producer = make_producer(settings)
    for dev, ts, value in readings:
        vals = value if isinstance(value, list | tuple) else [value]
        producer.send(topic, encode_reading(dev, ts, vals), key=dev.encode())
    producer.flush()
    producer.close()


def read_topic(settings: Settings, topic: str, expect: int | None = None, timeout_s: float = 60,
               idle_s: float = 3.0, committed: bool = True) -> list:
    """Every record of ``topic`` (read_committed by default), from the beginning."""
    consumer = make_consumer(
        settings, topic, group_id=f"reader-{uuid.uuid4().hex[:8]}", auto_offset_reset="earliest",
        enable_auto_commit=False,
        isolation_level="read_committed" if committed else "read_uncommitted",
    )
    out, deadline, last_new = [], time.time() + timeout_s, time.time()
    while time.time() < deadline:
        polled = consumer.poll(timeout_ms=300)
        for recs in polled.values():
            out.extend(recs)
            last_new = time.time()
        if expect is not None and len(out) >= expect and time.time() - last_new > 0.5:
            break
        if expect is None and out and time.time() - last_new > idle_s:
            break
    consumer.close()
    return out


def forecasts_by_device(records) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for rec in records:
        f = json.loads(rec.value)
        out.setdefault(f["device_id"], []).append(f)
    for fs in out.values():
        fs.sort(key=lambda f: f["ts"])
    return out


def offline_forecasts(model: SimpleLSTM, x: np.ndarray, settings: Settings):
    """The same model over one device's full history in one sequence: (forecast, mu, scale)."""
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    z, mean, scale = normalize_sequence(x, settings.normalizer, settings.normalizer_alpha,
                                        settings.std_floor)
    with torch.no_grad():
        mu, _, _ = model(torch.from_numpy(z)[None])
    mu = mu[0].double().numpy()
    t = settings.target_channel
    return x[:, t, None] + scale[:, t, None] * mu, mu, scale[:, t]


def assert_exactly_once_and_continuous(records, history: dict[str, list[float]], model, settings, log_text=""):
    """Each reading has exactly one forecast, and each device's forecasts equal the same model
    run offline over its whole history in one sequence (within 1e-5, normalized units)."""
    fcs = [json.loads(r.value) for r in records]
    keys = [(f["partition"], f["offset"]) for f in fcs]
    assert len(keys) == len(set(keys)), "a forecast was published twice"
    expected = sum(len(v) for v in history.values())
    assert len(fcs) == expected, f"{expected - len(fcs)} readings have no forecast\n{log_text[-3000:]}"
    by_dev: dict[str, list[dict]] = {}
    for f in fcs:
        by_dev.setdefault(f["device_id"], []).append(f)
    for dev, xs in history.items():
        got = sorted(by_dev[dev], key=lambda f: f["ts"])
        x = np.array(xs)
        _, mu_ref, scale = offline_forecasts(model, x, settings)
        fc = np.array([f["forecast"] for f in got])
        np.testing.assert_allclose((fc - x[:, None]) / scale[:, None], mu_ref, atol=1e-5, err_msg=dev)
    return by_dev
