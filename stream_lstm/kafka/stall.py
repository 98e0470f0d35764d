"""Ends a kafka-python call that waits forever on its own network thread.

kafka-python 3.0.x runs ``KafkaConsumer.poll``'s fetch on its IO thread and waits for it with
``threading.Event().wait()`` and no timeout (dpkp/kafka-python#3121; the fix, #3123, is not in
3.0.12). Rarely that wait never ends: seen here twice as a worker whose ``poll`` sat in
``send_fetches`` for 15 minutes with its IO thread idle in ``select``. ``call_with_deadline``
(``deadline.py``) cannot serve ``poll``: it would leave the stuck call running beside the next
one, and the rebalance callbacks run inside ``poll``.

``StallGuard`` instead watches the calls made through it from one long-lived thread. A call that
outlasts its limit gets what the upstream fix gives it: the client's pending waits are failed
with ``KafkaTimeoutError``, which the caller sees and survives. The client itself stays usable:
each later call queues a fresh wait.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kafka.errors import KafkaTimeoutError

log = logging.getLogger(__name__)


class StallGuard:
    """Fails a client's stuck network waits once a guarded call passes its limit.

    Parameters
    ----------
    client
        A ``KafkaConsumer`` (anything whose ``_net`` has ``_fail_pending_waiters``, as
        kafka-python 3.0's selector does). Without one the guard only logs the stall.
    check_every_s
        How often the watching thread looks at the clock.

    Examples
    --------
    >>> import threading
    >>> class Net:  # the one piece of a kafka-python client the guard touches
    ...     def __init__(self): self.waiting = threading.Event()
    ...     def _fail_pending_waiters(self, exc): self.error = exc; self.waiting.set()
    >>> class Client:
    ...     _net = Net()
    >>> client = Client()
    >>> guard = StallGuard(client, check_every_s=0.01)
    >>> try:
    ...     with guard.limit("a wait that never ends", 0.05):
    ...         _ = client._net.waiting.wait()
    ...         raise client._net.error
    ... except KafkaTimeoutError as exc:
    ...     print(exc)
    KafkaTimeoutError: a wait that never ends did not finish within 0.05 s (dpkp/kafka-python#3121)
    >>> guard.stalls
    1
    >>> guard.close()
    """

    def __init__(self, client: Any, *, check_every_s: float = 1.0) -> None:
        self._net = getattr(client, "_net", None)
        self._check_every_s = check_every_s
        self._lock = threading.Lock()
        self._call: tuple[str, float, float] | None = None  # what, limit, deadline
        self._closed = threading.Event()
        self.stalls = 0
        self._thread = threading.Thread(target=self._watch, name="kafka stall guard", daemon=True)
        self._thread.start()

    @contextmanager
    def limit(self, what: str, timeout_s: float) -> Iterator[None]:
        """Guard one blocking call of the client for at most ``timeout_s`` seconds."""
        with self._lock:
            self._call = (what, timeout_s, time.monotonic() + timeout_s)
        try:
            yield
        finally:
            with self._lock:
                self._call = None

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Our own code inside a guarded call (a rebalance callback inside ``poll``): not a
        wait on the client, however long it takes; the call's limit starts again after it."""
        with self._lock:
            call, self._call = self._call, None
        try:
            yield
        finally:
            with self._lock:
                if call is not None and self._call is None:
                    self._call = (call[0], call[1], time.monotonic() + call[1])

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=5)

    def _watch(self) -> None:
        while not self._closed.wait(self._check_every_s):
            with self._lock:
                call = self._call
                if call is None or time.monotonic() < call[2]:
                    continue
                self._call = None  # one failure per call
            self._end(call[0], call[1])

    def _end(self, what: str, limit_s: float) -> None:
        self.stalls += 1
        error = KafkaTimeoutError(
            f"{what} did not finish within {limit_s:g} s (dpkp/kafka-python#3121)")
        fail = getattr(self._net, "_fail_pending_waiters", None)
        log.warning("kafka client call stalled; failing its wait so the worker goes on",
                    extra={"call": what, "limit_s": limit_s, "net": str(self._net)[:200],
                           "can_fail": fail is not None})
        if fail is not None:
            fail(error)
