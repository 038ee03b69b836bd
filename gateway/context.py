"""The typed per-request context every layer reads and writes.

The kernel creates one `RequestContext` per API request and stores it in the ASGI scope under
`CONTEXT_KEY`. Layers talk to each other only through it; each field names the layer that
writes it.

A key's own usage (`SELF_USAGE_PATH`) is not an API request and gets no context: the kernel
passes it down the stack, the auth layer verifies the caller's key and puts a `ScopePrincipal`
in the scope under `PRINCIPAL_KEY`, and the metering layer answers for that key alone.
"""
from __future__ import annotations

import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any, TypedDict

CONTEXT_KEY = "sluicegate.context"
PRINCIPAL_KEY = "sluicegate.principal"
SELF_USAGE_PATH = "/v1/usage/self"
# The model list: answered by the kernel, but with an auth layer only to a caller it let
# through, and only with the models its key may use (the auth layer sets PRINCIPAL_KEY). So
# is one model of it (`GET /v1/models/{model}`: gateway.ingress.model_of_path).
MODELS_PATHS = frozenset({"/v1/models", "/models"})

# Ingress operations: which API the caller spoke. The first word is the wire format.
OPENAI_CHAT = "openai.chat"
OPENAI_COMPLETIONS = "openai.completions"
OPENAI_EMBEDDINGS = "openai.embeddings"
OPENAI_RESPONSES = "openai.responses"
ANTHROPIC_MESSAGES = "anthropic.messages"
ANTHROPIC_COUNT_TOKENS = "anthropic.count_tokens"

# The member a successful non-stream answer of each operation has, a list: what an error some
# OpenAI-compatible servers send with status 200 lacks. (Not its `object`: servers spell it
# their own way, Together's completions "text.completion".)
ANSWER_MEMBERS = {OPENAI_CHAT: "choices", OPENAI_COMPLETIONS: "choices",
                  OPENAI_RESPONSES: "output", OPENAI_EMBEDDINGS: "data",
                  ANTHROPIC_MESSAGES: "content"}


def is_answer(parsed: Any, operation: str) -> bool:
    """Whether a 200's body is the operation's answer, not an error some OpenAI-compatible
    servers (OpenRouter, proxies) send with status 200 (`{"error": {...}}`)."""
    if type(parsed) is not dict or parsed.get("error") is not None:
        return False
    member = ANSWER_MEMBERS.get(operation)
    return member is None or isinstance(parsed.get(member), list)


@dataclass(slots=True)
class Usage:
    """Actual token usage of one upstream call, in provider-neutral terms.

    `input_tokens` includes cached input tokens (OpenAI's convention); `cached_input_tokens`
    says how many of them were read from a provider-side prompt cache, `cache_write_tokens`
    how many were written to one (Anthropic bills them above fresh input), and
    `cache_write_1h_tokens` how many of those were written for an hour (billed higher
    still) rather than five minutes.
    """

    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    reasoning_tokens: int = 0
    cache_write_tokens: int = 0
    cache_write_1h_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    @classmethod
    def from_openai(cls, usage: dict[str, Any] | None) -> Usage | None:
        """Reads an OpenAI `usage` object (chat, completions, embeddings or responses)."""
        if not isinstance(usage, dict):
            return None
        prompt = token_count(usage.get("prompt_tokens", usage.get("input_tokens")))
        output = token_count(usage.get("completion_tokens", usage.get("output_tokens")))
        in_details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details") or {}
        out_details = (
            usage.get("completion_tokens_details") or usage.get("output_tokens_details") or {}
        )
        reasoning = token_count(out_details.get("reasoning_tokens"))
        if reasoning and reasoning_is_extra(prompt, output, reasoning,
                                            usage.get("total_tokens")):
            output += reasoning
        # (DeepSeek's own name for the cached part, where the OpenAI one is not sent)
        cached = in_details.get("cached_tokens", usage.get("prompt_cache_hit_tokens"))
        return cls(
            input_tokens=prompt,
            output_tokens=output,
            cached_input_tokens=token_count(cached),
            reasoning_tokens=reasoning,
            # (not OpenAI's own: what the Anthropic translation and some routers report)
            cache_write_tokens=token_count(in_details.get("cache_write_tokens")),
            cache_write_1h_tokens=token_count(in_details.get("cache_write_1h_tokens")),
        )

    @classmethod
    def from_anthropic(cls, usage: dict[str, Any] | None) -> Usage | None:
        """Reads an Anthropic `usage` object; its `input_tokens` excludes cache reads/writes.
        `cache_creation` splits the writes by how long they are kept (5 minutes, 1 hour).
        `output_tokens_details.thinking_tokens` are the reasoning part of output_tokens (also
        where the translation of an OpenAI-format answer keeps its reasoning_tokens)."""
        if not isinstance(usage, dict):
            return None
        cache_read = token_count(usage.get("cache_read_input_tokens"))
        cache_write = token_count(usage.get("cache_creation_input_tokens"))
        by_ttl = usage.get("cache_creation")
        written_1h = 0
        if isinstance(by_ttl, dict):
            written_1h = token_count(by_ttl.get("ephemeral_1h_input_tokens"))
            # (the total is their sum: the larger)
            cache_write = max(cache_write, token_count(by_ttl.get("ephemeral_5m_input_tokens"))
                              + written_1h)
        out_details = usage.get("output_tokens_details")
        return cls(
            input_tokens=token_count(usage.get("input_tokens")) + cache_read + cache_write,
            output_tokens=token_count(usage.get("output_tokens")),
            cached_input_tokens=cache_read,
            reasoning_tokens=token_count(out_details.get("thinking_tokens"))
            if isinstance(out_details, dict) else 0,
            cache_write_tokens=cache_write,
            cache_write_1h_tokens=written_1h,
        )


def reasoning_is_extra(prompt: int, completion: int, reasoning: int, total: Any) -> bool:
    """Whether an OpenAI-format usage counts its reasoning tokens beside `completion_tokens`
    rather than in them. OpenAI's are a part of the completion; xAI's (Grok) are not: its
    `total_tokens` is prompt + completion + reasoning ("reasoning token consumption will be
    counted separately from completion_tokens, but will be counted in the total_tokens",
    docs.x.ai, consumption and rate limits). Read from the numbers, whoever sent them: a
    total that adds the reasoning on, or reasoning that a completion could not hold."""
    if type(total) is int and total != prompt + completion:
        return total == prompt + completion + reasoning
    return reasoning > completion


# No call's token count comes near this (a trillion tokens), and the bill of any count below
# it fits the ledger's 64-bit micro-dollars (at $1,000 per million tokens: 1.1e15).
MAX_TOKEN_COUNT = 2**40


def token_count(value: Any) -> int:
    """A token count in a provider's usage. Missing (None) is 0; a whole number is read, as
    an int, a float without a fraction or a string of digits (proto3 JSON writes 64-bit
    integers as strings), from 0 below `MAX_TOKEN_COUNT`. Anything else (negative, 1e300,
    2.5, true, "n/a") is a ValueError: usage that cannot be read, never a bill lowered by it
    or one no ledger can hold."""
    if type(value) is int:
        count = value
    elif value is None:
        return 0
    elif (type(value) is float and value.is_integer()) or type(value) is str:
        count = int(value)  # (a string not of digits: a ValueError)
    else:
        raise ValueError("a token count that is not a whole number")
    if 0 <= count < MAX_TOKEN_COUNT:
        return count
    raise ValueError("a token count out of range")


def add_usage(first: Usage, second: Usage | None) -> Usage:
    """The usage of two calls (or parts of calls) together."""
    if second is None:
        return first
    return Usage(first.input_tokens + second.input_tokens,
                 first.output_tokens + second.output_tokens,
                 first.cached_input_tokens + second.cached_input_tokens,
                 first.reasoning_tokens + second.reasoning_tokens,
                 first.cache_write_tokens + second.cache_write_tokens,
                 first.cache_write_1h_tokens + second.cache_write_1h_tokens)


@dataclass(slots=True)
class Attempt:
    """One upstream call made for this request (written by the passthrough)."""

    provider: str
    deployment: str
    status: int
    error_type: str | None = None
    duration_s: float = 0.0
    key: str | None = None  # the provider key's public name (its environment variable)


@dataclass(slots=True)
class RequestContext:
    """Everything known about one API request, shared by the layers."""

    # Written by the kernel.
    request_id: str  # the caller's `x-request-id` when it sent a usable one, else made up
    operation: str  # one of the ingress constants above
    api_format: str  # "openai" or "anthropic": the shape of every response and error
    body: dict[str, Any]
    raw_body: bytes
    model: str
    stream: bool
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)  # the scope's, lower-case
    models: Any = None  # every public model (name -> gateway.upstream.Model), for re-routing
    started_at: float = field(default_factory=time.time)
    started_monotonic: float = field(default_factory=time.monotonic)
    # No other request of any gateway process has it (the caller may send one request id
    # many times): `request_id` when the gateway made that up, else `request_id` with random
    # bits added. What a layer keys per-request state in shared stores by (quota leases).
    unique_id: str = ""
    # Written by the auth layer: who is calling.
    principal: Any = None
    customer: str | None = None
    # Written by the failover layer: which deployment to call next (None: the first one) and
    # which of its provider keys (a gateway.upstream.ProviderKey; None: its first key, or the
    # provider's own key when it has none).
    deployment: Any = None
    provider_key: Any = None
    # Written by the failover layer: it routes every call below it, so a layer below that
    # sends the request to another model (a quota downgrade) raises `Rerouted` instead of
    # calling below, and the failover layer routes the request for that model.
    reroutable: bool = False
    # A stream that breaks after it started raises gateway.errors.StreamInterrupted instead
    # of ending with an error event, so the failover layer can continue it elsewhere.
    continue_streams: bool = False
    # Written by the passthrough.
    served_deployment: Any = None  # the Deployment that answered (the last one tried)
    attempts: list[Attempt] = field(default_factory=list)
    served_model: str | None = None
    provider: str | None = None
    usage: Usage | None = None
    first_byte_s: float | None = None
    # A stream that ended with an in-band error after it started: that error (a
    # gateway.errors.UpstreamError with the status it would have had as a response), so the
    # failover layer can tell the provider's failures from the caller's.
    stream_error: Any = None
    # The JSON body the passthrough sent a non-stream client: (the bytes, their parse), so
    # the cache keeps an answer without parsing it again. Read-only: it went out as is.
    sent_json: tuple[bytes, Any] | None = None
    # A stream's first event from the provider, parsed (a Responses stream's
    # `response.created`: which response it is), for the layers that need it. Read-only.
    first_event: dict[str, Any] | None = None
    finish_reasons: list[str] | None = None  # only while tracing (gateway.tracing)
    # The model the provider said answered (its answer's `model`, a stream's first event
    # that names one), not the deployment's configured name (`served_model`, what is billed);
    # None when no provider answered. A JSON answer's only while tracing.
    response_model: str | None = None
    # Written by whoever ends the request.
    status: int = 0
    error_type: str | None = None
    client_disconnected: bool = False
    # Written by the kernel as the response's last message goes to the server: a disconnect
    # that comes after it is no client leaving (gateway/disconnect.py).
    response_ended: bool = False
    # Written by the cache layer.
    cache_status: str | None = None
    # Headers any layer wants on the response: the kernel adds them to the response start (or
    # to the error it renders), so a layer need not wrap `send` only to add a header.
    response_headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    # Written by the kernel when tracing is on: the request's span (a gateway.tracing
    # RequestTrace); adapters open a child span per upstream attempt through it.
    trace: Any = None
    # Callbacks the kernel runs once the request has ended (its response sent or failed),
    # with the final status, in the order added. A layer that only needs to see a request end
    # (metering) adds one instead of wrapping the rest of the stack. Failures are logged.
    on_end: list[Callable[[RequestContext], object]] | None = None  # results ignored
    # Free room for operators' custom layers, like Starlette's `request.state`.
    state: dict[str, Any] = field(default_factory=dict)
    # Set by the kernel when it left the body unparsed for the layer that checks the caller
    # (`loads_body`, gateway/layers.py): until `parse_body` ran, `body` is {}, `model` "" and
    # `stream` False (`raw_body` is read).
    body_parser: Callable[[RequestContext], None] | None = None

    def at_end(self, hook: Callable[[RequestContext], object]) -> None:
        """Adds `hook` to `on_end`: the kernel calls it once the request has ended."""
        if self.on_end is None:
            self.on_end = [hook]
        else:
            self.on_end.append(hook)

    def parse_body(self) -> None:
        """Parses and checks the request body the kernel left unparsed (`body_parser`),
        filling in `body`, `model` and `stream`; raises the GatewayError (400, 404) a bad
        body gets. Does nothing when the body has been parsed."""
        parser, self.body_parser = self.body_parser, None
        if parser is not None:
            parser(self)


class ScopePrincipal(TypedDict):
    """The verified caller of a request without a context (written by the auth layer)."""

    key_id: str
    project: str
    allowed_models: tuple[str, ...]  # names or globs; empty: every model


Scope = MutableMapping[str, Any]


def request_context(scope: Scope) -> RequestContext:
    """The context of an API request; a KeyError means the layer sits outside the kernel."""
    ctx: RequestContext = scope[CONTEXT_KEY]
    return ctx


def route_to(ctx: RequestContext, model: str) -> None:
    """Sends the request to another public model (a quota downgrade, a fallback model)."""
    ctx.model = model
    ctx.body["model"] = model
    ctx.deployment = None
    ctx.provider_key = None


class Rerouted(Exception):
    """Raised by a layer that sent the request to `model` (`route_to`) instead of calling the
    layers below, when a layer above routes every call (`RequestContext.reroutable`): nothing
    was sent, and that layer calls again with a deployment of `model` it chose."""

    def __init__(self, model: str) -> None:
        super().__init__(f"the request goes to model {model!r}")
        self.model = model


def find_request_context(scope: Scope) -> RequestContext | None:
    """The context, or None for requests the kernel answers itself (health, models)."""
    return scope.get(CONTEXT_KEY)
