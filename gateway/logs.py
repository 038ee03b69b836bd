"""Structured logs: one JSON object per line, with the request id and trace id of the
request being served (`Settings(log_format="json")`, the default; "text" for people).

The kernel puts the current request's ids in a context variable, so any log call made while
serving it — in a layer, an adapter, a store — carries them without being passed anything.
Our code never logs keys, but libraries' loggers reach the same handler and say what they
like (psycopg's pool logs a DSN's unreadable password): the serving process's handler
redacts the config's known secrets, any URL userinfo and any password=... from every
record's message, exception and extra fields (`gateway.doctor.Scrubber`). It runs only for a
record that is emitted, which on the request path is rare.
"""
from __future__ import annotations

import contextvars
import logging
import time
from collections.abc import Callable

import orjson

__all__ = ["REQUEST_IDS", "JsonFormatter", "RedactingFilter", "configure_logging"]

# (request id, trace id or None) of the request this task serves.
REQUEST_IDS: contextvars.ContextVar[tuple[str, str | None] | None] = contextvars.ContextVar(
    "sluicegate_request_ids", default=None)
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message",
                                                                                 "asctime"}


class JsonFormatter(logging.Formatter):
    """`{"ts", "level", "logger", "message", "request_id", "trace_id", ...extra}`."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(), "logger": record.name,
            "message": record.getMessage(),
        }
        ids = REQUEST_IDS.get()
        if ids is not None:
            entry["request_id"] = ids[0]
            if ids[1]:
                entry["trace_id"] = ids[1]
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value if isinstance(value, str | int | float | bool) else str(value)
        if record.exc_text:  # (as RedactingFilter left it)
            entry["exception"] = record.exc_text
        elif record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


class RedactingFilter(logging.Filter):
    """Passes every record with `redact` applied to its message (args merged in), its
    exception and stack text and its string extra fields."""

    def __init__(self, redact: Callable[[str], str]) -> None:
        super().__init__()
        self.redact = redact

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = self.redact(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info and not record.exc_text:
            record.exc_text = _FORMATTER.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        for key, value in record.__dict__.items():
            if key not in _STANDARD and isinstance(value, str):
                record.__dict__[key] = self.redact(value)
        return True


_FORMATTER = logging.Formatter()


def configure_logging(level: str, log_format: str, *,
                      redact: Callable[[str], str] | None = None) -> None:
    """The serving process's root handler: JSON lines (or plain text) on stderr; with
    `redact` (a config's `Scrubber(...).redact`), applied to every record it emits."""
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    if redact is not None:
        handler.addFilter(RedactingFilter(redact))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
