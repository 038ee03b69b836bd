"""What a connection's response writes in one turn of the event loop goes out in one send(2).

Hypercorn (0.18, asyncio) hands each piece h11 makes to the socket at once: a JSON response
is two writes (the status line and headers, then the body; the end of the message adds an
empty one), so two system calls and, on loopback, two trips through the TCP stack to the
client, where one would do. That second call is a few microseconds of kernel time on every
response, more than what some of the gateway's layers cost.

`install()` gives each hypercorn `TCPServer` a writer that gathers what is written and sends
it at the end of the current turn of the event loop (one `loop.call_soon`): the head and the
body an app sends back to back leave together, and a stream's chunks, which arrive in turns
of their own, still leave one by one, as soon as they come. Nothing waits longer than the turn
it was written in. Flow control is the stream's own (`drain()` is the writer's), a turn's
bytes late. Closing or half-closing the connection sends what is gathered first.

`gateway.asgi` (the app `sluicegate serve` runs) installs it. Mounted into a host's app, the
gateway leaves the host's hypercorn alone. A hypercorn without the expected pieces is left as
it is.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("sluicegate")

__all__ = ["GatheringWriter", "install", "installed"]

_original_init: Callable[..., None] | None = None


def installed() -> bool:
    return _original_init is not None


class GatheringWriter:
    """An `asyncio.StreamWriter` whose writes within one turn of the loop go out together."""

    __slots__ = ("_loop", "_pending", "_writer", "drain", "get_extra_info", "is_closing",
                 "wait_closed")

    def __init__(self, writer: asyncio.StreamWriter, loop: asyncio.AbstractEventLoop) -> None:
        self._writer = writer
        self._loop = loop
        self._pending: list[bytes] | None = None
        # The rest is the writer's own, with no call of ours in between.
        self.drain = writer.drain
        self.get_extra_info = writer.get_extra_info
        self.is_closing = writer.is_closing
        self.wait_closed = writer.wait_closed

    @property
    def transport(self) -> asyncio.BaseTransport:
        self._flush()  # whoever goes to the transport itself sees what was written first
        return self._writer.transport

    def write(self, data: bytes) -> None:
        if not data:
            return
        pending = self._pending
        if pending is None:
            self._pending = [data]
            self._loop.call_soon(self._flush)
        else:
            pending.append(data)

    def _flush(self) -> None:
        pending = self._pending
        if pending is None:
            return
        self._pending = None
        try:
            self._writer.write(pending[0] if len(pending) == 1 else b"".join(pending))
        except (ConnectionError, RuntimeError) as exc:  # hypercorn's write would close on these
            logger.debug("hypercorn: a response write failed (%s); closing", exc)
            self._writer.close()  # its reader ends, and hypercorn closes the connection

    def write_eof(self) -> None:
        self._flush()
        self._writer.write_eof()

    def close(self) -> None:
        self._flush()
        self._writer.close()


def install() -> bool:
    """Gives hypercorn's connections the gathering writer (once); False when hypercorn is not
    the shape this was written against, and then nothing changes."""
    global _original_init
    if _original_init is not None:
        return True
    try:
        from hypercorn.asyncio import tcp_server
    except ImportError:
        return False
    server_class = getattr(tcp_server, "TCPServer", None)
    original = getattr(server_class, "__init__", None)
    code = getattr(original, "__code__", None)  # a plain function, as hypercorn 0.18 has it
    if server_class is None or original is None or code is None \
            or code.co_varnames[:8] != ("self", "app", "loop", "config", "context", "state",
                                        "reader", "writer"):
        logger.info("hypercorn: responses keep hypercorn's own writes")
        return False

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        self.writer = GatheringWriter(self.writer, self.loop)

    server_class.__init__ = __init__
    _original_init = original
    return True
