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
"""
from __future__ import annotations

import hashlib
import inspect
import logging
from collections.abc import Callable
from typing import Any

from gateway import h11_cycle

logger = logging.getLogger("sluicegate")

__all__ = ["install", "installed"]

# sha256 of the source of H11Protocol._check_protocol and _create_stream in hypercorn 0.18.0
_FINGERPRINT = "48f94fa6f53e7b1a1a50577a32f036d09729c0cac06896b19cf154faba74f1dd"

_original_check_protocol: Callable[..., Any] | None = None
_original_create_stream: Callable[..., Any] | None = None


def installed() -> bool:
    return _original_create_stream is not None


def fingerprint(protocol: type) -> str:
    """What the shortcut was written against: the source of the two methods it replaces."""
    source = inspect.getsource(protocol._check_protocol) + inspect.getsource(  # type: ignore[attr-defined]
        protocol._create_stream)  # type: ignore[attr-defined]
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
