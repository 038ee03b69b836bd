"""The plain-request shortcut in hypercorn (gateway/hypercorn_h11.py) gives the app the same
scopes and bodies, and the client the same bytes, as hypercorn's own protocol-switch checks:
for plain requests (which take it), for upgrades and HTTP/1.0 (which do not), and for
hypercorn's keep-alive request cap, which it still counts."""
from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import hypercorn.config
import orjson
import pytest
from hypercorn.protocol.h11 import H11Protocol

from gateway import h11_body, h11_cycle, hypercorn_h11
from tests.harness import answer_lifespan, read_body, served_here


@pytest.fixture(scope="module")
def installed() -> None:
    assert h11_body.install()
    assert h11_cycle.install()
    assert hypercorn_h11.install()
    assert hypercorn_h11.install()  # once is enough
    assert hypercorn_h11.installed()
    assert hypercorn_h11.fingerprint(H11Protocol) != hypercorn_h11._FINGERPRINT or \
        H11Protocol._create_stream is not hypercorn_h11._original_create_stream


@contextmanager
def stock_hypercorn() -> Iterator[None]:
    patched = (H11Protocol._check_protocol, H11Protocol._create_stream)
    H11Protocol._check_protocol = hypercorn_h11._original_check_protocol  # type: ignore[method-assign]
    H11Protocol._create_stream = hypercorn_h11._original_create_stream  # type: ignore[method-assign]
    try:
        yield
    finally:
        H11Protocol._check_protocol, H11Protocol._create_stream = patched  # type: ignore[method-assign]


def recording_app(seen: list[Any]) -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        if scope["type"] == "websocket":
            seen.append(("websocket", scope["path"], scope["headers"]))
            await receive()
            await send({"type": "websocket.close", "code": 1000})
            return
        body = await read_body(receive)
        kept = {name: value for name, value in scope.items()
                if name not in ("client", "state", "server")}
        seen.append((kept, body))
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain"),
                                (b"content-length", b"%d" % len(body))]})
        await send({"type": "http.response.body", "body": body})
    return app


POST = (b"POST /v1/chat/completions?x=1&y=%20z HTTP/1.1\r\nHost: gw\r\nX-Custom: A b\r\n"
        b"Content-Type: application/json\r\nContent-Length: 7\r\nConnection: keep-alive\r\n\r\n"
        b"{\"a\":1}")
H2C = (b"GET / HTTP/1.1\r\nhost: gw\r\nconnection: upgrade\r\nupgrade: h2c\r\n"
       b"http2-settings: AAMAAABkAAQAAP__\r\n\r\n")
WEBSOCKET = (b"GET /ws HTTP/1.1\r\nhost: gw\r\nconnection: Upgrade\r\nupgrade: websocket\r\n"
             b"sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
CHUNKED = (b"POST / HTTP/1.1\r\nhost: gw\r\ntransfer-encoding: chunked\r\n\r\n"
           b"3\r\nabc\r\n0\r\n\r\n")
EXCHANGES = [
    [POST, b"GET /caf%C3%A9/%2F HTTP/1.1\r\nhost: gw\r\n\r\n", POST],  # plain, kept alive
    [H2C],  # hypercorn's h2c upgrade
    [WEBSOCKET],
    [b"POST /old HTTP/1.0\r\ncontent-length: 2\r\n\r\nhi"],  # HTTP/1.0: h11 and hypercorn
    [CHUNKED, POST],  # chunked: h11's reader, hypercorn's checks
]


async def _exchange(port: int, requests: list[bytes]) -> bytes:
    """Each request in turn on one connection, reading what comes back after each."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    received = b""
    try:
        for request in requests:
            writer.write(request)
            try:
                received += await asyncio.wait_for(reader.read(65536), 2)
            except TimeoutError:
                received += b"<no answer>"
    finally:
        writer.close()
    return b"\n".join(line for line in received.split(b"\n")
                      if not line.lower().startswith(b"date:"))


async def _serve(exchanges: list[list[bytes]], **config: Any) -> tuple[list[Any], list[bytes]]:
    seen: list[Any] = []
    # One date for every answer: the h2c answer's is HPACK-coded (no `date:` line to drop),
    # and two runs a second apart differed there and nowhere else.
    original = hypercorn.config.format_date_time
    hypercorn.config.format_date_time = lambda _when: "Sun, 29 Nov 2026 00:00:00 GMT"
    try:
        async with served_here(recording_app(seen), **config) as (port, _stop, _task):
            answers = [await _exchange(port, requests) for requests in exchanges]
    finally:
        hypercorn.config.format_date_time = original
    return seen, answers


async def test_the_app_and_the_client_see_what_hypercorn_gives_them(installed) -> None:
    ours = await _serve(EXCHANGES)
    with stock_hypercorn():
        theirs = await _serve(EXCHANGES)
    assert ours == theirs
    seen, answers = ours
    assert seen[0][0]["path"] == "/v1/chat/completions"
    assert seen[0][0]["query_string"] == b"x=1&y=%20z"
    assert (b"x-custom", b"A b") in seen[0][0]["headers"]
    assert seen[0][1] == b'{"a":1}'
    assert seen[1][0]["path"] == "/caf\u00e9//"
    assert b"101" in answers[1].split(b"\r\n")[0]  # the h2c upgrade still happens
    assert any(entry[0] == "http" and entry[1]["http_version"] == "2" for entry in
               [("http", item[0]) for item in seen if isinstance(item[0], dict)])  # over h2c
    assert ("websocket", "/ws") in [item[:2] for item in seen]  # and the WebSocket one


async def test_the_keep_alive_request_cap_still_counts(installed) -> None:
    exchange = [[POST, POST, POST]]
    ours = await _serve(exchange, keep_alive_max_requests=2)
    with stock_hypercorn():
        theirs = await _serve(exchange, keep_alive_max_requests=2)
    assert ours == theirs
    _seen, answers = ours
    assert answers[0].count(b"HTTP/1.1 200") == 2
    assert b"connection: close" in answers[0].lower()


async def test_raw_header_names_when_hypercorn_passes_them(installed) -> None:
    ours = await _serve(EXCHANGES[:1], h11_pass_raw_headers=True)
    with stock_hypercorn():
        theirs = await _serve(EXCHANGES[:1], h11_pass_raw_headers=True)
    assert ours == theirs
    assert (b"X-Custom", b"A b") in ours[0][0][0]["headers"]


UNREADABLE = [
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: abc\r\n\r\n{}",
    b"POST /v1/messages HTTP/1.1\r\nHost: gw\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nBad Header: x\r\n\r\n",
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\ntransfer-encoding: chunked\r\n\r\n"
     b"zz\r\n{}\r\n0\r\n\r\n"),
    b"NOT-HTTP\r\n\r\n",
]


@pytest.mark.parametrize("request_bytes", UNREADABLE)
async def test_a_request_h11_cannot_read_gets_a_json_400_that_says_so(
        installed: None, request_bytes: bytes) -> None:
    assert hypercorn_h11.install_error_bodies()
    assert hypercorn_h11.install_error_bodies()  # once is enough
    seen, [answer] = await _serve([[request_bytes]])
    assert [body for _scope, body in seen] in ([], [b""])  # (a bad body: after its head)
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.lower().split(b"\r\n")
    assert lines[0] == b"http/1.1 400 "
    assert b"content-type: application/json" in lines and b"connection: close" in lines
    assert f"content-length: {len(body)}".encode() in lines
    error = orjson.loads(body)
    # (read by both SDKs: OpenAI's error object in Anthropic's envelope)
    assert error["type"] == "error"
    assert error["error"]["type"] == "invalid_request_error"
    assert error["error"]["code"] == "malformed_request"
    assert "not valid HTTP/1.1" in error["error"]["message"]


async def test_a_header_block_too_large_is_a_json_431(installed: None) -> None:
    assert hypercorn_h11.install_error_bodies()
    huge = b"GET / HTTP/1.1\r\nHost: gw\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n"
    seen, [answer] = await _serve([[huge]])
    assert seen == [] and answer.startswith(b"HTTP/1.1 431 ")
    assert b"too large" in answer.partition(b"\r\n\r\n")[2]
