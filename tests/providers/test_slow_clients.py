"""Clients the gateway waits on, and answers too large to read: a stream's client that stops
reading holds its upstream connection no longer than the provider's `total_s`, and its end is
the client's (billed what it was sent, no verdict on the deployment); a non-stream answer
over the provider's `max_answer_bytes` is a 502 `bad_response`, not read whole.

The upstream is a raw asyncio server on 127.0.0.1 that streams as fast as it may, without
end, and counts its open connections; the slow client a raw socket that reads the response
headers and then stops.
"""
from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any, Self

import openai
import pytest

from gateway import create_app
from gateway.config import ConfigError
from gateway.context import Usage, request_context
from gateway.errors import ClientDisconnected, GatewayError
from providers import Provider
from tests.harness import (
    TEST_KEY,
    ThreadedServer,
    config_head,
    free_port,
    openai_client,
    wait_for,
    write_config,
)

TOTAL_S = 2.0
MAX_ANSWER_BYTES = 1_000_000


class EndlessUpstream:
    """An OpenAI-style upstream in a thread: a stream request gets chunks without end (as
    fast as its connection takes them); `huge`/`huge-unsized` get a chat answer larger than
    MAX_ANSWER_BYTES (with and without a Content-Length); anything else a small answer."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.open = 0  # connections open now
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self._ready.set()
        async with server:
            await self._stop.wait()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open += 1
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            request = json.loads(await reader.readexactly(length))
            if request.get("stream"):
                await self._stream(writer)
            else:
                await self._answer(writer, request["model"])
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.open -= 1
            writer.close()

    async def _stream(self, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                     b"connection: close\r\n\r\n")
        chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
                 "model": "gpt-4o-mini",
                 "choices": [{"index": 0, "delta": {"content": "word " * 200},
                              "finish_reason": None}]}
        event = b"data: " + json.dumps(chunk).encode() + b"\n\n"
        while True:
            writer.write(event)
            await writer.drain()
            await asyncio.sleep(0)  # (never starves the other connections)

    async def _answer(self, writer: asyncio.StreamWriter, model: str) -> None:
        content = "x" * (2 * MAX_ANSWER_BYTES) if model.startswith("huge") else "hello"
        body = json.dumps({
            "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": model,
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}).encode()
        sized = b"" if model == "huge-unsized" else b"content-length: %d\r\n" % len(body)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n" + sized
                     + b"connection: close\r\n\r\n" + body)
        await writer.drain()

    def __enter__(self) -> Self:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=10)


# How each stream request ended, seen above the failover layer: usage, error type, and
# whether the client was taken as gone. (Streams only: a non-stream call's record may land
# after its client has its answer, in the next test.)
ENDED: list[tuple[Usage | None, str | None, bool]] = []


class EndSeen:
    """Keeps each stream request's usage, error type and `client_disconnected`, as metering
    reads them."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] == "/healthz":
            await self.app(scope, receive, send)
            return
        ctx = request_context(scope)
        if not ctx.stream:
            await self.app(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        except (GatewayError, ClientDisconnected):
            ENDED.append((ctx.usage, ctx.error_type, ctx.client_disconnected))
            raise
        ENDED.append((ctx.usage, ctx.error_type, ctx.client_disconnected))


@pytest.fixture(scope="module")
def upstream() -> Iterator[EndlessUpstream]:
    with EndlessUpstream() as server:
        yield server


def gateway_config(upstream: EndlessUpstream, options: str = "") -> str:
    # One failure opens a deployment's breaker: a slow client blamed on it shows at once.
    return f'''{config_head()}
from tests.providers.test_slow_clients import EndSeen
timeouts = Timeouts(connect_s=2, first_byte_s=5, idle_s=5, total_s={TOTAL_S})
providers = {{
    "oai": Provider("openai", base_url="{upstream.url}/v1", api_key_env=KEY, timeouts=timeouts,
                    {options}),
}}
models = {{"gpt": [Deployment("oai", "gpt-4o-mini", price=PRICE)],
           "huge": [Deployment("oai", "huge", price=PRICE)],
           "huge-unsized": [Deployment("oai", "huge-unsized", price=PRICE)]}}
middleware = [Middleware(EndSeen),
              Middleware(FailoverMiddleware, breaker=BreakerSettings(consecutive_failures=1),
                         retry=RetryPolicy(max_attempts=1))]
'''


@pytest.fixture(scope="module")
def gateway(upstream: EndlessUpstream,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedServer]:
    text = gateway_config(upstream)
    with ThreadedServer(create_app(write_config(tmp_path_factory.mktemp("slow"), text))) as server:
        yield server


@pytest.fixture(scope="module")
def capped_gateway(upstream: EndlessUpstream,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedServer]:
    text = gateway_config(upstream, f"max_answer_bytes={MAX_ANSWER_BYTES}")
    with ThreadedServer(create_app(write_config(tmp_path_factory.mktemp("cap"), text))) as server:
        yield server


@pytest.fixture(autouse=True)
def fresh() -> None:
    ENDED.clear()


def stalled_stream(server: ThreadedServer) -> socket.socket:
    """A raw client that asks for a stream, reads its response headers, and stops there (a
    small receive buffer, so the gateway's sends soon wait on it)."""
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.connect(("127.0.0.1", server.port))
    body = json.dumps({"model": "gpt", "stream": True,
                       "messages": [{"role": "user", "content": "hello"}]}).encode()
    client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\n"
                   b"authorization: Bearer " + TEST_KEY.encode() + b"\r\n"
                   b"content-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body)
                   + body)
    head = b""
    while b"\r\n\r\n" not in head:
        got = client.recv(1)
        assert got, head
        head += got
    assert head.startswith(b"HTTP/1.1 200"), head
    return client


def still_served(server: ThreadedServer) -> None:
    """The deployment's breaker recorded no failure: the next call is answered by it."""
    answer = openai_client(server).chat.completions.create(
        model="gpt", messages=[{"role": "user", "content": "hi"}])
    assert answer.choices[0].message.content == "hello"


def test_a_client_that_stops_reading_frees_the_upstream_connection_by_total_s(
        upstream: EndlessUpstream, gateway: ThreadedServer) -> None:
    client = stalled_stream(gateway)
    try:
        assert wait_for(lambda: upstream.open == 1)
        # Bounded by total_s from the call's start (the margin is generous, not a speed test).
        assert wait_for(lambda: upstream.open == 0, timeout_s=TOTAL_S + 20), \
            "the upstream connection is still held by a client that stopped reading"
        assert wait_for(lambda: len(ENDED) == 1)
        usage, error_type, client_disconnected = ENDED[0]
        assert (error_type, client_disconnected) == (None, True)
        assert usage is not None and usage.output_tokens > 0  # billed what it was sent
    finally:
        client.close()
    still_served(gateway)


def test_a_client_that_reads_again_after_total_s_is_no_provider_timeout(
        upstream: EndlessUpstream, gateway: ThreadedServer) -> None:
    client = stalled_stream(gateway)
    try:
        time.sleep(TOTAL_S + 1.5)
        client.settimeout(1.0)
        reading_until = time.monotonic() + 20
        while time.monotonic() < reading_until:  # (on the endless stream as it was: 20 s)
            try:
                if not client.recv(65536):
                    break
            except TimeoutError:
                continue
    finally:
        client.close()
    assert wait_for(lambda: len(ENDED) == 1)
    _, error_type, client_disconnected = ENDED[0]
    assert (error_type, client_disconnected) == (None, True)
    assert wait_for(lambda: upstream.open == 0)
    still_served(gateway)


@pytest.mark.parametrize("model", ["huge", "huge-unsized"])
def test_an_answer_over_max_answer_bytes_is_a_bad_response(
        capped_gateway: ThreadedServer, model: str) -> None:
    with pytest.raises(openai.APIStatusError) as caught:
        openai_client(capped_gateway).chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 502
    error = caught.value.body
    assert isinstance(error, dict) and error["code"] == "bad_response", error
    assert "max_answer_bytes (1000000)" in error["message"]


@pytest.mark.parametrize("value", [0, -1, True, 1.5, "64MB"])
def test_max_answer_bytes_is_checked_as_the_config_loads(value: object) -> None:
    with pytest.raises(ConfigError) as caught:
        Provider("openai", api_key_env="OPENAI_API_KEY", max_answer_bytes=value)
    assert str(caught.value) == ("a openai provider's max_answer_bytes must be a positive "
                                 f"number of bytes, not {value!r}.")
