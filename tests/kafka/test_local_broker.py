"""The local broker command: up, second up, status, port in use, stale state, down."""

import argparse
import json
import os
import socket

import pytest
from kafka import KafkaAdminClient

from stream_lstm.kafka import local_broker
from stream_lstm.kafka.local_broker import BrokerError, LocalBroker, free_port, require_tool

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(240)]


def cli(action, port, data_dir):
    return local_broker.main(argparse.Namespace(action=action, port=port, data_dir=data_dir, timeout=120))


def test_up_second_up_status_down(tmp_path, capsys):
    port = free_port()
    assert cli("up", port, tmp_path) == 0
    assert f"ready at 127.0.0.1:{port}" in capsys.readouterr().out
    admin = KafkaAdminClient(bootstrap_servers=f"127.0.0.1:{port}")
    cluster = admin.describe_cluster()
    versions = admin._client.check_version()  # the broker's API version: Kafka 4.x
    admin.close()
    assert cluster["brokers"][0]["port"] == port
    assert versions >= (4, 0)
    assert cli("up", port, tmp_path) == 0
    assert "already running" in capsys.readouterr().out
    assert cli("status", port, tmp_path) == 0
    assert cli("down", port, tmp_path) == 0
    assert "stopped" in capsys.readouterr().out
    assert cli("status", port, tmp_path) == 1
    # Stale state: a state file naming a dead pid, and formatted storage, from a crash.
    (tmp_path / "broker.json").write_text(json.dumps({"pid": 999_999, "port": port}))
    broker = LocalBroker(port, tmp_path)
    assert broker.running_pid() is None
    try:
        broker.start()
    finally:
        assert broker.stop()


def test_port_in_use_is_a_clear_error(tmp_path, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert cli("up", port, tmp_path) == 2
    err = capsys.readouterr().err
    assert f"port {port} on 127.0.0.1 is in use" in err


def test_missing_java_says_what_to_install(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(BrokerError, match="java not found: install a Java 17"):
        require_tool("java", "a Java 17+ runtime (apt install openjdk-17-jre-headless)")
    with pytest.raises(BrokerError, match="java not found"):
        LocalBroker(free_port(), os.devnull).start()
