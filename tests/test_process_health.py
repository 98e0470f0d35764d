"""The health and metrics of a host of worker processes (process_health.py): the children's
status files, the host's liveness and readiness over them, and their series added up from
prometheus-client's multiprocess files (written here by real child processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from prometheus_client.multiprocess import mark_process_dead
from prometheus_client.parser import text_string_to_metric_families

from stream_lstm.metrics import HealthState
from stream_lstm.process_health import (
    HUNG_AFTER_S,
    REMEDY_S,
    STATUS_STALE_S,
    HostHealth,
    HostMetrics,
    Slot,
    StatusReporter,
    own_unready,
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


CHILD = """
import sys, time
from stream_lstm.metrics import Metrics
m = Metrics()
consumed, devices, lag = (int(a) for a in sys.argv[1:])
m.readings_consumed.labels("in", "0").inc(consumed)
m.active_devices.set(devices)
m.consumer_lag.labels("0").set(lag)
m.ready.set(1)
"""


def scrape(metrics: HostMetrics) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(metrics.exposition().decode())
            for s in f.samples}


def test_the_host_adds_up_the_children_series_as_each_gauge_says(tmp_path):
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(metrics_dir))
    for args in (("5", "3", "100"), ("7", "4", "2")):  # the second owns partition 0 later
        done = subprocess.run([sys.executable, "-c", CHILD, *args], env=env, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stderr
    pids = sorted(int(p.stem.split("_")[-1]) for p in metrics_dir.glob("counter_*.db"))
    assert len(pids) == 2
    slots = [Slot("p0", tmp_path / "p0.json"), Slot("p1", tmp_path / "p1.json")]
    host = HostMetrics(metrics_dir, slots, "rack-3")
    got = scrape(host)
    consumed = ("stream_lstm_readings_consumed_total", (("partition", "0"), ("topic", "in")))
    assert got[consumed] == 12  # counters sum
    assert got[("stream_lstm_active_devices", ())] == 7  # livesum
    assert got[("stream_lstm_consumer_lag_messages", (("partition", "0"),))] == 2  # the latest owner
    assert got[("stream_lstm_ready", ())] == 0  # the host's own, not the children's
    assert got[("stream_lstm_processes", ())] == 2
    assert got[("stream_lstm_process_restarts_total", (("process", "p1"),))] == 0
    assert got[("stream_lstm_up_info", (("instance", "rack-3"), ("processes", "2"),
                                        ("version", "0.1.0")))] == 1
    # A child that exited leaves the live gauges; what it counted stays counted.
    mark_process_dead(pids[0], str(metrics_dir))
    mark_process_dead(pids[1], str(metrics_dir))
    got = scrape(host)
    assert got[consumed] == 12 and ("stream_lstm_active_devices", ()) not in got
    # The model each child serves comes from its status file.
    for slot, version in zip(slots, ("v1", "v2"), strict=True):
        slot.proc = Running(os.getpid())
        health = HealthState()
        StatusReporter(slot.status, health, lambda v=version: {"model_version": v}, lambda: None).write()
    got = scrape(host)
    assert got[("stream_lstm_model_info", (("process", "p0"), ("version", "v1")))] == 1
    assert got[("stream_lstm_model_info", (("process", "p1"), ("version", "v2")))] == 1


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


NAMED_CHILD = """
import sys
from stream_lstm.process_health import name_metric_files
name_metric_files(sys.argv[1])
from stream_lstm.metrics import Metrics
m = Metrics()
m.forecasts_published.inc()
m.active_devices.set(int(sys.argv[2]))
"""


def test_a_silent_childs_live_gauges_leave_the_sums_and_its_counters_stay(tmp_path):
    """A SIGSTOPped child's devices were still counted beside those of the child that took
    its partitions: 83 active devices of 60 (a processes review)."""
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(metrics_dir))
    for name, devices in (("p0", "30"), ("p1", "40")):
        done = subprocess.run([sys.executable, "-c", NAMED_CHILD, name, devices], env=env,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
    slots = [Slot("p0", tmp_path / "p0.json"), Slot("p1", tmp_path / "p1.json")]
    host = HostMetrics(metrics_dir, slots, "rack-3")
    health = HealthState()
    for slot in slots:
        slot.proc = Running(os.getpid())  # (the status of the slot's current process is read)
        slot.status.write_text(json.dumps(status_of(health)))
    assert scrape(host)[("stream_lstm_active_devices", ())] == 70
    slots[0].status.write_text(json.dumps(status_of(health, age=STATUS_STALE_S + 1)))  # p0 silent
    got = scrape(host)
    assert got[("stream_lstm_active_devices", ())] == 40  # p1's alone
    assert got[("stream_lstm_forecasts_published_total", ())] == 2  # what p0 did stays counted
