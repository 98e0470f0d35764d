"""Partitions added to the input topic between two runs of the worker (an operator scaling
out), through the real broker with the default settings.

Kafka moves no records when partitions are added: a device whose key now hashes to a new
partition sends its next readings there. The worker must start (it used to refuse: the
changelog had fewer partitions than the input), grow the changelog to match, serve the new
partitions, and publish one forecast a reading with nothing lost; one worker holding every
partition carries each device's state on, wherever its readings now land.
"""

import json
import threading

import pytest
from kafka.admin import NewPartitions

from stream_lstm.kafka.clients import make_admin
from stream_lstm.kafka.topics import TopicSpec, ensure_topics, partition_count
from stream_lstm.models.serving import fresh_model
from stream_lstm.worker import Worker

from .helpers import (
    assert_exactly_once_and_continuous,
    guarantee_settings,
    produce_readings,
    published,
    read_topic,
)

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(400)]


def run_until_consumed(s, served, total):
    worker = Worker(s, served)
    stop = threading.Event()
    thread = threading.Thread(target=lambda: worker.run(until=lambda w: stop.is_set() or w.totals.consumed >= total),
                              daemon=True)
    thread.start()
    thread.join(180)
    stop.set()
    assert not thread.is_alive() and worker.totals.consumed == total, worker.totals
    return worker


def test_a_worker_serves_partitions_added_to_its_input_and_grows_the_changelog(settings_factory, topic_name):
    s = guarantee_settings(settings_factory, topic_name, topic_partitions=2)
    ensure_topics(s, [TopicSpec(topic_name, 2)])
    served = fresh_model(s)
    t0, devices, history = 1_700_000_000.0, 12, {}

    def readings(steps):
        out = []
        for k in steps:
            for d in range(devices):
                value = float((k * 7 + d * 3) % 11)
                history.setdefault(f"d{d}", []).append(value)
                out.append((f"d{d}", t0 + 60 * k, value))
        return out

    produce_readings(s, topic_name, readings(range(0, 20)))
    run_until_consumed(s, served, 20 * devices)  # a clean stop: every device checkpointed
    admin = make_admin(s)
    admin.create_partitions({topic_name: NewPartitions(total_count=4)})
    admin.close()
    produce_readings(s, topic_name, readings(range(20, 40)))  # (a fresh producer: all 4 partitions)
    run_until_consumed(s, served, 20 * devices)
    assert partition_count(s, s.changelog_topic_name()) == 4
    out = read_topic(s, s.output_topic, expect=published(history, s), timeout_s=120)
    assert {json.loads(r.value)["partition"] for r in out} == {0, 1, 2, 3}  # the new ones served
    assert_exactly_once_and_continuous(out, history, served.model, s)
