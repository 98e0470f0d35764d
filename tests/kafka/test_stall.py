"""A poll stuck inside kafka-python is ended, counted, and the worker goes on (kafka/stall.py).

The stall is made the way it happens: the consumer's fetch is queued on its real IO thread but
never completes, so ``poll`` waits on kafka-python's ``Event().wait()`` with no timeout.
"""

import pytest
from kafka.errors import KafkaTimeoutError
from kafka.future import Future
from kafka.structs import TopicPartition

from stream_lstm.encoding import encode_reading
from stream_lstm.kafka.clients import make_consumer, make_producer
from stream_lstm.kafka.stall import StallGuard
from stream_lstm.kafka.topics import TopicSpec, ensure_topics
from stream_lstm.models.serving import fresh_model
from stream_lstm.worker import Worker

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(120)]


def hang_next_fetch(consumer):
    """The consumer's next fetch never completes: its waiter pends on a future nobody resolves."""
    net = consumer._net
    real_run = net.run
    fetch = consumer._fetcher._send_fetches_async

    async def never():
        return await Future()

    def run(coro, *args):
        if coro == fetch:
            net.run = real_run  # only once
            return real_run(never)
        return real_run(coro, *args)

    net.run = run


def send(settings, topic, devices, ts):
    producer = make_producer(settings)
    for dev in devices:
        producer.send(topic, encode_reading(dev, ts, [1.0]), key=dev.encode())
    producer.flush()
    producer.close()


def test_a_stuck_poll_raises_and_the_consumer_still_reads(settings_factory, topic_name):
    s = settings_factory(input_topic=topic_name)
    ensure_topics(s, [TopicSpec(topic_name, 1)])
    send(s, topic_name, ["a", "b"], 1_700_000_000.0)
    consumer = make_consumer(s, auto_offset_reset="earliest", enable_auto_commit=False)
    consumer.assign([TopicPartition(topic_name, 0)])
    guard = StallGuard(consumer, check_every_s=0.05)
    try:
        hang_next_fetch(consumer)
        with pytest.raises(KafkaTimeoutError, match="kafka-python#3121"):
            with guard.limit("consumer.poll", 1.0):
                consumer.poll(timeout_ms=100)
        assert guard.stalls == 1
        got = 0
        for _ in range(100):
            got += sum(len(v) for v in consumer.poll(timeout_ms=200).values())
            if got == 2:
                break
        assert got == 2
    finally:
        guard.close()
        consumer.close(autocommit=False)


def test_the_worker_counts_a_stuck_poll_and_processes_every_reading(settings_factory, topic_name):
    # The stall limit is max.poll.interval + session timeout + poll timeout: 7.1 s here.
    s = settings_factory(input_topic=topic_name, output_topic=f"{topic_name}-out",
                         dlq_topic=f"{topic_name}-dlq", group_id=f"{topic_name}-g",
                         max_poll_interval_ms=1000, session_timeout_ms=6000)
    worker = Worker(s, fresh_model(s))
    worker.connect()
    send(s, topic_name, [f"d{i}" for i in range(10)], 1_700_000_000.0)
    armed = []

    def until(w):
        if w.totals.consumed >= 10 and not armed:
            armed.append(True)
            hang_next_fetch(w.consumer)
            send(s, topic_name, [f"d{i}" for i in range(10)], 1_700_000_060.0)
        return w.totals.consumed >= 20

    worker.run(until=until)
    assert worker.totals.consumed == 20
    # (>= 1: the member dropped by the 1 s poll interval may count a second stall while it rejoins)
    assert worker.metrics.kafka_stalls._value.get() >= 1


def test_a_consumer_that_never_joins_its_group_is_replaced(settings_factory, topic_name):
    # The limit is max.poll.interval + session timeout: 7 s here.
    s = settings_factory(input_topic=topic_name, output_topic=f"{topic_name}-out",
                         dlq_topic=f"{topic_name}-dlq", group_id=f"{topic_name}-g",
                         max_poll_interval_ms=1000, session_timeout_ms=6000)
    send(s, topic_name, [f"d{i}" for i in range(10)], 1_700_000_000.0)
    worker = Worker(s, fresh_model(s))
    worker.connect()
    stuck = worker.consumer
    stuck._coordinator.ensure_active_group = lambda *a, **kw: False  # polls, never joins
    worker.run(until=lambda w: w.totals.consumed >= 10)
    assert worker.totals.consumed == 10
    # The stuck consumer is replaced (at least once: on a loaded machine its replacement may
    # itself outlast the 7 s and be replaced in turn, which is the same rule at work).
    assert worker.metrics.kafka_stalls._value.get() >= 1


def test_a_rebalance_callback_is_not_a_stall_and_the_poll_is_limited_again_after_it():
    """A revocation that commits a large fleet's checkpoints runs inside poll: past the guard's
    limit it was ended as kafka-python's hang (and counted as one)."""
    import time

    from stream_lstm.kafka.group_consumer import _Unguarded

    guard = StallGuard(object(), check_every_s=3600)  # (its watcher idle: the state is checked)
    seen = []

    class Listener:
        def on_partitions_revoked(self, revoked):
            seen.append(guard._call)  # nothing to end while the worker's own code runs

    try:
        with guard.limit("consumer.poll", 20.0):
            _Unguarded(Listener(), lambda: guard).on_partitions_revoked([TopicPartition("t", 0)])
            what, limit, deadline = guard._call
        assert seen == [None] and (what, limit) == ("consumer.poll", 20.0)
        assert deadline > time.monotonic() + 19  # the limit starts again after the callback
        assert guard._call is None and guard.stalls == 0
    finally:
        guard.close()
