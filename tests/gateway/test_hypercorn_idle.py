"""The idle timer that replaces hypercorn's idle task (gateway/hypercorn_idle.py) keeps
hypercorn's behaviour: an idle keep-alive connection is closed after `keep_alive_timeout`, a
busy one never is, and a stopping worker closes its idle connections at once. Each test runs
a real hypercorn server on 127.0.0.1 and talks HTTP/1.1 to it over a socket."""
from __future__ import annotations

import asyncio
from contextlib import AbstractAsyncContextManager
from typing import Any

import pytest
from hypercorn.asyncio import tcp_server
from hypercorn.asyncio.task_group import TaskGroup

from gateway import hypercorn_idle
from tests.harness import served_here

REQUEST = b"GET / HTTP/1.1\r\nhost: test\r\n\r\n"


@pytest.fixture(autouse=True)
def _installed() -> None:
    assert hypercorn_idle.install()
    assert hypercorn_idle.install()  # once is enough; a second call changes nothing
    assert hypercorn_idle.installed()
    assert tcp_server.AsyncioSingleTask is hypercorn_idle.IdleTimer


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    if scope["path"] == "/slow":
        await asyncio.sleep(2.0)  # twice the idle timeout of the tests below
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


def server(keep_alive_timeout: float, graceful_timeout: float = 3
           ) -> AbstractAsyncContextManager[tuple[int, asyncio.Event, asyncio.Task[None]]]:
    return served_here(app, keep_alive_timeout=keep_alive_timeout,
                       graceful_timeout=graceful_timeout)


async def get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
              path: str = "/") -> bytes:
    writer.write(REQUEST.replace(b"GET / ", f"GET {path} ".encode()))
    await writer.drain()
    return await asyncio.wait_for(reader.readuntil(b"\r\n\r\nok"), 10)


async def test_an_idle_connection_is_closed_after_the_keep_alive_timeout() -> None:
    async with server(keep_alive_timeout=1.0) as (port, _stop, _task):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(3):  # each request disarms the timer, each response arms it again
            assert (await get(reader, writer)).startswith(b"HTTP/1.1 200")
        # Nothing more is sent: the server closes the connection (EOF), within a bound
        # far above the timeout (a correctness check, not a timing one).
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()


async def test_a_request_longer_than_the_timeout_is_not_cut() -> None:
    async with server(keep_alive_timeout=1.0) as (port, _stop, _task):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert (await get(reader, writer)).startswith(b"HTTP/1.1 200")
        # The app takes twice the idle timeout: the connection is busy, not idle.
        assert (await get(reader, writer, "/slow")).startswith(b"HTTP/1.1 200")
        assert (await get(reader, writer)).startswith(b"HTTP/1.1 200")
        writer.close()


async def test_stopping_closes_idle_connections_at_once() -> None:
    # Without the timer's watch, the connections would end only when the graceful timeout
    # (a minute here) ran out.
    async with server(keep_alive_timeout=3600, graceful_timeout=60) as (port, stop, task):
        connections = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        for reader, writer in connections:
            assert (await get(reader, writer)).startswith(b"HTTP/1.1 200")
        stop.set()
        # An hour of keep-alive left, yet every idle connection ends and the server returns.
        for reader, writer in connections:
            assert await asyncio.wait_for(reader.read(), 10) == b""
            writer.close()
        await asyncio.wait_for(task, 10)


async def test_a_client_that_leaves_disarms_the_timer() -> None:
    async with server(keep_alive_timeout=3600) as (port, _stop, _task):
        for _ in range(5):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            assert (await get(reader, writer)).startswith(b"HTTP/1.1 200")
            assert armed_timers() >= 1  # idle: its timer is armed
            writer.close()
            await writer.wait_closed()
            # The server sees the EOF and stops the timer (an hour before it would fire).
            for _ in range(500):
                if armed_timers() == 0:
                    break
                await asyncio.sleep(0.01)
            assert armed_timers() == 0


def armed_timers() -> int:
    return sum(len(timers) for timers in hypercorn_idle._armed.values())


async def test_any_other_action_gets_hypercorns_own_task() -> None:
    ran = asyncio.Event()
    cancelled = asyncio.Event()

    async def action() -> None:
        ran.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async with TaskGroup(asyncio.get_running_loop()) as group:
        timer = hypercorn_idle.IdleTimer()
        await timer.restart(group, action)
        await asyncio.wait_for(ran.wait(), 10)
        await timer.stop()
        assert cancelled.is_set()
