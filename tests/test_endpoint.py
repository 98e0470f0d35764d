"""The HTTP endpoint's connections: what its clients cannot do to it (its content:
test_metrics.py)."""

from __future__ import annotations

import socket
import time
import urllib.request

import pytest

from stream_lstm.endpoint import MetricsServer, serve_metrics
from stream_lstm.metrics import HealthState, Metrics


def healthz(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
        return r.status


def test_server_shutdown_frees_the_port():
    server = serve_metrics(Metrics(), HealthState(), "127.0.0.1", 0)
    port = server.port
    assert port > 0
    server.shutdown()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2)


def test_idle_connections_neither_pile_up_nor_lock_out_a_probe(monkeypatch):
    """Each connection held a thread for as long as it stayed open: 200 half-sent requests were
    200 threads. The server holds at most MAX_CONNECTIONS at once; a newcomer finding them
    full hangs up the oldest still sending, and each is dropped after the timeout anyway."""
    monkeypatch.setattr(MetricsServer, "MAX_CONNECTIONS", 4)
    monkeypatch.setattr(MetricsServer, "REQUEST_TIMEOUT_S", 1.0)
    server = serve_metrics(Metrics(), HealthState(), "127.0.0.1", 0)
    idle = []
    try:
        for _ in range(4):
            idle.append(socket.create_connection(("127.0.0.1", server.port), timeout=5))
            idle[-1].sendall(b"GET /healthz HTTP/1.1\r\n")  # and never the rest
            time.sleep(0.05)  # (an order: the first is the oldest)
        assert healthz(server.port) == 200  # the server was full: the oldest made room
        assert idle[0].recv(1024) == b""  # hung up, unanswered
        for conn in idle[1:]:  # each dropped after the timeout, unanswered
            assert conn.recv(1024) == b""
        assert healthz(server.port) == 200
    finally:
        for conn in idle:
            conn.close()
        server.shutdown()


def test_clients_trickling_their_requests_cannot_lock_out_a_probe(monkeypatch):
    """A read timeout is per read: a client sending a header byte every few seconds held its
    connection for ever, and MAX_CONNECTIONS of them locked out the kubelet's probes (a security
    review: any pod could get the worker restarted again and again). The request as a whole
    has REQUEST_TIMEOUT_S, and a newcomer hangs up the oldest trickler when the server is full."""
    monkeypatch.setattr(MetricsServer, "MAX_CONNECTIONS", 4)
    monkeypatch.setattr(MetricsServer, "REQUEST_TIMEOUT_S", 1.5)
    server = serve_metrics(Metrics(), HealthState(), "127.0.0.1", 0)
    tricklers = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(4)]
    try:
        for conn in tricklers:
            conn.sendall(b"GET /healthz HTTP/1.1\r\n")
        for second in range(4):  # a byte each, every 0.5 s: never silent past the read timeout
            assert healthz(server.port) == 200, f"after {second * 0.5} s of trickling"
            for conn in tricklers:
                try:
                    conn.sendall(b"X")
                except OSError:  # hung up: what the server is meant to do
                    pass
            time.sleep(0.5)
        assert all(conn.recv(1024) == b"" for conn in tricklers)  # all hung up by now
    finally:
        for conn in tricklers:
            conn.close()
        server.shutdown()


def test_a_client_that_hangs_up_mid_answer_costs_no_log_line(capfd, caplog):
    """A client that sent its request and reset the connection gave an ERROR line with a
    traceback, a second one for the 500 the server then tried to send, and a raw traceback on
    stderr from the stdlib (past the JSON logs and their secret filter): ~3 KB a connection."""
    import struct

    server = serve_metrics(Metrics(), HealthState(), "127.0.0.1", 0)
    try:
        with caplog.at_level("DEBUG", logger="stream_lstm.metrics"):
            for _ in range(20):
                conn = socket.create_connection(("127.0.0.1", server.port), timeout=5)
                conn.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()  # a reset, not a close
            assert healthz(server.port) == 200  # (and the server still answers)
            time.sleep(0.5)  # (the handler threads finish after the resets)
    finally:
        server.shutdown()
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "WARNING")]
    assert "Traceback" not in capfd.readouterr().err
