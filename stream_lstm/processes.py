"""Several worker processes on one host: ``STREAM_LSTM_PROCESSES=N|auto`` (``run --processes``).

One worker process keeps about one core busy: kafka-python and the pipeline are Python and
hold the GIL. To use a bigger machine, ``stream-lstm run`` with N > 1 becomes a **supervisor**
of N workers of the same consumer group, each a ``stream-lstm run`` child process:

* child ``k`` is ``<instance>-p<k>`` (``STREAM_LSTM_INSTANCE_ID`` or the hostname): its own
  transactional id and state store (``<state_dir>/p<k>``), ``TORCH_THREADS`` threads as one
  worker; on a GPU host they all share the device.
* A child that dies is restarted after a backoff (1 s, doubling to 30 s; 1 s again once it ran
  a minute), logged and counted (``stream_lstm_process_restarts_total``). Exit 2 is a refusal
  (a setting, a model that does not fit, a retention a restore cannot trust, a store another
  worker holds): restarting cannot help, so the supervisor stops them all and exits 2.
* A child not live for ``HUNG_AFTER_S`` (2 min) is killed; one live but not ready for a reason
  of its own, unchanged, for ``STUCK_AFTER_S`` (10 min) is stopped (SIGTERM, SIGKILL after
  45 s); both restart as a child that died. Holding no partitions (joining, a rebalance, a
  spare) or the broker (an outage) does not count: a restart cannot help.
* SIGTERM or SIGINT (Ctrl-C) stops every child as a single worker stops (commit, checkpoint,
  leave the group), waits up to 45 s, kills what is left, says what it stopped and exits 0 when
  all stopped cleanly. A second signal kills at once, unless within half a second of the first
  (``signals.SecondSignal``: `timeout` or a group kill delivers one stop twice).
* The supervisor alone serves ``STREAM_LSTM_METRICS_PORT``: the children's series added up,
  ``/healthz`` and ``/readyz`` over them (``process_health.py``). Its directory of their files
  is swept by the next supervisor if it is SIGKILLed (:func:`sweep_left_behind`).

``1`` (the default) is one worker and no supervisor, as before. The ``run`` command lives here
so that a supervisor never imports torch (``worker.serve`` runs the one worker).

>>> s = Settings(instance_id="edge-7", state_dir="/data/state", processes=3)
>>> resolve_processes(s), child_name(2)
(3, 'p2')
>>> env = child_env(s, 2, Path("/tmp/m"), {})
>>> env["STREAM_LSTM_INSTANCE_ID"], env["STREAM_LSTM_STATE_DIR"], env["STREAM_LSTM_PROCESSES"]
('edge-7-p2', '/data/state/p2', '1')
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from prometheus_client.multiprocess import mark_process_dead

from stream_lstm.config import CHECKPOINT_S_PER_DEVICE, Settings, load_settings
from stream_lstm.endpoint import serve_metrics
from stream_lstm.environment import usable_cpus, warn_unknown_variables
from stream_lstm.host_metrics import HostMetrics
from stream_lstm.process_health import (
    BACKOFF_FIRST_S,
    FENCED_OUT,
    HUNG_AFTER_S,
    HostHealth,
    Slot,
    name_metric_files,
    reserve_status_file,
    status_age,
    sweep_left_behind,
)
from stream_lstm.signals import SecondSignal, stop_signals

log = logging.getLogger("stream_lstm.processes")

BACKOFF_MAX_S = 30.0  # restarts wait BACKOFF_FIRST_S, then twice as long each time, to this
STABLE_AFTER_S = 60.0  # a child that ran this long before it died restarts after BACKOFF_FIRST_S
# Within k8s's 60 s termination grace at the default MAX_DEVICES (a larger fleet's child gets
# the time its clean stop's checkpoints take, not killed mid-stop: see Supervisor).
STOP_GRACE_S = 45.0
REFUSED = 2  # the exit code of a worker that refuses its configuration (models/serving.py)
TICK_S = 0.2
# A child live but not ready this long for the same reasons of its own (process_health.
# own_unready: a restore that never completes, no status since it started) is restarted. Not
# counted: holding no partitions (a settling group, a spare) and the broker (an outage: a
# restart of all would only add rebalances). A change of reason is progress and restarts the
# clock. 10 min: a restore of ~2 million devices into one process (100k take 25 s).
STUCK_AFTER_S = 600.0


def input_partitions(settings: Settings) -> int:
    """The input topic's partitions, or ``TOPIC_PARTITIONS`` (what the worker will create it
    with) when it does not exist yet or the broker does not answer within 15 s."""
    from stream_lstm.kafka.deadline import call_with_deadline
    from stream_lstm.kafka.topics import partition_count

    try:
        return call_with_deadline(lambda: partition_count(settings, settings.input_topic), 15.0,
                                  "describing the input topic")
    except Exception as exc:  # noqa: BLE001 - any failure: the count it would be created with
        log.info("input topic not described; assuming STREAM_LSTM_TOPIC_PARTITIONS",
                 extra={"error": repr(exc)[:200], "partitions": settings.topic_partitions})
        return settings.topic_partitions


def resolve_processes(settings: Settings, partitions: Callable[[], int] | None = None) -> int:
    """``STREAM_LSTM_PROCESSES`` as a number. ``auto``: the usable CPU cores, but no more than
    the input topic's partitions (a child with none assigned would only idle as a spare)."""
    cpus = usable_cpus()
    if settings.processes != "auto":
        if (n := int(settings.processes)) > cpus:  # (accepted: a test host, a later resize)
            log.warning(f"STREAM_LSTM_PROCESSES={n} is more than the {cpus} usable CPU cores: the "
                        "processes share them and each is slower (auto: one a core)")
        return n
    parts = (partitions or (lambda: input_partitions(settings)))()
    n = max(1, min(cpus, parts))
    log.info(f"STREAM_LSTM_PROCESSES=auto: {n} worker processes",
             extra={"usable_cpus": cpus, "input_partitions": parts})
    return n


def child_name(k: int) -> str:
    return f"p{k}"


def child_env(settings: Settings, k: int, metrics_dir: Path, base: dict[str, str]) -> dict[str, str]:
    """The environment of child ``k``: ``base`` (the supervisor's) with its identity,
    its state directory, no endpoint of its own and the shared metrics directory."""
    host = settings.instance_id or socket.gethostname()
    assert settings.state_dir is not None  # filled in by Settings
    env = dict(base)
    env.update({
        "STREAM_LSTM_INSTANCE_ID": f"{host}-{child_name(k)}",
        "STREAM_LSTM_STATE_DIR": str(settings.state_dir / child_name(k)),
        "STREAM_LSTM_PROCESSES": "1",
        "STREAM_LSTM_METRICS_PORT": "0",
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
    })
    return env


def reap_orphans(own: set[int]) -> None:
    """Reap the exited processes that are not the children in ``own``. As a container's PID 1
    with no init, the supervisor inherits every orphan of the host's processes (each child's
    retraining ``resource_tracker``, a trainer left by a child killed as hung): unreaped, each
    stayed a zombie. Its own children are left to ``Popen``, which reads their exit codes.
    Elsewhere nothing but its own children can exit under it, and this reaps nothing."""
    while True:
        try:  # (WNOWAIT: looked at, not reaped)
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return
        if info is None or info.si_pid in own:
            return  # (one of ours: its Popen reaps it, and the others wait a tick)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(info.si_pid, 0)


class Supervisor:
    """Runs ``n`` worker processes (``stream-lstm run`` children) until SIGTERM or SIGINT.

    Parameters
    ----------
    settings
        The host's settings; children inherit the environment with their own identity.
    n
        How many children.
    command
        How to start one (default: this Python, ``-m stream_lstm.cli run``); the status file's
        and the supervisor's pid's options are appended.

    A child is restarted when it exits, is hung or is stuck (the module's docstring): a stuck
    one is stopped with SIGTERM, so that it commits and leaves its group, and killed if still
    running ``stop_grace_s`` later.

    Example: see tests/test_processes.py::test_a_signal_stops_every_child_cleanly_and_the_supervisor_exits_0
    """

    def __init__(self, settings: Settings, n: int, command: list[str] | None = None) -> None:
        self.settings, self.n = settings, n
        # (Past the 25 s that the default 100k devices take, each device adds its checkpoint's time.)
        self.stop_grace_s = STOP_GRACE_S + max(0.0, settings.max_devices * CHECKPOINT_S_PER_DEVICE - 25)
        self.command = command or [sys.executable, "-m", "stream_lstm.cli", "run"]
        self.instance = settings.instance_id or socket.gethostname()
        self._stop, self._hurry = threading.Event(), False
        self._second = SecondSignal()
        self.refused: Slot | None = None

    def _signal(self, _signum: int, _frame: object) -> None:
        # Nothing printed here: the main loop may be in the middle of a write.
        # (not the same stop delivered twice: `timeout`, a group kill)
        self._hurry = self._hurry or self._second.hurries(self._stop.is_set())
        self._stop.set()

    def run(self) -> int:
        """Start the children, keep them running, stop them on a signal; the exit code."""
        for sig in stop_signals():  # (SIGHUP too: a closed terminal stops the children cleanly)
            signal.signal(sig, self._signal)
        sweep_left_behind()
        with tempfile.TemporaryDirectory(prefix=f"stream-lstm-processes-{os.getpid()}-",
                                         ignore_cleanup_errors=True) as tmp:
            metrics_dir, status_dir = Path(tmp) / "metrics", Path(tmp) / "status"
            metrics_dir.mkdir()
            status_dir.mkdir()
            slots = [Slot(child_name(k), status_dir / f"{child_name(k)}.json") for k in range(self.n)]
            for slot in slots:
                reserve_status_file(slot.status)
            self.slots, self.metrics_dir = slots, metrics_dir
            self.health, self.metrics = HostHealth(slots), HostMetrics(metrics_dir, slots, self.instance)
            s = self.settings
            server = serve_metrics(self.metrics, self.health, s.metrics_host, s.metrics_port) \
                if s.metrics_port else None
            log.info(f"supervising {self.n} worker processes", extra={
                "processes": self.n, "instance": self.instance, "group_id": s.group_id,
                "metrics_dir": str(metrics_dir),
                "metrics": f"http://{s.metrics_host}:{server.port}/metrics" if server else "off"})
            try:
                for k, slot in enumerate(slots):
                    self._start(slot, k)
                while not self._stop.wait(TICK_S):
                    self.health.loop.beat()
                    reap_orphans({slot.proc.pid for slot in slots if slot.proc is not None})
                    for k, slot in enumerate(slots):
                        self._tend(slot, k)
                    if self.refused is not None:
                        break
            finally:  # also when the supervisor itself fails: no child is left behind
                clean = self._stop_all()
                if server is not None:
                    server.shutdown()
        if self.refused is not None:
            return REFUSED
        return 0 if clean else 1

    def _start(self, slot: Slot, k: int) -> None:
        # (Its state directory is the child's to make: one it cannot make is its one-line
        # refusal, exit 2; made here, it was the supervisor's traceback, exit 1.)
        env = child_env(self.settings, k, self.metrics_dir, dict(os.environ))
        # A session of its own: the terminal's Ctrl-C reaches the supervisor, which stops the
        # children in order, instead of every process at once.
        slot.proc = subprocess.Popen([*self.command, "--status-file", str(slot.status),
                                      "--supervisor-pid", str(os.getpid())], env=env,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        slot.started_at, slot.restart_at = time.monotonic(), None
        slot.unready_since = slot.unready_reasons = slot.stopping_since = None
        self.metrics.running.labels(slot.name).set(1)
        log.info(f"started worker process {slot.name}", extra={
            "child": slot.name, "pid": slot.proc.pid, "instance_id": env["STREAM_LSTM_INSTANCE_ID"]})

    def _tend(self, slot: Slot, k: int) -> None:
        now = time.monotonic()
        if slot.proc is not None and (code := slot.proc.poll()) is not None:
            self._exited(slot, code)
            if code == REFUSED:
                log.error(f"worker process {slot.name} refused its configuration (exit 2; see "
                          "its log): restarting cannot help, stopping", extra={"child": slot.name})
                self.refused = slot
                return
            if code == FENCED_OUT:  # (restart_at stays None: not restarted; the others go on)
                log.error(f"worker process {slot.name} left its transactional id to another live "
                          "worker (exit 4; see its log): not restarted", extra={"child": slot.name})
                return
            if now - slot.started_at >= STABLE_AFTER_S:
                slot.backoff = BACKOFF_FIRST_S
            slot.restart_at = now + slot.backoff
            slot.restarts += 1
            self.metrics.restarts.labels(slot.name).inc()
            log.error(f"worker process {slot.name} exited; restarting in {slot.backoff:g}s", extra={
                "child": slot.name, "exit_code": code, "restarts": slot.restarts,
                "restart_in_s": slot.backoff})
            slot.backoff = min(slot.backoff * 2, BACKOFF_MAX_S)
        if slot.proc is not None:
            status = slot.read_status()
            self._kill_if_hung(slot, status, now)
            self._stop_if_stuck(slot, status, now)
        if slot.proc is None and slot.restart_at is not None and now >= slot.restart_at:
            self._start(slot, k)

    def _kill_if_hung(self, slot: Slot, status: dict | None, now: float) -> None:
        stale = status is not None and status_age(status) > HUNG_AFTER_S
        if status is None or (status["live"] and not stale):
            slot.not_live_since = None
            return
        if slot.not_live_since is None:
            slot.not_live_since = now
        if stale or now - slot.not_live_since >= HUNG_AFTER_S:
            # (a stale status's own words say live: it said so before it stopped writing)
            why = (f"has written no status for {status_age(status):.0f}s (hung, or its status "
                   "directory full)" if stale else f"has not been live for {HUNG_AFTER_S:g}s "
                   f"({status['liveness']})")
            log.error(f"worker process {slot.name} {why}; killing it to restart it",
                      extra={"child": slot.name, "pid": status["pid"]})
            with contextlib.suppress(ProcessLookupError):
                slot.proc.kill()  # type: ignore[union-attr]
            slot.not_live_since = None

    def _stop_if_stuck(self, slot: Slot, status: dict | None, now: float) -> None:
        """Stop a child that has been not ready for ``STUCK_AFTER_S`` for the same reasons of
        its own (``Slot.unready_for``); kill it if it has not stopped ``stop_grace_s`` later."""
        assert slot.proc is not None
        if slot.stopping_since is not None:
            if now - slot.stopping_since >= self.stop_grace_s and slot.proc.poll() is None:
                log.error(f"worker process {slot.name} did not stop in {self.stop_grace_s:g}s; "
                          "killing it", extra={"child": slot.name, "pid": slot.proc.pid})
                with contextlib.suppress(ProcessLookupError):
                    slot.proc.kill()
            return
        took, reasons = slot.unready_for(status, now)
        if took < STUCK_AFTER_S:
            return
        log.error(f"worker process {slot.name} has not been ready for {took:.0f}s ({reasons}); "
                  "stopping it to restart it", extra={
                      "child": slot.name, "pid": slot.proc.pid, "not_ready": reasons})
        with contextlib.suppress(ProcessLookupError):
            slot.proc.send_signal(signal.SIGTERM)
        slot.stopping_since = now

    def _exited(self, slot: Slot, code: int) -> None:
        assert slot.proc is not None
        # Its live gauges leave the sums; its counters stay (they count what it did), in files
        # named by the slot, which its successor takes over (process_health.name_metric_files).
        mark_process_dead(slot.name, str(self.metrics_dir))
        slot.proc, slot.last_exit = None, code
        self.metrics.running.labels(slot.name).set(0)

    def _stop_all(self) -> bool:
        """SIGTERM every child, wait for all (up to stop_grace_s, or until a second signal),
        SIGKILL the rest; log what was stopped. True when every child stopped cleanly."""
        running = [slot for slot in self.slots if slot.proc is not None]
        pids = {slot.name: slot.proc.pid for slot in running if slot.proc is not None}
        for slot in running:
            with contextlib.suppress(ProcessLookupError):
                slot.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        deadline = time.monotonic() + self.stop_grace_s
        outcome: dict[str, str] = {}
        for slot in running:
            proc = slot.proc
            assert proc is not None
            while proc.poll() is None and not self._hurry and time.monotonic() < deadline:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=TICK_S)
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait()
                outcome[slot.name] = "killed"
            else:  # our SIGTERM before its handler was set, or while it connected (130), counts
                code = proc.returncode  # as clean: nothing was open
                outcome[slot.name] = "stopped" if code in (0, 130, -signal.SIGTERM) else f"exit {code}"
            self._exited(slot, proc.returncode)
        summary = [f"{name} (pid {pids[name]}): {how}" for name, how in outcome.items()]
        summary += [f"{slot.name}: " + ("refused its configuration (exit 2)" if slot is self.refused
                                        else "left its transactional id (exit 4)" if slot.last_exit == FENCED_OUT
                                        else "was waiting to restart")
                    for slot in self.slots if slot.name not in outcome]
        log.info(f"stopped {len(outcome)} worker processes: " + ", ".join(summary), extra={
            "stopped": {name: {"pid": pids[name], "outcome": how} for name, how in outcome.items()}})
        return all(how == "stopped" for how in outcome.values())


# ---- CLI: `stream-lstm run` ---------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Run the forecasting worker: consume readings, keep per-device LSTM state, publish "
        "forecasts. All settings come from STREAM_LSTM_* environment variables (README); with "
        "STREAM_LSTM_PROCESSES (or --processes) above 1, that many workers under one supervisor. "
        "SIGTERM or Ctrl-C stops it cleanly (the last transaction committed, every changed "
        "device checkpointed); under the supervisor a second one, half a second or more later, "
        "kills the children at once. Exit codes: 0 after a stop; "
        "2 for what a restart cannot fix (a setting, a model that cannot be loaded or does not "
        "fit the settings, a broker that refuses the topics, ACLs or session timeout, an input "
        "whose retention a restore cannot trust, a state store another worker holds); 3 when no broker answers or the state store's "
        "volume is full (a supervisor restarts it); 4 when it left its transactional id to "
        "another live worker with its instance id (fenced twice in 10 minutes: not restarted); "
        "130 for a signal while it was still connecting."
    )
    parser.add_argument("--metrics-port", type=int, help="override STREAM_LSTM_METRICS_PORT")
    parser.add_argument("--processes", metavar="N|auto", help="override STREAM_LSTM_PROCESSES: "
                        "worker processes on this host, in the same group, under one supervisor")
    # Set by the supervisor for its children: where to report their health.
    parser.add_argument("--status-file", type=Path, help=argparse.SUPPRESS)
    # And its pid: a child that finds another parent once started stops (it was orphaned).
    parser.add_argument("--supervisor-pid", type=int, help=argparse.SUPPRESS)


def main(args: argparse.Namespace) -> int:
    from stream_lstm.logs import configure_logging

    overrides = {k: v for k, v in (("metrics_port", args.metrics_port),
                                   ("processes", args.processes)) if v is not None}
    settings = load_settings(**overrides)
    configure_logging(settings.log_level)
    if args.status_file is None:  # the supervisor or a single worker; not again in each child
        warn_unknown_variables(log)
        if (n := resolve_processes(settings)) > 1:
            return Supervisor(settings, n).run()  # the supervisor never imports torch
    else:
        name_metric_files(args.status_file.stem)
    from stream_lstm.worker import serve

    return serve(settings, args.status_file, args.supervisor_pid)
