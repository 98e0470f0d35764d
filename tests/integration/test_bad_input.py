"""Every class of bad input, mixed with good readings, through the real broker and worker.

Each bad reading lands in the DLQ with a stable code, a readable reason and its source
partition/offset; the good readings around it are forecast; the accounting invariant holds;
and a worker restarted over a topic full of poison does not crash-loop.
"""

import json
import time

import pytest

from stream_lstm.kafka.clients import make_producer
from stream_lstm.models.serving import fresh_model
from stream_lstm.worker import Worker

from .helpers import read_topic

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(300)]

NOW = time.time()
T = NOW - 3600


def good(dev, k):
    return dev.encode(), json.dumps({"device_id": dev, "ts": T + 60 * k, "value": 20.0 + k}).encode()


# (expected code, key, value)
BAD = [
    ("not_json", b"bad", b"hello there"),
    ("truncated_json", b"bad", b'{"device_id": "bad", "ts": 1'),
    ("not_object", b"bad", b"[1, 2, 3]"),
    ("not_object", b"bad", b"42"),
    ("missing_device_id", b"bad", json.dumps({"ts": T, "value": 1.0}).encode()),
    ("empty_device_id", b"", json.dumps({"device_id": "", "ts": T, "value": 1.0}).encode()),
    ("device_id_too_long", b"x" * 200, json.dumps({"device_id": "x" * 200, "ts": T, "value": 1.0}).encode()),
    ("device_id_control_chars", b"a\nb", json.dumps({"device_id": "a\nb", "ts": T, "value": 1.0}).encode()),
    ("missing_ts", b"bad", json.dumps({"device_id": "bad", "value": 1.0}).encode()),
    ("bad_ts", b"bad", json.dumps({"device_id": "bad", "ts": "yesterday", "value": 1.0}).encode()),
    ("ts_boolean", b"bad", json.dumps({"device_id": "bad", "ts": True, "value": 1.0}).encode()),
    ("value_not_finite", b"bad", b'{"device_id": "bad", "ts": %d, "value": NaN}' % int(T)),
    ("value_not_finite", b"bad", b'{"device_id": "bad", "ts": %d, "value": Infinity}' % int(T)),
    ("value_not_finite", b"bad", b'{"device_id": "bad", "ts": %d, "value": -Infinity}' % int(T)),
    ("value_numeric_string", b"bad", json.dumps({"device_id": "bad", "ts": T, "value": "71.2"}).encode()),
    ("values_wrong_length", b"bad", json.dumps({"device_id": "bad", "ts": T, "values": [1.0, 2.0]}).encode()),
    ("value_nested", b"bad", json.dumps({"device_id": "bad", "ts": T, "value": {"v": 1}}).encode()),
    ("value_out_of_range", b"bad", json.dumps({"device_id": "bad", "ts": T, "value": 1e9}).encode()),
    ("oversized", b"bad", json.dumps({"device_id": "bad", "ts": T, "value": 1.0, "pad": "x" * 5000}).encode()),
    ("bad_utf8", b"bad", b'{"device_id": "b\xff\xfe", "ts": 1, "value": 1}'),
    ("null_key", None, json.dumps({"device_id": "bad", "ts": T, "value": 1.0}).encode()),
    ("key_mismatch", b"other", json.dumps({"device_id": "bad", "ts": T, "value": 1.0}).encode()),
    ("duplicate_json_keys", b"bad", b'{"device_id": "bad", "ts": %d, "value": 1, "value": 2}' % int(T)),
    ("ts_far_future", b"bad", json.dumps({"device_id": "bad", "ts": NOW + 86400, "value": 1.0}).encode()),
    ("tombstone", b"bad", None),
    ("tombstone", None, None),  # no key either: clients refuse to send that as a dead letter
    ("missing_value", b"bad", json.dumps({"device_id": "bad", "ts": T}).encode()),
]


def send(producer, topic, value, key, partition=0):
    if key is None and value is None:
        # What Java or librdkafka producers may write and kafka-python's send() refuses: into
        # its accumulator directly (names pinned by tests/kafka/test_publisher.py).
        from kafka.structs import TopicPartition

        producer.partitions_for(topic)
        producer._accumulator.append(TopicPartition(topic, partition), int(time.time() * 1000),
                                     None, None, [])
        producer._sender.wakeup()
    else:
        producer.send(topic, value, key=key, partition=partition)


def settings(settings_factory, topic):
    return settings_factory(input_topic=topic, output_topic=f"{topic}-out", dlq_topic=f"{topic}-dlq",
                            group_id=f"{topic}-g", min_history=1, max_message_bytes=4096,
                            value_min=-1000.0, value_max=1000.0, late_policy="dlq")


def test_every_bad_class_goes_to_dlq_and_good_ones_are_forecast(settings_factory, topic_name):
    s = settings(settings_factory, topic_name)
    assert len({code for code, _, _ in BAD}) >= 20
    producer = make_producer(s)
    sent_good = 0
    for k, (_, key, value) in enumerate(BAD):
        for dev in ("g1", "g2"):  # good readings around every bad one, same partition or not
            kk, vv = good(dev, k)
            producer.send(topic_name, vv, key=kk, partition=0)
            sent_good += 1
        send(producer, topic_name, value, key)
    # extra unknown fields are accepted (documented); a late reading goes to the DLQ as "late"
    producer.send(topic_name, json.dumps({"device_id": "g1", "ts": T + 60 * 30, "value": 1.0, "site": "x"}).encode(),
                  key=b"g1", partition=0)
    producer.send(topic_name, json.dumps({"device_id": "g1", "ts": T + 60 * 10.5, "value": 1.0}).encode(),
                  key=b"g1", partition=0)
    producer.flush()
    total = len(BAD) + sent_good + 2
    worker = Worker(s, fresh_model(s))
    totals = worker.run(until=lambda w: w.totals.consumed >= total)
    assert totals.consumed == total
    assert totals.consumed == totals.forecasts + totals.warmup + totals.late + totals.duplicate + totals.dlq
    assert totals.forecasts == sent_good + 1 and totals.dlq == len(BAD) + 1

    dlq = read_topic(s, s.dlq_topic, expect=len(BAD) + 1)
    assert len(dlq) == len(BAD) + 1
    dlq.sort(key=lambda rec: int(dict(rec.headers)["source.offset"]))  # DLQ partitions follow keys
    codes = []
    for rec in dlq:
        headers = dict(rec.headers)
        codes.append(headers["error.code"].decode())
        assert headers["error.reason"] and headers["source.topic"].decode() == topic_name
        assert headers["source.partition"] == b"0" and int(headers["source.offset"]) >= 0
    assert codes == [code for code, _, _ in BAD] + ["late"]  # in order, nothing lost
    for rec, (code, key, value) in zip(dlq, BAD, strict=False):
        headers = dict(rec.headers)
        assert rec.key == key
        if code == "oversized":  # its first max_message_bytes, and its full length
            assert rec.value == value[:4096] and headers["source.value_bytes"] == str(len(value)).encode()
        elif key is None and value is None:
            assert rec.value == b"" and headers["source.value_null"] == b"1"
        else:
            assert rec.value == value and "source.value_bytes" not in headers  # the original bytes
    fcs = [json.loads(r.value) for r in read_topic(s, s.output_topic, expect=sent_good + 1)]
    assert len(fcs) == sent_good + 1
    text = worker.metrics.exposition().decode()
    assert 'stream_lstm_invalid_readings_total{reason="not_object"} 2.0' in text


def test_poison_topic_never_crash_loops(settings_factory, topic_name):
    s = settings(settings_factory, topic_name)
    producer = make_producer(s)
    for k, (_, key, value) in enumerate(BAD * 3):
        send(producer, topic_name, value, key, partition=k % s.topic_partitions)
    producer.flush()
    def caught_up(w) -> bool:
        """Every partition assigned, restored, and read up to its end."""
        if len(w.assigned) < s.topic_partitions or w.partitions.busy():
            return False
        consumer = w.group.consumer
        tps = w.partitions.tps(w.assigned)
        ends = consumer.end_offsets(tps)
        return all(consumer.position(tp) >= ends[tp] for tp in tps)

    for attempt in range(3):  # restart over the same poison, as a supervisor would
        worker = Worker(s, fresh_model(s))
        deadline = time.time() + 60
        if attempt == 0:
            totals = worker.run(until=lambda w, d=deadline: w.totals.consumed >= len(BAD) * 3 or time.time() > d)
            assert totals.dlq == len(BAD) * 3
        else:
            reached = []
            totals = worker.run(until=lambda w, d=deadline, r=reached: (caught_up(w) and not r.append(True))
                                or time.time() > d)
            assert reached, "the restarted worker never caught up with the topic"
            assert totals.consumed == 0  # everything was committed the first time: no replay


def test_a_key_of_megabytes_is_dead_lettered_in_part_and_stops_nothing(settings_factory, topic_name):
    """A not-JSON record with a 6 MB key (gzip let the broker take it): kept whole, its dead letter
    was larger than the producer may send, the transaction failed, and the worker retried the
    same poll for ever, every partition stalled. Now the dead letter keeps 1,024 bytes of it."""
    s = settings(settings_factory, topic_name)
    big = make_producer(s, compression_type="gzip", max_request_size=16 * 1024 * 1024)
    big.send(topic_name, b"not json", key=b"k" * 6_000_000, partition=0).get(timeout=60)
    big.close()
    producer = make_producer(s)
    for k in range(5):
        for dev, partition in (("g1", 0), ("g2", 1)):
            key, value = good(dev, k)
            producer.send(topic_name, value, key=key, partition=partition)
    producer.flush()
    worker = Worker(s, fresh_model(s))
    totals = worker.run(until=lambda w: w.totals.consumed >= 11)
    assert totals.dlq == 1 and totals.forecasts == 10
    (dead,) = read_topic(s, s.dlq_topic, expect=1)
    headers = dict(dead.headers)
    assert dead.key == b"k" * 1024 and headers["source.key_bytes"] == b"6000000"
    assert headers["error.code"] == b"not_json" and dead.value == b"not json"
    assert len(read_topic(s, s.output_topic, expect=10)) == 10
