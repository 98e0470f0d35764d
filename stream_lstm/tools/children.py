"""The processes ``stream-lstm up`` starts, and how it stops them.

Each child runs in its own session, so the terminal's Ctrl-C reaches ``up`` alone; ``up`` then
stops each (SIGTERM, then SIGKILL after a grace period or on a second Ctrl-C), ends whatever
is left in its process group, and says what it stopped.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stream_lstm.signals import SecondSignal, stop_signals

STOP_GRACE_S = 30.0  # how long a child may take to stop after SIGTERM before SIGKILL
_OUT_LOCK = threading.Lock()


def say(line: str) -> None:
    """One whole line on stdout, flushed (the relay thread and the main thread both print)."""
    with _OUT_LOCK, contextlib.suppress(OSError, ValueError):
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


class StopSignals:
    """SIGINT and SIGTERM for ``up`` (installed in the main thread, restored on exit).

    While ``raising`` (setting up) a signal raises :class:`KeyboardInterrupt`, so the clean-up
    runs; after that the first one sets ``stop`` (the forecast loop ends) and a later one
    ``hurry`` (stopping kills what is still running instead of waiting), unless it came within
    half a second of the first (``signals.SecondSignal``: `timeout` signals the process and then its
    group, one stop delivered twice). Nothing is printed
    from the handler itself: printing there can re-enter a write the main thread is in.

    Example: see tests/tools/test_children.py::test_stop_signals_raise_once_while_setting_up_then_stop_then_hurry
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.stop = self.hurry = False
        self.raising = True
        self._previous: list[tuple[int, Any]] = []
        self._second = SecondSignal(clock)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            # SIGHUP too (unless `nohup`): a closed terminal or a dropped ssh session. The
            # children run in sessions of their own and never hear it; Python's default dies
            # without the clean-up, and left the broker, the worker and the simulator running.
            for sig in stop_signals():
                self._previous.append((sig, signal.getsignal(sig)))
                signal.signal(sig, self._handle)
        return self

    def _handle(self, _signum: int, _frame: object) -> None:
        hurry = self._second.hurries(self.stop)
        if self.raising:
            self.raising = False  # one KeyboardInterrupt; later signals hurry the clean-up
            raise KeyboardInterrupt
        self.hurry = self.hurry or hurry
        self.stop = True

    def __exit__(self, *_exc: object) -> None:
        for sig, handler in self._previous:
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)


@dataclass
class Child:
    """A process ``up`` started, in its own session (its pid is its process group's id).

    Parameters
    ----------
    name
        What ``up`` calls it when it reports.
    proc
        The process (:func:`start_child`).
    log
        Where its output goes, if to a file.
    stopped, killed
        ``up`` sent it SIGTERM; ``up`` had to SIGKILL its group.

    Examples
    --------
    >>> child = start_child("quick", [sys.executable, "-c", "pass"], env=dict(os.environ))
    >>> child.name, child.proc.wait(), child.stopped, child.killed  # it ended by itself
    ('quick', 0, False, False)
    """

    name: str
    proc: subprocess.Popen
    log: Path | None = None
    stopped: bool = False
    killed: bool = False


def start_child(name: str, cmd: list[str], env: dict[str, str], log: Path | None = None,
                **kw: Any) -> Child:
    """Start ``cmd`` in a new session: the terminal's Ctrl-C goes to ``up`` only, not to it."""
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, start_new_session=True, **kw)
    return Child(name, proc, log)


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid``, from /proc (Linux)."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return []
        return [pgid]
    out = []
    for d in proc.iterdir():
        if not d.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            if fields[0] != "Z" and int(fields[2]) == pgid:
                out.append(int(d.name))
    return out


def stop_children(children: list[Child], signals: StopSignals,
                  grace: float = STOP_GRACE_S) -> None:
    """SIGTERM each running child, wait for all (up to ``grace`` s, less on a second signal),
    SIGKILL the group of any still running, then end whatever is left in each group (the
    worker's trainer, should the worker not have ended it)."""
    for c in children:
        if c.proc.poll() is None:
            c.stopped = True
            with contextlib.suppress(ProcessLookupError):
                c.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    told = False
    for c in children:
        while c.proc.poll() is None and not signals.hurry and time.monotonic() < deadline:
            with contextlib.suppress(subprocess.TimeoutExpired):
                c.proc.wait(timeout=0.2)
        if c.proc.poll() is None:
            if signals.hurry and not told:
                told = True
                say("stopping now: killing what is still running")
            c.killed = True
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(c.proc.pid, signal.SIGKILL)
            c.proc.wait()
    for c in children:
        end_group(c.proc.pid, signals)


def end_group(pgid: int, signals: StopSignals, grace: float = 5.0) -> None:
    """SIGTERM what is left of process group ``pgid``, then SIGKILL it after ``grace`` s."""
    if not group_members(pgid):
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while group_members(pgid) and time.monotonic() < deadline and not signals.hurry:
        time.sleep(0.05)
    if group_members(pgid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
