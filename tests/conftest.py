"""Shared fixtures: a real Apache Kafka broker for the whole test session, unique topics.

Fixtures (all start real processes; nothing is mocked):

* ``kafka_broker`` (session): a :class:`LocalBroker` (PLAINTEXT) on a free 127.0.0.1 port,
  data and logs under pytest's tmp dir (kept after a failure: see ``logs/server.log``).
* ``bootstrap`` (session): its address, ``"127.0.0.1:<port>"``.
* ``settings_factory`` (function): ``make(**kw) -> Settings`` pointing at that broker, with a
  private state/model dir and the metrics endpoint off unless ``kw`` says otherwise.
* ``topic_name`` (function): a topic name no other test uses (``t-<test>-<random>``).
* ``secure_broker`` (session, started only by tests that ask for it): a second broker with a
  SASL_PLAINTEXT listener (SCRAM-SHA-256 and -512 users ``SECURE_USERS``) and an SSL listener
  (``secure_broker.ssl_bootstrap``, CA in ``secure_broker.ca_file``).
* ``free_port()``: a helper (re-exported from ``stream_lstm.kafka.local_broker``).
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path

import pytest

from stream_lstm.config import Settings
from stream_lstm.kafka.local_broker import LocalBroker, free_port

__all__ = ["SECURE_USERS", "free_port"]

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
SECURE_USERS = {"alice": "alice-secret", "bob": "bob-secret"}


def _broker(tmp_path_factory: pytest.TempPathFactory, name: str, **kw):
    broker = LocalBroker(port=free_port(), data_dir=tmp_path_factory.mktemp(name), **kw)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory):
    """A real single-node Kafka 4.x broker on a free port, stopped after the session."""
    yield from _broker(tmp_path_factory, "kafka-broker")


@pytest.fixture(scope="session")
def secure_broker(tmp_path_factory):
    """A broker with SCRAM users (``SECURE_USERS``) and TLS; only tests that need it start it."""
    yield from _broker(tmp_path_factory, "kafka-secure-broker", sasl_users=SECURE_USERS, tls=True)


@pytest.fixture(scope="session")
def bootstrap(kafka_broker) -> str:
    return kafka_broker.bootstrap


@pytest.fixture
def topic_name(request) -> str:
    """A unique, legal topic name that says which test made it."""
    test = re.sub(r"[^A-Za-z0-9._-]+", "-", request.node.name.removeprefix("test_"))[:40]
    return f"t-{test}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def settings_factory(bootstrap, tmp_path):
    """Settings pointing at the test broker, with a private state and model directory."""

    def make(**kw) -> Settings:
        kw.setdefault("state_dir", tmp_path / "state")
        kw.setdefault("model_dir", tmp_path / "models")
        kw.setdefault("metrics_port", 0)
        return Settings(bootstrap_servers=bootstrap, **kw)

    return make


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.skip(f"shared recordings not found at {SHARED_DATA}")
    return SHARED_DATA


def pytest_configure(config):
    # Worker subprocesses started by tests find the package from the checkout.
    os.environ.setdefault("PYTHONPATH", str(REPO))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """End every run with what it did not test and why, grouped by reason: a skip is a gap
    in what was checked (a missing tool, recordings or an opt-in benchmark), not a pass."""
    skipped = terminalreporter.stats.get("skipped", [])
    if not skipped:
        return
    by_reason: dict[str, list[str]] = {}
    for report in skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        by_reason.setdefault(reason.removeprefix("Skipped: "), []).append(report.nodeid)
    terminalreporter.section(f"not tested here: {len(skipped)} skipped", sep="-")
    for reason, ids in sorted(by_reason.items(), key=lambda kv: -len(kv[1])):
        terminalreporter.write_line(f"{len(ids):3d} x {reason}")
        for nodeid in ids[:3]:
            terminalreporter.write_line(f"        {nodeid}")
        if len(ids) > 3:
            terminalreporter.write_line(f"        ... and {len(ids) - 3} more")
