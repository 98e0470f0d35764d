"""Recordings through the real worker (tools/through_worker.py), for the offline commands:
``load`` reads each recording's values (a limit, repeated times dropped as the worker drops
them, the chosen time column said on stderr); ``run_pipeline`` serves them through a real
broker and worker and reads back what a read_committed consumer sees; and whether plots can
be drawn."""

import sys

import numpy as np
import pytest
import torch

from stream_lstm.config import Settings
from stream_lstm.kafka.clients import make_admin
from stream_lstm.models.serving import fresh_model
from stream_lstm.tools import through_worker
from stream_lstm.tools.through_worker import load, plots_available, run_pipeline

T0 = 1_700_000_000.0


def record_state_dir(seen, then):
    """A stand-in for the run itself (``_serve``, under the run's settings): notes the run's
    state directory, there while the run goes on, then does ``then``."""

    def serve(s, *args):
        assert s.state_dir.is_dir()
        seen.append(s.state_dir)
        return then(s, *args)

    return serve


def test_load_reads_each_recordings_values_up_to_the_limit_without_repeated_times(tmp_path, capsys):
    pump = tmp_path / "pump.csv"
    pump.write_text("timestamp,value\n2014-01-01 00:00:00,1\n2014-01-01 00:05:00,2\n"
                    "2014-01-01 00:05:00,9\n2014-01-01 00:10:00,3\n")
    fan = tmp_path / "fan.csv"
    fan.write_text("when,value\n2014-01-01 00:00:00,5\n2014-01-01 00:01:00,6\n")
    series = load([pump, fan], limit=0)
    assert list(series) == ["pump", "fan"]
    ts, x = series["pump"]
    assert ts.tolist() == [1388534400.0, 1388534700.0, 1388535000.0]
    assert x.tolist() == [1.0, 2.0, 3.0]  # the first of a repeated time, as the worker keeps it
    assert x.ndim == 1 and series["fan"][1].tolist() == [5.0, 6.0]
    assert capsys.readouterr().err == ("evaluate: fan.csv: no column 'timestamp': using 'when', "
                                       "the first column whose values are times (--time-column "
                                       "names another)\n")
    assert load([pump], limit=2)["pump"][1].tolist() == [1.0, 2.0]
    assert load([fan], limit=1, time_column="when")["fan"][1].tolist() == [5.0]


def test_plots_are_available_with_matplotlib_and_said_when_not(monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    assert plots_available() is True and capsys.readouterr().err == ""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    assert plots_available() is False
    assert "matplotlib is not installed, so no plots" in capsys.readouterr().err


@pytest.mark.kafka
@pytest.mark.timeout(180)
def test_run_pipeline_serves_every_reading_and_reads_back_the_committed_forecasts(bootstrap, tmp_path, capsys,
                                                                                  monkeypatch):
    # A deployment's topics in the settings: the run writes and follows none of them (it wrote
    # their changelog and alerts, and served their models topic's model; a review).
    s = Settings(bootstrap_servers=bootstrap, model_dir=tmp_path / "models", horizon=3, hidden_size=8,
                 metrics_port=0, alerts_topic="prod-alerts", changelog_topic="prod-changelog",
                 trainer="external", models_topic="prod-models")
    t = T0 + 60.0 * np.arange(40)
    series = {"a": (t, 20 + np.sin(np.arange(40) / 3)), "b": (t + 30.0, 5 + np.cos(np.arange(40) / 4))}
    torch.manual_seed(0)
    served = fresh_model(s)
    state_dirs = []
    monkeypatch.setattr(through_worker, "_serve", record_state_dir(state_dirs, through_worker._serve))
    out, topic = run_pipeline(s, series, served.model, served.spec)
    (state_dir,) = state_dirs
    assert state_dir.name.startswith("stream-lstm-eval-") and not state_dir.exists()  # removed
    assert not (tmp_path / "models").exists()  # nothing of the run's in the user's model dir
    assert topic.startswith("eval-") and topic.endswith("-out")
    assert sorted(out) == ["a", "b"]
    for dev, (ts, x) in series.items():
        got = sorted(out[dev], key=lambda f: f["ts"])
        assert [f["ts"] for f in got] == ts.tolist()  # min_history 1: one forecast a reading
        assert [f["value"] for f in got] == pytest.approx(x.tolist())
        assert all(len(f["forecast"]) == 3 and f["model_version"] == "eval" for f in got)
    assert "evaluate: 80 readings through the worker" in capsys.readouterr().err
    admin = make_admin(s)
    try:
        left = [t for t in admin.list_topics() if t.startswith(topic.removesuffix("-out")) or t.startswith("prod-")]
        groups = [g["group_id"] for g in admin.list_groups() if g["group_id"].startswith(topic.removesuffix("-out"))]
    finally:
        admin.close()
    assert left == [topic]  # the run's working topics deleted with it, the deployment's never made
    assert groups == []


@pytest.mark.kafka
@pytest.mark.timeout(180)
def test_a_run_stopped_before_its_result_leaves_no_topic_behind(bootstrap, monkeypatch):
    """Its forecasts topic is kept for the report that names it; a run stopped (Ctrl-C) before
    any report left it on the broker, one a stopped evaluation (a review)."""
    names, serve = [], through_worker._serve

    def served_then_stopped(s, *args):
        names.append(s.group_id)
        serve(s, *args)  # (the whole run: its topics all made and written)
        raise KeyboardInterrupt

    monkeypatch.setattr(through_worker, "_serve", served_then_stopped)
    s = Settings(bootstrap_servers=bootstrap, horizon=3, hidden_size=8, metrics_port=0)
    served = fresh_model(s)
    t = T0 + 60.0 * np.arange(20)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(s, {"a": (t, 20 + np.sin(np.arange(20) / 3))}, served.model, served.spec)
    admin = make_admin(s)
    try:
        left = [t for t in admin.list_topics() if t.startswith(names[0])]
    finally:
        admin.close()
    assert left == []


def test_run_pipeline_removes_its_state_directory_when_the_run_fails(monkeypatch):
    def unreachable(s, *args):
        raise ConnectionError("no broker")

    state_dirs = []
    monkeypatch.setattr(through_worker, "_serve", record_state_dir(state_dirs, unreachable))
    s = Settings(bootstrap_servers="127.0.0.1:1", horizon=3, hidden_size=8)
    served = fresh_model(s)
    with pytest.raises(ConnectionError, match="no broker"):  # the run's error, not hidden
        run_pipeline(s, {"a": (np.array([T0]), np.array([1.0]))}, served.model, served.spec)
    (state_dir,) = state_dirs
    assert not state_dir.exists()


def test_a_recording_too_short_to_evaluate_is_one_line(tmp_path):
    """A header alone was an IndexError from inside load, one row a ValueError from inside the
    training: tracebacks, after minutes of work for a longer file beside it."""
    from stream_lstm.tools.replay import ReplayError
    from stream_lstm.tools.through_worker import MIN_READINGS, require_readings

    empty = tmp_path / "empty.csv"
    empty.write_text("timestamp,value\n")
    one = tmp_path / "one.csv"
    one.write_text("timestamp,value\n2014-01-01 00:00:00,1\n")
    with pytest.raises(ReplayError, match="empty.csv: no readings, only a header"):
        load([empty, one], limit=0)
    series = load([one], limit=0)
    with pytest.raises(ReplayError, match=f"one: 1 readings .* at least {MIN_READINGS}"):
        require_readings(series)
    require_readings({"long": (np.arange(MIN_READINGS, dtype=float), np.zeros(MIN_READINGS))})
