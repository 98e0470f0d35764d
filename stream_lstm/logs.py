"""JSON-lines logging with context, and a guard that keeps secrets out of every line.

Each line is one JSON object: ``ts`` (ISO 8601, UTC), ``level``, ``logger``, ``event`` (the
message) and any ``extra={...}`` context such as ``device_id``, ``partition`` or ``topic``.
A filter masks the values of keys that look secret (password, secret, token) in the message,
the context (also nested dicts) and exception text, in case anything slips through.

>>> import io, logging
>>> buf = io.StringIO()
>>> h = logging.StreamHandler(buf); h.setFormatter(JsonFormatter()); h.addFilter(SecretFilter())
>>> lg = logging.getLogger("doctest-logs"); lg.addHandler(h); lg.propagate = False
>>> lg.warning("connect sasl_plain_password=hunter2", extra={"partition": 3})
>>> line = json.loads(buf.getvalue())
>>> line["event"], line["partition"], line["level"]
('connect sasl_plain_password=***', 3, 'warning')
>>> mask_secrets('{"sasl_password": "hunter2", "user": "bob"}')
'{"sasl_password": "***", "user": "bob"}'
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

# Attributes every LogRecord has; anything else came from `extra=` and is context.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}
_SECRET_KEY = re.compile(r"password|passwd|secret|token|credential", re.I)
# key=value, key: value, "key": "value", 'key'='value' where the key looks secret.
# Every repetition is bounded: unbounded ones backtrack quadratically over a long run of word
# characters (a 32,000-character device id took 46 s to mask, holding the GIL: the health
# endpoint stopped answering and liveness restarted the process, which read the record again).
_SECRET_KV = re.compile(
    r"""((?:[\w.-]{0,64}(?:password|passwd|secret|token|credential)[\w.-]{0,64})["']?[ \t]{0,8}[=:][ \t]{0,8})"""
    r"""("[^"]{0,8192}"?|'[^']{0,8192}'?|[^\s,;'"}\])]{1,8192})""",
    re.I,
)
# Longest message and context string a log line keeps (the rest is cut, and said): a forged
# record's 400 KB id is not worth a 400 KB line, nor the time to mask it.
MAX_MESSAGE = 8192
MAX_FIELD = 1024
SECRET_SPAN = 64 + 10 + 64 + 18 + 8192 + 2  # the most _SECRET_KV matches (key, separator, value)
_MASK = "***"
# A %-format placeholder: %s, %d, %(name)s, %-8.3f, %*d, %% ...
_PLACEHOLDER = re.compile(
    r"%(?:\((?P<name>[^)]*)\))?[#0 +-]*(?P<width>\*|\d+)?(?:\.(?P<precision>\*|\d+))?[hlL]?"
    r"(?P<conversion>[diouxXeEfFgGcrsa%])"
)


def _mask_value(match: re.Match[str]) -> str:
    value = match.group(2)
    if value[:1] in "\"'":
        return f"{match.group(1)}{value[0]}{_MASK}{value[0]}"
    return match.group(1) + _MASK


# A URL's credentials, ``scheme://user:password@host``: everything up to its last '@' (a password
# with an unencoded '#', '/' or '?' would end a parser's idea of the user part early; one with a
# "'" is legal, so a quote does not end it: a quoted URL followed by another '@' is masked too far,
# which is safe). Whitespace and '"' end it (JSON log lines): url_without_credentials, for one URL.
URL_USERINFO = re.compile(r"://[^\s\"]{0,512}@")  # (bounded, as _SECRET_KV; a password may hold '/')


def url_without_credentials(url: str, mask: str = "***@") -> str:
    """One URL with its ``user:password@`` replaced by ``mask`` ("" drops it), whatever its
    password holds (a space or a '"' too, which end :data:`URL_USERINFO` in free text).

    >>> url_without_credentials("http://relay:pa ss@am:9093/x"), url_without_credentials("http://am", "")
    ('http://***@am:9093/x', 'http://am')
    """
    url = URL_USERINFO.sub("://" + mask, url)
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc=mask + parts.netloc.rpartition("@")[2]))


def mask_secrets(text: str) -> str:
    """``text`` with the values of secret-looking ``key=value`` / ``"key": "value"`` masked, and
    the credentials of any URL in it.

    >>> mask_secrets("posting to https://relay:s3cret@am:9093 with token=abc")
    'posting to https://***@am:9093 with token=***'
    """
    return URL_USERINFO.sub("://***@", _SECRET_KV.sub(_mask_value, text))


def _mask_context(key: str, value: Any) -> Any:
    if _SECRET_KEY.search(key) and value is not None:
        return _MASK
    if isinstance(value, Mapping):
        return {k: _mask_context(str(k), v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_mask_context("", v) for v in value]
    if isinstance(value, str):
        return mask_secrets(bounded(value, MAX_FIELD))
    return value


def bounded(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, saying how many were cut.

    >>> bounded("abcdef", 4), bounded("abc", 4)
    ('abcd...(2 more characters)', 'abc')
    """
    return text if len(text) <= limit else f"{text[:limit]}...({len(text) - limit:,} more characters)"


def _mask_secret_args(fmt: str, args: Any) -> Any:
    """``args`` with those that fill a secret's value in ``fmt`` (``password=%s``) masked.

    For a message whose arguments do not fit its format string: its text keeps the format
    string and the arguments raw, and masking the text afterwards would only see the
    ``password=%s`` placeholder, not the argument meant for it. Placeholders are counted as
    ``%`` formatting counts them (``%%`` takes no argument, a ``*`` width or precision one).
    """
    values = [m.span(2) for m in _SECRET_KV.finditer(fmt)]

    def in_a_secret(at: int) -> bool:
        return any(start <= at < end for start, end in values)

    positions: set[int] = set()
    names: set[str] = set()
    index = 0
    for ph in _PLACEHOLDER.finditer(fmt):
        if ph.group("conversion") == "%":
            continue
        if ph.group("name") is not None:
            if in_a_secret(ph.start()):
                names.add(ph.group("name"))
            continue
        index += (ph.group("width") == "*") + (ph.group("precision") == "*")
        if in_a_secret(ph.start()):
            positions.add(index)
        index += 1
    if isinstance(args, Mapping):
        return {k: _MASK if k in names else _mask_context(str(k), v) for k, v in args.items()}
    if isinstance(args, tuple):
        return tuple(_MASK if i in positions else a for i, a in enumerate(args))
    return args


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, event, and any context fields.

    Examples
    --------
    >>> record = logging.makeLogRecord({"name": "worker", "levelname": "INFO", "created": 0.0,
    ...                                 "msg": "assigned %s", "args": ([0, 1],), "group": "g"})
    >>> JsonFormatter().format(record)
    '{"ts": "1970-01-01T00:00:00.000+00:00", "level": "info", "logger": "worker", "event": "assigned [0, 1]", "group": "g"}'
    """

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_") and key not in out:
                out[key] = value
        if record.exc_info:
            # Its last lines say what was raised: those are kept, masked first over a window
            # longer by what one secret can span, so that the cut cannot part a key from its value.
            text, keep = self.formatException(record.exc_info), 4 * MAX_MESSAGE
            masked = mask_secrets(text[-(keep + SECRET_SPAN):])
            out["exception"] = masked if len(text) <= keep else "..." + masked[-keep:]
        if record.stack_info:
            out["stack"] = record.stack_info
        return json.dumps(out, default=str)


class SecretFilter(logging.Filter):
    """Masks values of password/secret/token keys in the message and the context.

    Examples
    --------
    >>> record = logging.makeLogRecord({"msg": "login password=%s", "args": ("hunter2",),
    ...                                 "token": "abc", "partition": 3})
    >>> SecretFilter().filter(record), record.getMessage(), record.token, record.partition
    (True, 'login password=***', '***', 3)
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: keep what we have rather than lose the line
            message = f"{record.msg} {_mask_secret_args(str(record.msg), record.args)}"
        record.msg = mask_secrets(bounded(message, MAX_MESSAGE))
        record.args = None
        for key in list(vars(record)):
            if key not in _STANDARD and not key.startswith("_"):
                setattr(record, key, _mask_context(key, getattr(record, key)))
        return True


class RepeatFilter(logging.Filter):
    """Lets a kafka-python message through once per ``every_s`` seconds per logger and template: it
    logs each reconnect attempt of each client (about a line a second a client through a broker
    outage, a dozen before a start-up's one-line "cannot connect"). Who it was and what failed
    is said once; the worker's own lines say the rest.

    Examples
    --------
    >>> f, now = RepeatFilter(every_s=60.0, clock=lambda: now[0]), [0.0]
    >>> def line(msg):
    ...     return f.filter(logging.makeLogRecord({"name": "kafka.conn", "msg": msg, "args": ("x",)}))
    >>> line("Connection failed: %s"), line("Connection failed: %s"), line("Bootstrap failed: %s")
    (True, False, True)
    >>> now[0] = 61.0; line("Connection failed: %s")
    True
    """

    def __init__(self, every_s: float = 60.0, clock: Any = time.monotonic) -> None:
        super().__init__()
        self.every_s, self.clock = every_s, clock
        self._last: dict[tuple[str, str], float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("kafka"):  # (the project's own lines all go through)
            return True
        key, now = (record.name, str(record.msg)), self.clock()
        if now - self._last.get(key, -float("inf")) < self.every_s:
            return False
        self._last[key] = now
        return True


def configure_logging(level: str | int = "INFO", stream: Any = None) -> None:
    """JSON lines on stderr (or ``stream``) for the whole process; safe to call again."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(SecretFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper() if isinstance(level, str) else level)
    # kafka-python is chatty at INFO (every connection, every metadata refresh), and repeats
    # itself at WARNING and ERROR through an outage.
    logging.getLogger("kafka").setLevel(max(logging.WARNING, root.level))
    # Its event loop warns of every task over 100 ms ("It is blocking the event loop"): a
    # torch step or a commit on a loaded machine, nothing an operator can act on. (The
    # rebalance listener's own slowness is warned of by kafka.coordinator, kept.)
    logging.getLogger("kafka.net.selector").setLevel(max(logging.ERROR, root.level))
    # torch logs its caches' statistics at INFO from an exit hook, after the last line.
    logging.getLogger("torch").setLevel(max(logging.WARNING, root.level))
    if root.level > logging.DEBUG:  # (a filter on the handler: "kafka"'s own would miss its children)
        handler.filters.insert(0, RepeatFilter())  # (before SecretFilter formats the template)


class Sparing:
    """Says a message at most once per ``every_s`` per text, with how many it held back since:
    a per-device warning across a fleet (a setting changed under 100k devices' stored state)
    is a line a minute, not 100k lines.

    >>> now, said = [0.0], []
    >>> say = Sparing(lambda msg, extra: said.append((msg, extra["held_back"])), clock=lambda: now[0])
    >>> for _ in range(3):
    ...     say("state unusable", device="d")
    >>> now[0] = 61.0; say("state unusable"); said
    [('state unusable', 0), ('state unusable', 2)]
    """

    def __init__(self, emit: Any, every_s: float = 60.0, clock: Any = time.monotonic) -> None:
        self.emit, self.every_s, self.clock = emit, every_s, clock
        self._last: dict[str, tuple[float, int]] = {}

    def __call__(self, message: str, **extra: object) -> None:
        said_at, held = self._last.get(message, (-float("inf"), 0))
        if self.clock() - said_at < self.every_s:
            self._last[message] = (said_at, held + 1)
            return
        self._last[message] = (self.clock(), 0)
        self.emit(message, {**extra, "held_back": held})


@contextmanager
def kafka_closing() -> Iterator[None]:
    """kafka-python's own lines are dropped while the service closes its clients (kept at DEBUG).

    Why: its network thread can lose a race with close (kafka-python 3.0.12 logs "Error
    receiving network data closing socket" with an ``AttributeError`` traceback when close
    sets the socket to None under its reader). By then the worker has committed and said so;
    a failure that matters (a flush or commit that did not finish) reaches the service as an
    exception and is logged by it, not by kafka-python.

    >>> import io
    >>> h = logging.StreamHandler(buf := io.StringIO()); logging.getLogger().addHandler(h)
    >>> with kafka_closing():
    ...     logging.getLogger("kafka.net.transport").error("Error receiving network data")
    >>> buf.getvalue(), logging.getLogger().removeHandler(h)
    ('', None)
    """
    handlers = logging.getLogger().handlers if logging.getLogger().getEffectiveLevel() > logging.DEBUG else []
    for handler in handlers:
        handler.addFilter(_drop_kafka)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(_drop_kafka)


def _drop_kafka(record: logging.LogRecord) -> bool:
    return not record.name.startswith("kafka")


def log_startup(logger: logging.Logger, settings: Any, connected: Mapping[str, object]) -> None:
    """ONE line that says what the process connected to, and with which settings (redacted).

    ``connected`` is e.g. ``{"bootstrap_servers": ..., "input_topic": ..., "model_version": ...}``;
    it appears in the message and as the ``connected`` field; ``settings.redacted()`` is the
    ``settings`` field.
    """
    summary = " ".join(f"{k}={v}" for k, v in connected.items())
    redacted = settings.redacted() if hasattr(settings, "redacted") else dict(settings)
    logger.info(f"stream-lstm started: {summary}",
                extra={"connected": dict(connected), "settings": redacted})
