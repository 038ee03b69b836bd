"""The gateway's Redis client reads every kind of reply from a real Redis, whole or cut into
pieces at any point (a relay hands the replies on a few bytes per write), with many commands
in flight on one connection."""
from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest

from gateway.resp import RespClient, RespError
from tests.tcp_proxy import TcpProxy

REDIS_PORT = 6379


@pytest.fixture
async def relay() -> AsyncIterator[TcpProxy]:
    proxy = TcpProxy(REDIS_PORT)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.stop()


async def _every_kind(client: RespClient, key: str, big_kib: int = 300) -> list[object]:
    """One of each reply type, sent in one event-loop step (one write, replies read together).
    The large value (`big_kib` KiB, with RESP-looking bytes in it) is longer than one read of
    the socket (at most 256 KiB) when whole."""
    big = bytes(range(256)) * (4 * big_kib) + b"\r\n$5\r\n:1\r\n"
    await client.call("SET", key + ":big", big)
    await client.call("SET", key + ":text", "42")
    results = await asyncio.gather(
        client.call("GET", key + ":big"),  # bulk string, larger than one read
        client.call("GET", key + ":none"),  # nil bulk string
        client.call("INCRBY", key + ":n", "-12345678901"),  # negative integer
        client.call("PING"),  # simple string
        client.call("LPUSH", key + ":text", "x"),  # error reply (WRONGTYPE)
        client.call("EVAL", "return {1, {2, 'two', {}}, -3, ''}", "0"),  # nested arrays
        client.call("SET", key + ":empty", ""),
        client.call("GET", key + ":empty"),  # empty bulk string
        return_exceptions=True)
    assert results[0] == big
    await client.call("DEL", key + ":big", key + ":text", key + ":n", key + ":empty")
    return results[1:]


def _check(results: list[object]) -> None:
    nil, number, pong, error, nested, ok, empty = results
    assert nil is None
    assert number == -12345678901
    assert pong == "PONG"
    assert isinstance(error, RespError) and str(error).startswith("WRONGTYPE")
    assert nested == [1, [2, b"two", []], -3, b""]
    assert ok == "OK"
    assert empty == b""


async def test_replies_read_whole() -> None:
    client = RespClient(f"redis://127.0.0.1:{REDIS_PORT}/0")
    try:
        _check(await _every_kind(client, f"resp-test:{uuid.uuid4().hex}"))
    finally:
        await client.close()


@pytest.mark.parametrize("piece", [1, 3, 7, 16_384])
async def test_replies_read_in_pieces(relay: TcpProxy, piece: int) -> None:
    # 1 byte at a time cuts every reply at every point: in a length, between \r and \n,
    # inside a bulk string and inside an array; 16 KiB cuts the 300 KiB value many times.
    # The relay waits 1 ms after each piece, so small pieces get a small large value: a
    # 300 KiB value in 3-byte pieces would take over 100 s.
    client = RespClient(f"redis://127.0.0.1:{relay.port}/0", timeout_s=60)
    try:
        await client.call("PING")  # (connected before the replies are cut)
        relay.reply_chunk = piece
        big_kib = 300 if piece >= 1024 else 1
        _check(await _every_kind(client, f"resp-test:{uuid.uuid4().hex}", big_kib))
    finally:
        await client.close()


async def test_a_reply_that_is_not_resp_closes_the_connection() -> None:
    # A server that answers with something else: every command in flight fails, none hangs.
    async def not_redis(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1024)
        writer.write(b"$12x\r\nhello\r\n")  # a length that is not a number
        await writer.drain()
        await reader.read(1024)

    server = await asyncio.start_server(not_redis, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = RespClient(f"redis://127.0.0.1:{port}/0", timeout_s=5)
    try:
        with pytest.raises(ConnectionError, match="unreadable reply"):
            await client.call("PING")
    finally:
        await client.close()
        server.close()
