"""The metrics of a host of worker processes (``processes.py``): the children's series added up,
and the host's own.

The children's series reach the host through prometheus-client's multiprocess mode: each child
writes its own files to one directory and :class:`HostMetrics` adds them up. Counters and
histograms sum, also over children that exited (they count what those did); each gauge
combines as ``metrics.py`` declares. The host adds its own ``stream_lstm_ready``,
``stream_lstm_processes``, ``stream_lstm_process_running{process}``,
``stream_lstm_process_restarts_total{process}``, ``stream_lstm_up_info`` and, from the status
files (``process_health.py``), ``stream_lstm_model_info{process,version}`` (an Info cannot
cross processes) and ``stream_lstm_process_transactions_total{process,outcome}`` (in the sums,
one process that only rolled back was hidden by the others' commits).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Info
from prometheus_client.core import CounterMetricFamily, InfoMetricFamily
from prometheus_client.exposition import generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from stream_lstm.metrics import PREFIX
from stream_lstm.process_health import STATUS_STALE_S, Slot, status_age


class _Children:
    """The children's series from the multiprocess directory, without their ``ready`` (the
    host exports its own), and the model each serves, from its status file (prometheus'
    multiprocess mode cannot carry an Info)."""

    def __init__(self, metrics_dir: Path, slots: list[Slot]) -> None:
        self.metrics_dir, self.slots = metrics_dir, slots

    def collect(self) -> Iterator[Any]:
        # A silent child's live gauges leave the sums as its readiness does (a SIGSTOPped child's
        # devices were counted beside those of the one that took its partitions: 83 of 60).
        silent = {slot.name for slot in self.slots
                  if (status := slot.read_status()) is not None and status_age(status) > STATUS_STALE_S}
        files = [str(p) for p in self.metrics_dir.glob("*.db")
                 if not (p.name.startswith("gauge_live") and p.stem.rpartition("_")[2] in silent)]
        for family in MultiProcessCollector.merge(files, accumulate=True):
            if family.name != PREFIX + "ready":
                yield family
        info = InfoMetricFamily(PREFIX + "model", "The served model version, per worker process",
                                labels=["process"])
        # Per process beside the host's sums: one child that only rolled back was hidden by the
        # others' commits (StreamLstmCommitsFailing reads both; a review). From each process's
        # start: a restart resets it, as any process's counter.
        outcomes = CounterMetricFamily(PREFIX + "process_transactions", "Transactions committed "
                                       "or aborted, per worker process", labels=["process", "outcome"])
        for slot in self.slots:
            status = slot.read_status()
            if status is not None and status.get("model_version"):
                info.add_metric([slot.name], {"version": str(status["model_version"])})
            for outcome, n in ((status or {}).get("transactions") or {}).items():
                outcomes.add_metric([slot.name, str(outcome)], float(n))
        yield info
        yield outcomes


class HostMetrics:
    """What the supervisor serves: the children's series added up and its own.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     text = HostMetrics(Path(tmp), [Slot("p0", Path(tmp) / "p0.json")], "host").exposition()
    >>> b"stream_lstm_process_running" in text and b"stream_lstm_processes" in text
    True
    """

    def __init__(self, metrics_dir: Path, slots: list[Slot], instance: str) -> None:
        from stream_lstm import __version__

        r = self.registry = CollectorRegistry()
        r.register(_Children(metrics_dir, slots))
        self.ready = Gauge(PREFIX + "ready", "1 when every worker process is ready (see /readyz)",
                           registry=r)
        self.processes = Gauge(PREFIX + "processes", "Worker processes this host runs "
                               "(STREAM_LSTM_PROCESSES)", registry=r)
        self.running = Gauge(PREFIX + "process_running", "1 while the worker process runs",
                             ["process"], registry=r)
        self.restarts = Counter(PREFIX + "process_restarts", "Worker processes restarted "
                                "after they exited", ["process"], registry=r)
        Info(PREFIX + "up", "Version and instance of this stream-lstm host", registry=r).info(
            {"version": __version__, "instance": instance, "processes": str(len(slots))})
        self.processes.set(len(slots))
        for slot in slots:
            self.restarts.labels(slot.name)
            self.running.labels(slot.name)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
