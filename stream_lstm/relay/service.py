"""``stream-lstm alert-relay``: the alerts topic into Prometheus' Alertmanager.

The worker writes one record when a device's alert opens and one when it closes. On-call
tooling mostly reads Alertmanager, which wants a firing alert re-sent until it resolves. The
relay reads the alerts topic (read_committed, in its own consumer group, so several relays
share the partitions), posts each event as an Alertmanager alert (``alertmanager.to_alert``),
and re-sends the alerts still open every minute.

What it commits says where a restart reads again: per partition, past the last event
Alertmanager accepted whose open alert is in the relay's store (``open_store``: a compacted
topic of the open alerts, so one open longer than the alerts topic's retention is not lost). A
relay that takes a partition on (a restart, a rebalance) loads its open alerts, reads on from
the committed offset, and sends them again (same labels: Alertmanager deduplicates) once it
has read what the partition held then (``catch_up``: a close among it must not follow a
re-fire). Alertmanager down: the events wait, the partitions are paused (the consumer stays
in its group), the relay retries with backoff, and nothing is committed past them.

Example: see tests/relay/test_service.py::test_an_alert_opens_fires_again_after_a_restart_and_resolves
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from kafka.structs import OffsetAndMetadata, TopicPartition

from stream_lstm.config import Settings, SettingsError
from stream_lstm.connection_checks import topic_problem
from stream_lstm.endpoint import serve_metrics
from stream_lstm.kafka.group_consumer import GroupConsumer
from stream_lstm.kafka.rebalance import PartitionListener
from stream_lstm.kafka.topics import TopicSpec, ensure_topics
from stream_lstm.logs import kafka_closing
from stream_lstm.metrics import HealthState
from stream_lstm.relay.alertmanager import (
    DEFAULT_LABELS,
    MAX_EVENT_BYTES,
    RESEND_S,
    UNREADABLE,
    AlertmanagerError,
    check_url,
    max_id_chars,
    parse_labels,
    post_alerts,
    post_each_refused_alone,
    readable_event,
    redacted,
    to_alert,
)
from stream_lstm.relay.catch_up import CatchUp
from stream_lstm.relay.metrics import RelayMetrics
from stream_lstm.relay.open_store import OpenAlertStore
from stream_lstm.signals import StopOnSignal

log = logging.getLogger("stream_lstm.relay")

RETRY_FIRST_S, RETRY_MAX_S = 1.0, 60.0
CHUNK = 100  # alerts a request at most: a proxy's body limit (nginx: 1 MiB) must not stall us
COMMIT_TIMEOUT_MS = 5_000  # a commit that cannot finish (the broker away) is tried next turn


class AlertRelay:
    """Posts the alerts topic's events to Alertmanager (see the module's docstring).

    Parameters
    ----------
    settings
        ``alerts_topic``, ``alertmanager_url``, the group (the relay's is ``<group_id>-alertmanager``)
        and the connection settings.
    post
        How a list of alerts is delivered (``post_alerts(url, alerts)``).
    clock
        Wall-clock seconds, for ``endsAt``.
    ticker
        Monotonic seconds, for the re-send and retry schedules (a wall clock stepped back must
        not hold the re-sends past Alertmanager's ``endsAt``).
    labels
        Labels every alert carries beside its own (``--label``; default ``DEFAULT_LABELS``).

    Example: see tests/relay/test_service.py::test_an_alert_opens_fires_again_after_a_restart_and_resolves
    """

    def __init__(self, settings: Settings, post: Callable[[str, list[dict[str, Any]]], None] = post_alerts,
                 clock: Callable[[], float] = time.time, ticker: Callable[[], float] = time.monotonic,
                 labels: dict[str, str] | None = None) -> None:
        if not settings.alerts_topic:
            raise SettingsError("STREAM_LSTM_ALERTS_TOPIC is empty: the worker writes no alert events to relay")
        if not settings.alertmanager_url:
            raise SettingsError("STREAM_LSTM_ALERTMANAGER_URL is empty: set it (or --url) to Alertmanager's address")
        try:
            self.url = check_url(settings.alertmanager_url)
        except ValueError as exc:
            raise SettingsError(str(exc)) from None
        self.settings = settings
        self.max_id_chars = max_id_chars(settings.max_device_id_length)  # (the worker's ids, whole)
        self.post, self.clock, self.ticker = post, clock, ticker
        self.labels = dict(DEFAULT_LABELS if labels is None else labels)
        self.group_id = f"{settings.group_id}-alertmanager"
        self.open_at_stop = 0  # the open alerts it held when it stopped, for its last line
        if problem := topic_problem(f"{self.group_id}-open-alerts"):  # (its store: open_store.py)
            raise SettingsError(f"STREAM_LSTM_GROUP_ID gives the relay's topic of open alerts {problem}")
        # Open alerts: id -> (partition, its open event).
        self.open: dict[str, tuple[int, dict[str, Any]]] = {}
        self.assigned: set[int] = set()
        self.unloaded: set[int] = set()  # assigned, paused until their open alerts are loaded
        # Events not yet accepted by Alertmanager, with their partition.
        self.waiting: list[tuple[int, dict[str, Any]]] = []
        self.read_to: dict[int, int] = {}  # per partition: the offset after the last event read
        self._committed: dict[int, int] = {}
        self._resend = False  # the open alerts are due to be sent again
        self._store_stuck = False  # its open-alert store could not be written: reading paused
        self._next_resend = ticker() + RESEND_S  # (what a start reads again is sent as read)
        self._retry_at, self._backoff = 0.0, RETRY_FIRST_S
        self._stop = threading.Event()
        self.group: GroupConsumer | None = None
        self.catch_up = CatchUp()  # partitions taken on whose open alerts wait
        self.store: OpenAlertStore | None = None
        self.metrics, self.health = RelayMetrics(), HealthState()
        # Not ready until Alertmanager has answered once (an empty post at the first turn), and
        # asked again every RESEND_S while nothing goes: a wrong URL or a rotated password was
        # found only when a real alert was held back.
        self.health.set_ready("alertmanager", False, "not contacted yet")
        self._next_probe = 0.0

    def stop(self) -> None:
        self._stop.set()

    @property
    def delivered(self) -> int:
        """Alerts Alertmanager accepted (the counter on ``/metrics``)."""
        return int(self.metrics.registry.get_sample_value("stream_lstm_alerts_relayed_total") or 0)

    def _on_assigned(self, partitions: set[int]) -> None:
        # Nothing of theirs is read before their open alerts are loaded (``_load``): a close
        # read again must come after the store's open, not before.
        self.assigned |= partitions
        self.unloaded |= partitions
        if self.group is not None:
            self.group.consumer.pause(*self._tps(partitions))

    def _tps(self, partitions: set[int]) -> list[TopicPartition]:
        return [TopicPartition(self.settings.alerts_topic, p) for p in partitions]

    def _position(self, partition: int) -> int | None:
        try:  # (not waiting: unknown until its committed offset is)
            return self.group.consumer.position(*self._tps({partition}), timeout_ms=0)  # type: ignore[union-attr]
        except Exception:  # noqa: BLE001 - not assigned any more, or no answer yet
            return None

    def _load(self) -> None:
        """Load the open alerts of the partitions assigned since; resume them. Tried again next
        turn if the store cannot be read (the partitions stay paused)."""
        try:
            found = self.store.load(self.unloaded, beat=self.health.beat)  # type: ignore[union-attr]
            ends = self.group.consumer.end_offsets(self._tps(self.unloaded), timeout_ms=10_000)  # type: ignore[union-attr]
        except Exception as exc:  # noqa: BLE001 - the broker away, or no read ACL: next turn
            log.warning("loading the relay's open alerts failed; will retry", extra={"error": repr(exc)[:200]})
            self.health.set_ready("open_alerts", False, f"cannot read {self.store.topic}: {repr(exc)[:200]}")  # type: ignore[union-attr]
            return
        self.health.set_ready("open_alerts", True)
        self.open.update(found)
        self._resend = self._resend or bool(found)  # (Alertmanager may have resolved them meanwhile)
        # (... once read up to these ends: catch_up.py)
        loaded = {p for p, _ in found.values()}
        self.catch_up.start({tp.partition: end for tp, end in ends.items() if tp.partition in loaded})
        self.metrics.open_alerts.set(len(self.open))
        if self._retry_at <= self.ticker():  # (else they resume with the next delivery)
            self.group.consumer.resume(*self._tps(self.unloaded))  # type: ignore[union-attr]
        log.info(f"relaying partitions {sorted(self.unloaded)} of {self.settings.alerts_topic}: "  # (said each time:
                 f"{len(found)} open alerts loaded", extra={"open": len(found)})  # an idle relay looked stuck)
        self.unloaded = set()

    def _on_revoked(self, partitions: set[int]) -> None:
        # Everything of theirs goes with them, undelivered events too: the next owner reads
        # them again from the committed offset, which is before the oldest of them. (Sent late
        # from here, an open could re-fire an alert the new owner has already resolved.)
        if partitions:
            log.info(f"partitions {sorted(partitions)} of {self.settings.alerts_topic} go to another relay")
        self.assigned -= partitions
        self.unloaded -= partitions
        self.catch_up.drop(partitions)
        if self.store is not None:
            self.store.drop(partitions)
        self.open = {k: v for k, v in self.open.items() if v[0] not in partitions}
        self.waiting = [(p, e) for p, e in self.waiting if p not in partitions]
        for p in partitions:
            self.read_to.pop(p, None)
            self._committed.pop(p, None)

    def connect(self) -> None:
        s = self.settings
        # The topic as the worker creates it (a relay that starts first must not subscribe to a
        # topic without partitions: kafka-python 3.0.12 then never assigned them).
        ensure_topics(s, [TopicSpec(s.alerts_topic, s.topic_partitions, {})])
        self.store = OpenAlertStore(s, f"{self.group_id}-open-alerts", s.alerts_topic)
        consumed = s.model_copy(update={"input_topic": s.alerts_topic, "group_id": self.group_id,
                                        "commit_interval_ms": 0})  # (a fetch answers at once)
        self.group = GroupConsumer(consumed, PartitionListener(self._on_assigned, self._on_revoked),
                                   client_id=f"stream-lstm-alert-relay-{s.instance_id}")
        endpoint = f"http://{s.metrics_host}:{s.metrics_port}/metrics" if s.metrics_port else "metrics off"
        log.info(f"alert relay started: {s.alerts_topic} at {s.bootstrap_servers} -> Alertmanager at "
                 f"{redacted(self.url)} (group {self.group_id}) | {endpoint}")

    def run(self, until: Callable[[AlertRelay], bool] | None = None) -> None:
        if self.group is None:
            self.connect()
        assert self.group is not None
        try:
            while not self._stop.is_set() and not (until is not None and until(self)):
                self.turn()
        finally:
            self.open_at_stop = len(self.open)  # (closing the group revokes: it empties ``open``)
            with kafka_closing():  # (kafka-python's close races its own reader thread; logs.py)
                self.group.close()
                if self.store is not None:
                    self.store.close()

    def turn(self) -> None:
        """One poll, then delivery (or a retry) and the commit it allows."""
        assert self.group is not None
        self.health.beat()
        for tp, records in self.group.poll(200).items():
            for rec in records:
                self._take(tp.partition, rec.offset, rec.value)
                self.read_to[tp.partition] = rec.offset + 1
        if self.catch_up.ends and (caught := self.catch_up.done(self._position)):
            self._resend = self._resend or any(p in caught for p, _ in self.open.values())
        self.group.check_membership(bool(self.assigned))  # (a consumer left outside its group)
        if self.unloaded:
            self._load()
        self.group.heartbeat.report(self.health)  # (/readyz says why)
        # (Not a settled member either: the heartbeat that first answers after an outage may
        # say the member is gone, and its partitions are reported lost only at the next poll.)
        if self.group.heartbeat.silent_for() is not None or not self.group.stable_member():
            # Cut off from its group for longer than the session: its partitions may be another
            # relay's by now, and an open sent from here could re-fire an alert that relay has
            # resolved. Nothing goes out until the group hears from it again (or kafka-python
            # reports the partitions lost); Alertmanager's own endsAt covers the gap.
            return
        tick = self.ticker()
        if tick >= self._next_resend and self.open:
            self._resend = True  # still firing: say so again, before Alertmanager's endsAt
            self._next_resend = tick + RESEND_S
        unheard = self.health.readiness()[1].get("alertmanager", "ok") != "ok" or tick >= self._next_probe
        if (self.waiting or self._resend or unheard) and tick >= self._retry_at and not self._deliver(tick):
            return  # (unheard with nothing to send: an empty post asks whether it answers again)
        if not (self.waiting or self._resend):
            self._commit()

    def _deliver(self, tick: float) -> bool:
        """Post what waits (and the open alerts, when due), in chunks; False to retry later."""
        consumer = self.group.consumer  # type: ignore[union-attr]
        now = self.clock()
        events = [e for _, e in self.waiting]
        read = {e["alert_id"] for e in events}  # (an open just read is not sent twice in one post)
        events += [e for p, e in self.open.values() if self._resend and e["alert_id"] not in read
                   and not self.catch_up.holds(p)]
        alerts = [to_alert(e, now, self.labels) for e in events]
        refused: set[str] = set()
        for i in range(0, len(alerts), CHUNK) or [0]:  # (nothing: an empty list, as a probe)
            chunk = alerts[i : i + CHUNK]
            try:
                refused |= self._post(chunk)
                self.health.beat()  # (a slow Alertmanager is not a stuck relay)
            except AlertmanagerError as exc:
                self.metrics.failures.inc()
                self.health.set_ready("alertmanager", False, str(exc)[:200])
                self._retry_at, self._backoff = tick + self._backoff, min(self._backoff * 2, RETRY_MAX_S)
                consumer.pause(*self._tps(self.assigned))
                log.warning("Alertmanager did not take the alerts; will retry", extra={
                    "error": str(exc)[:300], "alerts": len(alerts) - i, "retry_in_s": round(self._retry_at - tick, 1)})
                return False
        self.metrics.relayed.inc(len(alerts) - sum(a["labels"]["alert_id"] in refused for a in alerts))
        self.health.set_ready("alertmanager", True)
        self._next_probe = tick + RESEND_S
        for alert_id in refused & set(self.open):  # not re-sent (refused every minute, for ever),
            self.store.closed(self.open.pop(alert_id)[0], alert_id)  # type: ignore[union-attr]  # nor kept
        for p, e in self.waiting:
            if e["alert_id"] in refused and e["event"] == "open":  # (a close still goes to the store)
                continue
            if e["alert_id"] not in refused:
                log.info(f"relayed alert {e['event']}", extra={"alert_id": e["alert_id"], "device": e.get("device_id")})
            if e["event"] == "open":  # (written before the commit that passes the event)
                self.store.opened(p, e)  # type: ignore[union-attr]
            else:
                self.store.closed(p, str(e["alert_id"]))  # type: ignore[union-attr]
        self.metrics.open_alerts.set(len(self.open))
        self.waiting, self._resend, self._backoff = [], False, RETRY_FIRST_S
        if not self._store_stuck:  # (its open-alert store cannot be written: read no more)
            consumer.resume(*(set(consumer.paused()) - set(self._tps(self.unloaded))))
        return True

    def _post(self, chunk: list[dict[str, Any]]) -> set[str]:
        def refused(alert: dict[str, Any], why: AlertmanagerError) -> None:
            self.metrics.refused.inc()
            log.error("Alertmanager refused an alert; skipped", extra={"labels": alert["labels"], "error": str(why)[:300]})

        return post_each_refused_alone(self.post, self.url, chunk, refused)

    def _take(self, partition: int, offset: int, value: bytes | None) -> None:
        try:
            if len(value or b"") > MAX_EVENT_BYTES:
                raise ValueError(f"{len(value or b''):,} bytes, over {MAX_EVENT_BYTES:,}")
            event = readable_event(json.loads(value or b""), self.max_id_chars)
        except UNREADABLE as exc:
            log.error("skipping an alert event that cannot be read",
                      extra={"partition": partition, "offset": offset, "error": repr(exc)[:200]})
            return
        kind, alert_id = event["event"], event["alert_id"]
        if kind == "open":
            self.open[alert_id] = (partition, event)
        else:
            self.open.pop(alert_id, None)
        self.waiting.append((partition, event))
        self.metrics.open_alerts.set(len(self.open))

    def _commit(self) -> None:
        """Per held partition, past the last event read: once everything read is delivered and
        the store holds what it changed."""
        offsets = {}
        for p in self.assigned - self.unloaded:
            at = self.read_to.get(p)
            if at is not None and at != self._committed.get(p):
                offsets[TopicPartition(self.settings.alerts_topic, p)] = OffsetAndMetadata(at, "", -1)
        # (Its store's writes go even with no offset to pass: a refused open's deletion, say.)
        if (not offsets and not self.store.pending) or self.group.rebalancing():  # type: ignore[union-attr]
            return
        if not self.store.flush():  # type: ignore[union-attr]
            # Nothing past its alerts may be committed, so nothing more is read meanwhile (what
            # waits would grow for ever), and /readyz says why (a missing write ACL, say).
            self.health.set_ready("open_alerts", False, f"cannot write {self.store.topic}; "  # type: ignore[union-attr]
                                  "nothing read is committed, reading paused")
            self.group.consumer.pause(*self._tps(self.assigned))  # type: ignore[union-attr]
            self._store_stuck = True
            return
        if self._store_stuck:
            self._store_stuck = False
            self.health.set_ready("open_alerts", True)
            self.group.consumer.resume(*self._tps(self.assigned - self.unloaded))  # type: ignore[union-attr]
        if not offsets:
            return
        try:
            self.group.consumer.commit(offsets, timeout_ms=COMMIT_TIMEOUT_MS)  # type: ignore[union-attr]
        except Exception as exc:  # noqa: BLE001 - committed again next turn; a restart re-sends
            log.warning("committing the relay's offsets failed", extra={"error": repr(exc)[:200]})
            return
        self._committed.update({tp.partition: om.offset for tp, om in offsets.items()})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Post the alerts topic's events (STREAM_LSTM_ALERTS_TOPIC) to Prometheus' Alertmanager as "
        "alerts: firing when a device's alert opens, re-sent every minute while open, resolved "
        "when it closes. Labels: alertname=StreamLstmDeviceAnomaly, device_id, alert_id, and those "
        "of --label (default severity=warning). Reads in "
        "the consumer group <STREAM_LSTM_GROUP_ID>-alertmanager; run one or more.")
    parser.add_argument("--url", help="Alertmanager's base URL, e.g. http://alertmanager:9093 "
                        "(default: STREAM_LSTM_ALERTMANAGER_URL; user:password@ in it is sent as basic auth)")
    parser.add_argument("--label", action="append", default=[], metavar="NAME=VALUE",
                        help="a label every alert carries, for Alertmanager's routing (repeat for "
                        "more; default severity=warning, as the service's own rules; e.g. --label "
                        "severity=critical --label team=sensors)")


def main(args: argparse.Namespace) -> int:
    from stream_lstm.config import load_settings
    from stream_lstm.environment import warn_unknown_variables
    from stream_lstm.logs import configure_logging

    overrides = {"alertmanager_url": args.url} if getattr(args, "url", None) else {}
    settings = load_settings(**overrides)
    configure_logging(settings.log_level)
    warn_unknown_variables(log)
    try:
        labels = parse_labels(getattr(args, "label", None) or [])
    except ValueError as exc:
        raise SettingsError(str(exc)) from None
    relay = AlertRelay(settings, labels=labels)
    server = (serve_metrics(relay.metrics, relay.health, settings.metrics_host, settings.metrics_port)  # type: ignore[arg-type]
              if settings.metrics_port else None)  # /healthz beats each turn: a stuck relay is restarted
    guard = StopOnSignal(relay.stop)
    try:
        relay.connect()
        guard.connected()
        relay.run()
    finally:
        guard.restore()
        if server is not None:
            server.shutdown()
    log.info("alert relay stopped", extra={"delivered": relay.delivered, "open": relay.open_at_stop})
    return 0
