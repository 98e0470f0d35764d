"""Shared fixtures: a real Apache Kafka broker for the whole test session, unique topics."""

from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path

import pytest

from stream_lstm.config import Settings
from stream_lstm.kafka.local_broker import LocalBroker, free_port

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def kafka_broker():
    """A real single-node Kafka 4.x broker on a free port, stopped after the session."""
    with tempfile.TemporaryDirectory(prefix="stream-lstm-test-broker-") as d:
        broker = LocalBroker(port=free_port(), data_dir=d)
        broker.start()
        try:
            yield broker
        finally:
            broker.stop()


@pytest.fixture(scope="session")
def bootstrap(kafka_broker) -> str:
    return kafka_broker.bootstrap


@pytest.fixture
def topic_name() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


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
