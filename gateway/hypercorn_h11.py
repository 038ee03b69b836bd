"""A plain HTTP/1.1 request into hypercorn without its protocol-switch checks.

For every request it reads, hypercorn's HTTP/1.1 protocol (`H11Protocol`, 0.18) walks the
request headers twice before the app sees them: `_check_protocol` looks for an h2c Upgrade
(and an HTTP/2 preface), `_create_stream` for a WebSocket Upgrade; each decodes, strips and
lower-cases every header name on the way, about 2k instructions a header.

A request that gateway/h11_cycle.py read (its headers are `h11_cycle.plain_headers`) is
HTTP/1.1 and has no Upgrade header, so neither walk can find anything: `_check_protocol`
returns at once, and `_create_stream` makes the `HTTPStream` that hypercorn makes for any
request that is not a WebSocket upgrade, hands it the same `Request` event and counts the
request, as hypercorn does. Every other request goes to hypercorn's own methods.

`install()` replaces the two methods only when they are the code this was written against
(their source, fingerprinted), and needs gateway/h11_cycle.py installed; `gateway.asgi` (the
app `sluicegate serve` runs) installs it. Mounted into a host's app, the gateway leaves the
host's hypercorn alone.

`install_error_bodies()` gives the 400 (or 431) hypercorn answers a request h11 cannot read
(a malformed request line or header, a Content-Length that is no number or is repeated with
another value, a chunked body cut short or mis-sized) a JSON error body that says so, where
hypercorn sends an empty one. The request never reached the app, so its API is unknown: the
body is an error both SDKs read, OpenAI's `error` object inside Anthropic's envelope
(`{"type": "error", "error": {"type", "message", "param", "code"}}`). Same fingerprinting.
"""
from __future__ import annotations

import hashlib
import inspect
import logging
from collections.abc import Callable
from typing import Any

import orjson

from gateway import h11_cycle

logger = logging.getLogger("sluicegate")

__all__ = ["install", "install_error_bodies", "installed"]

# sha256 of the source of H11Protocol._check_protocol and _create_stream in hypercorn 0.18.0
_FINGERPRINT = "48f94fa6f53e7b1a1a50577a32f036d09729c0cac06896b19cf154faba74f1dd"
# ... and of H11Protocol._send_error_response
_ERROR_FINGERPRINT = "58c2b47ae295d000c65a2216fa6afd9efb1ea05363a40d5dbf427b1d2b41b4c7"
_original_send_error_response: Callable[..., Any] | None = None

_original_check_protocol: Callable[..., Any] | None = None
_original_create_stream: Callable[..., Any] | None = None


def installed() -> bool:
    return _original_create_stream is not None


def fingerprint(protocol: type) -> str:
    """What the shortcut was written against: the source of the two methods it replaces."""
    return _source_hash(protocol._check_protocol,  # type: ignore[attr-defined]
                        protocol._create_stream)  # type: ignore[attr-defined]


def _source_hash(*functions: Any) -> str:
    """sha256 of the functions' source, one after another."""
    source = "".join(inspect.getsource(function) for function in functions)
    return hashlib.sha256(source.encode()).hexdigest()


def install() -> bool:
    """Puts the shortcut in front of hypercorn's two header walks (once); False when hypercorn
    or h11_cycle is not what this was written against, and then nothing changes."""
    global _original_check_protocol, _original_create_stream
    if _original_create_stream is not None:
        return True
    plain: Any = h11_cycle.plain_headers
    try:
        from hypercorn.protocol import h11 as protocol
        from hypercorn.protocol.events import Request
        from hypercorn.protocol.http_stream import HTTPStream
    except ImportError:
        return False
    server = getattr(protocol, "H11Protocol", None)
    try:
        known = server is not None and fingerprint(server) == _FINGERPRINT
    except (OSError, TypeError, AttributeError):  # no source to read
        known = False
    if plain is None or not known or getattr(protocol, "HTTPStream", None) is not HTTPStream \
            or getattr(protocol, "Request", None) is not Request:
        logger.info("hypercorn: requests keep hypercorn's own protocol-switch checks")
        return False
    assert server is not None
    original_check: Callable[..., Any] = server._check_protocol
    original_create: Callable[..., Any] = server._create_stream
    stream_id = protocol.STREAM_ID

    async def _check_protocol(self: Any, event: Any) -> None:
        if type(event.headers) is not plain:
            await original_check(self, event)

    async def _create_stream(self: Any, request: Any) -> None:
        if type(request.headers) is not plain:
            await original_create(self, request)
            return
        self.stream = HTTPStream(self.app, self.config, self.context, self.task_group,
                                 self.ssl, self.client, self.server, self.stream_send,
                                 stream_id)
        headers: Any
        if self.config.h11_pass_raw_headers:
            headers = request.headers.raw_items()
        else:
            headers = list(request.headers)
        await self.stream.handle(Request(stream_id=stream_id, headers=headers,
                                         http_version=request.http_version.decode(),
                                         method=request.method.decode("ascii").upper(),
                                         raw_path=request.target,
                                         state=self.connection_state))
        self.keep_alive_requests += 1
        await self.context.mark_request()

    server._check_protocol = _check_protocol
    server._create_stream = _create_stream
    _original_check_protocol, _original_create_stream = original_check, original_create
    return True


def error_body(status: int) -> bytes:
    """The JSON body of hypercorn's answer to a request h11 could not read."""
    message = ("The request's header block is too large." if status == 431 else
               "The request is not valid HTTP/1.1: its request line, a header or the framing "
               "of its body (Content-Length, chunked encoding) could not be read.")
    return orjson.dumps({"type": "error", "error": {
        "type": "invalid_request_error", "message": message, "param": None,
        "code": "malformed_request"}})


def install_error_bodies() -> bool:
    """Puts a JSON error body in hypercorn's answer to a request it cannot read (once); False
    when hypercorn is not what this was written against, and then nothing changes."""
    global _original_send_error_response
    if _original_send_error_response is not None:
        return True
    try:
        import h11
        from hypercorn.protocol import h11 as protocol
    except ImportError:
        return False
    server = getattr(protocol, "H11Protocol", None)
    try:
        known = server is not None and \
            _source_hash(server._send_error_response) == _ERROR_FINGERPRINT
    except (OSError, TypeError, AttributeError):
        known = False
    if not known:
        logger.info("hypercorn: a request it cannot read keeps its empty error answer")
        return False
    assert server is not None
    original: Callable[..., Any] = server._send_error_response

    async def _send_error_response(self: Any, status_code: int) -> None:
        body = error_body(status_code)
        await self._send_h11_event(h11.Response(status_code=status_code, headers=[
            (b"content-type", b"application/json"),
            (b"content-length", b"%d" % len(body)), (b"connection", b"close"),
            *self.config.response_headers("h11")]))
        await self._send_h11_event(h11.Data(data=body))
        await self._send_h11_event(h11.EndOfMessage())

    server._send_error_response = _send_error_response
    _original_send_error_response = original
    return True
