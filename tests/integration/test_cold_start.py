"""A worker that starts at the same moment as its topics (a fresh compose stack, a new k8s
namespace) forecasts within seconds, several times in a row: whatever the order in which the
topics, the group and the changelog restore come up, no partition stays unassigned or paused
until a metadata refresh (minutes)."""

import threading
import time

import pytest

from stream_lstm.kafka.topics import partition_count
from stream_lstm.worker import Worker

from .helpers import produce_readings, read_topic

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(120)]

# Well below kafka-python's metadata refresh (5 min) and a restore's timeout (120 s), with room
# for a loaded two-core machine (topic creation, a group join, a restore's set-up, the reader's
# own join).
WITHIN_S = 60.0


@pytest.mark.parametrize("attempt", range(5))
def test_a_worker_started_with_its_topics_forecasts_within_seconds(settings_factory, topic_name, attempt):
    s = settings_factory(input_topic=topic_name, output_topic=f"{topic_name}-out",
                         dlq_topic=f"{topic_name}-dlq", group_id=f"{topic_name}-g")
    devices, per_device = 4, s.min_history + 4
    readings = [(f"d{d}", 1_700_000_000.0 + 60 * k, float(k + d))
                for k in range(per_device) for d in range(devices)]
    expected = devices * (per_device - s.min_history + 1)
    t0 = time.monotonic()
    worker = Worker(s)  # default settings: the served model comes from the (empty) registry
    done = threading.Event()
    th = threading.Thread(target=lambda: worker.run(until=lambda w: done.is_set()), daemon=True)
    th.start()
    # At once, while the worker is still creating the topic: the producer waits for it.
    produce_readings(s, topic_name, readings)
    try:
        out = read_topic(s, s.output_topic, expect=expected, timeout_s=WITHIN_S)
        elapsed = time.monotonic() - t0
    finally:
        done.set()
        th.join(30)
    assert partition_count(s, topic_name) == s.topic_partitions
    assert len(out) == expected, f"{len(out)} of {expected} forecasts within {WITHIN_S} s ({elapsed:.0f} s)"
