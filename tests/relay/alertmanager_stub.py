"""An HTTP server that takes ``POST /api/v2/alerts`` as Alertmanager does, and keeps what it got.

Not a mock of the relay: a stand-in for Alertmanager's API (v2, ``postableAlerts``), checking
each alert as Alertmanager validates it (labels, RFC 3339 times, ``endsAt`` not before
``startsAt``). ``fail`` answers that many requests with 503 first; ``redirect`` answers every
request with a 302 to a login page (which itself would answer a GET with 200); ``refuse`` names
device ids whose alerts are refused with 400, as Alertmanager refuses an alert it cannot take.
"""

from __future__ import annotations

import json
import threading
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class AlertmanagerStub:
    def __init__(self, tls: tuple[str, str] | None = None) -> None:
        """``tls``: (certificate, key) files: served over https on ``localhost``."""
        self.received: list[list[dict]] = []
        self.headers: list[dict] = []
        self.fail = 0
        self.redirect = False
        self.refuse: set[str] = set()
        self.status_for_all: int | None = None  # every POST answered with it (401: bad credentials)
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.path != "/api/v2/alerts":
                    return self._answer(404)
                if stub.status_for_all is not None:
                    return self._answer(stub.status_for_all)
                if stub.fail > 0:
                    stub.fail -= 1
                    return self._answer(503)
                if stub.redirect:
                    self.send_response(302)
                    self.send_header("Location", "/login")
                    self.send_header("Content-Length", "0")
                    return self.end_headers()
                alerts = json.loads(body)
                if any(a["labels"].get("device_id") in stub.refuse for a in alerts):
                    return self._answer(400)
                for a in alerts:
                    assert a["labels"] and all(isinstance(v, str) for v in a["labels"].values()), a
                    starts, ends = (datetime.fromisoformat(a[k].replace("Z", "+00:00")) for k in ("startsAt", "endsAt"))
                    assert ends >= starts, a
                stub.headers.append(dict(self.headers))
                stub.received.append(alerts)
                self._answer(200)

            def do_GET(self) -> None:  # noqa: N802 - the login page a redirect would lead to
                self._answer(200)

            def _answer(self, code: int) -> None:
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:  # quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        if tls is not None:
            import ssl

            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
            self.url = f"https://localhost:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def alerts(self) -> list[dict]:
        return [a for batch in self.received for a in batch]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
