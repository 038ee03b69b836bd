"""OpenTelemetry traces following the GenAI semantic conventions (off unless configured).

Tracing is on when any of these holds, and otherwise costs the hot path one `is None` test:
- `Settings(tracer_provider=...)` gives a provider (a host app's, or a test's);
- the standard environment asks for an exporter: `OTEL_TRACES_EXPORTER` (otlp, console) or
  `OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (the gateway then
  builds an SDK provider with a batch processor, its resource from `OTEL_SERVICE_NAME` and
  `OTEL_RESOURCE_ATTRIBUTES`, "sluicegate" when they name no service;
  `OTEL_SDK_DISABLED=true` turns it off);
- the process already has a global SDK provider (set by the app the gateway is mounted in).

Per API request: a SERVER span named `{gen_ai.operation.name} {gen_ai.request.model}` whose
parent is the caller's W3C `traceparent`, with `gen_ai.*` attributes (operation, provider,
request model, the response model the provider reported, token usage, finish reasons) and
events for a cache hit, a quota refusal and a fallback; one CLIENT child span per upstream
attempt, whose context goes upstream in `traceparent`. Prompts and completions are never
recorded.
"""
from __future__ import annotations

import os
from collections.abc import MutableMapping
from typing import Any

from gateway.config import ConfigError
from gateway.context import (
    ANTHROPIC_COUNT_TOKENS,
    ANTHROPIC_MESSAGES,
    OPENAI_CHAT,
    OPENAI_COMPLETIONS,
    OPENAI_EMBEDDINGS,
    OPENAI_RESPONSES,
    RequestContext,
)
from gateway.pricing import CACHE_HITS

__all__ = ["RequestTrace", "Tracing", "tracing_from"]

_OPERATION_NAMES = {OPENAI_CHAT: "chat", ANTHROPIC_MESSAGES: "chat",
                    OPENAI_RESPONSES: "chat", OPENAI_COMPLETIONS: "text_completion",
                    OPENAI_EMBEDDINGS: "embeddings", ANTHROPIC_COUNT_TOKENS: "count_tokens"}
# Provider types -> gen_ai.provider.name well-known values (semconv registry).
_PROVIDER_NAMES = {"openai": "openai", "azure": "azure.ai.openai", "anthropic": "anthropic",
                   "gemini": "gcp.gemini", "groq": "groq", "deepseek": "deepseek",
                   "mistral": "mistral_ai", "xai": "x_ai"}


class Tracing:
    """The tracer and propagator a gateway uses; built once per app."""

    def __init__(self, provider: Any, *, owned: bool = False) -> None:
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.provider = provider
        self.owned = owned  # (built here from OTEL_*: its batch is flushed at shutdown)
        self.tracer = provider.get_tracer("sluicegate")
        self.propagator = TraceContextTextMapPropagator()

    def flush(self) -> None:
        """Exports the spans the provider built here still holds in its batch (a host's or
        a test's provider is its owner's to flush)."""
        if self.owned:
            self.provider.force_flush()

    def start(self, ctx: RequestContext) -> RequestTrace:
        from opentelemetry.trace import SpanKind

        carrier = {name.decode("latin-1"): value.decode("latin-1")
                   for name, value in ctx.headers
                   if name in (b"traceparent", b"tracestate")}
        parent = self.propagator.extract(carrier) if carrier else None
        operation = _OPERATION_NAMES.get(ctx.operation, ctx.operation)
        attributes: dict[str, Any] = {"gen_ai.operation.name": operation,
                                      "sluicegate.request_id": ctx.request_id,
                                      "sluicegate.api_format": ctx.api_format}
        if ctx.body_parser is None:  # (else the model is not known yet: `read_request`)
            attributes.update({"gen_ai.request.model": ctx.model, "sluicegate.stream": ctx.stream,
                               **_request_attributes(ctx.body)})
        span = self.tracer.start_span(
            f"{operation} {ctx.model}" if ctx.model else operation, context=parent,
            kind=SpanKind.SERVER, attributes=attributes)
        return RequestTrace(self, span, operation)


class RequestTrace:
    """One request's span; adapters open a child span per upstream attempt through it."""

    __slots__ = ("operation", "span", "tracing")

    def __init__(self, tracing: Tracing, span: Any, operation: str) -> None:
        self.tracing, self.span, self.operation = tracing, span, operation

    def read_request(self, ctx: RequestContext) -> None:
        """Names the span by the request's model once the body is parsed (it was started
        before: the body is parsed only once the caller is checked, `body_after_auth`)."""
        self.span.update_name(f"{self.operation} {ctx.model}")
        self.span.set_attributes({"gen_ai.request.model": ctx.model,
                                  "sluicegate.stream": ctx.stream,
                                  **_request_attributes(ctx.body)})

    @property
    def trace_id(self) -> str:
        return format(self.span.get_span_context().trace_id, "032x")

    def start_attempt(self, provider_type: str, provider: str, model: str, url: str,
                      headers: MutableMapping[str, str]) -> Any:
        """A CLIENT span for one upstream call; its context goes upstream in `headers`."""
        from opentelemetry import trace
        from opentelemetry.trace import SpanKind

        parent = trace.set_span_in_context(self.span)
        host, port = _server(url)
        span = self.tracing.tracer.start_span(
            f"{self.operation} {model}", context=parent, kind=SpanKind.CLIENT,
            attributes={"gen_ai.operation.name": self.operation,
                        "gen_ai.provider.name": _PROVIDER_NAMES.get(provider_type,
                                                                    provider_type),
                        "gen_ai.system": _PROVIDER_NAMES.get(provider_type, provider_type),
                        "gen_ai.request.model": model, "server.address": host,
                        "server.port": port, "sluicegate.provider": provider})
        self.tracing.propagator.inject(headers, context=trace.set_span_in_context(span))
        return span

    def end_attempt(self, span: Any, ctx: RequestContext, status: int,
                    error_type: str | None) -> None:
        from opentelemetry.trace import Status, StatusCode

        if status:
            span.set_attribute("http.response.status_code", status)
        if error_type:
            span.set_attribute("error.type", error_type)
            span.set_status(Status(StatusCode.ERROR, error_type))
        elif ctx.usage is not None:
            _usage_attributes(span, ctx)
        span.end()

    def end(self, ctx: RequestContext) -> None:
        from opentelemetry.trace import Status, StatusCode

        span = self.span
        span.set_attribute("http.response.status_code", ctx.status)
        if ctx.provider:
            span.set_attribute("sluicegate.provider", ctx.provider)
        if ctx.response_model:  # (GenAI conventions: the model that generated the response)
            span.set_attribute("gen_ai.response.model", ctx.response_model)
        if ctx.usage is not None:
            _usage_attributes(span, ctx)
        if ctx.cache_status:
            span.set_attribute("sluicegate.cache", ctx.cache_status)
            if ctx.cache_status in CACHE_HITS:
                span.add_event("sluicegate.cache.hit", {"sluicegate.cache": ctx.cache_status})
        refusal = ctx.state.get("quota.refused")
        if refusal:
            span.add_event("sluicegate.quota.refused", {"sluicegate.quota.limit": str(refusal)})
        if ctx.state.get("failover.fallbacks"):
            span.add_event("sluicegate.fallback", {"gen_ai.response.model": ctx.served_model
                                                   or "", "sluicegate.attempts":
                                                   len(ctx.attempts)})
        if ctx.client_disconnected:
            span.set_attribute("sluicegate.client_disconnected", True)
        if ctx.error_type:
            span.set_attribute("error.type", ctx.error_type)
        if ctx.status >= 500 or (ctx.error_type and ctx.status < 400):
            span.set_status(Status(StatusCode.ERROR, ctx.error_type or str(ctx.status)))
        span.end()


def _usage_attributes(span: Any, ctx: RequestContext) -> None:
    usage = ctx.usage
    assert usage is not None
    span.set_attribute("gen_ai.usage.input_tokens", usage.input_tokens)
    span.set_attribute("gen_ai.usage.output_tokens", usage.output_tokens)
    if ctx.finish_reasons:
        span.set_attribute("gen_ai.response.finish_reasons", list(ctx.finish_reasons))


def _request_attributes(body: dict[str, Any]) -> dict[str, Any]:
    """Request parameters worth a glance (never the prompt)."""
    attributes: dict[str, Any] = {}
    for field, name in (("max_tokens", "gen_ai.request.max_tokens"),
                        ("max_completion_tokens", "gen_ai.request.max_tokens"),
                        ("temperature", "gen_ai.request.temperature"),
                        ("top_p", "gen_ai.request.top_p")):
        value = body.get(field)
        if isinstance(value, int | float) and not isinstance(value, bool):
            attributes[name] = value
    return attributes


def _server(url: str) -> tuple[str, int]:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)


def tracing_from(provider: Any = None) -> Tracing | None:
    """The gateway's tracing (see the module docstring), or None when it is off."""
    if provider is not None:
        return Tracing(provider)
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return None
    exporter = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or \
        os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    wanted = (exporter and exporter != "none") or (endpoint and exporter != "none")
    try:
        from opentelemetry import trace
    except ImportError:
        if wanted:
            raise ConfigError("OTEL_* asks for traces, but opentelemetry-sdk is not "
                              "installed (pip install 'sluicegate[otel]').") from None
        return None
    current = trace.get_tracer_provider()
    if not isinstance(current, trace.ProxyTracerProvider):
        return Tracing(current)  # the host process set one up: use it
    if not wanted:
        return None
    return Tracing(_sdk_provider(exporter or "otlp"), owned=True)


def check_tracing(provider: Any = None) -> None:
    """Refuses what `tracing_from` would (OTEL_* asking for an exporter this cannot make),
    without making a provider or its exporter's thread: `check-config`, and `serve` before
    its workers start, give the one sentence the gateway would."""
    if provider is not None or os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return
    exporter = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or \
        os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if (exporter and exporter != "none") or (endpoint and exporter != "none"):
        _exporter_class(exporter or "otlp")


def _exporter_class(exporter: str) -> Any:
    """The span exporter class OTEL_TRACES_EXPORTER names (ConfigError: none here)."""
    try:
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter
    except ImportError:
        raise ConfigError("OTEL_* asks for traces, but opentelemetry-sdk is not installed "
                          "(pip install 'sluicegate[otel]').") from None
    if exporter == "console":
        return ConsoleSpanExporter
    if exporter == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:
            raise ConfigError("OTEL_TRACES_EXPORTER=otlp needs opentelemetry-exporter-otlp-"
                              "proto-http (pip install 'sluicegate[otel]').") from None
        return OTLPSpanExporter
    raise ConfigError(f"OTEL_TRACES_EXPORTER={exporter!r} is not supported here "
                      "(use otlp, console or none).")


def _sdk_provider(exporter: str) -> Any:
    span_exporter = _exporter_class(exporter)()  # (OTLP: endpoint, headers from OTEL_*)
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    provider = TracerProvider(resource=service_resource())
    provider.add_span_processor(BatchSpanProcessor(span_exporter))
    return provider


def service_resource() -> Any:
    """The resource as OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES say, its service.name
    "sluicegate" when neither names one (where the SDK would say "unknown_service:python",
    the fallback the resource semantic conventions give for an unnamed service)."""
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource

    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: "sluicegate"}))
    return resource
