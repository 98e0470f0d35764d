"""Rebalance listener: tells the worker which input partitions it gains and loses.

kafka-python calls these from inside ``consumer.poll()``, i.e. *between* the worker's batches:
every batch handed out by an earlier poll has already been published and committed, so on
revocation the worker only has to drop the devices of the lost partitions.
"""

from __future__ import annotations

from collections.abc import Callable

from kafka import ConsumerRebalanceListener
from kafka.structs import TopicPartition


class PartitionListener(ConsumerRebalanceListener):
    """Forwards assignment changes (as partition numbers) to callbacks.

    Parameters
    ----------
    on_assigned, on_revoked
        Called with a set of partition numbers of the input topic.
    on_lost
        Called instead of ``on_revoked`` for partitions lost without a clean revocation (the
        member was dropped from its group); default ``on_revoked``. The member's generation is
        gone by then, so nothing may be committed for them.

    Examples
    --------
    kafka-python calls it inside ``poll``; called by hand it shows what the worker is told:

    >>> tps = [TopicPartition("sensor-readings", p) for p in (1, 0)]
    >>> listener = PartitionListener(lambda p: print("assigned", sorted(p)),
    ...                              lambda p: print("revoked", sorted(p)))
    >>> listener.on_partitions_assigned(tps)
    assigned [0, 1]
    >>> listener.on_partitions_lost(tps[:1])  # lost (not cleanly revoked): dropped all the same
    revoked [1]
    """

    def __init__(
        self,
        on_assigned: Callable[[set[int]], None],
        on_revoked: Callable[[set[int]], None],
        on_lost: Callable[[set[int]], None] | None = None,
    ) -> None:
        self._on_assigned = on_assigned
        self._on_revoked = on_revoked
        self._on_lost = on_lost or on_revoked

    def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        if assigned:
            self._on_assigned({tp.partition for tp in assigned})

    def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        if revoked:
            self._on_revoked({tp.partition for tp in revoked})

    def on_partitions_lost(self, lost: list[TopicPartition]) -> None:
        # Lost (not cleanly revoked): another member may already own them; drop state too.
        if lost:
            self._on_lost({tp.partition for tp in lost})
