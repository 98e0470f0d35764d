"""How long the consumer has gone without a consumer-group heartbeat.

A failed publish tells a busy worker that the broker is gone. An idle worker publishes nothing,
so it would go on reporting ready through an outage. kafka-python's heartbeat thread sends a
heartbeat every ``heartbeat.interval.ms`` (3 s) while it can reach the group coordinator, and
stops sending while it looks for one. The age of the last heartbeat, which the consumer reports
as the ``last-heartbeat-seconds-ago`` metric (the Java client's name), is therefore the sign of
an outage that needs no traffic.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

_GROUP, _NAME = "consumer-coordinator-metrics", "last-heartbeat-seconds-ago"
_REASON = "no consumer-group heartbeat"


class GroupHeartbeat:
    """Says when the last group heartbeat is older than ``stale_after_s``.

    Parameters
    ----------
    consumer
        A subscribed ``KafkaConsumer`` (anything with its ``metrics()``).
    stale_after_s
        Older than this, the broker counts as unreachable. The worker uses the session timeout:
        past it, the coordinator has dropped the member anyway.
    check_every_s
        Reading the consumer's metrics walks all of them, so it is done at most this often.

    >>> class Consumer:
    ...     age = 1.0
    ...     def metrics(self):
    ...         return {"consumer-coordinator-metrics": {"last-heartbeat-seconds-ago": self.age}}
    >>> consumer = Consumer()
    >>> beat = GroupHeartbeat(consumer, stale_after_s=10, check_every_s=0)
    >>> beat.silent_for() is None
    True
    >>> consumer.age = 12.5
    >>> beat.silent_for()
    12.5
    >>> from stream_lstm.metrics import HealthState
    >>> health = HealthState(); health.set_ready("broker", True)
    >>> beat.report(health), health.readiness()
    (True, (False, {'broker': 'no consumer-group heartbeat for 12s'}))
    >>> consumer.age = 0.5
    >>> beat.report(health), health.readiness()
    (True, (True, {'broker': 'ok'}))
    """

    def __init__(
        self,
        consumer: Any,
        stale_after_s: float,
        check_every_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.consumer = consumer
        self.stale_after_s = stale_after_s
        self.check_every_s = check_every_s
        self.clock = clock
        self._next_check = -math.inf
        self._silent: float | None = None

    def silent_for(self) -> float | None:
        """Seconds since the last heartbeat if that is too long ago, else None."""
        now = self.clock()
        if now < self._next_check:
            return self._silent
        self._next_check = now + self.check_every_s
        age = (self.consumer.metrics() or {}).get(_GROUP, {}).get(_NAME)
        # Infinite before the first heartbeat after joining: not a sign of anything yet.
        stale = isinstance(age, float | int) and self.stale_after_s < age < math.inf
        self._silent = float(age) if stale else None
        return self._silent

    def report(self, health: Any) -> bool:
        """Mark the ``broker`` component of ``health`` (metrics.HealthState) not ready while
        the heartbeat is silent, and ready again once it is back; other reasons for "not
        ready" (a failed publish or restore) are left to whoever set them. True if changed."""
        silent = self.silent_for()
        if silent is not None:
            health.set_ready("broker", False, f"{_REASON} for {silent:.0f}s")
            return True
        if health.readiness()[1].get("broker", "ok").startswith(_REASON):
            health.set_ready("broker", True)
            return True
        return False
