"""JSON-lines logging with context, and a guard that keeps secrets out of every line.

>>> import io, logging
>>> buf = io.StringIO()
>>> h = logging.StreamHandler(buf); h.setFormatter(JsonFormatter()); h.addFilter(SecretFilter())
>>> lg = logging.getLogger("doctest-logs"); lg.addHandler(h); lg.propagate = False
>>> lg.warning("connect sasl_plain_password=hunter2", extra={"partition": 3})
>>> line = json.loads(buf.getvalue())
>>> line["event"], line["partition"], line["level"]
('connect sasl_plain_password=***', 3, 'warning')
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime

# Attributes every LogRecord has; anything else came from `extra=` and is context.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}
_SECRET_KV = re.compile(r"((?:password|passwd|secret|token)[\w.]*\s*[=:]\s*)([^\s,;'\"}]+)", re.I)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, event, and any context fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class SecretFilter(logging.Filter):
    """Masks values of password/secret/token keys in messages and context."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = _SECRET_KV.sub(r"\1***", record.getMessage())
        record.args = None
        for key in list(vars(record)):
            if key not in _STANDARD and re.search("password|secret|token", key, re.I):
                setattr(record, key, "***")
        return True


def configure_logging(level: str = "INFO") -> None:
    """JSON lines on stderr for the whole process."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(SecretFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("kafka").setLevel(max(logging.WARNING, root.level))


def log_startup(logger: logging.Logger, settings: object, connected: dict[str, object]) -> None:
    """One line that says what the worker connected to, and with which settings (redacted)."""
    summary = ", ".join(f"{k}={v}" for k, v in connected.items())
    logger.info(f"stream-lstm worker started: {summary}",
                extra={"connected": connected, "settings": settings.redacted()})  # type: ignore[attr-defined]
