"""Requests that cross from one provider's API to another's, through the gateway.

Each test sends what a client of one API may send and asserts what reaches the mock of the
other provider, whose validation follows the real provider's (the source is cited where the
mock refuses). What the other provider cannot take becomes a 400 in the caller's shape,
said by the gateway before any provider call.
"""
from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from gateway import create_app
from gateway.tokens import estimate_messages
from tests.harness import TEST_KEY, ThreadedServer, mock_config, write_config
from tests.mock_providers import MockProviderServer
from tests.mock_providers.behaviour import embed

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object",
                                          "properties": {"city": {"type": "string"}}}}}
EXTRA_MODELS = """
models["claude-45-mock"] = [Deployment("anthropic", "claude-sonnet-4-5-20250929", price=MOCK_PRICE)]
models["gemini-25-mock"] = [Deployment("gemini", "gemini-2.5-flash", price=MOCK_PRICE)]
models["gemini-named-mock"] = [Deployment("gemini", "models/gemini-2.5-flash", price=MOCK_PRICE)]
models["gemini-named-embed"] = [Deployment("gemini", "models/text-embedding-004",
                                           price=MOCK_PRICE)]
providers["mistral"] = Provider("mistral", base_url=MOCK + "/mistral/v1",
                                api_key_env="MOCK_PROVIDER_KEY", timeouts=fast)
models["mistral-mock"] = [Deployment("mistral", "mistral-small-latest", price=MOCK_PRICE)]
providers["azure-2024-02"] = Provider("azure", base_url=MOCK + "/azure", api_version="2024-02-01",
                                      api_key_env="MOCK_PROVIDER_KEY", timeouts=fast)
models["azure-2024-02-mock"] = [Deployment("azure-2024-02", "my-gpt-deployment", price=MOCK_PRICE)]
"""


@pytest.fixture(scope="module")
def cross_gateway(tmp_path_factory: pytest.TempPathFactory,
                  mock_url: str) -> Iterator[ThreadedServer]:
    """A gateway without layers (nothing cached between tests): the default mock models,
    `claude-45-mock` (Claude Sonnet 4.5), `gemini-25-mock` (Gemini 2.5 Flash; the default
    `gemini-mock` is Gemini 2.0 Flash; `gemini-named-mock` and `gemini-named-embed` name
    their Gemini models by resource name), `mistral-mock` (the Mistral preset) and
    `azure-2024-02-mock` (Azure, API version 2024-02-01; `azure-mock` has the default)."""
    config = write_config(tmp_path_factory.mktemp("cross"),
                          mock_config(mock_url, middleware="none", extra=EXTRA_MODELS))
    with ThreadedServer(create_app(config)) as server:
        yield server


def oai(server: ThreadedServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=TEST_KEY, max_retries=0)


def claude(server: ThreadedServer) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key=TEST_KEY, max_retries=0)


def last_request(mock: MockProviderServer, provider: str) -> dict[str, Any]:
    seen = [r for r in mock.requests if r["provider"] == provider]
    assert seen, f"no request reached the {provider} mock"
    return seen[-1]["json"]  # type: ignore[no-any-return]


def tool_history(call_id: str = "call_abc123") -> list[dict[str, Any]]:
    return [{"role": "user", "content": "Weather in Paris please"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": call_id, "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": call_id, "content": "sunny and 22C"}]


# -- a tool history without `tools` ----------------------------------------------------------

def test_a_tool_history_without_tools_reaches_anthropic_with_its_tools_declared_unusable(
        cross_gateway: ThreadedServer, mock: MockProviderServer) -> None:
    """OpenAI takes past tool calls without `tools` (a summarising turn, say); Anthropic
    refuses tool blocks without tool definitions. The tools the history called are declared,
    with `tool_choice` none: the model cannot call them, as it could not on OpenAI."""
    reply = oai(cross_gateway).chat.completions.create(model="claude-mock",
                                                       messages=tool_history())
    assert reply.choices[0].message.content == "Tool result received: sunny and 22C"
    sent = last_request(mock, "anthropic")
    assert sent["tools"] == [{"name": "get_weather",
                              "input_schema": {"type": "object", "properties": {}}}]
    assert sent["tool_choice"] == {"type": "none"}


# -- whitespace OpenAI takes and Anthropic refuses -------------------------------------------

def test_a_prefill_ending_in_whitespace_reaches_anthropic_without_it(
        cross_gateway: ThreadedServer, mock: MockProviderServer) -> None:
    """OpenAI takes a final assistant message ending in whitespace; Anthropic refuses it
    (the mock as the API: "final assistant content cannot end with trailing whitespace")."""
    reply = oai(cross_gateway).chat.completions.create(model="claude-mock", messages=[
        {"role": "user", "content": "Write a haiku"}, {"role": "assistant", "content": "Sure: "}])
    assert reply.choices[0].message.content == "Mock reply to: Write a haiku"
    assert last_request(mock, "anthropic")["messages"][-1] == {
        "role": "assistant", "content": [{"type": "text", "text": "Sure:"}]}


def test_text_of_whitespace_only_never_reaches_anthropic(
        cross_gateway: ThreadedServer, mock: MockProviderServer) -> None:
    """OpenAI takes a text part of whitespace only; Anthropic refuses the text block (the
    mock as the API: "text content blocks must contain non-whitespace text")."""
    reply = oai(cross_gateway).chat.completions.create(model="claude-mock", messages=[
        {"role": "user", "content": [{"type": "text", "text": "Look:"},
                                     {"type": "text", "text": "\n"}]},
        {"role": "assistant", "content": " "}, {"role": "user", "content": "Hello"}])
    assert reply.choices[0].message.content == "Mock reply to: Look: Hello"
    assert last_request(mock, "anthropic")["messages"] == [{"role": "user", "content": [
        {"type": "text", "text": "Look:"}, {"type": "text", "text": "Hello"}]}]


def test_a_request_of_whitespace_only_is_a_400_before_anthropic(
        cross_gateway: ThreadedServer, mock: MockProviderServer) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        oai(cross_gateway).chat.completions.create(
            model="claude-mock", messages=[{"role": "user", "content": "\n"}])
    assert refused.value.body == {  # type: ignore[comparison-overlap]
        "message": "The request cannot be sent to this model: Anthropic models need at least "
                   "one user or assistant message with content that is not only whitespace.",
        "type": "invalid_request_error", "param": "messages", "code": None}
    assert mock.requests == []


# -- temperature and top_p together ----------------------------------------------------------

@pytest.mark.parametrize(("sampling", "sent"), [
    ({"temperature": 0.2, "top_p": 0.9}, {"temperature": 0.2}),
    ({"temperature": 1, "top_p": 0.9}, {"top_p": 0.9}),  # 1: both APIs' default temperature
    ({"temperature": 1.5, "top_p": 1}, {"temperature": 1.0}),
    ({"top_p": 0.5}, {"top_p": 0.5}),
])
def test_claude_45_gets_temperature_or_top_p_never_both(
        cross_gateway: ThreadedServer, mock: MockProviderServer, sampling: dict[str, float],
        sent: dict[str, float]) -> None:
    """OpenAI clients often send both (some SDKs fill in defaults); Claude 4.5 models refuse
    the pair. The temperature is what Anthropic suggests changing, unless it is the default."""
    reply = oai(cross_gateway).chat.completions.create(
        model="claude-45-mock", messages=[{"role": "user", "content": "Hello"}], **sampling)
    assert reply.choices[0].message.content == "Mock reply to: Hello"
    body = last_request(mock, "anthropic")
    assert {key: body[key] for key in ("temperature", "top_p") if key in body} == sent


# -- stop sequences --------------------------------------------------------------------------

FIVE_STOPS = ["one", "two", "three", "four", "five"]
SIX_STOPS = [*FIVE_STOPS, "six"]


@pytest.mark.parametrize(("model", "stops", "limit"), [
    ("gpt-mock", FIVE_STOPS, "OpenAI models take at most 4 stop sequences; this request has 5"),
    ("azure-mock", FIVE_STOPS, "OpenAI models take at most 4 stop sequences; this request has 5"),
    ("gemini-mock", SIX_STOPS, "Gemini models take at most 5 stop sequences; this request has 6"),
])
def test_more_stop_sequences_than_the_provider_takes_are_a_400_in_anthropic_shape(
        cross_gateway: ThreadedServer, mock: MockProviderServer, model: str, stops: list[str],
        limit: str) -> None:
    """Anthropic sets no such limit; OpenAI's `stop` takes 4, Gemini's `stopSequences` 5.
    Dropping some would let the model write past where the caller wanted it to stop."""
    with pytest.raises(anthropic.BadRequestError) as refused:
        claude(cross_gateway).messages.create(
            model=model, max_tokens=50, stop_sequences=stops,
            messages=[{"role": "user", "content": "Hello"}])
    assert refused.value.status_code == 400
    assert refused.value.body == {"type": "error", "error": {  # type: ignore[comparison-overlap]
        "type": "invalid_request_error",
        "message": f"The request cannot be sent to this model: {limit}."}}
    assert mock.requests == []  # refused before any provider call


def test_six_stop_sequences_from_an_openai_client_are_a_400_before_gemini(
        cross_gateway: ThreadedServer, mock: MockProviderServer) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        oai(cross_gateway).chat.completions.create(
            model="gemini-mock", stop=SIX_STOPS, messages=[{"role": "user", "content": "Hi"}])
    assert refused.value.body == {  # type: ignore[comparison-overlap]
        "message": "The request cannot be sent to this model: Gemini models take at most 5 "
                   "stop sequences; this request has 6.",
        "type": "invalid_request_error", "param": "stop", "code": None}
    assert mock.requests == []


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
@pytest.mark.parametrize("model", ["gpt-mock", "azure-mock"])
@pytest.mark.parametrize("stream", [False, True])
def test_five_stop_sequences_from_an_openai_client_are_the_gateways_400_before_openai(
        cross_gateway: ThreadedServer, mock: MockProviderServer, endpoint: str, model: str,
        stream: bool) -> None:
    """The same refusal as for a translated request: said by the gateway, before any
    provider call, so that a model's other deployments may still take the request; its
    `param` is the one OpenAI's own refusal names. `/v1/completions` takes "up to 4
    sequences" too (OpenAI's completions reference)."""
    client = oai(cross_gateway)
    with pytest.raises(openai.BadRequestError) as refused:
        if endpoint == "chat":
            client.chat.completions.create(model=model, stop=FIVE_STOPS, stream=stream,
                                           messages=[{"role": "user", "content": "Hi"}])
        else:
            client.completions.create(model=model, prompt="Hi", stop=FIVE_STOPS,
                                      stream=stream)
    assert refused.value.status_code == 400
    assert refused.value.body == {  # type: ignore[comparison-overlap]
        "message": "The request cannot be sent to this model: OpenAI models take at most 4 "
                   "stop sequences; this request has 5.",
        "type": "invalid_request_error", "param": "stop", "code": None}
    assert mock.requests == []


def test_five_stop_sequences_reach_an_openai_compatible_server_that_sets_no_limit(
        cross_gateway: ThreadedServer, mock: MockProviderServer) -> None:
    reply = oai(cross_gateway).chat.completions.create(
        model="mistral-mock", stop=FIVE_STOPS, messages=[{"role": "user", "content": "Hi"}])
    assert reply.choices[0].message.content == "Mock reply to: Hi"
    assert last_request(mock, "mistral")["stop"] == FIVE_STOPS


def stops_gateway(tmp_path: Path, a: MockProviderServer, b: MockProviderServer, *,
                  anthropic_first: bool) -> ThreadedServer:
    """A gateway whose model `stops` is an OpenAI deployment (on `a`) and an Anthropic one
    (on `b`), tried in the order asked, once each."""
    openai_one = 'Deployment("openai", "gpt-4o", price=MOCK_PRICE)'
    anthropic_one = 'Deployment("b", "claude-3-5-haiku-latest", price=MOCK_PRICE)'
    order = [anthropic_one, openai_one] if anthropic_first else [openai_one, anthropic_one]
    text = mock_config(a.url, middleware="none", extra=f"""
from middleware.failover import Route
providers["b"] = Provider("anthropic", base_url="{b.base_url("anthropic")}",
                          api_key_env="MOCK_PROVIDER_KEY", timeouts=fast)
models["stops"] = [{", ".join(order)}]
middleware = [Middleware(FailoverMiddleware, retry=RetryPolicy(max_attempts=1),
                         routes={{"stops": Route(strategy="priority")}})]
""")
    return ThreadedServer(create_app(write_config(tmp_path, text)))


def test_five_stop_sequences_go_to_the_deployment_that_takes_them(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer) -> None:
    """[OpenAI, Anthropic] by priority: OpenAI's deployment cannot take the request, so
    Anthropic's serves it, every time, as it would serve an Anthropic client's."""
    with stops_gateway(tmp_path, a, b, anthropic_first=False) as gateway:
        raw = oai(gateway).chat.completions.with_raw_response.create(
            model="stops", stop=FIVE_STOPS, messages=[{"role": "user", "content": "Hi"}])
    assert raw.parse().choices[0].message.content == "Mock reply to: Hi"
    assert raw.headers["x-sluicegate-deployment"] == "b/claude-3-5-haiku-latest"
    assert raw.headers["x-sluicegate-attempts"] == "1"
    assert a.requests == []
    assert [entry["json"]["stop_sequences"] for entry in b.requests] == [FIVE_STOPS]


@pytest.mark.parametrize("stream", [False, True])
def test_a_whitespace_stop_sequence_is_the_gateways_400_before_anthropic(
        cross_gateway: ThreadedServer, mock: MockProviderServer, stream: bool) -> None:
    """OpenAI takes `stop: ["\\n"]`; Anthropic refuses a stop sequence of whitespace only
    (the mock as the API: "each stop sequence must contain non-whitespace")."""
    with pytest.raises(openai.BadRequestError) as refused:
        oai(cross_gateway).chat.completions.create(
            model="claude-mock", stop=["\n", "END"], stream=stream,
            messages=[{"role": "user", "content": "Hi"}])
    assert refused.value.status_code == 400
    assert refused.value.body == {  # type: ignore[comparison-overlap]
        "message": "The request cannot be sent to this model: Anthropic models take no stop "
                   "sequence that is only whitespace or empty, such as '\\n'.",
        "type": "invalid_request_error", "param": "stop", "code": None}
    assert mock.requests == []


def test_a_whitespace_stop_sequence_goes_to_the_deployment_that_takes_it(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer) -> None:
    """[Anthropic, OpenAI] by priority: Anthropic's deployment cannot take the request, so
    OpenAI's serves it, with the stop sequence."""
    with stops_gateway(tmp_path, a, b, anthropic_first=True) as gateway:
        raw = oai(gateway).chat.completions.with_raw_response.create(
            model="stops", stop=["\n"], messages=[{"role": "user", "content": "Hi"}])
    assert raw.parse().choices[0].message.content == "Mock reply to: Hi"
    assert raw.headers["x-sluicegate-deployment"] == "openai/gpt-4o"
    assert b.requests == []
    assert [entry["json"]["stop"] for entry in a.requests] == [["\n"]]


@pytest.mark.parametrize(("model", "stops"), [("gpt-mock", FIVE_STOPS[:4]),
                                              ("gemini-mock", FIVE_STOPS)])
def test_as_many_stop_sequences_as_the_provider_takes_all_reach_it(
        cross_gateway: ThreadedServer, mock: MockProviderServer, model: str,
        stops: list[str]) -> None:
    message = claude(cross_gateway).messages.create(
        model=model, max_tokens=50, stop_sequences=stops,
        messages=[{"role": "user", "content": "Hello"}])
    assert message.content[0].text == "Mock reply to: Hello"  # type: ignore[union-attr]
    body = last_request(mock, "openai" if model == "gpt-mock" else "gemini")
    assert (body.get("stop") or body["generationConfig"]["stopSequences"]) == stops


# -- reasoning_effort ------------------------------------------------------------------------

def test_an_openai_callers_reasoning_effort_reaches_gemini_25_as_a_thinking_budget(
        cross_gateway: ThreadedServer, mock: MockProviderServer) -> None:
    reply = oai(cross_gateway).chat.completions.create(
        model="gemini-25-mock", reasoning_effort="medium",
        messages=[{"role": "user", "content": "Hello"}])
    assert reply.choices[0].message.content == "Mock reply to: Hello"
    assert last_request(mock, "gemini")["generationConfig"]["thinkingConfig"] == {
        "thinkingBudget": 8192}


def test_an_unknown_reasoning_effort_is_a_400_before_gemini(
        cross_gateway: ThreadedServer, mock: MockProviderServer) -> None:
    calls = len(mock.requests)
    with pytest.raises(openai.BadRequestError, match="reasoning_effort 'maximum'"):
        oai(cross_gateway).chat.completions.create(
            model="gemini-25-mock", reasoning_effort="maximum",  # type: ignore[arg-type]
            messages=[{"role": "user", "content": "Hello"}])
    assert len(mock.requests) == calls


# -- top_k -----------------------------------------------------------------------------------

def test_an_anthropic_callers_top_k_reaches_gemini_as_top_k(
        cross_gateway: ThreadedServer, mock: MockProviderServer) -> None:
    message = claude(cross_gateway).messages.create(
        model="gemini-mock", max_tokens=50, extra_body={"top_k": 5},
        messages=[{"role": "user", "content": "Hello"}])
    assert message.content[0].text == "Mock reply to: Hello"  # type: ignore[union-attr]
    assert last_request(mock, "gemini")["generationConfig"]["topK"] == 5


def test_a_gemini_model_named_by_its_resource_name_is_called_at_its_path(
        cross_gateway: ThreadedServer, mock: MockProviderServer) -> None:
    """`models/gemini-2.5-flash` is the path's `{model=models/*}` as it is: the method
    follows it (https://ai.google.dev/api/generate-content), never a second `models/`."""
    answer = oai(cross_gateway).chat.completions.create(
        model="gemini-named-mock", messages=[{"role": "user", "content": "Hello"}])
    assert answer.choices[0].message.content == "Mock reply to: Hello"
    streamed = oai(cross_gateway).chat.completions.create(
        model="gemini-named-mock", messages=[{"role": "user", "content": "Hello"}], stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in streamed
                   if chunk.choices) == "Mock reply to: Hello"
    counted = claude(cross_gateway).messages.count_tokens(
        model="gemini-named-mock", messages=[{"role": "user", "content": "Hello"}])
    embedded = oai(cross_gateway).embeddings.create(model="gemini-named-embed", input="Hello")
    assert counted.input_tokens > 0 and embedded.data[0].embedding == embed("Hello")
    calls = [(request["path"], request["json"]) for request in mock.requests
             if request["path"].startswith("/gemini/")]
    assert [path for path, _ in calls] == [
        "/gemini/v1beta/models/gemini-2.5-flash:generateContent",
        "/gemini/v1beta/models/gemini-2.5-flash:streamGenerateContent",
        "/gemini/v1beta/models/gemini-2.5-flash:countTokens",
        "/gemini/v1beta/models/text-embedding-004:batchEmbedContents"]
    assert calls[2][1]["generateContentRequest"]["model"] == "models/gemini-2.5-flash"
    assert calls[3][1]["requests"][0]["model"] == "models/text-embedding-004"


@pytest.mark.parametrize(("model", "provider"), [("gpt-mock", "openai"),
                                                 ("azure-mock", "azure")])
def test_an_anthropic_callers_top_k_never_reaches_openai_or_azure(
        cross_gateway: ThreadedServer, mock: MockProviderServer, model: str,
        provider: str) -> None:
    """OpenAI's and Azure's chat APIs have no top_k (an argument they do not know is their
    400); the translation drops it."""
    message = claude(cross_gateway).messages.create(
        model=model, max_tokens=50, extra_body={"top_k": 5},
        messages=[{"role": "user", "content": "Hello"}])
    assert message.content[0].text == "Mock reply to: Hello"  # type: ignore[union-attr]
    assert "top_k" not in last_request(mock, provider)


def test_a_top_k_that_is_no_integer_is_a_400_naming_it(cross_gateway: ThreadedServer,
                                                       mock: MockProviderServer) -> None:
    with pytest.raises(anthropic.BadRequestError) as refused:
        claude(cross_gateway).messages.create(
            model="gemini-mock", max_tokens=50, messages=[{"role": "user", "content": "Hi"}],
            extra_body={"top_k": "5"})
    assert refused.value.body == {"type": "error", "error": {  # type: ignore[comparison-overlap]
        "type": "invalid_request_error",
        "message": "The request cannot be sent to this model: Invalid type for 'top_k': "
                   "expected an integer, but got a string instead."}}
    assert mock.requests == []


# -- image URLs to Gemini --------------------------------------------------------------------

PHOTO_URL = "https://upload.wikimedia.org/wikipedia/commons/4/4d/Cat_November_2010-1a.jpg"


def describe(url: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "text", "text": "Describe this"},
                                         {"type": "image_url", "image_url": {"url": url}}]}]


@pytest.mark.parametrize("url", [PHOTO_URL, "https://example.com/cat.png?size=2"])
def test_gemini_25_fetches_an_image_url_itself(cross_gateway: ThreadedServer,
                                               mock: MockProviderServer, url: str) -> None:
    reply = oai(cross_gateway).chat.completions.create(model="gemini-25-mock",
                                                       messages=describe(url))
    assert reply.choices[0].message.content == "Mock reply to: Describe this [1 image]"
    parts = last_request(mock, "gemini")["contents"][0]["parts"]
    mime = "image/jpeg" if url == PHOTO_URL else "image/png"
    assert parts[1] == {"fileData": {"mimeType": mime, "fileUri": url}}


def test_an_image_url_for_gemini_20_is_a_400_that_says_what_works(
        cross_gateway: ThreadedServer, mock: MockProviderServer) -> None:
    """Gemini 2.0 models fetch only Files API and YouTube URIs."""
    with pytest.raises(openai.BadRequestError) as refused:
        oai(cross_gateway).chat.completions.create(model="gemini-mock",
                                                   messages=describe(PHOTO_URL))
    assert refused.value.body == {  # type: ignore[comparison-overlap]
        "message": "The request cannot be sent to this model: Gemini 2.0 models do not fetch "
                   "images from URLs; send the image inline as a base64 data: URL.",
        "type": "invalid_request_error", "param": None, "code": None}
    assert mock.requests == []


def test_a_files_api_uri_still_reaches_gemini_20(cross_gateway: ThreadedServer,
                                                 mock: MockProviderServer) -> None:
    uri = "https://generativelanguage.googleapis.com/v1beta/files/abc-123"
    reply = oai(cross_gateway).chat.completions.create(model="gemini-mock", messages=describe(uri))
    assert reply.choices[0].message.content == "Mock reply to: Describe this [1 image]"
    assert last_request(mock, "gemini")["contents"][0]["parts"][1]["fileData"]["fileUri"] == uri


# -- stream_options ----------------------------------------------------------------------------

QUESTION = [{"role": "user", "content": "What is the capital of France"}]
REPLY = "Mock reply to: What is the capital of France"


@pytest.mark.parametrize("model", ["mistral-mock", "azure-2024-02-mock"])
@pytest.mark.parametrize("client_asks", [False, True])
def test_providers_that_refuse_stream_options_never_get_them(
        cross_gateway: ThreadedServer, mock: MockProviderServer, model: str,
        client_asks: bool) -> None:
    """The gateway asks OpenAI-family streams for their usage chunk; Mistral refuses the
    field (422, openai/openai-agents-python#442) and sends the usage anyway, on its last
    chunk; Azure refuses it before API version 2024-10-21. Neither gets it, even from the
    client."""
    extra: dict[str, Any] = {"stream_options": {"include_usage": True}} if client_asks else {}
    chunks = list(oai(cross_gateway).chat.completions.create(
        model=model, stream=True, messages=QUESTION, **extra))  # type: ignore[call-overload]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == REPLY
    provider = "mistral" if model == "mistral-mock" else "azure"
    assert "stream_options" not in last_request(mock, provider)
    usages = [c.usage for c in chunks if c.usage is not None]
    if provider == "mistral":  # Mistral's own usage, on the finish chunk
        assert [u.completion_tokens for u in usages] == [len(REPLY.split())]
    else:
        assert usages == []


def test_a_stream_that_finished_without_usage_is_billed_what_it_delivered(
        cross_gateway: ThreadedServer, mock: MockProviderServer) -> None:
    """Azure before 2024-10-21 sends no usage in a stream: it is billed the estimate a stream
    cut short gets (its input estimated, one output token per content delta: not the role
    chunk's nor the finish chunk's), not nothing."""
    def tokens(direction: str) -> float:
        text = httpx.get(cross_gateway.url + "/metrics").text
        found = re.search(r'^sluicegate_tokens_total\{[^}]*model="azure-2024-02-mock"[^}]*'
                          rf'direction="{direction}"[^}}]*\}} (\S+)$', text, re.MULTILINE)
        return float(found.group(1)) if found else 0.0

    before = (tokens("input"), tokens("output"))
    chunks = list(oai(cross_gateway).chat.completions.create(
        model="azure-2024-02-mock", stream=True, messages=QUESTION))
    deltas = sum(1 for c in chunks if c.choices and c.choices[0].delta.content)
    deadline = time.monotonic() + 5
    while tokens("output") == before[1] and time.monotonic() < deadline:
        time.sleep(0.01)  # (counted just after the last byte went out)
    assert tokens("output") - before[1] == deltas > 0
    assert tokens("input") - before[0] == estimate_messages(QUESTION)


def test_an_anthropic_stream_from_mistral_has_its_usage(
        cross_gateway: ThreadedServer, mock: MockProviderServer) -> None:
    with claude(cross_gateway).messages.stream(model="mistral-mock", max_tokens=100,
                                               messages=QUESTION) as stream:
        text = "".join(stream.text_stream)
        message = stream.get_final_message()
    assert text == REPLY
    assert message.usage.output_tokens == len(REPLY.split())
    assert "stream_options" not in last_request(mock, "mistral")


@pytest.mark.parametrize(("model", "provider"), [("gpt-mock", "openai"),
                                                 ("azure-mock", "azure")])
def test_openai_and_current_azure_are_still_asked_for_the_usage_chunk(
        cross_gateway: ThreadedServer, mock: MockProviderServer, model: str,
        provider: str) -> None:
    chunks = list(oai(cross_gateway).chat.completions.create(model=model, stream=True,
                                                             messages=QUESTION))
    assert last_request(mock, provider)["stream_options"] == {"include_usage": True}
    assert all(c.usage is None for c in chunks)  # (the client did not ask for it)


# -- tool-call ids -----------------------------------------------------------------------------

def test_tool_call_ids_anthropic_would_refuse_are_mapped_alike_in_call_and_result(
        cross_gateway: ThreadedServer, mock: MockProviderServer) -> None:
    """Anthropic takes tool ids matching ^[a-zA-Z0-9_-]+$; other providers' ids need not
    (Kimi's are like `functions.get_weather:0`). The same id becomes the same valid id in
    the assistant's tool_use and in the tool_result, and again on the next request."""
    sent = []
    for _ in range(2):
        reply = oai(cross_gateway).chat.completions.create(
            model="claude-mock", tools=[WEATHER_TOOL],
            messages=tool_history("functions.get_weather:0"))
        assert reply.choices[0].message.content == "Tool result received: sunny and 22C"
        turns = last_request(mock, "anthropic")["messages"]
        use, result = turns[1]["content"][0], turns[2]["content"][0]
        assert use["id"] == result["tool_use_id"]
        assert re.fullmatch(r"[a-zA-Z0-9_-]+", use["id"])
        sent.append(use["id"])
    assert sent[0] == sent[1]


def test_valid_tool_call_ids_reach_anthropic_unchanged(
        cross_gateway: ThreadedServer, mock: MockProviderServer) -> None:
    oai(cross_gateway).chat.completions.create(model="claude-mock", tools=[WEATHER_TOOL],
                                               messages=tool_history("call_abc-123"))
    turns = last_request(mock, "anthropic")["messages"]
    assert turns[1]["content"][0]["id"] == turns[2]["content"][0]["tool_use_id"] == \
        "call_abc-123"
