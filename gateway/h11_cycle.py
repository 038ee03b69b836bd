"""A plain HTTP/1.1 request/response cycle through h11 without its state machine.

Hypercorn serves HTTP/1.1 through h11, and h11 runs every event through its whole machinery:
the request head through two generators and a regex per header line, every request and
response through `_process_event` (a copy of the state dict, the event-triggered and the
state-triggered transitions, a scan of the headers for each of Connection, Upgrade, Expect,
Transfer-Encoding and Content-Length, each done twice for a response), and every response
through a clean-up that rebuilds it. Under callgrind one request/response cycle cost h11
about 437k instructions, a third of what the whole bare gateway spends on a request.

For the cycle almost every request is, most of it is fixed by the bytes and the states, and
this module takes that cycle straight to its result. It shortcuts four of h11's
`Connection` methods, for a server, and only in these cases; anything else goes to h11's own
code, which then behaves, fails and words its errors exactly as it always did:

- `next_event`, with both sides IDLE (no pending protocol switch, keep-alive on) and the
  receive buffer holding a whole request head whose request line and header lines (split at
  CRLF) match h11's own grammar (its compiled regexes), which is HTTP/1.1 with one
  Host, at most one plain Content-Length and no Transfer-Encoding, Upgrade or Expect, and whose
  method is not CONNECT. It returns the `Request` h11 would, and leaves the states, the
  keep-alive flag (`Connection: close`), the request method, the peer's HTTP version, the
  reader (Content-Length) and the writer as h11 would. Header lines already seen are
  remembered with what they parse to (up to 4,096 lines of up to 512 bytes), and Host,
  Content-Length and Connection lines with what they decide (as many more), so a client's
  fixed headers cost a dict lookup. Its headers iterate in C (`plain_headers`, a
  subclass of h11's `Headers` that compares equal to it), which also tells
  gateway/hypercorn_h11.py that the request has no Upgrade header. Lines that may carry a secret (a name with
  auth, key, cookie, token or secret in it) are parsed every time instead, so no credential
  outlives its request in the memo.
- `next_event`, with the client sending a Content-Length body: the next `Data` from the
  buffer, or the `EndOfMessage` when it is complete (the client then DONE, or MUST_CLOSE
  without keep-alive, and its reader `expect_nothing`), as h11's reader and state machine
  make them. An empty buffer (h11: NEED_DATA, or an error after EOF) goes to h11.
- `send` of a `Response` with the server in SEND_RESPONSE, the client in SEND_BODY or DONE,
  an HTTP/1.1 peer, keep-alive on, no pending switch, a request that was not HEAD or CONNECT,
  a status that is not 204 or 304, and headers gateway/h11_headers.py made when it checked
  them (never with a Host header, nor a repeated framing header): h11's clean-up (a body of
  unknown length gets `Transfer-Encoding: chunked` in place of any Content-Length) and its
  writer give the same bytes as the lines it made, and the states, keep-alive flag, writer and
  reader end as h11 leaves them. Other headers (h11_headers not installed, or headers h11
  folded itself) go to h11's writer.
- `send` of an `EndOfMessage` with the server in SEND_BODY, the client DONE and keep-alive
  on; the writer's own checks (too little data for the Content-Length, trailers) send it to
  h11 instead, which then fails it as it does.
- `start_next_cycle` from DONE/DONE with keep-alive on.

`install()` chains in front of whatever `send` and `_process_event` are there
(gateway.h11_body's body shortcut, normally); `gateway.asgi` (the app `sluicegate serve` runs)
installs it. Mounted into a host's app, the gateway leaves the host's h11 alone. An h11
without the expected attributes is left as it is. tests/gateway/test_h11_cycle.py holds it
to stock h11: events, bytes, states, readers, writers and errors, over many request shapes.
"""
from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from operator import itemgetter
from typing import Any

from gateway import h11_headers
from gateway.h11_headers import says_close as _says_close

logger = logging.getLogger("sluicegate")

__all__ = ["install", "installed"]

MEMO_MAX = 4096
LINE_MAX = 512  # longer header lines are parsed every time: the memos stay under 4 MiB

_original_next_event: Callable[..., Any] | None = None
_original_start_next_cycle: Callable[..., Any] | None = None
# request header lines that parsed, with what h11 makes of them (raw name, lower-cased, value)
_lines: dict[bytes, tuple[bytes, bytes, bytes]] = {}
# Host, Content-Length and Connection lines that parsed: what h11 makes of them, and what
# they decide (one of the kinds below)
_deciding: dict[bytes, tuple[tuple[bytes, bytes, bytes], str]] = {}
HOST, LENGTH, CLOSE, KEEP = "host", "length", "close", "keep"
# The class of a shortcut request's headers (h11's `Headers`, iterated in C): such a request
# is HTTP/1.1 with no Upgrade header (gateway/hypercorn_h11.py relies on it).
plain_headers: type | None = None


def _credential(name: bytes) -> bool:
    """A header that may carry a secret (Authorization, x-api-key, Cookie, ...): its lines
    are parsed every time, never kept in the memo."""
    return b"auth" in name or b"key" in name or b"cookie" in name or b"token" in name \
        or b"secret" in name


def installed() -> bool:
    return _original_next_event is not None


def install() -> bool:
    """Puts the shortcuts in front of h11's `Connection` (once); False when h11 is not the
    shape this was written against, and then nothing changes."""
    global _original_next_event, _original_start_next_cycle, plain_headers
    if _original_next_event is not None:
        return True
    try:
        import h11
        from h11 import _readers, _state, _writers
        from h11._connection import Connection
        from h11._headers import CONTENT_LENGTH_MAX_DIGITS, Headers
        from h11._receivebuffer import ReceiveBuffer
    except ImportError:
        return False
    probe = Connection(h11.SERVER)
    shape = ("_cstate", "_writer", "_reader", "_receive_buffer", "_request_method",
             "their_http_version", "our_role", "client_is_waiting_for_100_continue")
    if not all(hasattr(probe, name) for name in shape) \
            or not all(hasattr(probe._cstate, name) for name in (
                "states", "keep_alive", "pending_switch_proposals")) \
            or not hasattr(probe._receive_buffer, "_data") \
            or type(probe._receive_buffer) is not ReceiveBuffer \
            or probe._reader is not getattr(_readers, "maybe_read_from_IDLE_client", None) \
            or probe._writer is not getattr(_writers, "write_any_response", None) \
            or not all(hasattr(_readers, name) for name in (
                "request_line_re", "header_field_re", "ContentLengthReader", "expect_nothing")) \
            or not all(hasattr(_writers, name) for name in (
                "ChunkedWriter", "ContentLengthWriter")):
        logger.info("h11 %s: requests and responses keep h11's own state machine",
                    getattr(sys.modules.get("h11"), "__version__", "?"))
        return False

    original_next_event: Callable[..., Any] = Connection.next_event
    original_send: Callable[..., Any] = Connection.send
    original_start_next_cycle: Callable[..., Any] = Connection.start_next_cycle
    client, server = h11.CLIENT, h11.SERVER
    idle, send_body, send_response = _state.IDLE, _state.SEND_BODY, _state.SEND_RESPONSE
    done, must_close = _state.DONE, _state.MUST_CLOSE
    request_type, response_type, data_type = h11.Request, h11.Response, h11.Data
    end_of_message = h11.EndOfMessage
    read_idle_client = _readers.maybe_read_from_IDLE_client
    expect_nothing = _readers.expect_nothing
    length_reader = _readers.ContentLengthReader
    write_response = _writers.write_any_response
    chunked_writer, length_writer = _writers.ChunkedWriter, _writers.ContentLengthWriter
    request_line_re, header_field_re = _readers.request_line_re, _readers.header_field_re
    lines_memo, deciding_memo = _lines, _deciding
    new = object.__new__
    pair = itemgetter(1, 2)

    class PlainHeaders(Headers):
        """h11's Headers of a request the shortcut read: the same pairs, iterated in C
        (hypercorn lists them for the ASGI scope) rather than by `Sequence.__getitem__`."""

        __slots__ = ()

        def __iter__(self) -> Any:
            return map(pair, self._full_items)

    setattr_ = object.__setattr__
    # request headers that decide framing, keep-alive or a protocol switch (remembered apart,
    # with what they decide; the last three always go to h11)
    deciding = frozenset((b"host", b"content-length", b"transfer-encoding", b"connection",
                          b"upgrade", b"expect"))
    chunked_line = b"Transfer-Encoding: chunked\r\n"

    def read_request(self: Any) -> Any:
        """The Request at the head of the buffer, with the states set as h11 sets them; None
        when h11 has to look at it (then nothing has changed)."""
        buffer = self._receive_buffer
        data = buffer._data
        # h11 has searched up to its hint, so a head that arrives in many pieces is not
        # scanned from its start on each one (a new CRLFCRLF can begin one byte before it).
        end = data.find(b"\r\n\r\n", max(0, buffer._multiple_lines_search - 1))
        if end <= 0:
            return None
        # A bare LF or CR, or a folded line (h11 takes them all), fails the grammar below.
        lines = bytes(data[:end]).split(b"\r\n")
        matched = request_line_re.fullmatch(lines[0])
        if matched is None or matched.group("http_version") != b"1.1":
            return None
        method = matched.group("method")
        if method == b"CONNECT":
            return None
        full = []
        hosts = 0
        length: bytes | None = None
        close = False
        for line in lines[1:]:
            known = lines_memo.get(line)
            if known is not None:
                full.append(known)
                continue
            decided = deciding_memo.get(line)
            if decided is None:
                field = header_field_re.fullmatch(line)
                if field is None:
                    return None
                name, value = field.group("field_name", "field_value")
                lowered = name.lower()
                known = (name, lowered, value)
                if lowered not in deciding:
                    if len(line) <= LINE_MAX and not _credential(lowered):
                        if len(lines_memo) >= MEMO_MAX:
                            lines_memo.clear()
                        lines_memo[line] = known
                    full.append(known)
                    continue
                if lowered == b"host":
                    decided = (known, HOST)
                elif lowered == b"content-length":
                    if not value.isdigit() or len(value) > CONTENT_LENGTH_MAX_DIGITS:
                        return None
                    decided = (known, LENGTH)
                elif lowered == b"connection":
                    decided = (known, CLOSE if _says_close(value) else KEEP)
                else:  # transfer-encoding, upgrade, expect
                    return None
                if len(line) <= LINE_MAX:
                    if len(deciding_memo) >= MEMO_MAX:
                        deciding_memo.clear()
                    deciding_memo[line] = decided
            known, kind = decided
            if kind is HOST:
                hosts += 1
            elif kind is LENGTH:
                if length is not None:  # a second one: h11 folds or refuses it
                    return None
                length = known[2]
            elif kind is CLOSE:
                close = True
            full.append(known)
        if hosts != 1:
            return None
        del data[:end + 4]
        buffer._next_line_search = 0
        buffer._multiple_lines_search = 0
        request = new(request_type)
        setattr_(request, "headers", PlainHeaders(full))
        setattr_(request, "method", method)
        setattr_(request, "target", matched.group("target"))
        setattr_(request, "http_version", b"1.1")
        states = self._cstate.states
        states[client] = send_body
        states[server] = send_response
        if close:
            self._cstate.keep_alive = False
        self._request_method = method
        self.their_http_version = b"1.1"
        self._writer = write_response
        self._reader = length_reader(0 if length is None else int(length))
        return request

    def next_event(self: Any) -> Any:
        if self.our_role is server:
            cstate = self._cstate
            states = cstate.states
            reader = self._reader
            if reader is read_idle_client:
                if states[client] is idle and states[server] is idle \
                        and cstate.keep_alive and not cstate.pending_switch_proposals:
                    request = read_request(self)
                    if request is not None:
                        return request
            elif type(reader) is length_reader and states[client] is send_body:
                remaining = reader._remaining
                if remaining:
                    buffer = self._receive_buffer
                    data = buffer._data
                    if data:
                        chunk = data[:remaining]
                        del data[:remaining]
                        buffer._next_line_search = 0
                        buffer._multiple_lines_search = 0
                        reader._remaining = remaining - len(chunk)
                        self.client_is_waiting_for_100_continue = False
                        return data_type(data=chunk)
                elif not cstate.pending_switch_proposals \
                        and states[server] in (send_response, send_body, done):
                    event = end_of_message()
                    states[client] = done if cstate.keep_alive else must_close
                    self.client_is_waiting_for_100_continue = False
                    self._reader = expect_nothing
                    return event
        return original_next_event(self)

    def respond(self: Any, event: Any) -> bytes | None:
        """The response head as h11 writes it, states as h11 leaves them; None when h11 has
        to send it."""
        cstate = self._cstate
        states = cstate.states
        method = self._request_method
        if states[server] is not send_response or self._writer is not write_response \
                or not cstate.keep_alive or cstate.pending_switch_proposals \
                or self.their_http_version != b"1.1" or method == b"HEAD" \
                or method == b"CONNECT" or event.http_version != b"1.1" \
                or event.status_code in (204, 304):
            return None
        client_state = states[client]
        if client_state is not send_body and client_state is not done:
            return None
        headers: Any = event.headers
        if type(headers) is not h11_headers.rendered_type:
            return None  # (headers gateway/h11_headers.py did not make: h11 writes them)
        length: bytes | None = headers.length
        close = headers.close
        lines = headers.lines
        writer: Any
        if headers.chunked or length is None:  # h11: Transfer-Encoding: chunked, no length
            if headers.chunked or length is not None:  # either framing header is there
                lines = [line for line, item in zip(lines, headers._full_items, strict=True)
                         if item[1] != b"content-length" and item[1] != b"transfer-encoding"]
            lines = [*lines, chunked_line]
            writer = chunked_writer()
        else:
            writer = length_writer(int(length))
        head = b"HTTP/1.1 %s %s\r\n%s\r\n" % (str(event.status_code).encode("ascii"),
                                                event.reason, b"".join(lines))
        states[server] = send_body
        if close:
            cstate.keep_alive = False
            if client_state is done:
                states[client] = must_close
                self._reader = expect_nothing
        self.client_is_waiting_for_100_continue = False
        self._writer = writer
        return head

    def send(self: Any, event: Any) -> bytes | None:
        if self.our_role is server:
            kind = type(event)
            if kind is response_type:
                head = respond(self, event)
                if head is not None:
                    return head
            elif kind is end_of_message:
                cstate = self._cstate
                states = cstate.states
                if states[server] is send_body and states[client] is done \
                        and cstate.keep_alive and not cstate.pending_switch_proposals:
                    written: list[bytes] = []
                    try:
                        self._writer(event, written.append)
                    except Exception:  # noqa: BLE001 (h11 fails it its own way, below)
                        return original_send(self, event)  # type: ignore[no-any-return]
                    states[server] = done
                    self._writer = None
                    return b"".join(written)
        return original_send(self, event)  # type: ignore[no-any-return]

    def start_next_cycle(self: Any) -> None:
        cstate = self._cstate
        states = cstate.states
        if self.our_role is server and states[client] is done and states[server] is done \
                and cstate.keep_alive and not cstate.pending_switch_proposals:
            cstate.states = {client: idle, server: idle}
            self._request_method = None
            self._writer = write_response
            self._reader = read_idle_client
            return
        original_start_next_cycle(self)

    Connection.next_event = next_event  # type: ignore[method-assign]
    Connection.send = send  # type: ignore[method-assign,assignment]
    Connection.start_next_cycle = start_next_cycle  # type: ignore[method-assign]
    _original_next_event = original_next_event
    _original_start_next_cycle = original_start_next_cycle
    plain_headers = PlainHeaders
    return True
