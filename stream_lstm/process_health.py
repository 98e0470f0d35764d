"""The health and the metrics of a host of worker processes (``processes.py``).

Each child writes what its own ``/healthz`` and ``/readyz`` would say to a status file every
second (:class:`StatusReporter`); the supervisor reads them (:class:`HostHealth`):

* **live** while its own loop turns and each child runs and says it is live (or has not said
  yet: it is starting), or waits to be restarted; a status older than the liveness timeout
  (30 s) counts as not live;
* **ready** when each child's status is fresh (at most 10 s old), from its current process,
  and ready. The components of ``/readyz`` are the children: ``ok``, or why not (``starting``,
  ``partitions: restoring [2]``, ``not running (exit -9; restart in 1s)``).

The children's series reach the host through prometheus-client's multiprocess mode
(``host_metrics.py``).

>>> import tempfile
>>> d = Path(tempfile.mkdtemp())
>>> health = HealthState(); health.set_ready("partitions", False, "restoring [2]")
>>> reporter = StatusReporter(d / "p0.json", health, lambda: {"consumed": 0}, lambda: None)
>>> reporter.write()
>>> slot = Slot("p0", d / "p0.json"); slot.proc = type("Running", (), {"pid": os.getpid()})()
>>> HostHealth([slot]).readiness()
(False, {'p0': 'partitions: restoring [2]'})
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stream_lstm.logs import Sparing
from stream_lstm.metrics import HealthState

log = logging.getLogger("stream_lstm.processes")

STATUS_EVERY_S = 1.0  # how often a child writes its status file
STATUS_STALE_S = 10.0  # a status this old says nothing: the child is not ready
STATUS_BYTES = 16_384  # a status file's reserved size (a status is a few hundred bytes)
BACKOFF_FIRST_S = 1.0  # a child's first restart waits this long
# A child whose own status has said "not live" (its loop stopped turning for longer than the
# worker's liveness timeout) for this long is hung, not busy: the supervisor kills it, then
# restarts it like a child that died. A pod's liveness probe would restart the whole host; this
# restarts one. So the host's /healthz says a child is not live only past that remedy.
HUNG_AFTER_S = 120.0
REMEDY_S = 30.0  # how long the supervisor may take to see a hung child gone (kill, restart)
# The exit code of a worker that left its transactional id to another live worker (fenced twice
# in 10 minutes: two configured alike, or its replacement after a pause): not restarted, as a
# restart would take the id back; the other children go on (exit 2 stopped the whole host).
FENCED_OUT = 4
# What a child's ``partitions`` component says while it holds none and is not a settled spare:
# joining its group, a rebalance under way, or it is stopping.
HOLDS_NONE = ("waiting for assignment", "closed")


def sweep_left_behind(root: Path | None = None) -> list[Path]:
    """Remove the directories of supervisors that are gone (a SIGKILL leaves its directory of
    metric and status files: one a crash); the removed. Their name holds their pid."""
    from stream_lstm.kafka.local_broker import pid_alive

    removed = []
    for d in Path(root or tempfile.gettempdir()).glob("stream-lstm-processes-*-*"):
        pid = d.name.split("-")[3]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


def reserve_status_file(path: Path) -> None:
    """``path`` made a file of :data:`STATUS_BYTES` blanks, for a child's
    :class:`StatusReporter` to write over in place."""
    path.write_bytes(b" " * STATUS_BYTES)


# ---- in a child ---------------------------------------------------------------------------------
class StatusReporter:
    """In a child: every second, writes what its ``/healthz`` and ``/readyz`` would say (and
    ``details()``) to ``path``, replacing the file whole. If the supervisor is gone (the
    child's parent is no longer ``parent``, the supervisor's pid), calls ``on_orphaned`` once:
    a worker then stops cleanly.

    >>> import tempfile
    >>> from stream_lstm.metrics import HealthState
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     StatusReporter(Path(tmp) / "p0.json", HealthState(), lambda: {"consumed": 7},
    ...                    lambda: None).write()
    ...     status = json.loads((Path(tmp) / "p0.json").read_text())
    >>> status["live"], status["consumed"], status["pid"] == os.getpid()
    (True, 7, True)
    """

    def __init__(self, path: Path, health: HealthState, details: Callable[[], dict[str, Any]],
                 on_orphaned: Callable[[], None], every_s: float = STATUS_EVERY_S,
                 parent: int | None = None) -> None:
        self.path, self.health, self.details = Path(path), health, details
        self.on_orphaned, self.every_s = on_orphaned, every_s
        # The supervisor's pid as it started the child: read here instead, seconds after the
        # start (torch, the model), it was init's when the supervisor had died meanwhile, and
        # the child ran on for ever without it (a processes review).
        self._parent = parent or os.getppid()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="status-file", daemon=True)
        # (a full status directory failed every second: a line a minute, with the count)
        self._say_unwritten = Sparing(lambda msg, extra: log.warning(msg, extra=extra))

    def start(self) -> StatusReporter:
        self.write()
        self._thread.start()
        return self

    def stop(self) -> None:
        """The last status (the worker closed), unless the supervisor's directory is gone."""
        self._stop.set()
        self._thread.join(5.0)
        try:
            self.write()
        except OSError as exc:
            log.warning("last status file not written", extra={"error": repr(exc)[:200]})

    def write(self) -> None:
        live, liveness = self.health.liveness()
        ready, components = self.health.readiness()
        # "mono": the host's monotonic clock (one clock for every process of it), which ages
        # are read on: the wall clock "ts" (for people) steps with NTP or a VM's resume.
        status = {"pid": os.getpid(), "ts": time.time(), "mono": time.monotonic(), "live": live,
                  "liveness": liveness, "ready": ready, "components": components, **self.details()}
        data = json.dumps(status).encode()
        if not self._overwrite(data):  # (none reserved, or it outgrew it: a whole new file)
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, self.path)

    def _overwrite(self, data: bytes) -> bool:
        """``data`` written over the file :func:`reserve_status_file` made, blank-padded, in
        place: no new blocks, so a full directory cannot stop it (a new file and a rename a
        second did, and the supervisor killed healthy children as hung every 2 minutes)."""
        try:
            fd = os.open(self.path, os.O_WRONLY)
        except FileNotFoundError:
            return False
        try:
            size = os.fstat(fd).st_size
            if len(data) > size:
                return False
            os.pwrite(fd, data.ljust(size), 0)
            return True
        finally:
            os.close(fd)

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.write()
            except Exception as exc:  # noqa: BLE001 - a full disk must not end the worker
                self._say_unwritten("status file not written (the supervisor kills a child silent "
                                    f"for {HUNG_AFTER_S:g}s)", error=repr(exc)[:200])
            if os.getppid() != self._parent:
                log.error("the supervisor is gone; stopping")
                self.on_orphaned()
                self._parent = os.getppid()


def label_logs(instance: str) -> None:
    """In a child: each of its log lines says ``"instance": instance``, since the children
    of a host write to the supervisor's stderr, interleaved."""

    class Label(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            if not hasattr(record, "instance"):
                record.instance = instance
            return True

    for handler in logging.getLogger().handlers:
        handler.addFilter(Label())


def name_metric_files(name: str) -> None:
    """In a child, before its metrics exist: its multiprocess files are named by its slot
    (``p0``), not by its pid, so a restarted child takes over its predecessor's files (a
    counter goes on from what they counted) instead of adding two more: a child restarted every
    minute through an outage had left thousands, each read at every scrape."""
    from prometheus_client import values

    values.ValueClass = values.MultiProcessValue(lambda: name)


# ---- in the supervisor ------------------------------------------------------------------------------
class Slot:
    """One child: its current process (None while it waits to be restarted) and its history.

    >>> slot = Slot("p0", Path("/nonexistent/p0.json"))
    >>> slot.name, slot.proc, slot.restarts, slot.read_status()  # no process, no status yet
    ('p0', None, 0, None)
    """

    def __init__(self, name: str, status: Path) -> None:
        self.name, self.status = name, status
        self.proc: subprocess.Popen | None = None
        self.started_at = 0.0
        self.restarts = 0
        self.restart_at: float | None = None
        self.backoff = BACKOFF_FIRST_S
        self.last_exit: int | None = None
        self.not_live_since: float | None = None  # monotonic time its status first said not live
        # Since when (monotonic) the current process has been not ready for these same reasons
        # of its own (own_unready), and since when it has been asked to stop for that.
        self.unready_since: float | None = None
        self.unready_reasons: str | None = None
        self.stopping_since: float | None = None
        self._last: dict[str, Any] | None = None  # the last status read whole

    def read_status(self) -> dict[str, Any] | None:
        """The status the current process wrote, or None (none yet, or the previous one's)."""
        proc = self.proc  # the supervisor's loop may replace it meanwhile (this is the HTTP thread)
        try:
            status = json.loads(self.status.read_bytes())
        except OSError:
            return None
        except ValueError:  # read while the child wrote over it in place: the one before
            status = self._last
        self._last = status
        return status if proc is not None and status is not None and status.get("pid") == proc.pid else None

    def unready_for(self, status: dict[str, Any] | None, now: float) -> tuple[float, str]:
        """How long (seconds, up to the monotonic ``now``) the current process has been not
        ready for the same reasons of its own (:func:`own_unready`; with no ``status`` yet:
        still starting), and those reasons; ``(0.0, "")`` while it is not waiting on itself.
        Other reasons restart the clock: they are progress (``restoring [0, 1]``, then
        ``restoring [1]``).

        >>> slot = Slot("p0", Path("/nonexistent/p0.json"))
        >>> restoring = {"ts": time.time(), "mono": time.monotonic(), "live": True, "ready": False,
        ...              "components": {"broker": "ok", "partitions": "restoring [1]"}}
        >>> slot.unready_for(restoring, now=10.0), slot.unready_for(restoring, now=25.0)
        ((0.0, 'partitions: restoring [1]'), (15.0, 'partitions: restoring [1]'))
        >>> outage = dict(restoring, components={"broker": "publish failed", "partitions": "restoring [1]"})
        >>> slot.unready_for(outage, now=30.0)  # waiting on the broker: not its own doing
        (0.0, '')
        """
        reasons = "no status yet" if status is None else own_unready(status)
        if reasons is None:
            self.unready_since = self.unready_reasons = None
            return 0.0, ""
        if reasons != self.unready_reasons or self.unready_since is None:
            self.unready_since, self.unready_reasons = now, reasons
        return now - self.unready_since, reasons


def own_unready(status: dict[str, Any]) -> str | None:
    """Why a child that says it is live is not ready, when the reason is its own and a
    restart may help (``partitions: restoring [2]``, or ``starting`` before it reports any
    component); None when it is ready, not live or silent (the hung rule's), or waits on
    something outside it that a restart cannot fix: the broker (an outage makes every child
    unready at once), its state store's disk (full), or partitions it does not hold (:data:`HOLDS_NONE`: a child waits
    unready for its group to settle, joining or in a rebalance).

    >>> status = {"ts": time.time(), "mono": time.monotonic(), "live": True, "ready": False,
    ...           "components": {"broker": "ok", "model": "ok", "partitions": "restoring [2]"}}
    >>> own_unready(status)
    'partitions: restoring [2]'
    >>> own_unready(dict(status, components={"broker": "ok", "partitions": "waiting for assignment"})) is None
    True
    >>> own_unready(dict(status, components={"broker": "no consumer-group heartbeat for 40s",
    ...                                      "partitions": "restoring [2]"})) is None
    True
    >>> own_unready(dict(status, components={"state_store": "cannot write (database or disk is full)"})) is None
    True
    >>> own_unready(dict(status, components={"state_store": "restore failed: DatabaseError('malformed')"}))
    "state_store: restore failed: DatabaseError('malformed')"
    """
    if status["ready"] or not status["live"] or status_age(status) > STATUS_STALE_S:
        return None
    components = status.get("components") or {}
    if not components:
        return "starting"
    store = components.get("state_store", "ok")
    if components.get("broker", "ok") != "ok" or store.startswith("cannot write") or "disk is full" in store:
        return None  # (nor can a restart make room on a full disk; a damaged file it may fix)
    own = [f"{k}: {v}" for k, v in components.items()
           if v != "ok" and not (k == "partitions" and v in HOLDS_NONE)]
    return "; ".join(own) or None


def status_age(status: dict) -> float:
    """Seconds since a child wrote ``status``, on the host's monotonic clock (a wall clock
    stepped by two minutes made every child look hung at once, and the supervisor killed them).

    >>> status_age({"mono": time.monotonic() - 5.0, "ts": time.time() + 3600}) < 6
    True
    """
    return time.monotonic() - float(status["mono"])


class HostHealth:
    """Liveness and readiness of the host, over its children (``serve_metrics`` serves them).

    Live: the supervisor's loop turns, and each child runs and says it is live (or has not
    said yet), or waits to be restarted, or left its id (exit 4), or has been hung for less
    than the supervisor takes to kill and restart it (``HUNG_AFTER_S`` + ``REMEDY_S``: at the
    worker's 30 s a host probe restarted every child 90 s before the supervisor would have
    restarted one). Ready: each child's fresh status says ready; the components of
    ``/readyz`` are the children, each ``ok`` or why not.

    >>> slot = Slot("p0", Path("/nonexistent/p0.json"))
    >>> slot.restart_at, slot.last_exit = time.monotonic() + 5.0, 1  # died, restarts soon
    >>> HostHealth([slot]).readiness()
    (False, {'p0': 'not running (exit 1; restart in 5s)'})
    >>> HostHealth([slot]).liveness()  # waiting for a restart is live
    (True, 'every process is live')
    """

    def __init__(self, slots: list[Slot]) -> None:
        self.slots = slots
        self.loop = HealthState()

    def liveness(self) -> tuple[bool, str]:
        ok, detail = self.loop.liveness()
        problems = [] if ok else [f"supervisor: {detail}"]
        now = time.monotonic()
        for slot in self.slots:
            status = slot.read_status()
            if slot.proc is not None and status is not None:
                age = status_age(status)
                hung = max(age, 0.0 if status["live"] or slot.not_live_since is None else now - slot.not_live_since)
                if hung > HUNG_AFTER_S + REMEDY_S:
                    problems.append(f"{slot.name}: " + (f"no status for {age:.0f}s" if status["live"] else
                                                        f"not live for {hung:.0f}s ({status['liveness']})"))
            elif slot.proc is None and slot.restart_at is None and slot.last_exit != FENCED_OUT:
                problems.append(f"{slot.name}: not running")
        return (not problems), "; ".join(problems) or "every process is live"

    def readiness(self) -> tuple[bool, dict[str, str]]:
        parts = {slot.name: self._child_readiness(slot) for slot in self.slots}
        return all(v == "ok" for v in parts.values()), parts

    @staticmethod
    def _child_readiness(slot: Slot) -> str:
        if slot.proc is None and slot.last_exit == FENCED_OUT:  # (live: it left on purpose)
            return "not running: it left its transactional id to another live worker (exit 4)"
        if slot.proc is None:
            wait = max(0.0, (slot.restart_at or time.monotonic()) - time.monotonic())
            return f"not running (exit {slot.last_exit}; restart in {wait:.0f}s)"
        status = slot.read_status()
        if status is None:
            return "starting"
        age = status_age(status)
        if age > STATUS_STALE_S:
            return f"no status for {age:.0f}s"
        if status["ready"]:
            return "ok"
        waiting = "; ".join(f"{k}: {v}" for k, v in status["components"].items() if v != "ok")
        return waiting or "starting"
