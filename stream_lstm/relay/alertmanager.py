"""Alert events as Alertmanager alerts: the mapping, and posting them.

Alertmanager's API (``POST /api/v2/alerts``) takes a list of alerts, each a set of labels (its
identity), annotations, ``startsAt`` and ``endsAt``. A firing alert must be sent again before
its ``endsAt`` passes, or Alertmanager resolves it: Prometheus re-sends its firing alerts every
minute with ``endsAt`` four minutes ahead, and the relay does the same (:data:`RESEND_S`,
:data:`FIRING_FOR_S`). A resolved alert is the same labels with ``endsAt`` at or before now.
The labels hold the worker's stable ``alert_id``, so one incident is one Alertmanager alert,
however often it is sent.

>>> event = {"event": "open", "alert_id": "pump-1@1700000000000", "device_id": "pump-1",
...          "start_ts": 1700000000.0, "ts": 1700000060.0, "peak_likelihood": 0.99999,
...          "peak_ts": 1700000060.0, "value": 91.5, "expected_low": 60.0, "expected_high": 75.0,
...          "model_version": "v3"}
>>> alert = to_alert(event, now=1700000100.0)
>>> alert["labels"]
{'alertname': 'StreamLstmDeviceAnomaly', 'device_id': 'pump-1', 'alert_id': 'pump-1@1700000000000', 'severity': 'warning'}
>>> alert["startsAt"], alert["endsAt"]   # firing: ends four minutes from now unless sent again
('2023-11-14T22:13:20Z', '2023-11-14T22:19:00Z')
>>> alert["annotations"]["summary"]
'pump-1: anomalous since 2023-11-14T22:13:20Z; 91.5 at the peak, expected 60 to 75'
>>> to_alert(event | {"event": "close", "ts": 1700000090.0}, now=1700000100.0)["endsAt"]
'2023-11-14T22:14:50Z'
"""

from __future__ import annotations

import json
import re
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from stream_lstm.logs import url_without_credentials

ALERTNAME = "StreamLstmDeviceAnomaly"
# Labels every relayed alert carries unless the relay is told otherwise (``--label``): routing
# trees commonly page on ``severity``, as the service's own rules set it (deploy/prometheus).
DEFAULT_LABELS = {"severity": "warning"}
_OWN_LABELS = ("alertname", "device_id", "alert_id")
# As Prometheus: firing alerts again every minute, each valid for four.
RESEND_S = 60.0
FIRING_FOR_S = 4 * RESEND_S
# One request takes milliseconds; past this Alertmanager is not answering, and the relay retries.
POST_TIMEOUT_S = 10.0


class AlertmanagerError(RuntimeError):
    """Alertmanager did not accept the alerts (unreachable: ``status`` None, or an error status)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status

    @property
    def refused(self) -> bool:
        """Refused for what was sent (400, 413, 422: this alert is malformed or too large, and
        sending it again cannot help), so it is skipped alone. Any other status is about the
        relay or the path, not the alert (401/403: its credentials; 404/405: a wrong URL;
        408/429, 5xx: passing): every alert waits, retried, and the relay is not ready. (All
        4xx once counted as refused: a rotated password dropped every alert, reported ready.)"""
        return self.status in (400, 413, 422)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _num(x: Any) -> str:
    return "n/a" if x is None else f"{x:.6g}"


def parse_labels(pairs: list[str]) -> dict[str, str]:
    """``NAME=VALUE`` pairs as labels added to every alert, over :data:`DEFAULT_LABELS`;
    ``ValueError`` for a malformed pair or one of the relay's own labels.

    >>> parse_labels(["severity=critical", "team=sensors"])
    {'severity': 'critical', 'team': 'sensors'}
    >>> parse_labels(["device_id=x"])
    Traceback (most recent call last):
    ...
    ValueError: --label device_id: the relay sets alertname, device_id and alert_id itself
    """
    labels = dict(DEFAULT_LABELS)
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) or name.startswith("__"):
            raise ValueError(f"--label {pair!r}: want NAME=VALUE, NAME a Prometheus label name")
        if name in _OWN_LABELS:
            raise ValueError(f"--label {name}: the relay sets alertname, device_id and alert_id itself")
        labels[name] = value
    return labels


# What reading a damaged or forged event (JSON, then to_alert) can raise: RecursionError for
# JSON nested past the parser's depth, which a pipeline of `except ValueError` let through.
# OSError: what formatting a time can raise besides (EOVERFLOW), should a check miss one.
UNREADABLE = (ValueError, KeyError, TypeError, OverflowError, AttributeError, RecursionError, OSError)
# The largest alert event a relay takes, and the longest id: the worker's are a few hundred
# bytes (its device ids are at most STREAM_LSTM_MAX_DEVICE_ID_LENGTH, 128 by default, and the
# relay allows that setting's ids, with their alert ids' "@<ms>"), and what is taken is written
# to the relay's store, which a broker's record limit bounds.
MAX_EVENT_BYTES = 64 * 1024
MAX_ID_CHARS = 1024


def max_id_chars(max_device_id_length: int) -> int:
    """The longest ``alert_id`` or ``device_id`` a relay takes under that setting.

    >>> max_id_chars(128), max_id_chars(16_383)
    (1024, 16415)
    """
    return max(MAX_ID_CHARS, max_device_id_length + 32)


def readable_event(raw: Any, max_chars: int = MAX_ID_CHARS) -> dict[str, Any]:
    """``raw`` (decoded JSON) as an alert event the relay can post and keep: an ``open`` or a
    ``close`` whose ``alert_id`` and ``device_id`` are non-empty UTF-8 strings of at most
    ``max_chars`` (:func:`max_id_chars`), with every field :func:`to_alert` needs; else a
    ``ValueError`` saying why (a list as an id was hashed later, a lone surrogate could never be
    written: either stopped the relay at every start).

    >>> readable_event({"event": "open", "alert_id": ["x"]})
    Traceback (most recent call last):
    ...
    ValueError: alert_id is not a non-empty string of at most 1024 characters
    """
    if not isinstance(raw, dict):
        raise ValueError("not a JSON object")
    if raw.get("event") not in ("open", "close"):
        raise ValueError(f"event {str(raw.get('event'))[:40]!r} is neither open nor close")
    for key in ("alert_id", "device_id"):
        value = raw.get(key)
        if not (isinstance(value, str) and 0 < len(value) <= max_chars):
            raise ValueError(f"{key} is not a non-empty string of at most {max_chars} characters")
        value.encode("utf-8")  # (UnicodeEncodeError, a ValueError, for a lone surrogate)
    to_alert(raw, 0.0)  # every field it needs is there, and its times are times
    return raw


def to_alert(event: dict[str, Any], now: float | None = None,
             labels: dict[str, str] | None = None) -> dict[str, Any]:
    """One alert event (docs/wire-contract.md) as an Alertmanager alert: firing for ``open``,
    resolved for ``close`` (at the close's event time, or now if that is later than now), with
    ``labels`` (default :data:`DEFAULT_LABELS`) beside its own.
    Event time is the device's clock: a start ahead of ours is sent as now (Alertmanager would
    hold a resolved alert active until then). ``ValueError`` for times that are not times."""
    now = time.time() if now is None else now
    firing = event["event"] == "open"
    start, ts = float(event["start_ts"]), float(event["ts"])
    peak = None if event.get("peak_ts") is None else float(event["peak_ts"])
    # (also NaN and infinities: json allows them; a peak_ts of 1e18 was an OSError from the
    # formatting below, which ended the relay at every start: a review)
    if not all(0.0 <= t <= 1e11 for t in (start, ts) + (() if peak is None else (peak,))):
        raise ValueError(f"alert times out of range: start_ts {start}, ts {ts}, peak_ts {peak}")
    ends = now + FIRING_FOR_S if firing else min(ts, now)
    start = min(start, ends, now)
    summary = (f"{event['device_id']}: anomalous since {_iso(start)}; {_num(event.get('value'))} at "
               f"the peak, expected {_num(event.get('expected_low'))} to {_num(event.get('expected_high'))}")
    return {
        "labels": {"alertname": ALERTNAME, "device_id": str(event["device_id"]),
                   "alert_id": str(event["alert_id"]), **(DEFAULT_LABELS if labels is None else labels)},
        "annotations": {
            "summary": summary,
            "peak_likelihood": _num(event.get("peak_likelihood")),
            "peak_at": _iso(peak) if peak is not None else "n/a",
            "model_version": str(event.get("model_version", "")),
            **({"closed_because": str(event.get("reason", "recovered"))} if not firing else {}),
        },
        "startsAt": _iso(start),
        "endsAt": _iso(ends),
    }


def redacted(url: str) -> str:
    """``url`` without credentials, for logs.

    >>> redacted("https://relay:s3cret@am.example:9093/x"), redacted("http://relay:pa#s@s@am:9093")
    ('https://am.example:9093/x', 'http://am:9093')
    """
    return url_without_credentials(url, "")


def check_url(url: str) -> str:
    """The base URL, or ``ValueError`` saying what is wrong with it.

    >>> check_url("http://alertmanager:9093/")
    'http://alertmanager:9093'
    >>> check_url("alertmanager:9093")
    Traceback (most recent call last):
    ...
    ValueError: STREAM_LSTM_ALERTMANAGER_URL must be http:// or https:// and name a host (percent-encode '#', '/', '?', '@', '"' and spaces in a password), not 'alertmanager:9093'
    >>> check_url("http://relay:pa#ss@am:9093")  # the password's '#' ends the URL there: said, not echoed
    Traceback (most recent call last):
    ...
    ValueError: STREAM_LSTM_ALERTMANAGER_URL must be http:// or https:// and name a host (percent-encode '#', '/', '?', '@', '"' and spaces in a password), not 'http://am:9093'
    """
    parts = urllib.parse.urlsplit(url)
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number (a '#' or '/' in a password)
    except ValueError:
        parts = urllib.parse.urlsplit("")
    if parts.scheme not in ("http", "https") or not parts.hostname or re.search(r"[\s\"<>]", parts.netloc):
        raise ValueError("STREAM_LSTM_ALERTMANAGER_URL must be http:// or https:// and name a host "
                         "(percent-encode '#', '/', '?', '@', '\"' and spaces in a password), not "
                         f"{redacted(url)!r}")
    if parts.query or parts.fragment:  # (the API's path is appended: .../?token=x/api/v2/alerts, 405 for ever)
        raise ValueError("STREAM_LSTM_ALERTMANAGER_URL is Alertmanager's base address, without '?' "
                         f"or '#': not {redacted(url.split('?')[0].split('#')[0])!r}?...")
    return url.rstrip("/")


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    # urllib follows a redirect of a POST as a GET without the body (and with our credentials):
    # a 200 from a login page would count as delivered. A redirect is an error here.
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001, ANN201, PLR0913
        raise urllib.error.HTTPError(req.full_url, code, f"redirected to {redacted(newurl)}: give "
                                     "Alertmanager's own address", headers, fp)


_OPENER = urllib.request.build_opener(_NoRedirects)
_stuck: dict[str, threading.Thread] = {}  # per Alertmanager: a post past its time, still waiting


def post_alerts(base_url: str, alerts: list[dict[str, Any]], timeout_s: float = POST_TIMEOUT_S) -> None:
    """``POST {base_url}/api/v2/alerts``; raises :class:`AlertmanagerError` unless it answers 2xx.
    Credentials in the URL (``https://user:password@host``) go as HTTP basic authentication.
    ``https`` is verified against the system's CAs, or the bundle ``SSL_CERT_FILE`` names
    (OpenSSL reads it for each connection)."""
    parts = urllib.parse.urlsplit(base_url)
    # Where it goes, from the URL's own parts (never from the masking of logs, which cuts to the
    # last '@' anywhere: "https://u:p@gw/tenant@team" posted the credentials to host "team").
    target = urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    request = urllib.request.Request(target + "/api/v2/alerts", data=json.dumps(alerts).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    if parts.username is not None:
        import base64

        pair = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
        request.add_header("Authorization", "Basic " + base64.b64encode(pair.encode()).decode())
    stuck = _stuck.get(target)
    if stuck is not None and stuck.is_alive():
        raise AlertmanagerError(f"Alertmanager at {redacted(base_url)} has still not answered an "
                                "earlier post (its answer trickles in): not posting again until it has")
    # The post runs on a thread of its own and is waited for at most timeout_s in all: urllib's
    # timeout is per read, and an answer's status line and headers trickled a byte every few
    # seconds held the relay's loop, and its health, for ever (a security review). A post past
    # its time is left to finish on its own; none other goes to that Alertmanager meanwhile.
    # (The body of a 2xx is not read, and of an error only what one read brings, in the same
    # time: read after it, a slow error answer took twice the timeout: a review.)
    outcome: list[BaseException | None] = []

    def post() -> None:
        try:
            with _OPENER.open(request, timeout=timeout_s):  # http(s) only (check_url)
                outcome.append(None)
        except urllib.error.HTTPError as exc:
            with exc:  # (closed once its first bytes are read)
                exc.first_bytes = _first_bytes(exc)  # type: ignore[attr-defined]
            outcome.append(exc)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            outcome.append(exc)

    thread = threading.Thread(target=post, name="alertmanager-post", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if not outcome:
        _stuck[target] = thread
        raise AlertmanagerError(f"Alertmanager at {redacted(base_url)} did not answer within {timeout_s:g}s")
    try:
        if outcome[0] is not None:
            raise outcome[0]
    except urllib.error.HTTPError as exc:
        raise AlertmanagerError(f"Alertmanager answered {exc.code}: {exc.msg}; {getattr(exc, 'first_bytes', b'')!r}",
                                status=exc.code) from None
    except (urllib.error.URLError, OSError, ValueError) as exc:  # (ValueError: http.client's InvalidURL)
        reason = getattr(exc, "reason", exc)
        hint = ("; signed by a private CA? point SSL_CERT_FILE at its certificate"
                if isinstance(reason, ssl.SSLCertVerificationError) else "")
        raise AlertmanagerError(f"Alertmanager at {redacted(base_url)} not reachable: {reason}{hint}") from None


def _first_bytes(error: urllib.error.HTTPError, n: int = 200) -> bytes:
    """What one read of an error answer's body brings, at most ``n`` bytes (never a wait for
    the whole body)."""
    try:
        read1 = getattr(error.fp, "read1", None)
        return read1(n) if read1 is not None else b""
    except (OSError, ValueError):
        return b""


def post_each_refused_alone(post: Callable[[str, list[dict[str, Any]]], None], url: str,
                            chunk: list[dict[str, Any]],
                            refused: Callable[[dict[str, Any], AlertmanagerError], None]) -> set[str]:
    """``post(url, chunk)``; where Alertmanager refuses the request for what it holds (400, 413,
    422), each alert again alone, so that one it refuses cannot hold up every other for ever:
    ``refused(alert, error)`` for each such, and their ids returned. Other errors raise."""
    try:
        post(url, chunk)
    except AlertmanagerError as exc:
        if not exc.refused:
            raise
        ids = set()
        for alert in chunk:
            try:
                post(url, [alert])
            except AlertmanagerError as one:
                if not one.refused:
                    raise
                refused(alert, one)
                ids.add(alert["labels"]["alert_id"])
        return ids
    return set()
