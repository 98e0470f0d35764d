"""The health of a host of worker processes (process_health.py): the children's status files
and the host's liveness and readiness over them (its metrics: test_host_metrics.py)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from stream_lstm.metrics import HealthState
from stream_lstm.process_health import (
    HUNG_AFTER_S,
    REMEDY_S,
    STATUS_BYTES,
    STATUS_STALE_S,
    HostHealth,
    Slot,
    StatusReporter,
    own_unready,
    reserve_status_file,
    sweep_left_behind,
)


class Running:
    """Stands in for a child's Popen: what HostHealth reads of it is its pid."""

    def __init__(self, pid: int) -> None:
        self.pid = pid


def reporter(tmp_path, name="p0", **details):
    health = HealthState()
    return health, StatusReporter(tmp_path / f"{name}.json", health, lambda: details, lambda: None)


def test_the_status_file_says_what_the_child_endpoints_would(tmp_path):
    health, rep = reporter(tmp_path, consumed=12, model_version="v3")
    health.set_ready("broker", True)
    health.set_ready("partitions", False, "restoring [1]")
    rep.write()
    status = json.loads((tmp_path / "p0.json").read_text())
    assert status["pid"] == os.getpid() and abs(status["ts"] - time.time()) < 5
    assert status["live"] is True and status["ready"] is False
    assert status["components"] == {"broker": "ok", "partitions": "restoring [1]"}
    assert status["consumed"] == 12 and status["model_version"] == "v3"
    assert [p.name for p in tmp_path.iterdir()] == ["p0.json"]  # replaced whole, no leftovers


def test_a_reserved_status_file_is_written_over_in_place_and_grows_only_past_its_size(tmp_path):
    path = tmp_path / "p0.json"
    reserve_status_file(path)
    inode = path.stat().st_ino
    health, rep = reporter(tmp_path, consumed=3)
    rep.write()
    assert path.stat().st_ino == inode and path.stat().st_size == STATUS_BYTES  # no new file
    assert json.loads(path.read_bytes())["consumed"] == 3
    big = StatusReporter(path, health, lambda: {"model_version": "v" * STATUS_BYTES}, lambda: None)
    big.write()  # (outgrows it: a new file, as before)
    assert json.loads(path.read_bytes())["model_version"] == "v" * STATUS_BYTES
    rep.write()  # and back over that one, in place, blank-padded
    assert json.loads(path.read_bytes())["consumed"] == 3


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 64 KB tmpfs (root only: as the supervisor's temporary directory may fill up)."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_full_temporary_directory_does_not_silence_a_child(tiny_tmpfs):
    """Its status still comes (a review filled the supervisor's /tmp: every child was killed
    as hung every 2 minutes while it served)."""
    path = tiny_tmpfs / "p0.json"
    reserve_status_file(path)
    with open(tiny_tmpfs / "fill", "wb", buffering=0) as fill, contextlib.suppress(OSError):
        while True:
            fill.write(b"x" * 4096)
    health, rep = reporter(tiny_tmpfs, consumed=41)
    rep.write()
    slot = Slot("p0", path)
    slot.proc = Running(os.getpid())
    assert slot.read_status()["consumed"] == 41
    with pytest.raises(OSError):  # (what it did: a new file beside it)
        (tiny_tmpfs / "p1.json").write_text(json.dumps({"consumed": 41}))


def test_a_status_read_while_it_is_written_is_the_one_before(tmp_path):
    _, rep = reporter(tmp_path, consumed=5)
    rep.write()
    slot = Slot("p0", tmp_path / "p0.json")
    slot.proc = Running(os.getpid())
    assert slot.read_status()["consumed"] == 5
    (tmp_path / "p0.json").write_text('{"pid": ' + " " * 50)  # half written
    assert slot.read_status()["consumed"] == 5


def test_a_child_whose_supervisor_is_gone_is_told_once(tmp_path):
    told = threading.Event()
    calls = []
    rep = StatusReporter(tmp_path / "p0.json", HealthState(), dict,
                         lambda: (calls.append(1), told.set()), every_s=0.02)
    rep._parent = -1  # as if the parent had changed: the supervisor died, init adopted us
    rep.start()
    try:
        assert told.wait(5)
        time.sleep(0.1)  # more turns of the loop: still once
    finally:
        rep.stop()
    assert calls == [1]


def test_a_child_whose_supervisor_died_before_its_reporter_started_is_told(tmp_path):
    """The parent is the supervisor's pid as given at the child's start: read when the
    reporter started, it was already init's, and the orphan was never told."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    told = threading.Event()
    rep = StatusReporter(tmp_path / "p0.json", HealthState(), dict, told.set, every_s=0.02,
                         parent=dead.pid)
    rep.start()
    try:
        assert told.wait(5)
    finally:
        rep.stop()


def test_the_host_is_ready_when_every_child_is(tmp_path):
    h0, r0 = reporter(tmp_path, "p0")
    h1, r1 = reporter(tmp_path, "p1")
    slots = [Slot("p0", tmp_path / "p0.json"), Slot("p1", tmp_path / "p1.json")]
    host = HostHealth(slots)
    for s in slots:
        s.proc = Running(os.getpid())
    assert host.readiness() == (False, {"p0": "starting", "p1": "starting"})  # nothing written yet
    h0.set_ready("partitions", True)
    h1.set_ready("broker", False, "publish failed")
    r0.write()
    r1.write()
    assert host.readiness() == (False, {"p0": "ok", "p1": "broker: publish failed"})
    h1.set_ready("broker", True)
    r1.write()
    assert host.readiness() == (True, {"p0": "ok", "p1": "ok"})
    # A status from an earlier process of that child says nothing about this one.
    slots[1].proc = Running(os.getpid() + 100_000)
    assert host.readiness()[1]["p1"] == "starting"
    slots[1].proc = Running(os.getpid())
    # A stale status is no readiness.
    status = json.loads(slots[0].status.read_text())
    status["mono"] -= STATUS_STALE_S + 5
    slots[0].status.write_text(json.dumps(status))
    stale = host.readiness()[1]["p0"]
    assert stale.startswith("no status for ") and float(stale.split()[3].rstrip("s")) >= STATUS_STALE_S + 5
    # A child waiting to be restarted.
    slots[1].proc, slots[1].last_exit, slots[1].restart_at = None, -9, time.monotonic() + 2.4
    assert host.readiness()[1]["p1"] == "not running (exit -9; restart in 2s)"


def test_the_host_is_live_while_every_child_is_or_waits_for_its_restart(tmp_path):
    health, rep = reporter(tmp_path, "p0")
    slot = Slot("p0", tmp_path / "p0.json")
    host = HostHealth([slot])
    slot.proc = Running(os.getpid())
    assert host.liveness() == (True, "every process is live")  # starting: no status yet
    rep.write()
    assert host.liveness()[0]
    health.liveness_timeout_s = 0.0  # the child's loop has not turned in time
    time.sleep(0.01)
    rep.write()
    # Live while the supervisor's remedy may still come (it kills a child hung for HUNG_AFTER_S
    # and restarts it): the host's probe at the worker's 30 s restarted every child 90 s before
    # the supervisor would have restarted one (a processes review).
    slot.not_live_since = time.monotonic()
    assert host.liveness() == (True, "every process is live")
    slot.not_live_since = time.monotonic() - HUNG_AFTER_S - REMEDY_S - 1  # the remedy did not come
    ok, detail = host.liveness()
    assert not ok and detail.startswith("p0: not live for 15") and "(last loop iteration" in detail
    silent = status_of(health, age=HUNG_AFTER_S + REMEDY_S + 1) | {"live": True}
    slot.not_live_since = None
    slot.status.write_text(json.dumps(silent))
    ok, detail = host.liveness()
    assert not ok and detail == "p0: no status for 151s"
    slot.proc, slot.restart_at = None, time.monotonic() + 1
    assert host.liveness()[0]  # being restarted within its backoff
    slot.restart_at = None
    assert host.liveness() == (False, "p0: not running")
    slot.restart_at = time.monotonic()
    host.loop.liveness_timeout_s = 0.0  # the supervisor's own loop is stuck
    time.sleep(0.01)
    assert host.liveness()[1].startswith("supervisor: last loop iteration")


def status_of(health: HealthState, age: float = 0.0) -> dict:
    """What a child's status file would hold for ``health``, written ``age`` seconds ago."""
    live, liveness = health.liveness()
    ready, components = health.readiness()
    return {"pid": os.getpid(), "ts": time.time() - age, "mono": time.monotonic() - age,
            "live": live, "liveness": liveness, "ready": ready, "components": components}


def test_only_reasons_of_its_own_that_a_restart_may_fix_count_against_a_child():
    health = HealthState()
    assert own_unready(status_of(health)) == "starting"  # live, no component reported yet
    health.set_ready("broker", True)
    health.set_ready("model", True, "v1")
    health.set_ready("partitions", False, "restoring [0, 2]")
    assert own_unready(status_of(health)) == "partitions: restoring [0, 2]"
    # Holding no partitions is no fault: more processes than partitions, a rebalance, a stop.
    for idle in ("waiting for assignment", "closed"):
        health.set_ready("partitions", False, idle)
        assert own_unready(status_of(health)) is None, idle
    # Nor is an outage, whatever else waits on it.
    health.set_ready("partitions", False, "restoring [2]")
    for outage in ("publish failed: KafkaTimeoutError()", "restore failed: NoBrokersAvailable()",
                   "no consumer-group heartbeat for 40s"):
        health.set_ready("broker", False, outage)
        assert own_unready(status_of(health)) is None, outage
    health.set_ready("broker", True)
    health.set_ready("partitions", True, "assigned [2]")
    assert own_unready(status_of(health)) is None  # ready
    # Not live, or silent: the hung rule's business, not this one's.
    health.set_ready("partitions", False, "restoring [2]")
    assert own_unready(status_of(health, age=STATUS_STALE_S + 1)) is None
    health.liveness_timeout_s = 0.0
    time.sleep(0.01)
    assert own_unready(status_of(health)) is None


def test_a_child_is_stuck_for_as_long_as_its_own_reasons_stay_the_same():
    slot = Slot("p0", Path("/nonexistent/p0.json"))
    health = HealthState()
    assert slot.unready_for(None, now=0.0) == (0.0, "no status yet")  # from its start
    assert slot.unready_for(None, now=4.0) == (4.0, "no status yet")
    health.set_ready("broker", True)
    health.set_ready("partitions", False, "restoring [0, 1]")
    assert slot.unready_for(status_of(health), now=5.0) == (0.0, "partitions: restoring [0, 1]")
    assert slot.unready_for(status_of(health), now=65.0)[0] == 60.0
    health.set_ready("partitions", False, "restoring [1]")  # progress: the clock starts again
    assert slot.unready_for(status_of(health), now=70.0)[0] == 0.0
    assert slot.unready_for(status_of(health), now=90.0)[0] == 20.0
    health.set_ready("broker", False, "restore failed: KafkaTimeoutError()")  # an outage
    assert slot.unready_for(status_of(health), now=95.0) == (0.0, "")
    health.set_ready("broker", True)  # back: restoring [1] again, counted from now
    assert slot.unready_for(status_of(health), now=100.0)[0] == 0.0
    assert slot.unready_for(status_of(health), now=700.0)[0] == 600.0
    health.set_ready("partitions", False, "waiting for assignment")  # its partitions went
    assert slot.unready_for(status_of(health), now=701.0) == (0.0, "")


def test_a_supervisor_sweeps_the_directories_of_supervisors_that_are_gone(tmp_path):
    """A SIGKILLed supervisor left its directory of metric and status files in /tmp, one a
    crash (a processes review). The next one removes those whose supervisor is gone."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    left = tmp_path / f"stream-lstm-processes-{gone.pid}-abc123"
    live = tmp_path / f"stream-lstm-processes-{os.getpid()}-def456"
    other = tmp_path / "stream-lstm-processes-xyz"  # (not one of ours: no pid in its name)
    for d in (left, live, other):
        (d / "status").mkdir(parents=True)
    assert sweep_left_behind(tmp_path) == [left]
    assert not left.exists() and live.exists() and other.exists()
