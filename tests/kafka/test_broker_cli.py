"""``stream-lstm kafka`` (kafka/broker_cli.py): the arguments, and ``status``/``down`` over every
broker ``up`` started, by the registry: quick checks with stand-ins for running brokers
(``brokers.StandIn``: only pids and files are looked at), and one with two real brokers. (One
broker's life cycle, ``up`` included: test_local_broker.py.)

Every test here has its own cache directory (``own_cache``), so the registry and default data
directories are never the user's.
"""

import argparse
import json

import pytest

from stream_lstm.kafka import broker_cli, broker_registry
from stream_lstm.kafka.local_broker import free_port, pid_alive

from .brokers import StandIn, cli, dead_pid, topics

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("own_cache")]
NONE_STARTED = "no Kafka broker running (none that `stream-lstm kafka up` started)\n"


def parse(*argv):
    parser = argparse.ArgumentParser()
    broker_cli.add_arguments(parser)
    return parser.parse_args(argv)


def test_the_arguments():
    args = parse("up")
    assert (args.action, args.port, args.data_dir, args.timeout) == ("up", None, None, 90.0)
    args = parse("down", "--port", "9093", "--data-dir", "/tmp/k2", "--timeout", "5")
    assert (args.port, str(args.data_dir), args.timeout) == (9093, "/tmp/k2", 5.0)
    with pytest.raises(SystemExit):
        parse("restart")


def test_status_and_down_with_no_broker(own_cache, capsys):
    assert cli("status") == 1 and cli("down") == 0
    assert capsys.readouterr().out == NONE_STARTED * 2
    assert cli("status", 9400) == 1
    assert capsys.readouterr().out == f"no Kafka broker running for {own_cache / 'broker-9400'}\n"


def test_status_lists_and_down_stops_stand_ins_by_the_registry(tmp_path, own_cache, capsys):
    a, b = StandIn(tmp_path / "a", 9401), StandIn(own_cache / "broker-9402", 9402)
    try:
        broker_registry.record(9401, a.pid, a.data_dir)
        broker_registry.record(9402, b.pid, b.data_dir)
        gone = dead_pid()
        broker_registry.record(9403, gone, tmp_path / "gone")
        assert cli("status") == 0
        assert capsys.readouterr().out.splitlines() == [
            f"forgot the broker on port 9403: pid {gone} is gone (data: {tmp_path / 'gone'})",
            f"Kafka broker running at 127.0.0.1:9401 (pid {a.pid}, data: {a.data_dir}, "
            f"logs: {a.data_dir / 'logs' / 'server.log'})",
            f"Kafka broker running at 127.0.0.1:9402 (pid {b.pid}, data: {b.data_dir}, "
            f"logs: {b.data_dir / 'logs' / 'server.log'})"]
        assert cli("status", 9404) == 1  # not running: the hint names the ones that are
        assert capsys.readouterr().out == (
            f"no Kafka broker running for {own_cache / 'broker-9404'} (running: 127.0.0.1:9401, "
            "127.0.0.1:9402; `stream-lstm kafka status` lists them)\n")
        assert cli("down", data_dir=a.data_dir) == 0  # by its directory
        assert capsys.readouterr().out == f"Kafka broker at 127.0.0.1:9401 stopped (pid {a.pid}, data: {a.data_dir})\n"
        a.proc.wait(10)
        assert [e.port for e in broker_registry.entries()] == [9402] and not (a.data_dir / "broker.json").exists()
        assert cli("down") == 0  # all the rest
        assert capsys.readouterr().out == f"Kafka broker at 127.0.0.1:9402 stopped (pid {b.pid}, data: {b.data_dir})\n"
        b.proc.wait(10)
        assert broker_registry.entries() == [] and cli("status") == 1
    finally:
        a.stop()
        b.stop()


@pytest.mark.kafka
def test_status_lists_and_down_stops_every_real_broker_up_started(tmp_path, own_cache, capsys):
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
        # a's data directory with another port: refused (it said "already running" at a's port,
        # exit 0, with nothing on the port asked for)
        other = next(p for p in iter(free_port, None) if p not in (port_a, port_b))
        assert cli("up", other, dir_a) == 2
        assert f"the data of the broker running at 127.0.0.1:{port_a}, not on port {other}" in \
            capsys.readouterr().err
        assert broker_registry.find(other) is None
        # a's port with another data directory: refused, naming a (it said "in use by another
        # program", of a broker `up` itself had started)
        assert cli("up", port_a, tmp_path / "c") == 2
        assert capsys.readouterr().err == (
            f"stream-lstm kafka up: port {port_a} is the broker `kafka up` started with data "
            f"{dir_a}: leave out --data-dir to use it, or give another --port\n")
        assert not (tmp_path / "c").exists()

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


