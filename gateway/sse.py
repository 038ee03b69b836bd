"""Server-sent events: an incremental parser and the encoders for both ingress formats.

Parsing follows the WHATWG EventSource rules that OpenAI, Anthropic and Gemini streams use:
events end at a blank line; `event:` names the event; `data:` lines are joined with newlines;
lines starting with `:` are comments. Lines end in LF or CRLF (a lone CR, which no LLM
provider sends, is not treated as a line end).
"""
from __future__ import annotations

from typing import Any

import orjson


class SSEParser:
    """Turns arbitrary byte chunks into complete (event name, data) pairs."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[tuple[str | None, str]]:
        buffer = self._buffer + chunk
        if b"\r" in buffer:  # CRLF line ends; a trailing "\r" waits for its "\n"
            buffer = buffer.replace(b"\r\n", b"\n")
        end = buffer.rfind(b"\n\n")
        if end < 0:
            self._buffer = buffer
            return []
        self._buffer = buffer[end + 2:]
        return [event for block in buffer[:end].split(b"\n\n") if (event := parse_sse_block(block))]

    def flush(self) -> list[tuple[str | None, str]]:
        """What is left once the upstream closed (a last event without its blank line)."""
        rest, self._buffer = self._buffer, b""
        event = parse_sse_block(rest.strip(b"\n"))
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
