"""Kafka client factories (kafka/clients.py): settings become kafka-python arguments (TLS and
SASL only when asked for, the password from the environment or a file), an unreachable broker
is one clear error that says where and what to check, and SASL/SCRAM and TLS end to end.

The secured tests run against ``secure_broker`` (a second real broker with a SASL_PLAINTEXT
listener holding SCRAM users, and an SSL listener whose certificate our own throwaway CA signed).
"""

import json
import logging

import pytest

from stream_lstm.config import Settings, SettingsError, load_settings
from stream_lstm.kafka.clients import (
    KafkaConnectError,
    connection_kwargs,
    make_admin,
    make_consumer,
    make_producer,
)
from stream_lstm.kafka.local_broker import free_port
from stream_lstm.kafka.topics import TopicSpec, ensure_topics

pytestmark = [pytest.mark.timeout(180)]

USER, PASSWORD = "alice", "alice-secret"  # tests/conftest.py SECURE_USERS


def round_trip(settings: Settings, topic: str, n: int = 5) -> list[bytes]:
    """Create the topic, produce ``n`` messages and read them back through a group."""
    ensure_topics(settings, [TopicSpec(topic, 1)])
    producer = make_producer(settings)
    try:
        for i in range(n):
            producer.send(topic, f"m{i}".encode()).get(timeout=30)
    finally:
        producer.close()
    consumer = make_consumer(settings, topic, group_id=f"{topic}-g", auto_offset_reset="earliest",
                             consumer_timeout_ms=60_000)
    try:
        return [m.value for _, m in zip(range(n), consumer, strict=False)]
    finally:
        consumer.close()


def sasl_settings(broker, mechanism, user=USER, password=PASSWORD, **kw) -> Settings:
    return Settings(bootstrap_servers=broker.sasl_bootstrap, security_protocol="SASL_PLAINTEXT",
                    sasl_mechanism=mechanism, sasl_username=user, sasl_password=password, **kw)


@pytest.mark.kafka
@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_scram_users_produce_and_consume(secure_broker, topic_name, mechanism):
    s = sasl_settings(secure_broker, mechanism)
    assert round_trip(s, topic_name) == [f"m{i}".encode() for i in range(5)]


@pytest.mark.kafka
def test_scram_password_from_a_file(secure_broker, topic_name, tmp_path):
    pw = tmp_path / "password"
    pw.write_text("bob-secret\n")
    s = Settings(bootstrap_servers=secure_broker.sasl_bootstrap, security_protocol="SASL_PLAINTEXT",
                 sasl_mechanism="SCRAM-SHA-512", sasl_username="bob", sasl_password_file=pw)
    assert round_trip(s, topic_name, n=2) == [b"m0", b"m1"]


@pytest.mark.kafka
@pytest.mark.parametrize("user,password", [(USER, "wrong"), ("mallory", PASSWORD)])
@pytest.mark.parametrize("factory", [make_admin, make_producer])
def test_bad_credentials_fail_clearly(secure_broker, caplog, factory, user, password):
    s = sasl_settings(secure_broker, "SCRAM-SHA-256", user=user, password=password)
    failures_before = secure_broker.log_file.read_text().count("Failed authentication")
    caplog.set_level(logging.ERROR, logger="kafka")
    # kafka-python 3 retries until its bootstrap deadline and then raises a timeout. It logs
    # SaslAuthenticationFailedError only when it reads the broker's error response before the
    # broker closes the connection (a race), so the broker's log is the reliable witness.
    with pytest.raises(KafkaConnectError, match="SASL_PLAINTEXT/SCRAM-SHA-256 as .*check STREAM_LSTM_SASL_USERNAME") as err:
        factory(s, bootstrap_timeout_ms=3000)
    assert password not in str(err.value)
    failures = secure_broker.log_file.read_text().split("Failed authentication")[1 + failures_before:]
    assert failures, "the broker did not record a failed authentication"
    assert all("invalid credentials with SASL mechanism SCRAM-SHA-256" in f for f in failures)
    assert password not in caplog.text


@pytest.mark.kafka
def test_tls_with_the_generated_ca(secure_broker, topic_name):
    s = Settings(bootstrap_servers=secure_broker.ssl_bootstrap, security_protocol="SSL",
                 ssl_cafile=secure_broker.ca_file)
    assert round_trip(s, topic_name, n=3) == [b"m0", b"m1", b"m2"]


@pytest.mark.kafka
def test_tls_without_our_ca_is_refused(secure_broker, caplog):
    caplog.set_level(logging.ERROR, logger="kafka")
    s = Settings(bootstrap_servers=secure_broker.ssl_bootstrap, security_protocol="SSL")
    with pytest.raises(KafkaConnectError, match="STREAM_LSTM_SSL_CAFILE"):
        make_admin(s, bootstrap_timeout_ms=4000)  # the system CAs do not know our CA
    assert "CERTIFICATE_VERIFY_FAILED" in caplog.text


# ---- settings -> kafka-python arguments, no broker needed ---------------------------------
def test_plaintext_has_only_the_servers_and_the_protocol():
    kw = connection_kwargs(Settings(bootstrap_servers="k1:9092,k2:9092"))
    assert kw == {"bootstrap_servers": ["k1:9092", "k2:9092"], "security_protocol": "PLAINTEXT"}
    # TLS or SASL settings the protocol would ignore (an unauthenticated connection where one
    # was meant) are refused when the settings load (tests/test_config.py).


def client_certificate(folder, passphrase=None):
    """A self-signed client certificate and its key (encrypted with ``passphrase``), by openssl."""
    import subprocess

    key, cert = folder / "me.key", folder / "me.pem"
    secret = ["-aes256", "-pass", f"pass:{passphrase}"] if passphrase else []
    subprocess.run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
                    *secret, "-out", str(key)], check=True, capture_output=True)
    subprocess.run(["openssl", "req", "-x509", "-new", "-key", str(key), "-subj", "/CN=me", "-days", "1",
                    *(["-passin", f"pass:{passphrase}"] if passphrase else []), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


def test_an_encrypted_client_key_needs_its_passphrase_said_at_start(tmp_path, monkeypatch):
    """Without one OpenSSL asked for it on the terminal at every connect, and the worker gave
    up 35 s later blaming the CA certificate."""
    cert, key = client_certificate(tmp_path, passphrase="hunter22")
    tls = {"security_protocol": "SSL", "ssl_certfile": cert, "ssl_keyfile": key}
    with pytest.raises(SettingsError, match="encrypted key needs STREAM_LSTM_SSL_PASSWORD"):
        load_settings(**tls)
    with pytest.raises(SettingsError, match="cannot be loaded .*: is STREAM_LSTM_SSL_PASSWORD "
                       r"\(or its file\) the key's passphrase\?"):
        load_settings(**tls, ssl_password="wrong")
    (tmp_path / "passphrase").write_text("hunter22\n")
    kw = connection_kwargs(load_settings(**tls, ssl_password_file=tmp_path / "passphrase"))
    assert kw["ssl_password"] == "hunter22" and kw["ssl_keyfile"] == str(key)
    monkeypatch.setenv("STREAM_LSTM_SSL_PASSWORD", "hunter22")
    assert load_settings(**tls).redacted()["ssl_password"] == "***"
    monkeypatch.delenv("STREAM_LSTM_SSL_PASSWORD")
    other = tmp_path / "other"
    other.mkdir()
    _, plain_key = client_certificate(other)  # a key that is not the certificate's: said as such
    with pytest.raises(SettingsError, match="cannot be loaded") as refused:
        load_settings(security_protocol="SSL", ssl_certfile=cert, ssl_keyfile=plain_key)
    assert "encrypted" not in str(refused.value)
    assert str(refused.value).endswith("STREAM_LSTM_SSL_CERTFILE is not the certificate of STREAM_LSTM_SSL_KEYFILE")
    # The encrypted key, its right passphrase, another key's certificate: not "the passphrase?"
    other_cert, _ = client_certificate(other)
    with pytest.raises(SettingsError, match="cannot be loaded") as refused:
        load_settings(security_protocol="SSL", ssl_certfile=other_cert, ssl_keyfile=key, ssl_password="hunter22")
    assert str(refused.value).endswith("STREAM_LSTM_SSL_CERTFILE is not the certificate of STREAM_LSTM_SSL_KEYFILE")


def test_ssl_passes_the_ca_the_client_certificate_and_the_hostname_check(tmp_path):
    (tmp_path / "ca.pem").write_text("(PEM)")  # (settings refuse files they cannot read)
    client_certificate(tmp_path)  # (a client key and certificate are loaded when the settings are)
    kw = connection_kwargs(Settings(security_protocol="SSL", ssl_cafile=tmp_path / "ca.pem",
                                    ssl_certfile=tmp_path / "me.pem", ssl_keyfile=tmp_path / "me.key",
                                    ssl_check_hostname=False))
    assert kw["ssl_cafile"] == str(tmp_path / "ca.pem") and kw["ssl_certfile"] == str(tmp_path / "me.pem")
    assert kw["ssl_keyfile"] == str(tmp_path / "me.key") and kw["ssl_check_hostname"] is False
    assert not any(k.startswith("sasl") for k in kw)
    assert set(connection_kwargs(Settings(security_protocol="SSL"))) == {
        "bootstrap_servers", "security_protocol", "ssl_check_hostname"}  # the system CAs


def test_sasl_ssl_has_both_and_the_password_comes_from_its_file(tmp_path):
    pw = tmp_path / "password"
    pw.write_text("s3cret\n")
    (tmp_path / "ca").write_text("(PEM)")
    kw = connection_kwargs(Settings(security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512",
                                    sasl_username="svc", sasl_password_file=pw, ssl_cafile=tmp_path / "ca"))
    assert (kw["sasl_mechanism"], kw["sasl_plain_username"], kw["sasl_plain_password"]) == (
        "SCRAM-SHA-512", "svc", "s3cret")
    assert kw["ssl_cafile"] == str(tmp_path / "ca")
    kw = connection_kwargs(Settings(security_protocol="SASL_PLAINTEXT", sasl_mechanism="PLAIN",
                                    sasl_username="svc", sasl_password="env-pw", sasl_password_file=pw))
    assert kw["sasl_plain_password"] == "env-pw" and "ssl_cafile" not in kw  # the environment wins


@pytest.mark.parametrize("factory", [make_admin, make_producer, make_consumer])
def test_no_broker_is_one_error_that_says_where_and_what_to_check(factory):
    s = Settings(bootstrap_servers=f"127.0.0.1:{free_port()}")
    with pytest.raises(KafkaConnectError, match=f"cannot connect to Kafka at {s.bootstrap_servers} "
                       "over PLAINTEXT: .*is the broker running and reachable"):
        factory(s, bootstrap_timeout_ms=1000)


@pytest.mark.kafka
def test_the_factories_connect_with_their_defaults(settings_factory, topic_name):
    s = settings_factory()
    producer = make_producer(s)
    try:
        assert producer.config["acks"] == -1 and producer.config["enable_idempotence"]  # acks=all
        producer.send(topic_name, b"v", key=b"k").get(timeout=30)
    finally:
        producer.close()
    consumer = make_consumer(s, topic_name, group_id=f"{topic_name}-g", auto_offset_reset="earliest",
                             consumer_timeout_ms=60_000)
    try:
        assert [m.value for _, m in zip(range(1), consumer, strict=False)] == [b"v"]
    finally:
        consumer.close()
    admin = make_admin(s)
    try:
        assert topic_name in admin.list_topics() and admin.config["client_id"] == "stream-lstm-admin"
    finally:
        admin.close()


@pytest.mark.parametrize("codec", ["none", "gzip", "snappy", "lz4", "zstd"])
def test_compression_type_reaches_the_broker(kafka_broker, settings_factory, topic_name, codec):
    """What the broker stores of 200 forecast-like records of ~1 KB: compressed with each codec
    to well under half their bytes (NAB forecasts with gzip: ~2.5x, docs/benchmarks.md), not
    without; and read back whole."""
    s = settings_factory(compression_type=codec)
    values = [json.dumps({"device_id": f"pump-{i % 20}", "ts": 1_700_000_000.0 + i,
                          "forecast": [20.0 + 0.125 * ((i + h) % 8) for h in range(12)],
                          "lower": [19.0] * 12, "upper": [21.5] * 12}).encode() for i in range(200)]
    producer = make_producer(s)
    try:
        assert producer.config["compression_type"] == (None if codec == "none" else codec)
        for v in values:
            producer.send(topic_name, v, key=b"k", partition=0)
        producer.flush(30)
    finally:
        producer.close()
    stored = sum(f.stat().st_size for f in (kafka_broker.data_dir / "kraft").glob(f"{topic_name}-0/*.log"))
    raw = sum(map(len, values))
    assert (stored < raw / 2) if codec != "none" else (stored > raw)
    consumer = make_consumer(s, topic_name, auto_offset_reset="earliest", consumer_timeout_ms=60_000)
    try:
        assert [m.value for _, m in zip(range(len(values)), consumer, strict=False)] == values
    finally:
        consumer.close()


@pytest.mark.parametrize("servers", ["kafka:abc", "kafka:", "", "a:9092,,b:9092", "kafka:70000", "kafka 1:9092"])
def test_a_malformed_bootstrap_list_is_one_line_naming_the_variable(servers):
    # kafka-python raised a ValueError from deep inside (a traceback, exit 1), or waited 30 s.
    from stream_lstm.config import SettingsError, load_settings

    said = "invalid setting STREAM_LSTM_BOOTSTRAP_SERVERS: .* is not host:port"
    with pytest.raises(SettingsError, match=said):  # when the settings load, before any work
        load_settings(bootstrap_servers=servers)
    with pytest.raises(SettingsError, match=said):  # (a copy's update is not checked by pydantic)
        connection_kwargs(Settings().model_copy(update={"bootstrap_servers": servers}))
    ok = Settings(bootstrap_servers="kafka-0:9092, kafka-1, [::1]:9093")
    assert connection_kwargs(ok)["bootstrap_servers"] == ["kafka-0:9092", "kafka-1", "[::1]:9093"]
