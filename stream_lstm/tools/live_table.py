"""The live table of ``stream-lstm up``: forecasts read from the output topic as they arrive,
a few lines a second, every flagged one shown."""

from __future__ import annotations

import json
import math
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from stream_lstm.config import Settings
from stream_lstm.tools.children import say

DEVICE_WIDTH = 24  # the device column (ids often share a prefix: a longer one keeps its end)


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def show_forecasts(settings: Settings, duration: float, should_stop: Callable[[], bool],
                   worker: subprocess.Popen, feed: subprocess.Popen | None = None,
                   feed_log: Path | None = None) -> subprocess.Popen | None:
    """Print forecasts from the output topic as they arrive (a few lines per second); stop
    early, saying why, when the feed fails (its log's end is shown).

    Returns the process whose exit ended the table (the worker, or the feed that failed);
    None when it ended on a stop or after ``duration``.
    """
    from stream_lstm.kafka.clients import make_consumer

    consumer = make_consumer(settings, settings.output_topic,
                             group_id=f"stream-lstm-up-{uuid.uuid4().hex[:6]}",
                             auto_offset_reset="latest", isolation_level="read_committed")
    t_end = time.time() + duration if duration else float("inf")
    shown_at, seen, anomalies, t_status = 0.0, 0, 0, time.time()
    say(f"{'time (UTC)':19}  {'device':{DEVICE_WIDTH}} {'now':>9}  {'next 3 steps (90% interval)':44} p-value")
    ended = None
    try:
        while time.time() < t_end and not should_stop():
            if worker.poll() is not None:
                ended = worker
                break
            if feed is not None and feed.poll() not in (None, 0):
                say(f"the feed exited with code {feed.returncode}; the end of its log:\n"
                    f"{tail(feed_log) if feed_log else ''}")
                ended = feed
                break
            for recs in consumer.poll(timeout_ms=500).values():
                for rec in recs:
                    seen += 1
                    f = json.loads(rec.value)
                    anomalies += bool(f.get("is_anomaly"))
                    if time.time() - shown_at > 0.25 or f.get("is_anomaly"):
                        shown_at = time.time()
                        say(format_forecast(f))
            if time.time() - t_status > 5:
                t_status = time.time()
                say(f"-- {seen} forecasts received, {anomalies} anomalies flagged --")
    finally:
        consumer.close()
    return ended


def decimals(width: float) -> int:
    """Decimals that show an interval ``width`` wide to about two significant digits: a value
    near 1,000 with a narrow interval, or near 0.1, keeps what tells its ends apart.

    >>> decimals(0.7), decimals(2.0), decimals(500.0), decimals(0.0)
    (2, 1, 0, 2)
    """
    if not width > 0 or not math.isfinite(width):
        return 2
    return min(6, max(0, 1 - math.floor(math.log10(width))))


def format_forecast(f: dict) -> str:
    ts = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(f["ts"]))
    d = decimals(f["upper"][0] - f["lower"][0]) if f["upper"] else 2
    steps = " ".join(
        f"{m:.{d}f}[{lo:.{d}f},{hi:.{d}f}]" for m, lo, hi in
        zip(f["forecast"][:3], f["lower"][:3], f["upper"][:3], strict=False)
    )
    # 1 - the likelihood, not the raw score: the flag is this p-value at or below the
    # false-alarm rate, and it means the same on every device (null for a device's first
    # scored readings).
    likelihood = f.get("anomaly_likelihood")
    flag = " ANOMALY" if f.get("is_anomaly") else ""
    dev = f["device_id"]  # (ids often share a prefix and differ at the end: keep the end)
    dev = dev if len(dev) <= DEVICE_WIDTH else "…" + dev[-(DEVICE_WIDTH - 1):]
    return (f"{ts}  {dev:{DEVICE_WIDTH}} {f['value']:9.{d}f}  {steps:44} "
            f"{'-' if likelihood is None else f'{1.0 - likelihood:.0e}'}{flag}")
