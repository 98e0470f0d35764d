"""The worker: the long-lived loop that wires every part together.

One iteration is one batch: **poll → decode → state → engine → encode → publish → commit**:
up to ``poll_max_records`` readings from the input topic (consumer group) are decoded
(:class:`~stream_lstm.messages.ReadingDecoder`, invalid ones to the DLQ), applied to state
(:func:`~stream_lstm.state.ingest.ingest`: event-time rules, normalization, windows, rounds),
run through the engine (one batched LSTM step per round across all devices), and published and
committed by :class:`~stream_lstm.kafka.publisher.BatchPublisher`.

The loop is this module; its parts sit below it and never call it:

* ``kafka/group_consumer.py``: the consumer in its group, guarded against kafka-python's
  stuck states;
* ``transaction.py``: the transaction unit (send, commit with checkpoints, abort);
* ``partitions.py``: the partition coordinator (assign, revoke, restore and replay, readiness);
* ``housekeeping.py``: TTL expiry, gauges and lag, on a clock.

Every consumed reading ends in exactly one place: a forecast, the warm-up count, the late or
duplicate count, or the DLQ. The counts are metrics, so the accounting can be checked live.
"""

from __future__ import annotations

import gc
import logging
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from kafka import KafkaConsumer
from kafka.structs import TopicPartition

from stream_lstm.bring_in import BringIn
from stream_lstm.checkpointing.manager import StateManager
from stream_lstm.checkpointing.replay import check_retention
from stream_lstm.config import Settings, SettingsError
from stream_lstm.connection_checks import with_ports
from stream_lstm.engine import BatchedEngine, resolve_device, set_inference_threads
from stream_lstm.housekeeping import Housekeeping
from stream_lstm.kafka.clients import LOOP_BOOTSTRAP_TIMEOUT_MS, make_producer
from stream_lstm.kafka.group_consumer import GroupConsumer
from stream_lstm.kafka.publisher import BatchPublisher, is_fencing
from stream_lstm.kafka.rebalance import PartitionListener
from stream_lstm.kafka.topics import ensure_worker_topics
from stream_lstm.logs import kafka_closing
from stream_lstm.metrics import HealthState, Metrics
from stream_lstm.models.registry import LoadedModel
from stream_lstm.models.serving import load_served_model
from stream_lstm.partitions import PartitionCoordinator
from stream_lstm.pipeline import BatchCounts, BatchPipeline
from stream_lstm.state.table import DeviceTable
from stream_lstm.training.lifecycle import ModelLifecycle
from stream_lstm.training.models_follower import ModelsFollower
from stream_lstm.transaction import TransactionUnit, transaction_timeout_ms

log = logging.getLogger("stream_lstm.worker")


class Worker:
    """The forecasting worker. ``run()`` loops until ``stop()`` (or SIGTERM/SIGINT).

    Parameters
    ----------
    settings
        All settings.
    served
        The model to serve; by default :func:`~stream_lstm.models.serving.load_served_model`.
    metrics, health
        Prometheus series and health state; created when not given.

    Example: see tests/test_worker.py::test_every_reading_ends_in_exactly_one_place_and_what_is_published_is_committed
    """

    def __init__(self, settings: Settings, served: LoadedModel | None = None,
                 metrics: Metrics | None = None, health: HealthState | None = None) -> None:
        self.settings = settings
        follower = ModelsFollower(settings) if settings.trainer == "external" else None
        self.served = served or (follower and follower.to_serve(settings)) or load_served_model(settings)
        self.metrics = metrics or Metrics(settings.instance_id or None)
        self.health = health or HealthState()
        self.device = resolve_device(settings.device)
        self.inference_threads = set_inference_threads(settings.torch_threads)
        spec = self.served.spec
        self.state = StateManager(settings, settings.state_dir / f"{settings.group_id}-{self.instance_id}.sqlite", self.metrics)
        # A device evicted from memory goes to the state manager (the store, or held until the
        # next commit when it changed since the last).
        self.table = DeviceTable(
            max_devices=settings.max_devices, window=settings.window,
            n_features=spec.n_features, num_layers=spec.num_layers,
            hidden_size=spec.hidden_size, device=self.device,
            normalizer=settings.normalizer, alpha=settings.normalizer_alpha,
            std_floor=settings.std_floor, with_experts="experts" in settings.stage_names,
            on_evict=self.state.on_evict,
        )
        self.engine = BatchedEngine(self.served.model, self.table, version=self.served.version)
        self.lifecycle = ModelLifecycle(settings, self.served, self.engine, self.table, self.metrics, follower)
        # A replay must step each reading under the model that served it: a device re-warmed
        # after a swap is checkpointed with the next commit (training/lifecycle.py).
        self.lifecycle.checkpoints = self.state
        self.pipeline = BatchPipeline(settings, self.table, self.engine, lambda: self.lifecycle.version)
        self.pipeline.applied_below = self.state.marker_floor  # (one fact: set and cleared there)
        self.bring_in = BringIn(self.table, self.state, self.lifecycle)
        self.tx = TransactionUnit(settings, self.state, self.table, self.metrics, self._new_publisher)
        self.partitions = PartitionCoordinator(settings, self.state, self.table, self.pipeline,
                                               self.bring_in, self.tx, self.health, self.metrics)
        self.housekeeping = Housekeeping(settings, self.state, self.table, self.metrics,
                                         self.pipeline.farewell)
        self.group: GroupConsumer | None = None
        self._stop = threading.Event()
        # Set when a stop came while waiting for the broker after a failed publish: the worker
        # then shuts down without a final commit (there is no broker to commit to).
        self.broker_lost = False
        self.fenced_out = False  # stopped for another live worker with its transactional id
        self.first_batch_at: float | None = None  # perf_counter of the first batch (benchmarks)
        self.ever_assigned = False  # (never: its store holds only what it opened with)

    # ---- what callers and tests look at ---------------------------------------------------
    @property
    def consumer(self) -> KafkaConsumer | None:
        """The group's current consumer (kafka/group_consumer.py may replace a stuck one)."""
        return self.group.consumer if self.group is not None else None

    @property
    def publisher(self) -> BatchPublisher | None:
        return self.tx.publisher

    @property
    def totals(self) -> BatchCounts:
        """What committed transactions carried."""
        return self.tx.totals

    @property
    def assigned(self) -> set[int]:
        return self.partitions.assigned

    @property
    def instance_id(self) -> str:
        return self.settings.instance_id or socket.gethostname()

    def on_assigned(self, partitions: set[int]) -> None:
        self.ever_assigned = True
        self.partitions.on_assigned(partitions)

    def on_revoked(self, partitions: set[int]) -> None:
        self.partitions.on_revoked(partitions)

    def on_lost(self, partitions: set[int]) -> None:
        self.partitions.on_lost(partitions)

    # ---- lifecycle ------------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()

    def _new_publisher(self) -> BatchPublisher:
        s = self.settings
        exactly_once = s.processing_guarantee == "exactly_once"
        # A stable transactional id per instance: a restarted instance fences its own zombie; the
        # group generation with the offsets fences a member that lost partitions. Retry backoff
        # 20 ms as the Java client's (kafka-python's 100 ms held every send behind a commit's
        # retry: p99 466 -> 341 ms at 2,000/s, docs/benchmarks.md). The transaction timeout
        # outlasts the commit interval: the broker must not abort an open transaction.
        producer_kw = ({"transactional_id": f"{s.group_id}-{self.instance_id}", "retry_backoff_ms": 20,
                        "transaction_timeout_ms": transaction_timeout_ms(s)}
                       if exactly_once else {})
        # Fail a send within 15 s, not a minute: the batch is rolled back, readiness says why.
        producer = make_producer(s, max_block_ms=15_000, request_timeout_ms=10_000, delivery_timeout_ms=14_000,
                                 bootstrap_timeout_ms=LOOP_BOOTSTRAP_TIMEOUT_MS, **producer_kw)
        return BatchPublisher(producer, exactly_once, send_timeout_s=20.0, max_keys=s.max_devices)

    def connect(self) -> None:
        """Create the topics if missing, the consumer (cooperative-sticky) and the publisher."""
        s = self.settings
        log.info(f"connecting to {with_ports(s.bootstrap_servers)} ({s.security_protocol})")  # (kafka-python names none)
        ensure_worker_topics(s)
        problem = check_retention(s)
        if problem is not None:
            raise SettingsError(f"refusing to start: {problem}")
        # The listener calls the worker's on_assigned/on_revoked (tests wrap them).
        listener = PartitionListener(self.on_assigned, self.on_revoked, self.on_lost)
        self.group = GroupConsumer(s, listener, client_id=f"stream-lstm-{self.instance_id}",
                                   on_stall=self.metrics.kafka_stalls.inc)
        self.partitions.group = self.group
        self.tx.connect()
        self.health.set_ready("broker", True)
        self.health.set_ready("model", True, self.lifecycle.version)
        self.health.set_ready("partitions", False, "waiting for assignment")
        # When the served model was made, not this process: a restart is no promotion on the dashboard.
        self.metrics.set_model_version(self.lifecycle.version, self.lifecycle.served.created_ts or time.time())

    def run(self, until: Callable[[Worker], bool] | None = None) -> BatchCounts:
        """Poll and process batches until stopped (or ``until(self)`` is true); then close."""
        if self.group is None:
            self.connect()
        group = self.group
        assert group is not None
        clean = False
        # Everything alive now lives as long as the worker: frozen, the collector's full passes
        # (~10/s in a backlog, ~90 ms each: 20-30% of the time, docs/benchmarks.md) skip it.
        gc.collect()
        gc.freeze()
        try:
            while not self._stop.is_set():
                turn_began = time.monotonic()
                # A replay that fails rolls back its partitions' bookkeeping; with a commit in
                # flight that would drop what the commit still has to settle (devices changed
                # or evicted since it began). Restoring is rare: let the commit finish first.
                if self.partitions.busy() and not self.settle():
                    continue
                self.partitions.restore_some()
                wait = self.tx.wait_ms()
                if self.lifecycle.rewarming:  # devices wait for their re-warm: idle less
                    wait = min(wait, int(self.settings.rewarm_slice_ms))
                polled = group.poll(wait)
                if self.partitions.failed_in_callback is not None:  # a commit on revocation failed
                    self._rollback(self.partitions.failed_in_callback)
                    polled = {}  # read past the rewind, against state just forgotten
                self.health.beat()
                self.housekeeping.saw(polled, time.time())  # (the TTL's clock: before the readings)
                consumed = self.process(polled).consumed if polled else 0
                if not polled:
                    self.settle()
                # Offsets cannot be committed mid-rebalance: the open transaction waits for the
                # new generation. Under exactly-once the commit completes while the next poll and
                # batch are computed (settled before that batch is sent); at-least-once commits
                # offsets through the consumer, which cannot wait for the next poll's callbacks.
                if not group.rebalancing() and self.tx.due():
                    self.commit(expire=True, wait=not self.tx.exactly_once)
                if not self.partitions.busy():  # no swap or re-warm amid a replay (the
                    self.lifecycle.tick(consumed)  # replay steps each reading as it was live)
                self.housekeeping.update_lag(group.consumer, self.tx.next_offsets, len(group.unreadable))
                self.housekeeping.count_devices()
                self.partitions.report_store()  # (a full disk: said on /readyz, the loop goes on)
                self.partitions.check_group()
                group.check_membership(bool(self.assigned))
                if until is not None and until(self):
                    break
                self.tx.turn_ended((time.monotonic() - turn_began) * 1000)
            clean = not self.broker_lost
        finally:
            gc.unfreeze()  # (a process that goes on, e.g. a test, collects them again)
            self.close(clean)
        return self.totals

    def close(self, clean: bool = True) -> None:
        if clean and self.publisher is not None and self.group is not None and self.commit(flush=set(self.assigned)):
            log.info("stopping: every changed device checkpointed and committed", extra={"partitions": len(self.assigned)})
        if not clean:
            # Closing the consumer revokes its partitions; a commit there would publish state
            # that the failed batch already changed, with offsets from before it.
            self.partitions.commit_on_revoke = False
            self.tx.abort()
        self.lifecycle.close()
        try:  # (refused at its first join, say: nothing restored, replayed or stepped, no rebuild)
            self.state.close(self.table, clean=clean or not self.ever_assigned)
        except Exception as exc:  # noqa: BLE001 - a full disk, say: still leave the group
            log.error("closing the state store failed (rebuilt at the next start)", extra={"error": repr(exc)[:300]})
        with kafka_closing():  # (kafka-python's close races its own reader thread; logs.py)
            if self.group is not None:
                self.group.close()
                self.group = None
            self.tx.close()
        self.health.set_ready("partitions", False, "closed")

    # ---- one batch, one transaction -------------------------------------------------------
    def process(self, polled: dict[TopicPartition, list]) -> BatchCounts:
        """Run one polled batch through the pipeline and send what it produced.

        The records join the open transaction, which commits with the state of every device it
        changed and the input offsets once ``STREAM_LSTM_COMMIT_INTERVAL_MS`` old. If publishing
        fails it is aborted (or left uncommitted): the consumer rewinds to the committed offsets
        and the partitions' state is restored from the changelog. Nothing is lost, and no state
        runs ahead of what was published."""
        t0 = time.perf_counter()
        if self.first_batch_at is None:
            self.first_batch_at = t0
        records = [rec for recs in polled.values() for rec in recs]
        ti = time.perf_counter()
        out = self.bring_in.handle(self.pipeline, records, time.time())  # the pipeline does no I/O
        self.metrics.inference_seconds.observe(time.perf_counter() - ti)
        try:
            self.tx.send(polled, out)
        except Exception as exc:  # noqa: BLE001 - any publish failure: roll everything back
            self._rollback(exc)
            return BatchCounts()
        self.metrics.batch_size.observe(out.counts.consumed)
        self.metrics.batch_seconds.observe(time.perf_counter() - t0)
        return out.counts

    def commit(self, flush: set[int] | None = None, expire: bool = False, wait: bool = True) -> bool:
        """Commit the open transaction (``TransactionUnit.commit``), with the devices expired by
        the TTL when ``expire``; on failure roll back and return False. ``wait=False``: the
        commit is only begun (``settle`` or the next send waits for it)."""
        assert self.group is not None
        try:
            self.tx.settle()  # (the TTL's devices leave memory only for a commit that can happen)
            extra = self.housekeeping.expired(time.time()) if expire else None
            self.tx.commit(self.group.consumer, flush=flush, extra=extra, wait=wait)
        except Exception as exc:  # noqa: BLE001 - any publish failure: roll everything back
            self._rollback(exc)
            return False
        return True

    def settle(self) -> bool:
        """Wait for the commit in flight, if any; on failure roll back and return False."""
        try:
            self.tx.settle()
        except Exception as exc:  # noqa: BLE001 - any publish failure: roll everything back
            self._rollback(exc)
            return False
        return True

    def _rollback(self, exc: Exception) -> None:
        """Undo a batch that could not be published, then retry against the broker with
        backoff until it answers. Nothing is lost: offsets were not committed, and state is
        restored again from the changelog, which never holds uncommitted batches."""
        self.health.beat()  # (a bounded wait ended; the abort and each try below may wait as long)
        fenced = is_fencing(exc)  # (another producer took this transactional id)
        if fenced and self.tx.fenced_again():  # a live holder: it keeps the id, this worker stops
            self.fenced_out = self.broker_lost = True  # (exit FENCED_OUT: not restarted)
            self._stop.set()
        log.error("publishing a batch failed; rolling back to the last commit" + (
            f": another producer took its transactional id {self.settings.group_id}-{self.instance_id} "
            f"(this worker restarted, or a second one with STREAM_LSTM_INSTANCE_ID={self.instance_id}: "
            "each needs its own)" + ("; fenced twice in 10 min: it is live, so this worker stops and "
                                     "leaves the id to it" if self.fenced_out else "") if fenced else ""),
                  extra={"error": repr(exc)[:300]})
        self.partitions.failed_in_callback = None
        self.health.set_ready("broker", False, f"publish failed: {repr(exc)[:200]}")
        self.partitions.update_readiness()
        self.tx.abort()
        self.partitions.forget_state(exc)
        backoff = 0.5
        while not self._stop.is_set():
            self.health.beat()  # (without both: 51 s unbeaten in a 45 s outage, /healthz 503 for 20 s)
            try:
                self.tx.reconnect()
                self.tx.resolve_in_doubt(self.partitions.rewind())
                break
            except Exception as retry_exc:  # noqa: BLE001 - keep trying until the broker is back
                log.warning("broker not reachable; retrying",
                            extra={"error": repr(retry_exc)[:200], "backoff_s": backoff})
                self.health.beat()  # still alive: waiting on the broker is expected work
                self._stop.wait(backoff)  # a stop ends the wait at once
                backoff = min(backoff * 2, 15.0)
        else:
            # Stopped before the broker answered: not reconnected, so still not ready, and the
            # shutdown must not try to commit against it (run() sees broker_lost).
            self.broker_lost = True
            if not self.fenced_out:
                log.warning("stopped while waiting for the broker; nothing after the last commit "
                            "was published")
            return
        self.health.set_ready("broker", True)
        log.info("broker reachable again; resuming from the last commit")


# ---- `stream-lstm run` with one process (processes.py holds the command) -------------------
def serve(settings: Settings, status_file: Path | None = None, supervisor: int | None = None) -> int:
    """Run one worker until SIGTERM/SIGINT, with its endpoint on ``METRICS_PORT``; as a child
    of the ``supervisor`` pid (``status_file`` set: processes.py), reporting its health there."""
    from stream_lstm.endpoint import serve_metrics
    from stream_lstm.logs import log_startup
    from stream_lstm.process_health import FENCED_OUT, StatusReporter, label_logs
    from stream_lstm.signals import StopOnSignal

    if status_file is not None:  # a child of the supervisor
        label_logs(settings.instance_id)
    worker = Worker(settings)
    reporter = None
    if status_file is not None:
        reporter = StatusReporter(status_file, worker.health, lambda: {
            "consumed": worker.totals.consumed, "model_version": worker.lifecycle.version,
            "transactions": dict(worker.tx.outcomes),
        }, worker.stop, parent=supervisor).start()
    server, guard = None, StopOnSignal(worker.stop)
    try:  # the endpoint and the reporter stop however the worker ends (a refused start too)
        if settings.metrics_port:
            server = serve_metrics(worker.metrics, worker.health, settings.metrics_host, settings.metrics_port)
        worker.connect()
        guard.connected()  # (run() closes the store from here on)
        log_startup(log, settings, {
            "bootstrap_servers": settings.bootstrap_servers, "input_topic": settings.input_topic,
            "output_topic": settings.output_topic, "group_id": settings.group_id,
            "compute_device": str(worker.device), "torch_threads": worker.inference_threads,
            "model_version": worker.lifecycle.version, "retraining": worker.lifecycle.retraining,
            "metrics": f"http://{settings.metrics_host}:{server.port}/metrics" if server else "off"})
        totals = worker.run()
        log.info("worker stopped", extra={"consumed": totals.consumed, "forecasts": totals.forecasts,
                                          "stopped_by": guard.received or ("fencing" if worker.fenced_out else "its loop")})
    finally:
        guard.restore()
        if guard.connecting:  # never ran (no broker, a refusal, Ctrl-C): its store is as it was,
            worker.state.close(worker.table, clean=True)  # not wiped as unclean at the next start
        if reporter is not None:
            reporter.stop()
        if server is not None:
            server.shutdown()
    return FENCED_OUT if worker.fenced_out else 0
