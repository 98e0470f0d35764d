"""The served model's life: when to retrain, whether to promote, and the hot-swap.

Between two batches the worker calls :meth:`ModelLifecycle.tick`. It

1. collects a finished background retrain; a promoted challenger is registered and swapped in;
2. follows the compacted models topic when an external trainer publishes (``trainer=external``),
   else the registry's ``PROMOTED`` (a ``models rollback`` is served within seconds);
3. starts a new retrain when ``retrain_every_readings`` or ``retrain_every_s`` says so;
4. re-warms, for at most ``STREAM_LSTM_REWARM_SLICE_MS``, devices still on an older model.

A swap holds the loop up for a fraction of a millisecond whatever the fleet: it installs the
new weights **beside** the old ones (the engine keeps both, keyed by version) and starts a
pass over the table. Each device goes on stepping under the weights its h/c came from
(``table.model_version``) until a slice **re-warms** it: its h/c is recomputed by replaying
its rolling window through the new weights. No device mixes old hidden state with new
weights, and each forecast carries the version of the model that made it.

A re-warmed device is checkpointed with the next commit (``checkpoints.mark``), so the
changelog never holds a re-warm after a device's last checkpoint: replaying a device from its
checkpoint (restore) steps the readings since under the version the checkpoint names, as they
were served. So is every device not yet in the changelog at all, whose replay would otherwise
start it afresh under the new model (``checkpoints.mark_unwritten``, at the swap). A restored
device of an older version keeps it: the engine loads those weights by version, and a later
slice re-warms the device. Every version served is kept for that beside the registry, as the
worker starts serving it and right after each swap (models/served_models.py: a fresh model, a
file, a models-topic model are in no registry). When they cannot be loaded (another host's, pruned
long since, a third version at once), the device is re-warmed under the served weights at
once (counted in ``stream_lstm_rewarm_fallbacks_total``); its replay then matches what was
served only up to that re-warm.

At most two versions are live. A swap that arrives while devices still hold the oldest
re-warms those at once first (rare: two swaps within one re-warm), and logs it. A version's
weights are dropped once a whole pass over the table finds no device in memory holding them.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import numpy as np

from stream_lstm.config import Settings
from stream_lstm.engine import BatchedEngine
from stream_lstm.models.registry import LoadedModel, ModelLoadError
from stream_lstm.models.served_models import ServedModels
from stream_lstm.state.table import DeviceTable
from stream_lstm.training.background import BackgroundTrainer
from stream_lstm.training.retrainer import Retrainer

if TYPE_CHECKING:
    from stream_lstm.checkpointing.manager import StateManager
    from stream_lstm.training.models_follower import ModelsFollower

log = logging.getLogger("stream_lstm.training")

# Re-warmed devices waiting for the next commit to write their checkpoints, at most: each is
# one 3.5 KB changelog record (~0.1 ms of kafka-python's send), so this bounds what the
# re-warm adds to one commit (~25 ms); slices wait for the commit beyond it.
MAX_UNSAVED = 256
# The first guess of one device's re-warm time (a 64-reading window, hidden 64, one CPU core);
# each chunk's measured time replaces it.
FIRST_COST_S = 50e-6
# Devices re-warmed in one batched pass at most (a pass is one model forward over their windows).
MAX_CHUNK = 2048
# Slots looked at in one step of the scan for devices on an older model (~0.5 ms of Python).
SCAN_STEP = 4096


class ModelLifecycle:
    """Schedules retraining, applies the promotion gate's verdicts, and hot-swaps.

    Parameters
    ----------
    settings
        Retraining schedule, TBPTT and gate settings, registry directory, models topic, the
        re-warm slice.
    served
        The model served at start (the engine serves it from here on).
    engine, table
        Where the swap and the re-warm happen.
    metrics
        :class:`~stream_lstm.metrics.Metrics` (retrain runs, decisions, swap pause, re-warm).
    follower
        The models topic's :class:`ModelsFollower` the worker started from when
        ``STREAM_LSTM_TRAINER=external``; without one, the registry's ``PROMOTED`` is followed.

    ``checkpoints`` (the worker's :class:`~stream_lstm.checkpointing.manager.StateManager`)
    is where re-warmed devices are marked for the next commit's checkpoint; ``None`` (tests,
    benchmarks) marks nothing.

    >>> import tempfile, pathlib
    >>> from stream_lstm.metrics import Metrics
    >>> from stream_lstm.models.lstm import ModelSpec, SimpleLSTM
    >>> spec = ModelSpec(hidden_size=4, horizon=2)
    >>> table = DeviceTable(max_devices=8, window=4, n_features=1, num_layers=1, hidden_size=4)
    >>> old, new = (LoadedModel.of(SimpleLSTM.from_spec(spec), spec, v) for v in ("v1", "v2"))
    >>> s = Settings(trainer="off", model_dir=pathlib.Path(tempfile.mkdtemp()))
    >>> life = ModelLifecycle(s, old, BatchedEngine(old.model, table), table, Metrics())
    >>> slot = int(table.slots_for(["a"], [0], now=0.0)[0]); table.model_version[slot] = "v1"
    >>> table.window.push(np.array([slot]), np.zeros((1, 1), np.float32))
    >>> pause = life.swap(new)  # nothing is re-warmed yet
    >>> sorted(life.engine.models), table.model_version[slot]
    (['v1', 'v2'], 'v1')
    >>> life.rewarm_slice(), table.model_version[slot]
    (1, 'v2')
    >>> while life.rewarming:  # a checking pass, then the old weights go
    ...     _ = life.rewarm_slice()
    >>> sorted(life.engine.models)
    ['v2']
    """

    def __init__(self, settings: Settings, served: LoadedModel, engine: BatchedEngine,
                 table: DeviceTable, metrics: object, follower: ModelsFollower | None = None) -> None:
        self.settings = settings
        self.served = served
        self.engine = engine
        self.table = table
        self.metrics = metrics
        self.retrainer = Retrainer(settings, metrics)
        self.trainer = (BackgroundTrainer(settings.train_threads, settings.train_nice)
                        if settings.trainer == "inprocess" and self.retrainer.scheduled else None)
        if self.trainer is not None:
            self.retrainer.say_if_windows_are_short()
        self.follower = follower  # (the worker decides: it serves the topic's latest from the start)
        if settings.trainer == "off" and self.retrainer.scheduled:  # (a trainer process reads them)
            log.warning("STREAM_LSTM_RETRAIN_EVERY_* is set but STREAM_LSTM_TRAINER=off: this "
                        "worker never retrains")
        self.swaps = 0
        self.checkpoints: StateManager | None = None
        # What the start-up line says of retraining (by default none: the served model stays).
        every = "_or_".join(f"{n:g}{unit}" for n, unit in ((settings.retrain_every_readings, "_readings"),
                                                          (settings.retrain_every_s, "s")) if n)
        self.retraining = ("external" if settings.trainer == "external" else
                           f"every_{every}" if self.trainer is not None else "off")
        if settings.trainer == "inprocess" and not every:
            log.info("retraining is off: set STREAM_LSTM_RETRAIN_EVERY_READINGS or "
                     "STREAM_LSTM_RETRAIN_EVERY_S to retrain in the background")
        self.slice_s = settings.rewarm_slice_ms / 1000
        self.longest_slice_s = 0.0  # the longest re-warm slice so far (benchmarks)
        # Where the devices on an older model are: the slots below the cursor (a pass over
        # the table after each swap, downwards, so that a swap costs nothing a device), and
        # those brought in since with an older version. A slot's current version decides.
        self._cursor = 0
        self._extra: list[int] = []
        self._found = 0  # devices re-warmed in the current pass
        self._checking = False  # a pass that checks that the one before left nothing behind
        self._cost_s = FIRST_COST_S
        self._unloadable: set[str] = set()
        # The engine serves what this lifecycle serves, and holds no other weights yet.
        engine.swap_model(served.model, served.version)
        for v in [v for v in engine.models if v != served.version]:
            engine.release(v)
        self.kept = ServedModels(settings.model_dir)  # type: ignore[arg-type]
        self.kept.keep(served, wait=True)  # before the first checkpoint can name it

    @property
    def version(self) -> str:
        return self.served.version

    @property
    def rewarming(self) -> bool:
        """Whether devices in memory may still hold an older model's h/c."""
        return self._cursor > 0 or bool(self._extra)

    @property
    def pending(self) -> int:
        """Devices in memory that may still hold an older model's h/c, at most (the gauge
        ``stream_lstm_rewarm_pending_devices``)."""
        listed = 0 if self._checking else min(self._cursor, len(self.table))
        return listed + len(self._extra)

    def tick(self, consumed: int) -> None:
        self.retrainer.count(consumed)
        if self.trainer is not None:
            result = self.retrainer.turn(self.trainer, self.table, self.served)
            if result is not None:
                promoted = self.retrainer.verdict(result)
                if promoted is not None:
                    self.swap(promoted)
        if self.follower is not None:
            loaded = self.follower.poll()
        else:  # the registry is where this worker's models come from: a rollback applies now
            loaded = self.retrainer.moved(self.served.version)
        if loaded is not None and loaded.version != self.served.version:
            self.swap(loaded)
        self.rewarm_slice()

    def start_retrain(self) -> bool:
        """Hand the fleet's windows to the background trainer; False if there is too little."""
        assert self.trainer is not None
        return self.retrainer.start(self.trainer, self.table, self.served)

    def swap(self, loaded: LoadedModel) -> float:
        """Serve ``loaded`` from the next batch on; returns the time the swap took (the loop
        turn it held up), in seconds.

        Nothing is re-warmed here, and nothing is done a device: the engine keeps the weights
        served so far beside the new ones, and :meth:`rewarm_slice` passes over the table.
        The devices not yet in the changelog at all are checkpointed with the next commit (a
        replay would start them afresh under the new model, though they started under the
        old). Only if devices still hold a version older than the one served so far (a swap
        within a re-warm) are those re-warmed at once, so that two versions at most stay live.
        """
        if loaded.spec.serving_shape() != self.served.spec.serving_shape():  # (dropout aside)
            log.error(f"refusing model {loaded.version}: its shape differs from the served "
                      f"{self.served.version}'s (a worker starts on it, but swaps only within a shape)",
                      extra={"new": str(loaded.spec), "served": str(self.served.spec)})
            self.metrics.models_refused.labels("shape").inc()  # type: ignore[attr-defined]
            return 0.0
        t0 = time.perf_counter()
        old = self.served.version
        if self.checkpoints is not None:
            # A device not yet checkpointed would be replayed afresh under the new model.
            self.checkpoints.mark_unwritten()
        oldest: list[int] = []
        if len(self.engine.models) > 1:  # a swap within a re-warm (rare): a scan of the table
            oldest = [s for s in range(self.table.capacity) if self._holds_other(s, (old, loaded.version))]
        self.engine.swap_model(loaded.model, loaded.version)
        self.served = loaded
        for v in [v for v in self.engine.models if v not in (old, loaded.version)]:
            self.engine.release(v)
        if oldest:
            # A re-warm needs only the window and the weights it is made under: the new ones.
            log.warning("a swap while devices still held an older model: re-warming them at once",
                        extra={"devices": len(oldest), "served": old, "to": loaded.version})
            self._rewarm(oldest)
        self._cursor, self._extra, self._found, self._checking = self.table.capacity, [], 0, False
        pause = time.perf_counter() - t0
        self.kept.keep(loaded, holding=self.engine.models)  # by a thread: the turn does not wait
        self.swaps += 1
        self.metrics.swap_pause_seconds.observe(pause)  # type: ignore[attr-defined]
        self.metrics.set_model_version(loaded.version, loaded.created_ts or time.time())  # type: ignore[attr-defined]
        self.metrics.rewarm_pending_devices.set(self.pending)  # type: ignore[attr-defined]
        log.info("model swapped", extra={"from": old, "to": loaded.version,
                                         "devices_to_rewarm": self.pending,
                                         "pause_ms": round(pause * 1e3, 2)})
        return pause

    def rewarm_slice(self) -> int:
        """Re-warm devices still on an older model for about ``slice_s`` (one chunk at least,
        sized by the last chunk's time a device); returns how many. Once a pass over the
        table finds none left, the older weights are dropped."""
        if not self.rewarming:
            return 0
        t0 = time.perf_counter()
        done, took_one = 0, False
        while self.rewarming:
            left = self.slice_s - (time.perf_counter() - t0)
            room = MAX_UNSAVED - self._unsaved()
            if (took_one and left <= 0) or room <= 0:
                break
            chunk = self._take(max(1, min(int(left / self._cost_s), room, MAX_CHUNK)))
            took_one = True
            if chunk:
                tc = time.perf_counter()
                self._rewarm(chunk)
                self._cost_s = (time.perf_counter() - tc) / len(chunk)
                done += len(chunk)
            if not self.rewarming:
                self._pass_done()
        took = time.perf_counter() - t0
        self.longest_slice_s = max(self.longest_slice_s, took)
        if done:
            self.metrics.rewarm_slice_seconds.observe(took)  # type: ignore[attr-defined]
        self.metrics.rewarm_pending_devices.set(self.pending)  # type: ignore[attr-defined]
        return done

    def admit(self, slots: np.ndarray) -> None:
        """Devices just brought into memory (from the store, or new): each steps under the
        weights its h/c came from. An older version's are loaded from the registry when the
        engine does not hold them, and the device waits for a slice's re-warm; a device whose
        version cannot be stepped (not loadable, a third version, h/c of another shape) is
        re-warmed under the served weights at once, and checkpointed with the next commit."""
        mv, served = self.table.model_version, self.served.version
        now: list[int] = []
        for slot in slots.tolist():
            v = mv[slot]
            if v == served or self.table.ids[slot] is None:
                continue
            if not v:  # restored h/c of another shape (zeroed), or a new device (no window)
                if self.table.window.length[slot] > 0:
                    now.append(slot)
            elif v in self.engine.models or self._load(v):
                self._extra.append(slot)
            else:
                now.append(slot)
                self.metrics.rewarm_fallbacks.inc()  # type: ignore[attr-defined]
        self._rewarm(now)

    def _load(self, version: str) -> bool:
        """Hold ``version``'s weights, from the registry; False if it cannot be (once said)."""
        if version in self._unloadable:
            return False
        if len(self.engine.models) >= 2:
            log.warning("a device restored with a third model version: re-warmed at once",
                        extra={"version": version, "held": sorted(self.engine.models)})
            return False
        try:
            loaded = self.kept.load(version)
            if loaded.spec.serving_shape() != self.served.spec.serving_shape():
                raise ModelLoadError(f"its shape {loaded.spec} is not the served one's")
        except ModelLoadError as exc:
            self._unloadable.add(version)
            log.warning("cannot load the model version of restored devices: they are re-warmed "
                        "under the served model at once (their replay matches only from there)",
                        extra={"version": version, "error": str(exc)[:300]})
            return False
        self.engine.hold(version, loaded.model)
        log.info("holding an older model for restored devices until they are re-warmed",
                 extra={"version": version, "served": self.served.version})
        return True

    def _holds_other(self, slot: int, versions: tuple[str, ...]) -> bool:
        t = self.table
        return t.ids[slot] is not None and bool(t.model_version[slot]) and t.model_version[slot] not in versions

    def _take(self, n: int) -> list[int]:
        """Up to ``n`` slots that still hold an older model's h/c, from at most ``SCAN_STEP``
        looked at (the slots brought in since the swap, then the pass's cursor)."""
        chunk: list[int] = []
        served, mv, ids, extra = self.served.version, self.table.model_version, self.table.ids, self._extra
        for _ in range(SCAN_STEP):
            if len(chunk) >= n:
                break
            if extra:
                slot = extra.pop()
            elif self._cursor > 0:
                self._cursor -= 1
                slot = self._cursor
            else:
                break
            if ids[slot] is not None and mv[slot] and mv[slot] != served:
                chunk.append(slot)  # (a slot listed twice is re-warmed twice: the same result)
        self._found += len(chunk)
        return chunk

    def _rewarm(self, slots: list[int]) -> None:
        if not slots:
            return
        arr = np.array(slots, np.int64)
        self.engine.rewarm(arr)
        for s in slots:
            self.table.model_version[s] = self.served.version
        if self.checkpoints is not None:
            self.checkpoints.mark(self.table, arr)

    def _unsaved(self) -> int:
        return self.checkpoints.waiting() if self.checkpoints is not None else 0

    def _pass_done(self) -> None:
        """A pass over the table is over. One that re-warmed devices is followed by one more
        (a check, spread over slices as well), so the older weights are dropped only once a
        whole pass finds no device in memory holding them."""
        if self._found:
            self._cursor, self._found, self._checking = self.table.capacity, 0, True
            return
        self._checking = False
        older = [v for v in self.engine.models if v != self.served.version]
        for v in older:
            self.engine.release(v)
        if older:
            log.info("re-warm complete: older weights dropped",
                     extra={"dropped": older, "served": self.served.version})

    def close(self) -> None:
        self.kept.close()
        if self.trainer is not None:
            self.trainer.close()
        if self.follower is not None:
            self.follower.close()
