"""The HTTP endpoint of every long-running command: ``/metrics``, ``/healthz``, ``/readyz``.

One small stdlib server on a daemon thread. It faces whatever can reach its port (Kubernetes
binds it on all interfaces for the kubelet and Prometheus), so it must not be held by its
clients: a connection has ``REQUEST_TIMEOUT_S`` for its whole request, at most
``MAX_CONNECTIONS`` are served at once, and a newcomer finding them full hangs up the oldest
still sending its request. (A client sending a header byte every few seconds kept a
connection for ever under a per-read timeout; 64 of them locked the kubelet's probes out,
and the pod was restarted again and again: a security review.) A client that hangs up is
not an error worth a line. What this does not cover: clients that ask for /metrics and never
read it hold their slots while the answer is written (each send has the timeout; only an
answer larger than the socket's buffer, ~4 MB here, can be held so).
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client.exposition import CONTENT_TYPE_LATEST

from stream_lstm.metrics import HealthState, Metrics

log = logging.getLogger("stream_lstm.metrics")


class MetricsServer(ThreadingHTTPServer):
    """The HTTP server :func:`serve_metrics` returns: ``.port`` and ``.shutdown()``.

    Example: see tests/test_endpoint.py::test_server_shutdown_frees_the_port
    """

    daemon_threads = True
    allow_reuse_address = True
    MAX_CONNECTIONS = 64
    REQUEST_TIMEOUT_S = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._slots = threading.BoundedSemaphore(self.MAX_CONNECTIONS)
        self._lock = threading.Lock()
        self._sending: dict[Any, float] = {}  # connections still sending their request: since

    def process_request(self, request: Any, client_address: Any) -> None:
        now = time.monotonic()
        with self._lock:
            late = [c for c, t in self._sending.items() if now - t > self.REQUEST_TIMEOUT_S]
            if not late and len(self._sending) >= self.MAX_CONNECTIONS:
                late = [min(self._sending, key=self._sending.__getitem__)]  # the oldest makes room
        for conn in late:  # (its thread's read ends at once, and the thread frees its slot)
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if not self._slots.acquire(timeout=1.0):  # full of answers being written: refused
            self.shutdown_request(request)
            return
        with self._lock:
            self._sending[request] = now
        request.settimeout(self.REQUEST_TIMEOUT_S)
        super().process_request(request, client_address)

    def request_read(self, request: Any) -> None:
        """The handler has the whole request: the connection is no longer one to hang up."""
        with self._lock:
            self._sending.pop(request, None)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.request_read(request)
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # (the stdlib prints a traceback to stderr, past the JSON logs and their secret filter)
        exc = sys.exc_info()[1]
        if not isinstance(exc, OSError):  # a client hanging up or timing out: not worth a line
            log.error("metrics endpoint: a connection failed", extra={"error": repr(exc)[:200]})

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def shutdown(self) -> None:
        """Stop serving and close the socket."""
        super().shutdown()
        self.server_close()


def serve_metrics(metrics: Metrics, health: HealthState, host: str, port: int) -> MetricsServer:
    """Serve ``/metrics``, ``/healthz`` and ``/readyz`` from a daemon thread; port 0 = any free one."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            self.server.request_read(self.request)  # type: ignore[attr-defined]
            path = self.path.split("?", 1)[0].rstrip("/") or "/"
            try:
                if path == "/metrics":
                    ok, parts = health.readiness()
                    if parts:  # keep the gauge in step with /readyz for whoever registered components
                        metrics.ready.set(1 if ok else 0)
                    self._send(200, metrics.exposition(), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    ok, detail = health.liveness()
                    self._send(200 if ok else 503, b"ok" if ok else f"stale: {detail}".encode())
                elif path == "/readyz":
                    ok, parts = health.readiness()
                    waiting = sorted(k for k, v in parts.items() if v != "ok") or ([] if parts else ["(none registered yet)"])
                    body = {"ready": ok, "components": parts, "not_ready": [] if ok else waiting}
                    self._send(200 if ok else 503, json.dumps(body).encode(), "application/json")
                else:
                    self._send(404, b"not found: try /metrics, /healthz, /readyz")
            except OSError:  # the client hung up (or stalled past the timeout): nobody to answer
                return
            except Exception as exc:  # never let a bad scrape kill the server thread
                log.exception("metrics endpoint failed", extra={"path": path})
                with contextlib.suppress(OSError):
                    self._send(500, f"error: {exc!r}".encode())

        def _send(self, status: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:  # scrapes and probes are not worth a line
            pass

    try:
        server = MetricsServer((host, port), Handler)
    except OSError as exc:  # taken (a second worker on the host), or a host name that is not one
        from stream_lstm.config import SettingsError

        raise SettingsError(f"cannot serve /metrics on {host}:{port}: {exc.strerror or exc} (set "
                            "STREAM_LSTM_METRICS_PORT, or STREAM_LSTM_METRICS_HOST; 0 turns it off)") from None
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server
