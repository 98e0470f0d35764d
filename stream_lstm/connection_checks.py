"""What the connection settings must be, checked when the settings load (config.py): the
bootstrap addresses, the topic names, and the TLS and SASL settings, each a one-line
``ValueError`` naming the setting, at start-up rather than a traceback from inside
kafka-python or a bootstrap timeout minutes later.

>>> bootstrap_problem("kafka-0:9092, kafka-1, [::1]:9093") is None, bootstrap_problem("kafka:abc")
(True, "'kafka:abc' is not host:port (a comma-separated list of them)")
>>> topic_problem("sensor-readings.v2") is None, topic_problem("bad topic!")
(True, "'bad topic!' is not a Kafka topic name: 1 to 249 of ASCII letters, digits, '.', '_' and '-'")
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

# host, host:port, [IPv6]:port; kafka-python's default port is 9092.
_HOST_PORT = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[^\s,:\[\]/@]+)(?::(\d{1,5}))?")
# Kafka's own rule (org.apache.kafka.common.internals.Topic): the broker refuses any other.
_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")
_SASL = ("sasl_mechanism", "sasl_username", "sasl_password", "sasl_password_file")
_SSL = ("ssl_cafile", "ssl_certfile", "ssl_keyfile", "ssl_password", "ssl_password_file")


def bootstrap_problem(servers: str) -> str | None:
    """What is wrong with a bootstrap list (kafka-python's own error is a traceback from deep
    inside, or a 30 s wait for a blank one); None if nothing."""
    for entry in (e.strip() for e in servers.split(",")):
        m = _HOST_PORT.fullmatch(entry)
        if "@" in entry:  # (never echoed: what comes before the @ is likely a password)
            return (f"'***@{entry.rpartition('@')[2]}' is not host:port: credentials go in "
                    "STREAM_LSTM_SASL_USERNAME and STREAM_LSTM_SASL_PASSWORD, not in the address")
        if m is None or not 0 < int(m[2] or 9092) < 65536:
            return f"{entry!r} is not host:port (a comma-separated list of them)"
    return None


def with_ports(servers: str) -> str:
    """The bootstrap list as the client dials it: kafka-python's 9092 where none is given.

    >>> with_ports("localhost, kafka-1:9093, [::1]")
    'localhost:9092, kafka-1:9093, [::1]:9092'
    """
    entries = [e.strip() for e in servers.split(",")]
    return ", ".join(e if (m := _HOST_PORT.fullmatch(e)) is None or m[2] else f"{e}:9092" for e in entries)


def topic_problem(name: str) -> str | None:
    """What is wrong with a topic name (the broker's refusal came as a traceback, exit 1, and
    a restart for ever); None if nothing."""
    if _TOPIC.fullmatch(name) and name not in (".", ".."):
        return None
    return f"{name!r} is not a Kafka topic name: 1 to 249 of ASCII letters, digits, '.', '_' and '-'"


def check_security(s: Any) -> None:
    """TLS and SASL settings that fit the protocol, files that can be read, a key its
    certificate and passphrase load, and SASL credentials; raises ``ValueError``."""
    if not s.security_protocol.startswith("SASL"):
        if given := [k for k in _SASL if getattr(s, k) is not None]:
            # Ignored, the connection would be unauthenticated: likely a forgotten protocol.
            raise ValueError(f"{', '.join(given)} set but security_protocol is "
                             f"{s.security_protocol}: set SASL_SSL or SASL_PLAINTEXT to use them")
    if not s.security_protocol.endswith("SSL"):
        given = [k for k in _SSL if getattr(s, k) is not None] + ["ssl_check_hostname"] * (not s.ssl_check_hostname)
        if given:
            raise ValueError(f"{', '.join(given)} set but security_protocol is "
                             f"{s.security_protocol}: set SSL or SASL_SSL to use them")
    for k in ("ssl_cafile", "ssl_certfile", "ssl_keyfile", "ssl_password_file"):  # at start, not a timeout
        if (path := getattr(s, k)) is not None and not (os.access(path, os.R_OK) and not os.path.isdir(path)):
            raise ValueError(f"{k} cannot be read: {path}" + " (a directory)" * os.path.isdir(path))
    if s.ssl_certfile is not None:
        _check_client_key(s)
    if s.security_protocol.startswith("SASL"):
        _check_sasl(s)


def _check_sasl(s: Any) -> None:
    if not s.sasl_mechanism:
        raise ValueError("sasl_mechanism is required with a SASL security_protocol")
    if not s.sasl_username:
        raise ValueError("sasl_username is required with a SASL security_protocol")
    try:
        password = s.resolved_password("sasl")  # the file read as the clients will
    except OSError as exc:
        raise ValueError(f"sasl_password_file cannot be read: {exc.strerror} "
                         f"({s.sasl_password_file})") from None
    if password is None:
        raise ValueError("sasl_password or sasl_password_file is required with a SASL "
                         "security_protocol")


def _check_client_key(s: Any) -> None:
    # Without its passphrase OpenSSL asked for it at every connect; the worker gave up later.
    import ssl

    try:
        ssl.create_default_context().load_cert_chain(
            s.ssl_certfile, s.ssl_keyfile, password=s.resolved_password("ssl") or "")
    except (ssl.SSLError, OSError) as exc:
        try:
            encrypted = b"ENCRYPTED" in Path(s.ssl_keyfile or s.ssl_certfile).read_bytes()[:4096]
        except OSError:  # (a directory, say)
            encrypted = False
        given = s.resolved_password("ssl") is not None
        hint = (": ssl_certfile is not the certificate of ssl_keyfile" if "KEY_VALUES_MISMATCH" in str(exc)
                else "" if not encrypted else ": is ssl_password (or its file) the key's passphrase?"
                if given else ": an encrypted key needs ssl_password or ssl_password_file")
        raise ValueError(f"ssl_certfile / ssl_keyfile cannot be loaded ({exc!s:.120}){hint}") from None
