"""The worker: the long-lived loop that wires every part together.

One iteration is one batch: **poll → decode → state → engine → encode → publish → commit**:
up to ``poll_max_records`` readings from the input topic (consumer group) are decoded
(:class:`~stream_lstm.messages.ReadingDecoder`, invalid ones to the DLQ), applied to state
(:func:`~stream_lstm.state.ingest.ingest`: event-time rules, normalization, windows, rounds),
run through the engine (one batched LSTM step per round across all devices), and published and
committed by :class:`~stream_lstm.kafka.publisher.BatchPublisher`.

Every consumed reading ends in exactly one place: a forecast, the warm-up count, the late or
duplicate count, or the DLQ. The counts are metrics, so the accounting can be checked live.
The model served at start and the topics created before the first poll come from
:mod:`stream_lstm.startup`.
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from kafka import KafkaConsumer
from kafka.structs import OffsetAndMetadata, TopicPartition

from stream_lstm import alerts, experts
from stream_lstm.checkpointing.manager import StateManager
from stream_lstm.checkpointing.replay import check_retention, log_start, replay_input
from stream_lstm.config import Settings, load_settings
from stream_lstm.engine import BatchedEngine, resolve_device, set_inference_threads
from stream_lstm.kafka.clients import make_producer
from stream_lstm.kafka.group_consumer import GroupConsumer
from stream_lstm.kafka.publisher import BatchPublisher
from stream_lstm.kafka.rebalance import PartitionListener
from stream_lstm.metrics import HealthState, Metrics
from stream_lstm.pipeline import BatchCounts, BatchPipeline
from stream_lstm.startup import ensure_worker_topics, load_served_model
from stream_lstm.state.snapshot import DeviceSnapshot
from stream_lstm.state.table import DeviceTable
from stream_lstm.training.lifecycle import ModelLifecycle, Served

log = logging.getLogger("stream_lstm.worker")


@dataclass
class OpenTransaction:
    """What the open transaction holds: since when, the offsets to commit, and its counts."""

    began: float  # time.monotonic()
    offsets: dict[TopicPartition, OffsetAndMetadata] = field(default_factory=dict)
    consumed: dict[TopicPartition, int] = field(default_factory=dict)
    counts: BatchCounts = field(default_factory=BatchCounts)
    oldest_ts: float = float("inf")

    def add(self, polled: dict[TopicPartition, list], counts: BatchCounts, oldest_ts: float) -> None:
        for tp, records in polled.items():
            self.offsets[tp] = OffsetAndMetadata(records[-1].offset + 1, "", -1)
            self.consumed[tp] = self.consumed.get(tp, 0) + len(records)
        self.counts.add(counts)
        self.oldest_ts = min(self.oldest_ts, oldest_ts)


class Worker:
    """The forecasting worker. ``run()`` loops until ``stop()`` (or SIGTERM/SIGINT).

    Parameters
    ----------
    settings
        All settings.
    served
        The model to serve; by default :func:`~stream_lstm.startup.load_served_model`.
    metrics, health
        Prometheus series and health state; created when not given.
    """

    def __init__(
        self,
        settings: Settings,
        served: Served | None = None,
        metrics: Metrics | None = None,
        health: HealthState | None = None,
    ) -> None:
        self.settings = settings
        self.served = served or load_served_model(settings)
        self.metrics = metrics or Metrics()
        self.health = health or HealthState()
        self.device = resolve_device(settings.device)
        self.inference_threads = set_inference_threads(settings.torch_threads)
        spec = self.served.spec
        self.table = DeviceTable(
            max_devices=settings.max_devices, window=settings.window,
            n_features=spec.n_features, num_layers=spec.num_layers,
            hidden_size=spec.hidden_size, device=self.device,
            normalizer=settings.normalizer, alpha=settings.normalizer_alpha,
            std_floor=settings.std_floor, with_experts=settings.expert_rate > 0,
        )
        self.engine = BatchedEngine(self.served.model, self.table)
        self.state = StateManager(
            settings, settings.state_dir / f"{settings.group_id}-{self.instance_id}.sqlite",
            self.metrics,
        )
        self.table.on_evict = self._evicted
        self.lifecycle = ModelLifecycle(settings, self.served, self.engine, self.table, self.metrics)
        # A replay must use the model the readings were served with: checkpoint every changed
        # device before a swap, so no replay range spans one.
        self.lifecycle.before_swap = lambda: self.commit(flush=set(self.assigned))
        self.pipeline = BatchPipeline(
            settings, self.table, self.engine, lambda: self.lifecycle.version, self.state.load,
            self.lifecycle.rewarm_stale,
        )
        self._stop = threading.Event()
        self.group: GroupConsumer | None = None
        self.publisher: BatchPublisher | None = None
        self._open: OpenTransaction | None = None
        self._failed_in_callback: Exception | None = None
        self.assigned: set[int] = set()
        self._next_offsets: dict[TopicPartition, int] = {}  # per partition, after the last commit
        self.totals = BatchCounts()
        self.first_batch_at: float | None = None  # perf_counter of the first batch (benchmarks)
        self._next_expiry = 0.0
        self._next_device_count = 0.0

    # ---- lifecycle ------------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()

    def _new_publisher(self) -> BatchPublisher:
        s = self.settings
        exactly_once = s.processing_guarantee == "exactly_once"
        # A stable transactional id per instance: a restarted instance fences its own zombie;
        # the group generation sent with the offsets fences a member that lost partitions.
        producer_kw = {"transactional_id": f"{s.group_id}-{self.instance_id}"} if exactly_once else {}
        # Fail a send within 15 s rather than the default minute: the batch is rolled back
        # and retried, and readiness reports the outage meanwhile.
        producer = make_producer(s, max_block_ms=15_000, request_timeout_ms=10_000,
                                 delivery_timeout_ms=14_000, **producer_kw)
        return BatchPublisher(producer, exactly_once, send_timeout_s=20.0)

    @property
    def instance_id(self) -> str:
        return self.settings.instance_id or socket.gethostname()

    def connect(self) -> None:
        """Create the topics if missing, the consumer (cooperative-sticky) and the publisher."""
        s = self.settings
        ensure_worker_topics(s)
        problem = check_retention(s)
        if problem is not None:
            raise SystemExit(f"stream-lstm: refusing to start: {problem}")
        self._new_consumer()
        self.publisher = self._new_publisher()
        self.health.set_ready("broker", True)
        self.health.set_ready("model", True, self.lifecycle.version)
        self.health.set_ready("partitions", False, "waiting for assignment")
        self.metrics.set_model_version(self.lifecycle.version, time.time())

    def _new_consumer(self) -> None:
        self.group = GroupConsumer(self.settings, PartitionListener(self.on_assigned, self.on_revoked),
                                   client_id=f"stream-lstm-{self.instance_id}",
                                   on_stall=self.metrics.kafka_stalls.inc)

    @property
    def consumer(self) -> KafkaConsumer | None:
        """The group's current consumer (kafka/group_consumer.py may replace a stuck one)."""
        return self.group.consumer if self.group is not None else None

    def run(self, until: Callable[[Worker], bool] | None = None) -> BatchCounts:
        """Poll and process batches until stopped (or ``until(self)`` is true); then close."""
        if self.consumer is None:
            self.connect()
        assert self.consumer is not None
        clean = False
        try:
            while not self._stop.is_set():
                self._restore_some()
                polled = self.group.poll(self._poll_wait_ms())
                if self._failed_in_callback is not None:  # a commit on revocation failed
                    self._rollback(self._failed_in_callback)
                self.health.beat()
                consumed = self.process(polled).consumed if polled else 0
                if self._commit_due():
                    self.commit()
                self.lifecycle.tick(consumed)
                self._update_lag()
                self._count_device_gauges()
                self._check_heartbeat()
                self.group.check_membership(bool(self.assigned))
                if until is not None and until(self):
                    break
            clean = True
        finally:
            self.close(clean)
        return self.totals

    def close(self, clean: bool = True) -> None:
        if clean and self.publisher is not None and self.consumer is not None:
            self.commit(flush=set(self.assigned))  # every changed device is checkpointed
        self.lifecycle.close()
        self.state.close(self.table, clean=clean)
        if self.group is not None:
            self.group.close()
            self.group = None
        if self.publisher is not None:
            self.publisher.producer.close(timeout=10)
            self.publisher = None
        self.health.set_ready("partitions", False, "closed")

    # ---- rebalances and restore ------------------------------------------------------------
    def on_assigned(self, partitions: set[int]) -> None:
        self.assigned |= partitions
        self.state.assign(partitions)
        assert self.consumer is not None
        # Paused until restored: no reading of theirs is processed against missing state.
        self.consumer.pause(*self._tps(partitions))
        log.info("partitions assigned; restoring their state",
                 extra={"partitions": sorted(partitions)})
        self.health.set_ready("partitions", False, f"restoring {sorted(self.state.restoring)}")

    def on_revoked(self, partitions: set[int]) -> None:
        # kafka-python calls this inside poll(), on its IO thread. The open transaction holds
        # readings of these partitions: under exactly-once it commits now, before another
        # member takes them (as Kafka Streams does); a failure is rolled back after the poll,
        # where the consumer may be used. At-least-once cannot commit offsets from this
        # thread: those readings are left to the new owner, which reads them again.
        if self.publisher is not None and (self._open is not None or self.state.dirty):
            if self.publisher.exactly_once:
                # Their changed devices are checkpointed too: the next owner replays less.
                self.commit(flush=set(partitions), on_failure=self._fail_in_callback)
            elif self._open is not None:
                for tp in self._tps(partitions):
                    self._open.offsets.pop(tp, None)
        gone = len(self.table.devices_in_partitions(partitions))
        self.state.revoke(self.table, partitions)
        self.assigned -= partitions
        for tp in self._tps(partitions):
            self._next_offsets.pop(tp, None)
        log.info("partitions revoked", extra={"partitions": sorted(partitions), "devices": gone})
        self._update_readiness()

    def _fail_in_callback(self, exc: Exception) -> None:
        try:
            assert self.publisher is not None
            self.publisher.abort()
        except Exception as abort_exc:  # noqa: BLE001 - the broker may be gone
            log.warning("abort failed", extra={"error": repr(abort_exc)[:300]})
        self._open = None
        self._failed_in_callback = exc

    def _restore_some(self) -> None:
        if not self.state.restoring:
            return
        try:
            done = self.state.restore_slice(budget_s=1.0)
        except Exception as exc:  # noqa: BLE001 - e.g. broker down: keep paused, retry
            log.warning("restore did not complete; will retry", extra={"error": repr(exc)[:300]})
            self.health.set_ready("broker", False, f"restore failed: {repr(exc)[:200]}")
            time.sleep(1.0)
            return
        done &= self.assigned
        try:
            for p in sorted(done):
                self._replay(p)
        except Exception as exc:  # noqa: BLE001 - replay again next turn (it is idempotent)
            log.warning("replay did not complete; will retry", extra={"error": repr(exc)[:300]})
            self.state.rollback(self.table, done)
            time.sleep(1.0)
            return
        self.health.set_ready("broker", True)
        if done and self.consumer is not None:
            self.consumer.resume(*self._tps(done))
        self._update_readiness()

    def _replay(self, partition: int) -> None:
        """Apply again the readings committed after ``partition``'s last checkpoint, publishing
        nothing: memory then holds what an uninterrupted worker would (checkpointing/replay.py)."""
        assert self.consumer is not None
        tp = TopicPartition(self.settings.input_topic, partition)
        start = self.state.replay_from(partition)
        committed = self.consumer.committed(tp)
        if committed is not None:
            self._next_offsets[tp] = committed
        if start is None:
            self.state.first_marker(
                partition, committed if committed is not None else log_start(self.settings, partition))
            return
        if committed is None or committed <= start:
            return

        def apply(records: list) -> None:
            out = self.pipeline.handle(records, time.time())
            self.state.touch(self.table, out.touched)

        done = replay_input(self.settings, partition, start, committed, apply)
        self.metrics.replayed_readings.inc(done.readings)
        self.metrics.replay_missing_readings.inc(done.missing)
        log.info("replayed readings since the last checkpoint",
                 extra={"partition": partition, "from": start, "to": committed,
                        "readings": done.readings, "seconds": round(done.seconds, 3)})

    def _update_readiness(self) -> None:
        if self.state.restoring:
            self.health.set_ready("partitions", False, f"restoring {sorted(self.state.restoring)}")
        else:
            self.health.set_ready("partitions", bool(self.assigned),
                                  f"assigned {sorted(self.assigned)}")
        self.metrics.ready.set(1 if self.health.readiness()[0] else 0)

    def _tps(self, partitions: set[int]) -> list[TopicPartition]:
        return [TopicPartition(self.settings.input_topic, p) for p in sorted(partitions)]

    def _evicted(self, snap: DeviceSnapshot) -> None:
        self.state.on_evict(snap)
        self.metrics.evicted_devices.inc()

    # ---- one batch, one transaction -------------------------------------------------------
    def process(self, polled: dict[TopicPartition, list]) -> BatchCounts:
        """Run one polled batch through the pipeline and send what it produced.

        The records join the open transaction (begun by the first batch after a commit); the
        transaction commits, with the state of every device it changed and the input offsets,
        once it is ``STREAM_LSTM_COMMIT_INTERVAL_MS`` old (``_commit_if_due``). If publishing
        fails, it is aborted (exactly-once) or left uncommitted (at-least-once): the consumer
        rewinds to the committed offsets and the assigned partitions' state is restored again
        from the changelog, so nothing is lost and no state runs ahead of what was published.
        """
        t0 = time.perf_counter()
        if self.first_batch_at is None:
            self.first_batch_at = t0
        assert self.publisher is not None
        records = [rec for recs in polled.values() for rec in recs]
        ti = time.perf_counter()
        out = self.pipeline.handle(records, time.time())
        self.metrics.inference_seconds.observe(time.perf_counter() - ti)
        try:
            if self._open is None:
                self.publisher.begin()
                self._open = OpenTransaction(time.monotonic())
            send = self.publisher.send
            for topic, key, value, headers in out.records:
                send(topic, value, key=key, headers=headers)
        except Exception as exc:  # noqa: BLE001 - any publish failure: roll everything back
            self._rollback(exc)
            return BatchCounts()
        self.state.touch(self.table, out.touched)
        self._open.add(polled, out.counts, out.oldest_ts)
        self.metrics.batch_size.observe(out.counts.consumed)
        self.metrics.batch_seconds.observe(time.perf_counter() - t0)
        return out.counts

    def _commit_due(self) -> bool:
        """Whether to commit now: the open transaction is old enough, or its changed devices
        fill half the table (evicting more of them would only hold them in memory), or, with
        none open, a partition's checkpoint is due (so an idle input still checkpoints)."""
        if self.group is not None and self.group.rebalancing():
            return False  # offsets cannot be committed mid-rebalance: wait for the new generation
        if self._open is None:
            return bool(self.state.flush_due())
        age_ms = (time.monotonic() - self._open.began) * 1000
        return (age_ms >= self.settings.commit_interval_ms
                or len(self.state.dirty) >= self.settings.max_devices // 2)

    def _poll_wait_ms(self) -> int:
        """A poll waits no longer than the open transaction has left, so a quiet input never
        holds a commit back."""
        wait = self.settings.poll_timeout_ms
        if self._open is not None:
            left = self.settings.commit_interval_ms - (time.monotonic() - self._open.began) * 1000
            wait = min(wait, max(0, int(left)))
        return wait

    def commit(self, flush: set[int] | None = None,
               on_failure: Callable[[Exception], None] | None = None) -> bool:
        """Commit the open transaction: forecasts sent so far, the input offsets, and the
        checkpoints due (the state of the changed devices of those partitions, and of
        ``flush``'s, with their replay markers). Returns False when it was rolled back instead
        (``on_failure(exc)`` instead of the rollback, where one cannot run)."""
        assert self.publisher is not None and self.consumer is not None
        if self._open is None:
            if not self.state.dirty or not (self.state.flush_due() or flush):
                return True  # (a first marker waits for the first transaction with readings)
            try:
                self.publisher.begin()  # a transaction of checkpoints alone
            except Exception as exc:  # noqa: BLE001
                (on_failure or self._rollback)(exc)
                return False
            self._open = OpenTransaction(time.monotonic())
        unit = self._open
        m = self.metrics
        now = time.time()
        try:
            send = self.publisher.send
            for topic, key, value, headers, partition in self._changelog(now, unit, flush):
                send(topic, value, key=key, headers=headers, partition=partition)
            tc = time.perf_counter()
            written = self.publisher.commit(unit.offsets, self.consumer)
            m.commit_seconds.observe(time.perf_counter() - tc)
        except Exception as exc:  # noqa: BLE001 - any publish failure: roll everything back
            (on_failure or self._rollback)(exc)
            return False
        self._open = None
        self.state.committed(written)
        self._next_offsets.update((tp, om.offset) for tp, om in unit.offsets.items())
        m.transactions.labels("committed").inc()
        for tp, k in unit.consumed.items():
            m.readings_consumed.labels(tp.topic, str(tp.partition)).inc(k)
        if unit.counts.forecasts:
            m.end_to_end_latency_seconds.observe(max(0.0, time.time() - unit.oldest_ts))
        m.count_batch(unit.counts, active_devices=len(self.table))
        self.totals.add(unit.counts)
        return True

    def _changelog(self, now: float, unit: OpenTransaction, flush: set[int] | None) -> list:
        # The replay marker of a partition: the input offset after this transaction.
        after = {tp.partition: off for tp, off in self._next_offsets.items()}
        after.update((tp.partition, om.offset) for tp, om in unit.offsets.items())
        records = self.state.records_for_commit(self.table, after, flush)
        if now >= self._next_expiry and self.settings.device_ttl_s > 0:
            self._next_expiry = now + min(60.0, self.settings.device_ttl_s / 4)
            expired = self.state.expire(self.table, now, farewell=self.pipeline.farewell)
            tombstones = sum(r[0] == self.state.topic for r in expired)
            self.metrics.expired_devices.inc(tombstones)
            self.metrics.alerts_closed.inc(len(expired) - tombstones)
            records.extend(expired)
        return records

    def _rollback(self, exc: Exception) -> None:
        """Undo a batch that could not be published, then retry against the broker with
        backoff until it answers. Nothing is lost: offsets were not committed, and state is
        restored again from the changelog, which never holds uncommitted batches."""
        log.error("publishing a batch failed; rolling back to the last commit",
                  extra={"error": repr(exc)[:300]})
        self.metrics.transactions.labels("aborted").inc()
        self._open = None
        self._failed_in_callback = None
        self.health.set_ready("broker", False, f"publish failed: {repr(exc)[:200]}")
        self._update_readiness()
        assert self.publisher is not None and self.consumer is not None
        try:
            self.publisher.abort()
        except Exception as abort_exc:  # noqa: BLE001 - the broker may be gone
            log.warning("abort failed", extra={"error": repr(abort_exc)[:300]})
        self.state.rollback(self.table, set(self.assigned))
        tps = self._tps(self.assigned)
        self.consumer.pause(*tps)
        backoff = 0.5
        while not self._stop.is_set():
            try:
                if self.publisher.exactly_once:
                    # A fresh transactional producer: init_transactions fences the old one and
                    # aborts anything it left open, whatever state the old client is in.
                    self.publisher.producer.close(timeout=1)
                    self.publisher = self._new_publisher()
                for tp in tps:
                    committed = self.consumer.committed(tp)
                    if committed is None:
                        self.consumer.seek_to_beginning(tp)
                    else:
                        self.consumer.seek(tp, committed)
                break
            except Exception as retry_exc:  # noqa: BLE001 - keep trying until the broker is back
                log.warning("broker not reachable; retrying",
                            extra={"error": repr(retry_exc)[:200], "backoff_s": backoff})
                self.health.beat()  # still alive: waiting on the broker is expected work
                time.sleep(backoff)
                backoff = min(backoff * 2, 15.0)
        self.health.set_ready("broker", True)
        log.info("broker reachable again; resuming from the last commit")

    def _check_heartbeat(self) -> None:
        # An idle worker publishes nothing, so no failed publish reports a broker outage.
        if self.group is not None and self.assigned and self.group.heartbeat.report(self.health):
            self._update_readiness()

    def _count_device_gauges(self) -> None:
        if time.monotonic() < self._next_device_count:
            return
        self._next_device_count = time.monotonic() + 5.0  # a pass over all devices: not every turn
        slots = list(self.table.index.values())
        self.metrics.alerts_open.set(int(alerts.is_open(self.table.alert[slots]).sum()))
        if self.table.with_experts:
            counts = experts.leaders(self.table.experts, slots)
            self.metrics.set_expert_leaders(dict(zip(experts.EXPERTS, counts.tolist(), strict=True)))

    def _update_lag(self) -> None:
        # From what the worker committed: consumer.position() may go to the broker, and raises
        # when it is down, which must not end an idle worker's loop. (Behind a transactional
        # producer, a commit marker after the last reading shows as a lag of 1.)
        if self.consumer is None:
            return
        for tp in self.consumer.assignment():
            high, position = self.consumer.highwater(tp), self._next_offsets.get(tp)
            if high is not None and position is not None:
                self.metrics.consumer_lag.labels(str(tp.partition)).set(max(0, high - position))


# ---- CLI: `stream-lstm run` ----------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Run the forecasting worker: consume readings, keep per-device LSTM state, publish "
        "forecasts. All settings come from STREAM_LSTM_* environment variables (README)."
    )
    parser.add_argument("--metrics-port", type=int, help="override STREAM_LSTM_METRICS_PORT")


def main(args: argparse.Namespace) -> int:
    from stream_lstm.logs import configure_logging, log_startup
    from stream_lstm.metrics import serve_metrics

    overrides = {"metrics_port": args.metrics_port} if args.metrics_port is not None else {}
    settings = load_settings(**overrides)
    configure_logging(settings.log_level)
    worker = Worker(settings)
    server = None
    if settings.metrics_port:
        server = serve_metrics(worker.metrics, worker.health, settings.metrics_host, settings.metrics_port)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: worker.stop())
    worker.connect()
    log_startup(log, settings, {
        "bootstrap_servers": settings.bootstrap_servers, "input_topic": settings.input_topic,
        "output_topic": settings.output_topic, "group_id": settings.group_id,
        "compute_device": str(worker.device), "torch_threads": worker.inference_threads,
        "model_version": worker.lifecycle.version,
        "metrics": f"http://{settings.metrics_host}:{server.port}/metrics" if server else "off",
    })
    totals = worker.run()
    log.info("worker stopped", extra={"consumed": totals.consumed, "forecasts": totals.forecasts})
    if server is not None:
        server.shutdown()
    return 0
