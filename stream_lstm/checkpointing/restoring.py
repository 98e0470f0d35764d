"""Restoring assigned partitions from the changelog, in bounded slices between polls.

A slice reads for at most its budget and returns; the partitions stay paused (and heartbeats
and rebalances go on) until their restore completes. The budget starts at the slice's first
read, not before its set-up (an admin and a consumer connecting): on a loaded machine a set-up
longer than the budget had cancelled every slice before it read a record, for ever.

Before a partition's first slice, the store's rows of it are checked for age: a partition this
worker released longer ago than :data:`STALE_STORE_S` is restored from the changelog alone (the
cleaner may have removed tombstones its rows predate: a device deleted meanwhile would come
back).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from stream_lstm.checkpointing.changelog import restore
from stream_lstm.checkpointing.identity import keep_only_this_topics_rows
from stream_lstm.kafka.topics import CHANGELOG_CONFIG

if TYPE_CHECKING:
    from stream_lstm.checkpointing.manager import StateManager

log = logging.getLogger("stream_lstm.checkpointing")
# Rows of a partition released longer ago than half the tombstones' retention are not reused.
STALE_STORE_S = int(CHANGELOG_CONFIG["delete.retention.ms"]) / 2000
IDENTITY_TIMEOUT_S = 10.0  # (unanswered, the offsets decide alone: identity.py)


def restore_slice(m: StateManager, budget_s: float = 1.0) -> set[int]:
    """Restore ``m``'s paused partitions for at most ``budget_s`` once reading; return those now
    complete (restoring no more, ready).

    Example: see tests/checkpointing/test_restoring.py::test_every_restore_slice_makes_progress_even_when_set_up_outlasts_its_budget
    """
    if not m.restoring:
        return set()
    if check := m._unchecked & m.restoring:  # (once a restore: newly assigned partitions)
        keep_only_this_topics_rows(m.settings, m.topic, m.store, IDENTITY_TIMEOUT_S, serving=m.ready)
        if stale := m.store.forget_stale(check, time.time(), STALE_STORE_S):
            log.info("the store's copy is stale; restoring from the changelog", extra={"partitions": stale})
        m._unchecked -= check
    parts = sorted(m.restoring)
    began: list[float] = []  # at restore's first question, once the slice has read something

    def over_budget() -> bool:
        began[:] = began or [time.monotonic()]
        return time.monotonic() - began[0] > budget_s

    result = restore(
        m.settings, m.topic, parts, m.store,
        progress=lambda p, done, total: m._progress(p, done / total if total else 1.0),
        cancelled=over_budget,
    )
    if m.metrics is not None:
        m.metrics.restored_records.inc(sum(result.restored.values()))  # type: ignore[attr-defined]
    if result.skipped:
        m._unusable(result.skipped, "unreadable changelog records skipped: their devices "
                    "keep what the store had, or start afresh", partitions=parts)
    if not result.complete:
        return set()
    done = set(parts)
    devices = m.store.count(done)
    if m.metrics is not None:
        m.metrics.restored_devices.inc(devices)  # type: ignore[attr-defined]
    m.restoring -= done
    m.ready |= done
    for p in done:
        m._progress(p, 1.0)
    # (A restore of many slices said only its last slice's records, as if that were all of it.)
    log.info("restored state", extra={"partitions": sorted(done), "devices": devices,
                                      "last_slice_records": sum(result.restored.values()),
                                      "last_slice_seconds": round(result.seconds, 3)})
    return done
