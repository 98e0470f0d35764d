"""Kafka client factories: one place where settings become kafka-python keyword arguments.

Security settings (TLS and SASL) are applied here for every client, so the worker, the
tools and the tests connect the same way. Secrets go straight to kafka-python and are never
logged.
"""

from __future__ import annotations

from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer

from stream_lstm.config import Settings


def connection_kwargs(settings: Settings) -> dict[str, Any]:
    """kafka-python connection arguments (bootstrap, TLS, SASL) for any client."""
    kw: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap_servers.split(","),
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
    if settings.security_protocol.startswith("SASL"):
        kw["sasl_mechanism"] = settings.sasl_mechanism
        kw["sasl_plain_username"] = settings.sasl_username
        kw["sasl_plain_password"] = settings.resolved_sasl_password()
    return kw


def make_admin(settings: Settings, **extra: Any) -> KafkaAdminClient:
    """An admin client (topic creation, offsets, health checks)."""
    return KafkaAdminClient(**connection_kwargs(settings), client_id="stream-lstm-admin", **extra)


def make_producer(settings: Settings, **extra: Any) -> KafkaProducer:
    """A producer with durable defaults: acks=all, idempotence on, bounded in-flight."""
    kw: dict[str, Any] = {
        "acks": "all",
        "linger_ms": 5,
        "batch_size": 256 * 1024,
        "max_request_size": 4 * 1024 * 1024,
        "compression_type": None,
    }
    kw.update(extra)
    return KafkaProducer(**connection_kwargs(settings), **kw)


def make_consumer(settings: Settings, *topics: str, **extra: Any) -> KafkaConsumer:
    """A consumer; pass ``group_id`` and friends in ``extra``."""
    return KafkaConsumer(*topics, **connection_kwargs(settings), **extra)
