"""A deadline around blocking kafka-python calls that can wait forever.

kafka-python 3.x runs a blocking call (``beginning_offsets``, ``end_offsets``, ``commit``...)
on its network thread and waits for it with ``threading.Event().wait()`` and no timeout; its
own ``timeout_ms`` bounds the request, not that wait. In rare cases the wait never ends
(dpkp/kafka-python#3121, fixed upstream after 3.0.12): seen here as a worker whose changelog
restore sat in ``beginning_offsets`` for the whole of a 300 s test, consuming nothing. A worker
must give up, close that client and retry with a fresh one instead.

>>> call_with_deadline(lambda: 42, 1.0, "an answer")
42
>>> import threading
>>> try:
...     call_with_deadline(threading.Event().wait, 0.05, "waiting on nothing")
... except KafkaTimeoutError as exc:
...     print(exc)
KafkaTimeoutError: waiting on nothing did not finish within 0.05 s
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

from kafka.errors import KafkaTimeoutError

T = TypeVar("T")


def call_with_deadline(call: Callable[[], T], timeout_s: float, what: str,
                       on_timeout: Callable[[], object] | None = None) -> T:
    """``call()``, or ``KafkaTimeoutError`` when it has not returned within ``timeout_s``.

    Parameters
    ----------
    call
        The blocking call; it runs on a daemon thread, and its exception is raised here.
    timeout_s
        How long to wait for it.
    what
        Names the call in the error.
    on_timeout
        Run (on its own daemon thread, so it cannot block the caller either) when the deadline
        passes: typically the client's ``close``, which fails the stuck wait.
    """
    outcome: dict[str, object] = {}
    done = threading.Event()

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            outcome["error"] = exc
        finally:
            done.set()

    threading.Thread(target=run, name=f"deadline: {what}", daemon=True).start()
    if not done.wait(timeout_s):
        if on_timeout is not None:
            threading.Thread(target=on_timeout, name=f"give up: {what}", daemon=True).start()
        raise KafkaTimeoutError(f"{what} did not finish within {timeout_s:g} s")
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]
