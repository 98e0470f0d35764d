"""Reading one recording (recordings.py): the real NAB and ETTh1 files, the timestamp formats,
which column holds the times (and saying so), and a one-line error for anything unreadable."""

import logging
from datetime import UTC, datetime

import numpy as np
import pytest

from stream_lstm.recordings import RecordingError, find_time_column, load_csv, parse_timestamp

MACHINE = "nab/machine_temperature_system_failure.csv"


def utc(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


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
    with pytest.raises(RecordingError) as err:
        load_csv(shared_data / MACHINE, value_columns=["temperature"])
    message = str(err.value)
    assert "\n" not in message
    assert "no column 'temperature'" in message and "(columns: timestamp, value)" in message
    with pytest.raises(RecordingError, match="no column 'time'"):
        load_csv(shared_data / MACHINE, time_column="time")


def test_unreadable_and_malformed_files_are_one_line_errors(tmp_path):
    with pytest.raises(RecordingError, match="cannot read") as err:
        load_csv(tmp_path / "absent.csv")
    assert "\n" not in str(err.value)
    bad_time = tmp_path / "bad_time.csv"
    bad_time.write_text("timestamp,value\n2014-01-01 00:00:00,1\nyesterday,2\n")
    with pytest.raises(RecordingError, match=r"line 3: timestamp='yesterday' is not a time"):
        load_csv(bad_time)
    bad_value = tmp_path / "bad_value.csv"
    bad_value.write_text("timestamp,value\n2014-01-01 00:00:00,1\n2014-01-01 00:05:00,\n")
    with pytest.raises(RecordingError, match=r"line 3: value='' is not a number"):
        load_csv(bad_value)
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(RecordingError, match="empty file"):
        load_csv(empty)
    header = tmp_path / "header.csv"  # (replay sent nothing, exit 0; up ran on with no readings)
    header.write_text("timestamp,value\n")
    with pytest.raises(RecordingError, match="header.csv: no readings, only a header"):
        load_csv(header)
    far = tmp_path / "far.csv"  # 1e15 ms: the year 33658 (replay's summary was a traceback)
    far.write_text("timestamp,value\n2014-01-01 00:00:00,1\n1e15,2\n")
    with pytest.raises(RecordingError, match=r"line 3: timestamp='1e15' is not a time \(between the years 1 and 9999\)"):
        load_csv(far)
    for text in ("nan", "-inf", "1e999"):  # (float() reads them: a model trained on them was NaN)
        odd = tmp_path / "odd_value.csv"
        odd.write_text(f"timestamp,value\n2014-01-01 00:00:00,1\n2014-01-01 00:05:00,{text}\n")
        with pytest.raises(RecordingError, match=f"line 3: value='{text}' is not a finite number"):
            load_csv(odd)


def test_timestamp_formats(tmp_path):
    p = tmp_path / "formats.csv"
    p.write_text("t,v\n2014-01-01T00:10:00Z,3\n1388534400,1\n2014-01-01 01:05:00+01:00,2\n")
    ts, values = load_csv(p, "t", ["v"])
    assert ts.tolist() == [1388534400.0, 1388534700.0, 1388535000.0]
    assert values[:, 0].tolist() == [1.0, 2.0, 3.0]


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


def test_timestamp_is_used_when_there_and_a_named_column_must_be_there(tmp_path):
    p = tmp_path / "both.csv"
    p.write_text("date,timestamp,value\n2020-01-01,2014-01-01 00:00:00,1\n")
    told = []
    ts, _ = load_csv(p, note=lambda *a: told.append(a))
    assert ts.tolist() == [utc("2014-01-01 00:00:00")] and told == []
    assert load_csv(p, "date")[0].tolist() == [utc("2020-01-01 00:00:00")]
    with pytest.raises(RecordingError) as err:  # named explicitly: no guessing, the clear error
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
    with pytest.raises(RecordingError) as err:
        load_csv(p)
    message = str(err.value)
    assert "\n" not in message
    assert message == (f"{p}: no column 'timestamp', and no column whose values are times "
                       "(columns: site, reading, value); name one with --time-column")
    header_only = tmp_path / "header_only.csv"
    header_only.write_text("date,value\n")
    with pytest.raises(RecordingError, match="no column whose values are times"):
        load_csv(header_only)


def test_load_csv_finds_etth1s_date_column(shared_data):
    told = []
    ts, values = load_csv(shared_data / "ett/ETTh1.csv", value_columns=["OT"],
                          note=lambda column, message: told.append(column))
    assert told == ["date"]
    assert ts.shape == (17_420,) and ts[0] == utc("2016-07-01 00:00:00")
    np.testing.assert_array_equal(values, load_csv(shared_data / "ett/ETTh1.csv", "date", ["OT"])[1])


@pytest.mark.parametrize("text, seconds", [
    ("2014-01-01 00:00:00", 1388534400.0),
    (" 2014-01-01T01:00:00+01:00 ", 1388534400.0),
    ("2014-01-01T00:00:00Z", 1388534400.0),
    ("2014-01-01", 1388534400.0),
    ("1388534400.5", 1388534400.5),
    ("1388534400500", 1388534400.5),  # above 1e11: milliseconds
    ("99999999999", 99999999999.0),  # just below: still seconds
    ("-86400", -86400.0),
])
def test_parse_timestamp(text, seconds):
    assert parse_timestamp(text) == seconds


@pytest.mark.parametrize("text", ["yesterday", "", "2014-13-01 00:00:00", "01/02/2014",
                                  "nan", "inf", "-Infinity", "1e999"])
def test_parse_timestamp_refuses_what_is_not_a_time(text):
    with pytest.raises(ValueError):
        parse_timestamp(text)


def test_find_time_column_prefers_date_texts_and_skips_the_value_columns():
    rows = [["1388534400", "2014-01-01 00:00:00", "5"], ["1388534460", "2014-01-01 00:01:00", "6"]]
    assert find_time_column(["epoch", "when", "v"], rows) == "when"  # texts before numbers
    assert find_time_column(["epoch", "v"], [r[::2] for r in rows]) == "epoch"
    assert find_time_column(["epoch", "v"], [r[::2] for r in rows], exclude=["epoch"]) is None
    assert find_time_column(["count", "v"], [r[::2] for r in rows]) is None  # a number, not named as time
    assert find_time_column(["date", "v"], []) is None  # no rows: nothing says it holds times
    assert find_time_column(["date", "v"], [["2014-01-01", "1"], ["oops", "2"]]) is None


def test_a_bom_blank_lines_and_repeated_times_are_read(tmp_path):
    p = tmp_path / "excel.csv"
    p.write_bytes("timestamp,value\n2014-01-01 00:05:00,3\n\n2014-01-01 00:00:00,1\n"
                  "2014-01-01 00:05:00,4\n".encode("utf-8-sig"))
    ts, values = load_csv(p)
    assert ts.tolist() == [1388534400.0, 1388534700.0, 1388534700.0]
    assert values[:, 0].tolist() == [1.0, 3.0, 4.0]  # a repeated time keeps file order


def test_a_file_that_is_not_text_is_a_one_line_error(tmp_path):
    p = tmp_path / "binary.csv"
    p.write_bytes(b"timestamp,value\n\xff\xfe\x00\x01,2\n")
    with pytest.raises(RecordingError, match="not a readable CSV file") as err:
        load_csv(p)
    assert "\n" not in str(err.value)


def test_the_line_named_in_an_error_is_the_files_line(tmp_path):
    p = tmp_path / "gap.csv"
    p.write_text("timestamp,value\n2014-01-01 00:00:00,1\n\n2014-01-01 00:05:00,oops\n")
    with pytest.raises(RecordingError, match="line 4: value='oops'"):
        load_csv(p)
    p.write_text("timestamp,value\n\n\n2014-01-01 00:00:00,1\nyesterday,2\n")
    with pytest.raises(RecordingError, match="line 5: timestamp='yesterday' is not a time"):
        load_csv(p)


def test_the_line_named_is_where_the_row_starts_after_a_cell_spanning_lines(tmp_path):
    p = tmp_path / "notes.csv"
    p.write_text('when,value,note\n2014-01-01 00:00:00,1,"two\nlines"\n\n'
                 '2014-01-01 00:05:00,oops,x\n')
    # No `timestamp` column: the rows read to find the time column keep their lines too.
    with pytest.raises(RecordingError, match="line 5: value='oops'"):
        load_csv(p)


@pytest.mark.parametrize("text", ["nan", "inf", "-inf"])
def test_nan_and_infinite_times_are_refused(tmp_path, text):
    p = tmp_path / "odd.csv"
    p.write_text(f"timestamp,value\n2014-01-01 00:00:00,1\n{text},2\n")
    with pytest.raises(RecordingError, match=f"line 3: timestamp='{text}' is not a time"):
        load_csv(p)


def test_a_column_of_nan_is_not_taken_for_the_time_column(tmp_path):
    p = tmp_path / "odd.csv"
    p.write_text("ts,value\nnan,1\nnan,2\n")
    with pytest.raises(RecordingError, match="no column whose values are times"):
        load_csv(p)
