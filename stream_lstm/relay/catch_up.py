"""The partitions a relay has just taken on, until it has read what they held then.

A relay that takes a partition on (a start, a rebalance) loads its open alerts from the store
and reads on from the group's committed offset. The events between there and the partition's
end were written while no relay read them: a close among them ends an alert the store still
holds open. Sent again at once, the store's copy re-fired an alert that was already over
(Alertmanager had timed it out), resolved only once the close was read (a review). So a taken
partition's open alerts are sent again only once the relay has read up to where the partition
ended when it was taken on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable


class CatchUp:
    """Per partition taken on: the offset the relay must read up to before its open alerts
    are sent again.

    Examples
    --------
    >>> c = CatchUp()
    >>> c.start({0: 5, 1: 0})
    >>> c.holds(0), c.holds(1)
    (True, True)
    >>> c.done(lambda p: {0: 3, 1: 0}[p])  # partition 1 held nothing more
    {1}
    >>> c.done(lambda p: 5), c.holds(0)
    ({0}, False)
    """

    def __init__(self) -> None:
        self.ends: dict[int, int] = {}

    def start(self, ends: dict[int, int]) -> None:
        """Partitions just taken on, each with its end offset then."""
        self.ends.update(ends)

    def holds(self, partition: int) -> bool:
        """Whether ``partition``'s open alerts wait."""
        return partition in self.ends

    def done(self, position: Callable[[int], int | None]) -> set[int]:
        """The partitions read up to their end now (``position``: the next offset the relay
        reads of one, None while unknown); they no longer wait."""
        caught = {p for p, end in self.ends.items() if (at := position(p)) is not None and at >= end}
        self.drop(caught)
        return caught

    def drop(self, partitions: Iterable[int]) -> None:
        """Partitions gone to another relay."""
        for p in partitions:
            self.ends.pop(p, None)
