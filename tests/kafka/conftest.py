"""Fixtures of the tests of the ``stream-lstm kafka`` command and its broker registry.

* ``own_cache``: a private cache directory (``STREAM_LSTM_CACHE_DIR``: the registry of brokers
  ``kafka up`` started and the default data directories) that reuses the real cache's jars,
  so no test reads or changes the user's.
"""

import os

import pytest

from stream_lstm.kafka.jars import KAFKA_VERSION, user_cache_dir


@pytest.fixture
def own_cache(tmp_path_factory, monkeypatch):
    """A private cache (registry, default data dirs) that reuses the real cache's jars."""
    jars = user_cache_dir() / f"kafka-{KAFKA_VERSION}"
    cache = tmp_path_factory.mktemp("cache")
    if jars.exists():
        os.symlink(jars, cache / jars.name)
    monkeypatch.setenv("STREAM_LSTM_CACHE_DIR", str(cache))
    return cache
