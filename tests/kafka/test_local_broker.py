"""The local broker (kafka/local_broker.py) through ``stream-lstm kafka up|down|status|fetch``:
a real JVM each ``up`` (about 10 s on two cores), so the life-cycle checks share one test: up,
second up, status, down, restart after a crash (storage reused), restart with foreign storage
(wiped); and the clear errors of a busy port and a missing java or mvn. (Several brokers
through the registry: test_broker_cli.py.)

Every test here has its own cache directory (``own_cache``: ``STREAM_LSTM_CACHE_DIR``, the jars
linked from the real cache), so the registry and default data directories are never the user's.
"""

import json
import os
import shutil
import signal
import socket

import pytest
from kafka import KafkaAdminClient

from stream_lstm.kafka.jars import KAFKA_VERSION
from stream_lstm.kafka.local_broker import free_port, pid_alive

from .brokers import cli, dead_pid, topics

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(300), pytest.mark.usefixtures("own_cache")]
ORIGINAL_PATH = os.environ["PATH"]


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


def test_ensure_local_broker_lets_the_bodys_own_error_through(bootstrap):
    """With a broker at the address, an error raised by the caller's work is that error, not a
    second broker started behind it."""
    from stream_lstm.config import Settings
    from stream_lstm.kafka.local_broker import ensure_local_broker

    with pytest.raises(ValueError, match="the real error"):
        with ensure_local_broker(Settings(bootstrap_servers=bootstrap)) as got:
            assert got == bootstrap
            raise ValueError("the real error")


def test_ensure_local_broker_takes_the_callers_answer_without_asking_again(monkeypatch):
    """`evaluate` asks before its training whether a broker answers; ensure_local_broker asked
    again after it, 3 s more where none did."""
    from stream_lstm.config import Settings
    from stream_lstm.kafka import local_broker

    asked = []
    monkeypatch.setattr(local_broker, "broker_answers", lambda s: asked.append(s) or True)
    nowhere = f"127.0.0.1:{free_port()}"
    with local_broker.ensure_local_broker(Settings(bootstrap_servers=nowhere), answers=True) as got:
        assert got == nowhere and asked == []
    with local_broker.ensure_local_broker(Settings(bootstrap_servers=nowhere)) as got:
        assert got == nowhere and len(asked) == 1  # (without an answer: asked)


def test_a_secured_broker_that_does_not_answer_is_said_not_replaced_by_a_local_one():
    """With TLS/SASL settings and no answer, evaluate, bench and gpu-check started a local
    plaintext broker and kept the secured settings: its failure then hid the real cause."""
    from stream_lstm.config import Settings
    from stream_lstm.kafka.clients import KafkaConnectError
    from stream_lstm.kafka.local_broker import ensure_local_broker

    s = Settings(bootstrap_servers=f"127.0.0.1:{free_port()}", security_protocol="SASL_PLAINTEXT",
                 sasl_mechanism="PLAIN", sasl_username="u", sasl_password="p")
    with pytest.raises(KafkaConnectError, match="127.0.0.1"):
        with ensure_local_broker(s):
            pytest.fail("no broker: the body must not run")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_throw_away_broker_is_stopped_when_its_command_is_terminated(tmp_path, sig):
    """evaluate, bench and gpu-check start one when no broker answers; a SIGTERM (a `timeout`,
    a cancelled CI job) or a SIGHUP (a closed terminal) used to kill Python without stopping it,
    leaving its JVM running."""
    import subprocess
    import sys

    script = (
        "import sys, time\n"
        "from stream_lstm.config import Settings\n"
        "from stream_lstm.kafka.local_broker import ensure_local_broker\n"
        f"with ensure_local_broker(Settings(bootstrap_servers='127.0.0.1:{free_port()}')) as b:\n"
        "    print(b, flush=True)\n"
        "    time.sleep(300)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "TMPDIR": str(tmp_path)})
    try:
        bootstrap = child.stdout.readline().strip()  # the broker answers: it is up
        port = int(bootstrap.rsplit(":", 1)[1])
        child.send_signal(sig)
        assert child.wait(timeout=60) != 0
    finally:
        child.kill()
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, "the broker outlived its command"
    assert not list(tmp_path.glob("stream-lstm-broker-*")), "its data directory was left"
