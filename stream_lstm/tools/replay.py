"""``stream-lstm replay``: replay real CSV recordings into the input topic.

Each file is one device (its id defaults to the file name without extension); several files
are merged in timestamp order into one fleet. Readings keep the recording's own timestamps as
event times. ``--speedup X`` paces them by the recording's inter-arrival times divided by X;
``--as-fast-as-possible`` (the default) sends them without waiting.

Timestamps may be ``YYYY-MM-DD HH:MM:SS`` (read as UTC, like NAB and ETT), ISO-8601 (with or
without a UTC offset), or epoch numbers (seconds; milliseconds when larger than 1e11).
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from stream_lstm.config import Settings, load_settings

# Epoch numbers above this are milliseconds (1e11 s is the year 5138; 1e11 ms is 1973).
_EPOCH_MS_THRESHOLD = 1e11


class ReplayError(ValueError):
    """A recording cannot be replayed; the message is one line that says why."""


def parse_timestamp(text: str) -> float:
    """Epoch seconds of a timestamp; a time without a UTC offset is UTC.

    >>> parse_timestamp("2013-12-02 21:15:00")
    1386018900.0
    >>> parse_timestamp("2013-12-02T22:15:00+01:00"), parse_timestamp("1386018900")
    (1386018900.0, 1386018900.0)
    >>> parse_timestamp("1386018900000")      # milliseconds
    1386018900.0
    """
    text = text.strip()
    try:
        number = float(text)
    except ValueError:
        pass
    else:
        return number / 1000.0 if abs(number) > _EPOCH_MS_THRESHOLD else number
    parsed = datetime.fromisoformat(text)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def load_csv(path: str | Path, time_column: str = "timestamp",
             value_columns: Sequence[str] = ("value",)) -> tuple[np.ndarray, np.ndarray]:
    """``(ts [T], values [T, F])`` of one recording, sorted by time.

    Every row is kept: repeated timestamps (NAB's machine temperature file repeats an hour)
    stay, in file order, and the worker ignores the repeats as duplicates.

    Raises :class:`ReplayError` (one line) when the file cannot be read, a column is missing
    (the message lists the columns there are), or a cell is not a time / a number.

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "pump.csv"
    >>> _ = p.write_text("timestamp,value\\n2014-01-01 00:05:00,2.5\\n2014-01-01 00:00:00,1\\n")
    >>> ts, values = load_csv(p)
    >>> ts.tolist(), values.tolist()
    ([1388534400.0, 1388534700.0], [[1.0], [2.5]])
    >>> load_csv(p, value_columns=["temp"])
    Traceback (most recent call last):
    ...
    stream_lstm.tools.replay.ReplayError: ...pump.csv: no column 'temp' (columns: timestamp, value)
    """
    path = Path(path)
    value_columns = list(value_columns)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: tolerate an Excel BOM
            reader = csv.reader(f)
            header = [name.strip() for name in next(reader, [])]
            if not header:
                raise ReplayError(f"{path}: empty file (no header row)")
            missing = [c for c in [time_column, *value_columns] if c not in header]
            if missing:
                names = ", ".join(repr(c) for c in missing)
                raise ReplayError(f"{path}: no column {names} (columns: {', '.join(header)})")
            time_at = header.index(time_column)
            value_at = [header.index(c) for c in value_columns]
            times: list[str] = []
            cells: list[list[str]] = []
            for row in reader:
                if not row:  # blank line
                    continue
                times.append(row[time_at] if time_at < len(row) else "")
                cells.append([row[i] if i < len(row) else "" for i in value_at])
    except OSError as exc:
        raise ReplayError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ReplayError(f"{path}: not a readable CSV file: {exc}") from None
    ts = np.empty(len(times))
    for i, text in enumerate(times):
        try:
            ts[i] = parse_timestamp(text)
        except ValueError:
            raise ReplayError(f"{path}: line {i + 2}: {time_column}={text!r} is not a time") from None
    try:
        values = np.array(cells, dtype=np.float64).reshape(len(cells), len(value_columns))
    except ValueError:
        line, column, text = _first_bad_number(cells, value_columns)
        raise ReplayError(f"{path}: line {line}: {column}={text!r} is not a number") from None
    order = np.argsort(ts, kind="stable")
    return ts[order], values[order]


def _first_bad_number(cells: list[list[str]], columns: list[str]) -> tuple[int, str, str]:
    for i, row in enumerate(cells):
        for column, text in zip(columns, row, strict=True):
            try:
                float(text)
            except ValueError:
                return i + 2, column, text
    return 0, columns[0], ""


def merge_recordings(files: Sequence[str | Path], time_column: str = "timestamp",
                     value_columns: Sequence[str] = ("value",),
                     device_ids: Sequence[str] | None = None) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Several recordings as one fleet in timestamp order.

    Returns ``(device_ids, device_index [N], ts [N], values [N, F])``. Equal timestamps keep
    the order of the files.
    """
    files = [Path(f) for f in files]
    ids = list(device_ids) if device_ids else [f.stem for f in files]
    if len(ids) != len(files):
        raise ReplayError(f"{len(ids)} device ids for {len(files)} files: give one --device-id per file")
    duplicated = sorted({i for i in ids if ids.count(i) > 1})
    if duplicated:
        raise ReplayError(f"device id {duplicated[0]!r} is used by two files: give each a --device-id")
    loaded = [load_csv(f, time_column, value_columns) for f in files]
    ts = np.concatenate([t for t, _ in loaded])
    values = np.concatenate([v for _, v in loaded])
    device_index = np.concatenate([np.full(len(t), i) for i, (t, _) in enumerate(loaded)])
    order = np.argsort(ts, kind="stable")  # stable: ties keep file order
    return ids, device_index[order], ts[order], values[order]


def replay_files(settings: Settings, files: Sequence[str | Path], *, time_column: str = "timestamp",
                 value_columns: Sequence[str] = ("value",), device_ids: Sequence[str] | None = None,
                 speedup: float | None = None, limit: int | None = None, topic: str | None = None,
                 progress: bool = True) -> int:
    """Replay the recordings (merged in time order) into ``topic``; return how many were sent.

    ``speedup``: wait the recording's inter-arrival time divided by it (``None``: as fast as
    possible). ``limit``: send only the first N readings of the merged stream.
    """
    from stream_lstm.tools.simulate import send_readings

    if speedup is not None and speedup <= 0:
        raise ValueError("speedup must be > 0 (or None for as fast as possible)")
    ids, device_index, ts, values = merge_recordings(files, time_column, value_columns, device_ids)
    if limit is not None:
        device_index, ts, values = device_index[:limit], ts[:limit], values[:limit]
    due = None
    if speedup is not None and len(ts):
        first_ts = float(ts[0])
        due = lambda _i, t: (t - first_ts) / speedup  # noqa: E731
    return send_readings(settings, _readings(ids, device_index, ts, values), topic=topic,
                         due_after_s=due, total=len(ts), progress=progress, label="replay")


def _readings(ids: list[str], device_index: np.ndarray, ts: np.ndarray,
              values: np.ndarray) -> Iterator[tuple[str, float, tuple[float, ...]]]:
    for d, t, v in zip(device_index.tolist(), ts.tolist(), values.tolist(), strict=True):
        yield ids[d], t, tuple(v)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Replay CSV recordings into STREAM_LSTM_INPUT_TOPIC, keyed by device id (default: the "
        "file name). Several files are merged in timestamp order, like a fleet.")
    parser.add_argument("files", nargs="+", type=Path, metavar="FILE.csv",
                        help="recordings, e.g. ../shared/data/nab/machine_temperature_system_failure.csv")
    parser.add_argument("--time-column", default="timestamp", help="time column (default timestamp)")
    parser.add_argument("--value-column", action="append", dest="value_columns", metavar="NAME",
                        help="value column; repeat or comma-separate for several channels "
                             "(default: value)")
    parser.add_argument("--device-id", action="append", dest="device_ids", metavar="ID",
                        help="device id, once per file in order (default: the file name)")
    pace = parser.add_mutually_exclusive_group()
    pace.add_argument("--speedup", type=float, default=None, metavar="X",
                      help="keep the recording's timing, X times faster (3600: an hour per second)")
    pace.add_argument("--as-fast-as-possible", action="store_true",
                      help="send without waiting (the default)")
    parser.add_argument("--limit", type=int, default=None, metavar="N",
                        help="send only the first N readings (of all files merged)")
    parser.add_argument("--topic", default=None, help="topic (default: STREAM_LSTM_INPUT_TOPIC)")
    parser.add_argument("--no-progress", action="store_true", help="no progress line")


def main(args: argparse.Namespace) -> int:
    value_columns = [c.strip() for arg in (args.value_columns or ["value"]) for c in arg.split(",") if c.strip()]
    if args.speedup is not None and args.speedup <= 0:
        print("replay: --speedup must be positive", file=sys.stderr)
        return 2
    settings = load_settings()
    try:
        # Load once up front, so a bad file fails before anything is sent.
        ids, device_index, ts, _ = merge_recordings(args.files, args.time_column, value_columns,
                                                    args.device_ids)
    except ReplayError as exc:
        print(f"replay: {exc}", file=sys.stderr)
        return 2
    topic = args.topic or settings.input_topic
    count = len(ts) if args.limit is None else min(len(ts), args.limit)
    pace = f"{args.speedup:g}x speed-up" if args.speedup else "as fast as possible"
    print(f"replay: {count:,} readings of {len(ids)} device(s) into {topic} at "
          f"{settings.bootstrap_servers}, {pace}", file=sys.stderr)
    from stream_lstm.tools.simulate import ensure_topic

    ensure_topic(settings, topic)
    started = time.monotonic()
    try:
        sent = replay_files(settings, args.files, time_column=args.time_column,
                            value_columns=value_columns, device_ids=args.device_ids,
                            speedup=args.speedup, limit=args.limit, topic=topic,
                            progress=not args.no_progress)
    except Exception as exc:  # noqa: BLE001 - one readable line instead of a traceback
        print(f"replay: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    elapsed = time.monotonic() - started
    span = f"{_utc(ts[0])} .. {_utc(ts[count - 1])}" if count else "nothing"
    print(f"replay: sent {sent:,} of {count:,} readings ({span}) in {elapsed:,.1f}s "
          f"({sent / max(elapsed, 1e-9):,.0f}/s)", file=sys.stderr)
    return 0 if sent == count else 1


def _utc(epoch: float) -> str:
    return datetime.fromtimestamp(float(epoch), UTC).strftime("%Y-%m-%d %H:%M:%S")
