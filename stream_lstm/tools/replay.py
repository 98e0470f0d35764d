"""``stream-lstm replay``: replay real CSV recordings into the input topic.

Each file is one device (its id defaults to the file name without extension); several files
are merged in timestamp order into one fleet. Readings keep the recording's own timestamps as
event times. ``--speedup X`` paces them by the recording's inter-arrival times divided by X;
``--as-fast-as-possible`` (the default) sends them without waiting.

Timestamps may be ``YYYY-MM-DD HH:MM:SS`` (read as UTC, like NAB and ETT), ISO-8601 (with or
without a UTC offset), or epoch numbers (seconds; milliseconds when larger than 1e11).

The time column is ``timestamp`` (NAB) unless ``--time-column`` names another; a file without
one (ETTh1's is ``date``) uses its first column whose values are times, and says which
(:func:`find_time_column`).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import logging
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from stream_lstm.config import Settings, load_settings

# Epoch numbers above this are milliseconds (1e11 s is the year 5138; 1e11 ms is 1973).
_EPOCH_MS_THRESHOLD = 1e11
DEFAULT_TIME_COLUMN = "timestamp"
# Rows looked at to tell which column holds times, when the file has no `timestamp` column.
_SNIFF_ROWS = 20
# A column of plain numbers is taken for epoch times only under a name that says so.
_TIME_WORDS = {"time", "timestamp", "datetime", "date", "ts", "epoch", "unix"}

#: ``note(column, message)``: told which column was chosen as the time column, and a line saying so.
TimeColumnNote = Callable[[str, str], None]

logger = logging.getLogger(__name__)


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


def find_time_column(header: Sequence[str], rows: Sequence[Sequence[str]],
                     exclude: Sequence[str] = ()) -> str | None:
    """The column of ``header`` that holds times, judged by the first ``rows``; ``None`` if none.

    The first column whose every cell is a date/time text (``2016-07-01 00:00:00``, ISO 8601);
    failing that, the first whose name says time (``ts``, ``epoch``, ``event_time``, ...) and
    whose every cell is an epoch number. Columns in ``exclude`` (the value columns) never count.

    >>> rows = [["2016-07-01 00:00:00", "5.8", "30.5"], ["2016-07-01 01:00:00", "5.7", "27.8"]]
    >>> find_time_column(["date", "HUFL", "OT"], rows)
    'date'
    >>> find_time_column(["value", "ts"], [["1.5", "1388534400"]]), find_time_column(["a", "b"], [["1", "2"]])
    ('ts', None)
    """
    excluded = set(exclude)

    def cells(i: int) -> list[str]:
        return [row[i].strip() if i < len(row) else "" for row in rows]

    def all_times(texts: list[str], numbers: bool) -> bool:
        for text in texts:
            try:
                float(text)
            except ValueError:
                if numbers:
                    return False
            else:
                if not numbers:
                    return False
            try:
                parse_timestamp(text)
            except (ValueError, OverflowError):
                return False
        return bool(texts)

    candidates = [(i, name) for i, name in enumerate(header) if name not in excluded]
    for i, name in candidates:
        if all_times(cells(i), numbers=False):
            return name
    for i, name in candidates:
        if _TIME_WORDS & set(re.findall(r"[a-z]+", name.lower())) and all_times(cells(i), numbers=True):
            return name
    return None


def load_csv(path: str | Path, time_column: str | None = None,
             value_columns: Sequence[str] = ("value",), *,
             note: TimeColumnNote | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(ts [T], values [T, F])`` of one recording, sorted by time.

    Every row is kept: repeated timestamps (NAB's machine temperature file repeats an hour)
    stay, in file order, and the worker ignores the repeats as duplicates.

    ``time_column=None``: ``timestamp`` when the file has it, else the first column whose
    values are times (:func:`find_time_column`); then ``note(column, message)`` is called with
    a line that names it (without ``note``, that line is logged at INFO).

    Raises :class:`ReplayError` (one line) when the file cannot be read, a column is missing
    (the message lists the columns there are; a named time column must be there), no column
    holds times, or a cell is not a time / a number.

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
    >>> _ = p.write_text("date,value\\n2014-01-01 00:05:00,2.5\\n2014-01-01 00:00:00,1\\n")
    >>> load_csv(p, note=lambda column, message: print(message))[0].tolist()
    pump.csv: no column 'timestamp': using 'date', the first column whose values are times (--time-column names another)
    [1388534400.0, 1388534700.0]
    """
    path = Path(path)
    value_columns = list(value_columns)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: tolerate an Excel BOM
            reader = csv.reader(f)
            header = [name.strip() for name in next(reader, [])]
            if not header:
                raise ReplayError(f"{path}: empty file (no header row)")
            missing = [c for c in value_columns if c not in header]
            if time_column is not None and time_column not in header:
                missing.insert(0, time_column)
            if missing:
                names = ", ".join(repr(c) for c in missing)
                raise ReplayError(f"{path}: no column {names} (columns: {', '.join(header)})")
            rows: Iterator[list[str]] = reader
            if time_column is None and DEFAULT_TIME_COLUMN in header:
                time_column = DEFAULT_TIME_COLUMN
            elif time_column is None:
                first = [row for row in itertools.islice(reader, _SNIFF_ROWS) if row]
                rows = itertools.chain(first, reader)
                time_column = find_time_column(header, first, exclude=value_columns)
                if time_column is None:
                    raise ReplayError(
                        f"{path}: no column {DEFAULT_TIME_COLUMN!r}, and no column whose values "
                        f"are times (columns: {', '.join(header)}); name one with --time-column")
                message = (f"{path.name}: no column {DEFAULT_TIME_COLUMN!r}: using {time_column!r}, "
                           "the first column whose values are times (--time-column names another)")
                if note is None:
                    logger.info("%s", message)
                else:
                    note(time_column, message)
            time_at = header.index(time_column)
            value_at = [header.index(c) for c in value_columns]
            times: list[str] = []
            cells: list[list[str]] = []
            for row in rows:
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


def merge_recordings(files: Sequence[str | Path], time_column: str | None = None,
                     value_columns: Sequence[str] = ("value",),
                     device_ids: Sequence[str] | None = None, *,
                     note: TimeColumnNote | None = None) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Several recordings as one fleet in timestamp order.

    Returns ``(device_ids, device_index [N], ts [N], values [N, F])``. Equal timestamps keep
    the order of the files. ``time_column`` and ``note`` as in :func:`load_csv`, per file.
    """
    files = [Path(f) for f in files]
    ids = list(device_ids) if device_ids else [f.stem for f in files]
    if len(ids) != len(files):
        raise ReplayError(f"{len(ids)} device ids for {len(files)} files: give one --device-id per file")
    duplicated = sorted({i for i in ids if ids.count(i) > 1})
    if duplicated:
        raise ReplayError(f"device id {duplicated[0]!r} is used by two files: give each a --device-id")
    loaded = [load_csv(f, time_column, value_columns, note=note) for f in files]
    ts = np.concatenate([t for t, _ in loaded])
    values = np.concatenate([v for _, v in loaded])
    device_index = np.concatenate([np.full(len(t), i) for i, (t, _) in enumerate(loaded)])
    order = np.argsort(ts, kind="stable")  # stable: ties keep file order
    return ids, device_index[order], ts[order], values[order]


def replay_files(settings: Settings, files: Sequence[str | Path], *, time_column: str | None = None,
                 value_columns: Sequence[str] = ("value",), device_ids: Sequence[str] | None = None,
                 speedup: float | None = None, limit: int | None = None, topic: str | None = None,
                 progress: bool = True) -> int:
    """Replay the recordings (merged in time order) into ``topic``; return how many were sent.

    ``speedup``: wait the recording's inter-arrival time divided by it (``None``: as fast as
    possible). ``limit``: send only the first N readings of the merged stream. ``time_column``
    as in :func:`load_csv`.
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
    parser.add_argument("--time-column", default=None, metavar="NAME",
                        help="time column (default: 'timestamp'; in a file without one, the "
                             "first column whose values are times, e.g. ETTh1's 'date')")
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
                                                    args.device_ids, note=stderr_note("replay"))
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


def stderr_note(command: str) -> TimeColumnNote:
    """A :data:`TimeColumnNote` for a command line: the line on stderr, after ``command: ``."""
    return lambda _column, message: print(f"{command}: {message}", file=sys.stderr)


def _utc(epoch: float) -> str:
    return datetime.fromtimestamp(float(epoch), UTC).strftime("%Y-%m-%d %H:%M:%S")
