"""What the layers' admin routes share: the admin token and JSON answers.

The admin token is never a virtual key: it comes from an environment variable named in the
config, is at least 16 characters, and is compared in constant time.
"""
from __future__ import annotations

import os
from typing import Any

import orjson

from gateway.config import ConfigError
from gateway.kernel import Scope, Send, bearer_is, route_path

__all__ = ["admin_token_from_env", "admitted", "is_admin", "read_json", "route_path",
           "send_json"]


def admin_token_from_env(name: str, owner: str) -> bytes:
    token = os.environ.get(name, "")
    if len(token) < 16 or token.startswith("sk-sg-"):
        raise ConfigError(f"{owner} admin_token_env={name!r} must name an environment variable "
                          "holding an admin token of at least 16 characters (not a virtual key).")
    return token.encode()


def is_admin(scope: Scope, token: bytes) -> bool:
    return bearer_is(scope["headers"], token)


async def admitted(scope: Scope, send: Send, token: bytes, method: str) -> bool:
    """True for a request with the admin token and `method`; else answers 401 or 405 (in
    OpenAI's error shape) and says False."""
    if not is_admin(scope, token):
        await send_json(send, 401, {"error": {"message": "A valid admin token is required.",
                                               "type": "authentication_error"}})
        return False
    if scope["method"] != method:
        await send_json(send, 405, {"error": {"message": f"Use {method}.",
                                               "type": "invalid_request_error"}})
        return False
    return True


async def send_json(send: Send, status: int, payload: Any) -> None:
    body = orjson.dumps(payload)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", b"%d" % len(body)),
                            (b"cache-control", b"no-store")]})
    await send({"type": "http.response.body", "body": body})


async def read_json(receive: Any, limit_bytes: int = 64 * 1024) -> Any:
    """The request body as JSON, or None when it is empty, too large or not JSON."""
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit_bytes:
            return None
        chunks.append(chunk)
        more = message.get("more_body", False)
    try:
        return orjson.loads(b"".join(chunks)) if size else None
    except orjson.JSONDecodeError:
        return None
