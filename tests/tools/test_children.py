"""The processes ``stream-lstm up`` starts and how it stops them (tools/children.py): each child in
its own session, SIGTERM then SIGKILL after the grace period or on a second signal, whatever
is left of its process group ended, and the signal handling of ``up`` itself."""

import os
import signal
import subprocess
import sys
import time

import pytest

from stream_lstm.kafka.local_broker import pid_alive
from stream_lstm.tools.children import (
    Child,
    StopSignals,
    end_group,
    group_members,
    start_child,
    stop_children,
)

# A child that starts a grandchild (in its group) and waits; each says "ready" when set up (the
# child with its pid and the grandchild's), so a test signals them only once they are.
PARENT = ("import subprocess, sys, time\n"
          "{on_term}\n"
          "kid = subprocess.Popen([sys.executable, '-c', {kid!r}])\n"
          "print('ready', kid.pid, flush=True)\n"
          "time.sleep(120)\n")
KID = "import time; print('ready', flush=True); time.sleep(120)"
STUBBORN_KID = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                "print('ready', flush=True); time.sleep(120)")


def parent(on_term: str = "", kid: str = KID) -> Child:
    """Start a child with a grandchild; returns once both are set up and running."""
    child = start_child("parent", [sys.executable, "-c", PARENT.format(kid=kid, on_term=on_term)],
                        env=dict(os.environ), stdout=subprocess.PIPE, text=True)
    lines = sorted(child.proc.stdout.readline().split() for _ in range(2))
    assert lines[0] == ["ready"] and lines[1][0] == "ready", lines
    child.kid = int(lines[1][1])
    return child


def wait_until(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_child_runs_in_its_own_session_with_its_grandchildren_in_its_group():
    child = parent()
    try:
        pid = child.proc.pid
        assert os.getsid(pid) == pid and os.getpgid(pid) == pid  # Ctrl-C in the terminal: not to it
        assert os.getpgid(child.kid) == pid
        assert sorted(group_members(pid)) == sorted([pid, child.kid])
        assert group_members(os.getpgid(0)) != [] and pid not in group_members(os.getpgid(0))
    finally:
        os.killpg(child.proc.pid, signal.SIGKILL)
        child.proc.wait()
    wait_until(lambda: group_members(child.proc.pid) == [])  # both killed (a zombie does not count)


def test_stopping_a_child_that_obeys_sigterm_ends_its_group_without_sigkill():
    child = parent()
    kid = child.kid
    with StopSignals() as signals:
        stop_children([child], signals, grace=30)
    assert child.stopped and not child.killed
    assert child.proc.returncode == -signal.SIGTERM
    assert group_members(child.proc.pid) == [] and not pid_alive(kid)  # the grandchild too


def test_a_child_that_ignores_sigterm_is_killed_after_the_grace_period():
    child = parent(on_term="import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN)")
    t0 = time.monotonic()
    with StopSignals() as signals:
        signals.raising = False
        stop_children([child], signals, grace=0.5)
    assert 0.5 <= time.monotonic() - t0 < 10
    assert child.stopped and child.killed and child.proc.returncode == -signal.SIGKILL
    assert not signals.hurry and group_members(child.proc.pid) == []


def test_end_group_kills_a_leftover_that_ignores_sigterm():
    child = parent(kid=STUBBORN_KID)
    child.proc.kill()  # the child is gone; its stubborn grandchild is all that is left
    child.proc.wait()
    assert group_members(child.proc.pid) == [child.kid]
    end_group(child.proc.pid, StopSignals(), grace=0.3)
    wait_until(lambda: not pid_alive(child.kid))
    assert group_members(child.proc.pid) == []
    end_group(child.proc.pid, StopSignals())  # nothing left: nothing to do


def test_a_child_that_already_exited_is_neither_stopped_nor_killed():
    child = start_child("quick", [sys.executable, "-c", "pass"], env=dict(os.environ))
    child.proc.wait()
    with StopSignals() as signals:
        stop_children([child], signals, grace=5)
    assert not child.stopped and not child.killed


def test_stop_signals_raise_once_while_setting_up_then_stop_then_hurry():
    before = signal.getsignal(signal.SIGTERM)
    now = [100.0]
    with StopSignals(clock=lambda: now[0]) as signals:
        with pytest.raises(KeyboardInterrupt):  # during set-up: the clean-up runs
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler runs before this ends
        assert not signals.raising and not signals.stop
        os.kill(os.getpid(), signal.SIGINT)
        wait_until(lambda: signals.stop)
        assert not signals.hurry
        os.kill(os.getpid(), signal.SIGINT)  # the same instant: one stop delivered twice
        now[0] += 2.0  # (the handler has run: signals reach the main thread between bytecodes)
        assert not signals.hurry
        os.kill(os.getpid(), signal.SIGTERM)  # two seconds on: a second Ctrl-C
        wait_until(lambda: signals.hurry)
    assert signal.getsignal(signal.SIGTERM) is before  # restored on exit


def test_one_stop_that_timeout_delivers_twice_stops_cleanly_not_at_once():
    """`timeout` signals the process, then its process group: up heard two Ctrl-Cs within
    microseconds and killed the worker (no final commit) where one clean stop was asked."""
    with StopSignals() as signals:
        signals.raising = False
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        wait_until(lambda: signals.stop)
        assert not signals.hurry


def test_a_second_signal_while_stopping_kills_what_is_left_without_a_traceback(capsys):
    # A child that ignores SIGTERM and, when it gets one, "presses Ctrl-C again" on its parent.
    # It blocks SIGTERM and waits for it with sigwait: a Python handler and time.sleep(120)
    # lost the race when SIGTERM came between "ready" and the sleep (the handler then runs
    # only after the sleep, 120 s on, and the test waited out the grace period).
    code = ("import os, signal, time\n"
            "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})\n"
            "print('ready', flush=True)\n"
            "signal.sigwait({signal.SIGTERM})\n"
            "os.kill(os.getppid(), signal.SIGINT)\n"
            "time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    assert proc.stdout.readline() == "ready\n"
    child = Child("stubborn", proc)
    t0 = time.monotonic()
    with StopSignals() as signals:
        signals.raising = False
        signals.stop = True  # the first Ctrl-C, which ended the forecast loop
        stop_children([child], signals, grace=60)
    assert time.monotonic() - t0 < 30  # it did not wait out the grace period
    assert signals.hurry and child.stopped and child.killed
    assert proc.returncode == -signal.SIGKILL and not pid_alive(proc.pid)
    assert "stopping now: killing what is still running" in capsys.readouterr().out
    proc.stdout.close()


def test_a_closed_terminal_stops_up_as_ctrl_c_does():
    """SIGHUP (the terminal closed, ssh dropped) killed `up` without its clean-up: the broker,
    the worker and the simulator, each in a session of its own, ran on."""
    before = signal.getsignal(signal.SIGHUP)
    with StopSignals() as signals:
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(5)  # the handler runs before this ends
        os.kill(os.getpid(), signal.SIGHUP)
        wait_until(lambda: signals.stop)
    assert signal.getsignal(signal.SIGHUP) is before
