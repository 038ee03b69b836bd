"""The failover layer sends a request only to deployments whose provider serves its operation.

Azure's adapter has no Responses API, Anthropic's no embeddings or legacy completions: a model
with such a deployment beside an OpenAI one must serve those operations from the OpenAI one,
whatever the strategy picks first, for a retry, a hedge and a fallback model alike; a 400
`unsupported_operation` only when none of the model and its fallbacks serves the operation.
Two mock servers ("a", "b") play independent upstreams, each with its OpenAI, Azure and
Anthropic prefixes; the mocks' request logs say which deployment was called.
"""
from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from tests.harness import AUTH, config_head, openai_client, serve
from tests.mock_providers import Fault, MockProviderServer

OPENAI_A, AZURE_A, CLAUDE_A, OPENAI_B = ("a/gpt-4o", "a-azure/gpt-4o-eu",
                                          "a-claude/claude-3-5-haiku-latest", "b/gpt-4o")


# (`a` and `b`: two mock provider servers, tests/conftest.py)


def config(a: MockProviderServer, b: MockProviderServer, layer: str, quota: str = "",
           quota_below: str = "") -> str:
    return f'''
{config_head()}providers = {{
    "a": Provider("openai", base_url="{a.base_url("openai")}", api_key_env=KEY, timeouts=fast),
    "a-azure": Provider("azure", base_url="{a.base_url("azure")}", api_key_env=KEY,
                        timeouts=fast),
    "a-claude": Provider("anthropic", base_url="{a.base_url("anthropic")}", api_key_env=KEY,
                         timeouts=fast),
    "b": Provider("openai", base_url="{b.base_url("openai")}", api_key_env=KEY, timeouts=fast),
}}
azure = Deployment("a-azure", "gpt-4o-eu", price=PRICE, tags=("eu",))
claude = Deployment("a-claude", "claude-3-5-haiku-latest", price=PRICE)
models = {{
    # The README's `smart`, Azure first: with "priority" every request would go to it.
    "smart": [azure, Deployment("a", "gpt-4o", price=PRICE, weight=3)],
    "mixed": [claude, Deployment("a", "gpt-4o", price=PRICE)],
    "three": [Deployment("a", "gpt-4o", price=PRICE), azure,
              Deployment("b", "gpt-4o", price=PRICE)],
    "claude-only": [claude],
    "azure-only": [azure],
    "gpt": [Deployment("b", "gpt-4o", price=PRICE)],
}}
middleware = [
    Middleware(AuthMiddleware, keys=[StaticKey("tests", key_env="SG_TEST_KEY")]),
    {quota}
    Middleware(FailoverMiddleware, {layer}),
    {quota_below}
]
'''


def called(*servers: MockProviderServer) -> list[str]:
    """The provider prefixes the mocks were called at, in order per server."""
    return [entry["provider"] for server in servers for entry in server.requests]


@pytest.mark.parametrize("strategy", ["priority", "weighted"])
def test_responses_to_a_model_with_an_azure_deployment_go_to_the_openai_one(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer, strategy: str) -> None:
    # Before: "priority" picked Azure for every request and "weighted" for a quarter of
    # them, each answered 400 unsupported_operation.
    layer = f'routes={{"smart": Route(strategy="{strategy}")}}'
    with serve(tmp_path, config(a, b, layer)) as gateway:
        sdk = openai_client(gateway)
        served = []
        for _ in range(24):
            raw = sdk.responses.with_raw_response.create(model="smart", input="hello there")
            assert raw.parse().output_text
            assert raw.headers["x-sluicegate-attempts"] == "1"
            served.append(raw.headers["x-sluicegate-deployment"])
        assert set(served) == {OPENAI_A}
        assert called(a) == ["openai"] * 24
        # Chat, which Azure serves, still goes to it first.
        chat = sdk.chat.completions.with_raw_response.create(
            model="smart", messages=[{"role": "user", "content": "hi"}])
        if strategy == "priority":
            assert chat.headers["x-sluicegate-deployment"] == AZURE_A


def test_embeddings_and_completions_to_a_model_with_an_anthropic_deployment(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer) -> None:
    with serve(tmp_path, config(a, b, 'routes={"mixed": Route(strategy="priority")}')) as gateway:
        sdk = openai_client(gateway)
        embedded = sdk.embeddings.with_raw_response.create(model="mixed", input="hello")
        assert embedded.parse().data[0].embedding
        completed = sdk.completions.with_raw_response.create(model="mixed", prompt="Say hi")
        assert completed.parse().choices[0].text
        messages = httpx.post(gateway.url + "/v1/messages", headers=AUTH, timeout=10, json={
            "model": "mixed", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]})
    assert embedded.headers["x-sluicegate-deployment"] == OPENAI_A
    assert completed.headers["x-sluicegate-deployment"] == OPENAI_A
    assert messages.status_code == 200 and messages.headers["x-sluicegate-deployment"] == CLAUDE_A
    assert called(a) == ["openai", "openai", "anthropic"]


def test_a_retry_skips_the_deployment_that_cannot_serve_the_operation(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer) -> None:
    # a fails; next in priority is Azure, which has no Responses API: b serves. Before, the
    # retry went to Azure and its 400 was the answer.
    a.push_fault(Fault("status", provider="openai", status=503))
    layer = 'routes={"three": Route(strategy="priority")}, retry=RetryPolicy(max_attempts=3)'
    with serve(tmp_path, config(a, b, layer)) as gateway:
        raw = openai_client(gateway).responses.with_raw_response.create(model="three", input="hello")
    assert raw.headers["x-sluicegate-deployment"] == OPENAI_B
    assert raw.headers["x-sluicegate-attempts"] == "2"
    assert called(a, b) == ["openai", "openai"]


def test_a_hedge_goes_to_a_deployment_that_can_serve_the_operation(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer) -> None:
    # a is slow to answer; the hedge goes to b, not to Azure (next in priority), whose 400
    # left the race to the slow a.
    a.push_fault(Fault("slow_first_byte", provider="openai", delay_s=1.5))
    layer = ('routes={"three": Route(strategy="priority", hedge_after_s=0.2)}, '
             'retry=RetryPolicy(max_attempts=3)')
    with serve(tmp_path, config(a, b, layer)) as gateway:
        began = time.monotonic()
        raw = openai_client(gateway).responses.with_raw_response.create(model="three", input="hello")
        took = time.monotonic() - began
    assert raw.headers["x-sluicegate-deployment"] == OPENAI_B
    assert took < 1.2
    assert called(a, b) == ["openai", "openai"]


def test_a_fallback_model_serves_what_the_model_cannot(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer) -> None:
    layer = 'routes={"claude-only": Route(fallbacks=("gpt",))}'
    with serve(tmp_path, config(a, b, layer)) as gateway:
        raw = openai_client(gateway).embeddings.with_raw_response.create(model="claude-only",
                                                                  input="hello")
    assert raw.parse().data[0].embedding
    assert raw.headers["x-sluicegate-fallback"] == "gpt"
    assert raw.headers["x-sluicegate-deployment"] == "b/gpt-4o"
    assert called(a) == [] and called(b) == ["openai"]


def test_the_400_comes_only_when_no_deployment_of_the_model_or_its_fallbacks_serves_it(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer) -> None:
    layer = 'routes={"azure-only": Route(fallbacks=("claude-only",))}'
    with serve(tmp_path, config(a, b, layer)) as gateway:
        refused = httpx.post(gateway.url + "/v1/responses", headers=AUTH, timeout=10,
                             json={"model": "azure-only", "input": "hello"})
        alone = httpx.post(gateway.url + "/v1/embeddings", headers=AUTH, timeout=10,
                           json={"model": "claude-only", "input": "hello"})
        # A region pin: the only "eu" deployment of `smart` is Azure's.
        pinned = httpx.post(gateway.url + "/v1/responses", timeout=10,
                            headers={**AUTH, "x-sluicegate-tags": "eu"},
                            json={"model": "smart", "input": "hello"})
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert error["code"] == "unsupported_operation" and error["param"] == "model"
    assert error["message"] == ("Model 'azure-only' does not support /v1/responses: no "
                                "deployment of it or of its fallbacks is on a provider that "
                                "serves it.")
    assert alone.status_code == 400
    assert alone.json()["error"]["message"] == (
        "Model 'claude-only' does not support /v1/embeddings: no deployment of it is on a "
        "provider that serves it.")
    assert pinned.status_code == 400
    assert pinned.json()["error"]["code"] == "no_deployment_with_tags"
    assert "that serves /v1/responses" in pinned.json()["error"]["message"]
    assert called(a, b) == []


@pytest.mark.parametrize("quota_first", [True, False], ids=["quota-above", "failover-above"])
def test_a_quota_downgrade_is_routed_by_the_operation_too(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer, quota_first: bool) -> None:
    # Past its limit a request for `gpt` goes to `smart`, whose first deployment by priority
    # is Azure's: the downgraded request must still go to one that serves /v1/responses,
    # whichever layer is listed first.
    quota = ("Middleware(QuotaMiddleware, store='memory', model_limits={'gpt': Limits(rpm=1, "
             "on_overflow='downgrade', downgrade_to='smart')}),")
    layer = 'routes={"smart": Route(strategy="priority")}'
    layers = config(a, b, layer, quota) if quota_first else config(a, b, layer, quota_below=quota)
    with serve(tmp_path, layers) as gateway:
        sdk = openai_client(gateway)
        first = sdk.responses.with_raw_response.create(model="gpt", input="hello")
        second = sdk.responses.with_raw_response.create(model="gpt", input="hello")
    assert "x-sluicegate-downgraded" not in first.headers
    assert second.headers["x-sluicegate-downgraded"].startswith("gpt -> smart")
    assert second.headers["x-sluicegate-deployment"] == OPENAI_A
    assert called(b) == ["openai"] and called(a) == ["openai"]
