"""Real sensor recordings as arrays: one CSV file, one device.

``load_csv`` reads a recording (NAB, ETTh1, or any CSV with a time column) into timestamps and
values, sorted by time. The replay command, the evaluation, and offline training all read
recordings this way, so they agree on what a file holds.

Timestamps may be ``YYYY-MM-DD HH:MM:SS`` (read as UTC, like NAB and ETT), ISO-8601 (with or
without a UTC offset), or epoch numbers (seconds; milliseconds when larger than 1e11). The time
column is ``timestamp`` (NAB) unless one is named; a file without one (ETTh1's is ``date``)
uses its first column whose values are times, and says which (:func:`find_time_column`).
"""

from __future__ import annotations

import csv
import itertools
import logging
import math
import re
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

# Epoch numbers above this are milliseconds (1e11 s is the year 5138; 1e11 ms is 1973).
_EPOCH_MS_THRESHOLD = 1e11
# The times a datetime can name (the years 1 to 9999), in epoch seconds.
_FIRST_TIME, _LAST_TIME = -62_135_596_800.0, 253_402_300_799.0
DEFAULT_TIME_COLUMN = "timestamp"
# Rows looked at to tell which column holds times, when the file has no `timestamp` column.
_SNIFF_ROWS = 20
# A column of plain numbers is taken for epoch times only under a name that says so.
_TIME_WORDS = {"time", "timestamp", "datetime", "date", "ts", "epoch", "unix"}

#: ``note(column, message)``: told which column was chosen as the time column, and a line saying so.
TimeColumnNote = Callable[[str, str], None]

logger = logging.getLogger(__name__)


class RecordingError(ValueError):
    """A recording cannot be read; the message is one line that says why."""


def parse_timestamp(text: str) -> float:
    """Epoch seconds of a timestamp; a time without a UTC offset is UTC.

    >>> parse_timestamp("2013-12-02 21:15:00")
    1386018900.0
    >>> parse_timestamp("2013-12-02T22:15:00+01:00"), parse_timestamp("1386018900")
    (1386018900.0, 1386018900.0)
    >>> parse_timestamp("1386018900000")      # milliseconds
    1386018900.0
    >>> parse_timestamp("nan")
    Traceback (most recent call last):
    ...
    ValueError: 'nan' is not a finite epoch time
    """
    text = text.strip()
    try:
        number = float(text)
    except ValueError:
        pass
    else:
        # float() also reads nan, inf and 1e999: no time, and sorting or differencing them
        # downstream would go quietly wrong.
        if not math.isfinite(number):
            raise ValueError(f"{text!r} is not a finite epoch time")
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

    Raises :class:`RecordingError` (one line) when the file cannot be read, a column is missing
    (the message lists the columns there are; a named time column must be there), no column
    holds times, the file has no rows, or a cell is not a time / a finite number.

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "pump.csv"
    >>> _ = p.write_text("timestamp,value\\n2014-01-01 00:05:00,2.5\\n2014-01-01 00:00:00,1\\n")
    >>> ts, values = load_csv(p)
    >>> ts.tolist(), values.tolist()
    ([1388534400.0, 1388534700.0], [[1.0], [2.5]])
    >>> load_csv(p, value_columns=["temp"])
    Traceback (most recent call last):
    ...
    stream_lstm.recordings.RecordingError: ...pump.csv: no column 'temp' (columns: timestamp, value)
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
                raise RecordingError(f"{path}: empty file (no header row)")
            missing = [c for c in value_columns if c not in header]
            if time_column is not None and time_column not in header:
                missing.insert(0, time_column)
            if missing:
                names = ", ".join(repr(c) for c in missing)
                raise RecordingError(f"{path}: no column {names} (columns: {', '.join(header)})")
            rows: Iterator[tuple[int, list[str]]] = _numbered_rows(reader)
            if time_column is None and DEFAULT_TIME_COLUMN in header:
                time_column = DEFAULT_TIME_COLUMN
            elif time_column is None:
                first = list(itertools.islice(rows, _SNIFF_ROWS))
                rows = itertools.chain(first, rows)
                time_column = find_time_column(header, [row for _, row in first],
                                               exclude=value_columns)
                if time_column is None:
                    raise RecordingError(
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
            lines: list[int] = []  # each row's line in the file, for the error messages
            for line, row in rows:
                lines.append(line)
                times.append(row[time_at] if time_at < len(row) else "")
                cells.append([row[i] if i < len(row) else "" for i in value_at])
    except OSError as exc:
        raise RecordingError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise RecordingError(f"{path}: not a readable CSV file: {exc}") from None
    if not times:  # (replay sent nothing and exited 0; up ran on with no readings; a review)
        raise RecordingError(f"{path}: no readings, only a header")
    ts = np.empty(len(times))
    for i, text in enumerate(times):
        try:
            ts[i] = parse_timestamp(text)
            if not _FIRST_TIME <= ts[i] <= _LAST_TIME:  # (a traceback when replay named it)
                raise ValueError(text)
        except ValueError:
            raise RecordingError(f"{path}: line {lines[i]}: {time_column}={text!r} is not a time "
                                 "(between the years 1 and 9999)") from None
    try:
        values = np.array(cells, dtype=np.float64).reshape(len(cells), len(value_columns))
    except ValueError:
        i, column, text = _first_bad_number(cells, value_columns)
        raise RecordingError(f"{path}: line {lines[i]}: {column}={text!r} is not a number") from None
    if not np.isfinite(values).all():  # float() reads nan and inf: a model trained on them is NaN
        i, j = (int(k[0]) for k in np.nonzero(~np.isfinite(values)))
        raise RecordingError(f"{path}: line {lines[i]}: {value_columns[j]}={cells[i][j]!r} is not a "
                             "finite number")
    order = np.argsort(ts, kind="stable")
    return ts[order], values[order]


def _numbered_rows(reader: Any) -> Iterator[tuple[int, list[str]]]:
    """``(line, row)`` for each row of a ``csv.reader`` but blank lines, ``line`` being the
    file's line (1 = the header) where the row starts: counting rows instead would name the
    wrong line after a blank one, or after a quoted cell that spans lines."""
    last = reader.line_num
    for row in reader:
        start, last = last + 1, reader.line_num
        if row:
            yield start, row


def _first_bad_number(cells: list[list[str]], columns: list[str]) -> tuple[int, str, str]:
    """``(row index, column, text)`` of the first cell that is not a number."""
    for i, row in enumerate(cells):
        for column, text in zip(columns, row, strict=True):
            try:
                float(text)
            except ValueError:
                return i, column, text
    return 0, columns[0], ""
