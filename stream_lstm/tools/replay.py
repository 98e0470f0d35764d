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
import sys
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from stream_lstm.config import Settings, load_settings
from stream_lstm.recordings import (
    RecordingError,
    TimeColumnNote,
    load_csv,
)
from stream_lstm.tools import finite_float

#: The error a replay reports: a recording that cannot be read, or files that do not fit.
ReplayError = RecordingError


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
        "file name). Several files are merged in timestamp order, like a fleet. Exit 0 when every "
        "reading was sent; 1 when it stopped before the end (a signal: Ctrl-C or SIGTERM, the "
        "readings sent so far said) or failed; 2 for a bad file or setting; 3 when no broker answers.")
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
    pace.add_argument("--speedup", type=finite_float, default=None, metavar="X",
                      help="keep the recording's timing, X times faster (3600: an hour per second)")
    pace.add_argument("--as-fast-as-possible", action="store_true",
                      help="send without waiting (the default)")
    parser.add_argument("--limit", type=int, default=None, metavar="N",
                        help="send only the first N readings (of all files merged)")
    parser.add_argument("--topic", default=None, help="topic (default: STREAM_LSTM_INPUT_TOPIC)")
    parser.add_argument("--no-progress", action="store_true", help="no progress line")


def main(args: argparse.Namespace) -> int:
    value_columns = [c.strip() for arg in (args.value_columns or ["value"]) for c in arg.split(",") if c.strip()]
    if (args.speedup is not None and args.speedup <= 0) or (args.limit is not None and args.limit < 1):
        print("replay: --speedup and --limit must be positive", file=sys.stderr)
        return 2
    settings = load_settings()
    try:
        # Load once up front, so a bad file fails before anything is sent.
        ids, device_index, ts, values = merge_recordings(args.files, args.time_column, value_columns,
                                                         args.device_ids, note=stderr_note("replay"))
        count = len(ts) if args.limit is None else min(len(ts), args.limit)
        refused_by_the_worker(settings, ids, device_index[:count], values.shape[1])  # (those sent)
    except ReplayError as exc:
        print(f"replay: {exc}", file=sys.stderr)
        return 2
    topic = args.topic or settings.input_topic
    devices = len(set(device_index[:count].tolist()))  # (--limit may leave some files out)
    pace = f"{args.speedup:g}x speed-up" if args.speedup else "as fast as possible"
    print(f"replay: {count:,} readings of {devices} device(s) into {topic} at "
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
    span = f"{_utc(ts[0])} .. {_utc(ts[sent - 1])}" if sent else "nothing"  # (what was sent)
    print(f"replay: sent {sent:,} of {count:,} readings ({span}) in {elapsed:,.1f}s "
          f"({sent / max(elapsed, 1e-9):,.0f}/s)" + ("" if sent == count else ": stopped before the end"),
          file=sys.stderr)
    return 0 if sent == count else 1


def refused_by_the_worker(settings: Settings, ids: list[str], device_index: np.ndarray, columns: int) -> None:
    """:class:`ReplayError` when the worker would dead-letter every reading of a device under
    these settings, as its own decoder judges a reading of it (an empty or too long
    --device-id, more value columns than STREAM_LSTM_N_FEATURES): every one was sent, and
    dead-lettered, with exit 0 (a review). Judged on a plain reading (the time now, a value
    within the range), so what one reading alone gets wrong is left to the worker, as live."""
    from stream_lstm.encoding import encode_reading
    from stream_lstm.messages import InvalidReading, ReadingDecoder

    decoder, now = ReadingDecoder(settings), time.time()
    value = min(max(0.0, settings.value_min), settings.value_max)  # (0, or the range's nearest)
    for d in np.unique(device_index).tolist():
        device = ids[int(d)]
        try:
            decoder.decode(encode_reading(device, now, [value] * columns), device.encode(), now)
        except InvalidReading as exc:
            raise ReplayError(f"device {device[:60]!r}: the worker would dead-letter its readings "
                              f"({exc})") from None


def stderr_note(command: str) -> TimeColumnNote:
    """A :data:`TimeColumnNote` for a command line: the line on stderr, after ``command: ``."""
    return lambda _column, message: print(f"{command}: {message}", file=sys.stderr)


def _utc(epoch: float) -> str:
    return datetime.fromtimestamp(float(epoch), UTC).strftime("%Y-%m-%d %H:%M:%S")
