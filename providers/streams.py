"""Stream codecs: what happens to each upstream chunk on its way to the client.

A codec turns upstream bytes into client bytes. `PassthroughCodec` is used when the caller
and the provider speak the same format: bytes are forwarded untouched, cut only at event
boundaries, and just the few events that carry usage or an error are parsed (found by a byte
search). `TranslatingCodec` parses every event and re-encodes it through the OpenAI-chat hub.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import orjson

from gateway.context import Usage
from gateway.sse import OPENAI_DONE, EventBuffer, EventTooLong, SSEParser, named_event, openai_event

# The most a stream may hold back before its first output (its preamble: a role chunk,
# `message_start`, a Responses stream's `response.created` and `response.in_progress`,
# each of these two at most an event, `MAX_EVENT_BYTES`); past it the upstream sends events
# that never become output (endless role chunks) and the stream fails.
MAX_PREAMBLE_BYTES = 128 * 1024 * 1024


class StreamError(Exception):
    """An error event inside a 200 stream, or a stream that broke.

    `from_provider`: the provider's own error event, whose `error_type` (and for OpenAI
    `code` and `param`) are its words; else the gateway found the stream broken
    (`error_type` "bad_response", "incomplete_stream"). `native_type`: the type the event
    gave, None when it has none (a Responses API ResponseError has only a code, which is
    then also its `error_type`). `forwarded`: that event went to the
    client as it was (a Responses stream's `error` or `response.failed` after output), so
    it is what ends the stream: nothing is added after it. `ends_stream`: the event is its
    stream's last; a Responses API `error` event is not, `response.failed` follows it.
    """

    def __init__(self, error_type: str, message: str, *, code: str | None = None,
                 param: str | None = None, from_provider: bool = True) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.message = message
        self.code = code
        self.param = param
        self.from_provider = from_provider
        self.native_type: str | None = error_type
        self.forwarded = False
        self.ends_stream = True


def broken_stream(exc: EventTooLong) -> StreamError:
    """An upstream event that never ended (`MAX_EVENT_BYTES`)."""
    return StreamError("bad_response", str(exc), from_provider=False)


def preamble_too_long() -> StreamError:
    """A stream that held back `MAX_PREAMBLE_BYTES` of events without any output."""
    return StreamError("bad_response", f"the stream sent {MAX_PREAMBLE_BYTES} bytes of events "
                       "without any output", from_provider=False)


def incomplete_stream(final_event: str) -> StreamError:
    """A stream that ended cleanly but without its final event: cut short somewhere."""
    return StreamError("incomplete_stream", f"the stream ended before its {final_event}",
                       from_provider=False)


class StreamCodec(Protocol):
    usage: Usage | None
    # An error that arrived after events still to be delivered: `feed` returns those events
    # and the caller raises this once they are sent. With nothing to deliver, `feed` raises.
    error: StreamError | None

    def feed(self, chunk: bytes) -> bytes:
        """Client bytes for this upstream chunk (b"" while an event is incomplete)."""

    def finish(self) -> bytes:
        """Client bytes once the upstream ended cleanly. A stream that ended without its
        final event is an error (`incomplete_stream`), raised or left in `error` as in
        `feed`."""


UsageReader = Callable[[dict[str, Any], "Usage | None"], "Usage | None"]
ContentTest = Callable[[dict[str, Any]], bool]
ErrorReader = Callable[[dict[str, Any]], "StreamError | None"]
# Takes what must not reach the client (a provider key it quotes) out of an error event's
# payload, in place; says whether it changed anything.
ErrorScrubber = Callable[[dict[str, Any]], bool]


def reported_model(payload: Any) -> str | None:
    """The model a provider says answered, from an answer or a stream event: `model` (OpenAI,
    Anthropic answers), `message.model` (Anthropic's message_start), `response.model` (a
    Responses stream's events), `modelVersion` (Gemini); None when it says none (Azure's
    prompt-filter chunk says "")."""
    if not isinstance(payload, dict):
        return None
    model = payload.get("model") or payload.get("modelVersion")
    if model is None:
        inner = payload.get("message") or payload.get("response")
        model = inner.get("model") if isinstance(inner, dict) else None
    return model if isinstance(model, str) and model else None


def error_object(payload: dict[str, Any]) -> StreamError | None:
    """The error of an event that holds an `error` object (OpenAI chat, Anthropic, Gemini)."""
    error = payload.get("error")
    return error_of(error) if isinstance(error, dict) else None


def chat_chunk_has_content(chunk: dict[str, Any]) -> bool:
    """Whether an OpenAI chat/completions chunk carries output (not just the role preamble):
    text, a refusal, tool calls, reasoning, or the finish."""
    choices = chunk.get("choices")
    if not choices:
        return bool(chunk.get("usage"))  # Azure opens with a choices-less prompt-filter chunk
    for choice in choices:
        delta = choice.get("delta") or {}
        # A reasoning model's first output is its reasoning: `reasoning_content` (DeepSeek and
        # many OpenAI-compatible servers) or `reasoning` (OpenRouter, vLLM); waiting for its
        # text instead let the first-byte timeout cut a model that was streaming.
        if (delta.get("content") or delta.get("tool_calls") or delta.get("refusal")
                or delta.get("function_call") or delta.get("reasoning_content")
                or delta.get("reasoning") or delta.get("thinking_blocks") or choice.get("text")
                or choice.get("finish_reason")):
            return True
    return False


class PassthroughCodec:
    """Same format both sides: forward bytes, parse only events holding usage or errors.

    The preamble (events before the first one with output, e.g. OpenAI's role chunk or
    Anthropic's message_start) is parsed and held back, so that an error before any output
    is still a plain error response that the failover layer can retry elsewhere.

    `end_markers` are bytes of which one is in the stream's final event (`[DONE]\n`,
    `"message_stop"`): only the events of the last two reads are searched, once the upstream
    ended. A stream in which no event was parsed (a JSON answer sent for it) ended before
    its final event too.

    `read_error` finds the error an event reports (every event holding `"error"` is asked).
    An error event after output is cut off, for the caller to end the stream with its own
    error event; with `forward_error_event` it goes to the client as it was and ends the
    stream itself, or, when it is not its stream's last (`StreamError.ends_stream`: the
    Responses API follows its `error` event with `response.failed`), the events up to the
    next error event do, which the client's SDK reads as the stream's end. `scrub_error`
    redacts such an event's error first (it is re-encoded only when that changed it).
    """

    __slots__ = (
        "_before",
        "_drop_usage_event",
        "_end_markers",
        "_ending",
        "_events",
        "_final_event",
        "_forward_error_event",
        "_has_content",
        "_held",
        "_last",
        "_read_error",
        "_read_usage",
        "_scrub_error",
        "error",
        "first_event",
        "reported_model",
        "usage",
    )

    def __init__(self, read_usage: UsageReader, has_content: ContentTest, *,
                 drop_usage_event: bool = False, end_markers: tuple[bytes, ...] = (),
                 final_event: str = "final event", read_error: ErrorReader = error_object,
                 forward_error_event: bool = False,
                 scrub_error: ErrorScrubber | None = None) -> None:
        self.usage: Usage | None = None
        self.error: StreamError | None = None
        # (A Responses stream's is `response.created`: its response, which an ending the
        # gateway adds repeats; parsed anyway with the preamble.)
        self.first_event: dict[str, Any] | None = None
        self.reported_model: str | None = None  # (`reported_model`, from the preamble)
        self._events = EventBuffer()
        self._last = b""  # the latest complete events
        self._before = b""  # the read before them
        self._held: bytearray | None = bytearray()  # None once output has started flowing
        self._read_usage = read_usage
        self._drop_usage_event = drop_usage_event
        self._has_content = has_content
        self._end_markers = end_markers
        self._final_event = final_event
        self._read_error = read_error
        self._forward_error_event = forward_error_event
        self._scrub_error = scrub_error
        self._ending: StreamError | None = None  # sent on; the stream's last event to come

    def feed(self, chunk: bytes) -> bytes:
        try:  # (CRLF servers, sse-starlette: same events, LF line ends)
            events = self._events.feed(chunk)
        except EventTooLong as exc:
            raise broken_stream(exc) from None
        if not events:
            return b""
        if events[:1] != b":" or not _comments_only(events):  # (`: keep-alive` ends nothing)
            self._before, self._last = self._last, events
        try:
            return self._feed_events(events)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise StreamError("bad_response", f"unreadable event ({type(exc).__name__})",
                              from_provider=False) from None

    def _feed_events(self, events: bytes) -> bytes:
        if self._held is not None:
            events = self._release_after_preamble(events)
            if not events:
                return b""
        return self._forward(events)

    def _release_after_preamble(self, events: bytes) -> bytes:
        assert self._held is not None
        position = 0
        while (end := events.find(b"\n\n", position)) >= 0:  # only up to the first output
            block, position = events[position:end], end + 2
            data = _data_of(block)
            if data is None or data == b"[DONE]":
                continue
            payload = orjson.loads(data)
            if not isinstance(payload, dict):
                continue
            if self.first_event is None:
                self.first_event = payload
            if self.reported_model is None:
                self.reported_model = reported_model(payload)
            error = self._read_error(payload)
            if error is not None:  # failed before any output
                raise error
            if self._has_content(payload):
                events, self._held = b"".join((self._held, events)), None
                return events
        self._held += events
        if len(self._held) > MAX_PREAMBLE_BYTES:
            self._held = None
            raise preamble_too_long()
        return b""

    def _forward(self, events: bytes) -> bytes:
        # As few scans as possible: JSON-escaped output text can never hold `"error"`
        # (its quotes are escaped), so one scan rules errors out.
        if self._ending is not None:
            events = self._up_to_the_last_event(events)
        elif b'"error"' in events:
            events, error, after = _split_at_error(events, self._read_error,
                                                   self._forward_error_event, self._scrub_error)
            if error is not None and error.forwarded and not error.ends_stream:
                self._ending = error
                events += self._up_to_the_last_event(after)
            else:
                self.error = error
            if self.error is not None and not events:
                raise self.error
        usage_at = _find_usage(events, 0)
        if usage_at >= 0:
            return self._take_usage(events, usage_at)
        return events

    def _up_to_the_last_event(self, events: bytes) -> bytes:
        """After an error event sent on that is not its stream's last: the events up to the
        next error event (`response.failed`), which ends the stream with the first error."""
        if b'"error"' not in events:
            return events
        events, last, _ = _split_at_error(events, self._read_error, True, self._scrub_error)
        if last is not None:
            self.error, self._ending = self._ending, None
        return events

    @property
    def unended_error(self) -> StreamError | None:
        """The provider's error event that went to the client without the event that was to
        end the stream after it (a Responses `error` event whose `response.failed` never
        came: the upstream broke, ended or stalled first), else None."""
        return self._ending

    @property
    def sent_error(self) -> StreamError | None:
        """The provider's error event that went to the client as it was (nothing is to be
        added after it), else None."""
        error = self._ending or self.error
        return error if error is not None and error.forwarded else None

    def finish(self) -> bytes:
        tail = self._events.rest()
        out = self.feed(tail + b"\n\n") if tail.strip() else b""
        if self._ending is not None:  # the upstream ended before its last event: its error
            self.error = self._ending
            return out
        if self.first_event is None and self.error is None and self._last:  # (none sent)
            raise incomplete_stream(self._final_event)
        if self.error is None and self._last and self._end_markers and not self._ended():
            error = incomplete_stream(self._final_event)
            if not out:  # (a preamble still held back is dropped: nothing went out)
                raise error
            self.error = error
            return out
        if self._held:  # a stream without any output: deliver its preamble as it was
            out, self._held = self._forward(bytes(self._held)) + out, None
        return out

    def _ended(self) -> bool:
        """Whether the last reads with events (not only comments) hold an end marker.
        Searched as bytes, not in each event's data: splitting the events cost ~15 µs a
        stream (~8 times the search), for a marker outside an event's data (a comment's)
        that no provider sends."""
        return any(_holds(self._last, marker) or _holds(self._before, marker)
                   for marker in self._end_markers)

    @property
    def next_sequence_number(self) -> int:
        """In a Responses stream (whose events are numbered from 0, `sequence_number`), the
        number of an event added after the latest ones: one more than the last found."""
        for events in (self._last, self._before):
            at = events.rfind(b'"sequence_number":')
            number = _SEQUENCE_NUMBER.match(events, at) if at >= 0 else None
            if number is not None:
                return int(number[1]) + 1
        return 0

    def _take_usage(self, events: bytes, marker: int) -> bytes:
        """Parses just the events holding a usage object, found by byte search."""
        while True:
            if marker < 0:
                return events
            start = events.rfind(b"\n\n", 0, marker)
            start = 0 if start < 0 else start + 2
            end = events.find(b"\n\n", marker) + 2
            data = _data_of(events[start:end - 2])
            payload = orjson.loads(data) if data else None
            search_from = end
            if isinstance(payload, dict):
                self.usage = self._read_usage(payload, self.usage)
                if self._drop_usage_event and payload.get("choices") == []:
                    # The usage-only chunk the gateway asked for, not the client.
                    events, search_from = events[:start] + events[end:], start
            marker = _find_usage(events, search_from)


_SEQUENCE_NUMBER = re.compile(rb'"sequence_number": ?(\d+)')


def _find_usage(events: bytes, start: int) -> int:
    """Where a usage object starts (OpenAI sends `"usage":null` in the other chunks)."""
    at = events.find(b'"usage":{', start)
    return at if at >= 0 else events.find(b'"usage": {', start)


def _data_of(block: bytes) -> bytes | None:
    """The data of one LF-normalised SSE event block, without a full parse."""
    if block.startswith(b"data: ") and b"\n" not in block:
        return block[6:]  # the common single-line case
    lines = [line[5:].lstrip(b" ") for line in block.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(lines) if lines else None


def _split_at_error(events: bytes, read_error: ErrorReader, keep_error_event: bool,
                    scrub: ErrorScrubber | None = None) -> tuple[bytes, StreamError | None,
                                                                 bytes]:
    """(the events before the first error event, that error, the events after it) — or
    (events, None, b""). With `keep_error_event` the error event stays, last of the events
    before (re-encoded if `scrub` changed it), and the error is `forwarded`."""
    blocks = events.split(b"\n\n")
    for index, block in enumerate(blocks):
        if b'"error"' not in block:
            continue
        for name, data in SSEParser().feed(block + b"\n\n"):
            try:
                payload = orjson.loads(data)
            except orjson.JSONDecodeError:
                continue
            error = read_error(payload) if isinstance(payload, dict) else None
            if error is not None:
                error.forwarded = keep_error_event
                if keep_error_event and scrub is not None and scrub(payload):
                    event = named_event(name, payload) if name else openai_event(payload)
                    blocks[index] = event[:-2]  # (without its blank line, as split)
                kept = blocks[:index + 1] if keep_error_event else blocks[:index]
                return _joined(kept), error, _joined(blocks[index + 1:])
    return events, None, b""


def _joined(blocks: list[bytes]) -> bytes:
    return b"".join(block + b"\n\n" for block in blocks if block)


def error_of(error: dict[str, Any]) -> StreamError:
    """The StreamError for an in-stream `error` object of any of the three APIs."""
    kind = error.get("type") or error.get("status") or error.get("code")
    code, param = error.get("code"), error.get("param")
    return StreamError(str(kind or "api_error"), str(error.get("message") or "stream error"),
                       code=None if code is None else str(code),
                       param=None if param is None else str(param))


class HubSource(Protocol):
    """Upstream events -> OpenAI chat chunks (the hub format)."""

    def feed(self, event: str | None, data: str) -> list[dict[str, Any]]: ...

    def finish(self) -> list[dict[str, Any]]: ...

    @property
    def usage(self) -> dict[str, Any] | None: ...

    @property
    def ended(self) -> bool:
        """Whether the upstream's final event (or finish reason) arrived."""

    @property
    def reported_model(self) -> str | None:
        """The model the upstream's events say answered (`reported_model`), once one has."""


class HubSink(Protocol):
    """OpenAI chat chunks -> client bytes in the ingress format."""

    def feed(self, chunks: Iterable[dict[str, Any]]) -> bytes: ...

    def finish(self) -> bytes: ...


def _comments_only(events: bytes) -> bool:
    """Whether every line of `events` is an SSE comment (or blank)."""
    return all(not line or line[:1] == b":" for line in events.split(b"\n"))


def _holds(events: bytes, marker: bytes) -> bool:
    """Whether `marker` is in `events`; one that ends where a string value starts
    (`"finish_reason":"`) only with a value after it: an empty string ends nothing (Ollama
    and SGLang send `"finish_reason": ""` on every chunk)."""
    at = events.find(marker)
    if at < 0 or not marker.endswith((b':"', b': "')):
        return at >= 0
    while at >= 0:
        after = at + len(marker)
        if events[after:after + 1] != b'"':
            return True
        at = events.find(marker, after)
    return False


class TranslatingCodec:
    """Different formats: parse each upstream event, translate via the hub, re-encode."""

    __slots__ = ("_held", "_held_bytes", "_parser", "_sink", "_source", "error")

    def __init__(self, source: HubSource, sink: HubSink) -> None:
        self.error: StreamError | None = None
        self._held: list[dict[str, Any]] | None = []  # hub chunks before the first output
        self._held_bytes = 0  # the data of the events they came from
        self._parser = SSEParser()
        self._source = source
        self._sink = sink

    @property
    def usage(self) -> Usage | None:
        return Usage.from_openai(self._source.usage)

    @property
    def reported_model(self) -> str | None:
        """The model the upstream's own events say answered (before translation)."""
        return self._source.reported_model

    def feed(self, chunk: bytes) -> bytes:
        try:
            events = self._parser.feed(chunk)
        except EventTooLong as exc:
            raise broken_stream(exc) from None
        return self._translate(events)

    def _translate(self, events: list[tuple[str | None, str]]) -> bytes:
        out: list[bytes] = []
        for name, data in events:
            try:
                try:
                    chunks = self._source.feed(name, data)
                    if self._held is not None:
                        chunks = self._hold_preamble(chunks, len(data))
                    out.append(self._sink.feed(chunks))
                except (ValueError, TypeError, KeyError, AttributeError) as exc:
                    raise StreamError("bad_response",
                                      f"unreadable event ({type(exc).__name__})",
                                      from_provider=False) from None
            except StreamError as exc:
                if not any(out):
                    raise
                self.error = exc
                break
        return b"".join(out)

    def _hold_preamble(self, chunks: list[dict[str, Any]], size: int) -> list[dict[str, Any]]:
        assert self._held is not None
        self._held.extend(chunks)
        if not any(chat_chunk_has_content(chunk) for chunk in chunks):
            self._held_bytes += size
            if self._held_bytes > MAX_PREAMBLE_BYTES:
                self._held = None
                raise preamble_too_long()
            return []
        chunks, self._held = self._held, None
        return chunks

    def finish(self) -> bytes:
        out = [self._translate(self._parser.flush())]
        if self.error is not None:
            return out[0]
        if not self._source.ended:  # cut short: no made-up ending, an error instead
            if not out[0]:
                raise incomplete_stream("final event")
            self.error = incomplete_stream("final event")
            return out[0]
        try:
            try:
                final = self._source.finish()
                if self._held is not None:
                    final, self._held = self._held + final, None
                out.append(self._sink.feed(final))
                out.append(self._sink.finish())
            except (ValueError, TypeError, KeyError, AttributeError) as exc:
                raise StreamError("bad_response", f"unreadable end ({type(exc).__name__})",
                                  from_provider=False) from None
        except StreamError as exc:  # (as `_translate`'s: raised when no output went before)
            if not out[0]:
                raise
            self.error = exc
            return out[0]
        return b"".join(out)


class OpenAIChunkSource:
    """OpenAI chat chunks upstream: the hub already; only parse and watch usage/errors.
    The stream's end is its `[DONE]`, or a choice's finish reason (some OpenAI-compatible
    servers end without `[DONE]`)."""

    __slots__ = ("ended", "reported_model", "usage")

    def __init__(self) -> None:
        self.usage: dict[str, Any] | None = None
        self.ended = False
        self.reported_model: str | None = None

    def feed(self, event: str | None, data: str) -> list[dict[str, Any]]:
        if data == "[DONE]":
            self.ended = True
            return []
        if not data:
            return []
        chunk = orjson.loads(data)
        if "error" in chunk and isinstance(chunk["error"], dict):
            raise error_of(chunk["error"])
        if self.reported_model is None:
            self.reported_model = reported_model(chunk)
        usage = chunk.get("usage")
        if usage:
            # Read now, as a passthrough stream's is: usage that cannot be read (a count not
            # a number, or negative) is an unreadable event, not an error once the stream ended.
            Usage.from_openai(usage)
            self.usage = usage
        if not self.ended:
            for choice in chunk.get("choices") or ():
                if isinstance(choice, dict) and choice.get("finish_reason"):
                    self.ended = True
        return [chunk]

    def finish(self) -> list[dict[str, Any]]:
        return []


class OpenAIChunkSink:
    """Hub chunks to an OpenAI-SDK client. The translators upstream of it already carry the
    public model name and add the usage chunk only when the client asked for it."""

    __slots__ = ()

    def feed(self, chunks: Iterable[dict[str, Any]]) -> bytes:
        return b"".join(openai_event(chunk) for chunk in chunks)

    def finish(self) -> bytes:
        return OPENAI_DONE


def chat_chunk(chunk_id: str, created: int, model: str, choices: list[dict[str, Any]],
               include_usage: bool) -> dict[str, Any]:
    """A `chat.completion.chunk`; with include_usage every chunk carries `usage: null`, as
    OpenAI's do until the final usage chunk."""
    chunk: dict[str, Any] = {"id": chunk_id, "object": "chat.completion.chunk",
                             "created": created, "model": model, "choices": choices}
    if include_usage:
        chunk["usage"] = None
    return chunk


class AnthropicEventSink:
    """Hub chunks to an Anthropic-SDK client, through a ChatStreamToMessages translator."""

    __slots__ = ("_translator",)

    def __init__(self, translator: Any) -> None:
        self._translator = translator

    def feed(self, chunks: Iterable[dict[str, Any]]) -> bytes:
        return b"".join(named_event(name, data)
                        for chunk in chunks for name, data in self._translator.feed(chunk))

    def finish(self) -> bytes:
        return b"".join(named_event(name, data) for name, data in self._translator.finish())
