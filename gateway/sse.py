"""Server-sent events: an incremental parser and the encoders for both ingress formats.

Parsing follows the WHATWG EventSource rules that OpenAI, Anthropic and Gemini streams use:
events end at a blank line; `event:` names the event; `data:` lines are joined with newlines;
lines starting with `:` are comments. Lines end in LF or CRLF (a lone CR, which no LLM
provider sends, is not treated as a line end).
"""
from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import orjson

from gateway.context import ANTHROPIC_MESSAGES, OPENAI_COMPLETIONS, OPENAI_RESPONSES

# The longest an event may grow before its blank line (`EventBuffer`): room for the largest
# events providers send, a Responses stream's `response.created` and `response.completed`
# (they repeat the request's `instructions` and `tools`, up to the 16 MiB request body
# allowed by default, twice that when JSON escapes them) and a generated image in one event
# (base64: gpt-image-1's results, again all of them in `response.completed`; a Gemini image
# part). An upstream that never ends its event fails its stream here instead of growing a
# buffer until the stream's total time runs out.
MAX_EVENT_BYTES = 64 * 1024 * 1024


class EventTooLong(ValueError):
    """An event that grew past `max_event_bytes` without its blank line."""


class EventBuffer:
    """The events complete so far in arbitrary byte chunks, "\n" line ends; keeps the
    unfinished end between reads, at most `max_event_bytes` (else `EventTooLong`).

    Linear in the bytes read: a read that cannot end an event (no blank line in it or
    across its start) is appended to the unfinished end, which is not searched again, so an
    upstream that sends one endless line costs a copy of each byte, not a search of all of
    them at every read.
    """

    __slots__ = ("_max_event_bytes", "_tail")

    def __init__(self, *, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self._tail: bytes | bytearray = b""
        self._max_event_bytes = max_event_bytes

    def feed(self, chunk: bytes) -> bytes:
        """The whole events up to the last that `chunk` ends (each ending in a blank line),
        b"" while none has ended."""
        tail = self._tail
        if not tail:
            buffer = chunk
        elif b"\n\n" in chunk or _may_end_an_event(tail, chunk):
            buffer = b"".join((tail, chunk))
        else:
            if not isinstance(tail, bytearray):  # (the first read it grows by)
                tail = self._tail = bytearray(tail)
            tail += chunk
            if len(tail) > self._max_event_bytes:
                raise self._too_long()
            return b""
        if b"\r" in buffer:  # CRLF line ends; a trailing "\r" waits for its "\n"
            buffer = buffer.replace(b"\r\n", b"\n")
        end = buffer.rfind(b"\n\n") + 2
        if end == 1:
            events, self._tail = b"", buffer
        else:
            events, self._tail = buffer[:end], buffer[end:]
        if len(self._tail) > self._max_event_bytes:
            raise self._too_long()
        return events

    def rest(self) -> bytes:
        """The unfinished end ("\n" line ends), emptied: what is left once the upstream
        closed."""
        rest, self._tail = bytes(self._tail), b""
        return rest.replace(b"\r\n", b"\n") if b"\r" in rest else rest

    def _too_long(self) -> EventTooLong:
        self._tail = b""
        return EventTooLong(f"an event went past {self._max_event_bytes} bytes without its end")


def _may_end_an_event(tail: bytes | bytearray, chunk: bytes) -> bool:
    """Whether a blank line is across `tail`'s end and `chunk`'s start, or in `chunk` with CRLF
    line ends ("\n\r\n" before they are made LF); `chunk` has no "\n\n"."""
    if b"\n" not in chunk:
        return False
    edge = tail[-2:] + chunk[:2]
    return b"\n\r\n" in chunk or b"\n\n" in edge or b"\n\r\n" in edge


class SSEParser:
    """Turns arbitrary byte chunks into complete (event name, data) pairs; an event that
    grows past `max_event_bytes` unfinished raises `EventTooLong`."""

    __slots__ = ("_events",)

    def __init__(self, *, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self._events = EventBuffer(max_event_bytes=max_event_bytes)

    def feed(self, chunk: bytes) -> list[tuple[str | None, str]]:
        events = self._events.feed(chunk)
        if not events:
            return []
        return [event for block in events.split(b"\n\n")[:-1]
                if (event := parse_sse_block(block))]

    def flush(self) -> list[tuple[str | None, str]]:
        """What is left once the upstream closed (a last event without its blank line)."""
        event = parse_sse_block(self._events.rest().strip(b"\n"))
        return [event] if event else []


def parse_sse_block(block: bytes) -> tuple[str | None, str] | None:
    """The (event name, data) of one event's lines (a block between blank lines, "\n"
    line ends), or None for a block with neither (comments, blank lines)."""
    # The two shapes every provider sends, read without splitting lines: one `data:` line
    # (OpenAI, Gemini), and `event:` then one `data:` line (Anthropic). The same pair the
    # general reading below gives them.
    if block.startswith(b"data: "):
        if b"\n" not in block:
            return None, block[6:].decode("utf-8", "replace")
    elif block.startswith(b"event: "):
        end = block.find(b"\n")
        if end > 0 and block.startswith(b"data: ", end + 1) and b"\n" not in block[end + 1:]:
            return (block[7:end].decode("utf-8", "replace"),
                    block[end + 7:].decode("utf-8", "replace"))
    name: str | None = None
    data: list[str] = []
    for line in block.split(b"\n"):
        if not line or line.startswith(b":"):
            continue
        field, _, value = line.partition(b":")
        if value.startswith(b" "):
            value = value[1:]
        if field == b"data":
            data.append(value.decode("utf-8", "replace"))
        elif field == b"event":
            name = value.decode("utf-8", "replace")
    if not data and name is None:
        return None
    return name, "\n".join(data)


def count_events(events: bytes) -> int:
    """The events in `events`, whole events each ending in one blank line ("\n" line ends, as
    the provider adapters send them): its blank lines, less the blocks of comment lines
    alone (`: keepalive`), which no client reads as an event."""
    count = events.count(b"\n\n")
    if events.startswith(b":") or b"\n:" in events:  # (a line starting with `:`: a comment)
        count -= sum(1 for block in events.split(b"\n\n")[:-1]
                     if all(not line or line.startswith(b":") for line in block.split(b"\n")))
    return count


# -- content deltas ------------------------------------------------------------------------------
#
# What a stream cut short is billed at least, and what a budget's cut-off counts: one output
# token per content delta, an event that carries output (text, a refusal, tool-call
# arguments, thinking or reasoning text). Not its opening (a chat stream's role chunk,
# `"delta":{"role":"assistant","content":""}`), its closing (`"delta":{}`), an Anthropic
# `message_delta` or `signature_delta`, a Responses lifecycle event, nor an empty delta.
#
# Counted with byte scans, as the stream goes (no JSON parsing): a JSON string's own quotes
# are escaped, so a key's quoted bytes (`"content":"`) are found only as a key. Each format
# has a fast count for the compact JSON that providers and the gateway write, two or three
# `bytes.count` scans of a message, and an exact one (a regular expression over each delta)
# for what the fast one cannot tell: an empty string in the message (an opening, an empty
# delta), JSON written with spaces. A stream's messages are counted exactly until its first
# content delta (`count_content`), so an opening without an empty string
# (`"delta":{"role":"assistant"}`) is not counted either. Callgrind, per call, against the
# former single `"delta"` count: a 330-byte OpenAI text chunk ~4.0k instructions (~1.8k), 20
# of them in one message ~38k (~18k), an Anthropic text delta ~4.6k (~1.5k), a Responses
# one ~3.5k (~1.8k); the exact count of an opening chunk ~13k, once a stream. (`count`,
# not `in`: CPython 3.11's `in` cost twice as much on these.)

_CHAT_DELTA = re.compile(
    rb'"delta": ?\{[^}]*?"(?:content|refusal|arguments|reasoning_content|reasoning)": ?"[^"]')
_ANTHROPIC_DELTA = re.compile(rb'"delta": ?\{[^}]*?"(?:text|partial_json|thinking)": ?"[^"]')
_RESPONSES_DELTA = re.compile(rb'"delta": ?"[^"]')
_COMPLETION_TEXT = re.compile(rb'"text": ?"[^"]')


def chat_content_deltas(events: bytes) -> int:
    """The content deltas in OpenAI chat chunks: each delta object with a non-empty
    `content`, `refusal`, tool-call `arguments`, `reasoning_content` or `reasoning`."""
    deltas = events.count(b'"delta":{"')  # (not the closing `{}`)
    if deltas and not events.count(b'":""'):  # (an opening has an empty string, or is first)
        return deltas
    return exact_chat_content_deltas(events)


def exact_chat_content_deltas(events: bytes) -> int:
    return len(_CHAT_DELTA.findall(events))


def anthropic_content_deltas(events: bytes) -> int:
    """The content deltas in Anthropic events: text, thinking and (non-empty) tool input
    deltas; not signature or citation deltas, nor message_delta."""
    deltas = events.count(b'"delta":{"type":"t') + events.count(b'"delta":{"type":"i')
    if not events.count(b'":""') and (deltas or not events.count(b'"delta": ')):
        return deltas
    return exact_anthropic_content_deltas(events)


def exact_anthropic_content_deltas(events: bytes) -> int:
    return len(_ANTHROPIC_DELTA.findall(events))


def _non_empty_strings(events: bytes, key: bytes, exact: Callable[[bytes], int]) -> int:
    """The non-empty strings under `key` (quoted) in compact JSON, two scans; JSON written
    with spaces after the key goes to `exact`."""
    found = events.count(key + b':"')
    if found:
        return found - events.count(key + b':""')
    return exact(events) if events.count(key + b': ') else 0


def responses_content_deltas(events: bytes) -> int:
    """The content deltas in Responses events: each non-empty `delta` (output text, a
    refusal, function call arguments, reasoning text), which only `*.delta` events have."""
    return _non_empty_strings(events, b'"delta"', exact_responses_content_deltas)


def exact_responses_content_deltas(events: bytes) -> int:
    return len(_RESPONSES_DELTA.findall(events))


def completion_content_deltas(events: bytes) -> int:
    """The content deltas in legacy completion chunks: each non-empty choice `text` (a
    choice's last chunk has an empty one, with its finish reason)."""
    return _non_empty_strings(events, b'"text"', exact_completion_content_deltas)


def exact_completion_content_deltas(events: bytes) -> int:
    return len(_COMPLETION_TEXT.findall(events))


ContentCount = Callable[[bytes], int]
_COUNTERS: dict[str, tuple[ContentCount, ContentCount]] = {
    ANTHROPIC_MESSAGES: (anthropic_content_deltas, exact_anthropic_content_deltas),
    OPENAI_RESPONSES: (responses_content_deltas, exact_responses_content_deltas),
    OPENAI_COMPLETIONS: (completion_content_deltas, exact_completion_content_deltas),
}
_CHAT_COUNTERS = (chat_content_deltas, exact_chat_content_deltas)


def content_counters(operation: str) -> tuple[ContentCount, ContentCount]:
    """(fast, exact) counts of the content deltas in whole events of a stream of
    `operation`'s API (as the client gets it: a translated stream is in the caller's)."""
    return _COUNTERS.get(operation, _CHAT_COUNTERS)


def count_content(counters: tuple[ContentCount, ContentCount], events: bytes,
                  counted: int) -> int:
    """The content deltas in a message of a stream that has sent `counted` so far: exactly
    until the first (the messages before it, and it, hold the stream's opening)."""
    return counters[0](events) if counted else counters[1](events)


_MARKERS = {ANTHROPIC_MESSAGES: b'"content_block_delta"', OPENAI_RESPONSES: b'"delta"'}
_CHAT_MARKER = b'"delta":{"'  # (compact JSON: not the closing `"delta":{}`)


def delivered_counting(operation: str, first: bytes) -> tuple[bytes | None, ContentCount]:
    """How the passthrough counts the content deltas of a stream it sends on (what a stream
    cut short, or one that ends without a usage report, is billed at least), from the
    stream's first bytes: a marker, counted with one `bytes.count` a message, less the
    marker's hits in the first event that are no content delta (`opening_excess`, a chat
    stream's opening role chunk, taken off only when the count is used); or None, and the
    format's exact count (the second item, always returned) is run on each message instead.

    A marker a message, on every stream: the counts above take two or three scans (~2x the
    instructions). A chat stream's marker is `"delta":{"` (not its closing `"delta":{}`),
    an Anthropic stream's `"content_block_delta"` (not `message_delta`; a thinking block's
    one signature delta is counted), a Responses stream's `"delta"` (only `*.delta` events
    have one). The exact count runs instead on a chat stream written with spaces (its
    first delta says so) and on legacy completions (`"text"` is in a choice's last, empty
    chunk too), both rare. An empty delta in the middle of a stream counts as one, as does a
    chat stream's tool-call opening chunk (its name, empty arguments) after its first event
    (OpenAI opens a call in its first chunk; an Anthropic tool_use block translated to chat
    opens it later), so a stream cut short is billed at most a token over its content a
    call."""
    exact = content_counters(operation)[1]
    marker = _MARKERS.get(operation)
    if marker is not None:
        return marker, exact
    if operation == OPENAI_COMPLETIONS:
        return None, exact
    at = first.find(b'"delta"')
    return (None if at >= 0 and first[at + 7:at + 9] == b": " else _CHAT_MARKER), exact


def opening_excess(operation: str, first: bytes, marker: bytes | None) -> int:
    """The hits of `marker` in a stream's first event (at the start of `first`, its first
    bytes) that are no content delta: 1 for a chat stream's role chunk (`"delta":{"role":
    "assistant","content":""}`), 0 for a first event that carries content and in the other
    formats. A regular expression (~14k instructions), run only when a count is used."""
    if marker is None:
        return 0
    end = first.find(b"\n\n")
    event = first if end < 0 else first[:end]
    hits = event.count(marker)
    return hits - content_counters(operation)[1](event) if hits else 0


def split_complete_events(buffer: bytes) -> tuple[bytes, bytes]:
    """Splits raw SSE bytes into (complete events, the unfinished tail), without parsing."""
    end = buffer.rfind(b"\n\n")
    if end < 0:
        crlf = buffer.rfind(b"\r\n\r\n")
        if crlf < 0:
            return b"", buffer
        return buffer[:crlf + 4], buffer[crlf + 4:]
    return buffer[:end + 2], buffer[end + 2:]


def openai_event(data: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


OPENAI_DONE = b"data: [DONE]\n\n"


def named_event(name: str, data: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"
