"""The trainer's start from the workers' checkpoints: their state, and where to read on from.

The trainer keeps every device's normalized window as the workers do. A trainer that started
afresh from its consumer group's committed offset (a restart, a moved pod) rebuilt each
device from nothing: new normalizer statistics (z values 2.65 apart from the workers' on a
recording with the Welford normalizer, and lasting), no glitch guard (it needs 1,000
readings: one 1e11 reading the workers held out flattened the trainer's window) — and the
challenger was trained and gated on windows the workers never fed their model.

So at start it does what a worker's restore does (``checkpointing/replay.py``): it reads the
state changelog, takes in each device's checkpoint, and reads the input from each partition's
replay marker, so the readings since a checkpoint are applied again (those a checkpoint
already holds are skipped as duplicates by their time). Its windows then end where the
workers' do. A changelog that does not exist yet (no worker has checkpointed), or a restore
that fails or times out, leaves the trainer as it was: starting afresh, and said.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from stream_lstm.checkpointing.changelog import restore
from stream_lstm.checkpointing.codec import SnapshotDecodeError, decode_for_table
from stream_lstm.checkpointing.store import StateStore
from stream_lstm.config import Settings
from stream_lstm.state.table import DeviceTable

log = logging.getLogger("stream_lstm.trainer")

# At most this long, reading and taking in together, then it starts afresh (said). Meanwhile the
# trainer's /healthz is kept fresh (``beat``), so its probes see a process starting, not a hung
# one, and a start that hangs ends here rather than in a restart loop. Taking a device in costs
# ~0.1 ms here: a table of ~2M devices (STREAM_LSTM_MAX_DEVICES: no more are taken in) fits.
RESTORE_TIMEOUT_S = 300.0
BEAT_S = 5.0
_PAGE = 2000  # store rows decoded at a time


def load_checkpoints(settings: Settings, table: DeviceTable, partitions: list[int],
                     beat: Callable[[], None] | None = None) -> dict[int, int]:
    """Take the checkpoints of ``partitions`` in the state changelog into ``table``; return
    the input offset each partition must be read from (its replay marker), for those that
    have one. ``beat`` (the health's) is called every :data:`BEAT_S` while it works.

    Example: see tests/training/test_from_checkpoints.py::test_a_restarted_trainer_holds_the_windows_of_one_that_never_stopped
    """
    topic = settings.changelog_topic_name()
    deadline = time.monotonic() + RESTORE_TIMEOUT_S  # the reading and the taking in, together
    with _beating(beat), tempfile.TemporaryDirectory(prefix="stream-lstm-trainer-") as d:
        store = StateStore(Path(d) / "changelog.sqlite")
        try:
            try:
                result = restore(settings, topic, partitions, store, timeout_s=RESTORE_TIMEOUT_S)
                if not result.complete:
                    raise RuntimeError("the restore did not reach the changelog's end")
                positions = {p: offset for p in partitions if (offset := store.replay_from(p)) is not None}
                checkpointed, unreadable = store.count(), _take_in(store, table, deadline)
            except Exception as exc:  # noqa: BLE001 - the trainer can still start afresh
                table.drop(list(table.index))  # (nothing half taken in)
                log.warning("could not start from the workers' checkpoints; starting afresh from "
                            "the group's offsets", extra={"changelog": topic, "error": str(exc)[:300]})
                return {}
        finally:
            store.close(clean=True)
    held = len(table.index)
    if held < checkpointed - unreadable:  # (the rest come back from the replay, rebuilt from nothing)
        log.warning(f"the trainer's table holds {held} of the {checkpointed} devices checkpointed: "
                    "raise STREAM_LSTM_MAX_DEVICES for the trainer", extra={"changelog": topic})
    log.info("started from the workers' checkpoints", extra={
        "changelog": topic, "devices": held, "unreadable": unreadable, "replay_from": positions})
    return positions


@contextlib.contextmanager
def _beating(beat: Callable[[], None] | None) -> Iterator[None]:
    """``beat()`` every :data:`BEAT_S` in a thread while the body runs (bounded by its deadline)."""
    if beat is None:  # (no endpoint to keep fresh)
        yield
        return
    done = threading.Event()

    def run() -> None:
        while not done.wait(BEAT_S):
            beat()

    thread = threading.Thread(target=run, name="trainer-start-beat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def _take_in(store: StateStore, table: DeviceTable, deadline: float) -> int:
    """Every stored snapshot into ``table`` until it is full; returns how many were unreadable.
    Past ``deadline``, raises: a start that outlasts the startup probe would be restarted."""
    unreadable, after = 0, ""
    while len(table.index) < table.max_devices and (rows := store.scan(after, _PAGE)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"taking the checkpoints in took over {RESTORE_TIMEOUT_S:g} s")
        for _, _, data in rows[: table.max_devices - len(table.index)]:
            try:
                table.restore(decode_for_table(data, table.n_features))
            except SnapshotDecodeError:  # (counted by the workers; here it starts afresh)
                unreadable += 1
        after = rows[-1][0]
    return unreadable
