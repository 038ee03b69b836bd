"""The cycle shortcuts in h11 (gateway/h11_cycle.py) do what stock h11 does. A server reads
the same events (requests with their raw header names, body pieces, ends of message), sends
the same bytes, raises the same errors with the same words, and is left in the same states,
with the same keep-alive flag, request method, peer version, reader, writer and buffer,
after every step: over well-formed requests and responses (which take the shortcuts), over
all the shapes that must go to h11 instead, and however the bytes arrive. Hypercorn serves
through it intact, and no credential is kept in its memo."""
from __future__ import annotations

import random
from dataclasses import fields
from types import FunctionType
from typing import Any

import h11
import pytest

from gateway import h11_body, h11_cycle, h11_headers
from tests.harness import kept_alive_app, kept_alive_then_streamed, served_here, stock_h11


@pytest.fixture(scope="module")
def installed() -> None:
    # As `sluicegate serve` runs them: the response shortcut takes the headers
    # gateway/h11_headers.py makes (others go to h11's writer).
    assert h11_headers.install()
    assert h11_body.install()
    assert h11_cycle.install()
    assert h11_cycle.install()  # once is enough
    assert h11_cycle.installed()
    assert h11.Connection.next_event is not h11_cycle._original_next_event



def _io(item: Any) -> Any:
    """A reader or writer as something comparable: the function, or its class and counters."""
    if item is None or isinstance(item, FunctionType):
        return item
    return (type(item), sorted(vars(item).items()))


def _state(connection: h11.Connection) -> Any:
    cstate = connection._cstate
    return (dict(cstate.states), cstate.keep_alive, set(cstate.pending_switch_proposals),
            connection.their_http_version, connection._request_method,
            connection.client_is_waiting_for_100_continue, _io(connection._reader),
            _io(connection._writer), connection.trailing_data)


def _event(event: Any) -> Any:
    """An event with what equality leaves out: raw header names and the types of its fields."""
    if isinstance(event, (h11.Request, h11.Response, h11.InformationalResponse,
                          h11.EndOfMessage)):
        return (event, event.headers.raw_items(),
                [(type(value), value) for value in _fields(event)])
    if isinstance(event, h11.Data):
        return (event, type(event.data))
    return event


def _fields(event: Any) -> list[Any]:
    return [getattr(event, field.name) for field in fields(event) if field.name != "headers"]


def _drain(connection: h11.Connection, log: list[Any]) -> bool:
    """Reads events until h11 wants data or pauses; False after an error or a close."""
    while True:
        try:
            event = connection.next_event()
        except h11.RemoteProtocolError as exc:
            log.append(("error", type(exc), str(exc), exc.error_status_hint, _state(connection)))
            return False
        log.append((_event(event), _state(connection)))
        if event in (h11.NEED_DATA, h11.PAUSED):
            return True
        if type(event) is h11.ConnectionClosed:
            return False


def _send(connection: h11.Connection, event: Any, log: list[Any]) -> bool:
    try:
        log.append((connection.send(event), _state(connection)))
    except h11.LocalProtocolError as exc:
        log.append(("error", type(exc), str(exc), _state(connection)))
        return False
    return True


def _exchange(pieces: list[bytes], responses: list[list[Any]]) -> list[Any]:
    """A server fed `pieces` one by one (reading after each), answering each request it
    completes with the next list of events and starting the next cycle when it can."""
    connection = h11.Connection(h11.SERVER)
    log: list[Any] = []
    answers = iter(responses)
    for piece in pieces:
        connection.receive_data(piece)
        if not _drain(connection, log):
            return log
        while connection.their_state is h11.DONE or connection.our_state is h11.SEND_RESPONSE:
            if connection.our_state is h11.DONE:
                try:
                    connection.start_next_cycle()
                except h11.LocalProtocolError as exc:
                    log.append(("error", str(exc), _state(connection)))
                    return log
                log.append(("next cycle", _state(connection)))
                if not _drain(connection, log):
                    return log
                continue
            answer = next(answers, None)
            if answer is None:
                break
            for event in answer:
                if not _send(connection, event, log):
                    return log
            if connection.our_state is not h11.DONE:
                break
    return log


def _same_as_h11(pieces: list[bytes], responses: list[list[Any]]) -> list[Any]:
    ours = _exchange(pieces, responses)
    with stock_h11():
        theirs = _exchange(pieces, responses)
    assert ours == theirs
    return ours


def _json(length: int = 2, *extra: tuple[bytes, bytes]) -> list[Any]:
    return [h11.Response(status_code=200, headers=[(b"Content-Type", b"application/json"),
                                                   (b"content-length", b"%d" % length),
                                                   *extra]),
            h11.Data(data=b"x" * length), h11.EndOfMessage()]


def _stream(*headers: tuple[bytes, bytes], status: int = 200) -> list[Any]:
    return [h11.Response(status_code=status,
                         headers=[(b"content-type", b"text/event-stream"), *headers]),
            h11.Data(data=b"data: 1\n\n"), h11.Data(data=b""), h11.Data(data=b"data: 2\n\n"),
            h11.EndOfMessage()]


POST = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: t\r\n"
        b"Authorization: Bearer sk-sg-secret\r\nContent-Type: application/json\r\n"
        b"Content-Length: 11\r\n\r\n{\"a\": true}")
GET = b"GET /v1/models HTTP/1.1\r\nhost: x\r\naccept: */*\r\n\r\n"

REQUESTS = {
    "post": POST,
    "get": GET,
    "head": b"HEAD / HTTP/1.1\r\nhost: x\r\n\r\n",
    "connection close": b"GET / HTTP/1.1\r\nhost: x\r\nConnection: Keep-Alive, CLOSE\r\n\r\n",
    "connection keep-alive": b"GET / HTTP/1.1\r\nhost: x\r\nconnection: keep-alive\r\n\r\n",
    "upgrade": b"GET / HTTP/1.1\r\nhost: x\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n",
    "expect": b"POST / HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\ncontent-length: 2\r\n\r\n{}",
    "chunked": b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    "chunked and length": (b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 9\r\n"
                           b"transfer-encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"),
    "http/1.0": b"GET / HTTP/1.0\r\n\r\n",
    "http/1.0 with host": b"GET / HTTP/1.0\r\nhost: x\r\n\r\n",
    "no host": b"GET / HTTP/1.1\r\naccept: */*\r\n\r\n",
    "two hosts": b"GET / HTTP/1.1\r\nhost: x\r\nHost: y\r\n\r\n",
    "connect": b"CONNECT example.com:443 HTTP/1.1\r\nhost: example.com:443\r\n\r\n",
    "bad request line": b"GET  / HTTP/1.1\r\nhost: x\r\n\r\n",
    "bad method": b"G(T / HTTP/1.1\r\nhost: x\r\n\r\n",
    "bad version": b"GET / HTTP/11\r\nhost: x\r\n\r\n",
    "bad header": b"GET / HTTP/1.1\r\nhost: x\r\nbad header: y\r\n\r\n",
    "no colon": b"GET / HTTP/1.1\r\nhost: x\r\nnocolon\r\n\r\n",
    "obs-fold": b"GET / HTTP/1.1\r\nhost: x\r\nx-a: 1\r\n  2\r\n\r\n",
    "fold first": b"GET / HTTP/1.1\r\n x: 1\r\nhost: x\r\n\r\n",
    "bare lf": b"GET / HTTP/1.1\nhost: x\n\n",
    "mixed lf": b"GET / HTTP/1.1\r\nhost: x\nx-a: 1\r\n\r\n",
    "lone cr": b"GET / HTTP/1.1\r\nhost: x\r\nx-a: 1\r2\r\n\r\n",
    "leading crlf": b"\r\nGET / HTTP/1.1\r\nhost: x\r\n\r\n",
    "only crlf": b"\r\n\r\n",
    "length list": b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 2, 2\r\n\r\n{}",
    "length conflict": b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 2, 3\r\n\r\n{}",
    "two lengths": b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\nContent-Length: 2\r\n\r\n{}",
    "bad length": b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: -2\r\n\r\n{}",
    "long length": b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: %s\r\n\r\n" % (b"9" * 21),
    "zero length": b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n",
    "values": (b"GET /a?b=c%20d HTTP/1.1\r\nHOST:x\r\nX-Empty:\r\nX-Spaces:  a \t b  \r\n"
               b"X-High: caf\xc3\xa9\r\nX-Tab:\tv\t\r\n\r\n"),
    "nul in value": b"GET / HTTP/1.1\r\nhost: x\r\nx-a: a\x00b\r\n\r\n",
    "pipelined": POST + GET + POST,
    "garbage after": POST + b"\x01\x02 not http\r\n\r\n",
    "tiny start": b"\x00GET / HTTP/1.1\r\nhost: x\r\n\r\n",
}


@pytest.mark.parametrize("name", list(REQUESTS))
def test_requests_read_and_answered_as_with_h11(installed, name) -> None:
    request = REQUESTS[name]
    for answers in ([_json()] * 3, [_stream()] * 3):
        whole = _same_as_h11([request], answers)
        assert whole
        pieces = _same_as_h11([request[:7], request[7:-3], request[-3:]], answers)
        if not [entry for entry in whole if entry[0] == "error"]:
            assert pieces[-1][-1] == whole[-1][-1]  # however it arrives, it ends the same
        closed = _same_as_h11([request, b""], answers)  # then the peer closes
        assert closed


def test_a_request_byte_by_byte(installed) -> None:
    pieces = [bytes([byte]) for byte in POST + GET]
    log = _same_as_h11(pieces, [_json(), _stream()])
    assert [entry for entry in log if entry[0] == "next cycle"]


def test_random_splits_of_pipelined_requests(installed) -> None:
    shuffle = random.Random(1234)
    stream = POST + GET + REQUESTS["connection keep-alive"] + POST + REQUESTS["head"]
    for _ in range(60):
        cuts = sorted(shuffle.sample(range(1, len(stream)), shuffle.randint(1, 6)))
        pieces = [stream[start:end] for start, end in zip([0, *cuts], [*cuts, len(stream)],
                                                          strict=True)]
        _same_as_h11(pieces, [_json(), _stream(), _json(0), _json(3), _json(5)])


def _responses() -> dict[str, list[Any]]:
    """The responses, made when called: made after the fixture installed
    gateway/h11_headers.py, their headers are the ones the response shortcut takes."""
    return {
        "content-length": _json(5),
        "chunked": _stream(),
        "both framings": _stream((b"Content-Length", b"9"), (b"Transfer-Encoding", b"chunked")),
        "transfer-encoding alone": _stream((b"transfer-encoding", b"chunked")),
        "connection close": _json(2, (b"Connection", b"close")),
        "connection close chunked": _stream((b"connection", b"keep-alive, close")),
        "connection keep-alive": _json(2, (b"connection", b"keep-alive")),
        "host": _json(2, (b"Host", b"x")),
        "204": [h11.Response(status_code=204, headers=[(b"content-length", b"0")]),
                h11.EndOfMessage()],
        "304": [h11.Response(status_code=304, headers=[]), h11.EndOfMessage()],
        "reason": [h11.Response(status_code=404, reason=b"Not Found",
                                headers=[(b"content-length", b"0")]), h11.EndOfMessage()],
        "status enum": [h11.Response(status_code=__import__("http").HTTPStatus.CREATED,
                                     headers=[(b"content-length", b"0")]), h11.EndOfMessage()],
        "http/1.0 response": [h11.Response(status_code=200, http_version=b"1.0",
                                           headers=[(b"content-length", b"0")])],
        "too little": _json(5)[:1] + [h11.Data(data=b"ab"), h11.EndOfMessage()],
        "too much": _json(2)[:1] + [h11.Data(data=b"abc")],
        "length trailers": _json(2)[:2] + [h11.EndOfMessage(headers=[(b"x-t", b"1")])],
        "chunked trailers": _stream()[:2] + [h11.EndOfMessage(headers=[(b"X-T", b"1")])],
        "informational first": [h11.InformationalResponse(status_code=103, headers=[]),
                                *_json(2)],
        "twice": _json(2)[:1] + _json(2),
        "eom first": [h11.EndOfMessage()],
        "closed": [h11.ConnectionClosed()],
    }


RESPONSE_NAMES = list(_responses())


@pytest.mark.parametrize("name", RESPONSE_NAMES)
def test_responses_sent_as_with_h11(installed, name) -> None:
    for request in (POST, GET, REQUESTS["head"], REQUESTS["http/1.0 with host"],
                    REQUESTS["expect"], REQUESTS["connection close"]):
        _same_as_h11([request + GET], [_responses()[name], _json(1)])
        _same_as_h11([POST[:-4]], [_responses()[name]])  # answered before the body is in


def test_the_next_cycle_only_from_done_as_with_h11(installed) -> None:
    def cycle() -> list[Any]:
        connection = h11.Connection(h11.SERVER)
        log: list[Any] = []
        for _ in range(3):
            try:
                connection.start_next_cycle()
            except h11.LocalProtocolError as exc:
                log.append((str(exc), _state(connection)))
            connection.receive_data(GET)
            _drain(connection, log)
        return log

    ours = cycle()
    with stock_h11():
        assert ours == cycle()


def test_a_client_goes_to_h11(installed) -> None:
    client = h11.Connection(h11.CLIENT)
    data = client.send(h11.Request(method="GET", target="/", headers=[(b"host", b"x")]))
    assert data == b"GET / HTTP/1.1\r\nhost: x\r\n\r\n"
    client.send(h11.EndOfMessage())
    client.receive_data(b"HTTP/1.1 200 \r\ncontent-length: 2\r\n\r\nok")
    events = [client.next_event() for _ in range(3)]
    assert [type(event) for event in events] == [h11.Response, h11.Data, h11.EndOfMessage]
    assert client.states == {h11.CLIENT: h11.DONE, h11.SERVER: h11.DONE}


def test_no_credential_stays_in_the_memo(installed) -> None:
    secret = b"sk-sg-" + b"s3cr3t" * 8
    request = (b"POST / HTTP/1.1\r\nhost: x\r\nAuthorization: Bearer %s\r\nx-api-key: %s\r\n"
               b"Cookie: session=%s\r\nx-goog-api-key: %s\r\nX-Trace: kept\r\n"
               b"content-length: 0\r\n\r\n" % (secret, secret, secret, secret))
    connection = h11.Connection(h11.SERVER)
    connection.receive_data(request)
    event = connection.next_event()
    assert dict(event.headers)[b"authorization"] == b"Bearer " + secret  # read, as h11 does
    assert b"X-Trace: kept" in h11_cycle._lines
    assert not [line for line in h11_cycle._lines if secret in line]


def test_the_memo_stays_bounded(installed) -> None:
    for index in range(h11_cycle.MEMO_MAX + 10):
        connection = h11.Connection(h11.SERVER)
        connection.receive_data(b"GET / HTTP/1.1\r\nhost: x\r\nx-n: %d\r\n\r\n" % index)
        assert type(connection.next_event()) is h11.Request
    assert len(h11_cycle._lines) <= h11_cycle.MEMO_MAX
    for index in range(h11_cycle.MEMO_MAX + 10):
        connection = h11.Connection(h11.SERVER)
        connection.receive_data(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n"
                                % index)
        assert type(connection.next_event()) is h11.Request
    assert len(h11_cycle._deciding) <= h11_cycle.MEMO_MAX
    long_line = b"x-long: " + b"y" * h11_cycle.LINE_MAX
    connection = h11.Connection(h11.SERVER)
    connection.receive_data(b"GET / HTTP/1.1\r\nhost: x\r\n%s\r\n\r\n" % long_line)
    assert (b"x-long", b"y" * h11_cycle.LINE_MAX) in list(connection.next_event().headers)
    assert long_line not in h11_cycle._lines  # read, not remembered


async def test_hypercorn_serves_through_it(installed) -> None:
    async with served_here(kept_alive_app) as (port, _stop, _task):
        chunks = await kept_alive_then_streamed(port, b'{"ok":true}')
    assert chunks == [b"data: %d\n\n" % index for index in range(50)] + [b""]
