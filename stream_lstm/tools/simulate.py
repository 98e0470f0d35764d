"""``stream-lstm simulate``: produce a synthetic fleet into the input topic at a set rate."""

from __future__ import annotations

import argparse
import itertools
import sys
import time

from stream_lstm.config import load_settings
from stream_lstm.tools.fleet import Fleet
from stream_lstm.tools.producer import produce


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Produce a realistic synthetic fleet (daily seasonality, noise, drift, gaps, occasional "
        "anomalies) into STREAM_LSTM_INPUT_TOPIC at a controlled rate."
    )
    parser.add_argument("--devices", type=int, default=100, help="number of devices (default 100)")
    parser.add_argument("--rate", type=float, default=100.0,
                        help="readings per second, all devices together (default 100)")
    parser.add_argument("--messages", type=int, default=0, help="stop after this many (0: never)")
    parser.add_argument("--duration", type=float, default=0.0, help="stop after these seconds")
    parser.add_argument("--step-s", type=float, default=60.0, help="event-time step per device")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--as-fast-as-possible", action="store_true", help="no rate limit")
    parser.add_argument("--topic", default=None, help="override the input topic")


def fleet_readings(fleet: Fleet, until: float | None):
    while until is None or time.monotonic() < until:
        yield from fleet.take(1)


def main(args: argparse.Namespace) -> int:
    settings = load_settings()
    fleet = Fleet(args.devices, seed=args.seed, step_s=args.step_s,
                  start_ts=time.time() - args.step_s * 10_000)
    until = time.monotonic() + args.duration if args.duration else None
    readings = fleet_readings(fleet, until)
    if args.messages:
        readings = itertools.islice(readings, args.messages)
    print(f"simulating {args.devices} devices into {args.topic or settings.input_topic} at "
          f"{settings.bootstrap_servers}", file=sys.stderr)
    sent = produce(settings, readings, topic=args.topic,
                   rate=None if args.as_fast_as_possible else args.rate,
                   total=args.messages or None, label="simulate")
    print(f"simulate: sent {sent:,} readings ({len(fleet.anomalies)} injected anomalies)", file=sys.stderr)
    return 0
