"""The worker (worker.py) on the real broker with a tiny fleet: every consumed reading ends in
exactly one place (a forecast, the warm-up, late, duplicate or the DLQ), what it published is
committed, ``stop()`` from another thread ends the loop cleanly, and a new worker of the group
resumes after the last commit with the devices' state. (Crashes, rebalances, faults and
retraining through the worker: tests/integration/.)"""

import json
import threading
import time

import pytest
import torch

from stream_lstm.kafka.clients import make_producer
from stream_lstm.kafka.local_broker import free_port
from stream_lstm.kafka.topics import TopicSpec, ensure_topics
from stream_lstm.models.serving import fresh_model
from stream_lstm.worker import Worker

from .integration.helpers import produce_readings, read_topic, tiny_worker_settings

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(180)]
T0 = 1_700_000_000.0


def small(settings_factory, topic, **kw):
    return tiny_worker_settings(settings_factory, topic, **({"topic_partitions": 2, "min_history": 3} | kw))


def fleet(start: int, stop: int, devices: int = 3):
    return [(f"d{d}", T0 + 60.0 * k, 20.0 + d + 0.1 * k) for k in range(start, stop) for d in range(devices)]


def test_every_reading_ends_in_exactly_one_place_and_what_is_published_is_committed(
        settings_factory, topic_name):
    s = small(settings_factory, topic_name)
    ensure_topics(s, [TopicSpec(topic_name, 2)])
    readings = fleet(0, 6)
    readings += [("d0", T0 + 60.0 * 5, 99.0),  # the same time again: a duplicate
                 ("d1", T0 + 60.0 * 2, 99.0)]  # before its last reading: late
    produce_readings(s, topic_name, readings)
    producer = make_producer(s)
    producer.send(topic_name, b"{not json", key=b"d2")
    producer.flush()
    producer.close()
    n = len(readings) + 1
    torch.manual_seed(0)
    worker = Worker(s, fresh_model(s))
    totals = worker.run(until=lambda w: w.totals.consumed >= n)
    assert totals.consumed == n
    assert (totals.duplicate, totals.late, totals.dlq) == (1, 1, 1)
    assert totals.warmup == 3 * (s.min_history - 1) and totals.forecasts == 3 * 6 - totals.warmup
    assert totals.consumed == totals.forecasts + totals.warmup + totals.late + totals.duplicate + totals.dlq
    series = worker.metrics.exposition().decode().splitlines()
    consumed = sum(float(line.rsplit(" ", 1)[1]) for line in series
                   if line.startswith("stream_lstm_readings_consumed_total{"))
    assert consumed == n  # what /metrics says
    fcs = [json.loads(r.value) for r in read_topic(s, s.output_topic, expect=totals.forecasts)]
    assert len(fcs) == totals.forecasts  # read_committed: all of it committed
    assert len({(f["partition"], f["offset"]) for f in fcs}) == len(fcs)
    dead = read_topic(s, s.dlq_topic, expect=1)
    assert [r.value for r in dead] == [b"{not json"]
    # Closed: out of the group, not ready.
    assert worker.group is None and worker.consumer is None
    assert worker.health.readiness()[1]["partitions"] == "closed"


def test_stop_ends_the_loop_and_the_next_worker_resumes_after_the_commit(settings_factory, topic_name):
    s = small(settings_factory, topic_name)
    ensure_topics(s, [TopicSpec(topic_name, 2)])
    produce_readings(s, topic_name, fleet(0, 5))
    torch.manual_seed(0)
    served = fresh_model(s)
    first = Worker(s, served)
    done = threading.Event()
    loop = threading.Thread(target=lambda: (first.run(), done.set()), daemon=True)
    loop.start()
    deadline = time.monotonic() + 60
    while first.totals.consumed < 15:  # committed transactions only
        assert time.monotonic() < deadline and loop.is_alive(), f"consumed {first.totals.consumed}"
        time.sleep(0.05)
    first.stop()
    assert done.wait(30), "run() did not return after stop()"
    assert first.totals.consumed == 15 and first.group is None

    produce_readings(s, topic_name, fleet(5, 8))
    second = Worker(s, served)
    totals = second.run(until=lambda w: w.totals.consumed >= 9)
    assert totals.consumed == 9  # only the new readings: nothing read twice
    assert totals.warmup == 0 and totals.forecasts == 9  # the devices' state came back with them
    expected = first.totals.forecasts + 9  # 3 devices: 5 readings, 2 of them warm-up; then 3 more
    assert expected == 18
    fcs = [json.loads(r.value) for r in read_topic(s, s.output_topic, expect=expected)]
    assert len(fcs) == expected and not any(f["reset"] for f in fcs)
    assert len({(f["partition"], f["offset"]) for f in fcs}) == expected


def test_a_stop_while_waiting_for_the_broker_leaves_it_not_ready_and_the_shutdown_unclean(
        settings_factory, topic_name, caplog):
    # After a failed publish the worker retries the broker until it answers. A stop that comes
    # first must not report the broker back, nor let the shutdown commit against it.
    s = small(settings_factory, topic_name)
    worker = Worker(s, fresh_model(s))
    worker.connect()
    attempts = []

    def broker_still_down():
        attempts.append(time.monotonic())
        worker.stop()  # e.g. SIGTERM during the outage
        raise ConnectionError("broker down")

    worker.tx.reconnect = broker_still_down
    try:
        with caplog.at_level("INFO", logger="stream_lstm"):
            worker._rollback(RuntimeError("publish failed"))
        assert len(attempts) == 1 and worker.broker_lost
        ready, detail = worker.health.readiness()
        assert not ready and "broker" in detail
        assert not any("reachable again" in r.getMessage() for r in caplog.records)
    finally:
        worker.close(clean=False)


@pytest.mark.parametrize(("guarantee", "backoff_ms"), [("exactly_once", 20), ("at_least_once", 100)])
def test_the_transactional_producer_is_configured_to_retry_a_refused_start_after_20_ms(
        settings_factory, topic_name, guarantee, backoff_ms):
    # kafka-python's sender sleeps the producer's retry_backoff_ms before it retries a
    # transactional request; the next transaction's first one is refused while the broker
    # completes the last commit (CONCURRENT_TRANSACTIONS). 20 ms as the Java client does, not
    # the default 100 ms that held every send behind it (docs/benchmarks.md).
    s = small(settings_factory, topic_name, processing_guarantee=guarantee)
    worker = Worker(s, fresh_model(s))
    worker.connect()
    try:
        assert worker.publisher.producer.config["retry_backoff_ms"] == backoff_ms
    finally:
        worker.close(clean=False)


def test_the_promotion_time_is_the_served_models_not_the_start_of_the_process(settings_factory, topic_name):
    """It was set to the time the worker connected: each restart read as a promotion."""
    from stream_lstm.models.registry import LoadedModel

    s = small(settings_factory, topic_name)
    fresh = fresh_model(s)
    served = LoadedModel(fresh.model, fresh.spec, {"version": "v0007", "created_at": "2026-01-02T03:04:05Z"})
    worker = Worker(s, served)
    worker.connect()
    try:
        assert worker.metrics.model_promoted_timestamp_seconds._value.get() == 1767323045.0
    finally:
        worker.close(clean=False)


def aborted(worker) -> float:
    return worker.metrics.transactions.labels("aborted")._value.get()


def test_two_workers_with_one_instance_id_are_told_so(settings_factory, topic_name, caplog):
    """Two hosts configured alike fenced each other's transactions for ever, each rollback
    saying only ProducerFencedError (a faults audit): the line now names the cause."""
    from kafka.errors import InvalidProducerEpochError, ProducerFencedError

    from stream_lstm.kafka.publisher import PublishError

    s = small(settings_factory, topic_name, instance_id="same")
    worker = Worker(s, fresh_model(s))
    # (Its /metrics says the instance id too: it said the host name, unlike the trainer's.)
    assert b'stream_lstm_up_info{instance="same"' in worker.metrics.exposition()
    worker.connect()
    worker.stop()  # (no reconnect loop after the line)
    try:
        with caplog.at_level("ERROR", logger="stream_lstm.worker"):
            worker._rollback(ProducerFencedError())
            assert not worker.fenced_out  # once: perhaps its own stall; it takes the id back
            # (kafka-python's other word for it, on a produce request's records: the worker
            # counted only ProducerFenced, the trainer both)
            worker._rollback(PublishError(f"send to {s.output_topic} failed: {InvalidProducerEpochError()}"))
            assert worker.fenced_out and worker.broker_lost  # twice: a live holder; it stops
    finally:
        worker.close(clean=False)
    assert f"another producer took its transactional id {s.group_id}-same" in caplog.text
    assert "STREAM_LSTM_INSTANCE_ID=same: each needs its own" in caplog.text


def test_a_member_dropped_from_its_group_writes_no_checkpoints_alone(settings_factory, topic_name):
    """A worker stopped (SIGSTOP, a long pause) past its session, its partitions taken over,
    woke and committed a transaction of checkpoints alone: with no offsets it carried no
    generation, and its older checkpoints and replay marker overwrote the new owner's (a later
    restore lost the readings in between; found by a faults audit). Such a transaction now
    names its partitions' positions, and a member that has lost its generation is refused."""
    from stream_lstm.kafka.publisher import PublishError

    s = small(settings_factory, topic_name, max_poll_interval_ms=3000, session_timeout_ms=6000)
    ensure_topics(s, [TopicSpec(topic_name, 2)])
    produce_readings(s, topic_name, fleet(0, 6))
    worker = Worker(s, fresh_model(s))
    refused = []

    def stall_then_checkpoint(w) -> bool:
        if w.totals.consumed < 18 or w.tx.open is not None or w.tx.committing or not w.state.dirty:
            return False
        # Everything committed, the devices' checkpoints not yet due (30 s): a pause now ...
        coordinator, t0 = w.group.consumer._coordinator, time.monotonic()
        while not coordinator._generation.is_lost():
            assert time.monotonic() - t0 < 30, "the member never left its group"
            time.sleep(0.1)
        # ... and the checkpoints of its partitions, alone, are not committed.
        with pytest.raises(PublishError, match="generation lost"):
            w.tx.commit(w.group.consumer, flush=set(w.assigned))
        w.tx.abort()
        refused.append(True)
        return True

    worker.run(until=stall_then_checkpoint)
    assert refused == [True]


def test_a_member_dropped_from_its_group_aborts_its_transaction_and_loses_nothing(
        settings_factory, topic_name, caplog):
    # The worker stalls past max.poll.interval.ms with a transaction open: kafka-python's
    # heartbeat thread leaves the group, and the next poll reports the partitions lost. The
    # transaction must be aborted, not committed (its offsets would carry no generation, which
    # the broker accepts for a transactional commit: a zombie's forecasts published twice once
    # another member holds them). Rejoined, the worker restores, replays and publishes every
    # reading once.
    # (A 2 s commit interval: the first batch's transaction is still open when the turn that
    # processed it stalls; the stall is what makes the member lose its partitions.)
    s = small(settings_factory, topic_name, max_poll_interval_ms=3000, session_timeout_ms=6000,
              commit_interval_ms=2000)
    ensure_topics(s, [TopicSpec(topic_name, 2)])
    produce_readings(s, topic_name, fleet(0, 6))
    n = 18
    torch.manual_seed(0)
    worker = Worker(s, fresh_model(s))
    stalled, refused_commits = [], []

    def stall_once_with_a_transaction_open(w) -> bool:
        if not stalled and w.tx.open is not None:
            # A stuck turn (a long GC pause, a slow disk) until the heartbeat thread has left
            # the group (kafka-python's coordinator: its generation is gone).
            stalled.append(time.monotonic())
            coordinator = w.group.consumer._coordinator
            while not coordinator._generation.is_lost():
                assert time.monotonic() - stalled[0] < 30, "the member never left its group"
                time.sleep(0.1)
            # A commit now (its interval due before the next poll reports the loss) must not
            # go out with no generation: it is refused and rolled back.
            refused_commits.append(not w.commit())
        return w.totals.consumed >= n

    with caplog.at_level("INFO", logger="stream_lstm"):
        totals = worker.run(until=stall_once_with_a_transaction_open)
    assert stalled and refused_commits == [True] and aborted(worker) >= 1
    assert any("generation lost" in getattr(r, "error", "") for r in caplog.records)
    assert any(r.getMessage().startswith("partitions lost") for r in caplog.records)
    assert totals.consumed == n and totals.forecasts == 3 * (6 - (s.min_history - 1))
    fcs = [json.loads(r.value) for r in read_topic(s, s.output_topic, expect=totals.forecasts)]
    assert len(fcs) == totals.forecasts
    assert len({(f["partition"], f["offset"]) for f in fcs}) == len(fcs)


def test_a_worker_that_fails_closes_without_committing_the_failed_batch(settings_factory, topic_name):
    # A batch fails after it changed the devices' state (e.g. CUDA out of memory). Closing the
    # consumer revokes the partitions; the open transaction must not commit there, or its
    # checkpoints would carry the failed batch's state with offsets from before it, and a
    # restart would drop those readings as duplicates.
    s = small(settings_factory, topic_name, commit_interval_ms=10_000)  # open through both batches
    ensure_topics(s, [TopicSpec(topic_name, 2)])
    produce_readings(s, topic_name, fleet(0, 4))
    torch.manual_seed(0)
    served = fresh_model(s)
    first = Worker(s, served)
    handle, calls = first.bring_in.handle, []

    def fail_the_second_batch(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("CUDA out of memory (a stand-in)")
        return handle(*args, **kw)

    first.bring_in.handle = fail_the_second_batch
    produce_more = [False]

    def until(w) -> bool:
        if w.tx.open is not None and not produce_more[0]:  # a second batch for the failure
            produce_more[0] = True
            produce_readings(s, topic_name, fleet(4, 5))
        return False

    with pytest.raises(RuntimeError, match="stand-in"):
        first.run(until=until)
    assert read_topic(s, s.output_topic, timeout_s=5, idle_s=1) == []  # nothing committed
    assert len(calls) == 2 and aborted(first) == 1

    second = Worker(s.model_copy(update={"commit_interval_ms": 100}), served)
    totals = second.run(until=lambda w: w.totals.consumed >= 15)
    assert totals.consumed == 15 and totals.duplicate == 0 and totals.late == 0
    assert totals.forecasts == 3 * (5 - (s.min_history - 1))
    fcs = [json.loads(r.value) for r in read_topic(s, s.output_topic, expect=totals.forecasts)]
    assert len({(f["partition"], f["offset"]) for f in fcs}) == len(fcs) == totals.forecasts


def test_at_least_once_never_checkpoints_readings_whose_forecasts_failed(
        settings_factory, topic_name, caplog):
    # The forecasts topic refuses every forecast (max.message.bytes 100) while the changelog
    # takes the checkpoints. A checkpoint sent beside the failed forecasts would land; the
    # rollback would restore it, and the readings, read again, would be duplicates with no
    # forecast. Once the topic takes them, every reading gets its forecast.
    from kafka.admin import ConfigResource, ConfigResourceType

    from stream_lstm.kafka.clients import make_admin

    s = small(settings_factory, topic_name, processing_guarantee="at_least_once",
              checkpoint_interval_s=0)  # a checkpoint with every commit
    ensure_topics(s, [TopicSpec(topic_name, 2), TopicSpec(s.output_topic, 2, {"max.message.bytes": "100"})])
    produce_readings(s, topic_name, fleet(0, 5))
    n = 15
    torch.manual_seed(0)
    worker = Worker(s, fresh_model(s))
    refused = []

    def until(w) -> bool:
        if not refused and aborted(w) >= 1:  # a batch was refused and rolled back
            refused.append(aborted(w))
            admin = make_admin(s)  # the topic takes forecasts again
            try:
                admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, s.output_topic,
                                                    configs={"max.message.bytes": "1048588"})])
            finally:
                admin.close()
        return bool(refused) and w.totals.consumed >= n

    with caplog.at_level("ERROR", logger="stream_lstm.worker"):
        totals = worker.run(until=until)
    assert refused and any("rolling back" in r.getMessage() for r in caplog.records)
    assert totals.duplicate == 0 and totals.consumed == n
    fcs = [json.loads(r.value) for r in read_topic(s, s.output_topic, expect=totals.forecasts)]
    assert {(f["device_id"], f["ts"]) for f in fcs} == {
        (d, ts) for d, ts, _ in fleet(0, 5) if ts >= T0 + 60.0 * (s.min_history - 1)}


def test_ctrl_c_while_the_broker_cannot_be_reached_at_start_exits_at_once(tmp_path):
    """connect()'s waits for a broker take ~30 s each and the signal only set a flag: three
    Ctrl-Cs went unheard for 27 s. While connecting, a signal now interrupts at once (exit 130)."""
    import os
    import signal
    import subprocess
    import sys

    port = free_port()  # a free port: nothing listens there (the "broker")
    env = dict(os.environ, STREAM_LSTM_BOOTSTRAP_SERVERS=f"127.0.0.1:{port}", STREAM_LSTM_METRICS_PORT="0",
               STREAM_LSTM_STATE_DIR=str(tmp_path / "state"), STREAM_LSTM_MODEL_DIR=str(tmp_path / "models"))
    proc = subprocess.Popen([sys.executable, "-m", "stream_lstm.cli", "run"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:  # inside connect(): the client tries the broker and fails
            if "Bootstrap connection" in line:
                break
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 130
    finally:
        proc.kill()
        proc.wait()


def connected_with_a_backlog(s, topic: str) -> tuple[Worker, int]:
    """A worker connected to ``topic`` (2 partitions) holding 6 readings of each of 3 devices;
    and their number."""
    ensure_topics(s, [TopicSpec(topic, 2)])
    produce_readings(s, topic, fleet(0, 6))
    torch.manual_seed(0)
    worker = Worker(s, fresh_model(s))
    worker.connect()
    return worker, 18


def test_a_commit_whose_answer_was_lost_is_counted_once_and_its_readings_not_read_again(
        settings_factory, topic_name, caplog):
    """The broker took the commit, then went away before answering (injected: the commit is
    real, its answer dropped). The worker rolls back, rewinds to the committed offsets, which
    are past that commit's readings, and counts it then: every reading once in its totals and
    its /metrics, every forecast once in the output."""
    from stream_lstm.kafka.publisher import PublishError

    s = small(settings_factory, topic_name)
    worker, n = connected_with_a_backlog(s, topic_name)
    publisher = worker.tx.publisher
    real = publisher.finish_commit

    def answer_lost():
        real()
        raise PublishError("the broker went away before answering (a stand-in)")

    publisher.finish_commit = answer_lost  # (the first commit: the worker reconnects after it)
    more, deadline = [], time.monotonic() + 90

    def until(w) -> bool:
        if w.totals.consumed >= n and not more:  # then readings after the rollback
            more.append(produce_readings(s, topic_name, fleet(6, 8)))
        return w.totals.consumed >= n + 6 or time.monotonic() > deadline

    with caplog.at_level("INFO", logger="stream_lstm.worker"):
        totals = worker.run(until=until)
    (resolved,) = [r for r in caplog.records if r.getMessage().startswith("the commit that failed had completed")]
    assert resolved.readings > 0
    n += 6
    assert totals.consumed == n and totals.duplicate == 0 and totals.late == 0
    assert totals.forecasts == n - 3 * (s.min_history - 1)  # the devices' state came back
    series = worker.metrics.exposition().decode().splitlines()
    assert sum(float(line.rsplit(" ", 1)[1]) for line in series
               if line.startswith("stream_lstm_readings_consumed_total{")) == n
    fcs = [json.loads(r.value) for r in read_topic(s, s.output_topic, expect=totals.forecasts)]
    assert len({(f["partition"], f["offset"]) for f in fcs}) == len(fcs) == totals.forecasts


def test_a_commit_refused_for_an_unknown_member_gives_the_partitions_up_at_once(
        settings_factory, topic_name, caplog):
    """A member dropped while its whole process stood still (SIGSTOP, a VM paused) wakes with its
    old generation: its commit is refused (UnknownMemberIdError), and it restored its partitions,
    committed, was refused again, 3-4 times over 1.5-4 s until its heartbeat found out (a chaos
    test). The refusal is injected here (the commit never reaches the broker); the worker must
    give its partitions up at the next poll, rejoin, and lose nothing."""
    from kafka.errors import CommitFailedError

    s = small(settings_factory, topic_name, max_poll_interval_ms=3000, session_timeout_ms=6000)
    worker, n = connected_with_a_backlog(s, topic_name)

    def refused():
        raise CommitFailedError("Transaction offset commit failed due to consumer group metadata "
                                "mismatch: UnknownMemberIdError")

    worker.tx.publisher.finish_commit = refused  # (the first commit: the worker reconnects after it)
    deadline = time.monotonic() + 90
    with caplog.at_level("INFO", logger="stream_lstm"):
        totals = worker.run(until=lambda w: w.totals.consumed >= n or time.monotonic() > deadline)
    said = [r.getMessage() for r in caplog.records]
    gone = [i for i, m in enumerate(said) if m.startswith("this member is no longer in its group")]
    lost = [i for i, m in enumerate(said) if m.startswith("partitions lost")]
    assert len(gone) == 1 and lost and lost[0] > gone[0], said
    assert sum(m.startswith("publishing a batch failed") for m in said) == 1
    assert totals.consumed == n and totals.forecasts == n - 3 * (s.min_history - 1)
    fcs = [json.loads(r.value) for r in read_topic(s, s.output_topic, expect=totals.forecasts)]
    assert len({(f["partition"], f["offset"]) for f in fcs}) == len(fcs) == totals.forecasts


def test_two_live_workers_with_one_instance_id_leave_one_serving(settings_factory, topic_name, tmp_path, caplog):
    """They took the transactional id back from each other every 2 s for as long as both ran,
    each ready and the lag growing (a review: a paused worker resumed beside its replacement,
    or two hosts configured alike). The second fencing within 10 minutes now stops a worker
    (`run` exits 2: a restart would take the id back) and the other serves on."""
    from stream_lstm.encoding import encode_reading
    from tests.integration.helpers import guarantee_settings

    s = guarantee_settings(settings_factory, topic_name, instance_id="same", topic_partitions=2)
    ensure_topics(s, [TopicSpec(topic_name, 2)])
    fed = threading.Event()

    def feed() -> None:  # readings keep coming: a worker hears of its fencing when it publishes
        producer, k = make_producer(s), 0
        while not fed.is_set():
            for d in range(4):
                producer.send(topic_name, encode_reading(f"d{d}", T0 + 60.0 * k, [20.0 + d + 0.1 * k]),
                              key=f"d{d}".encode())
            producer.flush()
            k += 1
            time.sleep(0.05)
        producer.close()

    workers = [Worker(s, fresh_model(s))]
    threads = [threading.Thread(target=feed, daemon=True), threading.Thread(target=workers[0].run, daemon=True)]
    for t in threads:
        t.start()
    try:
        with caplog.at_level("ERROR", logger="stream_lstm.worker"):
            deadline = time.monotonic() + 60
            while workers[0].totals.consumed == 0:
                assert time.monotonic() < deadline, "the first worker never committed"
                time.sleep(0.1)
            # The same id, its own store (a store is locked to one process).
            workers.append(Worker(s.model_copy(update={"state_dir": tmp_path / "second"}), fresh_model(s)))
            threads.append(threading.Thread(target=workers[1].run, daemon=True))
            threads[-1].start()
            deadline = time.monotonic() + 120
            while not any(w.fenced_out for w in workers):
                assert time.monotonic() < deadline, "neither gave the id up"
                time.sleep(0.1)
            out = 0 if workers[0].fenced_out else 1
            threads[1 + out].join(60)  # it stops by itself
            assert not threads[1 + out].is_alive()
            live = workers[1 - out]
            before, deadline = live.totals.consumed, time.monotonic() + 60
            while live.totals.consumed < before + 40:  # the other serves on, fenced no more
                assert time.monotonic() < deadline and not live.fenced_out, "the other stopped serving"
                time.sleep(0.1)
    finally:
        fed.set()
        for w in workers:
            w.stop()
        for t in threads:
            t.join(60)
    assert "fenced twice in 10 min: it is live, so this worker stops and leaves the id to it" in caplog.text
