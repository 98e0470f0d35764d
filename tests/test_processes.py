"""Several worker processes on one host (processes.py): how many, each child's identity, and
the supervisor itself as ``stream-lstm run --processes 2`` through the real broker: a child
killed with SIGKILL is restarted and nothing is lost or duplicated, SIGTERM stops everything
cleanly, and the one metrics endpoint adds up the children."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from kafka import TopicPartition
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from stream_lstm import processes
from stream_lstm.config import Settings
from stream_lstm.environment import usable_cpus
from stream_lstm.kafka.clients import make_consumer
from stream_lstm.kafka.local_broker import free_port, pid_alive
from stream_lstm.models.registry import save_model
from stream_lstm.models.serving import fresh_model
from stream_lstm.processes import child_env, resolve_processes
from stream_lstm.signals import stop_signals
from tests.integration.helpers import (
    assert_exactly_once_and_continuous,
    produce_readings,
    published,
    read_topic,
)
from tests.integration.workers import settings_env

# ---- how many, and who each child is ----------------------------------------------------------


def test_a_number_is_taken_as_given_and_auto_is_the_usable_cores_up_to_the_partitions():
    assert resolve_processes(Settings(processes=3), partitions=lambda: 1) == 3
    assert resolve_processes(Settings(processes="auto"), partitions=lambda: 1000) == usable_cpus()
    assert usable_cpus() <= len(os.sched_getaffinity(0))
    # More children than partitions would idle, never ready.
    assert resolve_processes(Settings(processes="auto"), partitions=lambda: 1) == 1


def test_each_child_has_its_own_identity_and_state_and_the_rest_of_the_environment(tmp_path):
    s = Settings(instance_id="rack-3", state_dir=tmp_path / "state", metrics_port=9108)
    envs = [child_env(s, k, tmp_path / "m", {"KEEP": "me"}) for k in range(2)]
    assert [e["STREAM_LSTM_INSTANCE_ID"] for e in envs] == ["rack-3-p0", "rack-3-p1"]
    assert [e["STREAM_LSTM_STATE_DIR"] for e in envs] == [str(tmp_path / "state" / "p0"),
                                                          str(tmp_path / "state" / "p1")]
    for e in envs:
        assert e["KEEP"] == "me" and e["PROMETHEUS_MULTIPROC_DIR"] == str(tmp_path / "m")
        assert e["STREAM_LSTM_METRICS_PORT"] == "0" and e["STREAM_LSTM_PROCESSES"] == "1"
    # Everything else is the supervisor's (torch threads, the device...); the hostname stands in
    # for no instance id.
    e = child_env(Settings(state_dir=tmp_path), 0, tmp_path, {"STREAM_LSTM_TORCH_THREADS": "3"})
    assert e["STREAM_LSTM_TORCH_THREADS"] == "3"
    assert e["STREAM_LSTM_INSTANCE_ID"].endswith("-p0") and len(e["STREAM_LSTM_INSTANCE_ID"]) > 3


def test_a_configuration_the_children_refuse_stops_the_host_with_exit_2(tmp_path):
    """A 12-step model where the settings say 6: every restart would be refused again."""
    model = fresh_model(Settings(horizon=12, hidden_size=8))
    save_model(model.model, model.spec, tmp_path / "m.safetensors", {"version": "v12"})
    env = dict(os.environ, STREAM_LSTM_MODEL_PATH=str(tmp_path / "m.safetensors"),
               STREAM_LSTM_HORIZON="6", STREAM_LSTM_HIDDEN_SIZE="8",
               STREAM_LSTM_STATE_DIR=str(tmp_path / "state"), STREAM_LSTM_METRICS_PORT="0",
               STREAM_LSTM_BOOTSTRAP_SERVERS="127.0.0.1:1")  # never reached
    done = subprocess.run([sys.executable, "-m", "stream_lstm.cli", "run", "--processes", "2"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "refused its configuration" in done.stderr and "STREAM_LSTM_HORIZON=6" in done.stderr
    assert "restarting in" not in done.stderr and "Traceback" not in done.stderr
    # (the summary said "was waiting to restart" for the child that refused: it never would)
    assert ": refused its configuration (exit 2)" in done.stderr


# ---- the supervisor through the real broker ----------------------------------------------------
class Host:
    """``stream-lstm run --processes n`` as a user starts it, with its endpoint on a free port."""

    def __init__(self, settings: Settings, tmp_path: Path, n: int = 2) -> None:
        self.port = free_port()
        self.out, self.err = tmp_path / "host.out", tmp_path / "host.err"
        env = settings_env(settings, STREAM_LSTM_INSTANCE_ID="host",
                           STREAM_LSTM_METRICS_PORT=str(self.port))
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "stream_lstm.cli", "run", "--processes", str(n)],
                env=env, stdout=out, stderr=err)

    def log(self) -> list[dict]:
        lines = self.err.read_text().splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def children(self) -> dict[str, int]:
        """The pid each child was last started with, from the supervisor's log."""
        return {e["child"]: e["pid"] for e in self.log() if e["event"].startswith("started worker")}

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except OSError:  # not serving yet
            return 0, ""

    def metric(self, name: str) -> float:
        """The sum of every sample of ``name`` on the endpoint (0 while none)."""
        status, text = self.get("/metrics")
        if status != 200:
            return 0.0
        return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == name)

    def stop(self, timeout: float = 60, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)


def wait_for(condition, what: str, host: Host, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        assert host.proc.poll() is None, f"the supervisor exited while waiting for {what}:\n" \
                                         + host.err.read_text()[-3000:]
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}:\n" + host.err.read_text()[-3000:])


def fleet(devices: int, readings: int) -> list[tuple[str, float, float]]:
    rng = np.random.default_rng(3)
    return [(f"dev-{d}", 1_700_000_000.0 + 60 * k, float(20 + d + 5 * np.sin(k / 6) + rng.normal()))
            for k in range(readings) for d in range(devices)]


def committed_output(settings: Settings) -> int:
    """The output's last stable offsets, summed: what read_committed readers can see."""
    probe = make_consumer(settings, isolation_level="read_committed")
    try:
        parts = [TopicPartition(settings.output_topic, p)
                 for p in probe.partitions_for_topic(settings.output_topic) or ()]
        return sum(probe.end_offsets(parts).values()) if parts else 0
    finally:
        probe.close()


@pytest.fixture
def served_settings(settings_factory, topic_name, tmp_path):
    """The default settings, and both children serve one saved model, which the reference
    recomputes: ``(settings, that model)``."""
    s = settings_factory(input_topic=topic_name, output_topic=f"{topic_name}-out",
                         dlq_topic=f"{topic_name}-dlq", group_id=f"{topic_name}-g",
                         model_path=tmp_path / "model.safetensors")
    torch.manual_seed(11)
    served = fresh_model(s)
    save_model(served.model, served.spec, s.model_path, {"version": "v-host"})
    return s, served.model


@pytest.mark.kafka
@pytest.mark.timeout(300)
def test_a_killed_child_is_restarted_and_each_reading_is_forecast_once(served_settings, tmp_path):
    """p0 is killed while readings arrive, after it has committed output of its own: its
    restart restores and replays, and nothing is lost or published twice."""
    settings, model = served_settings
    readings = fleet(30, 60)
    host = Host(settings, tmp_path)
    try:
        wait_for(lambda: host.get("/readyz")[0] == 200, "both children ready", host)
        before = host.children()
        allowed = threading.Semaphore(len(readings) // 30 // 2)  # half the rounds before the kill

        def feed():
            for i in range(0, len(readings), 30):
                assert allowed.acquire(timeout=120)
                produce_readings(settings, settings.input_topic, readings[i : i + 30])
                time.sleep(0.1)

        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        (started,) = [e for e in host.log() if e["event"].startswith("supervising")]
        own = [str(Path(started["metrics_dir"]) / "counter_p0.db")]  # (named by its slot)
        published_by_p0 = "stream_lstm_forecasts_published_total"
        wait_for(lambda: sum(x.value for f in MultiProcessCollector.merge(own) for x in f.samples
                             if x.name == published_by_p0) > 0, "p0's own committed forecasts", host)
        os.kill(before["p0"], signal.SIGKILL)
        for _ in range(len(readings)):
            allowed.release()
        wait_for(lambda: host.children()["p0"] != before["p0"], "p0 restarted", host)
        assert host.children()["p1"] == before["p1"]
        feeder.join(120)
        assert not feeder.is_alive()
        history: dict[str, list[float]] = {}
        for dev, _, v in readings:
            history.setdefault(dev, []).append(v)
        out = read_topic(settings, settings.output_topic, expect=published(history, settings),
                         timeout_s=180, idle_s=10)
        # Exactly one forecast a reading, each equal to an uninterrupted worker's.
        assert_exactly_once_and_continuous(out, history, model, settings,
                                           host.err.read_text())
        exits = [e for e in host.log() if e["event"].startswith("worker process p0 exited")]
        assert [e["exit_code"] for e in exits] == [-signal.SIGKILL]
        assert host.metric("stream_lstm_process_restarts_total") == 1
        # The new p0 replayed what its predecessor had committed since its last checkpoint.
        assert host.metric("stream_lstm_replayed_readings_total") > 0
        wait_for(lambda: host.get("/readyz")[0] == 200, "the host ready again", host)
    finally:
        assert host.stop() == 0, host.err.read_text()[-3000:]


@pytest.mark.kafka
@pytest.mark.timeout(300)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, pytest.param(signal.SIGHUP, marks=pytest.mark.skipif(
    signal.getsignal(signal.SIGHUP) == signal.SIG_IGN, reason="run under nohup: SIGHUP is ignored, as meant"))],
    ids=["SIGTERM", "Ctrl-C", "SIGHUP"])
def test_a_signal_stops_every_child_cleanly_and_the_supervisor_exits_0(served_settings, tmp_path, sig):
    """SIGTERM (Kubernetes, systemd), SIGINT (Ctrl-C: the terminal signals the supervisor
    alone, its children run in sessions of their own) or SIGHUP (the terminal closed: it ended
    the supervisor uncleanly, its children left to notice they were orphaned)."""
    settings, _ = served_settings
    readings = fleet(20, 40)
    host = Host(settings, tmp_path)
    try:
        wait_for(lambda: host.get("/readyz")[0] == 200, "both children ready", host)
        pids = host.children()
        produce_readings(settings, settings.input_topic, readings)
        wait_for(lambda: committed_output(settings) > 0, "the first forecasts", host)
    finally:
        t0 = time.monotonic()
        code = host.stop(timeout=90, sig=sig)
    took = time.monotonic() - t0
    err = host.err.read_text()
    assert code == 0, err[-3000:]
    assert took < 45, f"stopping took {took:.1f}s"
    assert "Traceback" not in err
    assert not any(pid_alive(pid) for pid in pids.values())
    (stopped,) = [e for e in host.log() if e["event"].startswith("stopped 2 worker processes")]
    assert stopped["stopped"] == {name: {"pid": pid, "outcome": "stopped"} for name, pid in pids.items()}
    # Each child stopped as a worker does (its last transaction committed, the group left).
    for event in ("stopping: every changed device checkpointed and committed", "worker stopped"):
        assert sorted(e["instance"] for e in host.log() if e["event"] == event) == ["host-p0", "host-p1"]
    said = {e.get("stopped_by") for e in host.log() if e["event"] == "worker stopped"}
    assert said and said <= {"SIGTERM", "SIGINT"}  # (what stopped it: the host's SIGTERM, or a Ctrl-C of the group)
    out = read_topic(settings, settings.output_topic, idle_s=2, timeout_s=30)
    keys = [(json.loads(r.value)["partition"], json.loads(r.value)["offset"]) for r in out]
    assert 0 < len(keys) == len(set(keys)) <= len(readings)


@pytest.mark.kafka
@pytest.mark.timeout(300)
def test_children_whose_supervisor_is_killed_while_they_start_stop_themselves(served_settings, tmp_path):
    """A supervisor SIGKILLed while its children were still starting (importing torch, loading
    the model) left them running for ever, in the group with no endpoint: each child took its
    parent's pid when its status reporter started, by then already init's. The next
    supervisor's children then found the stores held and the host exited 2 (a processes review)."""
    settings, _ = served_settings
    host = Host(settings, tmp_path)
    pids = wait_for(lambda: len(c := host.children()) == 2 and c, "both children started", host)
    host.proc.kill()  # (before either child has built its worker)
    host.proc.wait(10)
    try:
        deadline = time.monotonic() + 60
        while any(pid_alive(pid) for pid in pids.values()) and time.monotonic() < deadline:
            time.sleep(0.2)
        alive = [name for name, pid in pids.items() if pid_alive(pid)]
        assert not alive, f"{alive} still running without their supervisor:\n" + host.err.read_text()[-3000:]
    finally:
        for pid in pids.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert "the supervisor is gone; stopping" in host.err.read_text()


@pytest.mark.kafka
@pytest.mark.timeout(300)
def test_the_host_endpoint_adds_up_the_children(served_settings, tmp_path):
    settings, _ = served_settings
    readings = fleet(30, 40)
    host = Host(settings, tmp_path)
    try:
        wait_for(lambda: host.get("/readyz")[0] == 200, "both children ready", host)
        status, body = host.get("/readyz")
        assert json.loads(body)["components"] == {"p0": "ok", "p1": "ok"}
        assert host.get("/healthz")[0] == 200
        produce_readings(settings, settings.input_topic, readings)
        history: dict[str, list[float]] = {}
        for dev, _, v in readings:
            history.setdefault(dev, []).append(v)
        read_topic(settings, settings.output_topic, expect=published(history, settings), timeout_s=120)
        consumed = "stream_lstm_readings_consumed_total"
        wait_for(lambda: host.metric(consumed) == len(readings), "every reading counted", host,
                 timeout=30)
        # Each child's own counter, from its file in the multiprocess directory (named by its
        # slot, which a restarted child takes over: process_health.name_metric_files).
        (started,) = [e for e in host.log() if e["event"].startswith("supervising")]
        per_child = {}
        for name in host.children():
            files = [str(Path(started["metrics_dir"]) / f"counter_{name}.db")]
            per_child[name] = sum(s.value for f in MultiProcessCollector.merge(files)
                                  for s in f.samples if s.name == consumed)
        assert all(n > 0 for n in per_child.values()), per_child
        assert sum(per_child.values()) == host.metric(consumed) == len(readings)
        # Devices in memory add up too (each device lives in one child; the gauge is "livesum").
        wait_for(lambda: host.metric("stream_lstm_active_devices") == 30, "30 devices", host,
                 timeout=30)
        assert host.metric("stream_lstm_processes") == 2
        # Each process's transactions beside the host's sums (from its status file, a second
        # apart): they add up to them (StreamLstmCommitsFailing reads both).
        tx, per_process = "stream_lstm_transactions_total", "stream_lstm_process_transactions_total"
        wait_for(lambda: host.metric(per_process) == host.metric(tx) > 0, "per-process transactions", host,
                 timeout=30)
    finally:
        assert host.stop() == 0, host.err.read_text()[-3000:]


def test_the_run_command_line_overrides_only_the_metrics_port_and_the_processes():
    parser = argparse.ArgumentParser()
    processes.add_arguments(parser)
    defaults = parser.parse_args([])
    assert defaults.metrics_port is None and defaults.processes is None  # the settings decide
    args = parser.parse_args(["--metrics-port", "9200", "--processes", "auto"])
    assert (args.metrics_port, args.processes) == (9200, "auto")
    with pytest.raises(SystemExit):
        parser.parse_args(["--metrics-port", "high"])


def supervise(sup: processes.Supervisor, done) -> tuple[dict[str, int], dict[str, list[int]]]:
    """Run ``sup`` (in this thread, as the CLI does) until ``done(starts)`` holds for the
    count of starts of each child, then stop it; return those counts and each child's exit
    codes before the stop. The supervisor's own calls say when: no polling of its state."""
    starts: dict[str, int] = {}
    exits: dict[str, list[int]] = {}
    enough = threading.Event()
    start, exited = sup._start, sup._exited

    def counted_start(slot, k):
        start(slot, k)
        starts[slot.name] = starts.get(slot.name, 0) + 1
        if done(starts):
            enough.set()

    def counted_exit(slot, code):
        if not enough.is_set():  # the supervisor's own stop at the end is not counted
            exits.setdefault(slot.name, []).append(code)
        exited(slot, code)

    sup._start, sup._exited = counted_start, counted_exit

    def stop_when_done():
        enough.wait(60)
        sup._signal(signal.SIGTERM, None)

    handlers = {sig: signal.getsignal(sig) for sig in stop_signals()}
    threading.Thread(target=stop_when_done, daemon=True).start()
    try:
        sup.run()
    finally:  # run() installs the supervisor's handlers in this (pytest's) process
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert enough.is_set(), f"timed out: started {starts}, exits {exits}"
    return starts, exits


HUNG_CHILD = """
import json, os, sys, time
status = sys.argv[sys.argv.index("--status-file") + 1]
while True:  # up, but its loop never turns: every status says not live
    with open(status + ".tmp", "w") as f:
        json.dump({"pid": os.getpid(), "ts": time.time(), "mono": time.monotonic(), "live": False, "ready": False,
                   "liveness": "main loop silent for 99s", "components": {}}, f)
    os.replace(status + ".tmp", status)
    time.sleep(0.1)
"""


def test_a_hung_child_is_killed_and_restarted(tmp_path, monkeypatch):
    # The supervisor's own behaviour, with a stand-in child that runs but never reports live.
    monkeypatch.setattr(processes, "HUNG_AFTER_S", 0.5)
    s = Settings(state_dir=tmp_path / "state", metrics_port=0, instance_id="h")
    sup = processes.Supervisor(s, 1, command=[sys.executable, "-c", HUNG_CHILD])
    starts, exits = supervise(sup, lambda starts: starts.get("p0", 0) >= 2)
    assert exits == {"p0": [-signal.SIGKILL]}  # killed by the supervisor, then started again


# Children that are live (their loop turns) but not ready, each for its own reason; the
# supervisor's stand-ins are told apart by their status file's name.
UNREADY_CHILD = """
import json, os, signal, sys, time
status = sys.argv[sys.argv.index("--status-file") + 1]
name = os.path.basename(status).removesuffix(".json")
components = {
    # Stuck restoring: stops cleanly on SIGTERM, as a worker does.
    "p0": {"broker": "ok", "model": "ok", "partitions": "restoring [0]"},
    # Holding none while its group has not settled (joining, a rebalance).
    "p1": {"broker": "ok", "model": "ok", "partitions": "waiting for assignment"},
    # A broker outage, in the middle of a restore.
    "p2": {"broker": "no consumer-group heartbeat for 40s", "model": "ok",
           "partitions": "restoring [2]"},
    # Stuck restoring, and deaf to SIGTERM.
    "p3": {"broker": "ok", "model": "ok", "partitions": "restoring [3]"},
}.get(name)  # p4: stuck before its first status (an import, a device's initialisation)
if name == "p0":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
elif name == "p3":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
while True:
    if components is not None:
        with open(status + ".tmp", "w") as f:
            json.dump({"pid": os.getpid(), "ts": time.time(), "mono": time.monotonic(), "live": True, "ready": False,
                       "liveness": "last loop iteration 0.1s ago", "components": components}, f)
        os.replace(status + ".tmp", status)
    time.sleep(0.1)
"""


def test_a_child_stuck_unready_for_a_reason_of_its_own_is_restarted_and_no_other(tmp_path, monkeypatch,
                                                                                 caplog):
    """Stopped (SIGTERM, then SIGKILL if it does not go) and restarted: a child that stays not
    ready for the same reason of its own, and one that never reports at all. Left alone: one
    that holds no partitions, and one waiting on the broker."""
    # A child starts well within it: five Python stand-ins at once on two loaded cores can
    # take over a second to write their first status (1.5 s made this test fail now and then).
    monkeypatch.setattr(processes, "STUCK_AFTER_S", 5.0)
    monkeypatch.setattr(processes, "STOP_GRACE_S", 0.5)
    s = Settings(state_dir=tmp_path / "state", metrics_port=0, instance_id="h")
    sup = processes.Supervisor(s, 5, command=[sys.executable, "-c", UNREADY_CHILD])
    with caplog.at_level("ERROR", logger="stream_lstm.processes"):
        # p0 restarted twice: each of the others has been unready for 2 * STUCK_AFTER_S by then.
        starts, exits = supervise(sup, lambda starts: starts.get("p0", 0) >= 3
                                  and starts.get("p3", 0) >= 2 and starts.get("p4", 0) >= 2)
    assert starts["p1"] == starts["p2"] == 1 and "p1" not in exits and "p2" not in exits
    assert exits["p0"] == [0, 0]  # stopped cleanly, twice
    assert exits["p3"][0] == -signal.SIGKILL  # killed STOP_GRACE_S after its SIGTERM
    assert exits["p4"][0] == -signal.SIGTERM
    stuck = {r.child: r.not_ready for r in caplog.records if "stopping it to restart it" in r.getMessage()}
    assert stuck == {"p0": "partitions: restoring [0]", "p3": "partitions: restoring [3]",
                     "p4": "no status yet"}
    assert any(r.getMessage() == "worker process p3 did not stop in 0.5s; killing it"
               for r in caplog.records)


def test_a_stop_while_the_children_connect_is_a_clean_stop(settings_factory, tmp_path):
    """Ctrl-C before the broker answers: each child ends its connect at once (130), which is a
    clean stop (nothing was open), and so is the supervisor's (0)."""
    s = settings_factory().model_copy(update={"bootstrap_servers": f"127.0.0.1:{free_port()}"})  # no one there
    host = Host(s, tmp_path)
    try:  # each child says which model it serves, then connects
        wait_for(lambda: {e.get("instance") for e in host.log() if e["event"].startswith("serving model")}
                 >= {"host-p0", "host-p1"}, "both children connecting", host)
    finally:
        code = host.stop(timeout=90, sig=signal.SIGINT)
    assert code == 0, host.err.read_text()[-3000:]
    (stopped,) = [e for e in host.log() if e["event"].startswith("stopped 2 worker processes")]
    assert {v["outcome"] for v in stopped["stopped"].values()} == {"stopped"}


def test_a_wall_clock_step_kills_no_child(tmp_path, caplog):
    """Ages were read on the wall clock: an NTP step or a VM resume of over two minutes made
    every live child's status look two minutes old, and the supervisor SIGKILLed them at once."""
    from stream_lstm.process_health import Slot

    s = Settings(state_dir=tmp_path / "state", metrics_port=0, instance_id="c")
    sup = processes.Supervisor(s, 1, command=[sys.executable, "-c", "pass"])
    killed = []
    slot = Slot("p0", tmp_path / "p0.json")
    slot.proc = type("Running", (), {"pid": 1, "kill": lambda self: killed.append(True)})()
    stepped = {"pid": 1, "ts": time.time() - 200.0, "mono": time.monotonic(), "live": True,
               "liveness": "ok", "ready": True, "components": {}}
    sup._kill_if_hung(slot, stepped, time.monotonic())
    assert killed == []
    silent = dict(stepped, ts=time.time(), mono=time.monotonic() - processes.HUNG_AFTER_S - 1)
    with caplog.at_level("ERROR", logger="stream_lstm.processes"):
        sup._kill_if_hung(slot, silent, time.monotonic())  # a status not rewritten for that long
    assert killed == [True]
    # (it said "not been live for 120s (last loop iteration 0.0s ago)": the stale status's words)
    assert "worker process p0 has written no status for 121s (hung, or its status directory full)" in caplog.text


COUNTING_CHILD = """
import sys
from pathlib import Path
from stream_lstm.process_health import name_metric_files
name_metric_files(Path(sys.argv[sys.argv.index("--status-file") + 1]).stem)
from stream_lstm.metrics import Metrics
m = Metrics()
m.forecasts_published.inc()
m.active_devices.set(7)  # a live gauge: it leaves the host's sum when the child dies
sys.exit(3)  # the broker away: restarted, again and again
"""


def test_a_child_restarted_again_and_again_leaves_one_set_of_metric_files(tmp_path, monkeypatch):
    """Each child wrote files named by its pid, kept after it died (its counters count what it
    did): a child restarted every minute through an outage left thousands, every one read at
    each scrape. Named by the slot, a restarted child takes its predecessor's over."""
    from stream_lstm import process_health

    monkeypatch.setattr(process_health, "BACKOFF_FIRST_S", 0.05)
    monkeypatch.setattr(processes, "BACKOFF_MAX_S", 0.05)
    s = Settings(state_dir=tmp_path / "state", metrics_port=0, instance_id="m")
    sup = processes.Supervisor(s, 1, command=[sys.executable, "-c", COUNTING_CHILD])
    seen, exited, exits = {}, sup._exited, []

    def look_after_the_fifth_exit(slot, code):  # (not at the sixth start: that child may
        exited(slot, code)                       # have counted and set its gauge already)
        exits.append(code)
        if len(exits) == 5:
            seen["files"] = sorted(p.name for p in Path(sup.metrics_dir).glob("*.db"))
            seen["exposition"] = sup.metrics.exposition().decode()

    sup._exited = look_after_the_fifth_exit
    supervise(sup, lambda starts: starts.get("p0", 0) >= 6)
    assert seen["files"] and all(name.endswith("_p0.db") for name in seen["files"]), seen["files"]
    assert "stream_lstm_forecasts_published_total 5.0" in seen["exposition"]  # five children's
    assert "stream_lstm_active_devices 7.0" not in seen["exposition"]  # none of them live


def test_the_supervisor_reaps_the_orphans_it_inherits_and_leaves_its_children_to_popen():
    """As a container's PID 1 it inherits every orphan (a child's resource_tracker, a trainer
    left by a child killed as hung), and left each a zombie. A subreaper stands in for PID 1."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_CHILD_SUBREAPER = 36
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    try:
        ours = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
        # A process that leaves an orphan behind, which exits at once: re-parented to us.
        subprocess.run(["sh", "-c", "sh -c 'exit 0' & exit 0"], check=True)
        ours_done = time.monotonic() + 10
        while time.monotonic() < ours_done:  # both exited: ours, and the orphan
            zombies = [p for p in Path("/proc").iterdir() if p.name.isdigit() and zombie_of(p, os.getpid())]
            if len(zombies) >= 2:
                break
            time.sleep(0.05)  # (no event to wait on: the kernel re-parents and they exit)
        assert len(zombies) >= 2, zombies
        processes.reap_orphans({ours.pid})
        assert ours.wait(timeout=5) == 3  # ours left to Popen: its exit code there to read
        processes.reap_orphans(set())  # (the next tick, as the supervisor's loop turns)
        left = [p for p in Path("/proc").iterdir() if p.name.isdigit() and zombie_of(p, os.getpid())]
        assert left == []  # the orphan reaped too
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def zombie_of(proc_dir, parent: int) -> bool:
    try:
        fields = (proc_dir / "stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] == "Z" and int(fields[1]) == parent


def test_one_stop_delivered_twice_is_one_stop_and_a_later_second_one_hurries(tmp_path):
    """`timeout` or a kill of the process group signals the supervisor twice at once: that is
    one clean stop, not the "second signal" that kills the children at once."""
    sup = processes.Supervisor(Settings(state_dir=tmp_path, metrics_port=0, instance_id="s"), 1,
                               command=[sys.executable, "-c", "pass"])
    sup._signal(signal.SIGTERM, None)
    sup._signal(signal.SIGTERM, None)
    assert sup._stop.is_set() and not sup._hurry
    sup._second.first_at -= 1.0  # a second later: Ctrl-C pressed again
    sup._signal(signal.SIGINT, None)
    assert sup._hurry


def test_a_child_of_a_large_fleet_is_given_the_time_its_clean_stop_takes(tmp_path):
    """Killed 45 s after its SIGTERM, a child of a million devices (about 0.25 ms a changed
    device to checkpoint) was killed mid-stop and rebuilt its store at the next start."""
    def grace(devices):
        s = Settings(state_dir=tmp_path / "state", metrics_port=0, instance_id="h", max_devices=devices)
        return processes.Supervisor(s, 1, command=[sys.executable, "-c", "pass"]).stop_grace_s

    assert grace(100_000) == processes.STOP_GRACE_S  # the default fleet: as before
    assert grace(1_000_000) == pytest.approx(processes.STOP_GRACE_S + 225)


@pytest.mark.parametrize("processes_", ["1", "2"])
def test_a_state_dir_it_cannot_make_and_an_inherited_multiprocess_dir_are_one_line_each(tmp_path, processes_):
    """Under the supervisor the state directory was made by it: a traceback, exit 1 (restarted
    for ever), where one worker said one line and exit 2. An inherited PROMETHEUS_MULTIPROC_DIR
    that does not exist was a traceback at the first metric (a processes review). No broker
    is asked: both are said before."""
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("STREAM_LSTM_")}
    env.update(PYTHONPATH=str(Path(__file__).resolve().parents[1]), PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "none"),
               STREAM_LSTM_PROCESSES=processes_, STREAM_LSTM_STATE_DIR=str(blocked / "state"),
               STREAM_LSTM_MODEL_DIR=str(tmp_path / "models"), STREAM_LSTM_METRICS_PORT="0",
               STREAM_LSTM_BOOTSTRAP_SERVERS="127.0.0.1:1")
    done = subprocess.run([sys.executable, "-m", "stream_lstm.cli", "run"], env=env, capture_output=True,
                          text=True, timeout=120)
    said = [line for line in done.stderr.splitlines() if not line.startswith("{")]
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert said[0] == ("run: PROMETHEUS_MULTIPROC_DIR is ignored (the supervisor of STREAM_LSTM_PROCESSES "
                       "sets its own for its worker processes)")
    states = [blocked / "state"] if processes_ == "1" else [blocked / "state" / "p0", blocked / "state" / "p1"]
    expected = {f"run: invalid setting STREAM_LSTM_STATE_DIR: cannot write the state store there: "
                f"Not a directory: {d}" for d in states}
    assert said[1:] and set(said[1:]) <= expected  # (the other child may be stopped before it says so)


def test_more_processes_than_cores_is_said(caplog, monkeypatch):
    monkeypatch.setattr(processes, "usable_cpus", lambda: 2)
    with caplog.at_level("WARNING", logger="stream_lstm.processes"):
        assert processes.resolve_processes(Settings(processes="8")) == 8
    assert "STREAM_LSTM_PROCESSES=8 is more than the 2 usable CPU cores" in caplog.text


FENCED_CHILD = """
import os, signal, sys, time
status = sys.argv[sys.argv.index("--status-file") + 1]
if os.path.basename(status) == "p0.json":
    sys.exit(4)  # fenced twice: it left its transactional id to another live worker
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # (sigwait: a SIGTERM before a
signal.sigwait({signal.SIGTERM})  # sleep began waited out the sleep; test_children's flake)
sys.exit(0)
"""


def test_a_child_that_left_its_id_to_another_live_worker_is_not_restarted_and_the_others_go_on(tmp_path):
    """Exit 2 (a refusal) stopped every child of the host: with two hosts configured alike,
    each pair of children lost independently and both hosts stopped (a review). Exit 4 stops
    that child alone; the host stays live and says why on /readyz."""
    s = Settings(state_dir=tmp_path / "state", metrics_port=0, instance_id="f")
    sup = processes.Supervisor(s, 2, command=[sys.executable, "-c", FENCED_CHILD])
    seen, tend = {}, sup._tend

    def look(slot, k):
        tend(slot, k)
        if slot.name == "p0" and slot.last_exit == 4 and "p0" not in seen:
            seen["p0"] = (slot.proc, slot.restart_at, sup.health.liveness(), sup.health.readiness()[1]["p0"])
            sup._signal(signal.SIGTERM, None)

    sup._tend = look
    handlers = {sig: signal.getsignal(sig) for sig in stop_signals()}
    try:
        code = sup.run()
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert seen["p0"] == (None, None, (True, "every process is live"),
                          "not running: it left its transactional id to another live worker (exit 4)")
    assert code == 0 and sup.refused is None  # p1 ran on, and stopped cleanly at the end
