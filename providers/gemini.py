"""Google Gemini (Generative Language API v1beta): generateContent, streamGenerateContent,
batchEmbedContents and countTokens, translated to and from both ingress formats.

Wire format: https://ai.google.dev/api/generate-content and .../embeddings, .../tokens.
"""
from __future__ import annotations

import base64
import struct
from collections.abc import Mapping
from typing import Any

import orjson

from gateway import context as c
from gateway.context import RequestContext, Usage
from gateway.tokens import input_tokens
from gateway.upstream import Deployment
from providers import anthropic_format
from providers import gemini_format as fmt
from providers.base import Exchange, HTTPAdapter
from providers.openai import client_wants_usage
from providers.streams import (
    AnthropicEventSink,
    OpenAIChunkSink,
    TranslatingCodec,
    reported_model,
)

Decoded = tuple[dict[str, Any], "Usage | None"]


class GeminiSource:
    """Gemini SSE chunks -> hub chunks (the translator raises StreamError on error payloads)."""

    __slots__ = ("_translator", "reported_model")

    def __init__(self, translator: fmt.GeminiStreamToChat) -> None:
        self._translator = translator
        self.reported_model: str | None = None  # (a chunk's modelVersion)

    def feed(self, event: str | None, data: str) -> list[dict[str, Any]]:
        payload = orjson.loads(data)
        if isinstance(payload, list):  # errors may arrive wrapped in a one-element list
            payload = payload[0] if payload else {}
        if self.reported_model is None:
            self.reported_model = reported_model(payload)
        return self._translator.feed(payload)

    def finish(self) -> list[dict[str, Any]]:
        return self._translator.finish()

    @property
    def usage(self) -> dict[str, Any] | None:
        return self._translator.usage

    @property
    def ended(self) -> bool:
        return self._translator.ended


def _base64_floats(vector: list[float]) -> str:
    """OpenAI's `encoding_format: base64`: little-endian float32, base64-encoded."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


class GeminiAdapter(HTTPAdapter):
    """`Provider("gemini", api_key_env="GEMINI_API_KEY")`. A deployment names its model by
    id (`gemini-2.5-flash`) or by resource name (`models/gemini-2.5-flash`, as Gemini's model
    list does): either is called at `/v1beta/models/gemini-2.5-flash:{method}`."""

    type_name = "gemini"
    wire_format = "gemini"
    default_base_url = "https://generativelanguage.googleapis.com"
    operations = frozenset({c.OPENAI_CHAT, c.OPENAI_EMBEDDINGS, c.ANTHROPIC_MESSAGES,
                            c.ANTHROPIC_COUNT_TOKENS})

    def __init__(self, *, api_version: str = "v1beta", **options: Any) -> None:
        super().__init__(**options)
        self.api_version = api_version

    def _url(self, deployment: Deployment, method: str) -> str:
        suffix = "?alt=sse" if method == "streamGenerateContent" else ""
        return (f"{self.base_url}/{self.api_version}/{fmt.resource_name(deployment.model)}:"
                f"{method}{suffix}")

    def _headers(self) -> dict[str, str]:
        headers = {"content-type": "application/json", **self.extra_headers}
        if self._api_key:
            headers["x-goog-api-key"] = self._api_key
        return headers

    def key_headers(self, secret: str) -> dict[str, str]:
        return {"x-goog-api-key": secret}

    def probe_request(self, secret: str) -> tuple[str, dict[str, str]]:
        """`GET /{version}/models` (https://ai.google.dev/api/models#method:-models.list);
        the key goes in its header, never in the query string."""
        _, headers = super().probe_request(secret)
        return f"{self.base_url}/{self.api_version}/models", headers

    def plan(self, ctx: RequestContext, deployment: Deployment) -> Exchange:
        if ctx.operation == c.OPENAI_EMBEDDINGS:
            return self._plan_embeddings(ctx, deployment)
        chat = ctx.body
        if ctx.api_format == "anthropic":
            chat = anthropic_format.messages_request_to_chat(ctx.body)
        request = fmt.chat_request_to_gemini(chat, fetches_urls=fmt.fetches_urls(
            deployment.model), model=deployment.model)
        if ctx.operation == c.ANTHROPIC_COUNT_TOKENS:
            return self._plan_count_tokens(request, deployment)
        method = "streamGenerateContent" if ctx.stream else "generateContent"
        url, body = self._url(deployment, method), orjson.dumps(request)
        if ctx.api_format == "anthropic":
            return Exchange(url, self._headers(), body, ctx.stream,
                            *self._to_anthropic(ctx.model))
        client_asked = ctx.stream and client_wants_usage(ctx.body)
        return Exchange(url, self._headers(), body, ctx.stream,
                        *self._to_openai(ctx.model, client_asked))

    def _to_openai(self, public_model: str, client_asked: bool) -> tuple[Any, Any]:
        def decode(payload: dict[str, Any]) -> Decoded:
            chat = fmt.gemini_response_to_chat(payload, public_model)
            return chat, Usage.from_openai(chat.get("usage"))

        def codec() -> TranslatingCodec:
            source = GeminiSource(fmt.GeminiStreamToChat(public_model, client_asked))
            return TranslatingCodec(source, OpenAIChunkSink())

        return decode, codec

    def _to_anthropic(self, public_model: str) -> tuple[Any, Any]:
        def decode(payload: dict[str, Any]) -> Decoded:
            chat = fmt.gemini_response_to_chat(payload, public_model)
            return (anthropic_format.chat_response_to_messages(chat, public_model),
                    Usage.from_openai(chat.get("usage")))

        def codec() -> TranslatingCodec:
            source = GeminiSource(fmt.GeminiStreamToChat(public_model, True))
            sink = AnthropicEventSink(anthropic_format.ChatStreamToMessages(public_model))
            return TranslatingCodec(source, sink)

        return decode, codec

    def _plan_embeddings(self, ctx: RequestContext, deployment: Deployment) -> Exchange:
        request = fmt.embeddings_request_to_gemini(ctx.body, deployment.model)
        batches = fmt.embeddings_batches(request)
        # Gemini reports no usage here: each batch's input is counted, with the deployment's
        # tokenizer where it has one, as the quota layer counts it (a batch Gemini answered
        # is billed even when another fails, `Exchange.part_usage`).
        texts, tokenizer = fmt.embedding_texts(ctx.body["input"]), deployment.tokenizer
        size = fmt.MAX_EMBED_BATCH
        part_usage = tuple(Usage(input_tokens=input_tokens(texts[at:at + size], tokenizer))
                           for at in range(0, len(texts), size))
        total = sum(usage.input_tokens for usage in part_usage)
        public_model = ctx.model
        as_base64 = ctx.body.get("encoding_format") == "base64"

        def decode(payload: dict[str, Any]) -> Decoded:
            result = fmt.gemini_embeddings_to_openai(payload, public_model, total)
            if as_base64:
                for item in result["data"]:
                    item["embedding"] = _base64_floats(item["embedding"])
            return result, Usage(input_tokens=total)

        first, *more = (orjson.dumps(batch) for batch in batches)
        return Exchange(self._url(deployment, "batchEmbedContents"), self._headers(), first,
                        False, decode, more_bodies=tuple(more),
                        combine=fmt.combine_embeddings, part_usage=part_usage)

    def _plan_count_tokens(self, request: dict[str, Any], deployment: Deployment) -> Exchange:
        body = fmt.messages_count_request_to_gemini(
            {**request, "model": fmt.resource_name(deployment.model)})

        def decode(payload: dict[str, Any]) -> Decoded:
            return {"input_tokens": fmt.gemini_count_tokens_result(payload)}, None

        return Exchange(self._url(deployment, "countTokens"), self._headers(),
                        orjson.dumps(body), False, decode)

    def parse_error(self, status: int, body: bytes) -> tuple[str, str]:
        return fmt.parse_gemini_error(status, body)

    def retry_after(self, status: int, headers: Mapping[str, str], body: bytes) -> str | None:
        """Gemini's 429 sends no Retry-After header: its delay is the body's RetryInfo."""
        return super().retry_after(status, headers, body) or fmt.gemini_retry_delay(body)
