"""Which local brokers ``stream-lstm kafka up`` started, so ``kafka status`` and ``kafka down``
find them all, whatever ``--port`` and ``--data-dir`` they were started with.

Each broker ``kafka up`` starts is one small file, ``<cache>/brokers/<port>.json`` (``port``,
``pid``, ``data_dir``; ``<cache>`` is ``$STREAM_LSTM_CACHE_DIR``, else ``$XDG_CACHE_HOME/stream-lstm``, else ``~/.cache/stream-lstm``,
as for the jars). Two live brokers cannot share a port, so the port is the key. An entry
whose broker is gone (a dead pid, or a pid now used by another process) is stale: reading the
registry removes it and says so. :func:`started_brokers` and :func:`broker_for` are what the
``kafka`` command (:func:`stream_lstm.kafka.broker_cli.main`) asks.

>>> import tempfile; root = Path(tempfile.mkdtemp())   # default: registry_dir()
>>> record(9192, 4321, "/tmp/my-broker", root=root).name
'9192.json'
>>> entries(root)
[Entry(port=9192, pid=4321, data_dir=PosixPath('/tmp/my-broker'))]
>>> forget(9192, root); entries(root)
[]
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from stream_lstm.kafka.jars import user_cache_dir
from stream_lstm.kafka.local_broker import DEFAULT_PORT, LocalBroker, default_data_dir


@dataclass(frozen=True)
class Entry:
    """One broker ``kafka up`` started: its client port, JVM pid and data directory.

    Parameters
    ----------
    port
        The broker's client port (the registry's key).
    pid
        Its JVM's process id (a dead one makes the entry stale).
    data_dir
        Its data directory.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     _ = record(9192, 4321, "/srv/kafka", root=Path(d))
    ...     entry = find(9192, root=Path(d))
    >>> entry.port, entry.pid, entry.data_dir.name
    (9192, 4321, 'kafka')
    """

    port: int
    pid: int
    data_dir: Path


def registry_dir() -> Path:
    """``<cache>/brokers``: one ``<port>.json`` for each broker ``kafka up`` started."""
    return user_cache_dir() / "brokers"


def record(port: int, pid: int, data_dir: str | Path, root: Path | None = None) -> Path:
    """Note that a broker on ``port`` (``pid``, ``data_dir``) runs; returns the entry's file.
    ``root``: the registry directory (default :func:`registry_dir`), here and below."""
    path = (root or registry_dir()) / f"{port}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps({"port": port, "pid": pid, "data_dir": str(Path(data_dir).resolve())}))
    os.replace(tmp, path)  # atomic: a concurrent reader sees the old entry or the new one
    return path


def forget(port: int, root: Path | None = None) -> None:
    """Remove the entry for ``port``, if any."""
    ((root or registry_dir()) / f"{port}.json").unlink(missing_ok=True)


def entries(root: Path | None = None) -> list[Entry]:
    """Every recorded broker, alive or not, by port; an unreadable entry file is removed."""
    found = []
    with contextlib.suppress(OSError):
        for path in sorted((root or registry_dir()).glob("*.json")):
            try:
                raw = json.loads(path.read_text())
                found.append(Entry(int(raw["port"]), int(raw["pid"]), Path(raw["data_dir"])))
            except (OSError, ValueError, KeyError, TypeError):
                path.unlink(missing_ok=True)
    return sorted(found, key=lambda e: e.port)


def find(port: int, root: Path | None = None) -> Entry | None:
    """The entry recorded for ``port``, if any (alive or not)."""
    return next((e for e in entries(root) if e.port == port), None)


# ---- what `kafka status|down` ask ----------------------------------------------------------------
def started_brokers() -> tuple[list[LocalBroker], list[str]]:
    """The brokers ``kafka up`` started that still run (by port), and a line for each stale
    entry (its broker gone) removed from the registry on the way.

    The broker of the default data directory counts too, recorded or not (an ``up`` from
    before the registry)."""
    live: list[LocalBroker] = []
    stale: list[str] = []
    for entry in entries():
        broker = adopted(LocalBroker(entry.port, entry.data_dir))
        if broker is None:
            forget(entry.port)
            stale.append(f"forgot the broker on port {entry.port}: pid {entry.pid} is gone "
                         f"(data: {entry.data_dir})")
        else:
            live.append(broker)
    default = adopted(LocalBroker(DEFAULT_PORT, default_data_dir(DEFAULT_PORT)))
    if default is not None and default.data_dir not in {b.data_dir for b in live}:
        live.append(default)
    return sorted(live, key=lambda b: b.port), stale


def adopted(broker: LocalBroker) -> LocalBroker | None:
    """``broker`` with the pid and port of its running JVM, or ``None`` when none runs."""
    pid = broker.running_pid()
    if pid is None:
        return None
    broker.pid, broker.port = pid, int((broker.read_state() or {}).get("port", broker.port))
    return broker


def broker_for(port: int | None, data_dir: Path | None) -> LocalBroker:
    """The broker ``--port``/``--data-dir`` name: the directory when given; else the recorded
    broker on ``port`` when it runs; else ``port``'s default directory."""
    port = port or DEFAULT_PORT
    if data_dir is None and (entry := find(port)) is not None:
        recorded = LocalBroker(port, entry.data_dir)
        if recorded.running_pid() is not None:
            return recorded
    return LocalBroker(port, data_dir or default_data_dir(port))


def forget_broker(broker: LocalBroker) -> None:
    """Remove the entries of ``broker``'s data directory (after it stopped)."""
    for entry in entries():
        if entry.data_dir.resolve() == broker.data_dir:
            forget(entry.port)
