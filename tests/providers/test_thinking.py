"""Extended thinking of an Anthropic model for an OpenAI chat client, through the gateway.

The mock Anthropic server thinks when `thinking` is on (tests.mock_providers.anthropic_api):
"Thinking about: <the question>" in a thinking block with a signature, its words counted in
`output_tokens_details.thinking_tokens`, and it refuses a tool-use continuation whose
assistant turn does not open with its (signed) thinking, as Anthropic does. The official
openai SDK is the client; `thinking` and `thinking_blocks` travel as LiteLLM's callers send
them. A layer where the metering layer sits sees the usage each request ended with.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import pytest

from gateway.app import create_app
from tests.harness import TEST_KEY, ThreadedServer, config_head, wait_for, write_config
from tests.mock_providers import MockConfig, MockProviderServer
from tests.mock_providers.anthropic_api import REDACTED_TRIGGER, redacted_data, thinking_signature
from tests.providers.test_reasoning import SEEN

QUESTION = "why is the sky blue"
THINKING = "Thinking about: " + QUESTION
SIGNATURE = thinking_signature(THINKING)
REPLY = "Mock reply to: " + QUESTION
THINK: dict[str, Any] = {"thinking": {"type": "enabled", "budget_tokens": 1024}}
WEATHER: Any = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
def config(mock: MockProviderServer) -> str:
    return f'''{config_head()}
from middleware.cache import CacheMiddleware
from tests.providers.test_reasoning import UsageSeen
providers = {{"anthropic": Provider("anthropic", base_url="{mock.base_url("anthropic")}",
                                    api_key_env=KEY, timeouts=fast)}}
models = {{"claude": [Deployment("anthropic", "claude-sonnet-4-5-20250929", price=PRICE)]}}
middleware = [
    Middleware(AuthMiddleware, keys=[StaticKey("tests", key_env="SG_TEST_KEY")]),
    Middleware(UsageSeen),
    Middleware(CacheMiddleware),
    Middleware(FailoverMiddleware, retry=RetryPolicy(max_attempts=1)),
]
'''


@pytest.fixture(scope="module")
def mock() -> Iterator[MockProviderServer]:
    with MockProviderServer(MockConfig()) as server:
        yield server


@pytest.fixture(scope="module")
def gateway(mock: MockProviderServer,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedServer]:
    path = write_config(tmp_path_factory.mktemp("thinking"), config(mock))
    with ThreadedServer(create_app(path)) as server:
        yield server


@pytest.fixture
def oai(gateway: ThreadedServer) -> openai.OpenAI:
    SEEN.clear()
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=TEST_KEY, max_retries=0)


def ask(content: str = QUESTION) -> list[Any]:
    return [{"role": "user", "content": content}]


def last_anthropic_request(mock: MockProviderServer) -> dict[str, Any]:
    seen = [r for r in mock.requests if r["provider"] == "anthropic"]
    return seen[-1]["json"]  # type: ignore[no-any-return]


def tool_turn(thinking_blocks: list[Any]) -> list[Any]:
    """The weather question, the assistant's call (with `thinking_blocks`) and its result."""
    thinking = "Thinking about: weather in Paris"
    return [*ask("weather in Paris"),
            {"role": "assistant", "content": None, "thinking_blocks": thinking_blocks,
             "reasoning_content": thinking,
             "tool_calls": [{"id": "toolu_01abc", "type": "function", "function": {
                 "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "toolu_01abc", "content": "sunny"}]


# -- the request: thinking on, thinking blocks sent back -------------------------------------

def test_thinking_blocks_sent_back_open_the_assistant_turn_of_a_tool_continuation(
        oai: openai.OpenAI, mock: MockProviderServer) -> None:
    """Anthropic refuses a tool result after an assistant turn without its thinking when
    thinking is on; the blocks go back first, with their signatures, an unsigned one (another
    provider's reasoning) left out."""
    thinking = "Thinking about: weather in Paris"
    blocks = [{"type": "redacted_thinking", "data": "EmwKopaque"},
              {"type": "thinking", "thinking": "another model's reasoning", "signature": ""},
              {"type": "thinking", "thinking": thinking,
               "signature": thinking_signature(thinking)}]
    answer = oai.chat.completions.create(model="claude", messages=tool_turn(blocks),
                                         tools=[WEATHER], extra_body=THINK)
    assert answer.choices[0].message.content == "Tool result received: sunny"
    sent = last_anthropic_request(mock)
    assert sent["thinking"] == THINK["thinking"]
    assert sent["messages"][1]["content"] == [
        {"type": "redacted_thinking", "data": "EmwKopaque"},
        {"type": "thinking", "thinking": thinking, "signature": thinking_signature(thinking)},
        {"type": "tool_use", "id": "toolu_01abc", "name": "get_weather",
         "input": {"city": "Paris"}}]


def test_a_tool_continuation_without_its_thinking_is_anthropics_400(
        oai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="must start with a thinking block"):
        oai.chat.completions.create(model="claude", messages=tool_turn([]), tools=[WEATHER],
                                    extra_body=THINK)


def test_thinking_blocks_of_an_unknown_type_are_refused(oai: openai.OpenAI,
                                                        mock: MockProviderServer) -> None:
    calls = len(mock.requests)
    with pytest.raises(openai.BadRequestError, match="thinking_blocks of type 'text'"):
        oai.chat.completions.create(model="claude", messages=tool_turn(
            [{"type": "text", "text": "hi"}]), tools=[WEATHER], extra_body=THINK)
    assert len(mock.requests) == calls


# -- the answer: reasoning_content and thinking_blocks ---------------------------------------

def test_an_answer_carries_the_thinking_as_reasoning_content_and_thinking_blocks(
        oai: openai.OpenAI) -> None:
    message = oai.chat.completions.create(model="claude", messages=ask(),
                                          extra_body=THINK).choices[0].message
    assert message.content == REPLY
    assert message.model_extra == {
        "reasoning_content": THINKING,
        "thinking_blocks": [{"type": "thinking", "thinking": THINKING,
                             "signature": SIGNATURE}]}


def test_a_stream_carries_reasoning_content_pieces_then_each_whole_signed_block(
        oai: openai.OpenAI, mock: MockProviderServer) -> None:
    mock.config.update({"chunk_chars": 8})
    reasoning, blocks, text = [], [], []
    for chunk in oai.chat.completions.create(model="claude", messages=ask(), stream=True,
                                             extra_body=THINK):
        for choice in chunk.choices:
            extra = choice.delta.model_extra or {}
            reasoning.append(extra.get("reasoning_content") or "")
            blocks += extra.get("thinking_blocks") or []
            text.append(choice.delta.content or "")
    assert len([piece for piece in reasoning if piece]) == len(range(0, len(THINKING), 8))
    assert ("".join(reasoning), blocks, "".join(text)) == (THINKING, [
        {"index": 0, "type": "thinking", "thinking": THINKING, "signature": SIGNATURE}], REPLY)


def test_reasoning_effort_thinks_with_a_budget_and_without_the_sampling_thinking_refuses(
        oai: openai.OpenAI, mock: MockProviderServer) -> None:
    """The openai SDK's own `reasoning_effort` turns thinking on (this Claude 4.5 deployment:
    a budget); the temperature and top_p Anthropic refuses with thinking do not go."""
    question = ask(QUESTION + " with effort")
    thinking = "Thinking about: " + QUESTION + " with effort"
    answer = oai.chat.completions.create(model="claude", messages=question,
                                         reasoning_effort="medium", temperature=0.3,
                                         top_p=0.5)
    assert (answer.choices[0].message.model_extra or {})["reasoning_content"] == thinking
    details = answer.usage.completion_tokens_details if answer.usage else None
    assert details is not None and details.reasoning_tokens == len(thinking.split())
    sent = last_anthropic_request(mock)
    assert sent["thinking"] == {"type": "enabled", "budget_tokens": 2048}
    assert not {"temperature", "top_p", "top_k"} & set(sent)
    streamed = [chunk for chunk in oai.chat.completions.create(
        model="claude", messages=question, reasoning_effort="low", stream=True)]
    assert "".join((choice.delta.model_extra or {}).get("reasoning_content") or ""
                   for chunk in streamed for choice in chunk.choices) == thinking
    assert last_anthropic_request(mock)["thinking"] == {"type": "enabled",
                                                        "budget_tokens": 1024}


def test_redacted_thinking_comes_back_as_a_thinking_block_in_its_place(
        oai: openai.OpenAI) -> None:
    question = QUESTION + " " + REDACTED_TRIGGER
    thinking = "Thinking about: " + question
    expected = [{"type": "redacted_thinking", "data": redacted_data(question)},
                {"type": "thinking", "thinking": thinking,
                 "signature": thinking_signature(thinking)}]
    message = oai.chat.completions.create(model="claude", messages=ask(question),
                                          extra_body=THINK).choices[0].message
    assert (message.model_extra or {})["thinking_blocks"] == expected
    streamed = []
    for chunk in oai.chat.completions.create(model="claude", messages=ask(question),
                                             stream=True, extra_body=THINK):
        for choice in chunk.choices:
            streamed += (choice.delta.model_extra or {}).get("thinking_blocks") or []
    assert streamed == [{"index": index, **block} for index, block in enumerate(expected)]


def test_the_sdks_stream_helper_collects_every_thinking_block(oai: openai.OpenAI) -> None:
    """The helper merges a delta's list entries by their `index` (a redacted block and a
    thinking block are two entries: without it, a RuntimeError); its message's blocks, sent
    back with their `index`, continue the tool call."""
    question = ask("weather in Paris " + REDACTED_TRIGGER)
    with oai.chat.completions.stream(model="claude", messages=question, tools=[WEATHER],
                                     extra_body=THINK) as stream:
        first = stream.get_final_completion().choices[0].message
    blocks = (first.model_extra or {})["thinking_blocks"]
    assert [(block["index"], block["type"]) for block in blocks] == [
        (0, "redacted_thinking"), (1, "thinking")]
    assert first.tool_calls is not None
    history = [*question, first.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": first.tool_calls[0].id, "content": "sunny"}]
    answer = oai.chat.completions.create(model="claude", messages=history, tools=[WEATHER],
                                         extra_body=THINK).choices[0].message
    assert answer.content == "Tool result received: sunny"


def test_the_blocks_of_an_answer_sent_back_continue_its_tool_call(oai: openai.OpenAI) -> None:
    """The assistant message as the SDK returned it goes back in the history, unchanged."""
    question = ask("weather in Paris")
    first = oai.chat.completions.create(model="claude", messages=question, tools=[WEATHER],
                                        extra_body=THINK).choices[0].message
    assert first.tool_calls is not None
    call = first.tool_calls[0]
    history = [*question, first.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
    answer = oai.chat.completions.create(model="claude", messages=history, tools=[WEATHER],
                                         extra_body=THINK).choices[0].message
    assert answer.content == "Tool result received: sunny"
    assert (answer.model_extra or {})["reasoning_content"] == "Thinking about: sunny"


def test_thinking_tokens_are_reasoning_tokens_live_streamed_and_from_the_cache(
        oai: openai.OpenAI) -> None:
    """Anthropic's `output_tokens_details.thinking_tokens` (a part of output_tokens) are the
    reasoning_tokens of the client's usage and of the metered one; a cached answer replays
    its thinking too."""
    question = ask(QUESTION + " counted")
    thinking_tokens = len(("Thinking about: " + QUESTION + " counted").split())
    output_tokens = thinking_tokens + len((REPLY + " counted").split())
    zero: dict[str, Any] = {**THINK, "temperature": 0}
    live = oai.chat.completions.create(model="claude", messages=question, extra_body=zero)
    streamed = [chunk.usage for chunk in oai.chat.completions.create(
        model="claude", messages=question, stream=True, stream_options={"include_usage": True},
        extra_body=THINK) if chunk.usage is not None]
    hit = oai.chat.completions.with_raw_response.create(model="claude", messages=question,
                                                        extra_body=zero)
    assert hit.headers["x-sluicegate-cache"] == "hit"
    cached = hit.parse()
    for answer in (live, cached):
        extra = answer.choices[0].message.model_extra or {}
        assert extra.get("reasoning_content") == "Thinking about: " + QUESTION + " counted"
    for usage in (live.usage, *streamed, cached.usage):
        assert usage is not None and usage.completion_tokens_details is not None
        assert (usage.completion_tokens, usage.completion_tokens_details.reasoning_tokens) \
            == (output_tokens, thinking_tokens)
    assert wait_for(lambda: len(SEEN) == 3)  # (appended after the client has the last byte)
    assert [(seen.output_tokens, seen.reasoning_tokens) if seen else None for seen in SEEN] \
        == [(output_tokens, thinking_tokens)] * 3


def test_a_collected_stream_answers_from_the_cache_with_its_whole_blocks(
        oai: openai.OpenAI) -> None:
    question = ask(QUESTION + " collected")
    thinking = "Thinking about: " + QUESTION + " collected"
    zero: dict[str, Any] = {**THINK, "temperature": 0}
    for _ in oai.chat.completions.create(model="claude", messages=question, stream=True,
                                         extra_body=zero):
        pass
    hit = oai.chat.completions.with_raw_response.create(model="claude", messages=question,
                                                        extra_body=zero)
    assert hit.headers["x-sluicegate-cache"] == "hit"
    assert hit.parse().choices[0].message.model_extra == {
        "reasoning_content": thinking,
        "thinking_blocks": [{"type": "thinking", "thinking": thinking,
                             "signature": thinking_signature(thinking)}]}


def test_an_anthropic_callers_stream_meters_its_thinking_tokens(
        gateway: ThreadedServer) -> None:
    """Same format in and out: the bytes pass through, and the usage read from them takes
    the thinking tokens from message_delta (message_start has none yet)."""
    SEEN.clear()
    sdk = anthropic.Anthropic(base_url=gateway.url, api_key=TEST_KEY, max_retries=0)
    with sdk.messages.stream(model="claude", max_tokens=2048, messages=ask(),
                             thinking={"type": "enabled", "budget_tokens": 1024}) as stream:
        message = stream.get_final_message()
    assert [block.type for block in message.content] == ["thinking", "text"]
    thinking_tokens = len(THINKING.split())
    assert wait_for(lambda: len(SEEN) == 1)
    assert [(seen.output_tokens, seen.reasoning_tokens) if seen else None for seen in SEEN] \
        == [(thinking_tokens + len(REPLY.split()), thinking_tokens)]
