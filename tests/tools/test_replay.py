"""CSV replay: parsing the real recordings, clear errors, merging, and a round trip through Kafka."""

import argparse
import json
import logging
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


def test_load_csv_reads_the_machine_temperature_recording(shared_data):
    ts, values = load_csv(shared_data / MACHINE)
    assert ts.shape == (22_695,) and values.shape == (22_695, 1)
    assert ts[0] == utc("2013-12-02 21:15:00")
    assert values[0, 0] == pytest.approx(73.96732207)
    assert np.all(np.diff(ts) >= 0)
    assert np.median(np.diff(ts)) == 300.0
    # The recording repeats one hour of timestamps (2014-01-07 02:00-02:55, other values).
    # Rows are kept, sorted stably; the worker ignores a repeated ts as a duplicate.
    assert (np.diff(ts) == 0).sum() == 12


def test_load_csv_reads_several_channels_of_ett(shared_data):
    ts, values = load_csv(shared_data / "ett/ETTh1.csv", "date", ["HUFL", "OT"])
    assert values.shape == (17_420, 2)
    assert ts[0] == utc("2016-07-01 00:00:00")
    assert values[0].tolist() == pytest.approx([5.827000141143799, 30.5310001373291])


def test_missing_column_is_one_line_listing_the_columns(shared_data):
    with pytest.raises(ReplayError) as err:
        load_csv(shared_data / MACHINE, value_columns=["temperature"])
    message = str(err.value)
    assert "\n" not in message
    assert "no column 'temperature'" in message and "(columns: timestamp, value)" in message
    with pytest.raises(ReplayError, match="no column 'time'"):
        load_csv(shared_data / MACHINE, time_column="time")


def test_unreadable_and_malformed_files_are_one_line_errors(tmp_path):
    with pytest.raises(ReplayError, match="cannot read") as err:
        load_csv(tmp_path / "absent.csv")
    assert "\n" not in str(err.value)
    bad_time = tmp_path / "bad_time.csv"
    bad_time.write_text("timestamp,value\n2014-01-01 00:00:00,1\nyesterday,2\n")
    with pytest.raises(ReplayError, match=r"line 3: timestamp='yesterday' is not a time"):
        load_csv(bad_time)
    bad_value = tmp_path / "bad_value.csv"
    bad_value.write_text("timestamp,value\n2014-01-01 00:00:00,1\n2014-01-01 00:05:00,\n")
    with pytest.raises(ReplayError, match=r"line 3: value='' is not a number"):
        load_csv(bad_value)
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(ReplayError, match="empty file"):
        load_csv(empty)


def test_timestamp_formats(tmp_path):
    p = tmp_path / "formats.csv"
    p.write_text("t,v\n2014-01-01T00:10:00Z,3\n1388534400,1\n2014-01-01 01:05:00+01:00,2\n")
    ts, values = load_csv(p, "t", ["v"])
    assert ts.tolist() == [1388534400.0, 1388534700.0, 1388535000.0]
    assert values[:, 0].tolist() == [1.0, 2.0, 3.0]


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



# ---- no `timestamp` column: the first column whose values are times, said so ------------------
def test_a_file_without_timestamp_uses_its_first_time_column_and_says_so(tmp_path, caplog):
    p = tmp_path / "pump.csv"
    p.write_text("site,date,value\nnorth,2014-01-01 00:05:00,2.5\nnorth,2014-01-01 00:00:00,1\n")
    told = []
    ts, values = load_csv(p, note=lambda column, message: told.append((column, message)))
    assert ts.tolist() == [utc("2014-01-01 00:00:00"), utc("2014-01-01 00:05:00")]
    assert values[:, 0].tolist() == [1.0, 2.5]
    assert told == [("date", "pump.csv: no column 'timestamp': using 'date', the first column "
                             "whose values are times (--time-column names another)")]
    # Without a note it is a log line (INFO) naming the column.
    with caplog.at_level(logging.INFO, logger="stream_lstm.recordings"):
        load_csv(p)
    assert [r.getMessage() for r in caplog.records] == [told[0][1]]
    # The same rows through merge_recordings (what replay sends).
    ids, _, merged_ts, _ = merge_recordings([p], note=lambda column, _: told.append(column))
    assert ids == ["pump"] and merged_ts.tolist() == ts.tolist() and told[-1] == "date"


def test_timestamp_is_used_when_there_and_a_named_column_must_be_there(tmp_path):
    p = tmp_path / "both.csv"
    p.write_text("date,timestamp,value\n2020-01-01,2014-01-01 00:00:00,1\n")
    told = []
    ts, _ = load_csv(p, note=lambda *a: told.append(a))
    assert ts.tolist() == [utc("2014-01-01 00:00:00")] and told == []
    assert load_csv(p, "date")[0].tolist() == [utc("2020-01-01 00:00:00")]
    with pytest.raises(ReplayError) as err:  # named explicitly: no guessing, the clear error
        load_csv(p, "time")
    assert str(err.value).endswith("no column 'time' (columns: date, timestamp, value)")


def test_epoch_numbers_count_as_times_only_under_a_time_name(tmp_path):
    p = tmp_path / "epochs.csv"
    p.write_text("a,event_ts,b\n3,1388534700,4\n1,1388534400,2\n")
    told = []
    ts, values = load_csv(p, value_columns=["a", "b"], note=lambda column, _: told.append(column))
    assert told == ["event_ts"] and ts.tolist() == [1388534400.0, 1388534700.0]
    assert values.tolist() == [[1.0, 2.0], [3.0, 4.0]]


def test_no_column_of_times_is_one_line_listing_the_columns(tmp_path):
    p = tmp_path / "no_time.csv"
    p.write_text("site,reading,value\nnorth,1,2\nsouth,3,4\n")
    with pytest.raises(ReplayError) as err:
        load_csv(p)
    message = str(err.value)
    assert "\n" not in message
    assert message == (f"{p}: no column 'timestamp', and no column whose values are times "
                       "(columns: site, reading, value); name one with --time-column")
    header_only = tmp_path / "header_only.csv"
    header_only.write_text("date,value\n")
    with pytest.raises(ReplayError, match="no column whose values are times"):
        load_csv(header_only)


def test_load_csv_finds_etth1s_date_column(shared_data):
    told = []
    ts, values = load_csv(shared_data / "ett/ETTh1.csv", value_columns=["OT"],
                          note=lambda column, message: told.append(column))
    assert told == ["date"]
    assert ts.shape == (17_420,) and ts[0] == utc("2016-07-01 00:00:00")
    np.testing.assert_array_equal(values, load_csv(shared_data / "ett/ETTh1.csv", "date", ["OT"])[1])


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

