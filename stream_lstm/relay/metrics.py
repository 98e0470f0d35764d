"""The alert relay's own series on its ``/metrics`` (not the worker's: a relay has no readings)."""

from __future__ import annotations


class RelayMetrics:
    """The relay's own series on its ``/metrics`` (not the worker's: a relay has no readings).

    >>> m = RelayMetrics(); m.relayed.inc(3)
    >>> b"stream_lstm_alerts_relayed_total 3.0" in m.exposition()
    True
    """

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge

        r = self.registry = CollectorRegistry()
        self.relayed = Counter("stream_lstm_alerts_relayed", "Alerts Alertmanager accepted (events and "
                               "re-sends of open ones)", registry=r)
        self.refused = Counter("stream_lstm_alerts_refused", "Alerts Alertmanager refused for what they "
                               "are (400, 413, 422): skipped, and an open one not re-sent", registry=r)
        self.failures = Counter("stream_lstm_alertmanager_failures", "Requests Alertmanager did not take "
                                "(unreachable, no answer, any other error status: 401/403 credentials, "
                                "404 a wrong URL, 429, 5xx): retried, and the relay not ready", registry=r)
        self.open_alerts = Gauge("stream_lstm_relay_open_alerts", "Open alerts the relay holds", registry=r)
        # (not the workers' stream_lstm_ready: a dashboard's count of ready workers would count it)
        self.ready = Gauge("stream_lstm_relay_ready", "1 when the relay is ready (see /readyz), else 0",
                           registry=r)

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)
