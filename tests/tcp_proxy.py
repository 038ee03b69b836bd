"""A TCP relay in front of a local server (Redis, PostgreSQL) that tests switch off — an
outage: listening stops and every relayed connection is dropped — and on again, on the same
port. `reply_delay_s` holds what the server sends back for that long (a slow network or a
busy server: what the client sent has arrived and runs, its reply is late)."""
from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator


class TcpProxy:
    """127.0.0.1:`port` (0: any free port, kept across restarts) -> 127.0.0.1:`target_port`."""

    def __init__(self, target_port: int, port: int = 0) -> None:
        self.target_port = target_port
        self.port = port
        self.reply_delay_s = 0.0
        self.reply_chunk = 0  # >0: replies go on in pieces of this many bytes, one write each
        self.sent: bytearray | None = None  # a bytearray: what clients send is recorded in it
        self.accepted = 0
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()
        self.relays: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server is None:
            return
        self.server.close()
        for writer in list(self.writers):
            writer.transport.abort()
        self.writers.clear()
        await self.server.wait_closed()
        self.server = None

    async def close(self) -> None:
        """`stop`, then waits for the relays to end (their connections are gone), so none is
        left pending on a loop that stops next: collected, its "Task was destroyed but it is
        pending!" is logged, and failed a later test that checks the error log."""
        await self.stop()
        if self.relays:
            await asyncio.wait(list(self.relays), timeout=5)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        task = asyncio.current_task()
        assert task is not None
        self.relays.add(task)
        task.add_done_callback(self.relays.discard)
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1",
                                                                         self.target_port)
        self.writers |= {writer, upstream_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                       replies: bool) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    if replies and self.reply_delay_s:
                        await asyncio.sleep(self.reply_delay_s)
                    if not replies and self.sent is not None:
                        self.sent += data
                    step = self.reply_chunk if replies and self.reply_chunk else len(data)
                    for at in range(0, len(data), step):
                        dst.write(data[at:at + step])
                        await dst.drain()
                        if at + step < len(data):  # (a pause between pieces, so the
                            await asyncio.sleep(0.001)  # client reads each on its own)
            dst.transport.abort()

        await asyncio.gather(pipe(reader, upstream_writer, False),
                             pipe(upstream_reader, writer, True))
        self.writers -= {writer, upstream_writer}


@contextlib.contextmanager
def relay_in_thread(target_port: int, port: int = 0) -> Iterator[TcpProxy]:
    """A TcpProxy on an event loop of its own, in a thread: a relay for synchronous tests,
    which hold its replies back (`reply_delay_s`) while clients on other loops wait."""
    proxy = TcpProxy(target_port, port)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(proxy.start(), loop).result(10)
    try:
        yield proxy
    finally:
        asyncio.run_coroutine_threadsafe(proxy.close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
