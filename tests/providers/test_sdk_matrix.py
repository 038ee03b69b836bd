"""The official SDKs through the gateway, in every ingress -> provider combination.

OpenAI SDK (sync and async) and Anthropic SDK against the OpenAI, Azure, Anthropic and
Gemini mocks; content, tool calls, finish/stop reasons and usage are asserted exactly. The
mock's rules (tests/mock_providers): the reply is "Mock reply to: <last user text>"; a tool
call's arguments are built from the schema (string -> "test", integer -> 1); input tokens are
the words of all message texts plus 3 per message; output tokens are the reply's words.
"""
from __future__ import annotations

import json
from typing import Any

import anthropic
import httpx
import openai
import pytest

from tests.harness import TEST_KEY, ThreadedServer
from tests.mock_providers import MockProviderServer

CHAT_MODELS = ["gpt-mock", "azure-mock", "claude-mock", "gemini-mock"]
PROVIDER_OF = {"gpt-mock": "openai", "azure-mock": "azure", "claude-mock": "anthropic",
               "gemini-mock": "gemini"}
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "days": {"type": "integer"}},
                   "required": ["city"]}}}
ANTHROPIC_WEATHER_TOOL = {"name": "get_weather", "description": "Current weather in a city",
                          "input_schema": WEATHER_TOOL["function"]["parameters"]}
QUESTION = "What is the capital of France"  # 6 words + 3 = 9 input tokens
REPLY = "Mock reply to: " + QUESTION
REPLY_WORDS = len(REPLY.split())


def expected_input_tokens(model: str, words: int, messages: int, system: bool) -> int:
    """OpenAI-format providers see the system prompt as a message; the others as a field."""
    counted = messages + (1 if system and PROVIDER_OF[model] in ("openai", "azure") else 0)
    return words + 3 * counted


def oai(gateway: ThreadedServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=TEST_KEY,
                         max_retries=0)


def claude(gateway: ThreadedServer) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gateway.url, api_key=TEST_KEY,
                               max_retries=0)


def assert_provider_saw_only_its_key(mock: MockProviderServer, provider: str) -> None:
    seen = [r for r in mock.requests if r["provider"] == provider]
    assert seen, f"no request reached the {provider} mock"
    for request in seen:
        headers = request["headers"]
        assert "sk-client-not-forwarded" not in json.dumps(headers)
        key = {"openai": headers.get("authorization"), "azure": headers.get("api-key"),
               "anthropic": headers.get("x-api-key"),
               "gemini": headers.get("x-goog-api-key")}[provider]
        assert key in ("provider-secret-123456789", "Bearer provider-secret-123456789")


# -- OpenAI SDK -------------------------------------------------------------------------------

@pytest.mark.parametrize("model", CHAT_MODELS)
def test_openai_chat_non_stream(gateway: ThreadedServer, mock: MockProviderServer,
                                model: str) -> None:
    reply = oai(gateway).chat.completions.create(
        model=model, messages=[{"role": "system", "content": "Be brief"},
                               {"role": "user", "content": QUESTION}])
    choice = reply.choices[0]
    assert choice.message.content == REPLY
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "stop"
    assert reply.usage is not None
    assert reply.usage.completion_tokens == REPLY_WORDS
    assert reply.usage.prompt_tokens == expected_input_tokens(model, 2 + 6, 1, system=True)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + REPLY_WORDS
    assert_provider_saw_only_its_key(mock, PROVIDER_OF[model])


@pytest.mark.parametrize("model", CHAT_MODELS)
async def test_openai_async_chat_stream_with_tools(gateway: ThreadedServer,
                                                   mock: MockProviderServer, model: str) -> None:
    client = openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=TEST_KEY,
                                max_retries=0)
    stream = await client.chat.completions.create(
        model=model, stream=True, stream_options={"include_usage": True}, tools=[WEATHER_TOOL],
        tool_choice="auto", messages=[{"role": "user", "content": "Weather in Paris please"}])
    chunks = [chunk async for chunk in stream]
    await client.close()
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in chunks:
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for call in choice.delta.tool_calls or ():
                entry = calls.setdefault(call.index, {"id": "", "name": "", "arguments": ""})
                entry["id"] += call.id or ""
                entry["name"] += (call.function.name or "") if call.function else ""
                entry["arguments"] += (call.function.arguments or "") if call.function else ""
    assert finish == "tool_calls"
    assert list(calls) == [0]
    assert calls[0]["name"] == "get_weather" and calls[0]["id"]
    assert json.loads(calls[0]["arguments"]) == {"city": "test", "days": 1}
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert usage.prompt_tokens == expected_input_tokens(model, 4, 1, system=False)
    assert usage.completion_tokens >= 1
    # Translated streams carry the public name; passthrough bytes keep the upstream's model id.
    served = model if PROVIDER_OF[model] in ("anthropic", "gemini") else chunks[0].model
    assert all(c.model == served for c in chunks)


@pytest.mark.parametrize("model", CHAT_MODELS)
def test_openai_stream_text_without_usage_request(gateway: ThreadedServer, model: str) -> None:
    chunks = list(oai(gateway).chat.completions.create(
        model=model, stream=True, messages=[{"role": "user", "content": QUESTION}]))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == REPLY
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    # The gateway asked the provider for usage; the client did not, so it sees none.
    assert all(c.usage is None for c in chunks) and all(c.choices for c in chunks)


@pytest.mark.parametrize("model", CHAT_MODELS)
def test_openai_tool_result_round_trip(gateway: ThreadedServer, model: str) -> None:
    messages: list[dict[str, Any]] = [{"role": "user", "content": "Weather in Paris please"}]
    first = oai(gateway).chat.completions.create(model=model, messages=messages,
                                                 tools=[WEATHER_TOOL], tool_choice="required")
    call = first.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert first.choices[0].finish_reason == "tool_calls"
    assert json.loads(call.function.arguments) == {"city": "test", "days": 1}
    messages += [first.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "sunny and 22C"}]
    second = oai(gateway).chat.completions.create(model=model, messages=messages,
                                                  tools=[WEATHER_TOOL])
    assert second.choices[0].message.content == "Tool result received: sunny and 22C"
    assert second.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("model", CHAT_MODELS)
def test_openai_image_content_part(gateway: ThreadedServer, model: str) -> None:
    pixel = ("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4"
             "2mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==")
    reply = oai(gateway).chat.completions.create(model=model, messages=[{"role": "user", "content": [
        {"type": "text", "text": "Describe this"},
        {"type": "image_url", "image_url": {"url": pixel}}]}])
    assert reply.choices[0].message.content == "Mock reply to: Describe this [1 image]"


@pytest.mark.parametrize("model", ["openai-embed", "azure-embed", "gemini-embed"])
def test_openai_embeddings(gateway: ThreadedServer, model: str) -> None:
    client = oai(gateway)
    result = client.embeddings.create(model=model, input=["first text", "second text"])
    assert [d.index for d in result.data] == [0, 1]
    vectors = [d.embedding for d in result.data]
    assert all(len(v) == 8 for v in vectors)
    assert all(abs(sum(x * x for x in v) - 1.0) < 1e-3 for v in vectors)
    assert vectors[0] != vectors[1]
    again = client.embeddings.create(model=model, input="first text", encoding_format="float")
    assert again.data[0].embedding == pytest.approx(vectors[0], abs=1e-6)
    assert result.usage.prompt_tokens > 0


def test_openai_n_and_logprobs_pass_through(gateway: ThreadedServer) -> None:
    reply = oai(gateway).chat.completions.create(
        model="gpt-mock", n=2, logprobs=True,
        messages=[{"role": "user", "content": QUESTION}])
    assert [c.index for c in reply.choices] == [0, 1]
    assert reply.choices[0].logprobs is not None and reply.choices[0].logprobs.content


def test_openai_completions_and_responses(gateway: ThreadedServer) -> None:
    client = oai(gateway)
    completion = client.completions.create(model="gpt-mock", prompt="Say hi")
    assert completion.choices[0].text and completion.usage is not None
    streamed = list(client.completions.create(model="gpt-mock", prompt="Say hi", stream=True))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == completion.choices[0].text
    response = client.responses.create(model="gpt-mock", input="Say hi")
    assert response.output_text == "Mock reply to: Say hi"
    assert response.usage is not None and response.usage.output_tokens == 5
    with client.responses.stream(model="gpt-mock", input="Say hi") as events:
        final = events.get_final_response()
    assert final.output_text == "Mock reply to: Say hi"


# -- Anthropic SDK ----------------------------------------------------------------------------

@pytest.mark.parametrize("model", CHAT_MODELS)
def test_anthropic_messages_non_stream(gateway: ThreadedServer, mock: MockProviderServer,
                                       model: str) -> None:
    message = claude(gateway).messages.create(
        model=model, max_tokens=100, system="Be brief",
        messages=[{"role": "user", "content": QUESTION}])
    assert message.role == "assistant"
    assert [block.type for block in message.content] == ["text"]
    assert message.content[0].text == REPLY  # type: ignore[union-attr]
    assert message.stop_reason == "end_turn"
    assert message.usage.output_tokens == REPLY_WORDS
    assert message.usage.input_tokens == expected_input_tokens(model, 2 + 6, 1, system=True)
    assert_provider_saw_only_its_key(mock, PROVIDER_OF[model])


@pytest.mark.parametrize("model", CHAT_MODELS)
def test_anthropic_stream_with_tools(gateway: ThreadedServer, model: str) -> None:
    with claude(gateway).messages.stream(
            model=model, max_tokens=200, tools=[ANTHROPIC_WEATHER_TOOL],
            tool_choice={"type": "any"},
            messages=[{"role": "user", "content": "Weather in Paris please"}]) as stream:
        events = [event.type for event in stream]
        message = stream.get_final_message()
    assert message.stop_reason == "tool_use"
    tool_uses = [block for block in message.content if block.type == "tool_use"]
    assert len(tool_uses) == 1
    assert tool_uses[0].name == "get_weather" and tool_uses[0].id
    assert tool_uses[0].input == {"city": "test", "days": 1}
    assert message.usage.output_tokens >= 1
    assert "message_start" in events and "message_stop" in events


@pytest.mark.parametrize("model", CHAT_MODELS)
def test_anthropic_stream_text(gateway: ThreadedServer, model: str) -> None:
    with claude(gateway).messages.stream(
            model=model, max_tokens=100,
            messages=[{"role": "user", "content": QUESTION}]) as stream:
        text = "".join(stream.text_stream)
        message = stream.get_final_message()
    assert text == REPLY
    assert message.stop_reason == "end_turn"
    assert message.usage.output_tokens == REPLY_WORDS


@pytest.mark.parametrize("model", CHAT_MODELS)
def test_anthropic_tool_result_round_trip(gateway: ThreadedServer, model: str) -> None:
    client = claude(gateway)
    question = {"role": "user", "content": "Weather in Paris please"}
    first = client.messages.create(model=model, max_tokens=100, tools=[ANTHROPIC_WEATHER_TOOL],
                                   messages=[question])
    tool_use = next(block for block in first.content if block.type == "tool_use")
    second = client.messages.create(
        model=model, max_tokens=100, tools=[ANTHROPIC_WEATHER_TOOL],
        messages=[question, {"role": "assistant", "content": first.content},
                  {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool_use.id,
                                                "content": "sunny and 22C"}]}])
    assert second.content[0].text == "Tool result received: sunny and 22C"  # type: ignore[union-attr]


@pytest.mark.parametrize("model", ["claude-mock", "gemini-mock", "gpt-mock"])
def test_anthropic_count_tokens(gateway: ThreadedServer, model: str) -> None:
    count = claude(gateway).messages.count_tokens(
        model=model, messages=[{"role": "user", "content": QUESTION}])
    assert count.input_tokens > 0


def test_anthropic_max_tokens_stop_reason(gateway: ThreadedServer) -> None:
    for model in CHAT_MODELS:
        message = claude(gateway).messages.create(
            model=model, max_tokens=2, messages=[{"role": "user", "content": QUESTION}])
        assert message.stop_reason == "max_tokens", model
        assert message.content[0].text == "Mock reply"  # type: ignore[union-attr]


@pytest.mark.parametrize("model,field", [("gpt-mock", "max_completion_tokens"),
                                         ("azure-mock", "max_tokens")])
def test_anthropic_max_tokens_reach_openai_as_max_completion_tokens(
        gateway: ThreadedServer, mock: MockProviderServer, model: str, field: str) -> None:
    """OpenAI deprecated `max_tokens` (its reasoning models refuse it) for
    `max_completion_tokens`; Azure's older API versions refuse that, so Azure keeps
    `max_tokens`."""
    claude(gateway).messages.create(model=model, max_tokens=50,
                                    messages=[{"role": "user", "content": QUESTION}])
    body = [r for r in mock.requests if r["provider"] == PROVIDER_OF[model]][-1]["json"]
    assert body[field] == 50 and len({"max_tokens", "max_completion_tokens"} & set(body)) == 1


def test_openai_compatible_presets_keep_max_tokens() -> None:
    from providers import PROVIDER_TYPES, Provider
    fields = {name: Provider(name, base_url="http://127.0.0.1:1").max_tokens_field  # type: ignore[attr-defined]
              for name in PROVIDER_TYPES if name not in ("anthropic", "gemini")}
    assert {name for name, field in fields.items() if field == "max_completion_tokens"} == {
        "openai"}


@pytest.mark.parametrize("model", CHAT_MODELS)
def test_openai_stream_of_a_tool_call_without_arguments(gateway: ThreadedServer,
                                                        model: str) -> None:
    """Anthropic streams it as `input: {}` and one empty partial_json: still "{}" here."""
    now = {"type": "function", "function": {"name": "now", "parameters": {
        "type": "object", "properties": {}}}}
    with oai(gateway).chat.completions.stream(
            model=model, tools=[now], messages=[{"role": "user", "content": QUESTION}]) as s:
        final = s.get_final_completion()
    call = final.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert (call.function.name, call.function.arguments) == ("now", "{}")  # type: ignore[union-attr]
    assert final.choices[0].finish_reason == "tool_calls"


def test_repeated_anthropic_beta_lines_all_reach_anthropic(gateway: ThreadedServer,
                                                           mock: MockProviderServer) -> None:
    """Two `anthropic-beta` lines are one list (RFC 9110 section 5.3), as the cache key
    reads them: the provider gets both, joined."""
    response = httpx.post(gateway.url + "/v1/messages", headers=[
        ("x-api-key", TEST_KEY), ("anthropic-version", "2023-06-01"),
        ("anthropic-beta", "prompt-caching-2024-07-31"),
        ("anthropic-beta", "token-efficient-tools-2025-02-19")],
        json={"model": "claude-mock", "max_tokens": 50,
              "messages": [{"role": "user", "content": QUESTION}]})
    assert response.status_code == 200
    seen = [r for r in mock.requests if r["provider"] == "anthropic"][-1]["headers"]
    assert seen["anthropic-beta"] == \
        "prompt-caching-2024-07-31, token-efficient-tools-2025-02-19"
