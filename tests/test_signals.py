"""StopOnSignal: a signal while connecting ends the wait; after, it only asks the loop to stop."""

import os
import signal

import pytest

from stream_lstm.signals import StopOnSignal, stop_signals


def test_ctrl_c_while_connecting_interrupts_then_only_stops_and_the_handlers_come_back():
    before = signal.getsignal(signal.SIGINT)
    stops = []
    guard = StopOnSignal(lambda: stops.append(1))
    try:
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
        guard.connected()
        os.kill(os.getpid(), signal.SIGINT)  # the loop's flag only: no exception
        assert stops == [1, 1]
    finally:
        guard.restore()
    assert signal.getsignal(signal.SIGINT) is before


def test_a_closed_terminal_stops_cleanly_but_not_under_nohup():
    """SIGHUP (the terminal or SSH session closed) stops as SIGTERM does; where it is ignored
    (`nohup stream-lstm run &`) it stays ignored: the worker is meant to outlive the terminal."""
    before = signal.getsignal(signal.SIGHUP)
    stops = []
    try:
        guard = StopOnSignal(lambda: stops.append(1))
        guard.connected()
        os.kill(os.getpid(), signal.SIGHUP)
        assert stops == [1] and guard.received == "SIGHUP"
        guard.restore()
        assert signal.SIGHUP in stop_signals()

        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as nohup starts it
        assert signal.SIGHUP not in stop_signals()
        guard = StopOnSignal(lambda: stops.append(1))
        guard.connected()
        os.kill(os.getpid(), signal.SIGHUP)
        assert stops == [1] and signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
        guard.restore()
    finally:
        signal.signal(signal.SIGHUP, before)
