"""Stream codecs: what happens to each upstream chunk on its way to the client.

A codec turns upstream bytes into client bytes. `PassthroughCodec` is used when the caller
and the provider speak the same format: bytes are forwarded untouched, cut only at event
boundaries, and just the few events that carry usage or an error are parsed (found by a byte
search). `TranslatingCodec` parses every event and re-encodes it through the OpenAI-chat hub.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Protocol

import orjson

from gateway.context import Usage
from gateway.sse import OPENAI_DONE, SSEParser, named_event, openai_event, split_complete_events


class StreamError(Exception):
    """An error event inside a 200 stream, or a stream that broke."""

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.message = message


class StreamCodec(Protocol):
    usage: Usage | None

    def feed(self, chunk: bytes) -> bytes:
        """Client bytes for this upstream chunk (b"" while an event is incomplete)."""

    def finish(self) -> bytes:
        """Client bytes once the upstream ended cleanly."""


UsageReader = Callable[[dict[str, Any], "Usage | None"], "Usage | None"]


class PassthroughCodec:
    """Same format both sides: forward bytes, parse only events holding usage or errors."""

    __slots__ = ("usage", "_tail", "_read_usage", "_drop_usage_event")

    def __init__(self, read_usage: UsageReader, *, drop_usage_event: bool = False) -> None:
        self.usage: Usage | None = None
        self._tail = b""
        self._read_usage = read_usage
        self._drop_usage_event = drop_usage_event

    def feed(self, chunk: bytes) -> bytes:
        events, self._tail = split_complete_events(self._tail + chunk if self._tail else chunk)
        if not events:
            return b""
        if b'"error":{' in events or b'"error": {' in events:
            _raise_stream_error(events)
        if b'"usage":{' in events or b'"usage": {' in events:
            return self._take_usage(events)
        return events

    def finish(self) -> bytes:
        tail, self._tail = self._tail, b""
        return self.feed(tail + b"\n\n") if tail.strip() else b""

    def _take_usage(self, events: bytes) -> bytes:
        kept = []
        for block in events.split(b"\n\n"):
            if b'"usage"' in block:
                for _, data in SSEParser().feed(block + b"\n\n"):
                    payload = orjson.loads(data)
                    self.usage = self._read_usage(payload, self.usage)
                    if self._drop_usage_event and payload.get("choices") == []:
                        block = b""  # the usage-only chunk the gateway asked for, not the client
            if block:
                kept.append(block)
        return b"\n\n".join(kept) + b"\n\n" if kept else b""


def _raise_stream_error(events: bytes) -> None:
    for _, data in SSEParser().feed(events if events.endswith(b"\n\n") else events + b"\n\n"):
        if '"error"' not in data:
            continue
        try:
            payload = orjson.loads(data)
        except orjson.JSONDecodeError:
            continue
        error = payload.get("error") if isinstance(payload, dict) else None
        if isinstance(error, dict):
            raise StreamError(str(error.get("type") or error.get("status") or error.get("code")
                                  or "api_error"), str(error.get("message") or "stream error"))


class HubSource(Protocol):
    """Upstream events -> OpenAI chat chunks (the hub format)."""

    def feed(self, event: str | None, data: str) -> list[dict[str, Any]]: ...

    def finish(self) -> list[dict[str, Any]]: ...

    @property
    def usage(self) -> dict[str, Any] | None: ...


class HubSink(Protocol):
    """OpenAI chat chunks -> client bytes in the ingress format."""

    def feed(self, chunks: Iterable[dict[str, Any]]) -> bytes: ...

    def finish(self) -> bytes: ...


class TranslatingCodec:
    """Different formats: parse each upstream event, translate via the hub, re-encode."""

    __slots__ = ("_parser", "_source", "_sink")

    def __init__(self, source: HubSource, sink: HubSink) -> None:
        self._parser = SSEParser()
        self._source = source
        self._sink = sink

    @property
    def usage(self) -> Usage | None:
        return Usage.from_openai(self._source.usage)

    def feed(self, chunk: bytes) -> bytes:
        out = [self._sink.feed(self._source.feed(name, data))
               for name, data in self._parser.feed(chunk)]
        return b"".join(out)

    def finish(self) -> bytes:
        out = [self._sink.feed(self._source.feed(name, data))
               for name, data in self._parser.flush()]
        out.append(self._sink.feed(self._source.finish()))
        out.append(self._sink.finish())
        return b"".join(out)


class OpenAIChunkSource:
    """OpenAI chat chunks upstream: the hub already; only parse and watch usage/errors."""

    __slots__ = ("usage",)

    def __init__(self) -> None:
        self.usage: dict[str, Any] | None = None

    def feed(self, event: str | None, data: str) -> list[dict[str, Any]]:
        if data == "[DONE]" or not data:
            return []
        chunk = orjson.loads(data)
        if "error" in chunk and isinstance(chunk["error"], dict):
            error = chunk["error"]
            raise StreamError(str(error.get("type") or "api_error"), str(error.get("message")))
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        return [chunk]

    def finish(self) -> list[dict[str, Any]]:
        return []


class OpenAIChunkSink:
    """Hub chunks to an OpenAI-SDK client; drops the usage chunk unless it was asked for."""

    __slots__ = ("_include_usage", "_model")

    def __init__(self, public_model: str, include_usage: bool) -> None:
        self._model = public_model
        self._include_usage = include_usage

    def feed(self, chunks: Iterable[dict[str, Any]]) -> bytes:
        out = []
        for chunk in chunks:
            if not chunk.get("choices") and chunk.get("usage") and not self._include_usage:
                continue
            chunk["model"] = self._model
            if not self._include_usage:
                chunk.pop("usage", None)
            out.append(openai_event(chunk))
        return b"".join(out)

    def finish(self) -> bytes:
        return OPENAI_DONE


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
