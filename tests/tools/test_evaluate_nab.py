"""`stream-lstm evaluate --nab`: the NAB table from forecasts (no Kafka), and one run end to end
through the real broker on two real recordings, checked against the forecasts topic."""

import argparse
import json

import numpy as np
import pytest

from stream_lstm.tools import evaluate, nab, nab_corpus
from stream_lstm.tools.evaluate_nab import (
    PUBLISHED,
    clip_windows,
    nab_inputs,
    nab_report,
    print_nab_table,
)

T0 = 1_400_000_000.0


def _forecasts(n: int, special: dict[int, tuple], warmup: int = 5) -> list[dict]:
    """Forecast records as the topic carries them: none for the first ``warmup`` rows; else
    anomaly 1, drift 2, likelihood 0.5, except ``special[row] = (anomaly, drift, likelihood)``;
    flagged as the worker flags, at a false-alarm rate of 1e-4 (sure alone at 1e-6)."""
    out = []
    for i in range(warmup, n):
        a, d, lik = special.get(i, (1.0, 2.0, 0.5))
        out.append({"ts": T0 + 60 * i, "anomaly_score": a, "drift_score": d,
                    "anomaly_likelihood": lik, "is_anomaly": 1 - lik <= 1e-4})
    return out


def _recordings() -> dict:
    ts = T0 + 60 * np.arange(100.0)   # 100 rows: probation floor(0.15 * 100) = 15 rows
    specs = {  # a: one detection at its window's first row; b: one false alert, a missed window
        "a": ([(T0 + 60 * 50, T0 + 60 * 59)], {50: (10.0, None, 0.9999999)}),
        "b": ([(T0 + 60 * 70, T0 + 60 * 79)], {30: (1.0, 5.0, 0.9999995)}),
    }  # (each sure alone: 1 - likelihood below 1e-6)
    return {name: {"ts": ts, "windows": w} | nab_inputs(ts, _forecasts(100, special), hold_s=3600.0,
                                                        false_alarm_rate=1e-4)
            for name, (w, special) in specs.items()}


def test_nab_inputs_leave_rows_without_a_forecast_nan():
    rec = _recordings()["a"]
    assert np.isnan(rec["alert"][:5]).all() and np.isnan(rec["shipped"][:5]).all()
    assert rec["raw"][50] == 10.0 and rec["drift_score"][50] != rec["drift_score"][50]  # NaN
    assert rec["alert"][50] == pytest.approx(7.0) and rec["alert"][6] == pytest.approx(np.log10(2))
    assert rec["shipped"].tolist().count(1.0) == 1 and rec["raw"][6] == 2.0


def test_the_shipped_detections_are_alert_openings_not_flagged_rows():
    ts = T0 + 60 * np.arange(200.0)
    # Flagged on rows 50-52 (one alert), again on 80 (within the hour's hold: the same alert),
    # and on 190 (after more than an hour below: a new alert).
    special = {i: (9.0, 9.0, 0.9999999) for i in (50, 51, 52, 80, 190)}
    rec = nab_inputs(ts, _forecasts(200, special), hold_s=3600.0, false_alarm_rate=1e-4)
    assert np.flatnonzero(rec["shipped"] == 1.0).tolist() == [50, 190]


def test_a_marginal_flag_opens_an_alert_only_when_the_next_reading_is_flagged_too():
    ts = T0 + 60 * np.arange(200.0)
    # Flagged but not sure alone (1 - likelihood 1e-5, the rate 1e-4): row 50 alone, then rows
    # 120-121 in a row (opens at 121), then 160 alone again.
    special = {i: (9.0, 9.0, 0.99999) for i in (50, 120, 121, 160)}
    rec = nab_inputs(ts, _forecasts(200, special), hold_s=3600.0, false_alarm_rate=1e-4)
    assert np.flatnonzero(rec["shipped"] == 1.0).tolist() == [121]
    assert rec["alert_peak"][121] == pytest.approx(5.0)


def test_a_reading_sure_by_one_view_alone_opens_neither_shipped_nor_swept_alerts_alone():
    # Row 50 is sure by its likelihood (1e-7) but not corroborated: a worker at any rate waits
    # for a second flagged reading; rows 120-121 are two in a row: an alert at 120's rate.
    ts = T0 + 60 * np.arange(200.0)
    forecasts = _forecasts(200, {i: (9.0, 9.0, 0.9999999) for i in (50, 120, 121)})
    for f in forecasts:
        f["corroborated"] = False
    rec = nab_inputs(ts, forecasts, hold_s=3600.0, false_alarm_rate=1e-4)
    assert np.flatnonzero(rec["shipped"] == 1.0).tolist() == [121]
    recordings = {"r": {"ts": ts, "windows": [(T0 + 60 * 45, T0 + 60 * 55)]} | rec}
    report = nab_report(recordings, hold_s=3600.0)
    best = report["swept_events"]["standard"]
    assert best["files"]["r"]["windows_hit"] == 0 and best["files"]["r"]["false_alerts"] == 1
    for f in forecasts:
        f["corroborated"] = True  # the same readings, a second view agreeing: 50 opens alone
    rec = nab_inputs(ts, forecasts, hold_s=3600.0, false_alarm_rate=1e-4)
    assert np.flatnonzero(rec["shipped"] == 1.0).tolist() == [50, 120]


def test_nab_table_by_hand(capsys):
    report = nab_report(_recordings())
    std = report["shipped"]["standard"]
    a, b = std["files"]["a"], std["files"]["b"]
    # a: the one detection is at its window's first row: worth tp = 1.0, nothing else fires.
    assert a["raw"] == pytest.approx(1.0)
    assert (a["windows_hit"], a["windows_missed"], a["false_alerts"]) == (1, 0, 0)
    # b: a false alert before the first window (-fp = -0.11) and the window missed (-fn = -1).
    assert b["raw"] == pytest.approx(-1.11)
    assert (b["windows_hit"], b["windows_missed"], b["false_alerts"]) == (0, 1, 1)
    # Corpus: null -2 (both windows missed), perfect 2: 100 * (-0.11 + 2) / 4.
    assert (std["null"], std["perfect"]) == (-2.0, 2.0)
    assert std["score"] == pytest.approx(47.25)
    low_fp = report["shipped"]["reward_low_FP_rate"]
    assert low_fp["files"]["b"]["raw"] == pytest.approx(-1.22)
    assert low_fp["score"] == pytest.approx(100 * (1.0 - 1.22 + 2) / 4)
    low_fn = report["shipped"]["reward_low_FN_rate"]   # fn = 2: null -4, perfect 2
    assert low_fn["score"] == pytest.approx(100 * (1.0 - 0.11 - 2 + 4) / 6)

    # Swept likelihood: surprise 7 keeps a's hit and drops b's false alert (6.3): raw 0 -> 50.
    swept = report["swept"]["alert"]["standard"]
    assert swept["threshold"] == pytest.approx(7.0) and swept["raw"] == pytest.approx(0.0)
    assert swept["score"] == pytest.approx(50.0)
    # The raw max(anomaly, drift) the same at 10 (b's false alert scores 5).
    assert report["swept"]["raw"]["standard"]["threshold"] == 10.0
    assert (swept["files"]["b"]["false_alerts"], swept["files"]["b"]["windows_missed"]) == (0, 1)
    assert report["swept"]["anomaly_score"]["standard"]["threshold"] == 10.0
    # drift alone: 2 everywhere fires on every row (a's hit is outweighed by false alerts),
    # 5 only on b's false alert; firing on nothing (inf) is best: the null score.
    drift = report["swept"]["drift_score"]["standard"]
    assert drift["threshold"] == np.inf and drift["score"] == pytest.approx(0.0)
    assert report["published"] == PUBLISHED

    # The same figures through the scorer directly, as a cross-check of the plumbing.
    recs = _recordings()
    direct = nab_corpus.score_corpus({n: (r["ts"], r["shipped"], r["windows"]) for n, r in recs.items()},
                              nab.PROFILES["standard"], 1.0)
    assert direct.score == pytest.approx(std["score"])

    print_nab_table(report, 1e-4)
    out = capsys.readouterr().out
    assert "shipped alerts (alert events opened, false-alarm rate 0.0001): standard 47.2" in out
    assert "swept alert score -log10(1 - anomaly_likelihood): standard 50.0 at threshold 7" in out
    assert "swept raw score max(anomaly_score, drift_score): standard 50.0 at threshold 10" in out
    assert "ARTime 72.6, Numenta HTM 71.7, KNN CAD 53.9, Bayesian changepoint 41.4, random 21.2 (this run scored 2 recording(s): not comparable)" in out
    # Alert events swept: a's opening alone is best, as for the swept rows: from a threshold of
    # 4.5 on, b's single reading (6.3) is no longer sure enough (2 above it) to open alone.
    events = report["swept_events"]["standard"]
    assert events["score"] == pytest.approx(50.0) and 4.25 < events["threshold"] <= 5.0
    assert "NAB score, swept alert events" in out


def test_clip_windows_keeps_a_window_cut_by_the_limit():
    ts = np.arange(10.0)
    assert clip_windows(ts, [(8.0, 12.0), (11.0, 12.0)]) == [(8.0, 12.0)]
    assert nab.label_rows(ts, clip_windows(ts, [(8.0, 12.0)]), probation_percent=0).bounds == ((8, 9),)


@pytest.mark.kafka
@pytest.mark.timeout(300)
def test_evaluate_nab_end_to_end(shared_data, bootstrap, tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    from stream_lstm.config import Settings
    from stream_lstm.kafka.clients import make_consumer
    from stream_lstm.recordings import load_csv

    monkeypatch.setenv("STREAM_LSTM_BOOTSTRAP_SERVERS", bootstrap)
    aws = shared_data / "nab" / "aws"
    # 900 rows each: iio keeps both its windows (rows 218-370), elb its first (683-883).
    files = [aws / "iio_us-east-1_i-a2eb1cd9_NetworkIn.csv", aws / "elb_request_count_8c0756.csv"]
    args = argparse.Namespace(files=files, out=tmp_path, epochs=1, limit=900, etth1=None,
                              horizons=[24], peer=False, nab=True)
    assert evaluate.main(args) == 0
    report = json.loads((tmp_path / "nab.json").read_text())
    assert report["model"] == "v0000-untrained"
    for name in ("iio_us-east-1_i-a2eb1cd9_NetworkIn", "elb_request_count_8c0756"):
        assert report["recordings"][name]["forecasts_read"] == 900
        assert (tmp_path / f"{name}-nab.png").stat().st_size > 5000
    assert [report["recordings"][n]["windows"] for n in report["recordings"]] == [2, 1]
    for profile in nab.PROFILES:
        assert np.isfinite(report["shipped"][profile]["score"])
        assert np.isfinite(report["swept"]["alert"][profile]["score"])
    assert report["published"]["ARTime"] == 72.6
    for name, rec in report["recordings"].items():
        assert 0 <= rec["windows_in_top10_alerts"] <= rec["windows"], name
    assert np.isfinite(report["swept_events"]["standard"]["score"])
    out = capsys.readouterr().out
    assert "NAB score, shipped alerts" in out and "elb_request_count_8c0756" in out

    # Independently: the shipped alerts' score from the records on the forecasts topic, an alert
    # opening at a flagged reading unless one is open (flagged within the hold time before),
    # when the reading before was flagged too or this one is sure alone (1 - likelihood at most
    # a hundredth of the false-alarm rate, and a second view agreed: ``corroborated``).
    consumer = make_consumer(Settings(bootstrap_servers=bootstrap), report["output_topic"],
                             group_id="independent-nab-check", auto_offset_reset="earliest",
                             isolation_level="read_committed")
    flags: dict[str, dict[float, tuple[bool, bool]]] = {}
    sure_tail = Settings().anomaly_false_alarm_rate / 100
    while sum(map(len, flags.values())) < 1800:
        for recs in consumer.poll(timeout_ms=1000).values():
            for r in recs:
                f = json.loads(r.value)
                lik = f["anomaly_likelihood"]
                flags.setdefault(f["device_id"], {})[f["ts"]] = (
                    bool(f["is_anomaly"]), bool(f["is_anomaly"]) and 1 - lik <= sure_tail and f["corroborated"])
    consumer.close()
    corpus = {}
    for f in files:
        ts = load_csv(f)[0][:900]
        windows = [w for w in nab.nab_windows(shared_data / "nab" / "combined_windows.json", f.name)
                   if w[0] <= ts[-1]]
        hold, is_open, last_flag, opened, before = Settings().alert_hold_s, False, -np.inf, [], False
        for t in ts.tolist():
            flagged, sure = flags[f.stem].get(t, (False, False))
            opened.append(flagged and not is_open and (sure or before))
            if opened[-1]:
                is_open = True
            if flagged:
                last_flag = t
            elif t - last_flag >= hold:
                is_open = False
            before = flagged
        corpus[f.stem] = (ts, np.array(opened), windows)
    expected = nab_corpus.score_corpus(corpus, nab.PROFILES["standard"], threshold=1.0)
    assert report["shipped"]["standard"]["score"] == pytest.approx(expected.score, abs=1e-9)


def test_a_corpus_that_cannot_be_scored_names_the_forecasts_topic_left_on_your_broker(shared_data, tmp_path,
                                                                                      monkeypatch, capsys):
    """Scoring that fails after the run wrote no report, so nothing named the forecasts topic
    the run left on the user's broker (a review)."""
    from contextlib import contextmanager

    from stream_lstm.kafka import local_broker
    from stream_lstm.tools import through_worker

    monkeypatch.setenv("STREAM_LSTM_BOOTSTRAP_SERVERS", "broker.example:9092")

    @contextmanager
    def yours(settings, answers=None):  # (the user's broker answered)
        yield settings.bootstrap_servers

    monkeypatch.setattr(local_broker, "ensure_local_broker", yours)
    monkeypatch.setattr(through_worker, "run_pipeline", lambda *a: ({}, "eval-1234abcd-out"))
    f = shared_data / "nab" / "aws" / "elb_request_count_8c0756.csv"
    args = argparse.Namespace(files=[f], out=tmp_path, epochs=1, limit=200, etth1=None,
                              horizons=[24], peer=False, nab=True)  # (200 rows: no window)
    assert evaluate.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("evaluate: ") and err.endswith(
        "(the run's forecasts stay in eval-1234abcd-out on broker.example:9092)"), err


def test_a_missing_recording_or_one_without_labels_is_one_plain_line(tmp_path, capsys):
    """A mistyped path was "--nab needs combined_windows.json", and a recording NAB does not
    label a quoted KeyError (a review)."""
    args = argparse.Namespace(files=[tmp_path / "nosuch.csv"], out=tmp_path / "out", epochs=1, limit=0,
                              etth1=None, horizons=[24], peer=False, nab=True)
    assert evaluate.main(args) == 2
    assert "nosuch.csv: cannot read: No such file or directory" in capsys.readouterr().err
    (tmp_path / "combined_windows.json").write_text('{"realKnownCause/other.csv": []}')
    mine = tmp_path / "data" / "mysensor.csv"
    mine.parent.mkdir()
    mine.write_text("timestamp,value\n" + "".join(f"2014-01-01 {h:02d}:{m:02d}:00,{m}\n"
                                                  for h in range(10) for m in range(0, 60, 5)))
    args.files = [mine]
    assert evaluate.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("evaluate: 'mysensor.csv' is not a key of") and not err.startswith('evaluate: "'), err
