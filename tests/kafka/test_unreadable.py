"""A record batch the client cannot read (kafka/unreadable.py), on the real broker: its partition
is paused at the batch and the rest of the input goes on, in the client and in the worker; a
worker that can read it again (a restart) forecasts it, nothing skipped or read twice.

The codec the client "lacks" is gzip, switched off in kafka-python's codec checks after the
batch was written (every codec is installed here: lz4, zstandard and python-snappy are the
package's dependencies, so that a producer's choice never stops the worker)."""

import json

import kafka.codec
import pytest
import torch
from kafka.structs import TopicPartition

from stream_lstm.encoding import encode_reading
from stream_lstm.kafka.clients import make_consumer, make_producer
from stream_lstm.kafka.topics import TopicSpec, ensure_topics
from stream_lstm.kafka.unreadable import UNREADABLE, set_aside
from stream_lstm.models.serving import fresh_model
from stream_lstm.worker import Worker

from ..integration.helpers import read_topic, tiny_worker_settings

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(180)]
T0 = 1_700_000_000.0


def write(s, topic: str, partition: int, device: str, n: int, codec: str = "none") -> None:
    producer = make_producer(s.model_copy(update={"compression_type": codec}))
    for k in range(n):
        producer.send(topic, encode_reading(device, T0 + 60.0 * k, [20.0 + 0.1 * k]),
                      key=device.encode(), partition=partition)
    producer.flush()
    producer.close()


def test_every_codec_kafka_offers_is_installed():
    assert kafka.codec.has_gzip() and kafka.codec.has_snappy() and kafka.codec.has_lz4() and kafka.codec.has_zstd()


def test_a_batch_in_a_codec_the_client_lacks_pauses_its_partition_only(settings_factory, topic_name, monkeypatch):
    s = settings_factory()
    ensure_topics(s, [TopicSpec(topic_name, 2)])
    write(s, topic_name, 0, "zipped", 3, codec="gzip")
    write(s, topic_name, 1, "plain", 3)
    monkeypatch.setattr(kafka.codec, "has_gzip", lambda: False)
    consumer = make_consumer(s, group_id=None, enable_auto_commit=False, auto_offset_reset="earliest")
    zipped, plain = TopicPartition(topic_name, 0), TopicPartition(topic_name, 1)
    consumer.assign([zipped, plain])
    try:
        got, failed = [], None
        for _ in range(100):
            try:
                got += [r.value for recs in consumer.poll(timeout_ms=200).values() for r in recs]
            except UNREADABLE as exc:
                assert failed is None, "the batch set aside was read again while paused"
                failed = set_aside(consumer, exc)
                assert failed is not None, "kafka-python no longer says where (its fetcher's names changed)"
            if failed and len(got) == 3:
                break
        assert failed == (zipped, 0)  # the partition, and the offset it waits at
        assert consumer.paused() == {zipped} and consumer.position(zipped) == 0
        assert [json.loads(v)["device_id"] for v in got] == ["plain"] * 3
        monkeypatch.undo()  # the codec back: resumed, the batch is read from where it waited
        consumer.resume(zipped)
        again = []
        for _ in range(50):
            again += [r.offset for r in consumer.poll(timeout_ms=200).get(zipped, [])]
            if len(again) == 3:
                break
        assert again == [0, 1, 2]
    finally:
        consumer.close()


def test_the_worker_goes_on_past_a_partition_it_cannot_read_and_a_restart_reads_it(
        settings_factory, topic_name, monkeypatch):
    """It ended at the first poll with the exception, and again at every restart (a crash loop,
    the other partitions starved): found by a fuzzing review with a Java producer's snappy."""
    s = tiny_worker_settings(settings_factory, topic_name, topic_partitions=2, min_history=1)
    ensure_topics(s, [TopicSpec(topic_name, 2)])
    write(s, topic_name, 0, "zipped", 4, codec="gzip")
    write(s, topic_name, 1, "plain", 4)
    monkeypatch.setattr(kafka.codec, "has_gzip", lambda: False)
    torch.manual_seed(0)
    served = fresh_model(s)
    first = Worker(s, served)
    totals = first.run(until=lambda w: w.totals.consumed >= 4 and bool(w.group.unreadable))
    assert totals.consumed == 4 and totals.forecasts == 4  # the readable partition's, all
    series = first.metrics.exposition().decode()
    assert "stream_lstm_input_unreadable_partitions 1.0" in series
    monkeypatch.undo()  # a fixed installation, restarted: the batch waited, nothing skipped
    second = Worker(s, served)
    totals = second.run(until=lambda w: w.totals.consumed >= 4)
    assert totals.consumed == 4 and totals.forecasts == 4 and not second.totals.duplicate
    fcs = [json.loads(r.value) for r in read_topic(s, s.output_topic, expect=8)]
    assert sorted((f["device_id"], f["offset"]) for f in fcs) == sorted(
        (d, k) for d in ("plain", "zipped") for k in range(4))
