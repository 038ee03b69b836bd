"""HTTP plumbing shared by the provider modules: JSON answers, paced SSE streams, faults.

A stream is a list of pre-rendered events, each flagged as content (a text or arguments
delta) or not. Faults cut a stream at a content boundary: `after_chunks` content events are
sent (with every non-content event before the cut), then the connection is reset, the
provider's in-band error event ends the stream, or (truncate) it just ends.
"""
from __future__ import annotations

import asyncio
import math
import os
import socket
import struct
from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from tests.mock_providers.behaviour import Conversation
from tests.mock_providers.faults import Fault, FaultQueue, MockConfig

JSON = dict[str, Any]
StreamItem = tuple[bytes, bool]  # (rendered event, carries content)
JSON_TYPE = "application/json"
SSE_TYPE = "text/event-stream; charset=utf-8"
_FLUSH_WAIT_S = 2.0
_CUT_PAUSE_S = 0.02
KEEPALIVE = b": keepalive\n\n"


@dataclass(slots=True)
class ServerState:
    """Everything the handlers share: settings, queued faults, the request log, counters."""

    config: MockConfig
    faults: FaultQueue = field(default_factory=FaultQueue)
    requests: list[JSON] = field(default_factory=list)
    active_streams: int = 0
    cancelled_streams: int = 0
    ratio_failures: dict[str, int] = field(default_factory=dict)  # per provider, by fail_ratio
    # Anthropic's prompt cache: a cached prefix's key -> when it expires (time.monotonic())
    prompt_cache: dict[str, float] = field(default_factory=dict)
    # The Responses API's stored responses: API key -> the ids of the responses made with it
    # (an account sees only its own: `previous_response_id` of another is not found).
    stored_responses: dict[str, dict[str, int]] = field(default_factory=dict)
    # One bill per provider call while `MockConfig.record_bills` is on (see `Call.bill`).
    bills: list[JSON] = field(default_factory=list)

    def record(self, entry: JSON) -> None:
        log = self.requests
        log.append(entry)
        if len(log) > self.config.max_recorded:
            del log[: len(log) - self.config.max_recorded]


class BadRequest(Exception):
    """A request the real provider would refuse; the wire renders it in its error shape."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.status = status


class ProviderWire(ABC):
    """How one provider authenticates, names its headers and shapes its errors."""

    name = ""

    def response_headers(self, config: MockConfig) -> dict[str, str]:
        return {}

    @abstractmethod
    def auth_refusal(self, request: web.Request, expected: str | None) -> web.Response | None:
        """An error response when the request's key is missing or wrong, else None."""

    @abstractmethod
    def error(self, status: int, message: str | None, headers: dict[str, str], *,
              param: str | None = None, code: str | None = None,
              retry_after_s: float | None = None) -> web.Response:
        """The provider's error response; `message` None means its usual text for `status`."""

    @abstractmethod
    def stream_error_event(self, message: str | None, code: str | None = None) -> bytes:
        """The in-band error event a 200 stream ends with on an "error_event" fault (`code`:
        the fault's; see `Fault` for what it sets in each provider's event)."""


@dataclass(slots=True)
class Call:
    """One provider request after auth: its parsed body, the fault it drew, reply headers."""

    request: web.Request
    wire: ProviderWire
    body: Any
    fault: Fault | None
    state: ServerState
    headers: dict[str, str]
    # What this call answered, kept in `state.bills` when the config records bills:
    # provider, path, json (the request), status (None: no answer), stream, sent (the body
    # bytes written), content_sent and content_events (a stream's content events: sent, in
    # all), complete (the whole answer went out) and cancelled (its client left).
    bill: JSON | None = None

    def keep_bill(self, status: int | None, *, stream: bool = False) -> None:
        if not self.config.record_bills:
            return
        self.bill = {"provider": self.provider, "path": self.request.path, "json": self.body,
                     "status": status, "stream": stream, "sent": b"", "content_sent": 0,
                     "content_events": 0, "complete": False, "cancelled": False}
        self.state.bills.append(self.bill)

    @property
    def provider(self) -> str:
        return self.wire.name

    @property
    def config(self) -> MockConfig:
        return self.state.config

    def stream_error(self) -> bytes:
        """The provider's in-band error event, with the fault's message and code if it has
        them."""
        fault = self.fault
        return self.wire.stream_error_event(fault.message if fault else None,
                                            fault.code if fault else None)

    def bounded(self, conv: Conversation) -> Conversation:
        """`conv`, whose reply keeps to its token limit, unless the call drew an
        "ignore_max_tokens" fault."""
        if self.fault_of("ignore_max_tokens") is not None:
            conv.max_tokens = None
        return conv

    def fault_of(self, kind: str) -> Fault | None:
        return self.fault if self.fault is not None and self.fault.kind == kind else None

    def answered_model(self, asked: str) -> str:
        """The model the answer says answered (`MockConfig.answered_models`)."""
        return (self.config.answered_models or {}).get(asked, asked)

    async def wait_first_byte(self, *, streaming: bool = False) -> None:
        delay = self.config.ttft_s
        slow = self.fault_of("slow_first_byte")
        if slow is None and not streaming:  # (a stall holds a JSON answer back whole)
            slow = self.fault_of("stall")
        if slow is not None:
            delay += slow.delay_s
        if delay > 0:
            await asyncio.sleep(delay)


def dumps(payload: Any) -> bytes:
    return orjson.dumps(payload)


def sse(payload: Any, event: str | None = None) -> bytes:
    data = b"data: " + orjson.dumps(payload) + b"\n\n"
    return b"event: " + event.encode() + b"\n" + data if event else data


def error_response(status: int, body: bytes, headers: dict[str, str] | None = None,
                   content_type: str = JSON_TYPE) -> web.Response:
    return _response(status, body, headers or {}, content_type)


def _response(status: int, body: bytes, headers: dict[str, str],
              content_type: str) -> web.Response:
    response = web.Response(status=status, body=body, headers=headers)
    response.headers["content-type"] = content_type
    return response


async def respond_json(call: Call, payload: Any, content_type: str = JSON_TYPE) -> web.Response:
    """A 200 JSON answer after the first-byte delay; a "reset" fault drops the connection.

    `payload` may be pre-rendered bytes (fixed answers such as model lists).
    """
    await call.wait_first_byte()
    if call.fault_of("reset") is not None:
        call.keep_bill(None)
        abort_connection(call.request)  # aiohttp then fails to send this, quietly
    if call.fault_of("omit_usage") is not None and isinstance(payload, dict):
        payload = {k: v for k, v in payload.items() if k not in ("usage", "usageMetadata")}
    body = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    slow_body = call.fault_of("slow_body")
    if slow_body is not None:
        return await _respond_after_a_pause(call, body, content_type, slow_body.delay_s)
    if call.fault_of("reset") is None:
        call.keep_bill(200)
        transport = call.request.transport
        if call.bill is not None:  # (a client that gave up waiting never reads the answer)
            gone = transport is None or transport.is_closing()
            call.bill.update(sent=b"" if gone else body, complete=not gone, cancelled=gone)
    return _response(200, body, call.headers, content_type)


async def _respond_after_a_pause(call: Call, body: bytes, content_type: str,
                                 delay_s: float) -> web.StreamResponse:
    """A "slow_body" fault: the headers at once, the body `delay_s` later."""
    response = web.StreamResponse(status=200, headers=call.headers)
    response.headers["content-type"] = content_type
    response.content_length = len(body)
    call.keep_bill(200)
    await response.prepare(call.request)  # (a StreamResponse sends its headers at once)
    await asyncio.sleep(delay_s)
    try:
        await response.write(body)
        await response.write_eof()
    except ConnectionError:  # the client gave up waiting
        pass
    return response


async def respond_stream(call: Call, items: Sequence[StreamItem], error_event: bytes,
                         content_type: str = SSE_TYPE) -> web.StreamResponse:
    """Send `items` as a paced SSE stream, honouring a "reset", "error_event" or "truncate"
    fault (and `keepalive_comments`)."""
    await call.wait_first_byte(streaming=True)
    if call.config.keepalive_comments:
        items = [part for item in items
                 for part in ([(KEEPALIVE, False), item] if item[1] else [item])]
    response = web.StreamResponse(status=200, headers=call.headers)
    response.headers["content-type"] = content_type
    response.headers["cache-control"] = "no-cache"
    state = call.state
    state.active_streams += 1
    call.keep_bill(200, stream=True)
    bill = call.bill
    if bill is not None:
        bill["content_events"] = sum(is_content for _, is_content in items)
    try:
        await response.prepare(call.request)
        cut = _cut_fault(call)
        if cut is None and call.config.chunk_delay_s <= 0 and call.fault_of("stall") is None:
            await _write(call, response, b"".join(item for item, _ in items),  # the fast path
                         sum(is_content for _, is_content in items))
        else:
            await _write_paced(call, response, items, cut, error_event)
            if cut is not None and cut.kind == "reset":
                return response
            if cut is not None and cut.kind == "error_event":
                await asyncio.sleep(cut.stall_s)
        if bill is not None:  # (every event is written: the client may close before the EOF)
            bill["complete"] = cut is None
        await response.write_eof()
    except ConnectionError:  # the client went away mid-stream
        state.cancelled_streams += 1
        if bill is not None:
            bill["cancelled"] = True
    finally:
        state.active_streams -= 1
    return response


async def _write(call: Call, response: web.StreamResponse, data: bytes, content: int) -> None:
    """Writes `data` (holding `content` content events), on the call's bill too."""
    await response.write(data)
    bill = call.bill
    if bill is not None:
        bill["sent"] += data
        bill["content_sent"] += content


def _cut_fault(call: Call) -> Fault | None:
    return call.fault_of("reset") or call.fault_of("error_event") or call.fault_of("truncate")


async def _write_paced(call: Call, response: web.StreamResponse, items: Sequence[StreamItem],
                       cut: Fault | None, error_event: bytes) -> None:
    head = items[:cut_index(items, cut.after_chunks)] if cut is not None else items
    if cut is not None and not any(is_content for _, is_content in head):
        # Failing before any content: the opening events and the failure leave in one write,
        # as from a provider that gave up at once.
        failure = error_event if cut.kind == "error_event" else b""
        await _write(call, response, b"".join(item for item, _ in head) + failure, 0)
        if cut.kind == "reset":
            await _flush(call.request)
            abort_connection(call.request)
        return
    delay = call.config.chunk_delay_s
    stall = call.fault_of("stall")
    stall_at = -1 if stall is None else cut_index(items, stall.after_chunks)
    seen_content = False
    for index, (item, is_content) in enumerate(head):
        if index == stall_at and stall is not None:
            await _flush(call.request)  # (what came before the stall reaches the client)
            await asyncio.sleep(stall.delay_s)
        elif is_content and seen_content and delay > 0:
            await asyncio.sleep(delay)
        seen_content = seen_content or is_content
        await _write(call, response, item, int(is_content))
    if cut is None or cut.kind == "truncate":
        return
    # Failing mid-stream: the content sent so far reaches the client before the failure
    # (otherwise both could arrive in one TCP segment).
    await _flush(call.request)
    await asyncio.sleep(_CUT_PAUSE_S)
    if cut.kind == "error_event":
        await _write(call, response, error_event, 0)
        return
    abort_connection(call.request)


def cut_index(items: Sequence[StreamItem], after_chunks: int) -> int:
    """Where a fault cuts: before content event number `after_chunks` + 1, or after the last."""
    seen = 0
    last_content = -1
    for index, (_, is_content) in enumerate(items):
        if not is_content:
            continue
        if seen == after_chunks:
            return index
        seen += 1
        last_content = index
    return last_content + 1 if last_content >= 0 else min(len(items), 1)


async def _flush(request: web.Request) -> None:
    """Let written events leave the process, so a reset comes after them on the wire."""
    transport = request.transport
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _FLUSH_WAIT_S
    while transport is not None and transport.get_write_buffer_size() and loop.time() < deadline:
        await asyncio.sleep(0.002)


def abort_connection(request: web.Request) -> None:
    """Reset the TCP connection (RST, not FIN): linger 0, then close without flushing."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def retry_after_value(retry_after_s: float) -> str:
    """Retry-After is whole seconds (RFC 9110 delay-seconds); round a fraction up."""
    return str(max(0, math.ceil(retry_after_s)))


def random_id(prefix: str, hex_chars: int = 24) -> str:
    return prefix + os.urandom((hex_chars + 1) // 2).hex()[:hex_chars]


def body_dict(call: Call) -> JSON:
    """The request body, which every generation endpoint needs to be a JSON object."""
    if not isinstance(call.body, dict):
        raise BadRequest("The request body must be a JSON object.")
    return call.body


# OpenAI-format fields whose type the API checks before anything else, and the most a count
# may be (OpenAI's API reference: n at most 128; text-embedding-3-large's 3,072 dimensions):
# a mock that took them as they came failed with a 500, or allocated gigabytes for an `n`
# of 1e308, where the API answers 400.
_OPENAI_COUNTS = {"max_tokens": None, "max_completion_tokens": None, "max_output_tokens": None,
                  "n": 128, "best_of": 128, "dimensions": 3072, "top_logprobs": 20}
_JSON_TYPES = {bool: "a boolean", int: "an integer", float: "a decimal", str: "a string",
               list: "an array", dict: "an object"}


def check_openai_types(body: JSON) -> None:
    """Refuses, as OpenAI does (400 `invalid_type` / `integer_above_max_value`), a `tools`
    that is not an array and a count that is not an integer or is past its maximum."""
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise BadRequest(f"Invalid type for 'tools': expected an array, but got "
                         f"{_JSON_TYPES.get(type(tools), 'a value')} instead.", param="tools",
                         code="invalid_type")
    for name, most in _OPENAI_COUNTS.items():
        value = body.get(name)
        if value is None:
            continue
        if type(value) is not int:
            raise BadRequest(f"Invalid type for '{name}': expected an integer, but got "
                             f"{_JSON_TYPES.get(type(value), 'a value')} instead.", param=name,
                             code="invalid_type")
        if most is not None and value > most:
            raise BadRequest(f"Invalid '{name}': integer above maximum value. Expected a value "
                             f"<= {most}, but got {value} instead.", param=name,
                             code="integer_above_max_value")
