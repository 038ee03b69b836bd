"""Structured logs: one JSON object per line, with the request id and trace id of the
request being served (`Settings(log_format="json")`, the default; "text" for people).

The kernel puts the current request's ids in a context variable, so any log call made while
serving it — in a layer, an adapter, a store — carries them without being passed anything.
Nothing here adds secrets: messages are what the code logs, and the code never logs keys.
"""
from __future__ import annotations

import contextvars
import logging
import time

import orjson

__all__ = ["REQUEST_IDS", "JsonFormatter", "configure_logging"]

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
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


def configure_logging(level: str, log_format: str) -> None:
    """The serving process's root handler: JSON lines (or plain text) on stderr."""
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
