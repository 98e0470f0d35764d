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
    # One batch (the sender waits for the flush): a batch of one record that compression does
    # not shrink goes uncompressed (kafka-python), and the sender thread took the first record
    # alone once in CI, so a "gzip" reading came through readable.
    producer = make_producer(s.model_copy(update={"compression_type": codec}), linger_ms=60_000)
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


def test_records_before_an_unreadable_batch_come_through_and_a_pause_then_resume_does_not_spin(
        settings_factory, topic_name, monkeypatch):
    """kafka-python holds the error for the next poll when records came first, and drops it if
    the partition is paused in between (a re-assignment, a held-back partition): on resume it
    spun for ever on the spent batch (found by a review of the change)."""
    import threading

    from stream_lstm.kafka.group_consumer import GroupConsumer
    from stream_lstm.kafka.rebalance import PartitionListener

    s = settings_factory(input_topic=topic_name, group_id=f"{topic_name}-g", commit_interval_ms=100)
    ensure_topics(s, [TopicSpec(topic_name, 1)])
    write(s, topic_name, 0, "plain", 3)
    write(s, topic_name, 0, "zipped", 3, codec="gzip")  # offsets 3-5, one batch
    monkeypatch.setattr(kafka.codec, "has_gzip", lambda: False)
    assigned: set = set()
    group = GroupConsumer(s, PartitionListener(assigned.update, assigned.difference_update), client_id="test")
    tp = TopicPartition(topic_name, 0)
    try:
        got = []
        for _ in range(200):
            got += [r.offset for recs in group.poll(100).values() for r in recs]
            if group.unreadable:
                break
        assert got == [0, 1, 2] and group.unreadable == {tp: 3}
        assert group.consumer.paused() == {tp}
        group.consumer.resume(tp)  # as the worker resumes a partition it restored
        polled = threading.Thread(target=lambda: [group.poll(100) for _ in range(5)], daemon=True)
        polled.start()
        polled.join(30)
        assert not polled.is_alive(), "poll() spins on the spent batch"
        assert group.unreadable == {tp: 3} and group.consumer.position(tp) == 3  # (nothing skipped)
    finally:
        group.close()


def test_a_restores_replay_skips_a_batch_it_cannot_read_and_counts_its_offsets(settings_factory, topic_name,
                                                                               monkeypatch):
    """The remedy the error line gives (move the group's offset past the batch) made every
    later restore of the partition fail and retry for ever: its replay crossed the batch."""
    from stream_lstm.checkpointing.replay import replay_input

    s = settings_factory(input_topic=topic_name)
    ensure_topics(s, [TopicSpec(topic_name, 1)])
    write(s, topic_name, 0, "plain", 3)
    write(s, topic_name, 0, "zipped", 3, codec="gzip")  # offsets 3-5
    write(s, topic_name, 0, "after", 2)  # 6-7
    monkeypatch.setattr(kafka.codec, "has_gzip", lambda: False)
    handed = []
    r = replay_input(s, 0, 0, 8, lambda recs: handed.extend(x.offset for x in recs), timeout_s=60)
    assert handed == [0, 1, 2, 6, 7] and (r.missing, r.unreadable, r.position) == (3, 3, 8)
