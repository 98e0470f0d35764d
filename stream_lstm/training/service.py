"""``stream-lstm trainer``: the retrainer as its own process, for fleets of many workers.

It consumes the input topic in its own consumer group (``<group_id>-trainer``), keeps every
device's normalized rolling window exactly as the workers do (same decoder, same event-time
rules, same normalizer; at start, their checkpoints: training/from_checkpoints.py), and on the
same schedule trains a challenger with TBPTT, gates it, and publishes each promoted version to
the compacted models topic. Workers started with ``STREAM_LSTM_TRAINER=external`` follow that
topic and hot-swap. A ``stream-lstm models rollback`` of its registry is picked up within
seconds: the rolled-back version becomes the gate's champion and is published, so the workers
swap to it (a retrain that finishes after the rollback is not promoted over it).

The retrain runs in a child process (:class:`~stream_lstm.training.background.BackgroundTrainer`,
as the worker's in-process trainer does), not in the loop: a retrain can take minutes, and a
loop that stopped polling that long would be dropped from its consumer group
(``max.poll.interval.ms``) and fail its liveness check, then fall behind the readings. The
child uses ``STREAM_LSTM_TRAIN_THREADS`` torch threads at ``STREAM_LSTM_TRAIN_NICE``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import time

import numpy as np
import torch
from kafka import ConsumerRebalanceListener
from kafka.errors import KafkaError

from stream_lstm.config import Settings, load_settings
from stream_lstm.environment import warn_unknown_variables
from stream_lstm.kafka.publisher import PublishError, bounded_transaction_step, is_fencing
from stream_lstm.kafka.unreadable import UNREADABLE, set_aside
from stream_lstm.logs import kafka_closing
from stream_lstm.messages import ReadingDecoder
from stream_lstm.models.registry import LoadedModel, ModelLoadError, ModelRegistry
from stream_lstm.models.serving import (
    UNTRAINED,
    ModelSettingsMismatch,
    check_model_matches_settings,
)
from stream_lstm.pipeline import decode_records
from stream_lstm.signals import StopOnSignal
from stream_lstm.state.ingest import ingest
from stream_lstm.state.table import DeviceTable
from stream_lstm.training.background import BackgroundTrainer, RetrainResult, decode_result, run_job
from stream_lstm.training.from_checkpoints import load_checkpoints
from stream_lstm.training.models_follower import ModelsFollower
from stream_lstm.training.retrainer import (
    MODEL_RECORD_MAX_BYTES,
    ModelPublishError,
    Retrainer,
    send_model,
)

log = logging.getLogger("stream_lstm.trainer")
# A publish waits for the broker this long (a model takes seconds; the stop and /healthz wait as
# long while the broker is away), and a failed one is tried again after 5 s, doubling to 60 s.
PUBLISH_TIMEOUT_S = 20.0
RETRY_FIRST_S, RETRY_MAX_S = 5.0, 60.0


class TrainerService:
    """Follows the readings, retrains on schedule, publishes promoted models.

    Parameters
    ----------
    settings
        As for the worker; ``retrain_every_readings`` / ``retrain_every_s`` set the schedule.
    served
        The starting champion.
    metrics, health
        Where the retrain series and liveness go when an endpoint is served.

    Example: see tests/training/test_service.py::test_its_loop_publishes_what_the_gate_promotes
    """

    def __init__(self, settings: Settings, served: LoadedModel, metrics: object | None = None,
                 health: object | None = None) -> None:
        from stream_lstm.kafka.clients import group_timeouts, make_consumer, make_producer

        self.settings = settings
        self.metrics, self.health = metrics, health
        # The gate's champion, and a model to publish at the first turn (retried until the
        # broker takes it: a promotion or rollback it could not publish is not dropped). (Its
        # reader of the models topic, ModelsFollower, ensures the topic: once, not twice.)
        self.champion, publish = champion_at_start(settings, served)
        self._unpublished = self.champion if publish else None
        self._retry_at, self._retry_s = 0.0, RETRY_FIRST_S
        served = self.champion
        self.table = DeviceTable(settings.max_devices, settings.window, served.spec.n_features,
                                 served.spec.num_layers, served.spec.hidden_size,
                                 normalizer=settings.normalizer, alpha=settings.normalizer_alpha,
                                 std_floor=settings.std_floor,
                                 with_experts=False)  # it learns from windows, forecasts nothing
        self.decoder = ReadingDecoder(settings)
        self.retrainer = Retrainer(settings, metrics)  # (after: the registry may have taken the topic's)
        self.retrainer.say_if_windows_are_short()
        # (the group's limits as the workers': kafka-python's own 45 s session was refused by a
        # broker bounding sessions lower, whatever STREAM_LSTM_SESSION_TIMEOUT_MS said; a review)
        self.consumer = make_consumer(settings, group_id=f"{settings.group_id}-trainer",
                                      auto_offset_reset="earliest", enable_auto_commit=True,
                                      isolation_level="read_committed", **group_timeouts(settings))
        # The workers' state and where their replay starts, not a fresh table at the group's
        # offsets: the windows it trains on are then the workers' (training/from_checkpoints.py).
        partitions = sorted(self.consumer.partitions_for_topic(settings.input_topic))
        self.replay_from = (load_checkpoints(settings, self.table, partitions,
                                             None if health is None else health.beat)  # type: ignore[attr-defined]
                            if partitions and self.consumer.partitions_for_topic(settings.changelog_topic_name())
                            else {})
        self.consumer.subscribe([settings.input_topic], listener=_ReplayOnAssignment(self))
        # Models go out in transactions under the group's trainer id: a second trainer started
        # fences this one (its next publish fails, and it stops) instead of both publishing
        # different weights under one version name (a review). (Never creating the topic:
        # deleted under it, it came back deleting; max_block_ms: a send waits for the topic's
        # metadata no longer than a publish may take.)
        self.producer = make_producer(settings, max_request_size=MODEL_RECORD_MAX_BYTES, allow_auto_create_topics=False,
                                      max_block_ms=int(PUBLISH_TIMEOUT_S * 1000),
                                      transactional_id=f"{settings.group_id}-trainer")
        self.producer.init_transactions()
        self.published = 0
        self.fenced_out = False  # another trainer of the group took over: this one stops
        self.producer_lost = False  # its producer could not go on: it stops, to be restarted
        # The child process that trains, started by run() (the loop is its only user).
        self.trainer: BackgroundTrainer | None = None
        self._stop = False

    def stop(self) -> None:
        self._stop = True

    def consume_once(self, timeout_ms: int | None = None) -> int:
        """Apply one poll's readings (waiting up to ``timeout_ms``, default
        ``STREAM_LSTM_POLL_TIMEOUT_MS``) to the windows (invalid ones are the workers' to
        dead-letter: the trainer skips them)."""
        try:
            polled = self.consumer.poll(timeout_ms=self.settings.poll_timeout_ms if timeout_ms is None else timeout_ms,
                                        max_records=self.settings.poll_max_records)
        except UNREADABLE as exc:  # (a batch it cannot read: that partition waits, as the workers')
            if set_aside(self.consumer, exc) is None:
                raise
            polled = {}
        now = time.time()
        d = decode_records(self.decoder, [r for recs in polled.values() for r in recs], now)
        if d.ids:
            ingest(self.table, d.ids, d.ts, np.asarray(d.values, np.float64), d.partitions, now,
                   self.champion.spec.target_channel, self.settings.max_gap_s)
        self.retrainer.count(len(d.ids))
        return len(d.ids)

    def retrain(self) -> bool:
        """One retrain now, in this process (it blocks: for one-off use; :meth:`run` trains in
        the background); publish when promoted. Returns whether it promoted."""
        job = self.retrainer.job(self.table, self.champion)
        if job is None:
            return False
        return self.publish(decode_result(run_job(job[0])))

    def tick(self) -> None:
        """Between two polls: collect a finished background retrain (publish it when promoted),
        and start the next one when due and none runs. Never waits for the training."""
        if self._unpublished is not None and time.monotonic() >= self._retry_at:
            self._publish(self._unpublished)
        if self.trainer is None:
            self.trainer = BackgroundTrainer(self.settings.train_threads, self.settings.train_nice)
        result = self.retrainer.turn(self.trainer, self.table, self.champion)
        if result is not None:
            self.publish(result)
        moved = self.retrainer.moved(self.champion.version)
        if moved is not None:  # a rollback of this registry: the gate's champion, and the fleet's
            self._publish(moved)

    def publish(self, result: RetrainResult) -> bool:
        """The gate's verdict on a finished retrain; a promoted model is registered and published
        to the models topic, and becomes the champion. Returns whether it promoted."""
        promoted = self.retrainer.verdict(result)
        return promoted is not None and self._publish(promoted)

    def _publish(self, model: LoadedModel) -> bool:
        """``model`` becomes the champion and goes to the models topic; False if the broker did
        not take it: the next turn tries again. (It is the registry's promoted version already:
        handed back to the registry's next look instead, the next retrain's promotion was
        refused as "superseded", and a restart never published it, a review.)"""
        self.champion, self._unpublished = model, model
        try:  # (waits until the broker has it, a bounded time: a stop or /healthz waits as long)
            self.producer.begin_transaction()
            send_model(self.producer, self.settings, model, timeout_s=PUBLISH_TIMEOUT_S)
            # (bounded: kafka-python's commit_transaction waited for good on a broker gone mid-commit)
            bounded_transaction_step(self.producer, self.producer._transaction_manager.begin_commit,
                                     f"committing {model.version}'s publish", PUBLISH_TIMEOUT_S)
        except (ModelPublishError, PublishError, KafkaError) as exc:  # (the broker away, say: tried again)
            if is_fencing(exc):
                log.error(f"another trainer of group {self.settings.group_id} took over (transactional id "
                          f"{self.settings.group_id}-trainer): this one stops without publishing {model.version}")
                self.fenced_out = self._stop = True
                return False
            if not self._abandon_transaction(model):
                return False
            self._retry_at, self._retry_s = time.monotonic() + self._retry_s, min(2 * self._retry_s, RETRY_MAX_S)
            log.error(f"publishing {model.version} failed; trying again in {self._retry_at - time.monotonic():.0f} s",
                      extra={"error": str(exc)[:300]})
            return False
        self._unpublished, self._retry_s = None, RETRY_FIRST_S
        self.published += 1
        if self.metrics is not None:
            self.metrics.set_model_version(model.version, model.created_ts or time.time())  # type: ignore[attr-defined]
        log.info("published model", extra={"version": model.version, "topic": self.settings.models_topic})
        return True

    def _abandon_transaction(self, model: LoadedModel) -> bool:
        """After a failed publish: abort its transaction; False (and the trainer stops, exit 3)
        where the client cannot. Not a new producer in this process: its ``init_transactions``
        would fence a trainer started since (the one that should publish; a review), where a
        restart is the newest trainer by right, and publishes the registry's promoted version."""
        try:  # (bounded, as the commit)
            bounded_transaction_step(self.producer, self.producer._transaction_manager.begin_abort,
                                     "aborting a failed publish", PUBLISH_TIMEOUT_S)
            return True
        except Exception as exc:  # noqa: BLE001 - said, and the trainer stops to be restarted
            log.error(f"the trainer's producer cannot abort the failed publish of {model.version} "
                      f"({exc!r:.200}): the trainer stops (exit 3); started again, it publishes it")
            with contextlib.suppress(Exception):
                self.producer.close(timeout=5)
            self.producer_lost = self._stop = True
            return False

    def run(self) -> None:
        """Poll, beat and :meth:`tick` until :meth:`stop`; then close. A retrain still running
        then is abandoned (its child is ended within seconds): the next start trains afresh."""
        try:
            while not self._stop:
                self.consume_once()
                if self.health is not None:
                    self.health.beat()  # type: ignore[attr-defined]
                try:
                    self.tick()
                except Exception:  # noqa: BLE001 - a failed retrain must not stop the trainer
                    log.exception("retraining failed")
                    if self.metrics is not None:
                        self.metrics.retrain_runs.labels("failed").inc()  # type: ignore[attr-defined]
                    # Its child may be what failed (killed, say): the next retrain gets a new one.
                    self._close_trainer()
        finally:
            self._close_trainer()
            with kafka_closing():  # (kafka-python's close races its own reader thread; logs.py)
                self.consumer.close()
                self.producer.close()

    def _close_trainer(self) -> None:
        if self.trainer is not None:
            trainer, self.trainer = self.trainer, None
            trainer.close()


def champion_at_start(settings: Settings, served: LoadedModel) -> tuple[LoadedModel, bool]:
    """The trainer's champion at start against the models topic's latest model, and whether
    to publish it. ``served`` (what serving.py chose: the registry's promoted version, the
    file, or an untrained model) unless the topic's latest is a version this registry never
    held: that one is then registered (versions number past it), and, with no file set and
    the settings agreeing, promoted and carried on from (a trainer whose registry was lost
    took the fleet back to an untrained model's successor, under names workers knew). Only
    the registry's promoted version is ever published at start: not yet on the topic, a
    promotion whose publish failed, or a rollback made while the trainer was stopped.

    Example: see tests/training/test_service.py::test_a_trainer_with_a_new_registry_carries_on_from_the_topics_model
    """
    follower = ModelsFollower(settings)
    try:
        latest = follower.latest
    finally:
        follower.close()
    registry = ModelRegistry(settings.model_dir)
    ours = served.version == registry.promoted()
    if latest is None or latest.version == served.version:
        return served, latest is None and ours
    held = _held(registry, latest)
    if held is False:  # (two registries numbered alike: not where the fleet's models came from)
        log.error(f"this registry's {latest.version} is not the models topic's {latest.version}: "
                  f"{settings.model_dir} is not the registry the fleet's models came from; "
                  f"carrying on from {served.version}")
        return served, False
    if held and (ours or served.version != UNTRAINED):  # (its own promoted, or the file)
        if ours:
            log.warning(f"the models topic's latest is {latest.version}, this registry's promoted "
                        f"{served.version}: publishing {served.version}")
        return served, ours
    try:
        if held is None:  # (kept, so its successors number past it, whatever comes next)
            registry.register(latest.model, latest.spec, dict(latest.meta))
        check_model_matches_settings(latest, settings, f"the models topic {settings.models_topic}")
        if settings.model_path is not None:  # (the file wins, as for serving: not promoted)
            log.warning(f"the models topic's latest {latest.version} kept in the registry; "
                        f"carrying on from STREAM_LSTM_MODEL_PATH's {served.version}")
            return served, False
        registry.promote(latest.version, action="adopt", reason="the models topic's latest")
    except ModelSettingsMismatch as exc:
        log.error(f"not carrying on from the models topic's latest: {exc}")
        return served, False
    except (OSError, ModelLoadError) as exc:
        log.error("the models topic's model could not be kept in the registry", extra={"error": repr(exc)[:300]})
    log.warning(f"the models topic's latest, {latest.version}, is not in this registry ({settings.model_dir}: "
                "new, lost, replaced, or another trainer's): carrying on from it, its successors "
                "numbered after it")
    return latest, False


def _held(registry: ModelRegistry, latest: LoadedModel) -> bool | None:
    """None when ``registry`` has no version of ``latest``'s name; else whether it is the same
    model (its weights)."""
    if not any(m["version"] == latest.version for m in registry.versions()):
        return None
    try:
        mine = registry.load(latest.version).model.state_dict()
    except ModelLoadError:
        return False
    theirs = latest.model.state_dict()
    return mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


class _ReplayOnAssignment(ConsumerRebalanceListener):
    """Each input partition first assigned reads on from its replay marker, where the workers'
    checkpoints the trainer started from end (later assignments: the group's offsets)."""

    def __init__(self, service: TrainerService) -> None:
        self.service = service

    def on_partitions_revoked(self, revoked) -> None:  # noqa: ANN001 - kafka-python's signature
        pass  # (an eager rebalance revokes every partition, most of them to come straight back)

    def on_partitions_assigned(self, assigned) -> None:  # noqa: ANN001
        service = self.service
        for tp in assigned:
            offset = service.replay_from.pop(tp.partition, None)
            if offset is not None:
                service.consumer.seek(tp, offset)
        every = service.consumer.partitions_for_topic(service.settings.input_topic) or set()
        held = service.consumer.assignment()
        # The devices of partitions another member reads on: their windows would go stale here,
        # and were trained on for as long as the trainer ran (a review).
        table = service.table
        table.drop(table.devices_in_partitions(set(every) - {tp.partition for tp in held}))
        if len(held) < len(every):
            log.warning(f"this trainer reads {len(held)} of the input's {len(every)} partitions: another "
                        f"runs in its group {service.settings.group_id}-trainer. The one started last "
                        "publishes; the other stops at its next publish. Run one.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Run the retrainer as its own process: consume readings (own group), "
                          "retrain on schedule (STREAM_LSTM_RETRAIN_EVERY_*), publish promoted "
                          "models to STREAM_LSTM_MODELS_TOPIC for workers with "
                          "STREAM_LSTM_TRAINER=external. With neither STREAM_LSTM_RETRAIN_EVERY_READINGS "
                          "nor _S set, it retrains every 900 s. At start it takes in the workers' "
                          "checkpoints from the state changelog. One trainer a group publishes: "
                          "a second one started fences it, and it stops with exit 4 (exit 3: "
                          "a publish it could neither finish nor abort; restarted, it publishes it).")


def main(args: argparse.Namespace) -> int:
    from stream_lstm.logs import configure_logging
    from stream_lstm.models.serving import load_served_model
    from stream_lstm.process_health import FENCED_OUT

    settings = load_settings()
    configure_logging(settings.log_level)
    warn_unknown_variables(log)
    if settings.retrain_every_readings == 0 and settings.retrain_every_s == 0:
        settings = settings.model_copy(update={"retrain_every_s": 900.0})
        log.warning("no retrain schedule set; retraining every 900 s")
    metrics = health = server = None
    if settings.metrics_port:
        from stream_lstm.endpoint import serve_metrics
        from stream_lstm.metrics import TRAINER_SERIES, HealthState, Metrics

        metrics, health = Metrics(settings.instance_id or None).only(TRAINER_SERIES), HealthState()
        # Served from the start: taking the workers' checkpoints in (training/from_checkpoints.py)
        # keeps /healthz fresh while it works, and /readyz says the trainer is starting.
        health.set_ready("model", False, "starting")
        server = serve_metrics(metrics, health, settings.metrics_host, settings.metrics_port)
    try:
        service = TrainerService(settings, load_served_model(settings), metrics, health)
        if metrics is not None and health is not None:
            health.set_ready("model", True, service.champion.version)
            metrics.set_model_version(service.champion.version, service.champion.created_ts or time.time())  # (the gate's champion)
        StopOnSignal(service.stop).connected()  # (connected: a signal stops the loop; a lost one too)
        endpoint = (f"http://{settings.metrics_host}:{settings.metrics_port}/metrics"
                    if settings.metrics_port else "metrics off")
        log.info(f"trainer started: input {settings.input_topic} at {settings.bootstrap_servers}, "
                 f"publishing to {settings.models_topic} | {endpoint}")
        service.run()
        log.info(f"trainer stopped ({service.published} models published)")
    finally:  # also when the loop fails: the endpoint's port and thread do not outlive it
        if server is not None:
            server.shutdown()
    # (fenced: not restarted, the other trainer is live; its producer lost: 3, restarted)
    return FENCED_OUT if service.fenced_out else 3 if service.producer_lost else 0
