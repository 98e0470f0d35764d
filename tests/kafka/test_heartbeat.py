"""The group-heartbeat watch (kafka/heartbeat.py): silent only past ``stale_after_s`` (never
before the first heartbeat), read at most every ``check_every_s``, and the ``broker`` readiness
it reports and clears without touching other reasons; and the metric it reads is the one a
real kafka-python consumer in a group has."""

import time

import pytest

from stream_lstm.kafka.clients import make_consumer
from stream_lstm.kafka.heartbeat import GroupHeartbeat
from stream_lstm.kafka.topics import TopicSpec, ensure_topics
from stream_lstm.metrics import HealthState


class Consumer:
    """Reports a heartbeat age as a kafka-python consumer's ``metrics()`` does; counts reads."""

    def __init__(self, age=None) -> None:
        self.age, self.reads = age, 0

    def metrics(self):
        self.reads += 1
        if self.age is None:
            return None  # what kafka-python returns when metrics are off
        return {"consumer-coordinator-metrics": {"last-heartbeat-seconds-ago": self.age}}


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def watch(consumer, stale_after_s=10.0, check_every_s=0.0, clock=time.monotonic):
    return GroupHeartbeat(consumer, stale_after_s=stale_after_s, check_every_s=check_every_s, clock=clock)


@pytest.mark.parametrize("age", [None, float("inf"), 0.5, 10.0])
def test_no_metrics_no_heartbeat_yet_or_a_recent_one_is_not_silence(age):
    assert watch(Consumer(age)).silent_for() is None


def test_an_old_heartbeat_is_silence_until_a_new_one():
    consumer = Consumer(10.5)
    beat = watch(consumer)
    assert beat.silent_for() == 10.5
    consumer.age = 2
    assert beat.silent_for() is None


def test_the_metrics_are_read_at_most_every_check_interval():
    consumer, clock = Consumer(30.0), Clock()
    beat = watch(consumer, check_every_s=2.0, clock=clock)
    assert beat.silent_for() == 30.0 and consumer.reads == 1
    consumer.age = 1.0
    clock.now += 1.9
    assert beat.silent_for() == 30.0 and consumer.reads == 1  # the last reading, not a new one
    clock.now += 0.1
    assert beat.silent_for() is None and consumer.reads == 2


def test_report_marks_the_broker_not_ready_and_ready_again():
    consumer, health = Consumer(45.2), HealthState()
    health.set_ready("broker", True)
    beat = watch(consumer, stale_after_s=30.0)
    assert beat.report(health) is True
    assert health.readiness() == (False, {"broker": "no consumer-group heartbeat for 45s"})
    assert beat.report(health) is True  # still silent: said again, with the new age
    consumer.age = 1.0
    assert beat.report(health) is True and health.readiness() == (True, {"broker": "ok"})
    assert beat.report(health) is False  # nothing to change


def test_report_leaves_another_reason_for_not_ready_alone():
    health = HealthState()
    health.set_ready("broker", False, "publish failed: KafkaTimeoutError")
    assert watch(Consumer(1.0)).report(health) is False
    assert health.readiness() == (False, {"broker": "publish failed: KafkaTimeoutError"})


@pytest.mark.kafka
@pytest.mark.timeout(120)
def test_a_real_consumer_reports_the_age_of_its_last_heartbeat(settings_factory, topic_name):
    s = settings_factory()
    ensure_topics(s, [TopicSpec(topic_name, 1)])
    consumer = make_consumer(s, topic_name, group_id=f"{topic_name}-g", heartbeat_interval_ms=200)
    try:
        # stale_after_s below any age: whatever age the consumer reports comes back.
        beat = watch(consumer, stale_after_s=-1.0)
        assert beat.silent_for() is None  # not in the group yet: no heartbeat, no silence
        deadline = time.monotonic() + 60
        while not consumer.assignment():  # joined
            assert time.monotonic() < deadline, "never joined"
            consumer.poll(timeout_ms=200)
        ages = []
        while len(ages) < 5 or ages[-1] is None:
            assert time.monotonic() < deadline, f"no heartbeat age: {ages}"
            consumer.poll(timeout_ms=100)
            ages.append(beat.silent_for())
        assert 0.0 <= ages[-1] < 10.0  # seconds, of this consumer's heartbeat every 0.2 s
        assert watch(consumer, stale_after_s=30.0).silent_for() is None
    finally:
        consumer.close()
