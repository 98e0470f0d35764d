"""A real Apache Kafka 4.x broker on 127.0.0.1, from Maven Central jars, without Docker.

``stream-lstm kafka up`` fetches the pinned Kafka release and its runtime dependencies with
``mvn`` (the small pom in ``deploy/kafka/pom.xml``, which adds the log4j2 binding that the
Kafka POM leaves out), caches the jars in the user cache directory, formats KRaft storage,
and starts a single-node broker+controller with ``java``. It waits until the broker answers
an admin call, then prints the bootstrap address. ``stream-lstm kafka down`` stops it.

The same :class:`LocalBroker` backs the test fixtures and the benchmark. It can also open a
SASL/SCRAM listener (``sasl_users``) for security tests.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

KAFKA_VERSION = "4.1.1"
POM = Path(__file__).resolve().parents[2] / "deploy" / "kafka" / "pom.xml"

LOG4J2 = """\
status = warn
appender.file.type = File
appender.file.name = FILE
appender.file.fileName = {log}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = {level}
rootLogger.appenderRef.file.ref = FILE
logger.kafka.name = kafka
logger.kafka.level = {level}
logger.apache.name = org.apache.kafka
logger.apache.level = {level}
"""


class BrokerError(RuntimeError):
    """The local broker could not be set up; the message says what to do."""


def cache_dir() -> Path:
    base = os.environ.get("STREAM_LSTM_CACHE_DIR")
    if base:
        return Path(base)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "stream-lstm"


def default_data_dir(port: int) -> Path:
    return cache_dir() / f"broker-{port}"


def require_tool(name: str, install: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise BrokerError(f"{name} not found: install {install}")
    return path


def fetch_jars(cache: Path | None = None) -> Path:
    """The directory of Kafka's jars, fetched with Maven on first use."""
    libs = (cache or cache_dir()) / f"kafka-{KAFKA_VERSION}" / "libs"
    marker = libs / ".complete"
    if marker.exists():
        return libs
    mvn = require_tool("mvn", "Apache Maven (apt install maven)")
    if not POM.exists():
        raise BrokerError(f"{POM} is missing: run from a source checkout of stream-lstm")
    libs.mkdir(parents=True, exist_ok=True)
    cmd = [mvn, "-q", "-B", "-f", str(POM), "dependency:copy-dependencies",
           f"-DoutputDirectory={libs}", f"-Dkafka.version={KAFKA_VERSION}"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0 or not any(libs.glob("kafka_2.13-*.jar")):
        raise BrokerError(f"mvn could not fetch Kafka {KAFKA_VERSION}:\n{result.stdout[-2000:]}"
                          f"{result.stderr[-2000:]}")
    marker.write_text(KAFKA_VERSION)
    return libs


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class LocalBroker:
    """A single-node KRaft broker+controller.

    Parameters
    ----------
    port
        Client (PLAINTEXT) port on 127.0.0.1.
    data_dir
        Storage, config, logs and the ``broker.json`` state file.
    controller_port
        KRaft controller port; a free one by default.
    sasl_users
        ``{user: password}``: also open a SASL_PLAINTEXT listener with SCRAM-SHA-256/512
        (``sasl_port``), credentials created at format time.
    log_level
        Broker log level (the log goes to ``<data_dir>/logs/server.log``).
    """

    def __init__(self, port: int, data_dir: str | Path, controller_port: int | None = None,
                 sasl_users: dict[str, str] | None = None, log_level: str = "WARN") -> None:
        self.port = port
        self.data_dir = Path(data_dir)
        self.controller_port = controller_port
        self.sasl_users = sasl_users or {}
        self.sasl_port: int | None = None
        self.log_level = log_level
        self.pid: int | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def sasl_bootstrap(self) -> str:
        return f"127.0.0.1:{self.sasl_port}"

    @property
    def state_file(self) -> Path:
        return self.data_dir / "broker.json"

    @property
    def log_file(self) -> Path:
        return self.data_dir / "logs" / "server.log"

    def running_pid(self) -> int | None:
        """The pid from the state file when that process is still alive."""
        try:
            state = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return None
        pid = int(state.get("pid", 0))
        return pid if pid and pid_alive(pid) else None

    def start(self, timeout: float = 120.0) -> str:
        """Start (or find running) and wait until it answers; returns the bootstrap address."""
        java = require_tool("java", "a Java 17+ runtime (apt install openjdk-17-jre-headless)")
        pid = self.running_pid()
        if pid is not None:
            self.pid = pid
            self._wait_ready(timeout)
            return self.bootstrap
        if port_in_use(self.port):
            raise BrokerError(f"port {self.port} on 127.0.0.1 is in use by another program; "
                              "choose another with --port")
        libs = fetch_jars()
        self.controller_port = self.controller_port or free_port()
        if self.sasl_users:
            self.sasl_port = self.sasl_port or free_port()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        props = self.data_dir / "server.properties"
        props.write_text(self._properties())
        log4j = self.data_dir / "log4j2.properties"
        log4j.write_text(LOG4J2.format(log=self.log_file, level=self.log_level))
        cp = str(libs / "*")
        jvm = [java, "-Xmx512m", "-Xms256m", f"-Dlog4j2.configurationFile={log4j}", "-cp", cp]
        self._format(jvm, props)
        out = open(self.data_dir / "logs" / "stdout.log", "ab")  # noqa: SIM115 - child owns it
        proc = subprocess.Popen(jvm + ["kafka.Kafka", str(props)], stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = proc.pid
        self.state_file.write_text(json.dumps({"pid": proc.pid, "port": self.port,
                                               "bootstrap": self.bootstrap,
                                               "sasl_port": self.sasl_port}))
        try:
            self._wait_ready(timeout, proc)
        except BaseException:
            self.stop()
            raise
        return self.bootstrap

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop the broker cleanly (SIGTERM, then SIGKILL). Returns whether one was running."""
        pid = self.pid or self.running_pid()
        if pid is None or not pid_alive(pid):
            self.state_file.unlink(missing_ok=True)
            return False
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and pid_alive(pid):
            try:  # reap it if it is our child
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    break
            except ChildProcessError:
                pass
            time.sleep(0.1)
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
        self.state_file.unlink(missing_ok=True)
        self.pid = None
        return True

    # ---- internals -------------------------------------------------------------------------
    def _properties(self) -> str:
        listeners = [f"PLAINTEXT://127.0.0.1:{self.port}", f"CONTROLLER://127.0.0.1:{self.controller_port}"]
        advertised = [f"PLAINTEXT://127.0.0.1:{self.port}"]
        protocol_map = "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT"
        extra = ""
        if self.sasl_users:
            listeners.append(f"SASL_PLAINTEXT://127.0.0.1:{self.sasl_port}")
            advertised.append(f"SASL_PLAINTEXT://127.0.0.1:{self.sasl_port}")
            protocol_map += ",SASL_PLAINTEXT:SASL_PLAINTEXT"
            extra = ("sasl.enabled.mechanisms=SCRAM-SHA-256,SCRAM-SHA-512\n"
                     "listener.name.sasl_plaintext.scram-sha-256.sasl.jaas.config="
                     "org.apache.kafka.common.security.scram.ScramLoginModule required;\n"
                     "listener.name.sasl_plaintext.scram-sha-512.sasl.jaas.config="
                     "org.apache.kafka.common.security.scram.ScramLoginModule required;\n")
        return "\n".join([
            "process.roles=broker,controller",
            "node.id=1",
            f"controller.quorum.voters=1@127.0.0.1:{self.controller_port}",
            "listeners=" + ",".join(listeners),
            "advertised.listeners=" + ",".join(advertised),
            "listener.security.protocol.map=" + protocol_map,
            "controller.listener.names=CONTROLLER",
            "inter.broker.listener.name=PLAINTEXT",
            f"log.dirs={self.data_dir / 'kraft'}",
            "num.partitions=4",
            "offsets.topic.replication.factor=1",
            "offsets.topic.num.partitions=4",
            "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1",
            "transaction.state.log.num.partitions=4",
            "share.coordinator.state.topic.replication.factor=1",
            "share.coordinator.state.topic.min.isr=1",
            "group.initial.rebalance.delay.ms=0",
            "auto.create.topics.enable=true",
            "log.cleaner.enable=true",
            "log.cleaner.backoff.ms=1000",
            "message.max.bytes=4194304",
            "transaction.abort.timed.out.transaction.cleanup.interval.ms=5000",
            "transaction.remove.expired.transaction.cleanup.interval.ms=60000",
            "delete.topic.enable=true",
        ]) + "\n" + extra

    def _format(self, jvm: list[str], props: Path) -> None:
        """Format KRaft storage, keeping it when already formatted for this config."""
        meta = self.data_dir / "kraft" / "meta.properties"
        if meta.exists():
            return  # a stale but formatted directory from an earlier run: reuse its data
        cluster_id = base64.urlsafe_b64encode(os.urandom(16)).decode().rstrip("=")
        cmd = jvm + ["kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(props),
                     "--ignore-formatted"]
        for user, password in self.sasl_users.items():
            for mech in ("SCRAM-SHA-256", "SCRAM-SHA-512"):
                cmd += ["--add-scram", f"{mech}=[name={user},password={password}]"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise BrokerError(f"formatting KRaft storage failed: {result.stdout}{result.stderr}")

    def _wait_ready(self, timeout: float, proc: subprocess.Popen | None = None) -> None:
        from kafka import KafkaAdminClient

        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise BrokerError(f"the broker exited with {proc.returncode}:\n{self._log_tail()}")
            try:
                admin = KafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=5000,
                                         client_id="stream-lstm-local-broker")
                try:
                    admin.describe_cluster()
                    admin.list_topics()
                finally:
                    admin.close()
                return
            except Exception as exc:  # noqa: BLE001 - not up yet
                last = exc
                time.sleep(0.5)
        raise BrokerError(f"the broker did not answer within {timeout:.0f}s ({last}):\n{self._log_tail()}")

    def _log_tail(self, lines: int = 30) -> str:
        text = ""
        for f in (self.log_file, self.data_dir / "logs" / "stdout.log"):
            if f.exists():
                text += "\n".join(f.read_text(errors="replace").splitlines()[-lines:]) + "\n"
        return text


# ---- CLI: stream-lstm kafka up|down|status|fetch -------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        f"Run a local single-node Apache Kafka {KAFKA_VERSION} broker (KRaft) on 127.0.0.1 from "
        "Maven Central jars: no Docker needed. Needs java (17+) and mvn."
    )
    parser.add_argument("action", choices=["up", "down", "status", "fetch"],
                        help="up: start and wait until ready; down: stop; status; fetch: jars only")
    parser.add_argument("--port", type=int, default=9092, help="client port (default 9092)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="storage and logs (default: <cache>/broker-<port>)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for ready")


def main(args: argparse.Namespace) -> int:
    broker = LocalBroker(args.port, args.data_dir or default_data_dir(args.port))
    try:
        if args.action == "fetch":
            print(f"Kafka {KAFKA_VERSION} jars in {fetch_jars()}")
        elif args.action == "up":
            already = broker.running_pid()
            bootstrap = broker.start(args.timeout)
            state = "already running" if already else "ready"
            print(f"Kafka {KAFKA_VERSION} broker {state} at {bootstrap} "
                  f"(pid {broker.pid}, data {broker.data_dir}, log {broker.log_file})")
        elif args.action == "down":
            stopped = broker.stop()
            print(f"broker on port {args.port} stopped" if stopped
                  else f"no broker running on port {args.port}")
        else:
            pid = broker.running_pid()
            print(f"broker running at {broker.bootstrap} (pid {pid})" if pid
                  else f"no broker running on port {args.port}")
            return 0 if pid else 1
    except BrokerError as exc:
        print(f"stream-lstm kafka {args.action}: {exc}", file=sys.stderr)
        return 2
    return 0
