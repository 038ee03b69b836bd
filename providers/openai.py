"""OpenAI and every OpenAI-compatible API (Groq, Together, vLLM, Ollama, ...), and Azure OpenAI.

Same format in and out: the request gets the upstream model id (and, for streams, a request
for the usage chunk, except from the services that refuse `stream_options`) and the response
bytes pass through untouched; a chat or completions request with more stop sequences than
OpenAI and Azure take is refused before the call, as a translated one is. Anthropic-shaped
callers are translated through providers.anthropic_format, without their `top_k`.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

import orjson

from gateway import context as c
from gateway.context import RequestContext, Usage
from gateway.errors import GatewayError, failed_response_event
from gateway.tokens import count_messages, estimate_messages, tokenizer_of
from gateway.upstream import Deployment, Send
from providers import anthropic_format
from providers.base import Exchange, HTTPAdapter
from providers.streams import (
    AnthropicEventSink,
    OpenAIChunkSource,
    PassthroughCodec,
    StreamError,
    TranslatingCodec,
    chat_chunk_has_content,
    error_of,
)
from providers.translation import TranslationError

_PATHS = {
    c.OPENAI_CHAT: "/chat/completions",
    c.OPENAI_COMPLETIONS: "/completions",
    c.OPENAI_EMBEDDINGS: "/embeddings",
    c.OPENAI_RESPONSES: "/responses",
    c.ANTHROPIC_MESSAGES: "/chat/completions",
}


# The bytes one of which a stream's final event holds (checked once the upstream ended):
# chat and completions end with `data: [DONE]`, Responses with its terminal response event.
# A chat stream's end: `[DONE]`, or a choice's finish reason in its last events (some
# OpenAI-compatible servers end without `[DONE]`; orjson and Python's json spell it apart).
# (A Responses stream's third ending, `response.failed`, is an error: see _responses_error.)
_CHAT_END = (b"[DONE]\n", b'"finish_reason":"', b'"finish_reason": "')
_RESPONSES_END = (b'"response.completed"', b'"response.incomplete"')


def _chat_usage(payload: dict[str, Any], previous: Usage | None) -> Usage | None:
    return Usage.from_openai(payload.get("usage")) or previous


def _responses_usage(payload: dict[str, Any], previous: Usage | None) -> Usage | None:
    response = payload.get("response")
    usage = response.get("usage") if isinstance(response, dict) else None
    return Usage.from_openai(usage) or previous


def _responses_event_has_content(event: dict[str, Any]) -> bool:
    # `response.incomplete` is a normal end ("a response finishes as incomplete": out of
    # max_output_tokens, or filtered), with its usage, even before any text.
    kind = str(event.get("type", ""))
    return kind.endswith((".delta", ".done")) or kind in ("response.completed",
                                                            "response.incomplete")


def _responses_error(event: dict[str, Any]) -> StreamError | None:
    """The error a Responses stream event reports, else None.

    `response.failed` carries it as `response.error` (`code`, `message`: a ResponseError,
    no type). The `error` event has `code`, `message` and `param` at its top level in
    OpenAI's streaming reference (ResponseErrorEvent), but the live API nests them in an
    `error` object (openai/openai-dotnet#881, Effect-TS/effect#7262): both are read. The
    live API follows its `error` event with `response.failed`, the failed response's last
    event (vercel/ai#6534; prism-php/prism's recorded stream-unknown-error-responses-1).
    """
    kind = event.get("type")
    if kind == "response.failed":
        response = event.get("response")
        error = response.get("error") if isinstance(response, dict) else None
        failed = error_of(error if isinstance(error, dict) else {})
        failed.native_type = None  # (the caller's gets the type of its status)
        return failed
    nested = event.get("error")
    if isinstance(nested, dict):
        found = error_of(nested)
    elif kind == "error":
        found = error_of({name: event.get(name) for name in ("code", "message", "param")})
        found.native_type = None
    else:
        return None
    found.ends_stream = kind != "error"
    return found


def responses_codec(redact: Callable[[str], str]) -> PassthroughCodec:
    """A Responses stream to a Responses caller. An error event before any output fails the
    call (failover may retry it); after it, the event goes on and ends the stream (with the
    `response.failed` that follows an `error` event), its error `redact`ed as an error
    response's is (the adapter's `redact`: the provider keys it quotes)."""
    return PassthroughCodec(_responses_usage, _responses_event_has_content,
                            end_markers=_RESPONSES_END, final_event="response.completed",
                            read_error=_responses_error, forward_error_event=True,
                            scrub_error=lambda event: _redact_error(event, redact))


def _redact_error(event: dict[str, Any], redact: Callable[[str], str]) -> bool:
    """Redacts, in place, the strings of a Responses error event's error: its `error`
    object, a failed response's `error`, or a flat `error` event's own fields (the caller's
    words a failed response echoes are left as they are). Says whether any changed."""
    response = event.get("response")
    holders = (event.get("error"), response.get("error") if isinstance(response, dict) else None,
               event if event.get("type") == "error" else None)
    changed = False
    for holder in holders:
        if not isinstance(holder, dict):
            continue
        for name, value in holder.items():
            if isinstance(value, str) and (clean := redact(value)) != value:
                holder[name], changed = clean, True
    return changed


def _decode_openai(payload: dict[str, Any]) -> tuple[None, Usage | None]:
    return None, Usage.from_openai(payload.get("usage"))


# OpenAI-compatible services that refuse `stream_options`: Mistral answers 422 to
# `include_usage` ("Extra inputs are not permitted", openai/openai-agents-python#442,
# avante.nvim#2347) and sends the usage on a stream's last chunk unasked
# (mistralai/client-python#40). Known by the preset's name, or by the base URL's host for
# any other type aimed at Mistral's API (Codestral keys use codestral.mistral.ai, Continue's
# "Set up Codestral" guide).
_REFUSE_STREAM_OPTIONS = frozenset({"mistral"})
_REFUSE_STREAM_OPTIONS_HOSTS = frozenset({"api.mistral.ai", "codestral.mistral.ai"})
# Azure takes `stream_options` from API version 2024-10-21 (the GA spec has it,
# griptape-ai/griptape#1640); older versions refuse it ("Unrecognized request argument
# supplied: stream_options", langchain-ai/langchain#23552).
_AZURE_STREAM_OPTIONS_SINCE = "2024-10-21"


def client_wants_usage(body: dict[str, Any]) -> bool:
    """Whether an OpenAI-shaped stream request asked for the final usage chunk."""
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def with_usage_requested(body: dict[str, Any], *,
                         provider_takes_it: bool = True) -> tuple[dict[str, Any], bool]:
    """Asks an OpenAI-family stream for its usage chunk; says whether the client had asked.
    A provider that refuses `stream_options` gets none, not even the client's."""
    client_asked = client_wants_usage(body)
    if not provider_takes_it:
        body.pop("stream_options", None)
    elif not client_asked:
        options = body.get("stream_options")
        body["stream_options"] = {**(options if isinstance(options, dict) else {}),
                                  "include_usage": True}
    return body, client_asked


class OpenAIAdapter(HTTPAdapter):
    """`Provider("openai", ...)` and the OpenAI-compatible presets."""

    type_name = "openai"
    wire_format = "openai"
    default_base_url = "https://api.openai.com/v1"
    operations = frozenset({c.OPENAI_CHAT, c.OPENAI_COMPLETIONS, c.OPENAI_EMBEDDINGS,
                            c.OPENAI_RESPONSES, c.ANTHROPIC_MESSAGES, c.ANTHROPIC_COUNT_TOKENS})

    def __init__(self, *, type_name: str = "openai", responses_api: bool = True,
                 **options: Any) -> None:
        self.type_name = type_name
        # OpenAI's API takes max_completion_tokens (max_tokens is deprecated and refused by
        # reasoning models). Azure's older API versions and some of its deployments refuse
        # max_completion_tokens (openai-python#1724), and the compatible servers read
        # max_tokens: they get max_tokens.
        self.max_tokens_field = "max_completion_tokens" if type_name == "openai" \
            else "max_tokens"
        # `stop`: "Up to 4 sequences" (OpenAI's chat and completions references; Azure
        # refuses more alike, QwenLM/Qwen-Agent#228). The compatible servers set limits of
        # their own, or none.
        self.max_stop_sequences = 4 if type_name in ("openai", "azure") else None
        if not responses_api:
            self.operations = self.operations - {c.OPENAI_RESPONSES}
        super().__init__(**options)
        self.takes_stream_options = type_name not in _REFUSE_STREAM_OPTIONS and \
            urlsplit(self.base_url).hostname not in _REFUSE_STREAM_OPTIONS_HOSTS

    def url(self, operation: str, deployment: Deployment) -> str:
        return self.base_url + _PATHS[operation]

    def key_headers(self, secret: str) -> dict[str, str]:
        return {"authorization": "Bearer " + secret}

    def auth_headers(self) -> dict[str, str]:
        return self.key_headers(self._api_key) if self._api_key else {}

    def plan(self, ctx: RequestContext, deployment: Deployment) -> Exchange:
        headers = {"content-type": "application/json", **self.extra_headers, **self.auth_headers()}
        url = self.url(ctx.operation, deployment)
        if ctx.operation == c.ANTHROPIC_MESSAGES:
            return self._plan_from_anthropic(ctx, deployment, url, headers)
        body = dict(ctx.body)
        body["model"] = deployment.model
        if ctx.operation in (c.OPENAI_CHAT, c.OPENAI_COMPLETIONS):
            self._check_stop(body.get("stop"))
        if not ctx.stream:
            return Exchange(url, headers, orjson.dumps(body), False, _decode_openai)
        if ctx.operation == c.OPENAI_RESPONSES:
            return Exchange(url, headers, orjson.dumps(body), True, _decode_openai,
                            lambda: responses_codec(self.redact))
        body, client_asked = with_usage_requested(
            body, provider_takes_it=self.takes_stream_options)
        return Exchange(url, headers, orjson.dumps(body), True, _decode_openai,
                        lambda: PassthroughCodec(_chat_usage, chat_chunk_has_content,
                                                 drop_usage_event=not client_asked,
                                                 end_markers=_CHAT_END, final_event="[DONE]"))

    def broken_stream_ending(self, ctx: RequestContext, codec: Any, error: GatewayError,
                             by_provider: bool) -> bytes:
        """A Responses stream ends as the live API ends a failed one, with its `error` event
        and then `response.failed` (vercel/ai#6534): after the gateway's own error event
        (see HTTPAdapter's), and after the provider's when the upstream broke, ended or
        stalled before its own `response.failed`."""
        unended = codec.unended_error if ctx.operation == c.OPENAI_RESPONSES else None
        if not by_provider or unended is None:
            return super().broken_stream_ending(ctx, codec, error, by_provider)
        return failed_response_event(codec.first_event, unended.code or "server_error",
                                     self.redact(unended.message), codec.next_sequence_number)

    def _check_stop(self, stop: Any) -> None:
        """A same-format chat or completions request with more stop sequences than the
        service takes is refused as a translated one is
        (anthropic_format.messages_request_to_chat), before the call: failover can then try
        a deployment that takes it, rather than answer with this provider's 400."""
        limit = self.max_stop_sequences
        if limit is not None and isinstance(stop, list) and len(stop) > limit:
            raise TranslationError(f"OpenAI models take at most {limit} stop sequences; "
                                   f"this request has {len(stop)}.", param="stop")

    def _plan_from_anthropic(self, ctx: RequestContext, deployment: Deployment, url: str,
                             headers: dict[str, str]) -> Exchange:
        body = anthropic_format.messages_request_to_chat(
            ctx.body, max_tokens_field=self.max_tokens_field,
            max_stop_sequences=self.max_stop_sequences)
        body.pop("top_k", None)  # OpenAI's API has none (see the anthropic_format docstring)
        body["model"] = deployment.model
        public_model = ctx.model

        def decode(payload: dict[str, Any]) -> tuple[dict[str, Any], Usage | None]:
            return (anthropic_format.chat_response_to_messages(payload, public_model),
                    Usage.from_openai(payload.get("usage")))

        def codec() -> TranslatingCodec:
            sink = AnthropicEventSink(anthropic_format.ChatStreamToMessages(public_model))
            return TranslatingCodec(OpenAIChunkSource(), sink)

        if ctx.stream:
            body, _ = with_usage_requested(body, provider_takes_it=self.takes_stream_options)
        return Exchange(url, headers, orjson.dumps(body), ctx.stream, decode, codec)

    answered_locally = frozenset({c.ANTHROPIC_COUNT_TOKENS})  # OpenAI has no counting API

    async def answer_locally(self, ctx: RequestContext, send: Send) -> None:
        await send_count_tokens(ctx, send)

    def parse_error(self, status: int, body: bytes) -> tuple[str, str]:
        return parse_openai_error(status, body)

    def native_error(self, error_type: str, body: bytes) -> tuple[str | None, str | None,
                                                                  str | None]:
        return openai_error_fields(body)

    def retry_after(self, status: int, headers: Mapping[str, str], body: bytes) -> str | None:
        """A 429 without Retry-After may give its pause only in OpenAI's (and Azure's)
        headers of its own (`rate_limit_pause_s`): as whole seconds, rounded up."""
        said = super().retry_after(status, headers, body)
        if said or status != 429:
            return said
        pause_s = rate_limit_pause_s(headers)
        return None if pause_s is None else str(math.ceil(pause_s))


# Only on a 429: every OpenAI answer carries the x-ratelimit-reset-* headers (when the limits
# would be whole again, "6ms" after any call), which say nothing of a pause otherwise.
_RESET_HEADERS = ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens")
_RESET = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|h|m|s))+", re.ASCII)  # "6m0s", "1s", "20ms", "7.66s"
_RESET_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)", re.ASCII)
_UNIT_S = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def rate_limit_pause_s(headers: Mapping[str, str]) -> float | None:
    """The seconds a 429 without Retry-After asks for: `retry-after-ms` (which OpenAI's and
    Azure's SDKs read first), else the longer of the `x-ratelimit-reset-requests` and
    `-tokens` durations (https://platform.openai.com/docs/guides/rate-limits, "Rate limits
    in headers"); None when none of them is readable."""
    millis = headers.get("retry-after-ms")
    try:
        pause_s = float(millis) / 1000 if millis is not None else math.nan
    except ValueError:
        pause_s = math.nan
    if math.isfinite(pause_s) and pause_s >= 0:
        return pause_s
    resets = [reset_s for name in _RESET_HEADERS
              if (reset_s := _reset_duration_s(headers.get(name))) is not None]
    return max(resets) if resets else None


def _reset_duration_s(value: str | None) -> float | None:
    if value is None or not _RESET.fullmatch(value.strip()):
        return None
    seconds = sum(float(number) * _UNIT_S[unit] for number, unit in _RESET_PART.findall(value))
    return seconds if math.isfinite(seconds) else None  # (400 digits are a float's inf)


def parse_openai_error(status: int, body: bytes) -> tuple[str, str]:
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return f"http_{status}", body[:200].decode("utf-8", "replace") or f"HTTP {status}"
    if isinstance(payload, list) and payload:  # Azure and some proxies wrap errors in a list
        payload = payload[0]
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict):
        kind = error.get("type") or error.get("code") or f"http_{status}"
        return str(kind), str(error.get("message") or f"HTTP {status}")
    if isinstance(error, str):
        return f"http_{status}", error
    return f"http_{status}", str(payload)[:200]


def openai_error_fields(body: bytes) -> tuple[str | None, str | None, str | None]:
    """(type, code, param) of an OpenAI error body, each None where it has none (Azure's own
    errors carry only a code)."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None, None, None
    if isinstance(payload, list) and payload:
        payload = payload[0]
    error = payload.get("error") if isinstance(payload, dict) else None
    if not isinstance(error, dict):
        return None, None, None
    fields = (error.get("type"), error.get("code"), error.get("param"))
    return tuple(None if value is None else str(value) for value in fields)  # type: ignore[return-value]


async def send_count_tokens(ctx: RequestContext, send: Send) -> None:
    """Anthropic's count_tokens for providers without one: the gateway's local count, of a
    request the model could be sent (translated, it is checked as a messages request is: a
    field of the wrong type is refused naming it), marked `exact` where the deployment's
    tokenizer counted every part, else `estimated`."""
    body = ctx.body
    anthropic_format.messages_request_to_chat(body)
    tokenizer = tokenizer_of(ctx)
    if tokenizer is None:
        tokens, exact = estimate_messages(body.get("messages") or [], body.get("system"),
                                          body.get("tools")), False
    else:
        tokens, exact = count_messages(body.get("messages") or [], tokenizer,
                                       body.get("system"), body.get("tools"))
    raw = orjson.dumps({"input_tokens": tokens})
    await send({"type": "http.response.start", "status": 200, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode()),
        (b"x-sluicegate-token-count", b"exact" if exact else b"estimated")]})
    await send({"type": "http.response.body", "body": raw})


class AzureOpenAIAdapter(OpenAIAdapter):
    """Azure OpenAI: `{base}/openai/deployments/{deployment}/...?api-version=`, `api-key`.

    The deployment's `model` is the Azure deployment name.
    """

    default_base_url = ""

    def __init__(self, *, api_version: str = "2024-10-21", **options: Any) -> None:
        super().__init__(type_name="azure", responses_api=False, **options)
        self.api_version = api_version
        self.takes_stream_options = api_version[:10] >= _AZURE_STREAM_OPTIONS_SINCE

    def url(self, operation: str, deployment: Deployment) -> str:
        return (f"{self.base_url}/openai/deployments/{deployment.model}{_PATHS[operation]}"
                f"?api-version={self.api_version}")

    def key_headers(self, secret: str) -> dict[str, str]:
        return {"api-key": secret}

    def probe_request(self, secret: str) -> tuple[str, dict[str, str]]:
        """Azure's data-plane model list (the resource's base models, not deployments)."""
        _, headers = super().probe_request(secret)
        return f"{self.base_url}/openai/models?api-version={self.api_version}", headers
