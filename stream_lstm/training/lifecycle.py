"""The served model's life: when to retrain, whether to promote, and the hot-swap.

Between two batches the worker calls :meth:`ModelLifecycle.tick`. It

1. collects a finished background retrain; a promoted challenger is registered and swapped in;
2. follows the compacted models topic when an external trainer publishes (``trainer=external``);
3. starts a new retrain when ``retrain_every_readings`` or ``retrain_every_s`` says so.

A swap installs the new weights, and **every device is re-warmed before its next step**: its
h/c is recomputed by replaying its rolling window through the new model, in batched passes (the
devices of each batch together; idle devices in slices between batches; devices in the state
store when they next load). No device mixes hidden state from the old weights with the new
ones, and forecasts carry the new version from the first batch after the swap.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np

from stream_lstm.config import Settings
from stream_lstm.engine import BatchedEngine
from stream_lstm.models.registry import LoadedModel, ModelLoadError, model_from_bytes
from stream_lstm.state.table import DeviceTable
from stream_lstm.training.background import BackgroundTrainer
from stream_lstm.training.retrainer import Retrainer, ensure_models_topic

log = logging.getLogger("stream_lstm.training")

# Idle devices re-warmed between two batches after a swap: ~25 ms of work on two CPU cores.
REWARM_SLICE = 512


class ModelLifecycle:
    """Schedules retraining, applies the promotion gate's verdicts, and hot-swaps.

    Parameters
    ----------
    settings
        Retraining schedule, TBPTT and gate settings, registry directory, models topic.
    served
        The model served at start.
    engine, table
        Where the swap and the re-warm happen.
    metrics
        :class:`~stream_lstm.metrics.Metrics` (retrain runs, decisions, swap pause).
    """

    def __init__(self, settings: Settings, served: LoadedModel, engine: BatchedEngine,
                 table: DeviceTable, metrics: object) -> None:
        self.settings = settings
        self.served = served
        self.engine = engine
        self.table = table
        self.metrics = metrics
        self.retrainer = Retrainer(settings, metrics)
        self.trainer = (BackgroundTrainer(settings.train_threads, settings.train_nice)
                        if settings.trainer == "inprocess" and self.retrainer.scheduled else None)
        self.follower = ModelsFollower(settings) if settings.trainer == "external" else None
        self.swaps = 0
        # Slots in memory at the last swap not yet re-warmed by rewarm_idle: built once per swap,
        # so a loop turn does not rescan the fleet.
        self._pending: list[int] = []
        # Called before a swap takes effect (the worker checkpoints its devices there).
        self.before_swap: Callable[[], object] | None = None

    @property
    def version(self) -> str:
        return self.served.version

    def tick(self, consumed: int) -> None:
        self.retrainer.count(consumed)
        if self.trainer is not None:
            result = self.trainer.poll()
            if result is not None:
                promoted = self.retrainer.verdict(result, self.served.version)
                if promoted is not None:
                    self.swap(promoted)
            elif not self.trainer.busy and self.retrainer.due():
                self.start_retrain()
        if self.follower is not None:
            loaded = self.follower.poll()
            if loaded is not None and loaded.version != self.served.version:
                self.swap(loaded)
        self.rewarm_idle()

    def start_retrain(self) -> bool:
        """Hand the fleet's windows to the background trainer; False if there is too little."""
        assert self.trainer is not None
        job = self.retrainer.job(self.table, self.served)
        if job is None:
            return False
        self.trainer.submit(job[0])
        log.info("retraining started", extra={"devices": job[1], "champion": self.served.version})
        return True

    def swap(self, loaded: LoadedModel) -> float:
        """Serve ``loaded`` from the next batch; returns the pause in seconds.

        Every in-memory device is re-warmed under the new weights *before its next step*: the
        devices of each batch first (see :meth:`rewarm_stale`, called by the pipeline), and idle
        ones in bounded slices between batches (:meth:`tick`). The result is the same as
        re-warming the whole fleet at once, since a device's window only changes when it is
        stepped, but no single pause grows with the fleet: serving goes on during the re-warm.
        """
        if loaded.spec != self.served.spec:
            log.error("refusing a model whose shape differs from the served one",
                      extra={"new": str(loaded.spec), "served": str(self.served.spec)})
            return 0.0
        if self.before_swap is not None:
            self.before_swap()
        t0 = time.perf_counter()
        self.engine.swap_model(loaded.model)
        old = self.served.version
        self.served = loaded
        self._pending = list(self.table.index.values())
        pause = time.perf_counter() - t0
        self.swaps += 1
        self.metrics.swap_pause_seconds.observe(pause)  # type: ignore[attr-defined]
        self.metrics.set_model_version(loaded.version, time.time())  # type: ignore[attr-defined]
        log.info("model swapped", extra={"from": old, "to": loaded.version,
                                         "devices_to_rewarm": len(self.table)})
        return pause

    def rewarm_idle(self, budget: int = REWARM_SLICE) -> int:
        """Re-warm up to ``budget`` in-memory devices still holding the old model's state."""
        chunk: list[int] = []
        while self._pending and len(chunk) < budget:
            slot = self._pending.pop()
            if self._stale(slot):  # the batch path may have re-warmed it already
                chunk.append(slot)
        self._rewarm(chunk)
        return len(chunk)

    def rewarm_stale(self, slots: np.ndarray) -> None:
        """Re-warm those of ``slots`` whose h/c came from another model (after a swap, or
        restored from the store), by replaying their windows under the served weights."""
        self._rewarm([s for s in slots.tolist() if self._stale(s)])

    def _stale(self, slot: int) -> bool:
        """A device is in ``slot`` and its h/c came from another model than the served one."""
        t = self.table
        return (t.ids[slot] is not None and t.model_version[slot] != self.served.version
                and t.window.length[slot] > 0)

    def _rewarm(self, slots: list[int]) -> None:
        if slots:
            self.engine.rewarm(np.array(slots, np.int64))
            for s in slots:
                self.table.model_version[s] = self.served.version

    def close(self) -> None:
        if self.trainer is not None:
            self.trainer.close()
        if self.follower is not None:
            self.follower.close()


class ModelsFollower:
    """Follows the compacted models topic; returns each newly published model."""

    def __init__(self, settings: Settings) -> None:
        from kafka.structs import TopicPartition

        from stream_lstm.kafka.clients import make_consumer
        ensure_models_topic(settings)
        self.tp = TopicPartition(settings.models_topic, 0)
        self.consumer = make_consumer(settings, group_id=None, enable_auto_commit=False,
                                      isolation_level="read_committed", fetch_max_bytes=64 * 1024 * 1024,
                                      max_partition_fetch_bytes=64 * 1024 * 1024)
        self.consumer.assign([self.tp])
        end = self.consumer.end_offsets([self.tp])[self.tp]
        self.consumer.seek(self.tp, max(0, end - 1))  # the latest published model

    def poll(self) -> LoadedModel | None:
        latest = None
        for recs in self.consumer.poll(timeout_ms=0).values():
            for rec in recs:
                try:
                    latest = model_from_bytes(rec.value)
                except ModelLoadError as exc:
                    log.error("ignoring an unloadable model from the models topic",
                              extra={"offset": rec.offset, "error": str(exc)})
        return latest

    def close(self) -> None:
        self.consumer.close()
