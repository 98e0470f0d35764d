"""The registry of brokers ``stream-lstm kafka up`` started (kafka/broker_registry.py): one file
per port, written atomically, unreadable entries dropped; a broker whose process is gone (or
whose pid now belongs to another process) forgotten and said so; and which broker
``--port``/``--data-dir`` name. The running brokers here are stand-ins (``brokers.StandIn``):
the registry only looks at pids, command lines and files. (With real brokers:
test_broker_cli.py.)"""

import json
import os
from pathlib import Path

import pytest

from stream_lstm.kafka import broker_registry
from stream_lstm.kafka.broker_registry import Entry, entries, find, forget, record
from stream_lstm.kafka.local_broker import DEFAULT_PORT, LocalBroker, default_data_dir

from .brokers import StandIn, dead_pid

pytestmark = pytest.mark.usefixtures("own_cache")


@pytest.fixture
def stand_ins():
    started: list[StandIn] = []

    def start(data_dir, port):
        started.append(StandIn(data_dir, port))
        return started[-1]

    yield start
    for s in started:
        s.stop()


def test_record_find_and_forget_by_port(tmp_path):
    root = tmp_path / "registry"
    path = record(9300, 111, "relative/dir", root=root)
    assert path == root / "9300.json" and json.loads(path.read_text())["data_dir"] == str(
        Path("relative/dir").resolve())  # absolute: `down` may run from another directory
    record(9200, 222, tmp_path / "b", root=root)
    record(9300, 333, tmp_path / "a", root=root)  # the same port again: the newer broker
    assert entries(root) == [Entry(9200, 222, tmp_path / "b"), Entry(9300, 333, tmp_path / "a")]
    assert find(9300, root) == Entry(9300, 333, tmp_path / "a") and find(9400, root) is None
    assert sorted(p.name for p in root.iterdir()) == ["9200.json", "9300.json"]  # no temp files
    forget(9300, root)
    forget(9300, root)  # already gone: fine
    assert entries(root) == [Entry(9200, 222, tmp_path / "b")]


def test_unreadable_entries_are_removed_and_a_missing_registry_is_empty(tmp_path):
    root = tmp_path / "registry"
    assert entries(root) == []
    record(9200, 222, tmp_path, root=root)
    for name, text in (("1.json", "{not json"), ("2.json", '{"port": 2}'),
                       ("3.json", '{"port": "x", "pid": 1, "data_dir": "/d"}'), ("4.json", "[]")):
        (root / name).write_text(text)
    (root / "notes.txt").write_text("kept: not an entry")
    assert [e.port for e in entries(root)] == [9200]
    assert sorted(p.name for p in root.iterdir()) == ["9200.json", "notes.txt"]


def test_the_registry_lives_in_the_cache_directory(own_cache):
    assert broker_registry.registry_dir() == own_cache / "brokers"
    record(9200, 1, "/d")
    assert (own_cache / "brokers" / "9200.json").is_file() and find(9200).pid == 1


def test_running_brokers_are_listed_and_gone_ones_forgotten_and_said(tmp_path, stand_ins):
    live = stand_ins(tmp_path / "live", 9301)
    record(9301, live.pid, live.data_dir)
    gone = dead_pid()
    record(9302, gone, tmp_path / "gone")
    # A pid reused by another process (here: this test's) is not the broker either.
    record(9303, os.getpid(), tmp_path / "reused")
    (tmp_path / "reused").mkdir()
    (tmp_path / "reused" / "broker.json").write_text(json.dumps({"pid": os.getpid(), "port": 9303}))
    brokers, stale = broker_registry.started_brokers()
    assert [(b.port, b.pid, b.data_dir) for b in brokers] == [(9301, live.pid, live.data_dir)]
    assert stale == [f"forgot the broker on port 9302: pid {gone} is gone (data: {tmp_path / 'gone'})",
                     f"forgot the broker on port 9303: pid {os.getpid()} is gone "
                     f"(data: {tmp_path / 'reused'})"]
    assert [e.port for e in entries()] == [9301]
    assert broker_registry.started_brokers()[1] == []  # said once


def test_the_broker_of_the_default_directory_counts_recorded_or_not(stand_ins):
    default = stand_ins(default_data_dir(DEFAULT_PORT), DEFAULT_PORT)  # an `up` from before the registry
    brokers, stale = broker_registry.started_brokers()
    assert [(b.port, b.pid) for b in brokers] == [(DEFAULT_PORT, default.pid)] and stale == []
    record(DEFAULT_PORT, default.pid, default.data_dir)
    assert len(broker_registry.started_brokers()[0]) == 1  # recorded too: listed once


def test_adopted_takes_the_pid_and_port_of_the_running_broker(tmp_path, stand_ins):
    assert broker_registry.adopted(LocalBroker(9305, tmp_path / "none")) is None
    live = stand_ins(tmp_path / "live", 9306)
    broker = broker_registry.adopted(LocalBroker(9999, tmp_path / "live"))  # asked with another port
    assert broker is not None and (broker.pid, broker.port) == (live.pid, 9306)


def test_port_and_data_dir_name_a_broker(tmp_path, own_cache, stand_ins):
    assert broker_registry.broker_for(None, None).data_dir == default_data_dir(DEFAULT_PORT)
    assert broker_registry.broker_for(9310, None).data_dir == own_cache / "broker-9310"
    assert broker_registry.broker_for(9310, tmp_path / "x").data_dir == tmp_path / "x"
    live = stand_ins(tmp_path / "elsewhere", 9311)
    record(9311, live.pid, live.data_dir)
    found = broker_registry.broker_for(9311, None)  # --port alone: the broker `up` started there
    assert (found.port, found.data_dir) == (9311, live.data_dir)
    assert broker_registry.broker_for(9311, tmp_path / "y").data_dir == tmp_path / "y"  # the dir wins
    record(9312, dead_pid(), tmp_path / "gone")  # recorded, not running: the port's default
    assert broker_registry.broker_for(9312, None).data_dir == own_cache / "broker-9312"


def test_forget_broker_removes_the_entries_of_its_directory_only(tmp_path):
    record(9320, 1, tmp_path / "a")
    record(9321, 2, tmp_path / "a")  # an older entry of the same directory
    record(9322, 3, tmp_path / "b")
    broker_registry.forget_broker(LocalBroker(9320, tmp_path / "a"))
    assert [e.port for e in entries()] == [9322]
