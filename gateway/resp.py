"""A lean, pipelined Redis (RESP2) client for the hot paths (quota admission, cache lookups).

Admission runs one Lua script per request, so the client's own cost is part of every
request. redis-py spends more on a call than the rest of auth and quota together (argument
encoding in Python, a pool checkout, a timeout context and several reads per reply), so the
quota store speaks RESP itself: one connection, requests written as they come, replies
matched to callers in order (Redis answers a connection's commands in order), one timer per
call. A call that times out closes the connection, failing what was in flight with it,
since a late reply could no longer be matched; the next call reconnects.
"""
from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

__all__ = ["RespClient", "RespError"]


class RespError(Exception):
    """An error reply from Redis (e.g. NOSCRIPT, WRONGTYPE)."""


class _Incomplete:
    """The buffer ends inside a reply."""


_INCOMPLETE = _Incomplete()


def encode_command(args: Sequence[str | bytes]) -> bytes:
    texts = [arg for arg in args if isinstance(arg, str)]
    if len(texts) == len(args):  # the usual case: one encode at the end
        text = "".join([f"${len(arg) if arg.isascii() else len(arg.encode())}\r\n{arg}\r\n"
                        for arg in texts])
        return f"*{len(args)}\r\n{text}".encode()
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg.encode() if isinstance(arg, str) else arg
        parts.append(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(parts)


def parse_reply(buffer: bytearray, pos: int) -> tuple[Any, int] | _Incomplete:
    """One reply from `pos`: (value, position after it), or _INCOMPLETE."""
    end = buffer.find(b"\r\n", pos)
    if end < 0:
        return _INCOMPLETE
    kind, line, after = buffer[pos], bytes(buffer[pos + 1:end]), end + 2
    if kind == 0x3A:  # ':' integer
        return int(line), after
    if kind == 0x24:  # '$' bulk string
        size = int(line)
        if size < 0:
            return None, after
        if len(buffer) < after + size + 2:
            return _INCOMPLETE
        return bytes(buffer[after:after + size]), after + size + 2
    if kind == 0x2A:  # '*' array
        count = int(line)
        if count < 0:
            return None, after
        items = []
        for _ in range(count):
            parsed = parse_reply(buffer, after)
            if isinstance(parsed, _Incomplete):
                return _INCOMPLETE
            item, after = parsed
            items.append(item)
        return items, after
    if kind == 0x2B:  # '+' simple string
        return line.decode(), after
    if kind == 0x2D:  # '-' error
        return RespError(line.decode(errors="replace")), after
    raise ConnectionError(f"Redis sent an unknown reply type {chr(kind)!r}")


class _Connection(asyncio.Protocol):
    """Commands issued in one event-loop step go out in one write (one system call), and
    replies that arrive together are handed out in one `data_received`."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.waiters: deque[asyncio.Future[Any]] = deque()
        self.buffer = bytearray()
        self.outgoing: list[bytes] = []
        self.closed = False
        self.loop = asyncio.get_running_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def request(self, payload: bytes) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = self.loop.create_future()
        self.waiters.append(future)
        if not self.outgoing:
            self.loop.call_soon(self._flush)
        self.outgoing.append(payload)
        return future

    def _flush(self) -> None:
        outgoing, self.outgoing = self.outgoing, []
        if self.transport is not None and not self.closed:
            self.transport.write(outgoing[0] if len(outgoing) == 1 else b"".join(outgoing))

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        pos = 0
        try:
            while self.waiters:
                parsed = parse_reply(buffer, pos)
                if isinstance(parsed, _Incomplete):
                    break
                value, pos = parsed
                future = self.waiters.popleft()
                if future.done():  # its caller timed out
                    continue
                if isinstance(value, RespError):
                    future.set_exception(value)
                else:
                    future.set_result(value)
        except (ValueError, ConnectionError) as exc:
            self.abort(ConnectionError(f"unreadable reply from Redis: {exc}"))
            return
        if pos:
            del buffer[:pos]

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionError("the connection to Redis was lost"))

    def abort(self, error: Exception) -> None:
        self._fail(error)
        if self.transport is not None:
            self.transport.abort()

    def _fail(self, error: Exception) -> None:
        self.closed = True
        while self.waiters:
            future = self.waiters.popleft()
            if not future.done():
                future.set_exception(error)


class RespClient:
    """`await client.call("EVALSHA", sha, "1", key, ...)`; raises RespError for error
    replies, and OSError (ConnectionError, TimeoutError) when Redis cannot be reached."""

    def __init__(self, url: str, *, timeout_s: float = 0.5) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "unix"):
            raise ValueError(f"unsupported Redis URL scheme {parts.scheme!r} "
                             "(redis:// or unix://)")
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 6379
        self.unix_path = parts.path if parts.scheme == "unix" else None
        self.username = unquote(parts.username) if parts.username else None
        self.password = unquote(parts.password) if parts.password else None
        db = parts.path.strip("/") if parts.scheme == "redis" else ""
        self.db = int(db) if db else 0
        self.timeout_s = timeout_s
        self.commands_sent = 0  # for tests that count round trips
        self._connection: _Connection | None = None
        self._connecting: asyncio.Lock | None = None

    def __repr__(self) -> str:  # never the password
        return f"RespClient({self.unix_path or f'{self.host}:{self.port}'}, db={self.db})"

    async def call(self, *args: str | bytes) -> Any:
        connection = self._connection
        if connection is None or connection.closed:
            connection = await self._connect()
        return await self._send(connection, encode_command(args))

    async def call_many(self, commands: Sequence[Sequence[str | bytes]]) -> list[Any]:
        """Sends every command in one write and waits for all replies; an error reply is
        returned in place (as a RespError), a lost connection raises."""
        connection = self._connection
        if connection is None or connection.closed:
            connection = await self._connect()
        futures = [connection.request(encode_command(command)) for command in commands]
        self.commands_sent += len(futures)
        timer = asyncio.get_running_loop().call_later(self.timeout_s, _expire, futures[-1],
                                                      connection)
        try:
            return await asyncio.gather(*futures, return_exceptions=True)
        finally:
            timer.cancel()

    def send_soon(self, commands: Sequence[Sequence[str | bytes]]
                  ) -> list[asyncio.Future[Any]] | None:
        """Queues commands on the open connection without waiting: their futures, or None
        when no connection is open (the caller then uses `call_many`)."""
        connection = self._connection
        if connection is None or connection.closed:
            return None
        futures = [connection.request(encode_command(command)) for command in commands]
        self.commands_sent += len(futures)
        timer = asyncio.get_running_loop().call_later(self.timeout_s, _expire, futures[-1],
                                                      connection)
        futures[-1].add_done_callback(lambda _: timer.cancel())
        return futures

    async def _send(self, connection: _Connection, payload: bytes) -> Any:
        future = connection.request(payload)
        self.commands_sent += 1
        timer = asyncio.get_running_loop().call_later(self.timeout_s, _expire, future,
                                                      connection)
        try:
            return await future
        finally:
            timer.cancel()

    async def _connect(self) -> _Connection:
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:  # concurrent callers share one new connection
            if self._connection is not None and not self._connection.closed:
                return self._connection
            loop = asyncio.get_running_loop()
            async with asyncio.timeout(self.timeout_s):
                if self.unix_path:
                    _, connection = await loop.create_unix_connection(_Connection,
                                                                      self.unix_path)
                else:
                    _, connection = await loop.create_connection(_Connection, self.host,
                                                                 self.port)
            await self._handshake(connection)
            self._connection = connection
            return connection

    async def _handshake(self, connection: _Connection) -> None:
        if self.password is not None:
            auth = ("AUTH", self.username, self.password) if self.username else \
                ("AUTH", self.password)
            await self._send(connection, encode_command(auth))
        if self.db:
            await self._send(connection, encode_command(("SELECT", str(self.db))))

    async def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None and connection.transport is not None:
            connection.closed = True
            connection.transport.close()


def _expire(future: asyncio.Future[Any], connection: _Connection) -> None:
    if not future.done():
        connection.abort(TimeoutError("Redis did not answer in time"))
