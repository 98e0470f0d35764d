"""JSON-lines logging (logs.py): one JSON object a line with its context, secrets masked in the
message, the context (nested too) and exception text, the process-wide set-up, and the one
start-up line."""

from __future__ import annotations

import io
import itertools
import json
import logging

import pytest

from stream_lstm.config import Settings
from stream_lstm.logs import (
    JsonFormatter,
    SecretFilter,
    configure_logging,
    kafka_closing,
    log_startup,
    mask_secrets,
)


@pytest.fixture
def json_logs():
    root, kafka, torch = logging.getLogger(), logging.getLogger("kafka"), logging.getLogger("torch")
    saved = root.handlers[:], root.level, kafka.level, torch.level
    buf = io.StringIO()
    configure_logging("DEBUG", stream=buf)
    try:
        yield buf
    finally:
        root.handlers[:], level, kafka_level, torch_level = saved
        root.setLevel(level)
        kafka.setLevel(kafka_level)
        torch.setLevel(torch_level)


def lines(buf: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in buf.getvalue().splitlines()]


def test_logs_are_json_lines_with_context_and_masked_secrets(json_logs):
    log = logging.getLogger("stream_lstm.test")
    log.info("reading dead-lettered", extra={"device_id": "d-7", "partition": 3, "topic": "sensor-readings"})
    log.warning("connecting with sasl_plain_password=hunter2 and %s", "token=abc123",
                extra={"kafka_config": {"sasl_plain_password": "hunter2", "bootstrap_servers": "k:9092"},
                       "api_token": "abc123"})
    try:
        raise RuntimeError('auth failed: {"password": "hunter2"}')
    except RuntimeError:
        log.exception("broker error")
    first, second, third = lines(json_logs)
    assert set(first) >= {"ts", "level", "logger", "event"}
    assert first["ts"].endswith("+00:00") and "T" in first["ts"]
    assert (first["level"], first["logger"], first["event"]) == ("info", "stream_lstm.test", "reading dead-lettered")
    assert (first["device_id"], first["partition"], first["topic"]) == ("d-7", 3, "sensor-readings")
    assert second["event"] == "connecting with sasl_plain_password=*** and token=***"
    assert second["kafka_config"] == {"sasl_plain_password": "***", "bootstrap_servers": "k:9092"}
    assert second["api_token"] == "***"
    assert "RuntimeError" in third["exception"]
    assert "hunter2" not in json_logs.getvalue() and "abc123" not in json_logs.getvalue()


def test_log_startup_is_one_line_with_redacted_settings(json_logs):
    s = Settings(security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512", sasl_username="svc",
                 sasl_password="hunter2", bootstrap_servers="broker-1:9093")
    log_startup(logging.getLogger("stream_lstm.worker"), s,
                {"bootstrap_servers": s.bootstrap_servers, "input_topic": s.input_topic, "model_version": "v0001"})
    out = lines(json_logs)
    assert len(out) == 1
    line = out[0]
    assert "broker-1:9093" in line["event"] and "sensor-readings" in line["event"] and "v0001" in line["event"]
    assert line["connected"]["model_version"] == "v0001"
    assert line["settings"]["sasl_password"] == "***"
    assert line["settings"]["sasl_username"] == "svc" and line["settings"]["window"] == s.window
    assert "hunter2" not in json_logs.getvalue()


@pytest.mark.parametrize("text, masked", [
    ("sasl_plain_password=hunter2 user=bob", "sasl_plain_password=*** user=bob"),
    ('{"sasl_password": "hunter2"}', '{"sasl_password": "***"}'),
    ("client_secret: s3cr3t, next", "client_secret: ***, next"),
    ("nothing to hide", "nothing to hide"),
])
def test_mask_secrets(text, masked):
    assert mask_secrets(text) == masked


@pytest.mark.parametrize("text, masked", [
    ("'api_token'='abc' rest", "'api_token'='***' rest"),
    ("db_passwd = p4ss; next", "db_passwd = ***; next"),
])
def test_mask_secrets_more_forms(text, masked):
    assert mask_secrets(text) == masked


def test_nested_lists_in_the_context_are_masked_and_other_values_kept(json_logs):
    logging.getLogger("stream_lstm.test").info("brokers", extra={
        "hosts": [{"name": "k1", "password": "pw1"}, "token=abc123", 7],
        "sasl_password": None,  # nothing to hide: kept as null
        "retries": 3})
    (line,) = lines(json_logs)
    assert line["hosts"] == [{"name": "k1", "password": "***"}, "token=***", 7]
    assert line["sasl_password"] is None and line["retries"] == 3
    assert "pw1" not in json_logs.getvalue() and "abc123" not in json_logs.getvalue()


_bad_format_loggers = itertools.count()


def bad_format_line(*args) -> tuple[dict, str]:
    """What a logger with the JSON formatter and the filter writes for a message whose
    arguments do not fit its format string."""
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(SecretFilter())
    # A new logger each call: pytest attaches its capture handlers, which format the raw
    # record and fail on it, to loggers that already exist and do not propagate.
    log = logging.getLogger(f"stream_lstm.test.badformat.{next(_bad_format_loggers)}")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning(*args)
    finally:
        log.removeHandler(handler)
    (line,) = [json.loads(x) for x in buf.getvalue().splitlines()]
    return line, buf.getvalue()


def test_a_bad_format_string_keeps_the_line():
    line, _ = bad_format_line("count %d of %s", "not-a-number", "pumps")
    assert line["event"] == "count %d of %s ('not-a-number', 'pumps')"  # the raw text, not lost
    line, _ = bad_format_line("count %d password=hunter2", "x")
    assert line["event"] == "count %d password=*** ('x',)"


def test_a_secret_argument_of_a_bad_format_string_is_masked():
    line, text = bad_format_line("count %d password=%s", "not-a-number", "hunter2")
    assert "hunter2" not in text
    assert line["event"] == "count %d password=*** ('not-a-number', '***')"  # the rest kept raw


@pytest.mark.parametrize("args, event", [
    # %% takes no argument and a * width takes one: the secret is still the right argument.
    (("%d%% done, %*d rows, token='%s'", "x", 5, 7, "abc123"),
     "%d%% done, %*d rows, token='***' ('x', 5, 7, '***')"),
    (("db_passwd: %s %s", "p4ss"), "db_passwd: *** %s ('***',)"),  # too few arguments
])
def test_a_secret_argument_is_found_by_its_placeholders_position(args, event):
    line, text = bad_format_line(*args)
    assert line["event"] == event
    assert "abc123" not in text and "p4ss" not in text


def test_a_secret_named_argument_of_a_bad_format_string_is_masked():
    line, text = bad_format_line("user=%(user)s password=%(pw)s %d",
                                 {"user": "bob", "pw": "hunter2", "api_token": "abc123"})
    assert "hunter2" not in text and "abc123" not in text
    assert "'user': 'bob'" in line["event"]  # what is not secret stays readable


def test_configure_logging_replaces_its_handler_and_quietens_kafka(json_logs):
    root = logging.getLogger()
    configure_logging("info", stream=json_logs)  # again, lower case: still one handler
    assert len(root.handlers) == 1 and root.level == logging.INFO
    assert logging.getLogger("kafka").level == logging.WARNING
    logging.getLogger("kafka.conn").info("connected")  # chatty kafka-python INFO: dropped
    logging.getLogger("stream_lstm.test").debug("not at INFO")
    logging.getLogger("stream_lstm.test").info("shown")
    # kafka-python's event loop on each task over 100 ms: nothing an operator can act on.
    logging.getLogger("kafka.net.selector").warning("Task ran for 0.140s (>0.100s threshold)")
    logging.getLogger("kafka.coordinator.consumer").warning("Rebalance listener took 2.000s")
    logging.getLogger("torch._subclasses.fake_tensor").info("FakeTensor cache stats:")  # (at exit)
    assert [line["event"] for line in lines(json_logs)] == ["shown", "Rebalance listener took 2.000s"]
    configure_logging(logging.ERROR, stream=json_logs)  # a number works too
    assert root.level == logging.ERROR and logging.getLogger("kafka").level == logging.ERROR


def test_log_startup_redacts_settings_given_as_a_plain_mapping(json_logs):
    log_startup(logging.getLogger("stream_lstm.trainer"), {"window": 64, "sasl_password": "hunter2"},
                {"input_topic": "readings"})
    (line,) = lines(json_logs)
    assert line["event"] == "stream-lstm started: input_topic=readings"
    assert line["settings"] == {"window": 64, "sasl_password": "***"}
    assert "hunter2" not in json_logs.getvalue()


def test_kafka_pythons_repeats_are_said_once_and_ours_always():
    from stream_lstm.logs import configure_logging

    out = io.StringIO()
    configure_logging("INFO", stream=out)
    try:
        for backoff in (0.1, 0.4, 1.5, 7.5):  # as kafka-python logs each bootstrap retry
            logging.getLogger("kafka.net.manager").warning("Bootstrap %s not ready; waiting %.2f secs",
                                                           "bootstrap-0", backoff)
            logging.getLogger("stream_lstm.worker").warning("broker not reachable; retrying")
        lines = [json.loads(line) for line in out.getvalue().splitlines()]
        assert [x["logger"] for x in lines].count("kafka.net.manager") == 1
        assert [x["logger"] for x in lines].count("stream_lstm.worker") == 4
    finally:
        configure_logging("INFO")


def test_secret_patterns_have_no_unbounded_repetition():
    """`[\\w.-]*password[\\w.-]*` backtracked quadratically: a forged 32,000-character device id
    in a log line took 46 s to mask, holding the GIL, and the health endpoint went silent."""
    import re

    from stream_lstm import logs

    for pattern in (logs._SECRET_KV.pattern, logs.URL_USERINFO.pattern):
        unescaped = re.sub(r"\\.", "", pattern)  # (an escaped \* or \+ is a character)
        assert not re.search(r"[*+]", unescaped), pattern


def test_a_huge_message_or_field_is_cut_and_says_so(json_logs):
    from stream_lstm import logs

    logging.getLogger("stream_lstm.test").warning("id %s", "d" * 400_000,
                                                  extra={"alert_id": "a" * 400_000, "token": "t" * 9000})
    line = lines(json_logs)[-1]
    assert line["event"] == "id " + "d" * (logs.MAX_MESSAGE - 3) + "...(391,811 more characters)"
    assert line["alert_id"] == "a" * logs.MAX_FIELD + "...(398,976 more characters)"
    assert line["token"] == "***"


def test_a_password_holding_a_slash_or_a_long_key_is_still_masked():
    """Bounding the patterns first dropped '/' from a URL's password (base64 secrets hold it)
    and keys longer than 40 characters after the keyword (a review)."""
    from stream_lstm.logs import url_without_credentials

    assert mask_secrets("posting to https://relay:pa/ss@am:9093/api") == "posting to https://***@am:9093/api"
    assert url_without_credentials("https://relay:pa/ss@am:9093/api") == "https://***@am:9093/api"
    key = "api_token_of_the_grafana_service_account_used_for_dashboards_x"
    assert mask_secrets(f"{key}=abcdef") == f"{key}=***"
    assert mask_secrets('password="' + "s" * 5000 + '"') == 'password="***"'


def test_a_long_exception_keeps_its_end_and_never_parts_a_key_from_its_value(json_logs):
    """Cut to its last 32 KB before masking, "...ssword=hunter2 ..." was logged (a review)."""
    from stream_lstm import logs

    for pad in range(4 * logs.MAX_MESSAGE - 200, 4 * logs.MAX_MESSAGE + 200, 7):  # cuts everywhere near
        try:
            raise ValueError("password=hunter2 " + "y" * pad)
        except ValueError:
            logging.getLogger("stream_lstm.test").exception("failed")
    for line in lines(json_logs):
        assert "hunter2" not in line["exception"] and line["exception"].endswith("y")


@pytest.mark.parametrize("level, kept", [("INFO", False), ("DEBUG", True)])
def test_kafka_pythons_lines_are_dropped_while_the_clients_close_and_ours_are_kept(json_logs, level, kept):
    # kafka-python 3.0.12's reader thread can race its own close and log an ERROR with a
    # traceback after the worker's clean stop (seen on a Ctrl-C of the processes mode).
    configure_logging(level, stream=json_logs)
    transport = logging.getLogger("kafka.net.transport")
    with kafka_closing():
        try:
            raise AttributeError("'NoneType' object has no attribute 'recv'")
        except AttributeError:
            transport.exception("Error receiving network data closing socket")
        logging.getLogger("stream_lstm.worker").warning("still said")
    transport.error("after the close: said again")
    events = [line["event"] for line in lines(json_logs)]
    closing = ["Error receiving network data closing socket"] if kept else []
    assert events == [*closing, "still said", "after the close: said again"]
    assert ("Traceback" in json_logs.getvalue()) is kept
