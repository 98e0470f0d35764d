"""SIGTERM and SIGINT for a long-lived command: stop cleanly, and at once while connecting.

A command's loop checks a stop flag between turns, so a signal there ends it cleanly (the last
transaction committed, the group left). Connecting is different: kafka-python's waits for a
broker take about 30 s and hear no flag, so a signal then ends the wait at once, by raising
``KeyboardInterrupt`` (the command line's exit 130): nothing is open yet to be closed.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

# `timeout` and a kill of the process group deliver one stop twice within microseconds (to the
# process, then to its group); a person's second Ctrl-C comes later. Closer than this, a second
# signal is the same stop, not a demand to kill at once.
SAME_SIGNAL_S = 0.5


def again(first_at: float | None, now: float) -> bool:
    """Whether a stop signal at ``now`` is a second one, after a first at ``first_at`` (None:
    the stop came another way, long enough ago).

    >>> again(10.0, 10.001), again(10.0, 11.0), again(None, 10.0)
    (False, True, True)
    """
    return first_at is None or now - first_at >= SAME_SIGNAL_S


class StopOnSignal:
    """Installs the handlers (SIGTERM, SIGINT) until :meth:`restore`.

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
    >>> stopped
    [True, True]
    >>> guard.restore()
    """

    def __init__(self, stop: Callable[[], None]) -> None:
        self.stop, self.connecting = stop, True
        self._previous: dict[int, Any] = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, *_: object) -> None:
        self.stop()
        if self.connecting:
            raise KeyboardInterrupt

    def connected(self) -> None:
        """From here a signal only sets the flag: the loop ends at its next turn."""
        self.connecting = False

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
