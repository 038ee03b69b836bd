"""The gathering writer (gateway/hypercorn_writes.py): what is written in one turn of the event
loop leaves in one write, what is written in later turns leaves in its own, nothing is lost
or reordered at close, and hypercorn serves JSON and streamed responses through it intact.
Everything runs over real sockets on 127.0.0.1."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from hypercorn.asyncio import tcp_server

from gateway import hypercorn_writes
from gateway.hypercorn_writes import GatheringWriter
from tests.harness import kept_alive_then_streamed, served_here


@asynccontextmanager
async def connected() -> AsyncIterator[tuple[GatheringWriter, list[bytes],
                                             asyncio.StreamReader]]:
    """A gathering writer on the server side of a real connection, the list of what it handed
    the stream writer under it, and the client's reader."""
    accepted: asyncio.Queue[asyncio.StreamWriter] = asyncio.Queue()

    async def on_connect(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await accepted.put(writer)

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, client = await asyncio.open_connection("127.0.0.1", port)
    writer = await asyncio.wait_for(accepted.get(), 10)
    handed: list[bytes] = []
    write: Callable[[bytes], None] = writer.write

    def counting_write(data: bytes) -> None:
        handed.append(bytes(data))
        write(data)

    writer.write = counting_write  # type: ignore[method-assign]
    try:
        yield GatheringWriter(writer, asyncio.get_running_loop()), handed, reader
    finally:
        client.close()
        writer.close()
        server.close()
        await server.wait_closed()


async def test_writes_in_one_turn_leave_in_one_write() -> None:
    async with connected() as (writer, handed, reader):
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
        await writer.drain()
        writer.write(b"ok")
        writer.write(b"")  # h11's end of a sized message: nothing to send
        await writer.drain()
        assert handed == []  # not yet: the turn is not over
        assert await asyncio.wait_for(reader.readexactly(40), 10) == (
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        assert handed == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"]


async def test_writes_in_later_turns_leave_on_their_own() -> None:
    async with connected() as (writer, handed, reader):
        for number in range(3):  # a stream's chunks, each in a turn of its own
            writer.write(b"data: %d\n\n" % number)
            await asyncio.sleep(0)
        assert await asyncio.wait_for(reader.readexactly(27), 10) == (
            b"data: 0\n\ndata: 1\n\ndata: 2\n\n")
        assert handed == [b"data: 0\n\n", b"data: 1\n\n", b"data: 2\n\n"]


@pytest.mark.parametrize("end", ["close", "write_eof"])
async def test_what_is_gathered_goes_out_before_the_end(end: str) -> None:
    async with connected() as (writer, handed, reader):
        writer.write(b"last ")
        writer.write(b"words")
        getattr(writer, end)()  # in the same turn: nothing may be dropped
        assert await asyncio.wait_for(reader.read(), 10) == b"last words"
        assert handed == [b"last words"]


async def test_the_transport_sees_what_was_written_first() -> None:
    async with connected() as (writer, handed, _reader):
        writer.write(b"first")
        assert writer.transport is not None
        assert handed == [b"first"]


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    if scope["path"] == "/stream":
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        for number in range(3):
            await send({"type": "http.response.body", "body": b"data: %d\n\n" % number,
                        "more_body": True})
            await asyncio.sleep(0.01)
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
        return
    body = b'{"ok":true}'
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def test_hypercorn_serves_through_it() -> None:
    assert hypercorn_writes.install()
    assert hypercorn_writes.install()  # once is enough
    assert hypercorn_writes.installed()
    async with served_here(app) as (port, _stop, _task):
        chunks = await kept_alive_then_streamed(port, b'{"ok":true}')
        assert chunks == [b"data: 0\n\n", b"data: 1\n\n", b"data: 2\n\n", b"data: [DONE]\n\n",
                          b""]
        assert tcp_server.TCPServer.__init__ is not hypercorn_writes._original_init
