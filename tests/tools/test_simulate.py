"""`stream-lstm simulate`: fleet into a real broker, rate limiting, progress, clean stop."""

import argparse
import io
import json
import os
import signal
import threading
import time
from collections import defaultdict

import pytest

from stream_lstm.tools import simulate
from stream_lstm.tools.fleet import Fleet
from stream_lstm.tools.simulate import ProgressLine, produce_fleet

from ..integration.helpers import read_topic

START = 1_700_000_000.0


def consume(settings, topic: str, expect: int) -> list:
    """Every record of ``topic``, waiting briefly past ``expect`` to catch any duplicate."""
    return read_topic(settings, topic, expect=expect, timeout_s=30)


def test_progress_line_redraws_in_place_on_a_terminal():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    out = Tty()
    bar = ProgressLine("simulate", total=10, stream=out)
    bar.update(5, force=True)
    bar.finish(10)
    text = out.getvalue()
    assert text.startswith("\rsimulate: 5/10 sent") and "\rsimulate: 10/10 sent" in text
    assert text.endswith("\n") and text.count("\n") == 1


def test_progress_line_writes_plain_lines_elsewhere_and_nothing_when_disabled():
    out = io.StringIO()
    bar = ProgressLine("replay", stream=out, log_interval_s=3600)
    bar.update(1)                      # within the interval: nothing
    bar.finish(3)
    assert out.getvalue().startswith("replay: 3 sent,") and "\r" not in out.getvalue()
    quiet = io.StringIO()
    ProgressLine("x", enabled=False, stream=quiet).finish(3)
    assert quiet.getvalue() == ""


@pytest.mark.kafka
@pytest.mark.timeout(180)
def test_fleet_round_trip_keys_and_per_device_order(settings_factory, topic_name):
    settings = settings_factory()
    fleet = Fleet(20, seed=7, start_ts=START, gap_prob=0.01)
    assert produce_fleet(settings, fleet, rate=None, total=2000, topic=topic_name, progress=False) == 2000
    records = consume(settings, topic_name, 2000)
    assert len(records) == 2000
    by_device = defaultdict(list)
    for r in sorted(records, key=lambda r: (r.partition, r.offset)):
        body = json.loads(r.value)
        assert r.key == body["device_id"].encode()
        by_device[body["device_id"]].append(body["ts"])
    assert len(by_device) == 20
    for ts in by_device.values():      # one device stays in one partition, in order
        assert all(b > a for a, b in zip(ts, ts[1:], strict=False))
    expected = list(Fleet(20, seed=7, start_ts=START, gap_prob=0.01).readings(200))[:2000]
    assert sorted((d, t) for d, t, _ in expected) == sorted(
        (json.loads(r.value)["device_id"], json.loads(r.value)["ts"]) for r in records)


@pytest.mark.kafka
@pytest.mark.timeout(180)
def test_rate_limit_spreads_300_readings_over_about_a_second(settings_factory, topic_name):
    settings = settings_factory()
    fleet = Fleet(10, seed=1, start_ts=START)
    sent = produce_fleet(settings, fleet, rate=300.0, total=300, topic=topic_name, progress=False)
    assert sent == 300
    # When each was sent: the records' create times (the producer's clock at send), so that
    # flushing and closing do not count. Reading 299 is due 299/300 s after the start; the
    # first send waits for the topic's metadata and the pacer catches up on that wait (the
    # rate holds on average), so the first readings may go out faster. A sender that did not
    # pace would put all of them within a few ms. (A busy machine sends late, never early:
    # the upper bounds are generous.)
    sent_at = sorted(r.timestamp for r in consume(settings, topic_name, 300))
    spread_s = (sent_at[-1] - sent_at[0]) / 1000
    assert 0.6 <= spread_s < 2.5, f"300 readings at 300/s were sent over {spread_s:.3f} s"
    second_half_s = (sent_at[-1] - sent_at[150]) / 1000  # caught up by then: at the rate
    assert 0.45 <= second_half_s < 1.5, f"the last 150 were sent over {second_half_s:.3f} s"


@pytest.mark.kafka
@pytest.mark.timeout(180)
def test_sigint_stops_an_open_ended_run_after_flushing(settings_factory, topic_name):
    settings = settings_factory()
    before = signal.getsignal(signal.SIGINT)  # not always the default: a background job ignores it
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        sent = produce_fleet(settings, Fleet(5, seed=2, start_ts=START), rate=100.0,
                             topic=topic_name, progress=False)
    finally:
        timer.cancel()
    assert 30 <= sent <= 200
    assert signal.getsignal(signal.SIGINT) is before  # handler restored
    assert len(consume(settings, topic_name, sent)) == sent


@pytest.mark.kafka
@pytest.mark.timeout(180)
def test_cli_sends_current_event_times_and_prints_a_summary(bootstrap, settings_factory, topic_name,
                                                            monkeypatch, capsys):
    monkeypatch.setenv("STREAM_LSTM_BOOTSTRAP_SERVERS", bootstrap)
    parser = argparse.ArgumentParser()
    simulate.add_arguments(parser)
    args = parser.parse_args(["--devices", "5", "--messages", "50", "--as-fast-as-possible",
                              "--topic", topic_name, "--seed", "3", "--no-progress"])
    assert simulate.main(args) == 0
    err = capsys.readouterr().err
    assert "simulate: sent 50 readings from 5 devices" in err
    records = consume(settings_factory(), topic_name, 50)
    assert len(records) == 50
    newest = max(json.loads(r.value)["ts"] for r in records)
    # The run ends about now: not in the future (the worker would dead-letter it), not stale.
    assert time.time() - 3600 < newest <= time.time()


def test_as_fast_as_possible_sends_nothing_ahead_of_the_start(bootstrap, settings_factory, topic_name,
                                                              monkeypatch, capsys):
    """Devices miss readings in their gaps, so a --messages run took more steps than planned
    and its last readings lay ahead of now: each was held until its time (6,000 readings of
    40 devices took 436 s "as fast as possible")."""
    monkeypatch.setenv("STREAM_LSTM_BOOTSTRAP_SERVERS", bootstrap)
    parser = argparse.ArgumentParser()
    simulate.add_arguments(parser)
    args = parser.parse_args(["--devices", "40", "--messages", "6000", "--as-fast-as-possible",
                              "--topic", topic_name, "--seed", "0", "--no-progress"])
    started = time.time()
    assert simulate.main(args) == 0
    assert "gaps" in capsys.readouterr().err
    records = consume(settings_factory(), topic_name, 6000)
    assert len(records) == 6000
    assert max(json.loads(r.value)["ts"] for r in records) <= started


def test_cli_rejects_bad_arguments(capsys):
    parser = argparse.ArgumentParser()
    simulate.add_arguments(parser)
    for bad in (["--devices", "0"], ["--duration", "-1"], ["--features", "0"], ["--drift", "-1"]):
        # (--duration -1 sent nothing and exited 0; --features 0 became the setting's; --drift
        # -1 was numpy's "ValueError: scale < 0")
        assert simulate.main(parser.parse_args(bad)) == 2, bad
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and ("must be positive" in err or "must be 0 or more" in err), err
    with pytest.raises(SystemExit):
        parser.parse_args(["--messages", "5", "--duration", "2"])
    for bad in (["--duration", "nan"], ["--step-s", "inf"], ["--drift", "nan"], ["--rate=-inf"]):
        # (--duration nan was a traceback; --step-s nan sent readings timed NaN, exit 0)
        with pytest.raises(SystemExit):
            parser.parse_args(bad)
        assert "is not a finite number" in capsys.readouterr().err


@pytest.mark.kafka
@pytest.mark.timeout(240)
def test_a_broker_gone_mid_run_ends_the_send_in_bounded_time_counting_only_what_it_acknowledged(
        monkeypatch, capsys, tmp_path):
    """The broker stopped after 40 readings: the flush waited for ever and a first Ctrl-C did
    nothing (a review). Now the readings the broker never acknowledged are said, not counted,
    and the send ends FLUSH_WAIT_S after the last."""
    from stream_lstm.config import Settings
    from stream_lstm.kafka.local_broker import LocalBroker, free_port

    monkeypatch.setattr(simulate, "FLUSH_WAIT_S", 3.0)
    broker = LocalBroker(port=free_port(), data_dir=tmp_path / "broker")
    broker.start()
    try:
        settings = Settings(bootstrap_servers=broker.bootstrap)
        simulate.ensure_topic(settings, "gone")

        def readings():
            for i in range(80):
                if i == 40:
                    time.sleep(3.0)  # (the first 40 acknowledged: a few ms, on an idle machine)
                    broker.stop()
                yield f"d{i % 4}", START + i, (float(i),)

        t0 = time.monotonic()
        acked = simulate.send_readings(settings, readings(), topic="gone", progress=False, label="replay")
        took = time.monotonic() - t0
    finally:
        broker.stop()
    assert acked == 40 and took < 60
    assert "readings sent were not acknowledged by the broker" in capsys.readouterr().err
