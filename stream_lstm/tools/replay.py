"""``stream-lstm replay``: replay real CSV recordings into the input topic.

Each file becomes one device (its id defaults to the file name); several files are merged in
time order into one fleet. Timing follows the recording, compressed by ``--speedup``.
"""

from __future__ import annotations

import argparse
import csv
import heapq
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from stream_lstm.config import load_settings
from stream_lstm.tools.producer import produce


class CsvError(ValueError):
    """A recording cannot be read; the message says why."""


def parse_time(text: str) -> float:
    """Epoch seconds from ``YYYY-MM-DD HH:MM:SS`` (UTC), ISO-8601, or an epoch number."""
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    dt = datetime.fromisoformat(text)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def load_csv(path: Path, time_column: str = "timestamp",
             value_columns: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(ts [T], values [T, F])`` of a recording, sorted by time.

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "x.csv"
    >>> _ = p.write_text("timestamp,value\\n2014-01-01 00:05:00,2.5\\n2014-01-01 00:00:00,1\\n")
    >>> ts, v = load_csv(p)
    >>> ts.tolist(), v[:, 0].tolist()
    ([1388534400.0, 1388534700.0], [1.0, 2.5])
    """
    value_columns = value_columns or ["value"]
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            cols = reader.fieldnames or []
            missing = [c for c in [time_column, *value_columns] if c not in cols]
            if missing:
                raise CsvError(f"{path}: no column {', '.join(missing)} (columns: {', '.join(cols)})")
            rows = [(parse_time(r[time_column]), [float(r[c]) for c in value_columns]) for r in reader]
    except OSError as exc:
        raise CsvError(f"{path}: {exc.strerror}") from None
    except ValueError as exc:
        if isinstance(exc, CsvError):
            raise
        raise CsvError(f"{path}: {exc}") from None
    rows.sort(key=lambda r: r[0])
    return np.array([r[0] for r in rows]), np.array([r[1] for r in rows], np.float64).reshape(len(rows), -1)


def merged_readings(files: list[Path], time_column: str, value_columns: list[str],
                    device_ids: list[str] | None = None, limit: int = 0):
    """Readings of all files, merged in time order: ``(device_id, ts, values)``."""
    streams = []
    for i, path in enumerate(files):
        ts, values = load_csv(path, time_column, value_columns)
        if limit:
            ts, values = ts[:limit], values[:limit]
        dev = device_ids[i] if device_ids else path.stem
        streams.append([(float(t), dev, v.tolist()) for t, v in zip(ts, values, strict=True)])
    return [(dev, t, v) for t, dev, v in heapq.merge(*streams)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "Replay CSV recordings into STREAM_LSTM_INPUT_TOPIC (several files = a fleet)."
    parser.add_argument("files", nargs="+", type=Path, help="CSV files, e.g. ../shared/data/nab/...")
    parser.add_argument("--time-column", default="timestamp")
    parser.add_argument("--value-column", action="append", dest="value_columns",
                        help="value column(s); repeat for multi-channel (default: value)")
    parser.add_argument("--device-id", action="append", dest="device_ids",
                        help="device id per file (default: the file name)")
    pace = parser.add_mutually_exclusive_group()
    pace.add_argument("--speedup", type=float, default=0.0,
                      help="play the recording's own timing X times faster")
    pace.add_argument("--as-fast-as-possible", action="store_true", help="no pacing (default)")
    parser.add_argument("--limit", type=int, default=0, help="first N rows of each file")
    parser.add_argument("--topic", default=None, help="override the input topic")


def main(args: argparse.Namespace) -> int:
    settings = load_settings()
    try:
        readings = merged_readings(args.files, args.time_column, args.value_columns or ["value"],
                                   args.device_ids, args.limit)
    except CsvError as exc:
        print(f"replay: {exc}", file=sys.stderr)
        return 2
    pace = None
    if args.speedup and readings:
        t0 = readings[0][1]
        pace = [(ts - t0) / args.speedup for _, ts, _ in readings]
    print(f"replaying {len(readings):,} readings from {len(args.files)} file(s) into "
          f"{args.topic or settings.input_topic} at {settings.bootstrap_servers}", file=sys.stderr)
    sent = produce(settings, readings, topic=args.topic, pace=pace, total=len(readings), label="replay")
    print(f"replay: sent {sent:,} readings", file=sys.stderr)
    return 0
