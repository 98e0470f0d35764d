"""Moving the group's offsets back (README, "Reprocessing the input"), through the real broker
and worker: the readings re-read are counted as duplicates, none forecast again, none late."""

import json
import time

import pytest
from kafka import KafkaConsumer
from kafka.structs import OffsetAndMetadata, TopicPartition

from stream_lstm.kafka.clients import make_producer
from stream_lstm.kafka.topics import TopicSpec, ensure_topics
from stream_lstm.models.serving import fresh_model
from stream_lstm.worker import Worker

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(300)]

DEVICES, EACH = 5, 80


def test_readings_re_read_after_the_offsets_moved_back_are_duplicates_not_late_dead_letters(
        settings_factory, topic_name):
    # Late readings dead-lettered (not the default) so that a re-read one counted as late shows
    # on the DLQ too; everything else at its default.
    s = settings_factory(input_topic=topic_name, output_topic=f"{topic_name}-out",
                         dlq_topic=f"{topic_name}-dlq", group_id=f"{topic_name}-g", late_policy="dlq")
    ensure_topics(s, [TopicSpec(topic_name, s.topic_partitions)])
    producer = make_producer(s)
    start = time.time() - 2 * 60 * EACH  # (a minute apart, all in the past)
    for k in range(EACH):
        for d in range(DEVICES):
            dev = f"d{d}"
            producer.send(topic_name, json.dumps({"device_id": dev, "ts": start + 60 * k, "value": 20.0 + d + k % 7}).encode(),
                          key=dev.encode())
    producer.flush()
    producer.close()
    total = DEVICES * EACH
    first = Worker(s, fresh_model(s)).run(until=lambda w: w.totals.consumed >= total)
    assert first.consumed == total and first.late == first.duplicate == first.dlq == 0

    # An operator moves the group back to the start (kafka-consumer-groups.sh --reset-offsets).
    mover = KafkaConsumer(bootstrap_servers=s.bootstrap_servers, group_id=s.group_id, enable_auto_commit=False)
    mover.commit({TopicPartition(topic_name, p): OffsetAndMetadata(0, "", -1) for p in range(s.topic_partitions)})
    mover.close()
    # Re-read by a worker stopped cleanly partway (its last commit checkpoints its partitions,
    # with their markers), then by another: every re-read reading of both is a duplicate.
    small = s.model_copy(update={"poll_max_records": 50})
    part = Worker(small, fresh_model(s)).run(until=lambda w: w.totals.consumed >= total // 4)
    assert part.consumed < total
    rest = Worker(small, fresh_model(s)).run(until=lambda w: w.totals.consumed >= total - part.consumed)
    # (each device's last reading equals its last applied ts: a duplicate before too; the rest
    # were counted late, and with this policy dead-lettered as late; the second worker's too
    # once the first's clean stop wrote its partitions' markers back at the committed offset)
    for run in (part, rest):
        assert (run.duplicate, run.late, run.dlq, run.forecasts) == (run.consumed, 0, 0, 0)
    assert part.consumed + rest.consumed == total
