"""``stream-lstm simulate``: produce a synthetic sensor fleet into the input topic.

Readings (see :mod:`stream_lstm.tools.fleet`) are keyed by device id and sent at a controlled
aggregate rate. The pacing, progress line and clean shutdown live here in :func:`send_readings`,
which ``stream-lstm replay`` reuses.

Pacing uses scheduled send times (reading *i* is due at ``start + i / rate``), not a sleep per
message, so the achieved rate does not drift below the target when sends take time.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TextIO

from stream_lstm.config import Settings, load_settings
from stream_lstm.signals import stop_signals
from stream_lstm.tools import finite_float
from stream_lstm.tools.fleet import Fleet

# A stall longer than this (broker hiccup, laptop asleep) is not made up with a burst: the
# schedule slides forward instead, so consumers never see a flood at many times the rate.
MAX_SCHEDULE_LAG_S = 1.0
# Sleep in short slices so SIGINT/SIGTERM and --duration are honoured during long waits
# (a slow replay can wait minutes between readings).
_SLEEP_SLICE_S = 0.2
# Default event-time range of an open-ended simulation, ending about now (see main()).
_OPEN_ENDED_HISTORY_S = 30 * 86_400.0

Reading = tuple[str, float, Sequence[float]]


class ProgressLine:
    """One updating status line on ``stream`` (stderr): count done, rate, elapsed.

    On a terminal it is redrawn in place (``\\r``) a few times a second; elsewhere (logs, CI)
    a plain line is written every ``log_interval_s`` seconds so logs are not flooded.

    Parameters
    ----------
    label, verb
        What the line says: ``<label>: <count> <verb>, <rate>/s, <elapsed>s``.
    total
        The count expected, shown as ``done/total``; ``None``: unknown.
    enabled
        ``False`` writes nothing.
    stream
        Where the line goes; default stderr.
    log_interval_s
        Seconds between lines when ``stream`` is not a terminal.

    Examples
    --------
    >>> import io
    >>> progress = ProgressLine("readings", total=5000, stream=io.StringIO())  # not a terminal
    >>> progress.update(1000)  # within log_interval_s of the start: nothing written
    >>> progress.finish(5000)
    >>> print(progress.stream.getvalue(), end="")
    readings: 5,000/5,000 sent, .../s, ...s
    """

    def __init__(self, label: str, total: int | None = None, enabled: bool = True,
                 stream: TextIO | None = None, log_interval_s: float = 10.0,
                 verb: str = "sent") -> None:
        self.label, self.total, self.enabled, self.verb = label, total, enabled, verb
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval_s = 0.2 if self.tty else log_interval_s
        self.started = self.last_drawn = time.monotonic()
        self.drawn = False

    def update(self, sent: int, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self.last_drawn < self.interval_s):
            return
        self.last_drawn = now
        elapsed = now - self.started
        of_total = f"/{self.total:,}" if self.total else ""
        line = f"{self.label}: {sent:,}{of_total} {self.verb}, {sent / max(elapsed, 1e-9):,.0f}/s, {elapsed:,.1f}s"
        if self.tty:
            self.stream.write("\r" + line + "\x1b[K")  # \x1b[K clears what a longer line left
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        self.drawn = True

    def finish(self, sent: int) -> None:
        if self.enabled:
            self.update(sent, force=True)
            if self.tty and self.drawn:
                self.stream.write("\n")
                self.stream.flush()


class _StopOnSignal:
    """SIGINT/SIGTERM (and SIGHUP: signals.stop_signals) ask the send loop to stop (it then
    flushes, or stops waiting for the broker's acknowledgements); a second signal aborts."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: list[tuple[int, Any]] = []

    def __enter__(self) -> _StopOnSignal:
        # Signal handlers can only be set from the main thread; elsewhere (a tool embedded in
        # a test or a thread) the caller's own handling applies.
        if threading.current_thread() is threading.main_thread():
            for sig in stop_signals():
                self._previous.append((sig, signal.getsignal(sig)))
                signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame: object) -> None:
        if self.requested:  # flushing hangs (broker gone?): let a second Ctrl-C get out
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *_exc: object) -> None:
        for sig, handler in self._previous:
            signal.signal(sig, handler)


def send_readings(settings: Settings, readings: Iterable[Reading], *, topic: str | None = None,
                  due_after_s: Callable[[int, float], float] | None = None,
                  total: int | None = None, duration_s: float | None = None,
                  progress: bool = True, label: str = "produce") -> int:
    """Send ``(device_id, ts, values)`` readings keyed by device id; return how many the broker acknowledged.

    ``due_after_s(i, ts)`` gives the seconds after the start at which reading ``i`` is due
    (``None``: as fast as possible). Stops after ``total`` readings, after ``duration_s``
    seconds, at the end of ``readings``, or on SIGINT/SIGTERM, and always flushes first.
    Failed deliveries are reported on stderr and not counted, and so are readings the broker
    has not acknowledged :data:`FLUSH_WAIT_S` after the last was sent (or at a stop signal).
    """
    from stream_lstm.encoding import encode_reading
    from stream_lstm.kafka.clients import make_producer

    topic = topic or settings.input_topic
    producer = make_producer(settings)
    failures: list[BaseException] = []
    acked = [0]  # (the producer's sender thread counts: a callback a record)
    bar = ProgressLine(label, total, progress)
    started = time.monotonic()
    deadline = started + duration_s if duration_s else None
    schedule_shift = 0.0
    sent = 0
    flushed = False
    if total is not None:
        readings = itertools.islice(readings, total)
    try:
        with _StopOnSignal() as stop:
            for i, (device_id, ts, values) in enumerate(readings):
                if due_after_s is not None:
                    due = started + schedule_shift + due_after_s(i, ts)
                    now = time.monotonic()
                    if now - due > MAX_SCHEDULE_LAG_S:
                        schedule_shift += now - due
                    while not stop.requested:
                        now = time.monotonic()
                        if now >= due or (deadline is not None and now >= deadline):
                            break
                        limit = deadline - now if deadline is not None else _SLEEP_SLICE_S
                        time.sleep(min(due - now, _SLEEP_SLICE_S, limit))
                if stop.requested or (deadline is not None and time.monotonic() >= deadline):
                    break
                future = producer.send(topic, encode_reading(device_id, ts, values),
                                       key=device_id.encode())
                future.add_errback(failures.append)
                future.add_callback(lambda _meta: acked.__setitem__(0, acked[0] + 1))
                sent += 1
                bar.update(sent)
            flushed = _flush(producer, stop, FLUSH_WAIT_S)
    finally:
        # (a producer left with records no broker took: closed at once, not after 10 s more)
        with contextlib.suppress(Exception):
            producer.close(timeout=10 if flushed else 0)
        bar.finish(acked[0])
    if failures:
        print(f"{label}: {len(failures):,} readings failed to send, e.g. {failures[0]!r}",
              file=sys.stderr)
    if not flushed and (waiting := sent - acked[0] - len(failures)):
        print(f"{label}: {waiting:,} readings sent were not acknowledged by the broker at "
              f"{settings.bootstrap_servers} (is it reachable?); they may or may not have arrived",
              file=sys.stderr)
    return acked[0]


# How long, after the last reading is sent, the broker may take to acknowledge them all: with
# the broker gone mid-run, the flush waited for ever and the first Ctrl-C did nothing (a review).
FLUSH_WAIT_S = 60.0


def _flush(producer: Any, stop: _StopOnSignal, wait_s: float) -> bool:
    """Wait until the broker has acknowledged every reading sent, a stop signal, or ``wait_s``
    seconds; whether it has."""
    from kafka.errors import KafkaTimeoutError

    give_up = time.monotonic() + wait_s
    while True:
        try:
            producer.flush(timeout=0.5)
            return True
        except KafkaTimeoutError:
            if stop.requested or time.monotonic() >= give_up:
                return False


def produce_fleet(settings: Settings, fleet: Fleet, *, rate: float | None = None,
                  total: int | None = None, progress: bool = True, topic: str | None = None,
                  duration_s: float | None = None) -> int:
    """Send ``fleet``'s readings to ``topic`` (default: the input topic); return how many were sent.

    ``rate``: readings per second, all devices together (``None``: as fast as possible).
    ``total`` and ``duration_s`` bound the run; with neither it runs until SIGINT/SIGTERM.
    """
    if rate is not None and rate <= 0:
        raise ValueError("rate must be > 0 (or None for as fast as possible)")
    return send_readings(settings, fleet.stream(), topic=topic, due_after_s=schedule(rate, time.time()),
                         total=total, duration_s=duration_s, progress=progress, label="simulate")


def schedule(rate: float | None, started: float):
    """When reading ``i`` (event time ``ts``) is due, in seconds after ``started`` (the wall
    clock at the start): at ``rate``, and never before its own event time. An open-ended run
    plays its 30 days of history at ``rate``, then runs in real time (a device a reading each
    ``--step-s``): it used to run on into the future, and after ~6 hours at `up`'s rate every
    reading was a dead letter (further ahead than STREAM_LSTM_MAX_FUTURE_SKEW_S).

    >>> due = schedule(10.0, started=1000.0)
    >>> due(5, 900.0), due(5, 1060.0)  # history: by the rate; past the start: not before its time
    (0.5, 60.0)
    """
    def due(i: int, ts: float) -> float:
        return max(0.0 if rate is None else i / rate, ts - started)
    return due


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Produce a synthetic sensor fleet (daily seasonality, noise, drift, gaps, occasional "
        "spikes and level shifts) into STREAM_LSTM_INPUT_TOPIC, keyed by device id, at a "
        "controlled rate. Runs until --duration or --messages is reached, or Ctrl-C.")
    parser.add_argument("--devices", type=int, default=100, help="number of devices (default 100)")
    parser.add_argument("--rate", type=finite_float, default=100.0,
                        help="readings per second, all devices together (default 100)")
    parser.add_argument("--as-fast-as-possible", action="store_true", help="ignore --rate")
    stop = parser.add_mutually_exclusive_group()
    stop.add_argument("--duration", type=finite_float, default=None, metavar="S", help="stop after S seconds")
    stop.add_argument("--messages", type=int, default=None, metavar="M", help="stop after M readings")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed, same fleet)")
    parser.add_argument("--topic", default=None, help="topic (default: STREAM_LSTM_INPUT_TOPIC)")
    parser.add_argument("--drift", type=finite_float, default=0.02,
                        help="random-walk drift per step, in value units (default 0.02)")
    parser.add_argument("--step-s", type=finite_float, default=60.0,
                        help="event-time seconds between a device's readings (default 60)")
    parser.add_argument("--features", type=int, default=None,
                        help="channels per reading (default: STREAM_LSTM_N_FEATURES)")
    parser.add_argument("--device-prefix", default="sim-", help="device id prefix (default sim-)")
    parser.add_argument("--no-progress", action="store_true", help="no progress line")


def planned_steps(devices: int, rate: float | None, messages: int | None,
                  duration: float | None) -> int | None:
    """Time steps a bounded run will cover, or ``None`` when it is open-ended.

    >>> planned_steps(10, 100.0, None, 5.0), planned_steps(10, None, 25, None)
    (50, 3)
    >>> planned_steps(10, None, None, 5.0) is None
    True
    """
    if messages:
        return -(-messages // devices)
    if duration and rate:
        return -(-int(duration * rate) // devices)
    return None


def main(args: argparse.Namespace) -> int:
    settings = load_settings()
    if args.devices < 1 or (args.messages is not None and args.messages < 1) or args.step_s <= 0 \
            or (not args.as_fast_as_possible and args.rate <= 0) or (args.duration is not None and args.duration <= 0) \
            or (args.features is not None and args.features < 1):
        print("simulate: --devices, --messages, --duration, --features, --step-s and --rate must be "
              "positive", file=sys.stderr)
        return 2
    if args.drift < 0:  # (numpy's "scale < 0" otherwise)
        print("simulate: --drift must be 0 or more", file=sys.stderr)
        return 2
    rate = None if args.as_fast_as_possible else args.rate
    topic = args.topic or settings.input_topic
    # Event times end about now, so the worker neither rejects them as too far in the future
    # nor (mostly) as late. An open-ended run starts 30 days back and can run that long in
    # event time before its readings reach the present.
    steps = planned_steps(args.devices, rate, args.messages, args.duration)
    # A fifth more: devices miss readings in their gaps, so --messages takes more steps than
    # planned, and without the margin the last readings lay ahead of now and were held until
    # their time (--as-fast-as-possible: 6,000 readings took 436 s).
    history_s = steps * args.step_s * 1.2 if steps is not None else _OPEN_ENDED_HISTORY_S
    fleet = Fleet(args.devices, seed=args.seed, step_s=args.step_s, start_ts=time.time() - history_s,
                  n_features=settings.n_features if args.features is None else args.features, drift=args.drift,
                  id_prefix=args.device_prefix)
    ensure_topic(settings, topic)
    pace = "as fast as possible" if rate is None else f"{rate:,.0f} readings/s"
    print(f"simulate: {args.devices:,} devices into {topic} at {settings.bootstrap_servers}, {pace}",
          file=sys.stderr)
    started = time.monotonic()
    try:
        sent = produce_fleet(settings, fleet, rate=rate, total=args.messages, topic=topic,
                             duration_s=args.duration, progress=not args.no_progress)
    except Exception as exc:  # noqa: BLE001 - one readable line instead of a traceback
        print(f"simulate: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    elapsed = time.monotonic() - started
    anomalies = fleet.anomalies
    spikes = sum(a.kind == "spike" for a in anomalies)
    print(f"simulate: sent {sent:,} readings from {args.devices:,} devices in {elapsed:,.1f}s "
          f"({sent / max(elapsed, 1e-9):,.0f}/s); injected {spikes} spikes, "
          f"{len(anomalies) - spikes} level shifts, {len(fleet.gaps)} gaps", file=sys.stderr)
    return 0


def ensure_topic(settings: Settings, topic: str) -> None:
    """Create the topic with the worker's partition count if missing (best effort: a client
    without create rights still produces, to a topic that an operator created)."""
    from stream_lstm.kafka.clients import KafkaConnectError
    from stream_lstm.kafka.topics import TopicSpec, ensure_topics

    try:
        ensure_topics(settings, [TopicSpec(topic, settings.topic_partitions)], timeout_s=10.0)
    except KafkaConnectError:
        raise  # no broker there: the command's one line (exit 3), not a note and a second error
    except Exception as exc:  # noqa: BLE001 - e.g. no right to create: produce all the same
        print(f"note: could not check/create topic {topic}: {exc}", file=sys.stderr)
