"""The deadline around kafka-python calls that can wait forever (stream_lstm.kafka.deadline)."""

import threading
import time

import pytest
from kafka.errors import KafkaTimeoutError

from stream_lstm.kafka.deadline import call_with_deadline


def test_a_stuck_call_is_given_up_and_its_client_closed():
    stuck, closed = threading.Event(), threading.Event()

    def close():  # what closing the client does to the stuck wait: ends it
        closed.set()
        stuck.set()

    t0 = time.monotonic()
    with pytest.raises(KafkaTimeoutError, match="listing offsets did not finish within 0.2 s"):
        call_with_deadline(stuck.wait, 0.2, "listing offsets", on_timeout=close)
    assert time.monotonic() - t0 < 5
    assert closed.wait(5), "on_timeout was not run"


def test_the_call_s_own_error_reaches_the_caller():
    def fails():
        raise ValueError("no such topic")

    with pytest.raises(ValueError, match="no such topic"):
        call_with_deadline(fails, 5.0, "a call that fails")
