"""CSV replay: merging recordings, the CLI's clear errors, and a round trip through Kafka (reading
one recording: tests/test_recordings.py)."""

import argparse
import json
import time
from datetime import UTC, datetime

import numpy as np
import pytest

from stream_lstm.tools import evaluate, replay
from stream_lstm.tools.replay import ReplayError, load_csv, merge_recordings, replay_files

from ..integration.helpers import read_topic

MACHINE = "nab/machine_temperature_system_failure.csv"
AWS_A = "nab/aws/ec2_cpu_utilization_5f5533.csv"
AWS_B = "nab/aws/ec2_cpu_utilization_24ae8d.csv"


def utc(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def consume(settings, topic: str, expect: int) -> list:
    """Every record of ``topic``, waiting briefly past ``expect`` to catch any duplicate."""
    return read_topic(settings, topic, expect=expect, timeout_s=30)


def test_two_aws_recordings_merge_in_time_order(shared_data):
    ids, device_index, ts, values = merge_recordings([shared_data / AWS_A, shared_data / AWS_B])
    assert ids == ["ec2_cpu_utilization_5f5533", "ec2_cpu_utilization_24ae8d"]
    n_a, n_b = len(load_csv(shared_data / AWS_A)[0]), len(load_csv(shared_data / AWS_B)[0])
    assert len(ts) == n_a + n_b
    assert np.all(np.diff(ts) >= 0)
    assert np.bincount(device_index).tolist() == [n_a, n_b]
    # The series are offset by a few minutes, so the merge really interleaves them.
    assert (np.diff(device_index) != 0).sum() > 1000
    a_ts, a_values = load_csv(shared_data / AWS_A)
    np.testing.assert_array_equal(ts[device_index == 0], a_ts)
    np.testing.assert_array_equal(values[device_index == 0], a_values)


def test_device_ids_must_be_distinct_and_one_per_file(shared_data):
    with pytest.raises(ReplayError, match="used by two files"):
        merge_recordings([shared_data / AWS_A, shared_data / AWS_A])
    with pytest.raises(ReplayError, match="one --device-id per file"):
        merge_recordings([shared_data / AWS_A, shared_data / AWS_B], device_ids=["x"])


def test_cli_reports_a_missing_column_in_one_line(shared_data, capsys):
    parser = argparse.ArgumentParser()
    replay.add_arguments(parser)
    args = parser.parse_args([str(shared_data / MACHINE), "--value-column", "temp"])
    assert replay.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no column 'temp'" in err and "columns: timestamp, value" in err
    for bad in (["--limit", "-1"], ["--limit", "0"], ["--speedup", "0"]):  # (--limit -1 sent one of two rows)
        assert replay.main(parser.parse_args([str(shared_data / MACHINE), *bad])) == 2
        assert capsys.readouterr().err == "replay: --speedup and --limit must be positive\n"



def test_readings_the_worker_would_dead_letter_are_refused_before_any_broker(shared_data, capsys, monkeypatch):
    """An empty or too long --device-id, or one value column for a worker of two channels:
    every reading was sent and dead-lettered, with exit 0 (a review)."""
    parser = argparse.ArgumentParser()
    replay.add_arguments(parser)
    monkeypatch.setenv("STREAM_LSTM_BOOTSTRAP_SERVERS", "127.0.0.1:1")  # (never reached)
    for bad, said in ((["--device-id", ""], "empty_device_id: device_id is empty"),
                      (["--device-id", "x" * 200], "device_id_too_long: device_id has 200 chars (max 128)")):
        assert replay.main(parser.parse_args([str(shared_data / MACHINE), *bad])) == 2
        assert capsys.readouterr().err.endswith(f"the worker would dead-letter its readings ({said})\n")
    monkeypatch.setenv("STREAM_LSTM_N_FEATURES", "2")
    assert replay.main(parser.parse_args([str(shared_data / MACHINE)])) == 2
    assert "values_wrong_length" in capsys.readouterr().err
    # Judged on a plain reading: what one reading gets wrong (a value out of the range, here the
    # first) is the worker's to dead-letter, as live; and only the devices --limit sends.
    monkeypatch.delenv("STREAM_LSTM_N_FEATURES")
    monkeypatch.setenv("STREAM_LSTM_VALUE_MIN", "1000")
    refused_by_the_worker = replay.refused_by_the_worker
    from stream_lstm.config import load_settings
    refused_by_the_worker(load_settings(), ["pump"], np.array([0, 0]), 1)  # (no error)
    with pytest.raises(replay.ReplayError, match="device ''"):
        refused_by_the_worker(load_settings(), ["ok", ""], np.array([0, 1]), 1)
    refused_by_the_worker(load_settings(), ["ok", ""], np.array([0, 1])[:1], 1)  # (--limit 1)



# ---- no `timestamp` column: the first column whose values are times, said so ------------------
# (load_csv itself: tests/test_recordings.py)
def test_merge_recordings_uses_and_reports_each_files_time_column(tmp_path):
    p = tmp_path / "pump.csv"
    p.write_text("site,date,value\nnorth,2014-01-01 00:05:00,2.5\nnorth,2014-01-01 00:00:00,1\n")
    told = []
    ids, _, merged_ts, _ = merge_recordings([p], note=lambda column, _: told.append(column))
    assert ids == ["pump"] and told == ["date"]
    assert merged_ts.tolist() == [utc("2014-01-01 00:00:00"), utc("2014-01-01 00:05:00")]


def test_replay_and_evaluate_say_which_column_they_chose(tmp_path, capsys):
    p = tmp_path / "pump.csv"
    p.write_text("date,value\n2014-01-01 00:00:00,1\n2014-01-01 00:05:00,oops\n")
    parser = argparse.ArgumentParser()
    replay.add_arguments(parser)
    assert replay.main(parser.parse_args([str(p)])) == 2  # the bad value: before any broker
    err = capsys.readouterr().err.splitlines()
    assert err == ["replay: pump.csv: no column 'timestamp': using 'date', the first column whose "
                   "values are times (--time-column names another)",
                   f"replay: {p}: line 3: value='oops' is not a number"]

    p.write_text("date,value\n2014-01-01 00:00:00,1\n2014-01-01 00:05:00,2\n")
    series = evaluate.load([p], 0)
    assert series["pump"][0].tolist() == [utc("2014-01-01 00:00:00"), utc("2014-01-01 00:05:00")]
    assert capsys.readouterr().err.startswith("evaluate: pump.csv: no column 'timestamp': using 'date'")
    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    args = parser.parse_args([str(p), "--time-column", "when", "--out", str(tmp_path / "r")])
    assert evaluate.main(args) == 2  # a one-line error, not a traceback, before any training
    assert capsys.readouterr().err == f"evaluate: {p}: no column 'when' (columns: date, value)\n"


@pytest.mark.kafka
@pytest.mark.timeout(180)
def test_replay_round_trip_through_kafka(shared_data, settings_factory, topic_name):
    settings = settings_factory()
    sent = replay_files(settings, [shared_data / MACHINE], limit=500, topic=topic_name,
                        progress=False)
    assert sent == 500
    records = consume(settings, topic_name, 500)
    assert len(records) == 500
    ts, values = load_csv(shared_data / MACHINE)
    assert {r.key for r in records} == {b"machine_temperature_system_failure"}
    got = sorted((json.loads(r.value)["ts"], json.loads(r.value)["value"]) for r in records)
    assert got == list(zip(ts[:500].tolist(), values[:500, 0].tolist(), strict=True))


@pytest.mark.kafka
@pytest.mark.timeout(180)
def test_cli_replays_a_merged_fleet_with_a_speedup(shared_data, bootstrap, settings_factory,
                                                   topic_name, monkeypatch, capsys):
    monkeypatch.setenv("STREAM_LSTM_BOOTSTRAP_SERVERS", bootstrap)
    parser = argparse.ArgumentParser()
    replay.add_arguments(parser)
    # 6 readings of two devices 2-3 minutes apart, at 600x: about 0.5 s of pacing, not 0.
    args = parser.parse_args([str(shared_data / AWS_A), str(shared_data / AWS_B), "--limit", "6",
                              "--speedup", "600", "--topic", topic_name, "--device-id", "a",
                              "--device-id", "b"])
    started = time.monotonic()
    assert replay.main(args) == 0
    elapsed = time.monotonic() - started
    _, _, ts, _ = merge_recordings([shared_data / AWS_A, shared_data / AWS_B])
    assert (ts[5] - ts[0]) / 600 * 0.9 < elapsed < 20
    assert "replay: sent 6 of 6 readings" in capsys.readouterr().err
    records = consume(settings_factory(), topic_name, 6)
    assert len(records) == 6
    for r in records:
        body = json.loads(r.value)
        assert r.key.decode() == body["device_id"] and body["device_id"] in {"a", "b"}
    # --limit 1 sends one device's reading: said so (it counted every file's device).
    args = parser.parse_args([str(shared_data / AWS_A), str(shared_data / AWS_B), "--limit", "1",
                              "--topic", topic_name, "--no-progress"])
    assert replay.main(args) == 0
    assert "replay: 1 readings of 1 device(s)" in capsys.readouterr().err



def test_no_broker_is_the_one_line_exit_3_of_every_command(tmp_path, monkeypatch, capsys):
    """Not a note about the topic, then the same error again as a failure (exit 1)."""
    from stream_lstm.cli import main
    from stream_lstm.kafka.local_broker import free_port

    csv = tmp_path / "r.csv"
    csv.write_text("timestamp,value\n2024-01-01 00:00:00,1\n2024-01-01 00:05:00,2\n")
    monkeypatch.setenv("STREAM_LSTM_BOOTSTRAP_SERVERS", f"127.0.0.1:{free_port()}")
    assert main(["replay", str(csv)]) == 3
    err = capsys.readouterr().err
    assert err.count("cannot connect to Kafka") == 1 and "note:" not in err and "Traceback" not in err


def test_help_says_what_each_exit_code_means(capsys):
    # (a stopped replay exits 1, `simulate` 0: said nowhere; a review)
    import pytest

    from stream_lstm.cli import main

    with pytest.raises(SystemExit):
        main(["replay", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Exit 0 when every reading was sent; 1 when it stopped before the end" in text
