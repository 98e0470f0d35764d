"""Helpers for the tests of ``stream-lstm kafka`` (kafka/broker_cli.py, kafka/broker_registry.py,
kafka/local_broker.py): run the command's ``main``, list a broker's topics, a crashed broker's
pid, and a stand-in for a running broker's JVM."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from kafka import KafkaAdminClient

from stream_lstm.kafka import broker_cli


def cli(action, port=None, data_dir=None, timeout=90) -> int:
    """``stream-lstm kafka <action> [--port] [--data-dir]``; its exit status."""
    args = argparse.Namespace(action=action, port=port, data_dir=data_dir, timeout=timeout)
    return broker_cli.main(args)


def topics(port: int) -> set[str]:
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


class StandIn:
    """A process that the registry and ``LocalBroker.running_pid`` take for the broker of
    ``data_dir`` (its command line names ``kafka.Kafka`` and the directory, as the JVM's does),
    with the ``broker.json`` that ``kafka up`` writes. It answers no Kafka requests: for what
    only looks at pids and files (``status``, ``down``, the registry). It ends on SIGTERM."""

    def __init__(self, data_dir: Path, port: int) -> None:
        self.data_dir, self.port = Path(data_dir).resolve(), port
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "import sys, time; print('ready', flush=True); time.sleep(300)",
             "kafka.Kafka", str(self.data_dir / "server.properties")],
            stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline() == "ready\n"
        self.pid = self.proc.pid
        (self.data_dir / "broker.json").write_text(json.dumps(
            {"pid": self.pid, "port": port, "bootstrap": f"127.0.0.1:{port}"}))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.proc.stdout.close()
