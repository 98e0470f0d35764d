"""SIGTERM, SIGINT and SIGHUP for a long-lived command: stop cleanly, and at once while connecting.

A command's loop checks a stop flag between turns, so a signal there ends it cleanly (the last
transaction committed, the group left). Connecting is different: kafka-python's waits for a
broker take about 30 s and hear no flag, so a signal then ends the wait at once, by raising
``KeyboardInterrupt`` (the command line's exit 130): nothing is open yet to be closed.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from typing import Any

# `timeout` and a kill of the process group deliver one stop twice within microseconds (to the
# process, then to its group); a person's second Ctrl-C comes later. Closer than this, a second
# signal is the same stop, not a demand to kill at once.
SAME_SIGNAL_S = 0.5


_interrupted = False  # a stop signal raised KeyboardInterrupt (interrupt_now)


def interrupt_now(signum: int = 0, frame: object = None) -> None:
    """An offline command's stop signal handler: raise ``KeyboardInterrupt`` now, and remember
    it for :func:`raise_if_interrupted`. Raised where the main thread happens to be, it can be
    lost: inside a ``__getattr__`` that C code asked through ``PyObject_HasAttr`` (torch's
    modules have one), CPython clears it, and a SIGTERM to ``train`` went unheard while it
    trained on (found with the test's stacks dumped: SIGTERM caught, nothing pending)."""
    global _interrupted
    _interrupted = True
    raise KeyboardInterrupt


def raise_if_interrupted() -> None:
    """``KeyboardInterrupt`` where :func:`interrupt_now` has raised one (lost or not): called
    between a long loop's steps, so that a stop is heard there if not at once.

    >>> raise_if_interrupted()  # (none yet)
    """
    if _interrupted:
        raise KeyboardInterrupt


def take_lost_stop() -> bool:
    """Whether :func:`interrupt_now` has raised a stop, which is then forgotten: a long-lived
    command's loop that takes the signals over after its start takes such a stop over too, as
    its first, clean one (left remembered, its next batch raised it mid-batch).

    >>> take_lost_stop()
    False
    """
    global _interrupted
    taken, _interrupted = _interrupted, False
    return taken


def stop_signals() -> tuple[signal.Signals, ...]:
    """The signals that stop a command cleanly: SIGTERM, SIGINT (Ctrl-C) and SIGHUP (the
    terminal or SSH session closed: its default ended the worker uncleanly, mid-transaction,
    children included), but not SIGHUP where it is ignored: under ``nohup`` the process is
    meant to outlive its terminal, and a handler of ours would undo that.

    >>> stop_signals()[:2]
    (<Signals.SIGTERM: 15>, <Signals.SIGINT: 2>)
    """
    hangup = () if signal.getsignal(signal.SIGHUP) == signal.SIG_IGN else (signal.SIGHUP,)
    return (signal.SIGTERM, signal.SIGINT, *hangup)


class SecondSignal:
    """Tells a second stop signal (stop at once) from the first, and from the first delivered
    twice: one instance per command, asked from its signal handler.

    >>> now = [10.0]
    >>> second = SecondSignal(clock=lambda: now[0])
    >>> second.hurries(stopping=False)  # the first: a clean stop
    False
    >>> now[0] = 10.001; second.hurries(stopping=True)  # the same, delivered again
    False
    >>> now[0] = 11.0; second.hurries(stopping=True)  # pressed again
    True
    >>> SecondSignal().hurries(stopping=True)  # stopping already, not by a signal
    True
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.first_at: float | None = None

    def hurries(self, stopping: bool) -> bool:
        """Note a stop signal; whether it asks to stop at once (``stopping`` already, and not
        within :data:`SAME_SIGNAL_S` of the first)."""
        now = self.clock()
        hurry = stopping and (self.first_at is None or now - self.first_at >= SAME_SIGNAL_S)
        if self.first_at is None:
            self.first_at = now
        return hurry


class StopOnSignal:
    """Installs the handlers (:func:`stop_signals`) until :meth:`restore`.

    Parameters
    ----------
    stop
        Asks the command's loop to stop (sets its flag); called on every signal.

    Examples
    --------
    >>> import os, signal
    >>> stopped = []
    >>> guard = StopOnSignal(lambda: stopped.append(True))
    >>> try:
    ...     os.kill(os.getpid(), signal.SIGTERM)  # while connecting: the wait ends
    ... except KeyboardInterrupt:
    ...     print("interrupted")
    interrupted
    >>> guard.connected(); os.kill(os.getpid(), signal.SIGTERM)  # then: only the flag
    >>> stopped, guard.received
    ([True, True], 'SIGTERM')
    >>> guard.restore()
    """

    def __init__(self, stop: Callable[[], None]) -> None:
        self.stop, self.connecting = stop, True
        self.received: str | None = None  # the first signal's name, for the last log line
        self._previous: dict[int, Any] = {}
        for sig in stop_signals():
            self._previous[sig] = signal.signal(sig, self._on_signal)
        if take_lost_stop():  # (a stop before this handler: the loop's first, cleanly)
            self.received = "a stop signal before the start"
            stop()

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.received = self.received or signal.Signals(signum).name
        self.stop()
        if self.connecting:
            raise KeyboardInterrupt

    def connected(self) -> None:
        """From here a signal only sets the flag: the loop ends at its next turn."""
        self.connecting = False

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
