"""A reasoning model behind an OpenAI-compatible chat API, through the gateway.

The mock reasons before it answers (`MockConfig.reasoning_field`): "Reasoning about: <the
question>" in `reasoning_content` (DeepSeek and many compatible servers) or `reasoning`
(OpenRouter, vLLM), in the stream's deltas and the answer's message, its words counted in
`completion_tokens_details.reasoning_tokens`. The official openai and anthropic SDKs are the
clients.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import pytest

from gateway.app import create_app
from tests.harness import TEST_KEY, ThreadedServer, config_head, write_config
from tests.mock_providers import MockConfig, MockProviderServer

QUESTION = "why is the sky blue"
REASONING = "Reasoning about: " + QUESTION
REASONING_TOKENS = len(REASONING.split())
REPLY = "Mock reply to: " + QUESTION
FIELDS = ["reasoning_content", "reasoning"]
def config(mock: MockProviderServer) -> str:
    # A first-byte timeout shorter than the reasoning takes to stream when it is paced.
    return f'''{config_head()}
from middleware.cache import CacheMiddleware
slow_start = Timeouts(connect_s=2, first_byte_s=1, idle_s=5, total_s=30)
providers = {{"deepseek": Provider("openai", base_url="{mock.base_url("openai")}",
                                   api_key_env=KEY, timeouts=slow_start)}}
models = {{"reasoner": [Deployment("deepseek", "deepseek-reasoner", price=PRICE)]}}
middleware = [
    Middleware(AuthMiddleware, keys=[StaticKey("tests", key_env="SG_TEST_KEY")]),
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
    yield name
    reasoner.config.update({"reasoning_field": None, "chunk_delay_s": 0.0, "chunk_chars": 8})


def oai(gateway: ThreadedServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=TEST_KEY, max_retries=0)


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
