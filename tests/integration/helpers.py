"""Shared helpers for integration tests: produce readings, read topics back, offline reference."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import numpy as np
import torch

from stream_lstm import experts
from stream_lstm.config import Settings
from stream_lstm.encoding import encode_reading
from stream_lstm.forecast import interval_quantile
from stream_lstm.kafka.clients import make_consumer, make_producer
from stream_lstm.models import SimpleLSTM
from stream_lstm.state.normalizer import normalize_sequence


def signal_once_ready(argv: list[str], env: dict[str, str], ready: Callable[[str], bool],
                      sig: int) -> tuple[int, str]:
    """Run ``python -m stream_lstm.cli *argv``, send ``sig`` once a line of its stderr is
    ``ready``; its exit code and the stderr after that line (killed if it hangs for a minute)."""
    proc = subprocess.Popen([sys.executable, "-m", "stream_lstm.cli", *argv], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:  # type: ignore[union-attr]
            if ready(line):
                break
        proc.send_signal(sig)
        rest: list[str] = []  # (the file's own buffer first: what came with the ready line)
        reader = threading.Thread(target=lambda: rest.append(proc.stderr.read()), daemon=True)  # type: ignore[union-attr]
        reader.start()
        reader.join(60)  # (a child that hangs after the signal is killed below)
        return proc.wait(timeout=1 if reader.is_alive() else 60), "".join(rest)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def tiny_worker_settings(settings_factory, topic: str, **kw) -> Settings:
    """Settings for a worker on ``topic`` and its own output, DLQ and group, with a tiny model
    (window 8, hidden 8, horizon 2) for tests that exercise the worker, not the forecasts."""
    base = {"input_topic": topic, "output_topic": f"{topic}-out", "dlq_topic": f"{topic}-dlq",
            "group_id": f"{topic}-g", "window": 8, "hidden_size": 8, "horizon": 2}
    return settings_factory(**(base | kw))


def guarantee_settings(settings_factory, topic: str, **kw) -> Settings:
    """The settings a user runs (every default: model size, history, polls, timeouts), on
    ``topic`` with its own output, DLQ and group, for the guarantee tests (crash, rebalance,
    outage, continuity). ``kw`` is for infrastructure only (partitions, a model path, the
    guarantee under test), never to make the test easier."""
    base = {"input_topic": topic, "output_topic": f"{topic}-out", "dlq_topic": f"{topic}-dlq",
            "group_id": f"{topic}-g"}
    return settings_factory(**(base | kw))


def published(history: dict[str, list], settings: Settings) -> int:
    """How many forecasts a worker publishes for ``history``: one per reading from each
    device's ``min_history``-th on (the readings before are its warm-up)."""
    return sum(max(0, len(v) - settings.min_history + 1) for v in history.values())


def wait_for(condition, what: str, timeout_s: float = 60.0) -> None:
    """Until ``condition()`` holds (polled every 20 ms); fails saying ``what`` it waited for."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"waited {timeout_s:g} s for {what}"
        time.sleep(0.02)


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
    """Every record of ``topic`` (read_committed by default), from the beginning.

    Every partition assigned by hand once the reader's own metadata has them, in no group: a
    group joined before the worker created the topic was assigned nothing, and kafka-python
    looks again only at its next metadata refresh (5 minutes), so a loaded machine read 0
    forecasts in a minute (test_cold_start, twice in one run even after the admin client
    listed the topic: the group's assignor found no partition metadata for it yet)."""
    from kafka.structs import TopicPartition

    deadline = time.time() + timeout_s
    consumer = make_consumer(
        settings, group_id=None, auto_offset_reset="earliest", enable_auto_commit=False,
        isolation_level="read_committed" if committed else "read_uncommitted",
        allow_auto_create_topics=False,  # (asking must not create it before its writer does)
    )
    while not (parts := consumer.partitions_for_topic(topic)) and time.time() < deadline:
        time.sleep(0.1)  # (polling the broker for the topic's partitions: the event waited for)
    if not parts:  # (never made within the time)
        consumer.close()
        return []
    consumer.assign([TopicPartition(topic, p) for p in sorted(parts)])
    out, last_new = [], time.time()
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


def served_forecasts(model: SimpleLSTM, x: np.ndarray, settings: Settings,
                     rewarm: tuple[SimpleLSTM, int] | None = None):
    """What the worker publishes for one device's whole history, computed in one uninterrupted
    pass of the recursions forecast.py documents (the model's change, the blend with
    persistence, the interval calibration and the one-step experts), with the default
    settings or any others: ``(forecast [T, H], scale b [T, H], normalizer scale [T])``.

    ``rewarm=(new, k)``: a hot swap re-warmed the device before its reading ``k``: its h/c
    replayed from zero over its window (the last W readings) under ``new``, which steps it
    from there on."""
    s, H = settings, settings.horizon
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    z, mean, scale = normalize_sequence(x, s.normalizer, s.normalizer_alpha, s.std_floor)
    t_ch = s.target_channel
    x, mean, scale = x[:, t_ch], mean[:, t_ch], scale[:, t_ch]
    with torch.no_grad():
        mu, log_b, _ = model(torch.from_numpy(z)[None])
        if rewarm is not None:
            new, k = rewarm
            start = max(0, k - s.window)
            mu_new, log_b_new, _ = new(torch.from_numpy(z[start:])[None])
            mu[:, k:], log_b[:, k:] = mu_new[:, k - start :], log_b_new[:, k - start :]
    mu = mu[0].double().numpy()
    b_model = np.exp(log_b[0].double().numpy()) * scale[:, None]
    q, miss_rate = interval_quantile(s.interval_coverage), 1 - s.interval_coverage
    along = np.arange(H) / max(H - 1, 1)
    w, log_m = np.ones(2), np.zeros(2)
    state = experts.init_state(1) if s.expert_rate else None
    f, blended, b = np.zeros_like(mu), np.zeros_like(mu), np.zeros_like(mu)
    for t in range(len(x)):
        scored_1 = t >= 1 and t + 1 > s.anomaly_warmup
        for col, k, scored in ((0, 1, scored_1), (1, H, t + 1 > s.anomaly_warmup + H)):
            if scored:  # the blend learns from its own forecast, the calibration from the published one
                w[col] = np.clip(w[col] + s.blend_rate * np.sign(x[t] - blended[t - k, k - 1])
                                 * mu[t - k, k - 1], 0, 1)
                miss = abs(x[t] - f[t - k, k - 1]) > q * b[t - k, k - 1]
                log_m[col] += s.interval_adapt_rate * (miss - miss_rate)
        blended[t] = x[t] + scale[t] * mu[t] * (w[0] + along * (w[1] - w[0]))
        f[t] = blended[t]
        if state is not None:
            one = experts.step(state, np.array([scored_1]), x[t : t + 1], mean[t : t + 1],
                               scale[t : t + 1], mu[t : t + 1, 0], blended[t : t + 1, 0],
                               rate=s.expert_rate)
            f[t] += (one[0] - blended[t, 0]) * (1 - along)
        b[t] = b_model[t] * np.exp(log_m[0] + along * (log_m[1] - log_m[0]))
    return f, b, scale


# Published forecasts against served_forecasts, in the device's normalized units: the experts'
# float64 recursions agree to about 1e-9 here; 1e-5 leaves room for float32 h/c.
ATOL_NORMALIZED = 1e-5


def assert_exactly_once_and_continuous(records, history: dict[str, list[float]], model, settings, log_text=""):
    """Each reading from a device's ``min_history``-th on has exactly one forecast, and each
    device's forecasts equal what an uninterrupted worker publishes (served_forecasts, within
    ATOL_NORMALIZED)."""
    fcs = [json.loads(r.value) for r in records]
    keys = [(f["partition"], f["offset"]) for f in fcs]
    assert len(keys) == len(set(keys)), "a forecast was published twice"
    expected = published(history, settings)
    assert len(fcs) == expected, f"{expected - len(fcs)} readings have no forecast\n{log_text[-3000:]}"
    by_dev: dict[str, list[dict]] = {}
    for f in fcs:
        by_dev.setdefault(f["device_id"], []).append(f)
    for dev, xs in history.items():
        got = sorted(by_dev[dev], key=lambda f: f["ts"])
        x = np.array(xs)
        ref, _, scale = served_forecasts(model, x, settings)
        warm = settings.min_history - 1  # the first forecast is for this reading
        assert len(got) == len(xs) - warm, dev
        fc = np.array([f["forecast"] for f in got])
        np.testing.assert_allclose((fc - ref[warm:]) / scale[warm:, None], 0.0, atol=ATOL_NORMALIZED,
                                   err_msg=dev)
    return by_dev
