"""`stream-lstm kafka up|down|status|fetch` against a real broker, through the CLI's ``main``.

Each ``up`` here starts a real JVM (about 10 s on two cores), so the life-cycle checks share
one test: up, second up, status, down, restart after a crash (storage reused), restart with
foreign storage (wiped). Another follows two brokers through the registry of brokers ``up``
started: status lists both, ``down --port`` stops one, ``down`` the rest.

Every test here has its own cache directory (``STREAM_LSTM_CACHE_DIR``; the jars are linked
from the real cache), so the registry and default data directories are never the user's.
"""

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
from kafka import KafkaAdminClient

from stream_lstm.kafka import broker_cli, broker_registry
from stream_lstm.kafka.jars import KAFKA_VERSION, user_cache_dir
from stream_lstm.kafka.local_broker import free_port, pid_alive

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(300)]
ORIGINAL_PATH = os.environ["PATH"]


@pytest.fixture(autouse=True)
def own_cache(tmp_path_factory, monkeypatch):
    """A private cache (registry, default data dirs) that reuses the real cache's jars."""
    jars = user_cache_dir() / f"kafka-{KAFKA_VERSION}"
    cache = tmp_path_factory.mktemp("cache")
    if jars.exists():
        os.symlink(jars, cache / jars.name)
    monkeypatch.setenv("STREAM_LSTM_CACHE_DIR", str(cache))
    return cache


def cli(action, port=None, data_dir=None, timeout=90):
    args = argparse.Namespace(action=action, port=port, data_dir=data_dir, timeout=timeout)
    return broker_cli.main(args)


def topics(port):
    admin = KafkaAdminClient(bootstrap_servers=f"127.0.0.1:{port}", bootstrap_timeout_ms=10_000)
    try:
        return set(admin.list_topics())
    finally:
        admin.close()


def dead_pid() -> int:
    """The pid of a process that has exited (and was reaped): a crashed broker's pid."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_up_second_up_status_down_and_restarts(tmp_path, capsys):
    port = free_port()
    assert cli("up", port, tmp_path) == 0
    out = capsys.readouterr().out
    assert f"Kafka {KAFKA_VERSION} broker ready at 127.0.0.1:{port}" in out
    assert str(tmp_path / "logs" / "server.log") in out
    pid = json.loads((tmp_path / "broker.json").read_text())["pid"]
    try:
        admin = KafkaAdminClient(bootstrap_servers=f"127.0.0.1:{port}")
        try:
            cluster = admin.describe_cluster()
            version = admin.get_broker_version_data(cluster["brokers"][0]["broker_id"]).broker_version
            admin.create_topics({"keep-me": {"num_partitions": 1, "replication_factor": 1}},
                                wait_for_metadata=True)
        finally:
            admin.close()
        assert [(b["host"], b["port"]) for b in cluster["brokers"]] == [("127.0.0.1", port)]
        assert version >= (4, 0), f"not a Kafka 4.x broker: {version}"
        assert "Kafka Server started" in (tmp_path / "logs" / "server.log").read_text()

        assert cli("up", port, tmp_path) == 0  # second up: reports the running one
        assert f"already running at 127.0.0.1:{port} (pid {pid}" in capsys.readouterr().out
        assert cli("status", port, tmp_path) == 0
        assert f"running at 127.0.0.1:{port} (pid {pid}" in capsys.readouterr().out
    finally:
        assert cli("down", port, tmp_path) == 0
    assert f"stopped (pid {pid}, data: {tmp_path})" in capsys.readouterr().out
    assert not pid_alive(pid) and not (tmp_path / "broker.json").exists()
    assert cli("status", port, tmp_path) == 1
    assert cli("down", port, tmp_path) == 0
    assert "no Kafka broker running" in capsys.readouterr().out

    # A crash leaves a state file naming a dead pid: `up` cleans it up, keeps the data.
    (tmp_path / "broker.json").write_text(json.dumps({"pid": dead_pid(), "port": port}))
    assert cli("status", port, tmp_path) == 1
    try:
        assert cli("up", port, tmp_path) == 0
        out = capsys.readouterr().out
        assert "cleaning up after a broker that is gone" in out and "ready at" in out
        assert "keep-me" in topics(port), "formatted storage of the same cluster is reused"
    finally:
        assert cli("down", port, tmp_path) == 0

    # Storage formatted for another cluster (say, copied from elsewhere) is wiped.
    record = json.loads((tmp_path / "format.json").read_text())
    (tmp_path / "format.json").write_text(json.dumps({**record, "cluster_id": "someone-else"}))
    try:
        assert cli("up", port, tmp_path) == 0
        assert "keep-me" not in topics(port)
    finally:
        assert cli("down", port, tmp_path) == 0


def test_status_lists_and_down_stops_every_broker_up_started(tmp_path, own_cache, capsys):
    first = free_port()
    # The registry lists brokers by port, so a is the lower one (free ports come in any order).
    port_a, port_b = sorted((first, next(p for p in iter(free_port, None) if p != first)))
    dir_a, dir_b = tmp_path / "a", own_cache / f"broker-{port_b}"  # b: the default data dir
    started = []
    try:
        assert cli("up", port_a, dir_a) == 0
        started.append((port_a, dir_a))
        assert cli("up", port_b) == 0
        started.append((port_b, dir_b))
        capsys.readouterr()
        pid_a = json.loads((dir_a / "broker.json").read_text())["pid"]
        pid_b = json.loads((dir_b / "broker.json").read_text())["pid"]
        assert broker_registry.entries() == [broker_registry.Entry(port_a, pid_a, dir_a),
                                             broker_registry.Entry(port_b, pid_b, dir_b)]
        assert sorted(p.name for p in (own_cache / "brokers").iterdir()) == \
            sorted([f"{port_a}.json", f"{port_b}.json"])

        # A broker that died (its entry names a dead pid) is stale: forgotten, and said so.
        gone, dead = free_port(), dead_pid()
        broker_registry.record(gone, dead, tmp_path / "gone")
        assert cli("status") == 0
        out = capsys.readouterr().out.splitlines()
        assert out == [
            f"forgot the broker on port {gone}: pid {dead} is gone (data: {tmp_path / 'gone'})",
            f"Kafka broker running at 127.0.0.1:{port_a} (pid {pid_a}, data: {dir_a}, "
            f"logs: {dir_a / 'logs' / 'server.log'})",
            f"Kafka broker running at 127.0.0.1:{port_b} (pid {pid_b}, data: {dir_b}, "
            f"logs: {dir_b / 'logs' / 'server.log'})"]
        assert broker_registry.find(gone) is None
        # --port alone finds the broker up started there, in whatever data dir.
        assert cli("status", port_a) == 0
        assert f"running at 127.0.0.1:{port_a} (pid {pid_a}, data: {dir_a}" in capsys.readouterr().out

        assert cli("down", port_a) == 0  # just that one
        assert capsys.readouterr().out == (f"Kafka broker at 127.0.0.1:{port_a} stopped "
                                           f"(pid {pid_a}, data: {dir_a})\n")
        assert not pid_alive(pid_a) and pid_alive(pid_b)
        assert [e.port for e in broker_registry.entries()] == [port_b]
        assert cli("status", port_a) == 1  # and the hint names the one still running
        assert capsys.readouterr().out == (
            f"no Kafka broker running for {own_cache / f'broker-{port_a}'} (running: "
            f"127.0.0.1:{port_b}; `stream-lstm kafka status` lists them)\n")
        assert topics(port_b) is not None  # b still answers

        assert cli("down") == 0  # every broker up started (here: the one left)
        assert capsys.readouterr().out == (f"Kafka broker at 127.0.0.1:{port_b} stopped "
                                           f"(pid {pid_b}, data: {dir_b})\n")
        assert not pid_alive(pid_b) and broker_registry.entries() == []
        started.clear()
        assert cli("down") == 0
        assert cli("status") == 1
        assert capsys.readouterr().out == (
            "no Kafka broker running (none that `stream-lstm kafka up` started)\n" * 2)
    finally:
        for port, data_dir in started:  # never leave a JVM behind after a failure
            cli("down", port, data_dir)


def test_port_in_use_is_a_clear_error(tmp_path, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert cli("up", port, tmp_path) == 2
    err = capsys.readouterr().err
    assert f"port {port} on 127.0.0.1 is in use" in err
    assert not (tmp_path / "broker.json").exists()


def path_with(tmp_path, *tools):
    """A PATH holding only links to the named tools (so the others are 'not installed')."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in tools:
        os.symlink(shutil.which(tool, path=ORIGINAL_PATH), bin_dir / tool)
    return str(bin_dir)


def test_missing_java_or_mvn_says_what_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("STREAM_LSTM_CACHE_DIR", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("PATH", path_with(tmp_path))
    for action in ("up", "fetch"):
        assert cli(action, free_port(), tmp_path / "data") == 2
        err = capsys.readouterr().err
        assert err == (f"stream-lstm kafka {action}: java not found: install OpenJDK 17 "
                       "(apt install openjdk-17-jre-headless)\n")
    monkeypatch.setenv("PATH", path_with(tmp_path, "java"))
    assert cli("fetch", free_port(), tmp_path / "data") == 2
    assert capsys.readouterr().err == ("stream-lstm kafka fetch: mvn not found: install "
                                       "Apache Maven (apt install maven)\n")
