"""The connection settings' checks (connection_checks.py), as loading the settings runs them:
topic names and bootstrap addresses Kafka would refuse, TLS and SASL settings the protocol
would ignore, and missing SASL credentials, each one line naming the variable."""

import pytest

from stream_lstm.config import SettingsError, load_settings


@pytest.mark.parametrize(("env", "said"), [
    ({"INPUT_TOPIC": "bad topic!"}, "STREAM_LSTM_INPUT_TOPIC 'bad topic!' is not a Kafka topic name"),
    ({"ALERTS_TOPIC": "x" * 250}, "STREAM_LSTM_ALERTS_TOPIC 'xxx"),
    ({"GROUP_ID": "plant/7"}, "STREAM_LSTM_GROUP_ID: 'plant/7': letters, digits, '.', '_' and '-' only"),
    ({"BOOTSTRAP_SERVERS": "127.0.0.1:abc"}, "STREAM_LSTM_BOOTSTRAP_SERVERS: '127.0.0.1:abc' is not host:port"),
    ({"BOOTSTRAP_SERVERS": "app:s3cret@broker:9092"},  # (the password was echoed back)
     "STREAM_LSTM_BOOTSTRAP_SERVERS: '***@broker:9092' is not host:port: credentials go in STREAM_LSTM_SASL_USERNAME"),
])
def test_a_topic_name_or_address_kafka_refuses_is_one_line_when_the_settings_load(monkeypatch, env, said):
    # The broker's InvalidTopicError was a traceback and exit 1 (restarted for ever); a bad
    # address came after the model had loaded.
    for k, v in env.items():
        monkeypatch.setenv(f"STREAM_LSTM_{k}", v)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert said in str(caught.value) and "\n" not in str(caught.value) and "s3cret" not in str(caught.value)
    monkeypatch.undo()
    assert load_settings(group_id="plant-7", input_topic="a.b_c-1").input_topic == "a.b_c-1"


def test_tls_or_sasl_settings_the_protocol_would_ignore_are_refused(tmp_path):
    # Ignored, they would leave an unauthenticated (or unencrypted) connection where one
    # was meant: most likely STREAM_LSTM_SECURITY_PROTOCOL was forgotten.
    with pytest.raises(SettingsError, match="STREAM_LSTM_SASL_USERNAME, STREAM_LSTM_SASL_PASSWORD set but STREAM_LSTM_SECURITY_PROTOCOL is PLAINTEXT"):
        load_settings(sasl_username="svc", sasl_password="pw")
    with pytest.raises(SettingsError, match="STREAM_LSTM_SSL_CAFILE set but STREAM_LSTM_SECURITY_PROTOCOL is SASL_PLAINTEXT"):
        load_settings(security_protocol="SASL_PLAINTEXT", sasl_mechanism="PLAIN", sasl_username="svc",
                      sasl_password="pw", ssl_cafile=tmp_path / "ca.pem")
    with pytest.raises(SettingsError, match="STREAM_LSTM_SSL_CHECK_HOSTNAME set but STREAM_LSTM_SECURITY_PROTOCOL is PLAINTEXT"):
        load_settings(ssl_check_hostname=False)  # (no TLS: no host name to check)
    with pytest.raises(SettingsError, match="STREAM_LSTM_SASL_MECHANISM set but STREAM_LSTM_SECURITY_PROTOCOL is SSL"):
        load_settings(security_protocol="SSL", sasl_mechanism="PLAIN")
    # A CA file that is not there: said at start, not after a TLS bootstrap timeout.
    with pytest.raises(SettingsError, match=f"STREAM_LSTM_SSL_CAFILE cannot be read: {tmp_path / 'ca.pem'}"):
        load_settings(security_protocol="SSL", ssl_cafile=tmp_path / "ca.pem")
    # A directory where a file belongs: the same line (it was a traceback from the key's check).
    with pytest.raises(SettingsError, match=f"STREAM_LSTM_SSL_PASSWORD_FILE cannot be read: {tmp_path} \\(a directory\\)$"):
        load_settings(security_protocol="SSL", ssl_password_file=tmp_path)
    (tmp_path / "ca.pem").write_text("(a PEM)")
    assert load_settings(security_protocol="SASL_SSL", sasl_mechanism="PLAIN", sasl_username="svc",
                         sasl_password="pw", ssl_cafile=tmp_path / "ca.pem").ssl_cafile


def test_sasl_without_credentials_is_one_clear_line_at_start(tmp_path):
    sasl = {"security_protocol": "SASL_SSL", "sasl_mechanism": "PLAIN"}
    with pytest.raises(SettingsError, match="STREAM_LSTM_SASL_USERNAME is required"):
        load_settings(**sasl, sasl_password="pw")
    with pytest.raises(SettingsError, match="STREAM_LSTM_SASL_PASSWORD or STREAM_LSTM_SASL_PASSWORD_FILE is required"):
        load_settings(**sasl, sasl_username="svc")
    missing = tmp_path / "nowhere" / "pw"
    with pytest.raises(SettingsError, match=f"STREAM_LSTM_SASL_PASSWORD_FILE cannot be read: .*{missing}"):
        load_settings(**sasl, sasl_username="svc", sasl_password_file=missing)
    assert load_settings(**sasl, sasl_username="svc", sasl_password="pw").sasl_username == "svc"
