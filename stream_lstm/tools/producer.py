"""Rate-controlled production of readings into the input topic, with a progress line."""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Iterable

from stream_lstm.config import Settings
from stream_lstm.kafka.clients import make_producer
from stream_lstm.messages import encode_reading


class Progress:
    """One updating line on stderr: count, rate, elapsed (only when stderr is a terminal,
    else a line every few seconds)."""

    def __init__(self, label: str, total: int | None = None, enabled: bool = True) -> None:
        self.label, self.total, self.enabled = label, total, enabled
        self.t0 = self.last = time.monotonic()
        self.tty = sys.stderr.isatty()

    def update(self, done: int, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self.last < (0.2 if self.tty else 5.0)):
            return
        self.last = now
        rate = done / max(now - self.t0, 1e-9)
        total = f"/{self.total:,}" if self.total else ""
        line = f"{self.label}: {done:,}{total} readings, {rate:,.0f}/s, {now - self.t0:.0f}s"
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def close(self, done: int) -> None:
        self.update(done, force=True)
        if self.enabled and self.tty:
            print(file=sys.stderr)


def produce(settings: Settings, readings: Iterable[tuple[str, float, list[float]]], *,
            topic: str | None = None, rate: float | None = None,
            pace: Iterable[float] | None = None, total: int | None = None,
            progress: bool = True, label: str = "produced") -> int:
    """Send readings keyed by device id; returns how many were sent.

    ``rate`` caps readings per second (scheduled send times, so it does not drift); ``pace``
    instead gives, per reading, the seconds after the start when it is due (for replays).
    SIGINT/SIGTERM stop it cleanly after flushing.
    """
    topic = topic or settings.input_topic
    producer = make_producer(settings, linger_ms=10)
    stop = {"now": False}
    previous = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]

    def on_signal(*_: object) -> None:
        stop["now"] = True

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, on_signal)
    bar = Progress(label, total, progress)
    sent, t0 = 0, time.monotonic()
    due = iter(pace) if pace is not None else None
    try:
        for dev, ts, values in readings:
            if stop["now"]:
                break
            if rate:
                due_at = t0 + sent / rate
            elif due is not None:
                due_at = t0 + next(due)
            else:
                due_at = 0.0
            wait = due_at - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            producer.send(topic, encode_reading(dev, ts, values), key=dev.encode())
            sent += 1
            bar.update(sent)
    finally:
        producer.flush()
        producer.close()
        for s, h in zip((signal.SIGINT, signal.SIGTERM), previous, strict=True):
            signal.signal(s, h)
        bar.close(sent)
    return sent
