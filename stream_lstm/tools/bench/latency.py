"""``p50_ms`` / ``p99_ms``: produce-to-forecast latency at about half the sustained rate, with
the p99 bounds of the worker's own batch, commit and inference histograms over the same run."""

from __future__ import annotations

import json
import math
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from stream_lstm.tools.bench.core import send_paced
from stream_lstm.tools.bench.fixture import say
from stream_lstm.tools.bench.live import READER_JOIN_S, assigned_reader


def bench_latency(settings: Any, topic: str, messages: int, result: dict, quick: bool) -> dict:
    """Produce at ~half the sustained rate with ts = now; latency = forecast seen - ts.

    The worker runs as its own process (as in production), so the producer and the reader in
    this process do not compete with it for the interpreter lock.
    """
    import os
    import subprocess
    import sys

    from stream_lstm.encoding import encode_reading
    from stream_lstm.kafka.clients import make_producer
    from stream_lstm.kafka.local_broker import free_port

    rate = 0.5 * (result.get("pipeline_eos_msgs_per_s") or result["pipeline_msgs_per_s"])
    duration = 8.0 if quick else 20.0
    t = f"{topic}-lat"
    s = settings.model_copy(update={
        "input_topic": t, "output_topic": f"{t}-out", "dlq_topic": f"{t}-dlq",
        "group_id": f"bench-lat-{uuid.uuid4().hex[:6]}", "min_history": 1,
        "metrics_port": free_port(), "metrics_host": "127.0.0.1",
        "state_dir": Path(tempfile.mkdtemp())})
    env = dict(os.environ) | s.environment()
    worker = subprocess.Popen([sys.executable, "-m", "stream_lstm.cli", "run"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    reader = assigned_reader(s, s.output_topic, from_end=True)  # (no group join to hang in)
    if reader is None:
        worker.terminate()
        raise RuntimeError(f"no partitions of {s.output_topic} within {READER_JOIN_S:.0f} s")
    lat: list[float] = []
    try:
        # Warm up: wait until the worker answers with forecasts before measuring.
        p = make_producer(s, linger_ms=1)
        deadline = time.time() + 90
        while time.time() < deadline and not reader.poll(timeout_ms=500):
            p.send(t, encode_reading("warm", time.time(), [1.0]), key=b"warm")
            p.flush()
        before = _scrape(s.metrics_port)
        def read_forecasts() -> None:  # while pacing the producer
            for recs in reader.poll(timeout_ms=0).values():
                seen = time.time()
                lat.extend(seen - json.loads(r.value)["ts"] for r in recs)

        send_paced(p, t, rate, seconds=duration, devices=1000, while_waiting=read_forecasts)
        p.flush()
        p.close()
        t_end = time.time() + 5
        while time.time() < t_end:
            for recs in reader.poll(timeout_ms=100).values():
                seen = time.time()
                lat.extend(seen - json.loads(r.value)["ts"] for r in recs)
        # Where the time goes inside the worker, from its own histograms over the same run.
        after = _scrape(s.metrics_port)
        inside = {name: _p99_bound(before, after, name)
                  for name in ("batch_seconds", "commit_seconds", "inference_seconds")}
    finally:
        worker.terminate()
        worker.wait(30)
        reader.close()
    arr = np.array(lat[len(lat) // 10 :]) * 1e3  # skip the first tenth (warm-up)
    p50, p99 = (float(np.percentile(arr, 50)), float(np.percentile(arr, 99))) if len(arr) else (0.0, 0.0)
    say(f"latency at {rate:,.0f} readings/s ({s.processing_guarantee}, worker process): "
         f"p50 {p50:.1f} ms, p99 {p99:.1f} ms over {len(arr):,} forecasts; inside the worker, "
         + ", ".join(f"{name} p99 <= {bound:g} s" for name, bound in inside.items()))
    return {"latency_rate_msgs_per_s": round(rate), "p50_ms": round(p50, 1), "p99_ms": round(p99, 1),
            **{f"worker_{name}_p99_le": bound for name, bound in inside.items()}}


def _scrape(port: int) -> dict[tuple[str, float], float]:
    """``{(histogram, le): cumulative count}`` from a worker's /metrics."""
    import re
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[tuple[str, float], float] = {}
    for m in re.finditer(r'^stream_lstm_(\w+)_bucket\{.*?le="([^"]+)".*\} (\S+)$', text, re.M):
        key = (m.group(1), float(m.group(2)))
        out[key] = out.get(key, 0.0) + float(m.group(3))
    return out


def _p99_bound(before: dict, after: dict, name: str) -> float:
    """The histogram bucket bound under which 99 % of the run's observations fell."""
    bounds = sorted(le for (n, le) in after if n == name)
    counts = [after[(name, le)] - before.get((name, le), 0.0) for le in bounds]
    total = counts[-1] if counts else 0.0
    return next((le for le, c in zip(bounds, counts, strict=True) if total and c >= 0.99 * total),
                math.inf)
