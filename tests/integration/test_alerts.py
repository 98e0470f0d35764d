"""Anomaly scores and the alerts topic, through the real broker and worker.

A spike is flagged by the one-step score, every flagged reading has exactly one alert, and the
drift score (each reading against the forecast made H readings earlier) is what the
forecasts topic itself implies, across a worker restart: the ring of H-step forecasts moves
with the device's state.
"""

import json
import math

import numpy as np
import pytest
import torch

from stream_lstm.forecast import interval_quantile
from stream_lstm.models.serving import fresh_model
from stream_lstm.worker import Worker

from .helpers import produce_readings, read_topic, served_forecasts

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(300)]

T0 = 1_700_000_000.0
H = 4
SPIKE_AT = 150


def fleet(start: int, stop: int):
    rng = np.random.default_rng(start)
    for k in range(start, stop):
        for dev in ("calm", "spike", "shift"):
            value = 20.0 + math.sin(k / 5.0) + 0.05 * rng.standard_normal()
            if dev == "spike" and k == SPIKE_AT:
                value += 60.0
            if dev == "shift" and k >= 160:
                value += 2.0 * (k - 160)  # a sustained departure, each step a small surprise
            yield dev, T0 + 60.0 * k, value


def test_spikes_alert_once_and_drift_score_survives_restart(settings_factory, topic_name):
    s = settings_factory(input_topic=topic_name, output_topic=f"{topic_name}-out",
                         dlq_topic=f"{topic_name}-dlq", alerts_topic=f"{topic_name}-alerts",
                         group_id=f"{topic_name}-g", min_history=1, horizon=H,
                         anomaly_warmup=5)
    torch.manual_seed(0)  # an untrained model, but the same one every run
    served = fresh_model(s)
    produce_readings(s, topic_name, fleet(0, 120))
    first = Worker(s, served).run(until=lambda w: w.totals.consumed >= 360)
    assert first.consumed == 360
    produce_readings(s, topic_name, fleet(120, 200))
    second = Worker(s, served).run(until=lambda w: w.totals.consumed >= 240)  # restored state
    assert second.consumed == 240

    fcs = [json.loads(r.value) for r in read_topic(s, s.output_topic, expect=600)]
    assert len(fcs) == 600
    by_dev: dict[str, list[dict]] = {}
    for f in fcs:
        by_dev.setdefault(f["device_id"], []).append(f)
    q = interval_quantile(s.interval_coverage)
    for dev, recs in by_dev.items():
        recs.sort(key=lambda f: f["ts"])
        for i, f in enumerate(recs):
            since_reset = i + 1
            if since_reset <= H + s.anomaly_warmup:  # compared with a forecast past the warm-up
                assert f["drift_score"] is None, (dev, i)
                continue
            made = recs[i - H]  # the forecast made H readings earlier, read from the topic
            b = (made["upper"][H - 1] - made["lower"][H - 1]) / (2 * q)
            expected = abs(f["value"] - made["forecast"][H - 1]) / b
            # the ring is float32: about 1e-7 of the level, relative to b
            assert f["drift_score"] == pytest.approx(expected, rel=1e-4, abs=1e-3), (dev, i)

    # The blend, the calibration and the experts carried on across the restart: an uninterrupted run of
    # the documented recursions over each device's whole history gives what was published.
    for dev, recs in by_dev.items():
        x = np.array([f["value"] for f in recs])
        forecast, b, _ = served_forecasts(served.model, x, s)
        np.testing.assert_allclose([f["forecast"] for f in recs], forecast, rtol=1e-5, err_msg=dev)
        width = np.array([np.subtract(f["upper"], f["lower"]) for f in recs])
        np.testing.assert_allclose(width, 2 * q * b, rtol=1e-4, err_msg=dev)

    spike = next(f for f in by_dev["spike"] if f["ts"] == T0 + 60.0 * SPIKE_AT)
    assert spike["is_anomaly"] and spike["anomaly_score"] >= 7.0
    assert spike["anomaly_likelihood"] >= 1 - s.anomaly_false_alarm_rate
    # The sustained shift is flagged by the drift score before the one-step score sees it.
    shift = [f for f in by_dev["shift"] if f["ts"] >= T0 + 60.0 * 160]
    first_drift = next(i for i, f in enumerate(shift) if f["drift_score"] >= 7.0)
    assert all(f["anomaly_score"] < 7.0 for f in shift[: first_drift + 1])
    # The flag is the likelihood's: published in [0, 1] once a device has its own history.
    for f in fcs:
        lik = f["anomaly_likelihood"]
        assert (lik is None and not f["is_anomaly"]) or (
            0.0 <= lik <= 1.0 and f["is_anomaly"] == (1 - lik <= s.anomaly_false_alarm_rate))
    # One alert event opens at the spike: the pager gets the incident, not every reading.
    opened = [a for a in map(json.loads, (r.value for r in read_topic(s, s.alerts_topic, expect=1)))
              if a["device_id"] == "spike" and a["event"] == "open"]
    assert [a["start_ts"] for a in opened] == [spike["ts"]]
    assert opened[0]["value"] == spike["value"] and opened[0]["alert_id"] == f"spike@{int(spike['ts'] * 1000)}"
    assert opened[0]["expected_low"] < spike["value"] - spike["residual"] < opened[0]["expected_high"]


def test_a_gap_resets_the_device_and_nothing_is_flagged_while_it_warms_up(settings_factory, topic_name):
    s = settings_factory(input_topic=topic_name, output_topic=f"{topic_name}-out",
                         dlq_topic=f"{topic_name}-dlq", group_id=f"{topic_name}-g", min_history=1,
                         horizon=H, anomaly_warmup=5, max_gap_s=600.0)
    before = [("gap", T0 + 60.0 * k, 20.0 + math.sin(k / 5.0)) for k in range(60)]
    resume = T0 + 60.0 * 59 + 3600.0  # an hour of silence, longer than max_gap_s
    after = [("gap", resume + 60.0 * k, 20.0 + math.sin(k / 5.0) + (500.0 if k == 2 else 0.0))
             for k in range(30)]
    produce_readings(s, topic_name, before + after)
    torch.manual_seed(0)
    totals = Worker(s, fresh_model(s)).run(until=lambda w: w.totals.consumed >= 90)
    assert totals.forecasts == 90

    recs = sorted((json.loads(r.value) for r in read_topic(s, s.output_topic, expect=90)),
                  key=lambda f: f["ts"])
    assert [f["reset"] for f in recs].count(True) == 1 and recs[60]["reset"]
    assert recs[60]["residual"] is None  # nothing to compare with across the gap
    warming = recs[60 : 60 + s.anomaly_warmup]  # includes the 500-unit spike, never flagged
    assert all(f["anomaly_score"] is None and not f["is_anomaly"] for f in warming)
    assert all(f["drift_score"] is None for f in recs[60 : 60 + s.anomaly_warmup + H])
    assert all(f["anomaly_score"] is not None for f in recs[60 + s.anomaly_warmup :])
    assert all(f["drift_score"] is not None for f in recs[60 + s.anomaly_warmup + H :])


SLIDE_AT, SLIDE_FOR = 1000, 40


def slide(start: int, stop: int):
    """A calm device, and one that slides away slowly (a machine heading for failure) from
    reading SLIDE_AT for SLIDE_FOR readings, each step a small surprise, then comes back and
    stays calm for longer than the hold time."""
    rng = np.random.default_rng(3)
    for k in range(start, stop):
        noise = 0.05 * rng.standard_normal(2)
        base = 20.0 + math.sin(k / 5.0)
        away = 0.05 * (k - SLIDE_AT) ** 2 if SLIDE_AT <= k < SLIDE_AT + SLIDE_FOR else 0.0
        yield "calm", T0 + 60.0 * k, base + noise[0]
        yield "slide", T0 + 60.0 * k, base + noise[1] + away


def test_a_slow_slide_opens_one_alert_that_survives_a_restart_and_closes_once(settings_factory, topic_name):
    # Default settings (hold time, false-alarm rate), only the topics are the test's own.
    s = settings_factory(input_topic=topic_name, output_topic=f"{topic_name}-out",
                         dlq_topic=f"{topic_name}-dlq", alerts_topic=f"{topic_name}-alerts",
                         group_id=f"{topic_name}-g")
    torch.manual_seed(0)
    served = fresh_model(s)
    restart_at = SLIDE_AT + 12  # mid-slide: the alert is open when the first worker stops
    produce_readings(s, topic_name, slide(0, restart_at))
    assert Worker(s, served).run(until=lambda w: w.totals.consumed >= 2 * restart_at).consumed == 2 * restart_at
    end = SLIDE_AT + SLIDE_FOR + 120  # more than the hold time of calm after the slide
    produce_readings(s, topic_name, slide(restart_at, end))
    rest = 2 * (end - restart_at)
    assert Worker(s, served).run(until=lambda w: w.totals.consumed >= rest).consumed == rest

    events = [json.loads(r.value) for r in read_topic(s, s.alerts_topic, expect=2, timeout_s=20)]
    mine = [a for a in events if a["device_id"] == "slide"]
    assert [a["event"] for a in mine] == ["open", "close"], mine  # not a second open after the restart
    opened, closed = mine
    assert opened["alert_id"] == closed["alert_id"] and opened["start_ts"] == closed["start_ts"]
    assert T0 + 60.0 * SLIDE_AT <= opened["start_ts"] < T0 + 60.0 * restart_at
    assert closed["ts"] - closed["last_above_ts"] >= s.alert_hold_s and closed["reason"] == "recovered"
    assert closed["peak_likelihood"] >= opened["peak_likelihood"] >= 1 - s.anomaly_false_alarm_rate
    assert not (closed["expected_low"] <= closed["value"] <= closed["expected_high"])
