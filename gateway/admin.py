"""What the layers' admin routes share: the admin token, JSON answers and refusals.

The admin token is never a virtual key: it comes from an environment variable named in the
config, is at least 16 characters, and is compared in constant time.

Every admin refusal has one shape, the auth admin API's (middleware/auth/admin.py): OpenAI's
`{"error": {"message", "type", "param", "code"}}`, rendered by `GatewayError`, always with a
`code`, and with `param` where one request parameter is at fault. A route that answers GET
answers HEAD alike, without the body (RFC 9110 9.3.2); other methods get a 405 whose `Allow`
lists what the route takes. A route that reads a body refuses one it cannot read as JSON from
its headers, before reading it: `check_json_body`.
"""
from __future__ import annotations

import hmac
import os
from typing import Any
from urllib.parse import parse_qsl

import orjson

from gateway.config import ConfigError, env_name, env_name_shown
from gateway.errors import GatewayError
from gateway.kernel import Message, Scope, Send, drain_body, route_path

__all__ = ["admin_error", "admin_refusal", "admin_token_from_env", "admitted", "allowed_methods",
           "check_json_body", "query_refusal", "read_json", "route_path", "send_error", "send_json",
           "without_body_for_head"]

_NO_STORE = (b"cache-control", b"no-store")
_CHALLENGE = (b"www-authenticate", b'Bearer realm="sluicegate-admin"')


def admin_token_from_env(name: str, owner: str) -> bytes:
    env_name(name, f"{owner} admin_token_env")
    token = os.environ.get(name, "").strip()  # (see AuthMiddleware: a trailing newline)
    if len(token) < 16 or token.startswith("sk-sg-"):
        shown = f"admin_token_env={name!r}" if env_name_shown(name) else "admin_token_env"
        raise ConfigError(f"{owner} {shown} must name an environment variable holding an "
                          "admin token of at least 16 characters (not a virtual key).")
    return token.encode()


def admin_error(status: int, message: str, code: str, *, param: str | None = None,
                headers: list[tuple[bytes, bytes]] | None = None) -> GatewayError:
    """An admin refusal: always a `code`, and `param` where a parameter is at fault."""
    return GatewayError(status, message, code=code, param=param, headers=headers)


def allowed_methods(method: str) -> tuple[str, ...]:
    """The methods a route that serves `method` takes: HEAD wherever GET (RFC 9110 9.3.2)."""
    return (method, "HEAD") if method == "GET" else (method,)


def admin_refusal(headers: list[tuple[bytes, bytes]], token: bytes) -> GatewayError | None:
    """The 401 of a request without the admin token, else None; one code for each way it
    can lack it, on every admin route of every layer: `missing_admin_token` (no
    Authorization header), `virtual_key_not_admin` (a virtual key sent as the token),
    `invalid_admin_token` (another scheme, or another token). Compared in constant time."""
    value = next((v for k, v in headers if k == b"authorization"), None)
    if value is None:
        return admin_error(401, "Missing admin token: send 'Authorization: Bearer <admin "
                                "token>'.", "missing_admin_token", headers=[_CHALLENGE])
    scheme, _, given = value.partition(b" ")
    given = given.strip()
    if scheme.lower() != b"bearer" or not given:
        return admin_error(401, "The Authorization header must be 'Bearer <admin token>'.",
                           "invalid_admin_token", headers=[_CHALLENGE])
    if given.startswith(b"sk-sg-"):  # (a virtual key's prefix: middleware.auth.keys)
        return admin_error(401, "A virtual key is not an admin token.",
                           "virtual_key_not_admin", headers=[_CHALLENGE])
    if not hmac.compare_digest(given, token):
        return admin_error(401, "Invalid admin token.", "invalid_admin_token",
                           headers=[_CHALLENGE])
    return None


async def admitted(scope: Scope, send: Send, token: bytes, method: str,
                   params: tuple[str, ...] = ()) -> bool:
    """True for a request with the admin token and `method` (HEAD for GET: answer it through
    `without_body_for_head`) whose query holds only `params`, each once; else answers 401
    (`admin_refusal`), 405 or 400 (`unknown_parameter`, `invalid_parameter`: a query
    parameter the route does not take is refused, not ignored) and says False."""
    refusal = admin_refusal(scope["headers"], token)
    if refusal is not None:
        await send_error(send, refusal)
        return False
    allowed = allowed_methods(method)
    if scope["method"] not in allowed:
        await send_error(send, admin_error(
            405, f"Method {scope['method']} is not allowed here; use {' or '.join(allowed)}.",
            "method_not_allowed", headers=[(b"allow", ", ".join(allowed).encode())]))
        return False
    refusal = query_refusal(scope, params)
    if refusal is not None:
        await send_error(send, refusal)
        return False
    return True


def query_refusal(scope: Scope, params: tuple[str, ...]) -> GatewayError | None:
    """The 400 of a query holding a parameter other than `params` (`unknown_parameter`: a
    misspelled filter would list everything, `?force=1` on a revoke would revoke), or one of
    them twice (`invalid_parameter`: the last would win, silently); else None."""
    seen: set[str] = set()
    for name, _ in parse_qsl(scope.get("query_string", b"").decode("latin-1"),
                             keep_blank_values=True):
        shown = name[:64]
        if name not in params:
            takes = (f"takes {', '.join(repr(p) for p in params)}" if params else
                     "takes no query parameters")
            return admin_error(400, f"Unknown query parameter {shown!r}; this route {takes}.",
                               "unknown_parameter", param=shown)
        if name in seen:
            return admin_error(400, f"Query parameter {shown!r} is given more than once.",
                               "invalid_parameter", param=shown)
        seen.add(name)
    return None


def without_body_for_head(scope: Scope, send: Send) -> Send:
    """`send` for answering `scope`: for HEAD, the same status and headers (Content-Length
    too) with an empty body."""
    if scope["method"] != "HEAD":
        return send

    async def send_without_body(message: Message) -> None:
        if message["type"] == "http.response.body":
            message = {**message, "body": b""}
        await send(message)

    return send_without_body


async def send_json(send: Send, status: int, payload: Any) -> None:
    body = orjson.dumps(payload)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", b"%d" % len(body)), _NO_STORE]})
    await send({"type": "http.response.body", "body": body})


async def send_error(send: Send, error: GatewayError) -> None:
    status, headers, body = error.render("openai")
    await send({"type": "http.response.start", "status": status,
                "headers": [*headers, _NO_STORE]})
    await send({"type": "http.response.body", "body": body})


def check_json_body(headers: list[tuple[bytes, bytes]]) -> None:
    """Refuses, from the headers alone, a request body an admin route cannot read as JSON:
    a 415 (`unsupported_media_type`) for a Content-Type other than JSON, and a 415
    (`unsupported_content_encoding`) with `Accept-Encoding: identity` for a compressed body
    (RFC 9110 15.5.16). Lenient where the public API is strict: `application/json` may have
    parameters (`; charset=utf-8`), `application/*+json` is JSON too, and so is a body sent
    without a Content-Type (`curl -d` sends one, form-urlencoded, which is refused)."""
    for name, value in headers:
        if name == b"content-type":
            media_type = value.split(b";", 1)[0].strip().lower()
            if not _is_json(media_type):
                raise admin_error(415, f"Content-Type must be application/json, not "
                                       f"{media_type.decode('latin-1')!r}.",
                                  "unsupported_media_type")
        elif name == b"content-encoding" and value.strip().lower() not in (b"", b"identity"):
            raise admin_error(415, f"Content-Encoding {value.strip().decode('latin-1')!r} is "
                                   "not supported: send the request body uncompressed.",
                              "unsupported_content_encoding",
                              headers=[(b"accept-encoding", b"identity")])


def _is_json(media_type: bytes) -> bool:
    # RFC 6839 3.1: a "+json" suffix names a JSON-based media type.
    return media_type == b"application/json" or (
        media_type.startswith(b"application/") and media_type.endswith(b"+json")
        and len(media_type) > len(b"application/+json"))


async def read_json(scope: Scope, receive: Any, limit_bytes: int = 64 * 1024) -> Any:
    """The request body as JSON, None when it is empty; a 415 when its headers say it is not
    JSON (`check_json_body`: the body unread, the kernel reads it to its end before the
    answer), a 400 (`invalid_json`) when it is not JSON, a 413 when it is over `limit_bytes`
    (read to its end first, so that the client reads the answer)."""
    check_json_body(scope["headers"])
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        more = message.get("more_body", False)
        if size > limit_bytes:
            if more:
                await drain_body(receive)
            raise admin_error(413, f"The request body exceeds {limit_bytes} bytes.",
                              "request_too_large")
        chunks.append(chunk)
    try:
        return orjson.loads(b"".join(chunks)) if size else None
    except orjson.JSONDecodeError:
        raise admin_error(400, "The request body is not valid JSON.", "invalid_json") from None
