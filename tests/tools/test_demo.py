"""`stream-lstm up`: a fresh broker each run, a short worker line, and a quiet Ctrl-C.

The Kafka test runs `up` as a terminal would: in its own session, Ctrl-C being SIGINT to the
whole process group. The rest are quick unit tests of the pieces it is built from.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from kafka import KafkaAdminClient

from stream_lstm.config import Settings, SettingsError
from stream_lstm.kafka.local_broker import LocalBroker, free_port, pid_alive
from stream_lstm.kafka.topics import TopicSpec, ensure_topics
from stream_lstm.tools.demo import WorkerLogRelay, ensure_broker, summarize_log_line

REPO = Path(__file__).resolve().parents[2]


class Lines:
    """Collects a process's output lines in a thread; ``wait_for`` blocks until one matches."""

    def __init__(self, stream) -> None:
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._done = False
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._done = True
            self._cond.notify_all()

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        rx, deadline = re.compile(pattern), time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines:
                    if m := rx.search(line):
                        return m
                left = deadline - time.monotonic()
                if self._done or left <= 0:
                    raise AssertionError(f"no line matching {pattern!r}; output:\n{self.text()}")
                self._cond.wait(left)

    def text(self) -> str:
        return "\n".join(self.lines)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


def processes_of_run(run_dir: str) -> list[int]:
    """Live processes whose environment names this run's directory (all `up` started)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if run_dir.encode() in (d / "environ").read_bytes() and pid_alive(int(d.name)):
                    out.append(int(d.name))
            except OSError:
                pass
    return out


@pytest.mark.kafka
@pytest.mark.timeout(300)
def test_up_starts_a_fresh_broker_shows_a_short_worker_line_and_stops_quietly_on_ctrl_c():
    nothing_there = Settings(bootstrap_servers=f"127.0.0.1:{free_port()}")
    port = free_port()

    # An earlier run on the same port leaves a topic behind.
    bootstrap, broker = ensure_broker(nothing_there, port, use_existing=False)
    assert broker is not None and bootstrap == f"127.0.0.1:{port}"
    try:
        ensure_topics(nothing_there.model_copy(update={"bootstrap_servers": bootstrap}),
                      [TopicSpec("left-by-an-earlier-run", 1, {})])
        first_dir = broker.data_dir
    finally:
        broker.stop()
        shutil.rmtree(broker.data_dir, ignore_errors=True)

    # The next run is a whole `up`, started as a terminal starts a foreground job.
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("STREAM_LSTM_")}
    env.update(STREAM_LSTM_METRICS_PORT="0", PYTHONUNBUFFERED="1")
    up = subprocess.Popen([sys.executable, "-m", "stream_lstm.cli", "up", "--port", str(port),
                           "--devices", "5"], env=env, cwd=REPO, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True)
    out = Lines(up.stdout)
    run_dir = None
    try:
        run_dir = out.wait_for(r"this run's directory: (\S+)", 30).group(1)
        out.wait_for(rf"^broker 127\.0\.0\.1:{port} \| worker pid \d+", 150)
        admin = KafkaAdminClient(bootstrap_servers=f"127.0.0.1:{port}")
        try:
            assert "left-by-an-earlier-run" not in admin.list_topics()  # a fresh broker
        finally:
            admin.close()
        assert Path(run_dir, "broker") != first_dir
        out.wait_for(rf"^worker: broker 127\.0\.0\.1:{port} \| sensor-readings -> "
                     r"sensor-forecasts \| cpu \| model v0000-untrained \| metrics off$", 120)
        out.wait_for(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d  sim-\d{4} ", 120)  # a forecast
        running = processes_of_run(run_dir)  # worker, its trainer, simulator, ...
        assert len(running) >= 3, running

        os.killpg(up.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole group
        assert up.wait(timeout=120) == 0
        out.join(timeout=10)
        text = out.text()
        assert "Traceback" not in text and "KeyboardInterrupt" not in text, text
        assert '"settings":' not in text and '{"ts"' not in text, text  # no raw JSON lines
        stopped = out.wait_for(r"^stopped: worker \(pid (\d+), ([\d,]+) forecasts\), "
                               r"simulator \(pid (\d+)[^)]*\), local broker \(pid (\d+)\)$", 0)
        assert int(stopped.group(2).replace(",", "")) > 0
        for pid in (stopped.group(1), stopped.group(3), stopped.group(4)):
            assert not pid_alive(int(pid)), f"pid {pid} still runs"
        assert processes_of_run(run_dir) == []  # the trainer too
        out.wait_for(rf"^removed {re.escape(run_dir)}$", 0)
        assert not Path(run_dir).exists()
    finally:  # never leave anything behind, whatever failed
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait()
        if run_dir:
            for pid in processes_of_run(run_dir):
                os.kill(pid, signal.SIGKILL)
            LocalBroker(port, Path(run_dir, "broker")).stop()
            shutil.rmtree(run_dir, ignore_errors=True)


@pytest.mark.kafka
@pytest.mark.timeout(300)
def test_up_on_your_broker_runs_on_topics_of_its_own_and_forecasts(bootstrap, tmp_path):
    """STREAM_LSTM_BOOTSTRAP_SERVERS set: that broker, but an earlier run's readings (here, the
    fleet's devices a year ahead on the configured input topic) cannot make this run's late."""
    from stream_lstm.encoding import encode_reading
    from stream_lstm.kafka.clients import make_producer

    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("STREAM_LSTM_")}
    env.update(STREAM_LSTM_BOOTSTRAP_SERVERS=bootstrap, STREAM_LSTM_METRICS_PORT="0",
               STREAM_LSTM_INPUT_TOPIC=f"in-{tmp_path.name}", STREAM_LSTM_OUTPUT_TOPIC=f"out-{tmp_path.name}",
               STREAM_LSTM_CHANGELOG_TOPIC=f"chg-{tmp_path.name}", PYTHONUNBUFFERED="1",
               # your trainer's models topic: the run neither follows nor makes it
               STREAM_LSTM_TRAINER="external", STREAM_LSTM_MODELS_TOPIC=f"models-{tmp_path.name}")
    # Your worker's own changelog, named in your environment: the run must neither write to it
    # nor delete it with the run's topics.
    ensure_topics(Settings(bootstrap_servers=bootstrap),
                  [TopicSpec(env["STREAM_LSTM_CHANGELOG_TOPIC"], 1, {"cleanup.policy": "compact"})])
    producer = make_producer(Settings(bootstrap_servers=bootstrap))
    for d in range(5):  # the fleet's devices, each a year ahead
        dev = f"sim-{d:04d}"
        producer.send(env["STREAM_LSTM_INPUT_TOPIC"], encode_reading(dev, time.time() + 86_400 * 365, [1.0]),
                      key=dev.encode())
    producer.flush()
    producer.close()
    done = subprocess.run([sys.executable, "-m", "stream_lstm.cli", "up", "--devices", "5", "--duration", "45"],
                          env=env, cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    own = re.search(r"^using your broker at \S+ \(STREAM_LSTM_BOOTSTRAP_SERVERS\), with topics and a consumer "
                    r"group of this run's own: (\S+) -> (\S+)$", done.stdout, re.MULTILINE)
    assert own and own.group(1).startswith(env["STREAM_LSTM_INPUT_TOPIC"] + "-up-"), done.stdout[-3000:]
    forecasts = re.search(r"^stopped: worker \(pid \d+, ([\d,]+) forecasts\)", done.stdout, re.MULTILINE)
    assert forecasts and int(forecasts.group(1).replace(",", "")) > 0, done.stdout[-3000:]
    assert "starting a local Kafka broker" not in done.stdout
    # The run's own topics go at the end: a shared cluster must not collect one set a run.
    deleted = re.search(r"^deleted this run's topics on your broker: (.+)$", done.stdout, re.MULTILINE)
    assert deleted and own.group(1) in deleted.group(1).split(", "), done.stdout[-3000:]
    # ... and its consumer group (a review: one was left a run)
    group = re.search(r" \(and its consumer group (\S+)\)$", deleted.group(1))
    assert group and group.group(1).startswith("stream-lstm-up-"), done.stdout[-3000:]
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        assert not {own.group(1), own.group(2)} & set(admin.list_topics())
        assert env["STREAM_LSTM_CHANGELOG_TOPIC"] in admin.list_topics()
        assert env["STREAM_LSTM_CHANGELOG_TOPIC"] + "-up-" in deleted.group(1)  # the run's own
        assert env["STREAM_LSTM_MODELS_TOPIC"] not in admin.list_topics()
        assert group.group(1) not in {g["group_id"] for g in admin.list_groups()}
    finally:
        admin.close()


@pytest.mark.kafka
@pytest.mark.timeout(300)
def test_up_whose_worker_exits_by_itself_exits_with_its_code(bootstrap):
    """The worker refused to start (its metrics port taken): `up` said so, and exited 0, so a
    script running it read a failure as success."""
    import socket

    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("STREAM_LSTM_")}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env.update(STREAM_LSTM_BOOTSTRAP_SERVERS=bootstrap, STREAM_LSTM_METRICS_HOST="127.0.0.1",
                   STREAM_LSTM_METRICS_PORT=str(taken.getsockname()[1]), PYTHONUNBUFFERED="1")
        done = subprocess.run([sys.executable, "-m", "stream_lstm.cli", "up", "--devices", "2",
                               "--duration", "120"], env=env, cwd=REPO, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=240)
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
    assert "the worker exited with code 2" in done.stdout and "Address already in use" in done.stdout


# ---- pieces, without Kafka ---------------------------------------------------------------
def test_the_start_up_line_and_model_events_are_short_and_other_info_lines_are_not_shown():
    start = {"ts": "t", "level": "info", "logger": "stream_lstm.worker",
             "event": "stream-lstm started: bootstrap_servers=b:1 ...",
             "connected": {"bootstrap_servers": "b:1", "input_topic": "in", "output_topic": "out",
                           "group_id": "g", "compute_device": "cpu", "model_version": "v7",
                           "metrics": "http://127.0.0.1:9108/metrics"},
             "settings": {"bootstrap_servers": "b:1", "sasl_password": "***"}}
    assert summarize_log_line(json.dumps(start)) == (
        "worker: broker b:1 | in -> out | cpu | model v7 | metrics http://127.0.0.1:9108/metrics")
    gate = {"level": "info", "event": "promotion gate: promote: better by 12%",
            "champion": "v0", "champion_error": 0.51234, "challenger_error": 0.4, "seconds": 3.2}
    assert summarize_log_line(json.dumps(gate)) == (
        "worker: promotion gate: promote: better by 12% (challenger error 0.4 vs champion "
        "0.5123, 3.2 s)")
    swap = {"level": "info", "event": "model swapped", "from": "v0", "to": "v1",
            "devices_to_rewarm": 5}
    assert summarize_log_line(json.dumps(swap)) == "worker: model swapped: now serving v1 (was v0)"
    warn = {"ts": "t", "level": "warning", "logger": "x", "event": "broker not reachable; retrying",
            "error": "NoBrokersAvailable()" * 30}
    short = summarize_log_line(json.dumps(warn))
    assert short.startswith("worker warning: broker not reachable; retrying (error=")
    assert len(short) <= 240 and '"ts"' not in short
    err = {"level": "error", "event": "publishing failed", "exception": "Traceback ...\nKafkaError: x"}
    assert summarize_log_line(json.dumps(err)) == "worker error: publishing failed [KafkaError: x]"
    for quiet in ('{"level": "info", "event": "partitions assigned; restoring their state"}',
                  "a line that is not JSON", "[1, 2]", ""):
        assert summarize_log_line(quiet) is None


def test_the_relay_keeps_every_line_in_the_log_file_and_shows_only_short_ones(tmp_path):
    lines = [json.dumps({"level": "info", "event": "stream-lstm started: ...",
                         "connected": {"bootstrap_servers": "b:1"}, "settings": {"a": 1}}),
             json.dumps({"level": "info", "event": "partitions assigned"}),
             "some warning a library printed",
             json.dumps({"level": "info", "event": "worker stopped", "consumed": 9, "forecasts": 7})]
    read, write = os.pipe()
    with os.fdopen(write, "wb") as w:
        w.write("".join(line + "\n" for line in lines).encode())
    shown: list[str] = []
    with os.fdopen(read, "rb") as r:
        relay = WorkerLogRelay(r, tmp_path / "worker.log", shown.append)
        relay.run()  # to EOF, in this thread
    assert (tmp_path / "worker.log").read_text().splitlines() == lines
    assert len(shown) == 1 and shown[0].startswith("worker: broker b:1 |")
    assert relay.stopped["forecasts"] == 7


def test_up_refuses_a_port_in_use_rather_than_running_on_a_broker_it_did_not_choose():
    """Without STREAM_LSTM_BOOTSTRAP_SERVERS, `up` never reuses what answers on a port: a broker
    left by `kafka up` held earlier runs' state, and every reading came out late."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SettingsError, match=f"port {port} is in use"):
            ensure_broker(Settings(bootstrap_servers=f"127.0.0.1:{port}"), port, use_existing=False)


def test_up_refuses_a_broker_you_named_that_does_not_answer():
    """A mistyped STREAM_LSTM_BOOTSTRAP_SERVERS ran a local demo in its place, exit 0."""
    nowhere = f"127.0.0.1:{free_port()}"
    with pytest.raises(SettingsError, match=f"no broker answers at {nowhere}"):
        ensure_broker(Settings(bootstrap_servers=nowhere), free_port(), use_existing=True)


def test_without_java_or_maven_up_and_evaluate_say_so_in_one_line_before_any_work(tmp_path, shared_data):
    """No java on the PATH and no jars cached: one line and exit 2, not a traceback (and evaluate
    says it before its minutes of training)."""
    empty = tmp_path / "bin"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("STREAM_LSTM_")}
    env.update(PATH=str(empty), STREAM_LSTM_CACHE_DIR=str(tmp_path / "cache"), PYTHONPATH=str(REPO),
               STREAM_LSTM_BOOTSTRAP_SERVERS=f"127.0.0.1:{free_port()}")
    csv = next((shared_data / "nab" / "aws").glob("*.csv"))
    for argv in (["up", "--port", str(free_port()), "--duration", "5"], ["evaluate", str(csv), "--epochs", "1"]):
        run_env = {k: v for k, v in env.items() if argv[0] != "up" or k != "STREAM_LSTM_BOOTSTRAP_SERVERS"}
        done = subprocess.run([sys.executable, "-m", "stream_lstm.cli", *argv], env=run_env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, done.stdout + done.stderr
        assert "Traceback" not in done.stderr and "training" not in done.stderr, done.stderr
        assert done.stderr.strip().splitlines()[-1] == (
            f"{argv[0]}: java not found: install OpenJDK 17 (apt install openjdk-17-jre-headless)")


def test_up_with_a_csv_it_cannot_read_says_so_before_starting_anything(tmp_path):
    env = dict(os.environ, STREAM_LSTM_METRICS_PORT="0", PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-m", "stream_lstm.cli", "up", "--port", str(free_port()),
                           str(tmp_path / "nosuch.csv")], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "nosuch.csv" in done.stderr and "Traceback" not in done.stderr
    assert "starting a local Kafka broker" not in done.stdout


def test_up_with_no_devices_says_so_before_starting_anything(tmp_path):
    env = dict(os.environ, STREAM_LSTM_METRICS_PORT="0", PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-m", "stream_lstm.cli", "up", "--port", str(free_port()),
                           "--devices", "0"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.strip().splitlines()[-1] == "up: --devices, --rate and --speedup must be positive"
    assert "starting a local Kafka broker" not in done.stdout


def test_up_failing_without_a_signal_does_not_say_it_was_stopped(tmp_path):
    """`up` on a broker that does not answer said "stopped while starting up", as if a signal had
    come, before the real error (a review)."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("STREAM_LSTM_")}
    env.update(PYTHONPATH=str(REPO), STREAM_LSTM_BOOTSTRAP_SERVERS=f"127.0.0.1:{free_port()}",
               STREAM_LSTM_CACHE_DIR=str(tmp_path / "cache"))
    done = subprocess.run([sys.executable, "-m", "stream_lstm.cli", "up", "--duration", "5"], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    out = done.stdout + done.stderr
    assert done.returncode == 2 and "no broker answers at" in out, out
    assert "nothing is left running" in out and "stopped while starting up" not in out, out
