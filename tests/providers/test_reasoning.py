"""A reasoning model behind an OpenAI-compatible chat API, through the gateway.

The mock reasons before it answers (`MockConfig.reasoning_field`): "Reasoning about: <the
question>" in `reasoning_content` (DeepSeek and many compatible servers) or `reasoning`
(OpenRouter, vLLM), in the stream's deltas and the answer's message, its words counted in
`completion_tokens_details.reasoning_tokens`. The official openai and anthropic SDKs are the
clients; a layer of this module, where the metering layer sits, sees the usage it would meter.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import orjson
import pytest

from gateway.app import create_app
from gateway.context import Usage, request_context
from tests.harness import AUTH, TEST_KEY, ThreadedServer, config_head, wait_for, write_config
from tests.mock_providers import MockConfig, MockProviderServer

QUESTION = "why is the sky blue"
REASONING = "Reasoning about: " + QUESTION
REASONING_TOKENS = len(REASONING.split())
REPLY = "Mock reply to: " + QUESTION
FIELDS = ["reasoning_content", "reasoning"]
# What the layer below saw of each request, newest last.
SEEN: list[Usage | None] = []


class UsageSeen:
    """Where the metering layer sits: keeps the usage each request ended with."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            try:
                SEEN.append(request_context(scope).usage)
            except KeyError:  # (/healthz: no API request)
                pass


def config(mock: MockProviderServer) -> str:
    # A first-byte timeout shorter than the reasoning takes to stream when it is paced.
    return f'''{config_head()}
from middleware.cache import CacheMiddleware
from tests.providers.test_reasoning import UsageSeen
slow_start = Timeouts(connect_s=2, first_byte_s=1, idle_s=5, total_s=30)
providers = {{"deepseek": Provider("openai", base_url="{mock.base_url("openai")}",
                                   api_key_env=KEY, timeouts=slow_start)}}
models = {{"reasoner": [Deployment("deepseek", "deepseek-reasoner", price=PRICE)]}}
middleware = [
    Middleware(AuthMiddleware, keys=[StaticKey("tests", key_env="SG_TEST_KEY")]),
    Middleware(UsageSeen),
    Middleware(CacheMiddleware),
    Middleware(FailoverMiddleware, retry=RetryPolicy(max_attempts=1)),
]
'''


@pytest.fixture(scope="module")
def reasoner() -> Iterator[MockProviderServer]:
    with MockProviderServer(MockConfig()) as server:
        yield server


@pytest.fixture(scope="module")
def gateway(reasoner: MockProviderServer,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedServer]:
    path = write_config(tmp_path_factory.mktemp("reasoning"), config(reasoner))
    with ThreadedServer(create_app(path)) as server:
        yield server


@pytest.fixture(params=FIELDS)
def field(request: pytest.FixtureRequest, reasoner: MockProviderServer) -> Iterator[str]:
    """The mock reasoning in this field, paced as configured; reset afterwards."""
    name: str = request.param
    reasoner.config.update({"reasoning_field": name})
    SEEN.clear()
    yield name
    reasoner.config.update({"reasoning_field": None, "chunk_delay_s": 0.0, "chunk_chars": 8})


def oai(gateway: ThreadedServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=TEST_KEY, max_retries=0)


def claude(gateway: ThreadedServer) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gateway.url, api_key=TEST_KEY, max_retries=0)


def ask(content: str = QUESTION) -> list[Any]:
    return [{"role": "user", "content": content}]


def test_reasoning_streamed_before_any_text_is_the_first_output(
        gateway: ThreadedServer, reasoner: MockProviderServer, field: str) -> None:
    """Two seconds of reasoning (9 chunks, 0.25 s apart) before the first text: the
    first-byte timeout (1 s) must not cut a model that is streaming."""
    reasoner.config.update({"chunk_delay_s": 0.25, "chunk_chars": 4})
    reasoning, text, finishes = [], [], []
    for chunk in oai(gateway).chat.completions.create(model="reasoner", messages=ask(),
                                                      stream=True):
        for choice in chunk.choices:
            reasoning.append((choice.delta.model_extra or {}).get(field) or "")
            text.append(choice.delta.content or "")
            finishes.extend([choice.finish_reason] if choice.finish_reason else [])
    assert ("".join(reasoning), "".join(text), finishes) == (REASONING, REPLY, ["stop"])


def test_reasoning_is_a_thinking_block_before_the_text_for_an_anthropic_client(
        gateway: ThreadedServer, field: str) -> None:
    message = claude(gateway).messages.create(model="reasoner", max_tokens=100,
                                              messages=ask())
    assert [block.to_dict() for block in message.content] == [
        {"type": "thinking", "thinking": REASONING, "signature": ""},
        {"type": "text", "text": REPLY}]
    with claude(gateway).messages.stream(model="reasoner", max_tokens=100,
                                         messages=ask()) as stream:
        thinking = "".join(event.thinking for event in stream if event.type == "thinking")
        streamed = stream.get_final_message()
    assert thinking == REASONING
    assert [block.to_dict() for block in streamed.content] == [
        {"type": "thinking", "thinking": REASONING, "signature": ""},
        {"type": "text", "text": REPLY}]


def test_a_streamed_thinking_block_and_the_blocks_after_it_are_numbered_in_order(
        gateway: ThreadedServer, reasoner: MockProviderServer, field: str) -> None:
    """The raw events: thinking at index 0 (no signature_delta: the reasoning has no
    signature), then the tool call the mock makes at index 1."""
    reasoner.config.update({"chunk_chars": 8})
    tool = {"name": "get_weather", "description": "Weather of a city.",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}
    response = httpx.post(gateway.url + "/v1/messages",
                          headers={**AUTH, "anthropic-version": "2023-06-01"},
                          json={"model": "reasoner", "max_tokens": 100, "stream": True,
                                "messages": ask(), "tools": [tool]})
    events = [orjson.loads(line[6:]) for line in response.text.splitlines()
              if line.startswith("data: ")]
    blocks = [(e["type"], e["index"], (e.get("content_block") or e.get("delta") or {}).get("type"))
              for e in events if e["type"].startswith("content_block")]
    thinking_deltas = len(range(0, len(REASONING), 8))
    assert blocks == [("content_block_start", 0, "thinking"),
                      *[("content_block_delta", 0, "thinking_delta")] * thinking_deltas,
                      ("content_block_stop", 0, None),
                      ("content_block_start", 1, "tool_use"),
                      *[("content_block_delta", 1, "input_json_delta")]
                      * (len(blocks) - thinking_deltas - 4),
                      ("content_block_stop", 1, None)]
    assert "".join(e["delta"]["thinking"] for e in events
                   if e["type"] == "content_block_delta" and e["index"] == 0) == REASONING
    assert events[-2]["delta"]["stop_reason"] == "tool_use"


def test_reasoning_tokens_reach_an_anthropic_client_and_stay_metered(
        gateway: ThreadedServer, field: str) -> None:
    """The count is Anthropic's `usage.output_tokens_details.thinking_tokens` (a part of
    output_tokens); the usage below is the upstream's, live and (temperature 0: cached) on
    a cache hit."""
    sdk = claude(gateway)
    question = ask(f"{QUESTION} {field}")
    reasoning_tokens = REASONING_TOKENS + 1
    zero = {"temperature": 0}
    message = sdk.messages.create(model="reasoner", max_tokens=100, messages=question,
                                  extra_body=zero)
    with sdk.messages.stream(model="reasoner", max_tokens=100, messages=question) as stream:
        streamed = stream.get_final_message()
    hit = sdk.messages.with_raw_response.create(model="reasoner", max_tokens=100,
                                                messages=question, extra_body=zero)
    assert hit.headers["x-sluicegate-cache"] == "hit"
    for usage in (message.usage, streamed.usage, hit.parse().usage):
        assert usage.output_tokens_details is not None
        assert usage.output_tokens_details.to_dict() == {"thinking_tokens": reasoning_tokens}
    assert wait_for(lambda: len(SEEN) == 3)  # (appended once the app returns: after the
    # client has the last byte)
    assert [seen.reasoning_tokens if seen else None for seen in SEEN] == [reasoning_tokens] * 3
    assert SEEN[0] == SEEN[1] == SEEN[2] and SEEN[0] is not None
    assert SEEN[0].output_tokens == reasoning_tokens + len(f"{REPLY} {field}".split())


def test_without_reasoning_the_usage_has_no_thinking_tokens(gateway: ThreadedServer) -> None:
    message = claude(gateway).messages.create(model="reasoner", max_tokens=100,
                                              messages=ask())
    assert [block.type for block in message.content] == ["text"]
    assert set(message.usage.to_dict()) == {"input_tokens", "output_tokens",
                                            "cache_read_input_tokens",
                                            "cache_creation_input_tokens"}
