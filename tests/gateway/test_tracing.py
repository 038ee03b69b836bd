"""Traces: GenAI attributes on the request span and one child span per upstream attempt,
for chat, streams, embeddings and Anthropic messages, with the caller's traceparent."""
from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
from opentelemetry.trace import SpanKind

from gateway import create_app
from tests.harness import AUTH, TEST_KEY, ThreadedServer, mock_config, write_config
from tests.mock_providers import Fault, MockProviderServer
from tests.tracing_support import EXPORTER

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
SECRET_PROMPT = "the prompt must never be recorded 7a1c"


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory, mock_url: str) -> Iterator[ThreadedServer]:
    text = mock_config(mock_url, extra=(
        "from tests.tracing_support import PROVIDER\n"
        "settings = Settings(tracer_provider=PROVIDER)"))
    path = write_config(tmp_path_factory.mktemp("traced"), text)
    with ThreadedServer(create_app(path)) as server:
        yield server


@pytest.fixture
def spans() -> Iterator[Any]:
    EXPORTER.clear()
    yield EXPORTER
    EXPORTER.clear()


def server_spans(exporter: Any, count: int) -> list[Any]:
    """The request spans, once `count` have ended (the kernel ends one just after the last
    byte went out, so the client can be a moment ahead)."""
    deadline = time.monotonic() + 5
    while True:
        servers = [s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER]
        if len(servers) >= count or time.monotonic() > deadline:
            return servers
        time.sleep(0.01)


def request_span(exporter: Any) -> Any:
    servers = server_spans(exporter, 1)
    assert len(servers) == 1, [s.name for s in exporter.get_finished_spans()]
    return servers[0]


def children(exporter: Any, parent: Any) -> list[Any]:
    return [s for s in exporter.get_finished_spans()
            if s.parent is not None and s.parent.span_id == parent.context.span_id]


def assert_no_prompt(exporter: Any) -> None:
    for span in exporter.get_finished_spans():
        values = [str(v) for v in span.attributes.values()]
        values += [str(v) for event in span.events for v in event.attributes.values()]
        assert not any(SECRET_PROMPT in v for v in values), span.name


def test_chat_span_has_genai_attributes_and_follows_traceparent(
        traced: ThreadedServer, mock: MockProviderServer, spans: Any) -> None:
    sdk = openai.OpenAI(base_url=traced.url + "/v1", api_key=TEST_KEY, max_retries=0,
                        default_headers={"traceparent": TRACEPARENT})
    answer = sdk.chat.completions.create(model="gpt-mock", max_tokens=50, temperature=0.5,
                                         messages=[{"role": "user", "content": SECRET_PROMPT}])
    span = request_span(spans)
    assert span.name == "chat gpt-mock"
    assert format(span.context.trace_id, "032x") == TRACE_ID  # the caller's trace goes on
    attributes = span.attributes
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.request.model"] == "gpt-mock"
    assert attributes["gen_ai.response.model"] == "gpt-4o-mini"
    assert attributes["gen_ai.request.max_tokens"] == 50
    assert answer.usage is not None
    assert attributes["gen_ai.usage.input_tokens"] == answer.usage.prompt_tokens
    assert attributes["gen_ai.usage.output_tokens"] == answer.usage.completion_tokens
    assert list(attributes["gen_ai.response.finish_reasons"]) == ["stop"]
    (attempt,) = children(spans, span)
    assert attempt.kind == SpanKind.CLIENT
    assert attempt.name == "chat gpt-4o-mini"
    assert attempt.attributes["gen_ai.provider.name"] == "openai"
    assert attempt.attributes["server.address"] == "127.0.0.1"
    assert attempt.attributes["http.response.status_code"] == 200
    # The upstream got the attempt span's context.
    sent = mock.requests[-1]["headers"]["traceparent"]
    assert sent.split("-")[1] == TRACE_ID
    assert sent.split("-")[2] == format(attempt.context.span_id, "016x")
    assert_no_prompt(spans)


def test_stream_span_carries_usage(traced: ThreadedServer, mock: MockProviderServer,
                                   spans: Any) -> None:
    sdk = openai.OpenAI(base_url=traced.url + "/v1", api_key=TEST_KEY, max_retries=0)
    chunks = list(sdk.chat.completions.create(
        model="claude-mock", stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": SECRET_PROMPT}]))
    span = request_span(spans)
    assert span.attributes["sluicegate.stream"] is True
    usage = chunks[-1].usage
    assert usage is not None
    assert span.attributes["gen_ai.usage.input_tokens"] == usage.prompt_tokens
    assert span.attributes["gen_ai.usage.output_tokens"] == usage.completion_tokens
    (attempt,) = children(spans, span)
    assert attempt.attributes["gen_ai.provider.name"] == "anthropic"
    assert_no_prompt(spans)


def test_embeddings_span(traced: ThreadedServer, mock: MockProviderServer, spans: Any) -> None:
    sdk = openai.OpenAI(base_url=traced.url + "/v1", api_key=TEST_KEY, max_retries=0)
    result = sdk.embeddings.create(model="openai-embed", input=[SECRET_PROMPT, "two"])
    span = request_span(spans)
    assert span.name == "embeddings openai-embed"
    assert span.attributes["gen_ai.operation.name"] == "embeddings"
    assert span.attributes["gen_ai.usage.input_tokens"] == result.usage.prompt_tokens
    assert_no_prompt(spans)


def test_anthropic_messages_span(traced: ThreadedServer, mock: MockProviderServer,
                                 spans: Any) -> None:
    sdk = anthropic.Anthropic(base_url=traced.url, api_key=TEST_KEY, max_retries=0)
    message = sdk.messages.create(model="claude-mock", max_tokens=64,
                                  messages=[{"role": "user", "content": SECRET_PROMPT}])
    span = request_span(spans)
    assert span.attributes["gen_ai.operation.name"] == "chat"
    assert span.attributes["sluicegate.api_format"] == "anthropic"
    assert span.attributes["gen_ai.usage.output_tokens"] == message.usage.output_tokens
    assert list(span.attributes["gen_ai.response.finish_reasons"]) == ["end_turn"]
    (attempt,) = children(spans, span)
    assert attempt.attributes["gen_ai.provider.name"] == "anthropic"
    assert_no_prompt(spans)


@pytest.fixture
def snapshots(mock: MockProviderServer) -> Iterator[MockProviderServer]:
    """The mock answering as the live APIs do: with the snapshot an alias resolved to (Azure:
    the model behind the deployment), not the name asked for."""
    mock.config.update({"answered_models": {
        "gpt-4o-mini": "gpt-4o-mini-2024-07-18", "my-gpt-deployment": "gpt-4o-2024-08-06",
        "claude-3-5-haiku-latest": "claude-3-5-haiku-20241022"}})
    yield mock
    mock.config.update({"answered_models": None, "azure_prompt_filter_chunk": False})


def test_the_response_model_is_the_one_the_provider_says_answered(
        traced: ThreadedServer, snapshots: MockProviderServer, spans: Any) -> None:
    """gen_ai.response.model: "the name of the model that generated the response" (GenAI
    conventions), as the answer or the stream says it, translated or not; it was the
    deployment's configured name, and was set on a request no provider answered."""
    sdk = openai.OpenAI(base_url=traced.url + "/v1", api_key=TEST_KEY, max_retries=0)
    answer = sdk.chat.completions.create(model="gpt-mock", messages=[
        {"role": "user", "content": "which snapshot"}])
    assert answer.model == "gpt-4o-mini-2024-07-18"
    assert request_span(spans).attributes["gen_ai.response.model"] == answer.model
    spans.clear()
    snapshots.config.update({"azure_prompt_filter_chunk": True})  # (its model is "")
    chunks = list(sdk.chat.completions.create(model="azure-mock", stream=True, messages=[
        {"role": "user", "content": "which deployment"}]))
    assert chunks[-1].model == "gpt-4o-2024-08-06"
    assert request_span(spans).attributes["gen_ai.response.model"] == "gpt-4o-2024-08-06"
    spans.clear()
    claude = anthropic.Anthropic(base_url=traced.url, api_key=TEST_KEY, max_retries=0)
    with claude.messages.stream(model="claude-mock", max_tokens=64, messages=[
            {"role": "user", "content": "which claude"}]) as stream:
        message = stream.get_final_message()
    assert message.model == "claude-3-5-haiku-20241022"
    assert request_span(spans).attributes["gen_ai.response.model"] == message.model
    spans.clear()
    # Translated streams: the model the upstream's own events name, not the public name
    # the client's chunks carry.
    for model, answered in (("claude-mock", "claude-3-5-haiku-20241022"),
                            ("gemini-mock", "gemini-2.0-flash")):
        chunks = list(sdk.chat.completions.create(model=model, stream=True, messages=[
            {"role": "user", "content": "translated"}]))
        assert chunks[0].model == model
        assert request_span(spans).attributes["gen_ai.response.model"] == answered
        spans.clear()
    with claude.messages.stream(model="gpt-mock", max_tokens=64, messages=[
            {"role": "user", "content": "an OpenAI answer to Claude's SDK"}]) as stream:
        assert stream.get_final_message().model == "gpt-mock"
    assert request_span(spans).attributes["gen_ai.response.model"] == "gpt-4o-mini-2024-07-18"
    spans.clear()
    snapshots.push_fault(Fault("status", provider="openai", status=503))
    with pytest.raises(openai.InternalServerError):
        sdk.chat.completions.create(model="gpt-mock", messages=[
            {"role": "user", "content": "nobody answers"}])
    assert "gen_ai.response.model" not in request_span(spans).attributes


def test_failed_attempts_and_cache_hits_are_visible(
        traced: ThreadedServer, mock: MockProviderServer, spans: Any) -> None:
    mock.push_fault(Fault("status", provider="openai", status=503))
    response = httpx.post(traced.url + "/v1/chat/completions", headers=AUTH, json={
        "model": "gpt-mock", "messages": [{"role": "user", "content": "fails"}]})
    assert response.status_code == 503
    span = request_span(spans)
    assert span.status.status_code.name == "ERROR"
    (attempt,) = children(spans, span)
    assert attempt.attributes["http.response.status_code"] == 503
    assert attempt.status.status_code.name == "ERROR"
    spans.clear()
    for _ in range(2):
        httpx.post(traced.url + "/v1/chat/completions", headers=AUTH, json={
            "model": "gpt-mock", "temperature": 0,
            "messages": [{"role": "user", "content": "cache me for the trace"}]})
    hits = [s for s in server_spans(spans, 2) if s.attributes.get("sluicegate.cache") == "hit"]
    assert len(hits) == 1
    assert [e.name for e in hits[0].events] == ["sluicegate.cache.hit"]
    assert children(spans, hits[0]) == []  # no upstream call for a hit


def test_a_stream_that_ends_with_an_in_band_error_after_output_is_an_error_span(
        traced: ThreadedServer, mock: MockProviderServer, spans: Any) -> None:
    """The stream's status is 200, but it failed: both spans say so, as for a failed call
    before output (GenAI conventions: `error.type`, status ERROR)."""
    mock.push_fault(Fault("error_event", provider="openai", after_chunks=2))
    sdk = openai.OpenAI(base_url=traced.url + "/v1", api_key=TEST_KEY, max_retries=0)
    with pytest.raises(openai.APIError, match="failed mid-stream"):
        for _ in sdk.chat.completions.create(model="gpt-mock", stream=True, messages=[
                {"role": "user", "content": "fails after output"}]):
            pass
    span = request_span(spans)
    assert span.attributes["http.response.status_code"] == 200
    (attempt,) = children(spans, span)
    for failed in (span, attempt):
        assert failed.attributes["error.type"] == "server_error"
        assert failed.status.status_code.name == "ERROR"


def test_tracing_is_off_without_a_provider_or_otel_environment(
        tmp_path: Path, mock_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT",
                 "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    app = create_app(write_config(tmp_path, mock_config(mock_url)))
    assert app.tracing is None


@pytest.mark.parametrize(("service_name", "attributes", "expected"), [
    (None, "service.name=llm-gw-eu,deployment.environment=prod", "llm-gw-eu"),
    ("from-service-name", "service.name=llm-gw-eu,deployment.environment=prod",
     "from-service-name"),
    (None, "deployment.environment=prod", "sluicegate"),
])
def test_the_environment_names_the_service(
        tmp_path: Path, mock_url: str, monkeypatch: pytest.MonkeyPatch,
        service_name: str | None, attributes: str, expected: str) -> None:
    """OTEL_SERVICE_NAME, else service.name in OTEL_RESOURCE_ATTRIBUTES (the OTel
    environment variable spec), "sluicegate" when neither names one; "sluicegate" (or
    OTEL_SERVICE_NAME) overrode the service.name the attributes gave."""
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", attributes)
    if service_name is None:
        monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    else:
        monkeypatch.setenv("OTEL_SERVICE_NAME", service_name)
    app = create_app(write_config(tmp_path, mock_config(mock_url)))
    assert app.tracing is not None
    try:
        resource = app.tracing.provider.resource.attributes
        assert resource["service.name"] == expected
        assert resource["deployment.environment"] == "prod"
    finally:
        app.tracing.provider.shutdown()


def test_the_span_of_a_request_refused_before_its_body_was_parsed_names_no_model(
        traced: ThreadedServer, spans: Any) -> None:
    # Refused for its key, the body was never parsed: the span is named by the operation
    # alone (the GenAI conventions' name without a model), with no empty model attribute.
    response = httpx.post(traced.url + "/v1/chat/completions", json={
        "model": "gpt-mock", "messages": [{"role": "user", "content": SECRET_PROMPT}]})
    assert response.status_code == 401
    span = request_span(spans)
    assert span.name == "chat"
    assert "gen_ai.request.model" not in span.attributes
    assert span.attributes["gen_ai.operation.name"] == "chat"
    assert_no_prompt(spans)


def test_a_hedged_requests_span_has_the_answers_finish_reasons(
        tmp_path: Path, mock: MockProviderServer, mock_url: str, spans: Any) -> None:
    # A hedged route runs each call on a copy of the request's context; the finish reasons
    # the call read stayed on the copy, so the request span of every non-stream answer on a
    # hedged route had none, whether or not the hedge fired.
    text = mock_config(mock_url, extra=(
        "from middleware.failover import Route\n"
        "from tests.tracing_support import PROVIDER\n"
        "settings = Settings(tracer_provider=PROVIDER)\n"
        'models["hedged"] = [Deployment("openai", "gpt-4o-mini", price=MOCK_PRICE), '
        'Deployment("anthropic", "claude-3-5-haiku-latest", price=MOCK_PRICE)]\n'
        "middleware = [Middleware(AuthMiddleware, keys=[StaticKey('tests', "
        "key_env='SG_TEST_KEY')]), Middleware(FailoverMiddleware, routes={'hedged': "
        "Route(strategy='priority', hedge_after_s=0.2)}, breaker=NEVER_OPENS)]\n"))
    with ThreadedServer(create_app(write_config(tmp_path, text))) as server:
        sdk = openai.OpenAI(base_url=server.url + "/v1", api_key=TEST_KEY, max_retries=0)
        for hedged, reason in ((False, "stop"), (True, "end_turn")):
            spans.clear()
            if hedged:  # the first deployment answers late: the second one's answer wins
                mock.push_fault(Fault("slow_first_byte", provider="openai", delay_s=1.0))
            answer = sdk.chat.completions.create(
                model="hedged", messages=[{"role": "user", "content": "hi"}])
            assert answer.choices[0].finish_reason == "stop"
            span = request_span(spans)
            assert list(span.attributes["gen_ai.response.finish_reasons"]) == [reason]
