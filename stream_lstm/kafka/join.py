"""Mends a group join that kafka-python 3.0.12 finishes but never applies.

``KafkaConsumer.poll(timeout_ms=t)`` drives a rebalance as a background JoinGroup/SyncGroup task
and gives up waiting after ``t``; the next ``poll`` awaits the same task, but only while the
coordinator's ``need_rejoin()`` is true. A leader that rejoined because the topic metadata
changed (the usual second join after a start: the first join saw no partitions) records the new
metadata while assigning, so ``need_rejoin()`` turns false inside the task. If the poll that
started it had already timed out, nobody awaits the finished task: the member stays
``REBALANCING`` with its heartbeat off, the broker drops it after ``session.timeout.ms``, and
every offset commit fails with ``RebalanceInProgressError`` while the client never rejoins.

Seen in test_flood (group ``Empty`` on the broker, the worker rolling back every commit for 15
minutes); likeliest with short polls, which the worker makes when its open transaction is due.
``mend_abandoned_join`` finds that state between polls and asks for a fresh join, which the next
``poll`` completes (one extra rebalance; the member's partitions come back to it).

>>> from kafka.structs import MemberState
>>> class Task:
...     is_done = True
>>> class Coordinator:  # the pieces of kafka-python's ConsumerCoordinator this reads
...     state, _join_task, rejoin_needed = MemberState.REBALANCING, Task(), False
...     def need_rejoin(self): return self.rejoin_needed
...     def request_rejoin(self): self.rejoin_needed = True
>>> class Consumer:
...     _coordinator = Coordinator()
>>> consumer = Consumer()
>>> mend_abandoned_join(consumer)
True
>>> mend_abandoned_join(consumer)  # the rejoin is now pending: nothing more to do
False
"""

from __future__ import annotations

import logging
from typing import Any

from kafka.structs import MemberState

log = logging.getLogger(__name__)


def is_rebalancing(consumer: Any) -> bool:
    """Whether the consumer's group membership is not settled (joining, syncing, or about to)."""
    coordinator = getattr(consumer, "_coordinator", None)
    if coordinator is None:
        return False
    return coordinator.state is not MemberState.STABLE or coordinator.need_rejoin()


def mend_abandoned_join(consumer: Any) -> bool:
    """Request a fresh join when the last one finished unapplied; True when it did.

    Call it between polls, never during one: a join task is awaited only inside ``poll``, so a
    finished task seen from outside is one that nobody will apply."""
    coordinator = getattr(consumer, "_coordinator", None)
    if coordinator is None or coordinator.state is not MemberState.REBALANCING:
        return False
    task = getattr(coordinator, "_join_task", None)
    if (task is not None and not task.is_done) or coordinator.need_rejoin():
        return False  # still in flight, or the next poll rejoins anyway
    log.warning("a group join finished but was never applied (kafka-python 3.0.12); rejoining")
    coordinator.request_rejoin()
    return True


def forget_lost_membership(consumer: Any, error: BaseException) -> bool:
    """After a commit the group refused because it does not know this member (a member dropped
    while its whole process stood still, heartbeat thread included, that woke with its old
    generation: a zombie), say the membership is lost now, so the next ``poll`` gives the
    partitions up (``on_partitions_lost``) and rejoins; True when it did. Left to kafka-python,
    the worker restored them, committed, was refused again, 3-4 times over 1.5-4 s, until its
    next heartbeat found out (a chaos test). Not for ``IllegalGenerationError``: a member
    still in its group meets that in a rebalance's race, and rejoins anyway."""
    coordinator = getattr(consumer, "_coordinator", None)
    if coordinator is None or "UnknownMemberIdError" not in repr(error):
        return False
    log.warning("this member is no longer in its group (a commit refused for an unknown member): "
                "giving its partitions up and rejoining")
    coordinator.reset_generation()
    return True

