"""StopOnSignal: a signal while connecting ends the wait; after, it only asks the loop to stop."""

import os
import signal

import pytest

from stream_lstm.signals import StopOnSignal


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
