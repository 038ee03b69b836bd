"""The body shortcuts in h11 (gateway/h11_body.py) do what stock h11 does: a server sends the
same bytes, with the same states after every event and the same errors (and ERROR state)
after them, for Content-Length, chunked, HEAD and HTTP/1.0 bodies; a server reads the same
events and ends in the same states from request bodies however they arrive; and hypercorn
serves through them intact."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import h11
import pytest

from gateway import h11_body
from tests.harness import kept_alive_app, kept_alive_then_streamed, served_here, stock_h11


@pytest.fixture(scope="module")
def original() -> Callable[..., Any]:
    assert h11_body.install()
    assert h11_body.install()  # once is enough
    assert h11_body.installed()
    assert h11_body._original is not None
    assert h11.Connection.send is not h11_body._original
    return h11_body._original



def _server(request: bytes) -> h11.Connection:
    connection = h11.Connection(h11.SERVER)
    connection.receive_data(request)
    while connection.next_event() not in (h11.NEED_DATA, h11.PAUSED):
        pass
    return connection


POST = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}"
HEAD = b"HEAD / HTTP/1.1\r\nhost: x\r\n\r\n"
OLD = b"GET / HTTP/1.0\r\n\r\n"


def _events(length: bytes | None, chunks: list[bytes]) -> list[Any]:
    headers = [(b"content-type", b"application/json")]
    if length is not None:
        headers.append((b"content-length", length))
    return [h11.Response(status_code=200, headers=headers),
            *[h11.Data(data=chunk) for chunk in chunks], h11.EndOfMessage()]


def _run(request: bytes, events: list[Any]) -> list[Any]:
    """What each event gave (bytes, or the error's type and text) and the states after it."""
    connection = _server(request)
    seen: list[Any] = []
    for event in events:
        try:
            seen.append(connection.send(event))
        except h11.LocalProtocolError as exc:
            seen.append((type(exc), str(exc)))
        seen.append((connection.our_state, connection.their_state))
    return seen


CASES = [
    (POST, _events(b"11", [b'{"ok":', b"true}"])),  # Content-Length, two chunks
    (POST, _events(None, [b"data: 1\n\n", b"", b"data: [DONE]\n\n"])),  # chunked, an empty one
    (POST, _events(b"3", [b"abcd"])),  # more than the length: an error, then ERROR
    (POST, _events(b"5", [b"ab"])),  # fewer: EndOfMessage is refused, by h11 alone
    (HEAD, _events(b"5", [b"abcde"])),  # HEAD: no body may go out
    (OLD, _events(None, [b"raw ", b"bytes"])),  # HTTP/1.0: no framing, close at the end
    (POST, [h11.Data(data=b"early")]),  # before the response: h11 alone refuses it
]


@pytest.mark.parametrize(("request_bytes", "events"), CASES)
def test_the_same_bytes_states_and_errors_as_h11(original, request_bytes, events) -> None:
    ours = _run(request_bytes, events)
    with stock_h11():
        theirs = _run(request_bytes, events)
    assert ours == theirs
    assert any(isinstance(event, h11.Data) for event in events)


def _read(pieces: list[bytes]) -> list[Any]:
    """Every event a server reads as `pieces` arrive one by one (or the error it raises), with
    the states and the 100-continue flag after each."""
    connection = h11.Connection(h11.SERVER)
    seen: list[Any] = []
    for piece in pieces:
        connection.receive_data(piece)
        while True:
            try:
                event = connection.next_event()
            except h11.RemoteProtocolError as exc:
                seen.append((type(exc), str(exc), connection.their_state))
                return seen
            seen.append((event, connection.our_state, connection.their_state,
                         connection.client_is_waiting_for_100_continue))
            if event in (h11.NEED_DATA, h11.PAUSED):
                break
    return seen


HEADERS = b"POST / HTTP/1.1\r\nhost: x\r\n"
BODIES = [
    [HEADERS + b"content-length: 10\r\n\r\n0123", b"45", b"6789"],  # in three pieces
    [HEADERS + b"transfer-encoding: chunked\r\n\r\n4\r\nabcd\r\n", b"3\r\nef",
     b"g\r\n0\r\n\r\n"],  # chunked, one chunk split across pieces
    [HEADERS + b"content-length: 4\r\nexpect: 100-continue\r\n\r\n", b"ab", b"cd"],
    [HEADERS + b"content-length: 2\r\n\r\nabGET / HTTP/1.1\r\nhost: x\r\n\r\n"],  # pipelined
    [HEADERS + b"transfer-encoding: chunked\r\n\r\n4\r\nabcd\r\nzz\r\n"],  # a bad size
    [HEADERS + b"content-length: 4\r\n\r\nab", b""],  # the peer closed mid-body
]


@pytest.mark.parametrize("pieces", BODIES)
def test_request_bodies_read_as_with_h11(original, pieces) -> None:
    ours = _read(pieces)
    with stock_h11():
        theirs = _read(pieces)
    assert ours == theirs
    assert any(isinstance(item[0], h11.Data) for item in ours)


def test_after_an_error_the_connection_is_in_error_as_with_h11(original) -> None:
    connection = _server(POST)
    connection.send(h11.Response(status_code=200, headers=[(b"content-length", b"1")]))
    with pytest.raises(h11.LocalProtocolError, match="Too much data"):
        connection.send(h11.Data(data=b"too long"))
    assert connection.our_state is h11.ERROR
    with pytest.raises(h11.LocalProtocolError, match="state is ERROR"):
        connection.send(h11.Data(data=b"x"))


def test_a_client_goes_to_h11(original) -> None:
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="POST", target="/", headers=[
        (b"host", b"x"), (b"content-length", b"2"), (b"expect", b"100-continue")]))
    assert client.client_is_waiting_for_100_continue
    assert client.send(h11.Data(data=b"{}")) == b"{}"
    assert not client.client_is_waiting_for_100_continue  # h11's own bookkeeping ran


def test_kept_alive_connections_start_their_next_cycle(original) -> None:
    connection = _server(POST)
    for event in _events(b"2", [b"ok"]):
        connection.send(event)
    assert (connection.our_state, connection.their_state) == (h11.DONE, h11.DONE)
    connection.start_next_cycle()
    assert (connection.our_state, connection.their_state) == (h11.IDLE, h11.IDLE)


async def test_hypercorn_serves_through_it(original) -> None:
    async with served_here(kept_alive_app) as (port, _stop, _task):
        chunks = await kept_alive_then_streamed(port, b'{"ok":true}')
    assert chunks == [b"data: %d\n\n" % index for index in range(50)] + [b""]
