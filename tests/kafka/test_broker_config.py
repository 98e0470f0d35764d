"""The local broker's server.properties: one listener per protocol asked for, all on 127.0.0.1."""

from pathlib import Path

from stream_lstm.kafka.broker_config import server_properties


def props(**kw) -> dict[str, str]:
    text = server_properties(Path("/data"), 9092, 9093, **kw)
    return dict(line.split("=", 1) for line in text.splitlines())


def test_plaintext_only_by_default():
    p = props()
    assert p["advertised.listeners"] == "PLAINTEXT://127.0.0.1:9092"
    assert p["listener.security.protocol.map"] == "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT"
    assert p["controller.quorum.voters"] == "1@127.0.0.1:9093"
    assert p["log.dirs"] == "/data/kraft"
    assert not any(k.startswith(("sasl.", "ssl.")) for k in p)


def test_sasl_and_ssl_listeners():
    p = props(sasl_port=9094, ssl_port=9095, store_password="pw")
    assert p["advertised.listeners"] == ("PLAINTEXT://127.0.0.1:9092,"
                                         "SASL_PLAINTEXT://127.0.0.1:9094,SSL://127.0.0.1:9095")
    assert p["listeners"] == p["advertised.listeners"] + ",CONTROLLER://127.0.0.1:9093"
    assert p["sasl.enabled.mechanisms"] == "SCRAM-SHA-256,SCRAM-SHA-512"
    assert p["ssl.keystore.location"] == "/data/tls/broker.p12"
    assert p["ssl.keystore.password"] == p["ssl.key.password"] == "pw"
