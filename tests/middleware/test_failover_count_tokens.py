"""Token counting says nothing of a deployment's health, and shares none of its rate limits.

Anthropic's token counting has rate limits of its own ("Token counting and message creation
have separate and independent rate limits", docs.anthropic.com/en/docs/build-with-claude/
token-counting): a 429 or a 5xx from `/v1/messages/count_tokens` must not cool the deployment
down, count against its breaker or feed its latency average, so `/v1/messages` on the same
deployment goes on as before. The failing deployment is out for that one request only. The
other way round, a count takes none of the deployment's `rpm` and is neither held back nor
sent elsewhere by a messages 429's cool-down (only an open breaker keeps it out). Two mock
servers play two Anthropic upstreams ("a", "b"); the official anthropic SDK is the client.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest

from tests.harness import TEST_KEY, ThreadedServer, config_head, serve, wait_for
from tests.mock_providers import Fault, MockProviderServer

ADMIN_TOKEN = "count-tokens-admin-token-0123456789"
QUESTION: Any = [{"role": "user", "content": "one two three four five"}]
CLAUDE_A, CLAUDE_B = "a/claude-3-5-haiku-latest", "b/claude-3-5-haiku-latest"


# (`a` and `b`: two mock provider servers, tests/conftest.py)


def config(a: MockProviderServer, b: MockProviderServer, layer: str) -> str:
    return f'''
{config_head("SG_COUNT_TOKENS_ADMIN", ADMIN_TOKEN)}providers = {{
    "a": Provider("anthropic", base_url="{a.base_url("anthropic")}", api_key_env=KEY,
                  timeouts=fast),
    "b": Provider("anthropic", base_url="{b.base_url("anthropic")}", api_key_env=KEY,
                  timeouts=fast),
}}
models = {{
    "claude": [Deployment("a", "claude-3-5-haiku-latest", price=PRICE)],
    "pair": [Deployment("a", "claude-3-5-haiku-latest", price=PRICE),
             Deployment("b", "claude-3-5-haiku-latest", price=PRICE)],
    "claude-1rpm": [Deployment("a", "claude-3-5-haiku-latest", price=PRICE, rpm=1)],
}}
middleware = [
    Middleware(AuthMiddleware, keys=[StaticKey("tests", key_env="SG_TEST_KEY")]),
    Middleware(FailoverMiddleware, admin_token_env="SG_COUNT_TOKENS_ADMIN", {layer}),
]
'''


def client(server: ThreadedServer) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key=TEST_KEY, max_retries=0)


def count(server: ThreadedServer, model: str) -> int:
    """The status of a count_tokens request."""
    try:
        client(server).messages.count_tokens(model=model, messages=QUESTION)
    except anthropic.APIStatusError as error:
        return error.status_code
    return 200


def deployment(server: ThreadedServer, model: str, index: int = 0) -> dict[str, Any]:
    response = httpx.get(server.url + "/admin/deployments",
                         headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
    assert response.status_code == 200, response.text
    state: dict[str, Any] = response.json()["models"][model]["deployments"][index]
    return state


def test_a_429_from_count_tokens_leaves_messages_on_the_deployment_alone(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer) -> None:
    # Before: the 429 cooled the deployment down for its Retry-After (3 s), and the next
    # message request waited for it.
    a.push_fault(Fault("status", provider="anthropic", status=429, retry_after_s=3))
    layer = "retry=RetryPolicy(max_attempts=1, deadline_s=10)"
    with serve(tmp_path, config(a, b, layer)) as gateway:
        assert count(gateway, "claude") == 429
        began = time.monotonic()
        message = client(gateway).messages.create(model="claude", max_tokens=20,
                                                  messages=QUESTION)
        took = time.monotonic() - began
        state = deployment(gateway, "claude")
    assert message.content
    assert took < 1.0, f"the message request waited {took:.1f} s"
    assert state["cooling_s"] == 0 and state["cool_down_probes"] == 0
    assert state["breaker"] == "closed" and state["failures"] == 0
    assert [entry["path"] for entry in a.requests] == ["/anthropic/v1/messages/count_tokens",
                                                       "/anthropic/v1/messages"]


def test_5xx_from_count_tokens_never_open_the_breaker(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer) -> None:
    # Before: two failed counts opened the breaker (two failures in a row), and the message
    # request got 503 no_healthy_deployment.
    for _ in range(2):
        a.push_fault(Fault("status", provider="anthropic", status=503))
    layer = ("retry=RetryPolicy(max_attempts=1), "
             "breaker=BreakerSettings(consecutive_failures=2, cooldown_s=30)")
    with serve(tmp_path, config(a, b, layer)) as gateway:
        assert [count(gateway, "claude") for _ in range(2)] == [503, 503]
        message = client(gateway).messages.create(model="claude", max_tokens=20,
                                                  messages=QUESTION)
        state = deployment(gateway, "claude")
    assert message.content
    assert state["breaker"] == "closed" and state["failures"] == 0


def test_the_deployment_a_count_failed_on_is_out_for_that_request_only(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer) -> None:
    # The count that got a 429 on a is answered by b; the next message request goes to a
    # first (priority), as if the count had never been refused. Before, a cooled down for
    # 30 s and the message went to b.
    a.push_fault(Fault("status", provider="anthropic", status=429, retry_after_s=30))
    layer = 'routes={"pair": Route(strategy="priority")}, retry=RetryPolicy(max_attempts=3)'
    with serve(tmp_path, config(a, b, layer)) as gateway:
        counted = client(gateway).messages.with_raw_response.count_tokens(
            model="pair", messages=QUESTION)
        message = client(gateway).messages.with_raw_response.create(
            model="pair", max_tokens=20, messages=QUESTION)
    assert counted.parse().input_tokens > 0
    assert counted.headers["x-sluicegate-deployment"] == CLAUDE_B
    assert counted.headers["x-sluicegate-attempts"] == "2"
    assert message.headers["x-sluicegate-deployment"] == CLAUDE_A
    assert message.headers["x-sluicegate-attempts"] == "1"


def test_count_tokens_latency_does_not_feed_the_latency_average(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer) -> None:
    a.push_fault(Fault("slow_first_byte", provider="anthropic", delay_s=0.3))
    layer = 'routes={"claude": Route(strategy="latency")}'
    with serve(tmp_path, config(a, b, layer)) as gateway:
        assert count(gateway, "claude") == 200
        after_count = deployment(gateway, "claude")["ewma_ttft_ms"]
        client(gateway).messages.create(model="claude", max_tokens=20, messages=QUESTION)
        after_message = deployment(gateway, "claude")["ewma_ttft_ms"]
    assert after_count == 0  # before: >= 300
    assert 0 < after_message < 300  # (the check can fail: messages do feed it)


def test_count_tokens_neither_takes_nor_waits_for_the_deployments_message_rpm(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer) -> None:
    # One message a minute. Before: the first count took that one, so the second count and
    # the message found no capacity (then a 503 no_healthy_deployment, now a 429).
    layer = "retry=RetryPolicy(max_attempts=1, deadline_s=5)"
    with serve(tmp_path, config(a, b, layer)) as gateway:
        counted = [count(gateway, "claude-1rpm") for _ in range(2)]
        message = client(gateway).messages.with_raw_response.create(
            model="claude-1rpm", max_tokens=20, messages=QUESTION)
        counted.append(count(gateway, "claude-1rpm"))  # the message took the one: counts go
        with pytest.raises(anthropic.APIStatusError) as second:
            client(gateway).messages.create(model="claude-1rpm", max_tokens=20,
                                            messages=QUESTION)
    assert counted == [200, 200, 200]
    assert message.headers["x-sluicegate-deployment"] == CLAUDE_A
    assert second.value.status_code == 429  # (the rpm holds messages to one a minute)
    assert [entry["path"] for entry in a.requests] == [
        "/anthropic/v1/messages/count_tokens", "/anthropic/v1/messages/count_tokens",
        "/anthropic/v1/messages", "/anthropic/v1/messages/count_tokens"]


def test_count_tokens_goes_to_a_deployment_cooling_down_after_a_message_429(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer) -> None:
    # A message's 429 (Retry-After 30) cools the deployment down for messages only. Before:
    # the count was answered 429 at once, never asked (the cool-down outlasts its deadline).
    a.push_fault(Fault("status", provider="anthropic", status=429, retry_after_s=30))
    layer = "retry=RetryPolicy(max_attempts=1, deadline_s=10)"
    with serve(tmp_path, config(a, b, layer)) as gateway:
        with pytest.raises(anthropic.RateLimitError):
            client(gateway).messages.create(model="claude", max_tokens=20, messages=QUESTION)
        assert count(gateway, "claude") == 200
        state = deployment(gateway, "claude")
    assert state["cooling_s"] > 20  # still cooling down for messages
    assert state["cool_down_probes"] == 0 and state["in_flight"] == 0
    assert [entry["path"] for entry in a.requests] == ["/anthropic/v1/messages",
                                                       "/anthropic/v1/messages/count_tokens"]


def test_a_message_cool_down_does_not_steer_count_tokens_elsewhere(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer) -> None:
    # a (first by priority) cools down after a message's 429; the message goes to b. Before:
    # the count went to b as well.
    a.push_fault(Fault("status", provider="anthropic", status=429, retry_after_s=30))
    layer = 'routes={"pair": Route(strategy="priority")}, retry=RetryPolicy(max_attempts=2)'
    with serve(tmp_path, config(a, b, layer)) as gateway:
        message = client(gateway).messages.with_raw_response.create(
            model="pair", max_tokens=20, messages=QUESTION)
        counted = client(gateway).messages.with_raw_response.count_tokens(
            model="pair", messages=QUESTION)
        state = deployment(gateway, "pair")
    assert message.headers["x-sluicegate-deployment"] == CLAUDE_B
    assert counted.headers["x-sluicegate-deployment"] == CLAUDE_A
    assert counted.headers["x-sluicegate-attempts"] == "1"
    assert state["cooling_s"] > 20 and state["cool_down_probes"] == 0


@pytest.mark.parametrize("retry_after_s", [2, 30])
def test_a_count_an_open_breaker_keeps_out_is_not_held_by_the_message_cool_down(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer,
        retry_after_s: int) -> None:
    # A message's 429 opens the breaker (one failure does) and cools the deployment down.
    # The breaker keeps the count out, and with nowhere else to go it is answered at once,
    # as for any open breaker. Before: with Retry-After 2 it waited the cool-down out, then
    # for the breaker to half-open (3 s), and went as its probe; with 30 (past its deadline)
    # it was answered 429 "rate-limited", Retry-After 30.
    a.push_fault(Fault("status", provider="anthropic", status=429, retry_after_s=retry_after_s))
    layer = ("retry=RetryPolicy(max_attempts=1, deadline_s=10), "
             "breaker=BreakerSettings(consecutive_failures=1, cooldown_s=3)")
    with serve(tmp_path, config(a, b, layer)) as gateway:
        with pytest.raises(anthropic.RateLimitError):
            client(gateway).messages.create(model="claude", max_tokens=20, messages=QUESTION)
        with pytest.raises(anthropic.APIStatusError) as refused:
            client(gateway).messages.count_tokens(model="claude", messages=QUESTION)
    assert refused.value.status_code == 503
    assert refused.value.response.headers["retry-after"] == "3"
    assert [entry["path"] for entry in a.requests] == ["/anthropic/v1/messages"]


def test_a_count_leaves_a_cool_downs_probe_slot_alone(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer) -> None:
    # After a message's 429 cool-down, a message goes as its one probe (held 2 s by the
    # mock); a count meanwhile takes no probe slot, so it must give none back (that would
    # let a second message go before the probe's answer).
    a.push_fault(Fault("status", provider="anthropic", status=429, retry_after_s=1))
    a.push_fault(Fault("slow_first_byte", provider="anthropic", delay_s=2.0))
    layer = "retry=RetryPolicy(max_attempts=1, deadline_s=10)"
    with serve(tmp_path, config(a, b, layer)) as gateway, ThreadPoolExecutor(1) as pool:
        with pytest.raises(anthropic.RateLimitError):
            client(gateway).messages.create(model="claude", max_tokens=20, messages=QUESTION)
        time.sleep(1.1)  # the cool-down ended
        probe = pool.submit(client(gateway).messages.create, model="claude", max_tokens=20,
                            messages=QUESTION)
        assert wait_for(lambda: deployment(gateway, "claude")["cool_down_probes"] == 1)
        assert count(gateway, "claude") == 200
        assert deployment(gateway, "claude")["cool_down_probes"] == 1  # before: 0
        assert probe.result(timeout=10).content
        state = deployment(gateway, "claude")
    assert state["cooling_s"] == 0 and state["cool_down_probes"] == 0
