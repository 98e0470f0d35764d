"""The partition coordinator (partitions.py) on the real broker: an assigned partition stays
paused and not ready until its state is restored, then resumes; a revoked one takes its devices
out of memory."""

import time
from types import SimpleNamespace

import numpy as np
import pytest

from stream_lstm.bring_in import BringIn
from stream_lstm.checkpointing.manager import StateManager
from stream_lstm.engine import BatchedEngine
from stream_lstm.kafka.group_consumer import GroupConsumer
from stream_lstm.kafka.rebalance import PartitionListener
from stream_lstm.kafka.topics import ensure_worker_topics
from stream_lstm.metrics import HealthState, Metrics
from stream_lstm.models import SimpleLSTM
from stream_lstm.partitions import PartitionCoordinator
from stream_lstm.pipeline import BatchPipeline
from stream_lstm.state.table import DeviceTable
from stream_lstm.transaction import TransactionUnit

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(120)]


def coordinator_for(s, store_path):
    """A partition coordinator wired as the worker wires it (no publisher: nothing is sent)."""
    table = DeviceTable(16, 4, 1, 1, 8)
    metrics, health = Metrics(), HealthState()
    state = StateManager(s, store_path, metrics)
    pipeline = BatchPipeline(s, table, BatchedEngine(SimpleLSTM(1, 8, 1, s.horizon), table), lambda: "v1")
    bring_in = BringIn(table, state, SimpleNamespace(admit=lambda slots: None))
    tx = TransactionUnit(s, state, table, metrics, new_publisher=lambda: None)
    coordinator = PartitionCoordinator(s, state, table, pipeline, bring_in, tx, health, metrics)
    return coordinator, SimpleNamespace(table=table, metrics=metrics, health=health, state=state, tx=tx)


def test_assigned_partitions_wait_for_their_state_then_resume(settings_factory, topic_name, tmp_path):
    s = settings_factory(input_topic=topic_name, output_topic=f"{topic_name}-out",
                         dlq_topic=f"{topic_name}-dlq", group_id=f"{topic_name}-g",
                         processing_guarantee="at_least_once", window=4, min_history=1, hidden_size=8)
    ensure_worker_topics(s)
    coordinator, parts = coordinator_for(s, tmp_path / "state.sqlite")
    table, metrics, health, state = parts.table, parts.metrics, parts.health, parts.state
    paused_at_assignment: list[set] = []

    def assigned(partitions):
        coordinator.on_assigned(partitions)
        paused_at_assignment.append({tp.partition for tp in group.consumer.paused()})

    group = GroupConsumer(s, PartitionListener(assigned, coordinator.on_revoked), client_id="test")
    coordinator.group = group
    try:
        deadline = time.monotonic() + 60
        while not coordinator.assigned and time.monotonic() < deadline:
            group.poll(100)
        assert coordinator.assigned == set(range(s.topic_partitions))
        assert paused_at_assignment == [coordinator.assigned]  # paused before any fetch
        ready, detail = health.readiness()
        assert not ready and detail["partitions"].startswith("restoring")

        while state.restoring and time.monotonic() < deadline:
            coordinator.restore_some()
        assert not state.restoring and group.consumer.paused() == set()
        (count,) = [x.value for x in metrics.restore_seconds.collect()[0].samples
                    if x.name.endswith("_count")]
        assert count == s.topic_partitions  # one per partition, assignment to resume
        assert health.readiness()[1]["partitions"] == "ok"

        slots = table.slots_for(["a", "b"], partitions=[0, 1], now=0.0)
        assert len(slots) == 2
        metrics.consumer_lag.labels("0").set(7)  # as housekeeping.update_lag sets it
        coordinator.on_revoked({0})
        assert list(table.index) == ["b"] and coordinator.assigned == set(range(1, s.topic_partitions))
        # The revoked partition's series are gone (its new owner reports them now).
        series = {(x.name, x.labels.get("partition")) for m in metrics.registry.collect() for x in m.samples}
        assert ("stream_lstm_consumer_lag_messages", "0") not in series
        assert ("stream_lstm_restore_progress_ratio", "0") not in series
        assert ("stream_lstm_restore_progress_ratio", "1") in series
        assert np.isfinite(table.last_seen[table.index["b"]])
    finally:
        group.close()
        state.store.close(clean=True)


def test_a_rollback_forgets_its_partitions_positions_until_their_replay_completes(settings_factory, tmp_path):
    """After a rollback the partitions are restored and replayed again. Their last commit's
    positions must not outlive it: a commit during the replay would write them as the
    partitions' replay markers, and a later restore from there would skip the readings the
    replay had not reached (their devices' state silently older than what was published)."""
    from kafka.structs import TopicPartition

    s = settings_factory(window=4, min_history=1, hidden_size=8)
    coordinator, parts = coordinator_for(s, tmp_path / "state.sqlite")
    state, tx = parts.state, parts.tx
    try:
        coordinator.assigned, state.ready = {0, 1}, {0, 1}
        tx.next_offsets = {TopicPartition(s.input_topic, p): 1000 for p in (0, 1)}
        coordinator.forget_state()  # what Worker._rollback does after a failed commit
        assert state.restoring == {0, 1} and tx.next_offsets == {}
    finally:
        state.store.close(clean=False)


def test_a_spare_worker_holding_no_partition_is_ready_once_its_group_has_settled(settings_factory, topic_name, tmp_path):
    """More workers than partitions: the one left without a partition is a spare, and ready
    (a pod that is never ready pages StreamLstmNotReady, holds up a StatefulSet's rolling
    update and counts against the disruption budget). While it has not joined it is not. Once
    the partition comes to it (the other worker leaves) it restores first, as any worker."""
    s = settings_factory(input_topic=topic_name, output_topic=f"{topic_name}-out",
                         dlq_topic=f"{topic_name}-dlq", group_id=f"{topic_name}-g", topic_partitions=1,
                         processing_guarantee="at_least_once", window=4, min_history=1, hidden_size=8)
    ensure_worker_topics(s)
    members = []
    for name in ("first", "spare"):
        coordinator, parts = coordinator_for(s, tmp_path / f"{name}.sqlite")
        parts.health.set_ready("partitions", False, "waiting for assignment")  # as Worker.run does
        coordinator.group = GroupConsumer(s, PartitionListener(coordinator.on_assigned, coordinator.on_revoked),
                                          client_id=name)
        members.append((coordinator, parts))
    (first, first_parts), (spare, spare_parts) = members

    left = []  # the coordinators whose consumer has closed

    def turn(coordinator):
        if coordinator in left:
            return
        coordinator.group.poll(100)
        if coordinator.state.restoring or coordinator.state.replaying:
            coordinator.restore_some()
        coordinator.check_group()

    def until(condition, what):
        deadline = time.monotonic() + 90
        while not condition():
            assert time.monotonic() < deadline, what
            turn(first)
            turn(spare)

    def leave(coordinator, parts):
        left.append(coordinator)
        coordinator.group.close()
        parts.state.store.close(clean=True)

    try:
        until(lambda: first.assigned == {0}, "the first worker's assignment")
        until(lambda: spare.idle_member, "the spare to settle in the group with no partition")
        until(lambda: first_parts.health.readiness()[0], "the first worker's restore")
        assert spare.assigned == set()
        assert spare_parts.health.readiness() == (True, {"partitions": "ok"})
        assert spare_parts.metrics.ready.collect()[0].samples[0].value == 1
        leave(first, first_parts)  # the first worker leaves: its partition goes to the spare
        until(lambda: spare.assigned == {0}, "the partition to move to the spare")
        assert not spare.idle_member  # holding one now: ready once it is restored, not before
        until(lambda: spare_parts.health.readiness()[0], "the spare's restore")
        assert spare_parts.health.readiness()[1]["partitions"] == "ok"
    finally:
        for coordinator, parts in members:
            if coordinator not in left:
                leave(coordinator, parts)


@pytest.mark.parametrize("fits", [True, False], ids=["small handover", "large handover"])
def test_a_revocation_checkpoints_its_changed_devices_only_if_that_fits_in_the_session(
        settings_factory, topic_name, monkeypatch, fits):
    """kafka-python runs the revocation on its IO loop, which also heartbeats: a large fleet's
    checkpoints there outlasted the session timeout and the member was dropped mid-commit (a
    review). Past a third of the session the revoked partitions are left to their next owner's
    replay, as after a crash; the open transaction commits either way."""
    from stream_lstm import partitions
    from stream_lstm.checkpointing.changelog import REPLAY_MARKER
    from stream_lstm.kafka.topics import TopicSpec, ensure_topics
    from stream_lstm.models.serving import fresh_model
    from stream_lstm.worker import Worker
    from tests.integration.helpers import produce_readings, read_topic, tiny_worker_settings

    if not fits:  # (every changed device costs more than the whole session)
        monkeypatch.setattr(partitions, "CHECKPOINT_S_PER_DEVICE", 100.0)
    # (A transaction held open across the turns: the revocation finds it uncommitted.)
    s = tiny_worker_settings(settings_factory, topic_name, commit_interval_ms=30_000)
    ensure_topics(s, [TopicSpec(topic_name, 2)])
    produce_readings(s, topic_name, [(f"d{d}", 1_700_000_000.0 + 60 * k, float(k)) for k in range(12)
                                     for d in range(8)])
    worker, seen = Worker(s, fresh_model(s)), {}

    def revoke_mid_transaction(w) -> bool:
        on_p0 = [d for d, p in w.state.dirty.items() if p == 0]
        if len(w.state.dirty) == 8 and w.tx.open is not None and on_p0 and not seen:
            seen["devices"] = set(on_p0)
            w.partitions.on_revoked({0})  # (as kafka-python calls it inside a poll)
            seen["failed"] = w.partitions.failed_in_callback
        return bool(seen)

    worker.run(until=revoke_mid_transaction)  # (then a clean stop: partition 1's checkpoints)
    assert seen["failed"] is None  # committed
    changelog = read_topic(s, s.changelog_topic_name(), idle_s=1.0)
    written = {r.key.decode() for r in changelog if r.partition == 0 and r.key != REPLAY_MARKER and r.value}
    assert written == (seen["devices"] if fits else set())
