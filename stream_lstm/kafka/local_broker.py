"""A real Apache Kafka 4.1.1 broker on 127.0.0.1, from Maven Central jars, without Docker.

``kafka fetch`` fetches and caches the jars (:mod:`stream_lstm.kafka.jars`). ``kafka up``
writes the broker's configuration (:mod:`stream_lstm.kafka.broker_config`), formats KRaft
storage, starts one broker+controller JVM in the background, waits until an admin call
succeeds and prints the address; ``kafka down`` stops it; a ``broker.json`` state file in the
data directory ties the commands together. ``kafka up`` also records each broker it starts
(:mod:`stream_lstm.kafka.broker_registry`), so ``kafka status`` lists them all and ``kafka down``
stops them all, whatever ``--port``/``--data-dir`` they were started with. :class:`LocalBroker` also backs the test fixtures,
``stream-lstm up`` and the benchmark, and can open SASL/SCRAM and TLS listeners.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from stream_lstm.kafka.broker_config import LOG4J2, make_certificates, server_properties
from stream_lstm.kafka.jars import (
    JAVA_HINT,
    KAFKA_VERSION,
    BrokerError,
    fetch_jars,
    require_tool,
    user_cache_dir,
)

DEFAULT_PORT = 9092


def default_data_dir(port: int) -> Path:
    return user_cache_dir() / f"broker-{port}"


def port_in_use(port: int) -> bool:
    """Whether something listens on 127.0.0.1:port, or the port cannot be bound."""
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", port)) == 0:
            return True
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Kafka does: TIME_WAIT is fine
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def tcp_port(text: str) -> int:
    """An argparse ``type``: a TCP port, 1 to 65535.

    >>> tcp_port("9092")
    9092
    >>> tcp_port("70000")
    Traceback (most recent call last):
    ...
    argparse.ArgumentTypeError: 70000 is not a TCP port (1 to 65535)
    """
    import argparse

    try:
        port = int(text)
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text} is not a TCP port (1 to 65535)")
    return port


def ephemeral_ports() -> tuple[int, int]:
    """The range the kernel picks outgoing connections' source ports from (Linux)."""
    with contextlib.suppress(OSError, ValueError):
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    return 32768, 60999  # (Linux's default; elsewhere a guess)


_handed_out: set[int] = set()


def free_port() -> int:
    """A port on 127.0.0.1 that is free now, chosen *below* the ephemeral range.

    Why not the kernel's pick (bind to port 0): that is an ephemeral port, which the kernel may
    give any outgoing connection as its source port before the listener that asked for it
    binds. Worse, a client reconnecting to a stopped broker on an ephemeral port can connect
    to itself (TCP's simultaneous open), after which the broker cannot bind its own port again.
    Below the range neither happens; the same port is not handed out twice by one process.

    >>> port = free_port()
    >>> 1024 <= port < ephemeral_ports()[0] and not port_in_use(port)
    True
    """
    import random

    low = ephemeral_ports()[0]
    candidates = range(max(1024, low - 12_000), low)
    for port in random.sample(candidates, min(200, len(candidates))):
        if port not in _handed_out and not port_in_use(port):
            _handed_out.add(port)
            return port
    with socket.socket() as s:  # (an unusual range with nothing free below it: the kernel's pick)
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):  # Linux: field 3 of /proc/<pid>/stat is the state
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


class LocalBroker:
    """A single-node KRaft broker+controller on 127.0.0.1.

    Controller and inter-broker traffic stay PLAINTEXT: only clients need the secured listeners.

    Parameters
    ----------
    port
        The PLAINTEXT client port (``bootstrap``).
    data_dir
        Storage (``kraft/``), config, logs (``logs/server.log``), TLS files (``tls/``) and the
        ``broker.json`` state file.
    controller_port
        The KRaft controller's port; default: a free one at start.
    sasl_users
        ``{user: password}``: opens a SASL_PLAINTEXT listener (``sasl_bootstrap``) with
        SCRAM-SHA-256 and -512 credentials made at format time.
    tls
        Opens an SSL listener (``ssl_bootstrap``) whose certificate is signed by ``ca_file``.
    sasl_port, ssl_port
        Those listeners' ports; default: free ones at start.
    log_level
        The broker's log4j level.

    Example: see tests/integration/test_faults.py::test_broker_stop_and_restart_mid_stream
    """

    def __init__(self, port: int, data_dir: str | Path, controller_port: int | None = None,
                 sasl_users: dict[str, str] | None = None, tls: bool = False, *,
                 sasl_port: int | None = None, ssl_port: int | None = None,
                 log_level: str = "WARN") -> None:
        self.port, self.controller_port = port, controller_port
        self.sasl_users, self.tls = dict(sasl_users or {}), tls
        self.sasl_port, self.ssl_port, self.log_level = sasl_port, ssl_port, log_level
        self.data_dir = Path(data_dir).resolve()
        self.state_file = self.data_dir / "broker.json"
        self.log_file = self.data_dir / "logs" / "server.log"
        self.ca_file = self.data_dir / "tls" / "ca.pem"  #: PEM of the CA (``ssl_cafile``)
        self.pid: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def sasl_bootstrap(self) -> str:
        if not self.sasl_users or self.sasl_port is None:
            raise BrokerError("no SASL listener: pass sasl_users and start the broker")
        return f"127.0.0.1:{self.sasl_port}"

    @property
    def ssl_bootstrap(self) -> str:
        if not self.tls or self.ssl_port is None:
            raise BrokerError("no SSL listener: pass tls=True and start the broker")
        return f"127.0.0.1:{self.ssl_port}"

    def read_state(self) -> dict | None:
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return None

    def running_pid(self) -> int | None:
        """The pid from the state file when that process is alive and is this broker."""
        state = self.read_state()
        pid = int(state.get("pid") or 0) if state else 0
        if not pid or not pid_alive(pid):
            return None
        with contextlib.suppress(OSError):  # pids are reused: check it is our java process
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            if "kafka.Kafka" not in cmdline or str(self.data_dir) not in cmdline:
                return None
        return pid

    def start(self, timeout: float = 90.0) -> str:
        """Start the broker (or adopt the one running on this data dir) and wait until it answers.

        Returns the PLAINTEXT bootstrap address. A state file whose process is dead (a crash)
        is cleaned up; formatted storage is reused when its cluster id and users still match.
        """
        java = require_tool("java", JAVA_HINT)
        pid = self.running_pid()
        if pid is not None:  # a second `up`: adopt the running broker and its ports
            state = self.read_state() or {}
            self.pid, self.port = pid, int(state.get("port", self.port))
            self.sasl_port, self.ssl_port = state.get("sasl_port"), state.get("ssl_port")
            self._wait_ready(timeout)
            return self.bootstrap
        self.state_file.unlink(missing_ok=True)  # stale, if any: its process is gone
        for p in (self.port, self.controller_port, self.sasl_port, self.ssl_port):
            if p is not None and port_in_use(p):
                raise BrokerError(f"port {p} on 127.0.0.1 is in use by another program; "
                                  "stop it or choose another port with --port")
        libs = fetch_jars()
        self.controller_port = self.controller_port or free_port()
        if self.sasl_users:
            self.sasl_port = self.sasl_port or free_port()
        if self.tls:
            self.ssl_port = self.ssl_port or free_port()
            store_password = make_certificates(self.data_dir / "tls")
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        props = self.data_dir / "server.properties"
        props.write_text(server_properties(
            self.data_dir, self.port, self.controller_port,
            sasl_port=self.sasl_port if self.sasl_users else None,
            ssl_port=self.ssl_port if self.tls else None,
            store_password=store_password if self.tls else ""))
        log4j = self.data_dir / "log4j2.properties"
        log4j.write_text(LOG4J2.format(log=self.log_file, level=self.log_level))
        jvm = [java, "-Xmx512m", "-Xms128m", "-Djava.awt.headless=true",
               f"-Dlog4j2.configurationFile={log4j}", "-cp", str(libs / "*")]
        self._format(jvm, props)
        with open(self.log_file.with_name("stdout.log"), "ab") as out:
            # Own session: Ctrl-C in the terminal that ran `kafka up` does not reach it.
            self._proc = subprocess.Popen(jvm + ["kafka.Kafka", str(props)], stdout=out,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          start_new_session=True)
        self.pid = self._proc.pid
        self.state_file.write_text(json.dumps({
            "pid": self.pid, "port": self.port, "bootstrap": self.bootstrap,
            "controller_port": self.controller_port, "sasl_port": self.sasl_port,
            "ssl_port": self.ssl_port, "version": KAFKA_VERSION}))
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()  # never leave a half-started JVM behind
            raise
        return self.bootstrap

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop cleanly: SIGTERM, wait up to ``timeout``, then SIGKILL. Whether one ran."""
        pid = self.pid if self.pid and self._alive(self.pid) else self.running_pid()
        self.state_file.unlink(missing_ok=True)
        self.pid = None
        if pid is None:
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)  # Kafka shuts down in order on SIGTERM
        deadline = time.monotonic() + timeout
        while self._alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if self._alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            while self._alive(pid):
                time.sleep(0.05)
        return True

    # ---- internals -------------------------------------------------------------------------
    def _alive(self, pid: int) -> bool:
        if self._proc is not None and self._proc.pid == pid:
            return self._proc.poll() is None  # our child: poll() also reaps it
        return pid_alive(pid)

    def _format(self, jvm: list[str], props: Path) -> None:
        """Format KRaft storage; reuse a formatted directory when it is still this broker's.

        ``format.json`` records the cluster id and a digest of the SCRAM users we formatted
        with. If ``kraft/meta.properties`` names the same cluster and the users are the same,
        the data (topics, offsets) is kept; anything else is wiped and formatted anew.
        """
        kraft, record = self.data_dir / "kraft", self.data_dir / "format.json"
        users = hashlib.sha256(json.dumps(sorted(self.sasl_users.items())).encode()).hexdigest()
        with contextlib.suppress(OSError, ValueError):
            formatted = json.loads(record.read_text())
            meta = (kraft / "meta.properties").read_text()
            if f"cluster.id={formatted['cluster_id']}" in meta.splitlines() and \
                    formatted["users"] == users:
                return
        shutil.rmtree(kraft, ignore_errors=True)
        cluster_id = "-"
        while cluster_id.startswith("-"):  # the tool would take a leading '-' for an option
            cluster_id = base64.urlsafe_b64encode(os.urandom(16)).decode().rstrip("=")
        cmd = jvm + ["kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(props),
                     "--ignore-formatted"]
        for user, password in self.sasl_users.items():
            for mech in ("SCRAM-SHA-256", "SCRAM-SHA-512"):
                cmd += ["--add-scram", f"{mech}=[name={user},password={password}]"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise BrokerError(f"formatting KRaft storage failed:\n{result.stdout}{result.stderr}")
        record.write_text(json.dumps({"cluster_id": cluster_id, "users": users}))

    def _wait_ready(self, timeout: float) -> None:
        """Poll an admin call until it succeeds; fail with the log's tail if the JVM dies."""
        from kafka import KafkaAdminClient

        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.pid is None or not self._alive(self.pid):
                code = self._proc.returncode if self._proc else "?"
                raise BrokerError(f"the broker exited (code {code}); log tail:\n{self._log_tail()}")
            try:
                admin = KafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=5000,
                                         bootstrap_timeout_ms=3000, client_id="local-broker")
                try:
                    admin.describe_cluster()
                finally:
                    admin.close()
                return
            except Exception as exc:  # noqa: BLE001 - not up yet; retry until the deadline
                last = exc
                time.sleep(0.3)
        raise BrokerError(f"the broker did not answer within {timeout:.0f}s ({last}); "
                          f"log tail:\n{self._log_tail()}")

    def _log_tail(self, lines: int = 30) -> str:
        files = [f for f in (self.log_file, self.log_file.with_name("stdout.log")) if f.exists()]
        return "".join(f"--- {f}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-lines:])
                       + "\n" for f in files)


# ---- CLI: stream-lstm kafka up|down|status|fetch -------------------------------------------
def broker_answers(settings: object) -> bool:
    """Whether a broker answers at ``settings.bootstrap_servers`` within about 3 s."""
    from stream_lstm.kafka.clients import make_admin

    try:
        make_admin(settings, request_timeout_ms=3000, bootstrap_timeout_ms=3000).close()  # type: ignore[arg-type]
    except Exception:  # noqa: BLE001 - whatever it is, nothing there to use
        return False
    return True


@contextlib.contextmanager
def ensure_local_broker(settings: object, answers: bool | None = None) -> Iterator[str]:
    """The broker at ``settings.bootstrap_servers`` when one answers (``answers``: a caller's
    own :func:`broker_answers`, not asked again); otherwise a throw-away local broker on a free
    port, stopped on exit, on Ctrl-C and on SIGTERM (a ``timeout`` or a cancelled CI job:
    Python's default would die without stopping it, leaving a JVM behind). Yields the address."""
    import tempfile
    import threading

    if broker_answers(settings) if answers is None else answers:  # (the body's own errors propagate)
        print(f"using the broker at {settings.bootstrap_servers}", file=sys.stderr)  # type: ignore[attr-defined]
        yield settings.bootstrap_servers  # type: ignore[attr-defined]
        return
    if getattr(settings, "security_protocol", "PLAINTEXT") != "PLAINTEXT":
        # A secured broker was meant: a local plaintext one would hide why it did not answer
        # (refused credentials, say). Ask again, and let its own one line say so.
        from stream_lstm.kafka.clients import make_admin

        make_admin(settings, request_timeout_ms=10_000, bootstrap_timeout_ms=10_000).close()  # type: ignore[arg-type]
        yield settings.bootstrap_servers  # type: ignore[attr-defined]  # (it answered after all)
        return
    with tempfile.TemporaryDirectory(prefix="stream-lstm-broker-") as d:
        broker = LocalBroker(port=free_port(), data_dir=d)
        print(f"no broker at {settings.bootstrap_servers}; starting a local one ...", file=sys.stderr)  # type: ignore[attr-defined]
        # SIGTERM and SIGHUP (a closed terminal) as Ctrl-C while it runs, unless the command
        # handles them itself: the broker runs in a session of its own and hears neither.
        mine = [sig for sig in (signal.SIGTERM, signal.SIGHUP)
                if threading.current_thread() is threading.main_thread()
                and signal.getsignal(sig) is signal.SIG_DFL]
        for sig in mine:
            signal.signal(sig, _interrupt)
        try:
            broker.start()
            yield broker.bootstrap
        finally:
            broker.stop()
            for sig in mine:
                signal.signal(sig, signal.SIG_DFL)


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt
