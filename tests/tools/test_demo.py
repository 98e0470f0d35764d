"""`stream-lstm up` starts a fresh broker each run: nothing a previous run left is seen."""

import shutil

import pytest
from kafka import KafkaAdminClient

from stream_lstm.config import Settings
from stream_lstm.kafka.local_broker import free_port
from stream_lstm.kafka.topics import TopicSpec, ensure_topics
from stream_lstm.tools.demo import ensure_broker

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(240)]


def test_each_run_starts_a_fresh_broker_without_the_last_run_s_topics():
    nothing_there = Settings(bootstrap_servers=f"127.0.0.1:{free_port()}")
    port = free_port()
    seen = []
    for _ in range(2):
        bootstrap, broker = ensure_broker(nothing_there, port)
        assert broker is not None and bootstrap == f"127.0.0.1:{port}"
        try:
            admin = KafkaAdminClient(bootstrap_servers=bootstrap)
            seen.append(("left-by-an-earlier-run" in admin.list_topics(), broker.data_dir))
            admin.close()
            ensure_topics(nothing_there.model_copy(update={"bootstrap_servers": bootstrap}),
                          [TopicSpec("left-by-an-earlier-run", 1, {})])
        finally:
            broker.stop()
            shutil.rmtree(broker.data_dir, ignore_errors=True)  # as main() does
    (first_had, first_dir), (second_had, second_dir) = seen
    assert not first_had and not second_had  # the second run does not see the first's topic
    assert first_dir != second_dir
