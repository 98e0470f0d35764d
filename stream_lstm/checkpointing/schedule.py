"""When a partition's changed devices are next checkpointed: each partition at its own phase
of the checkpoint interval, so that a worker's partitions take turns.

The first batch after an assignment usually changes a device of every partition the worker
holds. With one due time of ``now + interval`` each, all of them came due together, and from
then on one commit in every interval carried a checkpoint of every device the worker held:
about 4 KB and 130 us of snapshotting and encoding a device on this machine (1,000 devices:
0.13 s; 10,000: 1.3 s, with the loop held up all that time), then as many records to send.
At phases spread over the interval by the golden ratio, a worker of P partitions writes a
P-th of its devices at a time, in turn, and each partition still once an interval.

>>> [round(next_checkpoint(p, now=0.0, interval_s=30.0), 1) for p in range(4)]
[30.0, 18.5, 37.1, 25.6]
>>> round(next_checkpoint(1, now=18.6, interval_s=30.0), 1)  # changed after its checkpoint
48.5
>>> next_checkpoint(3, now=100.0, interval_s=0.0)  # 0: every commit
100.0
"""

from __future__ import annotations

GOLDEN = 0.6180339887498949  # (the fractional part of the golden ratio: phases never bunch)


def next_checkpoint(partition: int, now: float, interval_s: float) -> float:
    """When ``partition``, changed at ``now``, is next checkpointed: at its phase of the
    interval, at least half an interval on (so a partition checkpointed at its phase and changed
    right after is next checkpointed one interval later, and a first one within 1.5)."""
    if interval_s <= 0:
        return now
    phase = (partition * GOLDEN % 1.0) * interval_s
    earliest = now + interval_s / 2
    return earliest + (phase - earliest) % interval_s
