"""``stream-lstm alert-relay`` against the real broker and an Alertmanager stand-in."""

import json
import time

import pytest

from stream_lstm.config import SettingsError
from stream_lstm.kafka.clients import make_producer
from stream_lstm.kafka.topics import TopicSpec, ensure_topics
from stream_lstm.relay import service
from stream_lstm.relay.alertmanager import RESEND_S
from stream_lstm.relay.service import AlertRelay
from tests.relay.alertmanager_stub import AlertmanagerStub

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(300)]

T0 = 1_700_000_000.0


def event(kind, device, start, ts):
    return {"event": kind, "alert_id": f"{device}@{int(start * 1000)}", "device_id": device,
            "start_ts": start, "ts": ts, "peak_likelihood": 0.999999, "peak_ts": start, "value": 9.0,
            "expected_low": 1.0, "expected_high": 2.0, "last_above_ts": start, "model_version": "v1",
            "partition": 0, "offset": 0, **({"reason": "recovered"} if kind == "close" else {})}


def send(s, *events):
    producer = make_producer(s)
    for e in events:
        producer.send(s.alerts_topic, json.dumps(e).encode(), key=e["device_id"].encode())
    producer.flush()
    producer.close()


@pytest.fixture
def stub():
    am = AlertmanagerStub()
    yield am
    am.close()


@pytest.fixture
def relay_settings(settings_factory, topic_name, stub):
    s = settings_factory(alerts_topic=f"{topic_name}-alerts", group_id=f"{topic_name}-g",
                         alertmanager_url=stub.url)
    ensure_topics(s, [TopicSpec(s.alerts_topic, 2)])
    return s


def run_until(relay, check, timeout_s=60.0):
    deadline = time.monotonic() + timeout_s
    relay.run(until=lambda r: check() or time.monotonic() > deadline)
    assert check(), "timed out"


def test_an_alert_opens_fires_again_after_a_restart_and_resolves(relay_settings, stub, caplog):
    s = relay_settings
    caplog.set_level("INFO", logger="stream_lstm.relay")
    send(s, event("open", "pump-1", T0, T0), event("open", "pump-2", T0 + 60, T0 + 60),
         event("close", "pump-2", T0 + 60, T0 + 4000))
    run_until(AlertRelay(s), lambda: len(stub.alerts()) >= 3)
    by_device = {}
    for a in stub.alerts():
        by_device.setdefault(a["labels"]["device_id"], []).append(a)
    assert by_device["pump-1"][0]["labels"]["alert_id"] == f"pump-1@{int(T0 * 1000)}"
    assert by_device["pump-1"][0]["endsAt"] > time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())  # firing
    assert by_device["pump-2"][-1]["endsAt"] < "2024"  # resolved at its close
    # A restarted relay (same group) has pump-1's alert open again, from the events it reads
    # again: Alertmanager hears that it still fires, with no new event.
    stub.received.clear()
    caplog.clear()
    run_until(AlertRelay(s), lambda: any(a["labels"]["device_id"] == "pump-1" for a in stub.alerts()))
    # (what it took over, said: a relay with nothing to send looked stuck)
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("relaying partitions")]
    assert said and sum(int(m.split(": ")[-1].split()[0]) for m in said) == 1  # pump-1's, loaded
    # Then it closes; a relay after that has nothing left to say.
    send(s, event("close", "pump-1", T0, T0 + 7200))
    stub.received.clear()
    run_until(AlertRelay(s), lambda: any(a["endsAt"] < "2024" and a["labels"]["device_id"] == "pump-1"
                                         for a in stub.alerts()))
    stub.received.clear()
    quiet = AlertRelay(s)
    turns = []
    quiet.run(until=lambda r: len(turns) > 20 and r.assigned or turns.append(1) and False)
    assert stub.alerts() == [] and quiet.open == {}


def committed(s, group_id, partitions):
    from kafka.structs import TopicPartition

    from stream_lstm.kafka.clients import make_consumer

    consumer = make_consumer(s, group_id=group_id, enable_auto_commit=False)
    try:
        return {p: consumer.committed(TopicPartition(s.alerts_topic, p)) for p in partitions}
    finally:
        consumer.close()


def test_an_alert_open_longer_than_the_topics_retention_still_fires_after_a_restart(relay_settings, stub):
    """Its open event deleted from the alerts topic (as retention would), the alert is kept."""
    from kafka.structs import TopicPartition

    from stream_lstm.kafka.clients import make_admin

    s = relay_settings
    send(s, event("open", "pump-9", T0, T0), event("open", "pump-10", T0, T0),
         event("close", "pump-10", T0, T0 + 60))
    first = AlertRelay(s)
    seen = []  # (the revocation when it stops clears what it holds)
    run_until(first, lambda: seen or (len(stub.alerts()) >= 3 and sum(first._committed.values()) == 3
                                      and not seen.append(1)))
    # Committed past everything delivered, the open alert's event included (not held at it).
    ends = {p: off for p, off in committed(s, first.group_id, [0, 1]).items() if off}
    assert sum(ends.values()) == 3
    admin = make_admin(s)
    admin.delete_records({TopicPartition(s.alerts_topic, p): off for p, off in ends.items()})
    admin.close()
    stub.received.clear()
    restarted = AlertRelay(s)
    run_until(restarted, lambda: any(a["labels"]["device_id"] == "pump-9" for a in stub.alerts()))
    assert [a["labels"]["device_id"] for a in stub.alerts()] == ["pump-9"]  # pump-10 stayed closed
    assert stub.alerts()[0]["endsAt"] > time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())  # firing
    # It closes; the relay after that holds nothing open.
    send(s, event("close", "pump-9", T0, T0 + 7200))
    run_until(AlertRelay(s), lambda: any(a["endsAt"] < "2024" for a in stub.alerts()))
    quiet, turns = AlertRelay(s), []
    quiet.run(until=lambda r: len(turns) > 20 and r.assigned and not r.unloaded or turns.append(1) and False)
    assert quiet.open == {}


def test_alertmanager_down_holds_the_events_and_they_go_when_it_answers(relay_settings, stub, monkeypatch):
    monkeypatch.setattr(service, "RETRY_FIRST_S", 0.2)
    s = relay_settings
    stub.fail = 10**6  # down
    send(s, event("open", "pump-3", T0, T0), event("open", "pump-5", T0, T0), event("close", "pump-5", T0, T0 + 60))
    down, held = AlertRelay(s), []

    def refused_twice() -> bool:  # two attempts refused: it holds the events, and retries
        held.append(len(down.waiting))
        return stub.fail < 10**6 - 2

    run_until(down, refused_twice)
    # (It asks Alertmanager before it reads: the events wait unread, or read and held.)
    assert stub.alerts() == [] and max(held) in (0, 3) and down._committed == {}, held
    # Said on its endpoint: not ready, why, and the failures counted; alive all the while.
    ready, parts = down.health.readiness()
    assert not ready and "503" in parts["alertmanager"] and down.health.liveness()[0]
    assert down.metrics.failures._value.get() >= 2 and down.metrics.relayed._value.get() == 0
    # Stopped while Alertmanager is down: nothing was committed past the undelivered events, so
    # the next relay delivers them all, the closed alert included.
    stub.fail = 0
    up = AlertRelay(s)
    run_until(up, lambda: len(stub.alerts()) >= 3)
    assert sorted(a["labels"]["device_id"] for a in stub.alerts()) == ["pump-3", "pump-5", "pump-5"]
    assert up.health.readiness()[0] and up.metrics.relayed._value.get() == 3
    assert up.metrics.open_alerts._value.get() == 1  # pump-3


def test_a_revoked_partitions_events_go_with_it_and_bad_events_are_skipped(relay_settings, stub):
    """Sent late from the old owner, an open could re-fire an alert the new owner resolved."""
    relay = AlertRelay(relay_settings)
    relay._on_assigned({0, 1})
    relay._take(0, 10, json.dumps(event("open", "pump-6", T0, T0)).encode())
    relay._take(1, 11, json.dumps(event("open", "pump-7", T0, T0)).encode())
    for bad in (b"not json", json.dumps(event("opened", "x", T0, T0)).encode(),
                json.dumps(event("open", "y", T0, T0)).replace(str(T0), "Infinity", 1).encode(),
                b"[" * 100_000,  # (nested past json's depth: a RecursionError got through)
                # Each stopped the relay at every start: an id hashed later, an id that no
                # store record can carry, an event larger than the store's records may be.
                json.dumps(event("open", "y", T0, T0) | {"alert_id": ["x"]}).encode(),
                json.dumps(event("open", "y", T0, T0) | {"alert_id": "y\ud800"}).encode(),
                json.dumps(event("open", "y" * 400_000, T0, T0)).encode()):
        relay._take(0, 12, bad)  # logged and skipped: never a crash loop on one record
    relay._on_revoked({0})
    assert [e["device_id"] for _, e in relay.waiting] == ["pump-7"] and list(relay.open) == [f"pump-7@{int(T0 * 1000)}"]


def test_an_alert_alertmanager_refuses_is_skipped_alone(relay_settings, stub):
    s = relay_settings
    stub.refuse = {"pump-bad"}
    send(s, event("open", "pump-bad", T0, T0), event("open", "pump-8", T0, T0))
    relay, held = AlertRelay(s), []
    run_until(relay, lambda: any(a["labels"]["device_id"] == "pump-8" for a in stub.alerts())
              and not held.append(list(relay.open)))
    assert [a["labels"]["device_id"] for a in stub.alerts()] == ["pump-8"]
    # Neither re-sent every minute (refused again, for ever) nor counted as relayed.
    assert held[0] == [f"pump-8@{int(T0 * 1000)}"]  # (while it ran)
    assert relay.metrics.relayed._value.get() == 1 and relay.metrics.refused._value.get() == 1


def test_it_is_ready_only_once_alertmanager_has_answered(relay_settings, stub):
    """With a wrong URL or password it said ready until the first real alert was held back."""
    stub.status_for_all = 401  # a rotated password
    relay, said = AlertRelay(relay_settings), []
    assert relay.health.readiness() == (False, {"alertmanager": "not contacted yet"})

    def refused_then_answered() -> bool:
        if not said and relay.metrics.failures._value.get() >= 1:
            said.append(relay.health.readiness())
            stub.status_for_all = None  # the password mended
        return bool(said) and relay.health.readiness()[0]

    run_until(relay, refused_then_answered, timeout_s=90)  # (a retry after the backoff)
    assert not said[0][0] and "401" in said[0][1]["alertmanager"]
    assert stub.received[-1] == []  # asked with an empty list: nothing was waiting


def test_open_alerts_are_sent_again_before_alertmanager_would_resolve_them(relay_settings, stub):
    s = relay_settings
    send(s, event("open", "pump-4", T0, T0))
    now = [T0 + 10_000]

    def a_minute_after_the_first():
        if len(stub.alerts()) == 1 and now[0] == T0 + 10_000:
            now[0] += RESEND_S + 1  # the relay's clock moves on; no new event arrives
        return len(stub.alerts()) >= 2

    run_until(AlertRelay(s, clock=lambda: now[0], ticker=lambda: now[0]), a_minute_after_the_first)
    first, again = stub.alerts()
    assert first["labels"] == again["labels"] and again["endsAt"] > first["endsAt"]


def test_it_refuses_to_start_without_a_topic_or_an_address(settings_factory):
    with pytest.raises(SettingsError, match="ALERTS_TOPIC"):
        AlertRelay(settings_factory(alertmanager_url="http://am:9093"))
    with pytest.raises(SettingsError, match="ALERTMANAGER_URL"):
        AlertRelay(settings_factory(alerts_topic="a"))
    with pytest.raises(SettingsError, match="http"):
        AlertRelay(settings_factory(alerts_topic="a", alertmanager_url="am:9093"))
    # A group id the worker takes (its changelog's name fits) but the relay's store would not:
    # the broker's refusal was a traceback at connect, and a restart for ever.
    long_group = "g" * 230  # (its changelog: 246 characters of 249)
    with pytest.raises(SettingsError, match=r"STREAM_LSTM_GROUP_ID gives the relay's topic of open "
                                            r"alerts 'g{230}-alertmanager-open-alerts' is not a Kafka topic name"):
        AlertRelay(settings_factory(alerts_topic="a", alertmanager_url="http://am:9093", group_id=long_group))


def test_the_command_serves_its_health_and_stops_on_sigterm(relay_settings, stub, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import urllib.request

    from stream_lstm.kafka.local_broker import free_port
    from tests.integration.workers import settings_env

    port, log = free_port(), tmp_path / "relay.log"
    env = settings_env(relay_settings, STREAM_LSTM_METRICS_PORT=str(port))
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "stream_lstm.cli", "alert-relay"], env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and "alert relay started" not in log.read_text():
            assert proc.poll() is None, log.read_text()[-2000:]
            time.sleep(0.2)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            assert "stream_lstm_alerts_relayed_total" in r.read().decode()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            assert r.status == 200
    finally:
        os.kill(proc.pid, signal.SIGTERM)  # (connected: the loop ends, the group is left)
        proc.wait(timeout=60)
    text = log.read_text()
    assert proc.returncode == 0, text[-2000:]
    assert "Traceback" not in text and "alert relay stopped" in text


def test_alerts_carry_the_labels_it_is_given_for_routing(relay_settings, stub):
    s = relay_settings
    send(s, event("open", "pump-11", T0, T0))
    relay = AlertRelay(s, labels=service.parse_labels(["severity=critical", "team=sensors"]))
    run_until(relay, lambda: len(stub.alerts()) >= 1)
    assert relay.open_at_stop == 1 and relay.open == {}  # (its last line said "open": 0: counted after the close)
    (alert,) = stub.alerts()
    assert alert["labels"] == {"alertname": "StreamLstmDeviceAnomaly", "device_id": "pump-11",
                               "alert_id": f"pump-11@{int(T0 * 1000)}", "severity": "critical",
                               "team": "sensors"}


def test_a_bad_label_is_one_line_and_exit_2(monkeypatch, capsys):
    from stream_lstm.cli import main

    monkeypatch.setenv("STREAM_LSTM_ALERTS_TOPIC", "a")
    monkeypatch.setenv("STREAM_LSTM_ALERTMANAGER_URL", "http://am:9093")
    assert main(["alert-relay", "--label", "no-equals-sign"]) == 2
    err = capsys.readouterr().err
    assert "--label 'no-equals-sign'" in err and "Traceback" not in err


def test_partitions_paused_for_a_down_alertmanager_resume_when_it_answers_with_nothing_left_to_send(
        relay_settings, stub, monkeypatch):
    """Its waiting events went with a revocation: an empty post asks whether Alertmanager is back."""
    monkeypatch.setattr(service, "RETRY_FIRST_S", 0.2)
    s = relay_settings
    relay, phase = AlertRelay(s), []

    def steps():
        if not phase and relay.health.readiness()[0] and relay.assigned:  # Alertmanager answered
            stub.fail = 10**6  # then goes down, with an event to deliver
            send(s, event("close", "pump-12", T0, T0))
            phase.append("down")
        if phase == ["down"] and relay.metrics.failures._value.get() >= 1:  # its event waiting
            assert relay.waiting and relay.group.consumer.paused()
            relay._on_revoked(set(relay.assigned))  # (a rebalance takes the event's partition)
            stub.fail = 0
            phase.append("revoked")
        if phase[-1:] == ["revoked"] and relay.health.readiness()[0] and not relay.group.consumer.paused():
            phase.append("resumed")
        return phase == ["down", "revoked", "resumed"]

    run_until(relay, steps)
    assert stub.received[-1] == []  # what asked: an empty list of alerts


def test_an_open_alert_store_it_cannot_read_is_said_on_readyz(relay_settings, stub):
    relay = AlertRelay(relay_settings)
    relay.connect()
    relay.store.topic = "not a valid topic name!"  # (as a missing read ACL would)
    turns = []
    relay.run(until=lambda r: len(turns) > 3 and r.assigned or turns.append(1) and False)
    ready, parts = relay.health.readiness()
    assert not ready and "cannot read" in parts["open_alerts"]


def test_an_open_alert_store_it_cannot_write_pauses_reading_and_is_said_on_readyz(relay_settings, stub):
    """It kept reading, committed nothing and said nothing (a missing write ACL on the store
    topic): what waited to be written grew for ever, and /readyz stayed ok."""
    relay = AlertRelay(relay_settings)
    relay.connect()
    writes = relay.store.flush
    relay.store.flush = lambda: False  # the store topic refuses every write
    send(relay_settings, event("open", "pump-1", 1e9, 1e9))
    seen = {}

    def stuck_then_writable(r) -> bool:
        parts = r.health.readiness()[1]
        if "stuck" not in seen:
            if "cannot write" in parts.get("open_alerts", ""):
                seen["stuck"] = (bool(r.group.consumer.paused()), dict(r._committed))
                r.store.flush = writes  # writable again
            return False
        seen["after"] = (bool(r._committed), parts.get("open_alerts"), bool(r.group.consumer.paused()))
        return seen["after"] == (True, "ok", False)

    deadline = time.monotonic() + 60
    relay.run(until=lambda r: stuck_then_writable(r) or time.monotonic() > deadline)
    assert seen["stuck"] == (True, {})  # paused, nothing committed, while it could not write
    assert seen["after"] == (True, "ok", False)  # then committed, ready and reading again


def test_a_relay_cut_off_from_its_group_sends_nothing_until_it_is_heard_again(relay_settings, stub):
    """Its group heartbeat silent past the session timeout (the brokers unreachable, Alertmanager
    not): its partitions may be another relay's, which may have resolved the alert meanwhile, so
    the minute's re-send of the open alert waits, and /readyz says why; heard again, it goes."""
    s = relay_settings
    send(s, event("open", "pump-6", T0, T0))
    now, silent = [T0 + 10_000], [None]
    relay = AlertRelay(s, clock=lambda: now[0], ticker=lambda: now[0])
    relay.connect()
    relay.group.heartbeat.silent_for = lambda: silent[0]  # what the consumer's metrics would say
    member, stable = relay.group.stable_member, [True]
    relay.group.stable_member = lambda: stable[0] and member()
    seen = {}

    def cut_off_then_heard(r) -> bool:
        if len(stub.alerts()) == 1 and "cut" not in seen:
            silent[0] = 45.0  # no heartbeat for 45 s
            now[0] += RESEND_S + 1  # a re-send is due
            seen["cut"] = 0
        elif "cut" in seen and "heard" not in seen:
            seen["cut"] += 1
            if seen["cut"] == 20:  # twenty turns cut off
                seen["during"] = (len(stub.alerts()), r.health.readiness())
                # A heartbeat went out, but its answer may yet say the member is gone.
                silent[0], stable[0] = None, False
            elif seen["cut"] == 40:  # twenty more: heard, not yet a settled member again
                seen["unsettled"] = len(stub.alerts())
                stable[0], seen["heard"] = True, True
        return len(stub.alerts()) >= 2

    run_until(relay, lambda: cut_off_then_heard(relay))
    sent, (ready, parts) = seen["during"]
    assert sent == 1 and not ready and parts["broker"].startswith("no consumer-group heartbeat"), seen
    assert seen["unsettled"] == 1, seen
    first, again = stub.alerts()
    assert first["labels"] == again["labels"]  # the re-send, once heard again
    assert relay.health.readiness()[0]


def test_the_longest_ids_the_worker_may_write_are_taken(relay_settings):
    """Its id limit must follow STREAM_LSTM_MAX_DEVICE_ID_LENGTH: a worker allowed longer device
    ids would have written alerts the relay skipped as unreadable."""
    long_ids = relay_settings.model_copy(update={"max_device_id_length": 4000})
    device = "d" * 4000
    for s, taken in ((relay_settings, False), (long_ids, True)):
        relay = AlertRelay(s)
        relay._take(0, 1, json.dumps(event("open", device, T0, T0)).encode())
        assert bool(relay.waiting) is taken


def test_a_relay_taking_partitions_on_does_not_refire_an_alert_closed_meanwhile(relay_settings, stub):
    """A restarted relay sent its store's open alerts at once, before reading the close written
    while it was down: Alertmanager had an alert that was over firing again until the close was
    read (a review). Now they go once the relay has read what its partitions held then."""
    s = relay_settings
    send(s, event("open", "pump-1", T0, T0), event("open", "pump-2", T0, T0))
    first = AlertRelay(s)
    run_until(first, lambda: len(stub.alerts()) >= 2
              and sum(o or 0 for o in committed(s, first.group_id, [0, 1]).values()) == 2)
    send(s, event("close", "pump-1", T0, T0 + 600))  # while no relay runs
    stub.received.clear()
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    second = AlertRelay(s)
    run_until(second, lambda: {(a["labels"]["device_id"], a["endsAt"] > now) for a in stub.alerts()}
              >= {("pump-1", False), ("pump-2", True)})  # pump-2 still fires; pump-1 resolved
    assert not [a for a in stub.alerts() if a["labels"]["device_id"] == "pump-1" and a["endsAt"] > now]
    assert second.open_at_stop == 1  # pump-2 (closing the group empties what it holds)
