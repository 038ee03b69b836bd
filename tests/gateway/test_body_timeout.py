"""A request body that does not arrive whole in time gets a 408 and its connection closed.

A client that sends a request's headers and then (the rest of) no body held its connection
and its request for ever: the kernel waited for the body with no deadline. The gateway here
runs with `Settings(body_timeout_s=0.5)`, under hypercorn on a real socket (in a thread, and
once as `sluicegate serve` with every server shortcut installed); the clients are raw sockets
that send what the test says and read until the server closes the connection (a read of
10 s at most: a server that never closes fails the test, no other timing is asserted).
"""
from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway import create_app
from gateway.body_deadline import BodyDeadlines
from gateway.config import ConfigError
from tests.harness import (
    AUTH,
    TEST_KEY,
    ThreadedServer,
    mock_config,
    start_cli_gateway,
    stop_process,
    write_config,
)
from tests.mock_providers import MockProviderServer

BODY = json.dumps({"model": "gpt-mock", "max_tokens": 10,
                   "messages": [{"role": "user", "content": "a b c d e f g"}]}).encode()
# The key may have one request in flight: a stalled one that held a quota lease would keep
# the next one out.
STACK = ("[Middleware(AuthMiddleware, keys=[StaticKey('tests', key_env='SG_TEST_KEY', "
         "limits=Limits(max_concurrent=1))]), Middleware(QuotaMiddleware), "
         "Middleware(FailoverMiddleware, retry=RetryPolicy(max_attempts=1), "
         "breaker=NEVER_OPENS)]")


def config_path(tmp_path: Path, mock_url: str, body_timeout_s: str = "0.5") -> Path:
    """The config, with `body_timeout_s` (an expression) in its settings."""
    text = mock_config(mock_url, middleware=STACK,
                       extra=f"settings = Settings(body_timeout_s={body_timeout_s})")
    return write_config(tmp_path, text)


@pytest.fixture
def gateway(tmp_path: Path, mock_url: str) -> Iterator[ThreadedServer]:
    with ThreadedServer(create_app(config_path(tmp_path, mock_url))) as server:
        yield server


def head(path: str, *, length: int | None = len(BODY), auth: bytes | None = None,
         content_type: bytes = b"application/json", method: bytes = b"POST") -> bytes:
    """A request head; without `length`, the body is chunked."""
    lines = [method + b" " + path.encode() + b" HTTP/1.1", b"host: gateway",
             b"content-type: " + content_type]
    lines.append(b"content-length: %d" % length if length is not None
                 else b"transfer-encoding: chunked")
    if auth is not None:
        lines.append(auth)
    return b"\r\n".join(lines) + b"\r\n\r\n"


OPENAI_AUTH = f"authorization: Bearer {TEST_KEY}".encode()
ANTHROPIC_AUTH = f"x-api-key: {TEST_KEY}\r\nanthropic-version: 2023-06-01".encode()


def sent_then_read(url: str, *parts: bytes) -> bytes:
    """Sends `parts`, then reads until the server closes the connection (10 s at most)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        for part in parts:
            sock.sendall(part)
        return read_to_close(sock)


def read_to_close(sock: socket.socket) -> bytes:
    received = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:  # closed with the client's last bytes unread
            return received
        if not chunk:
            return received
        received += chunk


def response_of(received: bytes) -> tuple[int, dict[str, str], dict[str, object]]:
    """(status, headers, JSON body) of the one response in `received`."""
    head_bytes, _, body = received.partition(b"\r\n\r\n")
    status_line, *lines = head_bytes.decode().split("\r\n")
    headers = {name.lower(): value.strip()
               for name, _, value in (line.partition(":") for line in lines)}
    assert len(body) == int(headers["content-length"])  # one response, nothing after it
    return int(status_line.split()[1]), headers, json.loads(body)


TIMED_OUT = "The request body did not arrive within 0.5 s of the request's start."


def test_a_body_that_stops_halfway_gets_a_408_in_openai_shape_and_the_connection_closes(
        gateway: ThreadedServer, mock: MockProviderServer) -> None:
    received = sent_then_read(gateway.url, head("/v1/chat/completions", auth=OPENAI_AUTH),
                              BODY[:len(BODY) // 2])
    status, headers, body = response_of(received)
    assert (status, headers["connection"]) == (408, "close")
    assert body == {"error": {"message": TIMED_OUT, "type": "timeout_error", "param": None,
                              "code": "request_timeout"}}
    assert headers["x-request-id"]
    # Nothing was admitted for it (the body is read before any layer runs): the key's one
    # request in flight is free, and nothing went upstream.
    assert httpx.post(gateway.url + "/v1/chat/completions", headers=AUTH, content=BODY,
                      timeout=10).status_code == 200
    assert len(mock.requests) == 1


def test_a_chunked_body_that_stops_gets_a_408_in_anthropic_shape(
        gateway: ThreadedServer) -> None:
    first = b'{"model": "claude-mock", '
    received = sent_then_read(gateway.url, head("/v1/messages", length=None,
                                                auth=ANTHROPIC_AUTH),
                              b"%x\r\n%s\r\n" % (len(first), first))
    status, headers, body = response_of(received)
    assert (status, headers["connection"]) == (408, "close")
    assert body == {"type": "error", "error": {"type": "timeout_error", "message": TIMED_OUT}}


def test_headers_and_no_body_at_all_get_a_408(gateway: ThreadedServer) -> None:
    received = sent_then_read(gateway.url, head("/v1/chat/completions", length=1000,
                                                auth=OPENAI_AUTH))
    assert response_of(received)[0] == 408


def test_a_body_sent_a_byte_at_a_time_is_cut_at_the_deadline_not_held_for_ever(
        gateway: ThreadedServer) -> None:
    # A byte every 0.1 s: a deadline between chunks would never pass; the request's does.
    host, port = gateway.url.removeprefix("http://").split(":")
    stop = threading.Event()
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head("/v1/chat/completions", length=100_000, auth=OPENAI_AUTH))

        def trickle() -> None:
            while not stop.is_set():
                try:
                    sock.sendall(b" ")
                except OSError:  # closed by the server
                    return
                time.sleep(0.1)
        sender = threading.Thread(target=trickle)
        sender.start()
        try:
            received = read_to_close(sock)
        finally:
            stop.set()
            sender.join()
    assert response_of(received)[0] == 408


def test_a_slow_but_steady_body_within_the_deadline_is_served(
        tmp_path: Path, mock_url: str) -> None:
    # Five pieces 0.2 s apart, within a deadline of 5 s.
    with ThreadedServer(create_app(config_path(tmp_path, mock_url, "5.0"))) as server:
        pieces = [BODY[index:index + 20] for index in range(0, len(BODY), 20)]
        host, port = server.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(head("/v1/chat/completions", auth=OPENAI_AUTH))
            for piece in pieces:
                time.sleep(0.2)
                sock.sendall(piece)
            sock.shutdown(socket.SHUT_WR)  # (the server closes once it has answered)
            received = read_to_close(sock)
    status, _, body = response_of(received)
    assert status == 200 and body["object"] == "chat.completion"


def test_a_refusal_made_from_the_headers_goes_out_at_the_deadline_when_the_body_stalls(
        gateway: ThreadedServer) -> None:
    # The kernel drains a refused request's body before answering, so the client reads the
    # answer rather than a reset connection; a body that never ended was drained for ever.
    received = sent_then_read(gateway.url, head("/v1/chat/completions", auth=OPENAI_AUTH,
                                                content_type=b"text/plain"), b"{")
    assert response_of(received)[0] == 415
    received = sent_then_read(gateway.url, head("/healthz"), b"{")  # (not an API path)
    assert response_of(received)[0] == 405
    # A path the layers answer without a context: the auth layer refuses it unkeyed.
    received = sent_then_read(gateway.url, head("/v1/usage/self"), b"{")
    assert response_of(received)[0] == 401


def test_a_stalled_body_under_sluicegate_serve_gets_a_408(
        tmp_path: Path, mock_url: str) -> None:
    # The server as deployed: every h11 and hypercorn shortcut of gateway.asgi installed.
    process, url = start_cli_gateway(config_path(tmp_path, mock_url))
    try:
        received = sent_then_read(url, head("/v1/chat/completions", auth=OPENAI_AUTH),
                                  BODY[:10])
        assert response_of(received)[0] == 408
        assert httpx.post(url + "/v1/chat/completions", headers=AUTH, content=BODY,
                          timeout=10).status_code == 200
    finally:
        stop_process(process)


@pytest.mark.parametrize("value", ["0", "-1", "'30'", "float('nan')", "float('inf')", "True"])
def test_body_timeout_s_must_be_a_positive_number_or_none(
        tmp_path: Path, mock_url: str, value: str) -> None:
    with pytest.raises(ConfigError, match="Settings.body_timeout_s must be a positive number "
                                          "of seconds, or None"):
        create_app(config_path(tmp_path, mock_url, value))
    create_app(config_path(tmp_path, mock_url, "None"))


# -- the one timer (gateway.body_deadline) --------------------------------------------------

async def _read(bodies: BodyDeadlines, deadline: float, wait_s: float) -> str:
    """A body read as the kernel's (`within`): what the deadline's cancellation turns into
    ("late"), any other cancellation going on."""
    try:
        with bodies.within(deadline):
            await asyncio.sleep(wait_s)
    except TimeoutError:
        return "late"
    return "read"


async def test_the_timer_cancels_only_the_reads_past_their_deadline() -> None:
    bodies = BodyDeadlines(0.2)
    stalled = asyncio.create_task(_read(bodies, bodies.deadline(), 30))
    quick = asyncio.create_task(_read(bodies, bodies.deadline(), 0.01))
    later = asyncio.create_task(_read(bodies, bodies.deadline() + 30, 0.6))
    assert await asyncio.wait_for(stalled, 10) == "late"
    assert await quick == "read"
    assert await asyncio.wait_for(later, 10) == "read"  # (its deadline had not come)
    assert not stalled.cancelling() and not later.cancelling()


async def test_a_cancellation_that_is_not_the_deadlines_goes_on() -> None:
    """A client that leaves (hypercorn cancels the request's task) is no late body."""
    bodies = BodyDeadlines(30)
    read = asyncio.create_task(_read(bodies, bodies.deadline(), 30))
    await asyncio.sleep(0.01)
    read.cancel()
    with pytest.raises(asyncio.CancelledError):
        await read


async def test_a_task_whose_read_ended_is_not_cancelled_by_its_old_deadline() -> None:
    bodies = BodyDeadlines(0.1)
    assert await _read(bodies, bodies.deadline(), 0) == "read"
    await asyncio.sleep(0.5)  # (ticks at 0.025 s: the read's deadline passes, and more)
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
