"""Anthropic Messages: native for Anthropic-shaped callers, translated for OpenAI-shaped ones.

Wire format: https://docs.anthropic.com/en/api/messages and .../messages-streaming.
"""
from __future__ import annotations

from typing import Any

import orjson

from gateway import context as c
from gateway.context import RequestContext, Usage
from gateway.upstream import Deployment
from providers import anthropic_format as fmt
from providers.base import Exchange, HTTPAdapter
from providers.openai import client_wants_usage
from providers.streams import (
    OpenAIChunkSink,
    PassthroughCodec,
    TranslatingCodec,
    reported_model,
)

API_VERSION = "2023-06-01"
_FORWARDED_HEADERS = (b"anthropic-beta", b"anthropic-version")
# In the stream's final event; quoted, so escaped output text cannot hold it.
_MESSAGE_STOP = (b'"message_stop"',)


def _stream_usage(payload: dict[str, Any], previous: Usage | None) -> Usage | None:
    """message_start carries the input usage; message_delta the cumulative output and, from
    the API of 2025 on, the cumulative input counts again, without `cache_creation`'s split
    by TTL, and the output's thinking tokens (`output_tokens_details`): a count the delta
    carries replaces its earlier value, one it lacks (or sends as null) keeps it."""
    if payload.get("type") == "message_start":
        return Usage.from_anthropic((payload.get("message") or {}).get("usage"))
    delta = payload.get("usage")
    if not isinstance(delta, dict):
        return previous
    usage = previous or Usage()
    fresh = usage.input_tokens - usage.cached_input_tokens - usage.cache_write_tokens
    if delta.get("input_tokens") is not None:
        fresh = int(delta["input_tokens"])
    if delta.get("cache_read_input_tokens") is not None:
        usage.cached_input_tokens = int(delta["cache_read_input_tokens"])
    by_ttl = delta.get("cache_creation")
    if delta.get("cache_creation_input_tokens") is not None or isinstance(by_ttl, dict):
        split = Usage.from_anthropic({"cache_creation_input_tokens":
                                      delta.get("cache_creation_input_tokens"),
                                      "cache_creation": by_ttl})
        assert split is not None
        usage.cache_write_tokens = split.cache_write_tokens
        if isinstance(by_ttl, dict):
            usage.cache_write_1h_tokens = split.cache_write_1h_tokens
        elif usage.cache_write_1h_tokens > usage.cache_write_tokens:
            usage.cache_write_1h_tokens = usage.cache_write_tokens
    usage.input_tokens = fresh + usage.cached_input_tokens + usage.cache_write_tokens
    usage.output_tokens = int(delta.get("output_tokens") or usage.output_tokens)
    details = delta.get("output_tokens_details")  # (thinking is counted once it is done)
    if isinstance(details, dict) and details.get("thinking_tokens") is not None:
        usage.reasoning_tokens = int(details["thinking_tokens"])
    return usage


def _event_has_content(event: dict[str, Any]) -> bool:
    return event.get("type") in ("content_block_delta", "message_delta", "message_stop")


def _decode_native(payload: dict[str, Any]) -> tuple[None, Usage | None]:
    return None, Usage.from_anthropic(payload.get("usage"))


class AnthropicSource:
    """Anthropic events -> hub chunks (the translator raises StreamError on error events)."""

    __slots__ = ("_translator", "reported_model")

    def __init__(self, translator: fmt.MessagesStreamToChat) -> None:
        self._translator = translator
        self.reported_model: str | None = None  # (message_start's message.model)

    def feed(self, event: str | None, data: str) -> list[dict[str, Any]]:
        payload = orjson.loads(data)
        if self.reported_model is None:
            self.reported_model = reported_model(payload)
        return self._translator.feed(event or "", payload)

    def finish(self) -> list[dict[str, Any]]:
        return []

    @property
    def usage(self) -> dict[str, Any] | None:
        return self._translator.usage

    @property
    def ended(self) -> bool:
        return self._translator.finished


class AnthropicAdapter(HTTPAdapter):
    """`Provider("anthropic", api_key_env="ANTHROPIC_API_KEY")`."""

    type_name = "anthropic"
    wire_format = "anthropic"
    default_base_url = "https://api.anthropic.com"
    operations = frozenset({c.ANTHROPIC_MESSAGES, c.ANTHROPIC_COUNT_TOKENS, c.OPENAI_CHAT})

    def __init__(self, *, default_max_tokens: int = 4096, **options: Any) -> None:
        super().__init__(**options)
        self.default_max_tokens = default_max_tokens

    def chat_output_cap(self, body: dict[str, Any], upstream_model: str) -> int | None:
        """The `max_tokens` an OpenAI chat request `body` goes to `upstream_model` with: the
        caller's cap, else `default_max_tokens` plus the room the translation makes for the
        thinking the request asks for (`reasoning_effort` or `thinking` on Claude 3.7 to
        4.5). The quota layer reserves it (the most the call may generate). None for a body
        the translation refuses (the call fails before it reaches the provider)."""
        try:
            request = fmt.chat_request_to_messages(body, upstream_model,
                                                   default_max_tokens=self.default_max_tokens)
        except fmt.TranslationError:
            return None
        cap = request.get("max_tokens")
        return cap if type(cap) is int else None

    def _headers(self, ctx: RequestContext) -> dict[str, str]:
        headers = {"content-type": "application/json", "anthropic-version": API_VERSION,
                   **self.extra_headers}
        if ctx.api_format == "anthropic":
            betas = []
            for name, value in ctx.headers:
                if name == b"anthropic-beta":  # repeated lines make one list (RFC 9110 5.3)
                    betas.append(value.decode("latin-1"))
                elif name in _FORWARDED_HEADERS:
                    headers[name.decode()] = value.decode("latin-1")
            if betas:
                headers["anthropic-beta"] = ", ".join(betas)
        if self._api_key:
            headers["x-api-key"] = self._api_key
        return headers

    def key_headers(self, secret: str) -> dict[str, str]:
        return {"x-api-key": secret}

    def probe_request(self, secret: str) -> tuple[str, dict[str, str]]:
        """`GET /v1/models` (https://docs.anthropic.com/en/api/models-list)."""
        _, headers = super().probe_request(secret)
        return self.base_url + "/v1/models", {"anthropic-version": API_VERSION, **headers}

    def plan(self, ctx: RequestContext, deployment: Deployment) -> Exchange:
        headers = self._headers(ctx)
        if ctx.operation == c.OPENAI_CHAT:
            return self._plan_from_openai(ctx, deployment, headers)
        body = dict(ctx.body)
        body["model"] = deployment.model
        if ctx.operation == c.ANTHROPIC_COUNT_TOKENS:
            return Exchange(self.base_url + "/v1/messages/count_tokens", headers,
                            orjson.dumps(body), False, lambda payload: (None, None))
        return Exchange(self.base_url + "/v1/messages", headers, orjson.dumps(body), ctx.stream,
                        _decode_native, lambda: PassthroughCodec(
                            _stream_usage, _event_has_content, end_markers=_MESSAGE_STOP,
                            final_event="message_stop"))

    def _plan_from_openai(self, ctx: RequestContext, deployment: Deployment,
                          headers: dict[str, str]) -> Exchange:
        body = fmt.chat_request_to_messages(ctx.body, deployment.model,
                                            default_max_tokens=self.default_max_tokens)
        public_model = ctx.model
        client_asked = ctx.stream and client_wants_usage(ctx.body)

        def decode(payload: dict[str, Any]) -> tuple[dict[str, Any], Usage | None]:
            return (fmt.messages_response_to_chat(payload, public_model),
                    Usage.from_anthropic(payload.get("usage")))

        def codec() -> TranslatingCodec:
            source = AnthropicSource(fmt.MessagesStreamToChat(public_model, client_asked))
            return TranslatingCodec(source, OpenAIChunkSink())

        return Exchange(self.base_url + "/v1/messages", headers, orjson.dumps(body), ctx.stream,
                        decode, codec)

    def parse_error(self, status: int, body: bytes) -> tuple[str, str]:
        return fmt.parse_anthropic_error(status, body)
