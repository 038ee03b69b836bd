"""The quota layer end to end: a real gateway (hypercorn on a socket), mock providers, the
official SDKs and httpx as clients, and the real Redis and PostgreSQL.

Most tests run twice, over the in-process store and over Redis under a key prefix of the
test's own (a Cluster hash tag), whose keys are deleted afterwards.

The arithmetic: every mock model costs $1 per 1M input and $2 per 1M output tokens, so a
cost in micro-dollars is input tokens + 2 x output tokens. PROMPT is seven one-letter words:
the gateway estimates 3 + ceil(13 bytes / 4) + 3 = 10 input tokens, and the mock counts
7 words + 3 per message = 10. Its reply, "Mock reply to: a b c d e f g", is 10 words. So
with max_tokens=10 the reservation (10 + 2 x 10 = 30) equals the actual cost, and budget
tests do not depend on when the background settle runs; with max_tokens=100 the
reservation is 210 and the settle visibly brings it down to 30.
"""
from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import anthropic
import httpx
import openai
import orjson
import psycopg
import pytest
import redis
from openai.types.responses import Response
from psycopg import sql

from gateway import create_app
from gateway.config import ConfigError
from gateway.kernel import Kernel
from gateway.policy import BUDGET, Check, period_bounds, period_label
from gateway.tokens import estimate_messages
from middleware.quota import PostgresSpendLedger, QuotaMiddleware
from tests.harness import TEST_KEY, ThreadedServer, free_port, mock_config, write_config
from tests.mock_providers import Fault, MockConfig, MockProviderServer
from tests.providers.test_responses_streams import failed_ending, stream_events_of
from tests.tcp_proxy import TcpProxy, relay_in_thread

REDIS_URL = "redis://127.0.0.1:6379/0"
PG_DSN = "postgresql://root@127.0.0.1:5432/test"

KEY_ID = "k-test"
PROMPT = [{"role": "user", "content": "a b c d e f g"}]
INPUT = 10  # both the gateway's estimate and the mock's count, see the module docstring
OUTPUT = 10  # words of the mock's reply
COST = INPUT + 2 * OUTPUT  # micro-dollars, actual; also the reservation with max_tokens=10
RESERVED_100 = INPUT + 2 * 100  # the reservation with max_tokens=100
ANTHROPIC_HEADERS = {"anthropic-version": "2023-06-01"}
SECOND_KEY = "sk-sg-second-key-0123456789"
ADMIN_TOKEN = "quota-admin-token-0123456789"

T = TypeVar("T")

PRELUDE = '''
import orjson
from gateway.context import Usage, find_request_context
from middleware.metering import PostgresUsageStore
from middleware.quota import PostgresSpendLedger, RedisQuotaStore


class FixedAnswer:
    """Answers every API request itself, as a cache layer does on a hit, reporting the
    usage of the call it stands for (the documented contract of a layer below quota)."""

    def __init__(self, app, *, cache_status):
        self.app = app
        self.cache_status = cache_status

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ctx = find_request_context(scope)
        if ctx is None:
            await self.app(scope, receive, send)
            return
        ctx.cache_status = self.cache_status
        ctx.usage = Usage(input_tokens=10, output_tokens=10)
        body = orjson.dumps({
            "id": "chatcmpl-cached", "object": "chat.completion", "created": 0,
            "model": ctx.model, "choices": [{"index": 0, "finish_reason": "stop",
            "message": {"role": "assistant", "content": "cached"}}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20}})
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


models["cheap-mock"] = [Deployment("openai", "cheap-upstream",
                                   price=Price(input_per_mtok="0.1", output_per_mtok="0.2"))]
'''


# -- building configs ----------------------------------------------------------------------------

def static_key(limits: str = "None", *, key_id: str = KEY_ID, env: str = "SG_TEST_KEY") -> str:
    return f"StaticKey('tests', key_env={env!r}, id={key_id!r}, limits={limits})"


def auth(*keys: str) -> str:
    return f"Middleware(AuthMiddleware, keys=[{', '.join(keys or (static_key(),))}])"


def quota(store: str, **options: str) -> str:
    extra = "".join(f", {name}={value}" for name, value in options.items())
    return f"Middleware(QuotaMiddleware, store={store}{extra})"


def budget_check(period: str, subject: str = f"key:{KEY_ID}") -> Check:
    """The storage key the quota layer uses for a budget of `subject` in the current period."""
    start, end = period_bounds(period, datetime.now(UTC))
    expires = 0.0 if period == "lifetime" else end.timestamp()
    return Check(BUDGET, f"{subject}:budget:{period}:{period_label(period, start)}", 0, 0,
                 expires_at=expires)


def eventually(read: Callable[[], T], expected: T, timeout_s: float = 5.0) -> T:
    """Polls `read` until it returns `expected` (settling runs after the response, in the
    background); returns the last value read, for the caller to assert on."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = read()
        if value == expected or time.monotonic() > deadline:
            return value
        time.sleep(0.02)


def settled(read: Callable[[], T], reserved: T, timeout_s: float = 5.0) -> T:
    """Polls `read` until it no longer returns the reservation, i.e. until the background
    settle has replaced it with the actual amount; returns that value."""
    deadline = time.monotonic() + timeout_s
    value = read()
    while value == reserved and time.monotonic() < deadline:
        time.sleep(0.02)
        value = read()
    return value


@dataclass
class Gateway:
    server: ThreadedServer
    app: Kernel

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def quota(self) -> QuotaMiddleware:
        return next(c for c in self.app.components if isinstance(c, QuotaMiddleware))

    def committed(self, period: str = "lifetime", subject: str = f"key:{KEY_ID}") -> int | None:
        """The budget counter (spent + reserved) as the quota store holds it."""
        check = budget_check(period, subject)
        values: list[int | None] = self.server.run(self.quota.store.committed([check]))
        return values[0]

    def chat(self, key: str | None = TEST_KEY, **body: Any) -> httpx.Response:
        headers = {"authorization": f"Bearer {key}"} if key else {}
        payload = {"model": "gpt-mock", "messages": PROMPT, "max_tokens": OUTPUT, **body}
        return httpx.post(self.url + "/v1/chat/completions", headers=headers, json=payload,
                          timeout=10)

    def openai(self, key: str = TEST_KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0)

    def anthropic(self, key: str = TEST_KEY) -> anthropic.Anthropic:
        return anthropic.Anthropic(base_url=self.url, api_key=key, max_retries=0)


Start = Callable[..., Gateway]


@pytest.fixture
def start(tmp_path: Path, mock_url: str, prefix: str) -> Iterator[Start]:
    """Starts gateways whose `middleware` list is the given layer expressions (after the
    config lines `extra`); they stop before the test's Redis keys are deleted."""
    running: list[ThreadedServer] = []

    def start(*layers: str, upstream: str = mock_url, extra: str = "") -> Gateway:
        text = mock_config(upstream, middleware="none",
                           extra=PRELUDE + extra + f"\nmiddleware = [{', '.join(layers)}]\n")
        path = write_config(tmp_path, text, name=f"config_{len(running)}.py")
        app = create_app(path)
        server = ThreadedServer(app).__enter__()
        running.append(server)
        return Gateway(server, app)

    yield start
    for server in reversed(running):
        server.__exit__(None, None, None)


def delete_prefix(prefix: str) -> None:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture
def prefix() -> Iterator[str]:
    """A Redis key prefix of this test's own (a hash tag), whose keys are deleted after."""
    value = f"{{sgq-{uuid.uuid4().hex}}}"
    yield value
    delete_prefix(value)


def redis_store(prefix: str, url: str = REDIS_URL, **options: Any) -> str:
    extra = "".join(f", {name}={value!r}" for name, value in options.items())
    return f"RedisQuotaStore({url!r}, prefix={prefix!r}{extra})"


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest, prefix: str) -> str:
    """The quota store, as an expression for the config module."""
    return "'memory'" if request.param == "memory" else redis_store(prefix)


@pytest.fixture(scope="module")
def slow_mock() -> Iterator[MockProviderServer]:
    """A mock whose streams carry one character per event and pause between events."""
    server = MockProviderServer(MockConfig(chunk_delay_s=0.1, chunk_chars=1))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def slow(slow_mock: MockProviderServer) -> Iterator[MockProviderServer]:
    slow_mock.config.update({"chunk_delay_s": 0.1, "chunk_chars": 1})
    slow_mock.clear_faults()
    slow_mock.reset_log()
    yield slow_mock
    slow_mock.config.update({"chunk_delay_s": 0.1, "chunk_chars": 1})


def wait_streams_done(mock: MockProviderServer) -> None:
    assert eventually(lambda: mock.active_streams, 0) == 0


# -- 1. requests per minute ----------------------------------------------------------------------

def test_rpm_admits_exactly_n_then_429_in_openai_shape(
        start: Start, store: str, mock: MockProviderServer) -> None:
    gateway = start(auth(static_key("Limits(rpm=3)")), quota(store))
    client = gateway.openai()
    for remaining in ("2", "1", "0"):
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-mock", messages=PROMPT, max_tokens=OUTPUT)  # type: ignore[arg-type]
        assert raw.status_code == 200
        assert raw.headers["x-ratelimit-remaining-requests"] == remaining
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(model="gpt-mock", messages=PROMPT,  # type: ignore[arg-type]
                                       max_tokens=OUTPUT)
    response = refused.value.response
    assert response.status_code == 429
    assert 1 <= int(response.headers["retry-after"]) <= 20  # a token every 20 s
    assert response.json() == {"error": {
        "message": "Rate limit exceeded: Key k-test may use 3 requests per minute; retry "
                   "after the number of seconds in the Retry-After header.",
        "type": "rate_limit_error", "param": None, "code": "rate_limit_exceeded"}}
    assert len(mock.requests) == 3  # the refused request never reached the provider


@pytest.mark.parametrize("limit", ["rpm=0", "tpm=0", "max_concurrent=0"])
def test_a_limit_of_zero_refuses_without_a_retry_after(start: Start, store: str,
                                                       mock: MockProviderServer,
                                                       limit: str) -> None:
    # (rpm=0 was "Request too large: it needs about 1 tokens", and max_concurrent=0 told
    # the client to retry every second, forever)
    gateway = start(auth(static_key(f"Limits({limit})")), quota(store))
    refused = gateway.chat()
    assert refused.status_code == 429
    assert "retry-after" not in refused.headers
    message = refused.json()["error"]["message"]
    assert message.startswith("Not permitted: key k-test may make no requests"), message
    assert mock.requests == []


def test_rpm_refusal_in_anthropic_shape(start: Start, store: str,
                                        mock: MockProviderServer) -> None:
    gateway = start(auth(static_key("Limits(rpm=2)")), quota(store))
    client = gateway.anthropic()
    for _ in range(2):
        message = client.messages.create(model="claude-mock", max_tokens=OUTPUT,
                                         messages=PROMPT)  # type: ignore[arg-type]
        assert message.content[0].text == "Mock reply to: a b c d e f g"  # type: ignore[union-attr]
    with pytest.raises(anthropic.RateLimitError) as refused:
        client.messages.create(model="claude-mock", max_tokens=OUTPUT,
                               messages=PROMPT)  # type: ignore[arg-type]
    response = refused.value.response
    assert response.status_code == 429
    assert 1 <= int(response.headers["retry-after"]) <= 30
    assert response.json() == {"type": "error", "error": {
        "type": "rate_limit_error",
        "message": "Rate limit exceeded: Key k-test may use 2 requests per minute; retry "
                   "after the number of seconds in the Retry-After header."}}
    assert len(mock.requests) == 2


def test_a_token_count_takes_no_limit_of_the_callers(start: Start, store: str,
                                                     mock: MockProviderServer) -> None:
    # (two counts used up rpm=2, and the lease of max_concurrent=1 while they ran: the
    # key's first message was a 429)
    gateway = start(auth(static_key("Limits(rpm=2, max_concurrent=1, budgets=(Budget("
                                    "'0.00003', period='lifetime'),))")), quota(store))
    client = gateway.anthropic()
    for _ in range(3):
        raw = client.messages.with_raw_response.count_tokens(
            model="claude-mock", messages=PROMPT)  # type: ignore[arg-type]
        assert raw.parse().input_tokens == INPUT
        assert "x-ratelimit-remaining-requests" not in raw.headers
    raw_message = client.messages.with_raw_response.create(
        model="claude-mock", max_tokens=OUTPUT, messages=PROMPT)  # type: ignore[arg-type]
    assert raw_message.headers["x-ratelimit-remaining-requests"] == "1"
    assert raw_message.headers["x-sluicegate-budget-remaining"] == "0.000000"
    with pytest.raises(anthropic.AuthenticationError):  # (it still needs a key)
        gateway.anthropic(key="sk-sg-not-a-key-0123456789").messages.count_tokens(
            model="claude-mock", messages=PROMPT)  # type: ignore[arg-type]


# -- 2. budgets that block -----------------------------------------------------------------------

@pytest.mark.parametrize("status", [402, 429])
def test_budget_admits_exactly_k_requests_then_refuses(
        start: Start, store: str, mock: MockProviderServer, status: int) -> None:
    limit = "0.00009"  # three requests of 30 micro-dollars
    gateway = start(auth(static_key(
        f"Limits(budgets=(Budget({limit!r}, period='daily', status={status}),))")), quota(store))
    for remaining in ("0.000060", "0.000030", "0.000000"):
        response = gateway.chat()
        assert response.status_code == 200
        assert response.headers["x-sluicegate-budget-remaining"] == remaining
    refused = gateway.chat()
    _, end = period_bounds("daily", datetime.now(UTC))
    stamp = end.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert refused.status_code == status
    assert refused.headers["x-sluicegate-budget-reset"] == stamp
    assert refused.json() == {"error": {
        "message": f"Budget exceeded: the key k-test daily budget of ${limit} USD does not "
                   f"leave enough for this request; it resets at {stamp}.",
        "type": "insufficient_quota" if status == 402 else "rate_limit_error",
        "param": None, "code": "budget_exceeded"}}
    if status == 429:
        seconds = end.timestamp() - time.time()
        assert 0 < int(refused.headers["retry-after"]) <= seconds + 2
    else:
        assert "retry-after" not in refused.headers
    assert len(mock.requests) == 3
    assert gateway.committed("daily") == 3 * COST


def test_a_batched_completion_reserves_every_prompts_output(
        start: Start, store: str, mock: MockProviderServer) -> None:
    # 40 prompts answered with up to 30 tokens each can cost 40 times what one can: the
    # reservation counts them all, so a budget that one prompt's bound fits does not admit
    # the batch (before, it did, and the call cost more than twice the budget).
    gateway = start(auth(static_key("Limits(budgets=(Budget('0.0002', period='lifetime'),))")),
                    quota(store))
    body = {"model": "gpt-mock", "prompt": ["a b"] * 40, "max_tokens": 30}
    refused = httpx.post(gateway.url + "/v1/completions", json=body, timeout=10,
                         headers={"authorization": f"Bearer {TEST_KEY}"})
    assert refused.status_code == 402, refused.text
    assert refused.json()["error"]["code"] == "budget_exceeded"
    assert mock.requests == []
    single = httpx.post(gateway.url + "/v1/completions", timeout=10,
                        json={**body, "prompt": "a b"},
                        headers={"authorization": f"Bearer {TEST_KEY}"})
    assert single.status_code == 200, single.text


def test_only_the_output_caps_sent_on_bound_the_reservation(
        start: Start, store: str, mock: MockProviderServer) -> None:
    # A cap of another API in the body is read by nobody downstream: an Anthropic request's
    # max_completion_tokens of 1 beside its max_tokens of 100,000 (sent on as the OpenAI
    # call's cap), or a chat request's max_output_tokens of 1 (sent without any cap), once
    # reserved one output token, and each call could cost far more than the budget.
    gateway = start(auth(static_key("Limits(budgets=(Budget('0.0002', period='lifetime'),))")),
                    quota(store))
    headers = {"authorization": f"Bearer {TEST_KEY}"}
    hi = [{"role": "user", "content": "hi"}]
    refused = httpx.post(gateway.url + "/v1/messages", headers=headers, timeout=10, json={
        "model": "gpt-mock", "max_tokens": 100_000, "max_completion_tokens": 1,
        "messages": hi})
    assert refused.status_code == 402, refused.text
    assert refused.json()["type"] == "error"
    chat = httpx.post(gateway.url + "/v1/chat/completions", headers=headers, timeout=10,
                      json={"model": "gpt-mock", "max_output_tokens": 1, "messages": hi})
    assert chat.status_code == 402, chat.text  # the default bound, 4096 tokens
    assert mock.requests == []
    answered = httpx.post(gateway.url + "/v1/messages", headers=headers, timeout=10, json={
        "model": "gpt-mock", "max_tokens": 20, "messages": hi})
    assert answered.status_code == 200, answered.text


def test_a_request_without_a_cap_reserves_the_cap_its_deployment_sends(
        start: Start, store: str, mock: MockProviderServer) -> None:
    # The Anthropic adapter sends a chat request without a cap with its default_max_tokens
    # (4096; Anthropic requires one): that is what the call may generate, and what it
    # reserves, not the quota layer's smaller default (10 here), which an OpenAI model's
    # request without a cap still reserves.
    gateway = start(auth(static_key("Limits(budgets=(Budget('0.0002', period='lifetime'),))")),
                    quota(store, default_max_output_tokens="10"))
    headers = {"authorization": f"Bearer {TEST_KEY}"}
    hi = [{"role": "user", "content": "hi"}]
    refused = httpx.post(gateway.url + "/v1/chat/completions", headers=headers, timeout=10,
                         json={"model": "claude-mock", "messages": hi})
    assert refused.status_code == 402, refused.text
    assert mock.requests == []
    capped = httpx.post(gateway.url + "/v1/chat/completions", headers=headers, timeout=10,
                        json={"model": "claude-mock", "messages": hi, "max_tokens": 10})
    assert capped.status_code == 200, capped.text
    openai_model = httpx.post(gateway.url + "/v1/chat/completions", headers=headers,
                              timeout=10, json={"model": "gpt-mock", "messages": hi})
    assert openai_model.status_code == 200, openai_model.text


def test_a_request_asking_for_thinking_reserves_the_room_its_translation_makes(
        start: Start, store: str, mock: MockProviderServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A chat request without a cap that asks for thinking goes to Claude 3.7 to 4.5 with
    # max_tokens = the adapter's default + the thinking budget (xhigh: 4096 + 16384). It
    # reserved the default alone, and concurrent thinking requests overspent a budget several
    # times. Claude 4.6 thinks adaptively within the default: that is what it reserves. One
    # key per request: each one's reservation is its budget less its header.
    cases = [("claude-thinks", {"reasoning_effort": "xhigh"}),
             ("claude-thinks", {"thinking": {"type": "enabled", "budget_tokens": 6000}}),
             ("claude-adaptive", {"reasoning_effort": "xhigh"}),
             ("claude-thinks", {"reasoning_effort": "xhigh", "max_tokens": 2000})]
    keys = [f"sk-sg-thinking-key-{i}-0123456789" for i in range(len(cases))]
    for i, key in enumerate(keys):
        monkeypatch.setenv(f"SG_KEY_T{i}", key)
    budget = "Limits(budgets=(Budget('1', period='lifetime'),))"
    extra = ('models["claude-thinks"] = [Deployment("anthropic", "claude-3-7-sonnet-20250219",'
             ' price=MOCK_PRICE)]\n'
             'models["claude-adaptive"] = [Deployment("anthropic", "claude-opus-4-6", '
             'price=MOCK_PRICE)]\n')
    gateway = start(auth(*[static_key(budget, key_id=f"k-t{i}", env=f"SG_KEY_T{i}")
                           for i in range(len(cases))]), quota(store), extra=extra)
    input_parts = set()
    for key, (model, fields) in zip(keys, cases, strict=True):
        response = httpx.post(gateway.url + "/v1/chat/completions", timeout=10,
                              json={"model": model, "messages": PROMPT, **fields},
                              headers={"authorization": f"Bearer {key}"})
        assert response.status_code == 200, response.text
        sent = mock.requests[-1]["json"]["max_tokens"]
        reserved = 1_000_000 - int(
            Decimal(response.headers["x-sluicegate-budget-remaining"]) * 1_000_000)
        input_parts.add(reserved - 2 * sent)  # (MOCK_PRICE: output at 2 micro-USD a token)
    assert [request["json"]["max_tokens"] for request in mock.requests] == \
        [4096 + 16384, 4096 + 6000, 4096, 2000]
    (input_part,) = input_parts  # the same estimated input in every request, at $1/M
    assert 0 < input_part < 100


def test_a_completion_without_max_tokens_reserves_the_apis_default_of_16(
        start: Start, store: str, mock: MockProviderServer) -> None:
    # OpenAI's legacy Completions API defaults max_tokens to 16 (its API reference; the
    # OpenAPI spec's CreateCompletionRequest: `default: 16`), so the bound is 16 per choice,
    # not default_max_output_tokens: "a b" reserves 1 + 2 x 16 = 33 of the 70. (Before, it
    # reserved 1 + 2 x 4096, and the budget refused a call it could afford.)
    gateway = start(auth(static_key("Limits(budgets=(Budget('0.00007', period='lifetime'),))")),
                    quota(store))
    headers = {"authorization": f"Bearer {TEST_KEY}"}
    body = {"model": "gpt-mock", "prompt": "a b"}
    answered = httpx.post(gateway.url + "/v1/completions", json=body, headers=headers,
                          timeout=10)
    assert answered.status_code == 200, answered.text
    assert answered.headers["x-sluicegate-budget-remaining"] == "0.000037"  # 70 - 33
    assert len(mock.requests) == 1 and "max_tokens" not in mock.requests[0]["json"]
    batch = httpx.post(gateway.url + "/v1/completions", headers=headers, timeout=10,
                       json={**body, "prompt": ["a b", "a b"], "n": 2})  # 2 + 2 x 2 x 16 > 70
    assert batch.status_code == 402, batch.text


# -- 3. headers ----------------------------------------------------------------------------------

def test_rate_limit_and_budget_headers(start: Start, store: str) -> None:
    gateway = start(auth(static_key(
        "Limits(rpm=5, tpm=1000, budgets=(Budget('0.001', period='daily'),))")), quota(store))
    first = gateway.chat()
    assert first.status_code == 200
    headers = {k: v for k, v in first.headers.items()
               if k.startswith(("x-ratelimit-", "x-sluicegate-"))}
    assert headers == {
        "x-ratelimit-limit-requests": "5", "x-ratelimit-remaining-requests": "4",
        "x-ratelimit-reset-requests": "12s",  # one request refills in 60 / 5 s
        "x-ratelimit-limit-tokens": "1000",
        "x-ratelimit-remaining-tokens": str(1000 - (INPUT + OUTPUT)),
        "x-ratelimit-reset-tokens": "2s",  # 20 tokens at 1000 per minute: 1.2 s, rounded up
        "x-sluicegate-budget-remaining": "0.000970",
    }
    second = gateway.chat()
    assert second.headers["x-ratelimit-remaining-requests"] == "3"
    assert 1000 - 2 * (INPUT + OUTPUT) <= int(second.headers["x-ratelimit-remaining-tokens"]) \
        <= 1000 - (INPUT + OUTPUT)  # the bucket refills a little between the two
    assert second.headers["x-sluicegate-budget-remaining"] == "0.000940"


def test_headers_report_the_tightest_subject(start: Start, store: str) -> None:
    gateway = start("Middleware(AuthMiddleware, keys=[" + static_key("Limits(rpm=5)") + "], "
                    "limits={('project', 'tests'): Limits(rpm=2)})", quota(store))
    first = gateway.chat()
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert gateway.chat().status_code == 200
    refused = gateway.chat()
    assert refused.status_code == 429
    assert refused.json()["error"]["message"].startswith(
        "Rate limit exceeded: Project 'tests' may use 2 requests per minute")


def test_a_request_larger_than_the_tpm_bucket_is_refused_without_retry_after(
        start: Start, store: str, mock: MockProviderServer) -> None:
    gateway = start(auth(static_key("Limits(tpm=100)")), quota(store))
    refused = gateway.chat(max_tokens=100)  # 10 input + 100 output > 100: waiting never helps
    assert refused.status_code == 429
    assert "retry-after" not in refused.headers
    assert refused.json()["error"]["message"] == (
        "Request too large: it needs about 110 tokens, and key k-test may use 100 tokens "
        "per minute.")
    assert mock.requests == []
    assert gateway.chat().headers["x-ratelimit-remaining-tokens"] == "80"


def test_a_concurrency_lease_is_renewed_while_its_request_runs(
        start: Start, store: str, slow: MockProviderServer) -> None:
    # (a lease was set for lease_s once, at admission: 2.5 s into a 6 s stream, with
    # max_concurrent=1 and lease_s=2, a second request was admitted beside it)
    slow.config.chunk_delay_s = 0.2  # (a reply of 28 characters, one an event)
    gateway = start(auth(static_key("Limits(max_concurrent=1)")), quota(store, lease_s="2.0"),
                    upstream=slow.url)
    stream = gateway.openai().chat.completions.create(
        model="gpt-mock", messages=PROMPT, max_tokens=OUTPUT,  # type: ignore[arg-type]
        stream=True)
    chunks = iter(stream)
    next(chunks)
    time.sleep(2.5)  # past the lease taken at admission
    beside = gateway.chat()
    assert beside.status_code == 429, beside.text
    assert beside.json()["error"]["message"] == (
        "Too many concurrent requests: key k-test may have 1 requests in flight.")
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text.endswith("f g")  # (the stream went on to its end)
    assert eventually(lambda: gateway.chat().status_code, 200) == 200  # its lease released


def test_a_budget_reservation_is_renewed_while_its_request_runs(
        start: Start, store: str, slow: MockProviderServer) -> None:
    # (held for lease_s from admission only: 2.5 s into a 6 s stream, with lease_s=2 and a
    # budget with room for its reservation alone, a second request took that back, and was
    # admitted while the stream still spent it)
    limits = f"Limits(budgets=(Budget('{2 * COST / 1_000_000:.6f}', period='lifetime'),))"
    gateway = start(auth(static_key(limits)), quota(store, lease_s="2.0"), upstream=slow.url)
    assert gateway.chat().status_code == 200  # (COST spent; the budget seeded, so the
    slow.config.chunk_delay_s = 0.2  # stream is admitted as every later request is)
    stream = gateway.openai().chat.completions.create(
        model="gpt-mock", messages=PROMPT, max_tokens=OUTPUT,  # type: ignore[arg-type]
        stream=True)
    chunks = iter(stream)
    next(chunks)
    time.sleep(2.5)  # past the reservation's lease taken at admission
    beside = gateway.chat()
    assert beside.status_code == 402, beside.text
    assert beside.json()["error"]["code"] == "budget_exceeded"
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text.endswith("f g")  # (the stream went on to its end)


def test_a_concurrency_lease_is_released_when_the_client_hangs_up(
        start: Start, store: str, slow: MockProviderServer) -> None:
    slow.config.chunk_delay_s = 0.3
    gateway = start(auth(static_key("Limits(max_concurrent=1)")), quota(store),
                    upstream=slow.url)
    body = {"model": "gpt-mock", "messages": PROMPT, "max_tokens": OUTPUT, "stream": True}
    with httpx.Client(timeout=10) as client, client.stream(
            "POST", gateway.url + "/v1/chat/completions",
            headers={"authorization": f"Bearer {TEST_KEY}"}, json=body) as streaming:
        chunks = streaming.iter_raw()  # (kept: dropped after `next`, it hangs up)
        next(chunks)
        refused = gateway.chat()
        assert refused.status_code == 429
        assert refused.json()["error"]["message"] == (
            "Too many concurrent requests: key k-test may have 1 requests in flight.")
    assert eventually(lambda: gateway.chat().status_code, 200) == 200


def test_requests_sent_with_one_request_id_hold_a_lease_each(
        start: Start, store: str, slow: MockProviderServer) -> None:
    # The caller chooses x-request-id. Were leases kept under it, every request sent with one
    # id would replace the same lease, and max_concurrent would never count past one.
    slow.config.chunk_delay_s = 0.3
    gateway = start(auth(static_key("Limits(max_concurrent=2)")), quota(store),
                    upstream=slow.url)
    headers = {"authorization": f"Bearer {TEST_KEY}", "x-request-id": "same-id"}
    body = {"model": "gpt-mock", "messages": PROMPT, "max_tokens": OUTPUT, "stream": True}
    with httpx.Client(timeout=10) as client, \
            client.stream("POST", gateway.url + "/v1/chat/completions", headers=headers,
                          json=body) as first, \
            client.stream("POST", gateway.url + "/v1/chat/completions", headers=headers,
                          json=body) as second:
        assert (first.status_code, second.status_code) == (200, 200)
        assert first.headers["x-request-id"] == "same-id"  # still the caller's, as sent
        # (iterators kept: one dropped after `next` closes its response, a hang-up)
        first_chunks, second_chunks = first.iter_raw(), second.iter_raw()
        next(first_chunks)
        next(second_chunks)
        again = httpx.post(gateway.url + "/v1/chat/completions", headers=headers,
                           json={**body, "stream": False}, timeout=10)
        assert again.status_code == 429
        assert again.headers["x-request-id"] == "same-id"
        assert gateway.chat().status_code == 429  # a fresh id: two leases are held
        assert len(slow.requests) == 2
    # Both streams hung up: each released its own lease, and only its own.
    assert eventually(lambda: gateway.chat().status_code, 200) == 200


def leases_in_redis(prefix: str) -> list[bytes]:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        return [member for key in client.scan_iter(match=f"{prefix}*")
                if client.type(key) == b"zset" for member in client.zrange(key, 0, -1)]
    finally:
        client.close()


@pytest.fixture
def late_redis() -> Iterator[TcpProxy]:
    """A relay to Redis (on a loop of its own) whose replies can be held back."""
    with relay_in_thread(6379) as proxy:
        yield proxy


def test_a_lease_whose_admit_reply_timed_out_is_released_when_redis_answers_again(
        start: Start, prefix: str, late_redis: TcpProxy) -> None:
    # The admit reaches Redis and runs, but its reply comes too late: the request is served
    # under the fallback store, and the lease the script took is never settled. It would
    # shut the key (max_concurrent=1) out for lease_s, 15 minutes.
    url = f"redis://127.0.0.1:{late_redis.port}/0"
    gateway = start(auth(static_key("Limits(max_concurrent=1)")),
                    quota(redis_store(prefix, url, socket_timeout_s=0.2), store_retry_s=1.0))
    assert gateway.chat().status_code == 200  # connected, scripts loaded, nothing held
    assert leases_in_redis(prefix) == []
    late_redis.reply_delay_s = 0.5
    assert gateway.chat().status_code == 200  # max_concurrent fails open: the fallback
    late_redis.reply_delay_s = 0.0
    held = leases_in_redis(prefix)
    assert len(held) == 1  # the timed-out admit ran, and holds a lease
    # Once Redis answers again (the next request after store_retry_s, or the release's own
    # try), the lease is released, and the key may send a request again.
    assert eventually(lambda: leases_in_redis(prefix), []) == []
    assert gateway.chat().status_code == 200


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_lease_whose_settle_failed_is_released_when_redis_answers_again(
        start: Start, prefix: str, late_redis: TcpProxy, mock: MockProviderServer,
        stream: bool) -> None:
    # The request is admitted, and Redis goes away while it runs: its settle (sent as the
    # response ends) fails, and its lease stood for lease_s (15 minutes), every later
    # request of the key (max_concurrent=1) refused meanwhile.
    url = f"redis://127.0.0.1:{late_redis.port}/0"
    gateway = start(auth(static_key("Limits(max_concurrent=1)")),
                    quota(redis_store(prefix, url, socket_timeout_s=0.2), store_retry_s=1.0))
    assert gateway.chat().status_code == 200  # connected, scripts loaded
    assert eventually(lambda: leases_in_redis(prefix), []) == []  # (its settle is in)
    assert late_redis.server is not None
    relay = late_redis.server.get_loop()
    mock.push_fault(Fault("slow_first_byte", provider="openai", delay_s=1.0))
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(gateway.chat, stream=stream)
        assert eventually(lambda: len(leases_in_redis(prefix)), 1) == 1  # admitted
        asyncio.run_coroutine_threadsafe(late_redis.stop(), relay).result(10)
        assert slow.result(10).status_code == 200
    time.sleep(0.3)  # (the settle fails)
    assert len(leases_in_redis(prefix)) == 1
    asyncio.run_coroutine_threadsafe(late_redis.start(), relay).result(10)
    # Once Redis answers again, the lease is released, and the key may send a request.
    assert eventually(lambda: leases_in_redis(prefix), []) == []
    assert gateway.chat().status_code == 200


def test_a_budget_whose_settle_failed_is_settled_to_the_cost_when_redis_answers_again(
        start: Start, prefix: str, late_redis: TcpProxy, mock: MockProviderServer) -> None:
    # Each request reserves 10 + 2 x 1000 = 2010 (max_tokens=1000) and costs 30. Redis goes
    # away while the second runs: its settle fails. Its reservation stood in the counter
    # until it lapsed (lease_s, 15 minutes: 1980 of the budget held for nothing), and was
    # then taken back whole, its 30 missing from the counter until a rebuild.
    url = f"redis://127.0.0.1:{late_redis.port}/0"
    gateway = start(auth(static_key("Limits(budgets=(Budget('0.01', period='lifetime'),))")),
                    quota(redis_store(prefix, url, socket_timeout_s=0.2), store_retry_s=1.0))
    reserved = INPUT + 2 * 1000
    assert gateway.chat(max_tokens=1000).status_code == 200
    assert settled(gateway.committed, reserved) == COST
    assert late_redis.server is not None
    relay = late_redis.server.get_loop()
    mock.push_fault(Fault("slow_first_byte", provider="openai", delay_s=1.0))
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(gateway.chat, max_tokens=1000)
        assert eventually(gateway.committed, COST + reserved) == COST + reserved  # admitted
        asyncio.run_coroutine_threadsafe(late_redis.stop(), relay).result(10)
        assert slow.result(10).status_code == 200
    time.sleep(0.3)  # (the settle fails)
    asyncio.run_coroutine_threadsafe(late_redis.start(), relay).result(10)
    # Once Redis answers again, what the request still holds becomes what it cost, once:
    # settled again and again, it stays so.
    assert eventually(gateway.committed, 2 * COST) == 2 * COST
    time.sleep(2.5)
    assert gateway.committed() == 2 * COST


# -- 4. reconciliation to actual usage ----------------------------------------------------------

LIFETIME_BUDGET = "Limits(budgets=(Budget('0.001', period='lifetime'),))"


def test_non_stream_settles_to_the_reported_usage(start: Start, store: str) -> None:
    gateway = start(auth(static_key(LIFETIME_BUDGET)), quota(store))
    first = gateway.chat(max_tokens=100)
    assert first.status_code == 200
    assert first.json()["usage"]["prompt_tokens"] == INPUT
    assert first.headers["x-sluicegate-budget-remaining"] == "0.000790"  # 1000 - 210 reserved
    assert settled(gateway.committed, RESERVED_100) == COST
    second = gateway.chat(max_tokens=100)
    assert second.headers["x-sluicegate-budget-remaining"] == "0.000760"  # 1000 - 30 - 210


def test_a_json_answer_without_usage_is_billed_its_input_and_its_text(
        start: Start, store: str, mock: MockProviderServer) -> None:
    # Some OpenAI-compatible servers answer without `usage`; such an answer was billed
    # nothing. Now: the input's estimate and the answer's text, four ASCII bytes a token.
    gateway = start(auth(static_key(LIFETIME_BUDGET)), quota(store))
    mock.push_fault(Fault("omit_usage", provider="openai"))
    response = gateway.chat(max_tokens=100)
    assert response.status_code == 200
    assert "usage" not in response.json()
    content = response.json()["choices"][0]["message"]["content"]
    output = (len(content) + 3) // 4
    assert output > 0
    assert settled(gateway.committed, RESERVED_100) == INPUT + 2 * output


def test_stream_settles_to_the_usage_in_the_stream(start: Start, store: str) -> None:
    gateway = start(auth(static_key(LIFETIME_BUDGET)), quota(store))
    response = gateway.chat(max_tokens=100, stream=True)
    assert response.status_code == 200
    assert response.text.endswith("data: [DONE]\n\n")
    chunks = [json.loads(event.removeprefix("data: "))
              for event in response.text.split("\n\n")[:-2]]
    assert [c.get("usage") for c in chunks] == [None] * len(chunks)  # the client did not ask
    assert settled(gateway.committed, RESERVED_100) == COST


def read_events_then_hang_up(url: str, path: str, body: dict[str, Any],
                             headers: dict[str, str], events: int) -> bytes:
    """Reads a stream until `events` SSE events arrived, then closes the connection."""
    received = b""
    with httpx.Client(timeout=10) as client, \
            client.stream("POST", url + path, headers=headers, json=body) as response:
        assert response.status_code == 200
        for chunk in response.iter_raw():
            received += chunk
            if received.count(b"\n\n") >= events:
                break
    return received


def deltas(received: bytes) -> int:
    """The content deltas in a stream's bytes (OpenAI chat, Anthropic or Responses): the
    events that carry output, not a chat stream's opening role chunk or its closing chunk,
    nor an Anthropic message_delta or a Responses lifecycle event."""
    found = 0
    for block in received.split(b"\n\n"):
        data = next((line[6:] for line in block.split(b"\n") if line.startswith(b"data: {")),
                    None)
        event = orjson.loads(data) if data is not None else {}
        delta = event.get("delta")
        if isinstance(delta, str):  # a Responses output_text.delta
            found += bool(delta)
        elif isinstance(delta, dict):  # an Anthropic content_block_delta (or message_delta)
            found += bool(delta.get("text") or delta.get("partial_json"))
        for choice in event.get("choices") or ():
            delta = choice.get("delta") or {}
            found += bool(delta.get("content") or delta.get("tool_calls"))
    return found



def test_client_disconnect_settles_to_input_estimate_plus_deltas_delivered(
        start: Start, store: str, slow: MockProviderServer) -> None:
    # Nothing else arrives between our last read and hang-up, even on a loaded host.
    slow.config.chunk_delay_s = 0.6
    gateway = start(auth(static_key(LIFETIME_BUDGET)), quota(store), upstream=slow.url)
    wait_streams_done(slow)  # an earlier test's stream is not cancelled in this one
    cancelled = slow.cancelled_streams
    received = read_events_then_hang_up(
        gateway.url, "/v1/chat/completions",
        {"model": "gpt-mock", "messages": PROMPT, "max_tokens": 100, "stream": True},
        {"authorization": f"Bearer {TEST_KEY}"}, events=3)
    assert received.count(b"\n\n") == 3
    # No usage came: billed (and charged) what was delivered, one token a content delta (see
    # gateway.tokens.delivered_usage); the first chunk (the role) is none.
    delivered = deltas(received)
    assert delivered == 2
    expected = estimate_messages(PROMPT) + 2 * delivered
    assert settled(gateway.committed, RESERVED_100) == expected
    wait_streams_done(slow)
    assert slow.cancelled_streams == cancelled + 1


def hang_up_before_the_answer(url: str, body: dict[str, Any], wait_s: float) -> None:
    """Sends a chat request on a raw connection and closes it `wait_s` later, unanswered."""
    host, port = url.removeprefix("http://").split(":")
    payload = orjson.dumps(body)
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: gateway\r\n"
                     b"content-type: application/json\r\nauthorization: Bearer " +
                     TEST_KEY.encode() + b"\r\ncontent-length: %d\r\n\r\n" % len(payload) +
                     payload)
        time.sleep(wait_s)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_client_that_leaves_before_the_answer_is_billed_the_input(
        start: Start, store: str, mock: MockProviderServer, stream: bool) -> None:
    # The provider has the request, and bills its input at least; it was billed nothing
    # (a stream cut after it started is billed its input and what it delivered).
    gateway = start(auth(static_key(LIFETIME_BUDGET)), quota(store))
    mock.push_fault(Fault("slow_first_byte", provider="openai", delay_s=3))
    hang_up_before_the_answer(gateway.url, {"model": "gpt-mock", "messages": PROMPT,
                                            "max_tokens": 100, "stream": stream}, wait_s=0.8)
    assert settled(gateway.committed, RESERVED_100) == INPUT
    assert len(mock.requests) == 1


@pytest.mark.parametrize("path,model,headers", [
    ("/v1/messages", "claude-mock", {"x-api-key": TEST_KEY, **ANTHROPIC_HEADERS}),
    ("/v1/chat/completions", "gemini-mock", {"authorization": f"Bearer {TEST_KEY}"}),
])
def test_client_disconnect_from_a_stream_with_partial_usage_charges_the_deltas_delivered(
        start: Start, slow: MockProviderServer, path: str, model: str,
        headers: dict[str, str]) -> None:
    slow.config.chunk_delay_s = 0.6  # (as above)
    gateway = start(auth(static_key(LIFETIME_BUDGET)), quota("'memory'"), upstream=slow.url)
    received = read_events_then_hang_up(
        gateway.url, path,
        {"model": model, "messages": PROMPT, "max_tokens": 100, "stream": True},
        headers, events=6)
    # At least 6 events, 3+ of them content deltas; the others (message_start,
    # content_block_start, ...) are not charged, as they are not billed.
    expected = INPUT + 2 * deltas(received)
    assert settled(gateway.committed, RESERVED_100) == expected
    wait_streams_done(slow)


@pytest.mark.parametrize("stream", [False, True])
def test_upstream_error_before_the_first_byte_costs_nothing(
        start: Start, store: str, mock: MockProviderServer, stream: bool) -> None:
    gateway = start(auth(static_key(LIFETIME_BUDGET)), quota(store))
    mock.push_fault(Fault(kind="status", provider="openai", status=500))
    response = gateway.chat(max_tokens=100, stream=stream)
    assert response.status_code == 500
    # The error carries the quota headers too (as of the admission, before the settle).
    assert response.headers["x-sluicegate-budget-remaining"] == "0.000790"
    assert settled(gateway.committed, RESERVED_100) == 0  # the reservation is given back


def test_a_prompt_cache_write_is_reserved_at_its_dearer_rate(
        start: Start, store: str, mock: MockProviderServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Input Anthropic is asked to cache costs the 1-hour write rate (here 2x fresh input):
    # reserved at the fresh rate, requests near the cap overspent it by their writes. Two
    # keys, each with its first request: what each reserved is the budget less its header.
    monkeypatch.setenv("SG_KEY_B", SECOND_KEY)
    extra = ('models["claude-writes"] = [Deployment("anthropic", "claude-3-5-haiku-latest", '
             'price=Price(input_per_mtok="1", output_per_mtok="2", '
             'cache_write_1h_per_mtok="2"))]\n')
    gateway = start(auth(static_key(LIFETIME_BUDGET, key_id="k-plain"),
                         static_key(LIFETIME_BUDGET, key_id="k-writes", env="SG_KEY_B")),
                    quota(store), extra=extra)
    system = "You answer briefly. " * 40

    def reserved(key: str, cached: bool) -> int:
        block: dict[str, Any] = {"type": "text", "text": system}
        if cached:
            block["cache_control"] = {"type": "ephemeral", "ttl": "1h"}
        response = httpx.post(gateway.url + "/v1/messages", timeout=10, json={
            "model": "claude-writes", "max_tokens": 10, "system": [block], "messages": PROMPT},
            headers={"x-api-key": key, **ANTHROPIC_HEADERS})
        assert response.status_code == 200, response.text
        remaining = Decimal(response.headers["x-sluicegate-budget-remaining"])
        return int((Decimal("0.001") - remaining) * 1_000_000)

    plain, written = reserved(TEST_KEY, False), reserved(SECOND_KEY, True)
    assert plain > 100 + 10 * 2  # the estimated input at $1/M, and the output bound at $2/M
    assert written - plain == plain - 10 * 2  # its input again: written at twice the rate


@pytest.mark.parametrize("cache_status,cost", [("hit", 0), ("semantic-hit", 0), (None, COST)])
def test_a_cache_hit_below_quota_costs_nothing(start: Start, store: str,
                                               mock: MockProviderServer,
                                               cache_status: str | None, cost: int) -> None:
    gateway = start(auth(static_key(LIFETIME_BUDGET)), quota(store),
                    f"Middleware(FixedAnswer, cache_status={cache_status!r})")
    response = gateway.chat(max_tokens=100)
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == "cached"
    assert response.headers["x-sluicegate-budget-remaining"] == "0.000790"
    assert settled(gateway.committed, RESERVED_100) == cost
    assert mock.requests == []


# -- 5. downgrades -------------------------------------------------------------------------------

DOWNGRADING_MODEL = "{'gpt-mock': Limits(rpm=1, on_overflow='downgrade', downgrade_to='azure-mock')}"


def test_model_rpm_overflow_downgrades_to_the_cheaper_model(
        start: Start, store: str, mock: MockProviderServer) -> None:
    gateway = start(auth(static_key("Limits(rpm=100)")),
                    quota(store, model_limits=DOWNGRADING_MODEL))
    first = gateway.chat()
    assert "x-sluicegate-downgraded" not in first.headers
    second = gateway.chat()
    assert second.status_code == 200
    assert second.headers["x-sluicegate-downgraded"] == \
        "gpt-mock -> azure-mock (model 'gpt-mock' requests per minute)"
    assert [r["provider"] for r in mock.requests] == ["openai", "azure"]


def test_a_downgrade_cycle_is_refused_not_a_way_round_every_limit(
        start: Start, store: str, mock: MockProviderServer) -> None:
    # gpt-mock past its rpm goes to azure-mock, which past its own goes back to gpt-mock:
    # there, with both limits overflowed, the request was admitted with nothing checked.
    cycle = ("{'gpt-mock': Limits(rpm=1, on_overflow='downgrade', downgrade_to='azure-mock'), "
             "'azure-mock': Limits(rpm=1, on_overflow='downgrade', downgrade_to='gpt-mock')}")
    gateway = start(auth(), quota(store, model_limits=cycle))
    assert gateway.chat().status_code == 200  # on gpt-mock
    assert gateway.chat().headers["x-sluicegate-downgraded"].startswith("gpt-mock -> azure")
    for _ in range(3):
        refused = gateway.chat()
        assert refused.status_code == 429, refused.text
        assert "x-sluicegate-downgraded" not in refused.headers
    assert [r["provider"] for r in mock.requests] == ["openai", "azure"]


def test_downgrade_to_a_model_without_limits_still_says_so(
        start: Start, store: str, mock: MockProviderServer) -> None:
    gateway = start(auth(), quota(store, model_limits=DOWNGRADING_MODEL))
    gateway.chat()
    second = gateway.chat()
    assert [r["provider"] for r in mock.requests] == ["openai", "azure"]
    assert second.headers["x-sluicegate-downgraded"] == \
        "gpt-mock -> azure-mock (model 'gpt-mock' requests per minute)"


def test_key_rpm_overflow_downgrades_to_the_cheaper_model(
        start: Start, store: str, mock: MockProviderServer) -> None:
    gateway = start(auth(static_key(
        "Limits(rpm=1, on_overflow='downgrade', downgrade_to='azure-mock')")), quota(store))
    assert gateway.chat().status_code == 200
    second = gateway.chat()
    assert second.status_code == 200
    assert second.headers["x-sluicegate-downgraded"].startswith("gpt-mock -> azure-mock")
    # (no limit is left to check on azure-mock: the headers are the overflowed one's alone)
    assert second.headers["x-ratelimit-limit-requests"] == "1"
    assert second.headers["x-ratelimit-remaining-requests"] == "0"
    assert [r["provider"] for r in mock.requests] == ["openai", "azure"]


def test_a_downgraded_response_reports_the_limit_that_overflowed(
        start: Start, store: str, mock: MockProviderServer) -> None:
    # (the overflowed limit was left out of the headers with the checks: the second answer
    # had no x-ratelimit-*-requests at all, and here the key's roomy ones)
    gateway = start(auth(static_key("Limits(rpm=100, tpm=10_000)")),
                    quota(store, model_limits=DOWNGRADING_MODEL))
    assert gateway.chat().headers["x-ratelimit-remaining-requests"] == "0"  # the model's
    second = gateway.chat()
    assert second.headers["x-sluicegate-downgraded"].startswith("gpt-mock -> azure-mock")
    assert second.headers["x-ratelimit-limit-requests"] == "1"
    assert second.headers["x-ratelimit-remaining-requests"] == "0"
    # (a minute, less the moment since the first request took the one request of it)
    assert second.headers["x-ratelimit-reset-requests"] in {"1m0s", *map("{}s".format,
                                                                          range(50, 60))}
    assert second.headers["x-ratelimit-limit-tokens"] == "10000"  # the key's, admitted
    assert [r["provider"] for r in mock.requests] == ["openai", "azure"]


def test_no_downgrade_to_a_model_the_key_may_not_use(
        start: Start, store: str, mock: MockProviderServer) -> None:
    # The key may use gpt-mock only: past its rpm, the cheaper azure-mock is not a way round
    # that, so the limit refuses as if no downgrade were configured.
    key = static_key("Limits(rpm=1, on_overflow='downgrade', downgrade_to='azure-mock')")
    gateway = start(auth(key.replace("limits=", "allowed_models=('gpt-*',), limits=")),
                    quota(store))
    assert gateway.chat(model="azure-mock").status_code == 403
    assert gateway.chat().status_code == 200
    second = gateway.chat()
    assert second.status_code == 429 and "x-sluicegate-downgraded" not in second.headers
    assert second.json()["error"]["code"] == "rate_limit_exceeded"
    assert [r["provider"] for r in mock.requests] == ["openai"]


DOWNGRADING_BUDGET = ("Limits(budgets=(Budget('0.00004', period='daily', on_overflow='downgrade',"
                      " downgrade_to='cheap-mock'),))")


def test_budget_overflow_downgrades_to_the_cheaper_model(
        start: Start, store: str, mock: MockProviderServer) -> None:
    gateway = start(auth(static_key(DOWNGRADING_BUDGET)), quota(store))
    first = gateway.chat()
    assert first.headers["x-sluicegate-budget-remaining"] == "0.000010"
    second = gateway.chat()  # 30 + 30 > 40, but the cheap model's 3 fit
    assert second.status_code == 200
    assert second.headers["x-sluicegate-downgraded"].startswith(
        "gpt-mock -> cheap-mock (key k-test daily budget")
    assert second.headers["x-sluicegate-budget-remaining"] == "0.000007"
    assert [r["json"]["model"] for r in mock.requests] == ["gpt-4o-mini", "cheap-upstream"]
    third = gateway.chat()  # 33 + 30 > 40, but the cheap model's 3 fit
    assert third.headers["x-sluicegate-budget-remaining"] == "0.000004"
    assert eventually(lambda: gateway.committed("daily"), 36) == 36


def test_downgrade_header_names_the_budget_once(start: Start, store: str) -> None:
    gateway = start(auth(static_key(DOWNGRADING_BUDGET)), quota(store))
    gateway.chat()
    assert "budget budget" not in gateway.chat().headers["x-sluicegate-downgraded"]


# -- 6. stream cutoff ----------------------------------------------------------------------------

# 35 micro-dollars. The cut-off counts a stream's content deltas as output tokens, as a stream
# cut short is billed (not its opening role chunk or its closing chunk). These streams set no
# max_tokens, and the quota layer's default_max_output_tokens is OUTPUT (`cutoff_quota`),
# which the provider does not know of: the reservation (30) fits, and a stream of one
# character per event crosses 10 + 2 x deltas > 35 at its 13th delta, so the role chunk and
# 12 deltas are delivered before the error event. (A stream that sets max_tokens, where the
# provider stops, has its admission's room: it is cut only where a failover continuation's
# input takes it, test_quota_cutoff, or where its provider goes past it.)
CUTOFF_BUDGET = "Limits(budgets=(Budget('0.000035', period='lifetime', stream_cutoff=True),))"
CUTOFF_MESSAGE = "The stream was ended because its cost reached what is left of the budget."


def cutoff_quota(store: str) -> str:
    """The quota layer of the cut-off tests: a request without max_tokens reserves OUTPUT."""
    return quota(store, default_max_output_tokens=str(OUTPUT))


def cut_off_stream(gateway: Gateway) -> httpx.Response:
    """An OpenAI chat stream without max_tokens (see CUTOFF_BUDGET)."""
    body = {"model": "gpt-mock", "messages": PROMPT, "stream": True}
    return httpx.post(gateway.url + "/v1/chat/completions", json=body, timeout=10,
                      headers={"authorization": f"Bearer {TEST_KEY}"})


def test_stream_cutoff_ends_the_stream_in_band_and_cancels_upstream(
        start: Start, store: str, slow: MockProviderServer,
        caplog: pytest.LogCaptureFixture) -> None:
    # (An Anthropic stream sets max_tokens, and is cut only when a continuation's input,
    # billed again, takes its room: see test_quota_cutoff.)
    gateway = start(auth(static_key(CUTOFF_BUDGET)), cutoff_quota(store), upstream=slow.url)
    wait_streams_done(slow)  # an earlier test's stream is not cancelled in this one
    cancelled = slow.cancelled_streams
    response = cut_off_stream(gateway)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = response.text.split("\n\n")
    assert events[-1] == ""
    events = events[:-1]
    assert len(events) == 14  # the role chunk, 12 deltas, then the error event
    assert all(json.loads(e.removeprefix("data: "))["object"] == "chat.completion.chunk"
               for e in events[:-1])
    assert json.loads(events[-1].removeprefix("data: ")) == {"error": {
        "message": CUTOFF_MESSAGE, "type": "insufficient_quota", "param": None,
        "code": "budget_exceeded"}}
    assert "[DONE]" not in response.text
    wait_streams_done(slow)
    assert slow.cancelled_streams == cancelled + 1
    # Sending after the end (or a second response start) fails in the server, once the
    # client has its answer; the kernel logs it as an unhandled error.
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_a_stream_within_its_max_tokens_is_not_cut_off(
        start: Start, store: str, slow: MockProviderServer) -> None:
    # An Anthropic stream of max_tokens=10, in 16 events: more than the 12 this budget pays
    # for counted a token each, but 10 of them content deltas (three characters each, about
    # a token, as a provider streams), each counted a token, which the admission reserved.
    slow.config.chunk_chars = 3
    gateway = start(auth(static_key(CUTOFF_BUDGET)), cutoff_quota(store), upstream=slow.url)
    wait_streams_done(slow)
    cancelled = slow.cancelled_streams
    body = {"model": "claude-mock", "messages": PROMPT, "max_tokens": OUTPUT, "stream": True}
    response = httpx.post(gateway.url + "/v1/messages", json=body, timeout=10,
                          headers={"x-api-key": TEST_KEY, **ANTHROPIC_HEADERS})
    assert response.status_code == 200
    events = response.text.split("\n\n")[:-1]
    assert len(events) == 16
    assert deltas(response.content) == 10
    assert events[0].startswith("event: message_start\n")
    assert events[-1].startswith("event: message_stop\n")
    assert "event: error" not in response.text and CUTOFF_MESSAGE not in response.text
    wait_streams_done(slow)
    assert slow.cancelled_streams == cancelled
    expected: int | None = COST  # (what the provider reported)
    assert eventually(lambda: gateway.committed(), expected) == COST


def test_stream_cutoff_ends_a_responses_stream_as_the_live_api_ends_a_failed_one(
        start: Start, store: str, slow: MockProviderServer) -> None:
    """The Responses API's `error` event, numbered after the last event sent, with the
    gateway's code; then `response.failed` for the stream's response (as its
    `response.created` gave it), failed with the ResponseError code chosen for a budget."""
    gateway = start(auth(static_key(CUTOFF_BUDGET)), cutoff_quota(store), upstream=slow.url)
    wait_streams_done(slow)
    with gateway.openai().responses.with_streaming_response.create(
            model="gpt-mock", input=PROMPT[0]["content"], stream=True) as response:
        assert response.status_code == 200
        events = stream_events_of(response.text())
    error = events[-2][1]
    assert (error["code"], error["message"]) == ("budget_exceeded", CUTOFF_MESSAGE)
    failed = failed_ending(events).response
    assert failed.error is not None
    assert (failed.error.code, failed.error.message) == ("rate_limit_exceeded", CUTOFF_MESSAGE)
    assert failed.model_dump(exclude={"status", "error"}) == \
        Response.model_validate(events[0][1]["response"]).model_dump(exclude={"status", "error"})
    assert not any(name == "response.completed" for name, _ in events)
    wait_streams_done(slow)


def test_stream_cutoff_charges_the_deltas_delivered(start: Start, store: str,
                                                    slow: MockProviderServer) -> None:
    gateway = start(auth(static_key(CUTOFF_BUDGET)), cutoff_quota(store), upstream=slow.url)
    response = cut_off_stream(gateway)
    assert response.text.count("\n\n") == 14
    assert deltas(response.content) == 12
    wait_streams_done(slow)
    assert settled(gateway.committed, COST) == INPUT + 2 * 12


# -- 7. Redis unavailable ------------------------------------------------------------------------

async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


class RedisProxy:
    """A TCP proxy in front of Redis, on its own event loop thread; `stop` closes the port
    and drops every connection, `start` opens the same port again."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()

    def _run(self, work: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(work, self._loop).result(5)

    def start(self) -> None:
        self._run(self._start())

    def stop(self) -> None:
        self._run(self._stop())

    def close(self) -> None:
        self.stop()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port,
                                                  reuse_address=True)

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._open):
            writer.transport.abort()
        self._open.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", 6379)
        except OSError:
            writer.transport.abort()
            return
        self._open |= {writer, up_writer}
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        self._open -= {writer, up_writer}


@pytest.fixture
def redis_proxy() -> Iterator[RedisProxy]:
    proxy = RedisProxy()
    proxy.start()
    yield proxy
    proxy.close()


def test_redis_outage_follows_each_limits_store_error_policy(
        start: Start, prefix: str, redis_proxy: RedisProxy,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SG_KEY_B", SECOND_KEY)
    gateway = start(
        auth(static_key("Limits(rpm=3)", key_id="k-open"),
             static_key(LIFETIME_BUDGET, key_id="k-closed", env="SG_KEY_B")),
        quota(redis_store(prefix, redis_proxy.url), store_retry_s="0.2"))
    shared = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    bucket = f"{prefix}:key:k-open:rpm"
    try:
        assert gateway.chat().headers["x-ratelimit-remaining-requests"] == "2"
        assert gateway.chat(key=SECOND_KEY).status_code == 200
        before = shared.hgetall(bucket)
        assert 2 <= float(before["tokens"]) < 2.1

        redis_proxy.stop()
        # "open": the in-process limiter takes over, with its own full bucket of 3.
        assert [gateway.chat().status_code for _ in range(4)] == [200, 200, 200, 429]
        # "closed" (a budget's default): 503 in the caller's shape.
        refused = gateway.chat(key=SECOND_KEY)
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["type"] == "service_unavailable"
        assert refused.json()["error"]["code"] == "quota_store_unavailable"
        assert "key k-closed lifetime budget fails closed" in refused.json()["error"]["message"]
        with pytest.raises(anthropic.APIStatusError) as failure:
            gateway.anthropic(SECOND_KEY).messages.create(
                model="claude-mock", max_tokens=OUTPUT, messages=PROMPT)  # type: ignore[arg-type]
        assert failure.value.status_code == 503
        assert failure.value.response.json()["error"]["type"] == "overloaded_error"
        assert shared.hgetall(bucket) == before  # nothing reached Redis

        redis_proxy.start()  # same port; the gateway is not restarted
        assert eventually(lambda: gateway.chat(key=SECOND_KEY).status_code, 200) == 200
        # The in-process bucket is empty, so a 200 now can only come from Redis.
        assert gateway.chat().status_code == 200
        after = shared.hgetall(bucket)
        assert after["updated"] != before["updated"]
        assert 1 <= float(after["tokens"]) < 1.1
    finally:
        shared.close()


# -- 8. rebuilding budgets after a Redis flush ---------------------------------------------------

@pytest.fixture
def spend_table() -> Iterator[str]:
    table = f"sgq_spend_{uuid.uuid4().hex[:12]}"
    yield table
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(table)))


def ledger_spend(table: str) -> int | None:
    query = sql.SQL("SELECT coalesce(sum(micros), 0) FROM {} WHERE subject_kind = 'key' "
                    "AND subject_id = %s").format(sql.Identifier(table))
    try:
        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            row = conn.execute(query, (KEY_ID,)).fetchone()
    except psycopg.errors.UndefinedTable:
        return None
    return int(row[0]) if row else None


def test_budget_counters_are_rebuilt_from_the_ledger_after_a_flush(
        spend_table: str, prefix: str, start: Start) -> None:
    ledger = f"PostgresSpendLedger({PG_DSN!r}, table={spend_table!r})"
    gateway = start(auth(static_key("Limits(budgets=(Budget('0.001', period='daily'),))")),
                    quota(redis_store(prefix), ledger=ledger))
    assert gateway.chat().headers["x-sluicegate-budget-remaining"] == "0.000970"
    assert gateway.chat().headers["x-sluicegate-budget-remaining"] == "0.000940"
    assert eventually(lambda: ledger_spend(spend_table), 2 * COST) == 2 * COST

    delete_prefix(prefix)  # what FLUSHDB does, to this test's keys only
    assert gateway.committed("daily") is None

    assert gateway.chat().headers["x-sluicegate-budget-remaining"] == "0.000910"
    assert gateway.committed("daily") == 3 * COST


def test_requests_in_flight_across_a_flush_are_held_by_the_rebuilt_counter(
        spend_table: str, prefix: str, start: Start, mock: MockProviderServer) -> None:
    # A budget of 10 requests, all 10 in flight when Redis loses its data. The counter was
    # rebuilt from the ledger alone (nothing settled yet), and admitted 10 more: 600 spent
    # against 300. It holds the gateway's requests in flight again: the next is refused.
    ledger = f"PostgresSpendLedger({PG_DSN!r}, table={spend_table!r})"
    gateway = start(auth(static_key("Limits(budgets=(Budget('0.0003', period='daily'),))")),
                    quota(redis_store(prefix), ledger=ledger))
    client = gateway.openai()

    def create() -> Any:
        return client.chat.completions.create(model="gpt-mock", messages=PROMPT,  # type: ignore[arg-type]
                                              max_tokens=OUTPUT)

    for _ in range(10):
        mock.push_fault(Fault("slow_first_byte", provider="openai", delay_s=3))
    with ThreadPoolExecutor(10) as pool:
        in_flight = [pool.submit(create) for _ in range(10)]
        assert eventually(lambda: gateway.committed("daily"), 10 * COST) == 10 * COST
        delete_prefix(prefix)  # what FLUSHDB does, to this test's keys only
        with pytest.raises(openai.APIStatusError) as refused:
            create()
        assert refused.value.status_code == 402
        assert [f.result(10).usage.total_tokens for f in in_flight] == [INPUT + OUTPUT] * 10
    assert eventually(lambda: ledger_spend(spend_table), 10 * COST) == 10 * COST
    assert gateway.committed("daily") == 10 * COST  # each settle replaced its reservation


def settled_while_lost(prefix: str, period: str = "daily") -> dict[bytes, bytes]:
    """The settles kept beside a lost budget counter, by request id."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        return client.hgetall(f"{prefix}:{budget_check(period).key}:settled")
    finally:
        client.close()


@pytest.mark.parametrize("written", [False, True], ids=["unwritten", "written"])
def test_another_gateways_settles_while_a_counter_is_lost_are_counted(
        spend_table: str, prefix: str, start: Start, mock: MockProviderServer,
        written: bool) -> None:
    # Two gateways share Redis and the spend ledger, a budget of 10 requests. B has 8 in
    # flight when Redis loses its data; they settle before the counter is seeded again.
    # Those settles changed nothing, and A rebuilt the counter from the ledger, where B had
    # not written them yet: A admitted 9 more (540 spent against 300). Now the seed adds
    # them, unless the ledger has them by then (`written`), which then counts them once.
    key = static_key("Limits(budgets=(Budget('0.0003', period='daily'),))")
    a = start(auth(key), quota(redis_store(prefix), ledger=(
        f"PostgresSpendLedger({PG_DSN!r}, table={spend_table!r})")))
    interval = 0.2 if written else 600  # (B writes its rows at once, or after this test)
    b = start(auth(key), quota(redis_store(prefix), ledger=(
        f"PostgresSpendLedger({PG_DSN!r}, table={spend_table!r}, "
        f"flush_interval_s={interval})")))
    assert a.openai().chat.completions.create(
        model="gpt-mock", messages=PROMPT, max_tokens=OUTPUT).usage is not None  # type: ignore[arg-type]
    for _ in range(8):
        mock.push_fault(Fault("slow_first_byte", provider="openai", delay_s=2))
    with ThreadPoolExecutor(8) as pool:
        in_flight = [pool.submit(b.chat) for _ in range(8)]
        assert eventually(lambda: b.committed("daily"), 9 * COST) == 9 * COST
        delete_prefix(prefix)  # what FLUSHDB does, to this test's keys only
        assert [f.result(10).status_code for f in in_flight] == [200] * 8
    eventually(lambda: len(settled_while_lost(prefix)), 8)  # (B's settles are in)
    if written:
        assert eventually(lambda: ledger_spend(spend_table), 9 * COST) == 9 * COST
    assert [a.chat().status_code for _ in range(3)] == [200, 402, 402]
    assert a.committed("daily") == 10 * COST
    assert settled_while_lost(prefix) == {}


def open_budget_of_five(start: Start, prefix: str, spend_table: str, redis_proxy: RedisProxy,
                        store_retry_s: str) -> Gateway:
    """A gateway whose key has a lifetime budget of 5 requests that stays open while Redis
    (behind `redis_proxy`) is down, with a spend ledger."""
    ledger = f"PostgresSpendLedger({PG_DSN!r}, table={spend_table!r})"
    budget = "Budget('0.00015', period='lifetime', on_store_error='open')"
    return start(auth(static_key(f"Limits(budgets=({budget},))")),
                 quota(redis_store(prefix, redis_proxy.url), ledger=ledger,
                       store_retry_s=store_retry_s))


def test_an_open_budget_is_counted_afresh_from_the_ledger_in_each_redis_outage(
        spend_table: str, prefix: str, start: Start, redis_proxy: RedisProxy) -> None:
    # A budget of 5 requests that stays open while Redis is down. Outage 1: 2 go through
    # the in-process fallback. Redis back: 3 more fill the budget there. Outage 2: the
    # fallback still counted 2 (what went through Redis was never in it), and let 3 more
    # past the cap; it is counted again from the ledger now, and refuses.
    gateway = open_budget_of_five(start, prefix, spend_table, redis_proxy, '0.2')
    redis_proxy.stop()
    assert [gateway.chat().status_code for _ in range(2)] == [200, 200]
    redis_proxy.start()
    assert eventually(lambda: ledger_spend(spend_table), 2 * COST) == 2 * COST
    assert eventually(lambda: gateway.chat().status_code, 200) == 200  # (Redis again)
    assert [gateway.chat().status_code for _ in range(3)] == [200, 200, 402]
    assert eventually(lambda: ledger_spend(spend_table), 5 * COST) == 5 * COST
    redis_proxy.stop()
    refused = gateway.chat()
    assert refused.status_code == 402, refused.text
    assert ledger_spend(spend_table) == 5 * COST


def test_what_an_open_budget_spent_in_a_redis_outage_is_added_to_its_counter_in_redis(
        spend_table: str, prefix: str, start: Start, redis_proxy: RedisProxy) -> None:
    # A budget of 5 requests. 2 through Redis; in an outage 2 more through the in-process
    # fallback (seeded from the ledger: 4 spent). Redis, back, still counted 2 and let 3
    # more through: 7 requests against a cap of 5.
    gateway = open_budget_of_five(start, prefix, spend_table, redis_proxy, '0.2')
    assert [gateway.chat().status_code for _ in range(2)] == [200, 200]
    assert eventually(lambda: ledger_spend(spend_table), 2 * COST) == 2 * COST
    redis_proxy.stop()
    assert [gateway.chat().status_code for _ in range(2)] == [200, 200]
    redis_proxy.start()
    assert eventually(gateway.committed, 4 * COST) == 4 * COST  # (handed over)
    assert [gateway.chat().status_code for _ in range(2)] == [200, 402]
    assert eventually(lambda: ledger_spend(spend_table), 5 * COST) == 5 * COST
    assert gateway.committed() == 5 * COST


def test_a_second_redis_outage_soon_after_the_first_counts_an_open_budget_afresh(
        spend_table: str, prefix: str, start: Start, redis_proxy: RedisProxy) -> None:
    # A budget of 5 requests. 1 through Redis, 2 through the fallback in an outage, handed
    # over to Redis when it is back, 2 more through Redis: the budget is spent. Redis drops
    # again a moment later: a new outage began only once the last failure was 5 s old
    # (3 x store_retry_s + 2), so the fallback still counted 3, and let 2 more past the cap.
    gateway = open_budget_of_five(start, prefix, spend_table, redis_proxy, '1')
    assert gateway.chat().status_code == 200
    assert eventually(lambda: ledger_spend(spend_table), COST) == COST
    redis_proxy.stop()
    assert [gateway.chat().status_code for _ in range(2)] == [200, 200]
    redis_proxy.start()
    assert eventually(gateway.committed, 3 * COST) == 3 * COST  # (handed over)
    assert [gateway.chat().status_code for _ in range(3)] == [200, 200, 402]
    assert eventually(lambda: ledger_spend(spend_table), 5 * COST) == 5 * COST
    redis_proxy.stop()
    assert [gateway.chat().status_code for _ in range(2)] == [402, 402]
    assert ledger_spend(spend_table) == 5 * COST


def test_a_request_the_fallback_admitted_settles_in_redis_once_redis_is_back(
        spend_table: str, prefix: str, start: Start, redis_proxy: RedisProxy,
        mock: MockProviderServer) -> None:
    # Its reservation (210) is handed to Redis with the fallback's spend when Redis answers
    # again; what it costs in the end (30) replaces it there when it ends.
    ledger = f"PostgresSpendLedger({PG_DSN!r}, table={spend_table!r})"
    budget = "Budget('0.001', period='lifetime', on_store_error='open')"
    gateway = start(auth(static_key(f"Limits(budgets=({budget},))")),
                    quota(redis_store(prefix, redis_proxy.url), ledger=ledger,
                          store_retry_s="0.2"))
    assert gateway.chat().status_code == 200
    assert eventually(lambda: ledger_spend(spend_table), COST) == COST
    redis_proxy.stop()
    mock.push_fault(Fault("slow_first_byte", provider="openai", delay_s=2.0))
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(gateway.chat, max_tokens=100)
        assert eventually(lambda: mock.pending_faults, []) == []  # (the fallback admitted it)
        redis_proxy.start()
        assert eventually(gateway.committed, COST + RESERVED_100) == COST + RESERVED_100
        assert slow.result(10).status_code == 200
    assert eventually(gateway.committed, 2 * COST) == 2 * COST
    assert eventually(lambda: ledger_spend(spend_table), 2 * COST) == 2 * COST


def test_an_open_budget_whose_ledger_is_down_too_is_a_503(
        prefix: str, start: Start, redis_proxy: RedisProxy) -> None:
    # Redis down: the fallback needs the budget's spend, and the ledger cannot say (it was
    # a 500, a traceback in the log).
    unreachable = f"host=127.0.0.1 port={free_port()} user=root dbname=test connect_timeout=1"
    budget = "Budget('0.00015', period='lifetime', on_store_error='open')"
    gateway = start(auth(static_key(f"Limits(budgets=({budget},))")),
                    quota(redis_store(prefix, redis_proxy.url),
                          ledger=f"PostgresSpendLedger({unreachable!r})", store_retry_s="0.2"))
    redis_proxy.stop()
    refused = gateway.chat()
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "quota_store_unavailable"
    assert refused.headers["retry-after"] == "1"


def test_spend_is_dated_when_the_request_started(
        spend_table: str, prefix: str, start: Start, slow: MockProviderServer) -> None:
    # The usage ledger bills a request on the day it started, and its budget counter is
    # charged in the period it was admitted in; the spend ledger dated it when it settled,
    # so a stream that ran past midnight UTC was counted in the next day's budget by a
    # counter rebuilt after a flush (and missing from its own day's).
    ledger = f"PostgresSpendLedger({PG_DSN!r}, table={spend_table!r})"
    gateway = start(auth(static_key("Limits(budgets=(Budget('0.001', period='daily'),))")),
                    quota(redis_store(prefix), ledger=ledger), upstream=slow.url)
    wait_streams_done(slow)
    began = time.time()
    response = gateway.chat(stream=True)  # one character every 0.1 s: about 3 s
    ended = time.time()
    assert response.status_code == 200 and ended - began > 2
    assert eventually(lambda: ledger_spend(spend_table), COST) == COST
    query = sql.SQL("SELECT extract(epoch FROM ts) FROM {} WHERE subject_kind = 'key'"
                    ).format(sql.Identifier(spend_table))
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        row = conn.execute(query).fetchone()
    assert row is not None and began <= float(row[0]) < began + 1


# -- 9. budget alerts ----------------------------------------------------------------------------

class AlertReceiver:
    """An ASGI app that records every POST body, answering `statuses` to the first POSTs,
    200 to the others."""

    def __init__(self, statuses: tuple[int, ...] = ()) -> None:
        self.posts: list[tuple[str, Any]] = []
        self.statuses = list(statuses)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                done = message["type"] == "lifespan.shutdown"
                await send({"type": message["type"] + ".complete"})
                if done:
                    return
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        status = 200
        if scope["method"] == "POST":
            self.posts.append((scope["path"], json.loads(body)))
            status = self.statuses.pop(0) if self.statuses else 200
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})


def test_budget_alerts_once_per_threshold(start: Start, store: str,
                                          caplog: pytest.LogCaptureFixture) -> None:
    receiver = AlertReceiver()
    with ThreadedServer(receiver) as hook, \
            caplog.at_level(logging.WARNING, logger="sluicegate.alerts"):
        gateway = start(auth(static_key("Limits(budgets=(Budget('0.0003', period='daily'),))")),
                        quota(store, alert_webhook_url=repr(hook.url + "/hook")))
        # 30 each: 50% at the 5th, 80% at the 8th, 100% at the 10th. Waiting for each alert
        # before the next request keeps the order (a settle runs after its response).
        for alerts in (0, 0, 0, 0, 1, 1, 1, 2, 2, 3):
            assert gateway.chat().status_code == 200
            assert eventually(lambda: len(receiver.posts), alerts) == alerts
        time.sleep(0.3)  # room for a duplicate to arrive, if one were coming
    start_of_day, _ = period_bounds("daily", datetime.now(UTC))
    expected = [{"event": "budget_threshold", "threshold_percent": percent,
                 "subject_kind": "key", "subject_id": KEY_ID, "period": "daily",
                 "period_start": start_of_day.isoformat(), "limit_usd": "0.0003",
                 "used_usd": used} for percent, used in ((50, "0.00015"), (80, "0.00024"),
                                                         (100, "0.0003"))]
    assert receiver.posts == [("/hook", event) for event in expected]
    logged = [json.loads(r.getMessage()) for r in caplog.records
              if r.name == "sluicegate.alerts"]
    assert logged == expected


def test_a_budget_that_refuses_alerts_at_100_percent(start: Start, store: str) -> None:
    # Each request reserves 210 (max_tokens=100) and costs 30: admissions keep the committed
    # spend and the reservation within 300, so no settle brings the budget to 100%. Its
    # alert never came, while every request after the 4th was refused.
    receiver = AlertReceiver()
    with ThreadedServer(receiver) as hook:
        gateway = start(auth(static_key("Limits(budgets=(Budget('0.0003', period='daily'),))")),
                        quota(store, alert_webhook_url=repr(hook.url + "/hook")))
        statuses = [gateway.chat(max_tokens=100).status_code for _ in range(6)]
        assert statuses == [200, 200, 200, 200, 402, 402]
        assert eventually(lambda: len(receiver.posts), 1) == 1
        time.sleep(0.3)  # room for a duplicate to arrive, if one were coming
    # (40% spent: refusing a request that needs 210 of the 180 left, the budget is at its end)
    assert [(event["threshold_percent"], event["used_usd"]) for _, event in receiver.posts] \
        == [(100, "0.00012")]


def test_a_budget_alert_the_webhook_failed_to_take_is_sent_again(
        start: Start, store: str) -> None:
    # The webhook answers the first POST 503: the alert was lost (its marker was set
    # before the POST, so no gateway sent it again).
    receiver = AlertReceiver(statuses=(503,))
    with ThreadedServer(receiver) as hook:
        gateway = start(auth(static_key("Limits(budgets=(Budget('0.0003', period='daily'),))")),
                        quota(store, alert_webhook_url=repr(hook.url + "/hook")))
        assert [gateway.chat().status_code for _ in range(5)] == [200] * 5  # 50% at the 5th
        assert eventually(lambda: len(receiver.posts), 2) == 2
    sent, again = receiver.posts
    assert sent == again
    assert (again[1]["threshold_percent"], again[1]["used_usd"]) == (50, "0.00015")


def test_budget_alerts_count_requests_in_flight_at_their_cost_not_their_reservation(
        start: Start, store: str, mock: MockProviderServer) -> None:
    # 12 requests at once, each reserving 210 (max_tokens=100) and costing 30, against a
    # budget of 3000: one settling while the others ran saw 2550 committed, and alerted at
    # 50% and 80% "used" for a budget 12% spent.
    receiver = AlertReceiver()
    mock.config.update({"ttft_s": 0.5})
    try:
        with ThreadedServer(receiver) as hook:
            gateway = start(auth(static_key("Limits(budgets=(Budget('0.003', "
                                            "period='daily'),))")),
                            quota(store, alert_webhook_url=repr(hook.url + "/hook")))
            with ThreadPoolExecutor(12) as pool:
                statuses = list(pool.map(lambda _: gateway.chat(max_tokens=100).status_code,
                                         range(12)))
            assert statuses == [200] * 12
            assert eventually(lambda: gateway.committed("daily"), 12 * COST) == 12 * COST
            time.sleep(0.3)  # room for an alert to arrive, if one were coming
    finally:
        mock.config.update({"ttft_s": 0.0})
    assert receiver.posts == []


def test_a_threshold_reached_by_requests_settling_out_of_order_is_alerted(
        start: Start, store: str, mock: MockProviderServer) -> None:
    # A (slow) and B (fast) cost 30 each against 100. B settles first: its estimate (A's
    # reservation and its own cost: 60) crossed 50%, but the spend was 30, so it waited; A's
    # estimate (30, from its admission) crossed nothing. The budget ended 60% spent, never
    # alerted at 50%.
    receiver = AlertReceiver()
    with ThreadedServer(receiver) as hook:
        gateway = start(auth(static_key("Limits(budgets=(Budget('0.0001', "
                                        "period='daily'),))")),
                        quota(store, alert_webhook_url=repr(hook.url + "/hook")))
        mock.push_fault(Fault("slow_first_byte", delay_s=1.0))
        with ThreadPoolExecutor(1) as pool:
            slow = pool.submit(gateway.chat)
            time.sleep(0.3)
            assert gateway.chat().status_code == 200
            assert slow.result().status_code == 200
        assert eventually(lambda: gateway.committed("daily"), 2 * COST) == 2 * COST
        assert eventually(lambda: len(receiver.posts), 1) == 1
        time.sleep(0.3)  # room for a duplicate to arrive, if one were coming
    assert [(event["threshold_percent"], event["used_usd"]) for _, event in receiver.posts] \
        == [(50, "0.00006")]


def test_budget_alerts_once_per_threshold_across_gateways(
        start: Start, prefix: str) -> None:
    """Two gateways sharing Redis: the threshold marker in Redis, not each process's memory,
    makes the alert go out once."""
    receiver = AlertReceiver()
    with ThreadedServer(receiver) as hook:
        layers = (auth(static_key("Limits(budgets=(Budget('0.0003', period='daily'),))")),
                  quota(redis_store(prefix), alert_webhook_url=repr(hook.url + "/hook")))
        gateways = [start(*layers), start(*layers)]
        # The 5th request (gateway 0) crosses 50%, the 8th (gateway 1) 80%.
        for index, alerts in enumerate((0, 0, 0, 0, 1, 1, 1, 2, 2)):
            assert gateways[index % 2].chat().status_code == 200
            assert eventually(lambda: len(receiver.posts), alerts) == alerts
        time.sleep(0.3)  # room for a duplicate to arrive, if one were coming
    assert [(path, event["threshold_percent"], event["used_usd"])
            for path, event in receiver.posts] == [("/hook", 50, "0.00015"),
                                                    ("/hook", 80, "0.00024")]


# -- 10. quota without auth ----------------------------------------------------------------------

def test_gateway_wide_limits_apply_to_anonymous_callers(start: Start, store: str,
                                                        prefix: str) -> None:
    gateway = start(quota(store, limits="Limits(rpm=2)"))
    first = gateway.chat(key=None)
    assert first.status_code == 200
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert gateway.chat(key=None).status_code == 200
    refused = gateway.chat(key=None)
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert "2 requests per minute" in refused.json()["error"]["message"]
    if "Redis" in store:
        shared = redis.Redis.from_url(REDIS_URL)
        try:
            assert shared.exists(f"{prefix}:global:all:rpm") == 1
        finally:
            shared.close()


def test_gateway_wide_refusal_reads_as_a_sentence(start: Start) -> None:
    gateway = start(quota("'memory'", limits="Limits(rpm=1)"))
    gateway.chat(key=None)
    assert "The gateway-wide may" not in gateway.chat(key=None).json()["error"]["message"]


def test_a_gateway_wide_budget_refusal_reads_as_a_sentence(start: Start) -> None:
    gateway = start(quota("'memory'", limits="Limits(budgets=(Budget('0.00001', "
                                             "period='lifetime'),))"))
    message = gateway.chat(key=None).json()["error"]["message"]
    assert message == ("Budget exceeded: the gateway-wide lifetime budget of $0.00001 USD does "
                       "not leave enough for this request; it does not reset.")


# -- 11. admin usage -----------------------------------------------------------------------------

def test_admin_usage_reports_committed_spend(start: Start, store: str,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SG_QUOTA_ADMIN", ADMIN_TOKEN)
    gateway = start(auth(static_key("Limits(budgets=(Budget('0.001', period='daily'),))")),
                    quota(store, admin_token_env="'SG_QUOTA_ADMIN'"))
    url = gateway.url + f"/admin/usage/key/{KEY_ID}"
    admin = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    # (one code for each way a request lacks the token, as on the auth layer's routes)
    for headers, code in (({}, "missing_admin_token"),
                          ({"authorization": "Bearer not-the-admin-token-at-all"},
                           "invalid_admin_token"),
                          ({"authorization": f"Bearer {TEST_KEY}"}, "virtual_key_not_admin")):
        refused = httpx.get(url, headers=headers)
        assert refused.status_code == 401
        error = refused.json()["error"]
        assert (error["type"], error["param"], error["code"]) == (
            "authentication_error", None, code)
        assert refused.headers["www-authenticate"] == 'Bearer realm="sluicegate-admin"'


    now = datetime.now(UTC)

    def usage(daily: str | None) -> dict[str, Any]:
        return {"kind": "key", "subject": KEY_ID, "periods": {
            period: {"period_start": period_bounds(period, now)[0].isoformat(),
                     "committed_usd": daily if period == "daily" else None}
            for period in ("daily", "weekly", "monthly", "lifetime")}}

    assert httpx.get(url, headers=admin).json() == usage(None)
    assert gateway.chat().status_code == 200
    assert gateway.chat().status_code == 200
    shown = httpx.get(url, headers=admin)
    assert shown.status_code == 200
    assert shown.json() == usage("0.00006")


def test_a_responses_follow_up_reserves_the_conversation_it_is_billed(
        start: Start, store: str, mock: MockProviderServer) -> None:
    """A follow-up naming `previous_response_id` is billed the stored conversation as input
    (the mock, as OpenAI, bills it); its body holds only the new turn. Six at once, each
    billed about 4,000 micro-dollars, against the 16,000 a 20,000 budget has left after the
    first call: before, each reserved its body's few tokens, all six were admitted, and the
    budget was spent to about 28,000."""
    gateway = start(auth(static_key("Limits(budgets=(Budget('0.02', period='lifetime'),))")),
                    quota(store))
    headers = {"authorization": f"Bearer {TEST_KEY}"}
    history = " ".join(f"w{n}" for n in range(4000))  # 4,000 tokens to the mock
    first = httpx.post(gateway.url + "/v1/responses", headers=headers, timeout=10, json={
        "model": "gpt-mock", "input": history, "max_output_tokens": 16})
    assert first.status_code == 200, first.text
    usage = first.json()["usage"]  # ($1 per 1M input tokens, $2 per 1M output)
    cost = usage["input_tokens"] + 2 * usage["output_tokens"]
    assert eventually(lambda: gateway.committed("lifetime"), cost) == cost
    assert 4000 <= cost < 4100

    def follow_up(_: int) -> int:
        return httpx.post(gateway.url + "/v1/responses", headers=headers, timeout=10, json={
            "model": "gpt-mock", "input": "go on", "max_output_tokens": 16,
            "previous_response_id": first.json()["id"]}).status_code

    mock.config.update({"ttft_s": 0.5})
    try:
        with ThreadPoolExecutor(6) as pool:
            statuses = sorted(pool.map(follow_up, range(6)))
    finally:
        mock.config.update({"ttft_s": 0.0})
    assert statuses == [200] * 3 + [402] * 3
    time.sleep(0.3)
    assert (gateway.committed("lifetime") or 0) <= 20_000


def test_the_ledger_is_a_spend_ledger_or_its_dsn_and_nothing_else() -> None:
    # A DSN given as the ledger (as MeteringMiddleware's store takes one) was kept as a
    # string, never started, and every budgeted request got a 503 while /readyz said ready.
    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("not called")

    given = QuotaMiddleware(app, ledger=PG_DSN).ledger
    assert isinstance(given, PostgresSpendLedger)
    assert PG_DSN not in repr(given)
    ledger = PostgresSpendLedger(PG_DSN)
    assert QuotaMiddleware(app, ledger=ledger).ledger is ledger
    for wrong, says in (("redis://:hunter2@127.0.0.1:6379/0", "a PostgreSQL DSN"),
                        (5, "not a int"), (object(), "not a object")):
        with pytest.raises(ConfigError) as refused:
            QuotaMiddleware(app, ledger=wrong)
        assert "QuotaMiddleware ledger must be" in str(refused.value)
        assert says in str(refused.value)
        assert "hunter2" not in str(refused.value)
