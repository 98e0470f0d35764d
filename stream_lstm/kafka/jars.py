"""Apache Kafka's jars from Maven Central: where they are pinned, fetched and cached.

``deploy/kafka/pom.xml`` pins the version and adds the log4j2 binding Kafka's POM leaves out;
:func:`fetch_jars` runs ``mvn dependency:copy-dependencies`` on it once and reuses the jars
from ``<cache>/kafka-<version>/libs`` afterwards. Kept apart from running the broker
(:mod:`stream_lstm.kafka.local_broker`) because getting the jars needs no broker: CI and
``stream-lstm kafka fetch`` fetch them without starting one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

KAFKA_VERSION = "4.1.1"
JAVA_HINT = "OpenJDK 17 (apt install openjdk-17-jre-headless)"
MAVEN_HINT = "Apache Maven (apt install maven)"


class BrokerError(RuntimeError):
    """The local broker could not be set up; the message says what to do."""


def user_cache_dir() -> Path:
    """``$STREAM_LSTM_CACHE_DIR``, else ``$XDG_CACHE_HOME/stream-lstm``, else ``~/.cache/...``."""
    if os.environ.get("STREAM_LSTM_CACHE_DIR"):
        return Path(os.environ["STREAM_LSTM_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "stream-lstm"


def require_tool(name: str, install: str) -> str:
    """The path of ``name`` on PATH, or a one-line :class:`BrokerError` saying what to install."""
    if (path := shutil.which(name)) is None:
        raise BrokerError(f"{name} not found: install {install}")
    return path


def find_pom() -> Path:
    """The pom that pins Kafka: ``deploy/kafka/pom.xml`` is the one source of truth.

    Looked up as ``$STREAM_LSTM_KAFKA_POM``, then ``stream_lstm/kafka/pom.xml`` (a symlink to
    the deploy file in a checkout, a real copy in a built wheel), then the checkout path.
    """
    here = Path(__file__).resolve().parent
    candidates = [here / "pom.xml", here.parents[1] / "deploy" / "kafka" / "pom.xml"]
    if os.environ.get("STREAM_LSTM_KAFKA_POM"):
        candidates = [Path(os.environ["STREAM_LSTM_KAFKA_POM"])]
    for pom in candidates:
        if pom.is_file():
            return pom
    raise BrokerError(f"the Kafka pom was not found (looked at {', '.join(map(str, candidates))}): "
                      "set STREAM_LSTM_KAFKA_POM to a copy of deploy/kafka/pom.xml")


def fetch_jars(cache_dir: Path | None = None) -> Path:
    """The directory of Kafka's jars, fetched with Maven once and then reused.

    A marker file holding the pom's sha256 is written only after a complete copy, so an
    interrupted fetch is redone, and so is a fetch for an edited pom. A file lock keeps two
    processes (a test session and a CLI call, say) from fetching into the same place at once.
    """
    root = Path(cache_dir or user_cache_dir()) / f"kafka-{KAFKA_VERSION}"
    libs, marker = root / "libs", root / "libs" / ".complete"
    pom: Path | None = None
    with contextlib.suppress(BrokerError):
        pom = find_pom()
    want = hashlib.sha256(pom.read_bytes()).hexdigest() if pom else None
    if marker.exists() and (want is None or marker.read_text().strip() == want):
        return libs  # cached: an installed copy without the pom still uses its jars
    if pom is None:
        find_pom()  # raises the clear error
    require_tool("java", JAVA_HINT)  # mvn itself fails obscurely without java
    mvn = require_tool("mvn", MAVEN_HINT)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists() and marker.read_text().strip() == want:
            return libs  # another process fetched while we waited
        shutil.rmtree(libs, ignore_errors=True)  # no stale jars of an older pom on the classpath
        cmd = [mvn, "-q", "-B", "-f", str(pom), "dependency:copy-dependencies",
               f"-DoutputDirectory={libs}", f"-Dkafka.version={KAFKA_VERSION}"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0 or not any(libs.glob("kafka_2.13-*.jar")):
            raise BrokerError(f"mvn could not fetch Kafka {KAFKA_VERSION} ({' '.join(cmd)}):\n"
                              f"{(result.stdout + result.stderr)[-3000:]}")
        marker.write_text(str(want))
    return libs
