"""Kafka client factories: one place where settings become kafka-python keyword arguments.

Security settings (TLS and SASL) are applied here for every client, so the worker, the
tools and the tests connect the same way. Secrets go straight to kafka-python and are never
logged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.errors import KafkaError

from stream_lstm.config import Settings, SettingsError
from stream_lstm.connection_checks import bootstrap_problem, with_ports


def bootstrap_list(servers: str) -> list[str]:
    """``STREAM_LSTM_BOOTSTRAP_SERVERS`` as kafka-python takes it, or :class:`SettingsError`
    saying what is wrong (kafka-python's own error is a traceback from deep inside, or a 30 s
    wait for a blank one).

    >>> bootstrap_list("kafka-0:9092, kafka-1:9092")
    ['kafka-0:9092', 'kafka-1:9092']
    >>> bootstrap_list("kafka:abc")
    Traceback (most recent call last):
    ...
    stream_lstm.config.SettingsError: invalid setting STREAM_LSTM_BOOTSTRAP_SERVERS: 'kafka:abc' is not host:port (a comma-separated list of them)
    """
    if problem := bootstrap_problem(servers):  # (settings made by model_copy skip their checks)
        raise SettingsError(f"invalid setting STREAM_LSTM_BOOTSTRAP_SERVERS: {problem}")
    return [e.strip() for e in servers.split(",")]


def connection_kwargs(settings: Settings) -> dict[str, Any]:
    """kafka-python connection arguments (bootstrap, TLS, SASL) for any client."""
    kw: dict[str, Any] = {
        "bootstrap_servers": bootstrap_list(settings.bootstrap_servers),
        "security_protocol": settings.security_protocol,
    }
    if settings.security_protocol in ("SSL", "SASL_SSL"):
        kw["ssl_check_hostname"] = settings.ssl_check_hostname
        if settings.ssl_cafile:
            kw["ssl_cafile"] = str(settings.ssl_cafile)
        if settings.ssl_certfile:
            kw["ssl_certfile"] = str(settings.ssl_certfile)
        if settings.ssl_keyfile:
            kw["ssl_keyfile"] = str(settings.ssl_keyfile)
        if (passphrase := settings.resolved_password("ssl")) is not None:
            kw["ssl_password"] = passphrase
    if settings.security_protocol.startswith("SASL"):
        kw["sasl_mechanism"] = settings.sasl_mechanism
        kw["sasl_plain_username"] = settings.sasl_username
        kw["sasl_plain_password"] = settings.resolved_password("sasl")
    return kw


# How long a client made while the worker's loop runs (a restore, a replay slice, a fresh
# producer after a failure) waits for its first broker. kafka-python's default is 30 s, the
# liveness limit itself: with the broker down, each such client held the loop, /healthz and
# SIGTERM for 30 s. Bootstrapping takes milliseconds to a few round trips; the caller retries
# on its next turn with a fresh client.
LOOP_BOOTSTRAP_TIMEOUT_MS = 10_000


class KafkaConnectError(RuntimeError):
    """Could not connect to Kafka; the message says where, how, and what to check."""


@contextmanager
def _explained(settings: Settings) -> Iterator[None]:
    # kafka-python reports a refused SASL login as a bootstrap timeout; say what it likely means.
    try:
        yield
    except KafkaError as exc:
        how = settings.security_protocol
        hint = "is the broker running and reachable?"
        if how.startswith("SASL"):
            how += f"/{settings.sasl_mechanism} as {settings.sasl_username!r}"
            hint = ("check STREAM_LSTM_SASL_USERNAME / STREAM_LSTM_SASL_PASSWORD and the mechanism, "
                    "and that the broker's listener at that address speaks SASL at all (it "
                    "refuses bad credentials, and a plaintext listener a SASL handshake, by "
                    "closing the connection)")
        elif how == "SSL":
            hint = "check STREAM_LSTM_SSL_CAFILE and the broker's certificate"
        raise KafkaConnectError(
            f"cannot connect to Kafka at {with_ports(settings.bootstrap_servers)} over {how}: {exc}; {hint}"
        ) from exc


def _build(settings: Settings, factory: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    with _explained(settings):
        return factory(*args, **connection_kwargs(settings), **kw)


def make_admin(settings: Settings, **extra: Any) -> KafkaAdminClient:
    """An admin client (topic creation, offsets, health checks)."""
    return _build(settings, KafkaAdminClient, client_id="stream-lstm-admin", **extra)


def make_producer(settings: Settings, **extra: Any) -> KafkaProducer:
    """A producer with durable defaults: acks=all, idempotence on, bounded in-flight."""
    kw: dict[str, Any] = {
        "acks": "all",
        "linger_ms": 5,
        "batch_size": 256 * 1024,
        "max_request_size": 4 * 1024 * 1024,
        "compression_type": None if settings.compression_type == "none" else settings.compression_type,
    }
    kw.update(extra)
    producer = _build(settings, KafkaProducer, **kw)
    if kw.get("allow_auto_create_topics") is False:
        # (kafka-python 3.0.12 takes the option and does not pass it to its metadata, which asks
        # the broker to create the topic: set where it is read; pinned by tests/relay/test_open_store.py)
        producer._metadata.config["allow_auto_create_topics"] = False
    return producer


def make_consumer(settings: Settings, *topics: str, **extra: Any) -> KafkaConsumer:
    """A consumer; pass ``group_id`` and friends in ``extra``."""
    return _build(settings, KafkaConsumer, *topics, **extra)


def group_timeouts(settings: Settings) -> dict[str, int]:
    """A group member's liveness settings, for every consumer in a group (the worker's, the
    trainer's, the alert relay's): the session and poll limits a broker may bound.

    >>> from stream_lstm.config import Settings
    >>> group_timeouts(Settings(session_timeout_ms=6_000))["heartbeat_interval_ms"]
    2000
    """
    return {"max_poll_interval_ms": settings.max_poll_interval_ms,
            "session_timeout_ms": settings.session_timeout_ms,
            # kafka-python's 3 s heartbeat would refuse a session timeout of 3 s or less.
            "heartbeat_interval_ms": min(3000, settings.session_timeout_ms // 3)}
