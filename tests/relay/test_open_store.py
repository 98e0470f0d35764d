"""The relay's store of open alerts (stream_lstm/relay/open_store.py), on the real broker."""

import json

import pytest

from stream_lstm.kafka.topics import TopicSpec, ensure_topics, topic_config
from stream_lstm.relay.open_store import OpenAlertStore

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(180)]


def opened(alert_id):
    return {"event": "open", "alert_id": alert_id, "device_id": alert_id.split("@")[0],
            "start_ts": 1.7e9, "ts": 1.7e9 + 60}


@pytest.fixture
def store_settings(settings_factory, topic_name):
    s = settings_factory(alerts_topic=f"{topic_name}-alerts")
    ensure_topics(s, [TopicSpec(s.alerts_topic, 2)])
    return s


@pytest.fixture
def store(store_settings, topic_name):
    st = OpenAlertStore(store_settings, f"{topic_name}-open", store_settings.alerts_topic)
    yield st
    st.close()


def test_open_alerts_survive_and_closed_ones_are_gone(store_settings, topic_name):
    s, topic = store_settings, f"{topic_name}-open"
    store = OpenAlertStore(s, topic, s.alerts_topic)
    assert topic_config(s, topic)["cleanup.policy"] == "compact"
    store.opened(0, opened("a@1"))
    store.opened(1, opened("b@2"))
    store.opened(0, opened("c@3"))
    assert store.flush() and store.pending == []
    store.closed(0, "a@1")
    assert store.flush()
    store.close()
    # Another store (a restarted relay) on the same topic: the open ones, by partition.
    again = OpenAlertStore(s, topic, s.alerts_topic)
    try:
        assert again.load({0, 1}) == {"b@2": (1, opened("b@2")), "c@3": (0, opened("c@3"))}
        assert list(again.load({1})) == ["b@2"] and again.load(set()) == {}
    finally:
        again.close()


def test_a_revoked_partitions_unwritten_records_are_dropped_and_sent_ones_land(store):
    store.opened(0, opened("a@1"))
    store.opened(1, opened("b@2"))
    store.drop({0})  # the next owner of partition 0 writes a@1 again when it reads the event
    assert [alert_id for _, alert_id, _ in store.pending] == ["b@2"]
    assert store.flush()
    assert list(store.load({0, 1})) == ["b@2"]


def test_a_damaged_record_is_skipped_not_a_crash(store, store_settings):
    from stream_lstm.kafka.clients import make_producer

    producer = make_producer(store_settings)
    producer.send(store.topic, key=b"x@1", value=b"not json")
    # JSON, but an event the relay could not send again (it died at its first re-send, at every start)
    producer.send(store.topic, key=b"z@3", value=json.dumps({"partition": 0, "event": {"event": "open"}}).encode())
    producer.send(store.topic, key=b"w@4", value=b"[" * 100_000)  # nested past json's depth: RecursionError
    producer.send(store.topic, key=b"y@2", value=json.dumps({"partition": 0, "event": opened("y@2")}).encode())
    producer.flush()
    producer.close()
    assert list(store.load({0, 1})) == ["y@2"]


def test_writes_the_broker_refuses_are_kept_to_write_again_and_a_revocation_never_raises(store):
    topic = store.topic
    store.topic = "not a valid topic name!"  # every send fails, as against a broker away
    store.opened(0, opened("a@1"))
    assert not store.flush() and [w[1] for w in store.pending] == ["a@1"]  # kept, in order
    store.drop({1})  # (in a rebalance callback: must not raise)
    store.topic = topic
    assert store.flush() and store.pending == []
    assert list(store.load({0})) == ["a@1"]
    store.topic = "not a valid topic name!"
    with pytest.raises(Exception):  # noqa: B017 - not an empty store: an error, retried
        store.load({0})


def test_a_store_that_cannot_reach_the_broker_waits_instead_of_raising(store, monkeypatch):
    """A failed write made a new producer at once: with the broker away that raised out of the
    relay's loop, and it exited (3) instead of waiting, as it does when idle."""
    from stream_lstm.kafka.clients import KafkaConnectError

    store.topic, topic = "not a valid topic name!", store.topic
    store.opened(0, opened("a@1"))
    assert not store.flush()  # the producer given up; the next write makes a new one

    def away():
        raise KafkaConnectError("no broker")

    monkeypatch.setattr(store, "_producer", away)
    assert not store.flush() and store.producer is None  # not written, kept, nothing raised
    store.drop({1})
    monkeypatch.undo()
    store.topic = topic
    beats = []
    assert store.flush() and list(store.load({0}, beat=lambda: beats.append(1))) == ["a@1"]
    assert beats  # (a long read beats the relay's liveness as it goes)


def test_a_record_that_can_never_be_written_is_given_up_alone(store, caplog):
    """Retried, a record too large for any request stopped reading and committing for good."""
    store.opened(0, opened("a@1") | {"padding": "x" * 5_000_000})  # over any request (4 MiB)
    store.opened(1, opened("b@2"))
    with caplog.at_level("ERROR", logger="stream_lstm.relay"):
        assert store.flush() and store.pending == []
    assert "cannot be written to the relay's store; given up" in caplog.text
    assert list(store.load({0, 1})) == ["b@2"]


def test_a_store_that_is_not_compacted_is_refused_and_a_deleted_one_is_never_re_created_by_a_write(
        store_settings, topic_name):
    """A review deleted the store under a running relay: its next write auto-created it (the
    broker allows it) with the broker's defaults, deleting, and the relay stayed ready; after a
    restart 9 of 11 open alerts were gone. A write now fails (reading stops, /readyz says why),
    and a start on a store that deletes is refused with what to do."""
    import time

    from kafka.admin import KafkaAdminClient

    from stream_lstm.kafka.topics import ChangelogTopicError

    s, topic = store_settings, f"{topic_name}-open"
    store = OpenAlertStore(s, topic, s.alerts_topic)
    admin = KafkaAdminClient(bootstrap_servers=s.bootstrap_servers)
    try:
        admin.delete_topics([topic])
        deadline = time.monotonic() + 30
        while topic in admin.list_topics() and time.monotonic() < deadline:
            time.sleep(0.2)
        store.opened(0, opened("a@1"))
        assert not store.flush() and store.pending  # kept, to write again
        assert topic not in admin.list_topics()
    finally:
        store.close()
    ensure_topics(s, [TopicSpec(topic, 2, {"cleanup.policy": "delete"})])  # (as auto-created)
    try:
        with pytest.raises(ChangelogTopicError, match=f"the relay's store of open alerts {topic} has "
                                                      "cleanup.policy=delete: it must be compacted"):
            OpenAlertStore(s, topic, s.alerts_topic)
    finally:
        admin.close()
