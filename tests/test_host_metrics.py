"""The metrics of a host of worker processes (host_metrics.py): the children's series added up
through prometheus-client's multiprocess mode, and the host's own."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from prometheus_client.multiprocess import mark_process_dead
from prometheus_client.parser import text_string_to_metric_families

from stream_lstm.host_metrics import HostMetrics
from stream_lstm.metrics import HealthState
from stream_lstm.process_health import STATUS_STALE_S, Slot, StatusReporter
from tests.test_process_health import Running, status_of

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
        outcomes = {"committed": 0, "aborted": 9} if version == "v1" else {"committed": 40, "aborted": 1}
        StatusReporter(slot.status, health, lambda v=version, o=outcomes: {"model_version": v, "transactions": o},
                       lambda: None).write()
    got = scrape(host)
    assert got[("stream_lstm_model_info", (("process", "p0"), ("version", "v1")))] == 1
    assert got[("stream_lstm_model_info", (("process", "p1"), ("version", "v2")))] == 1
    # Each process's transactions too, beside the sums: p0 only rolls back, which p1's commits hid.
    tx = "stream_lstm_process_transactions_total"
    assert [got[(tx, (("outcome", o), ("process", p)))] for p in ("p0", "p1") for o in ("committed", "aborted")] == [0, 9, 40, 1]


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
