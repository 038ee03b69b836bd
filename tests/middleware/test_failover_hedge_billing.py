"""A hedged request is billed exactly, whichever call wins and however durably it is metered.

Stack in the README's order: auth (a key with a lifetime budget), metering (its journal is
the ledger; `durability` "batch" and "response"), quota on Redis, the exact cache, failover
with `hedge_after_s=0.3` over two deployments priced apart (a bill at the wrong
deployment's price shows). Clients are the official SDKs: OpenAI chat to `pair` (two OpenAI
deployments), Anthropic messages to `mix` (an Anthropic deployment, then an OpenAI one).

Each request meets faults (matched by a marker in its prompt) that decide the race: the first
call slow to start, so the hedge is sent, and either it or the hedge wins; or the first call
opens its stream (the provider began answering: an Anthropic `message_start` with the input
count, OpenAI's role chunk) and stalls before any content, and the hedge wins. Then the
request's row in the ledger must be what the mock providers billed for its calls (their
bills, `MockConfig.record_bills`), by the README's rules: the winner's usage at its own
deployment's price; the loser, cancelled before it sent the client anything, is not billed
(README: "a hedge's cancelled call"); both calls are attempts. The budget is settled to the
same amount.

With `durability="response"` the metering layer records the request as the response's last
message passes it, before the failover layer has seen the winner's call end.
"""
from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import orjson
import pytest

from gateway import create_app
from gateway.kernel import Kernel
from middleware.metering import UsageRecord
from middleware.quota import QuotaMiddleware
from tests.harness import TEST_KEY, ThreadedServer, mock_config, write_config
from tests.middleware.test_exact_billing_sweep import reported, wait_until
from tests.middleware.test_metering_below_failover import journaled
from tests.middleware.test_quota_layer import budget_check, delete_prefix, hang_up_before_the_answer
from tests.mock_providers import Fault, MockConfig, MockProviderServer

REDIS_URL = "redis://127.0.0.1:6379/0"
KEY_ID = "k-hedge"
HEDGE_AFTER_S = 0.3
# (provider, upstream model) -> micro-dollars per input, output token.
PRICES = {("openai", "gpt-4o-mini"): (1, 2), ("openai", "gpt-4o"): (3, 5),
          ("anthropic", "claude-3-5-haiku-latest"): (2, 4)}
MODELS = '''
models = {
    "pair": [Deployment("openai", "gpt-4o-mini", price=Price("1", "2")),
             Deployment("openai", "gpt-4o", price=Price("3", "5"))],
    "mix": [Deployment("anthropic", "claude-3-5-haiku-latest", price=Price("2", "4")),
            Deployment("openai", "gpt-4o-mini", price=Price("1", "2"))],
}
'''
# api -> (the model it asks for, its deployments in the order the route calls them)
APIS = {"chat": ("pair", ("openai/gpt-4o-mini", "openai/gpt-4o")),
        "messages": ("mix", ("anthropic/claude-3-5-haiku-latest", "openai/gpt-4o-mini"))}
# scenario -> (the faults of the first call and of the hedge, in the order they reach the
# mock: the hedge 0.3 s after the first; which call wins)
SCENARIOS: dict[str, tuple[list[Fault], int]] = {
    "first_wins": ([Fault("slow_first_byte", delay_s=0.9), Fault("slow_first_byte",
                                                                 delay_s=2.0)], 0),
    "hedge_wins": ([Fault("slow_first_byte", delay_s=2.0)], 1),
    # (streams only: the first call's provider sends its opening events, then nothing)
    "hedge_wins_over_an_open_stream": ([Fault("stall", after_chunks=0, delay_s=2.0)], 1),
}
CASES = [(scenario, stream) for scenario in SCENARIOS for stream in (False, True)
         if stream or scenario != "hedge_wins_over_an_open_stream"]


@pytest.fixture(scope="module")
def billing_mock() -> Iterator[MockProviderServer]:
    with MockProviderServer(MockConfig(record_bills=True)) as server:
        yield server


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    value = f"{{sgh-{uuid.uuid4().hex}}}"
    yield value
    delete_prefix(value)


AUTH = (f"Middleware(AuthMiddleware, keys=[StaticKey('tests', key_env='SG_TEST_KEY', "
        f"id={KEY_ID!r}, limits=Limits(budgets=(Budget('100', period='lifetime'),)))])")
FAILOVER = ("Middleware(FailoverMiddleware, breaker=NEVER_OPENS, retry=RetryPolicy("
            "max_attempts=3, budget_ratio=1.0, budget_min_per_s=1000), routes={name: Route("
            f"strategy='priority', hedge_after_s={HEDGE_AFTER_S}) for name in models}})")


def config_file(tmp_path: Path, mock_url: str, durability: str, prefix: str,
                failover: str | None = None) -> Path:
    metering = (f"Middleware(MeteringMiddleware, journal_dir={str(tmp_path / 'journal')!r}, "
                f"durability={durability!r}, flush_interval_s=0.05)")
    quota = f"Middleware(QuotaMiddleware, store=RedisQuotaStore({REDIS_URL!r}, prefix={prefix!r}))"
    layers = [AUTH, metering, quota, "Middleware(CacheMiddleware)",
              failover or FAILOVER]  # (the README's order)
    extra = ("from middleware.failover import Route\n"
             "from middleware.quota import RedisQuotaStore\n"
             + MODELS + f"middleware = [{', '.join(layers)}]\n")
    return write_config(tmp_path, mock_config(mock_url, middleware="none", extra=extra))


def ask(url: str, api: str, marker: str, stream: bool) -> tuple[str, str]:
    """Sends the request and reads its answer whole: (its request id, the deployment)."""
    model, _ = APIS[api]
    text = f"{marker} say something"
    if api == "chat":
        client: Any = openai.OpenAI(base_url=url + "/v1", api_key=TEST_KEY, max_retries=0,
                                    timeout=20)
        raw: Any = client.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": text}], max_tokens=30,
            stream=stream, stream_options={"include_usage": True} if stream else None)
    else:
        client = anthropic.Anthropic(base_url=url, api_key=TEST_KEY, max_retries=0,
                                     timeout=20)
        raw = client.messages.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": text}], max_tokens=30,
            stream=stream)
    answer = raw.parse()
    if stream:
        assert len(list(answer)) > 3
    return raw.headers["x-request-id"], raw.headers["x-sluicegate-deployment"]


def bills_of(mock: MockProviderServer, marker: str) -> list[dict[str, Any]]:
    return [bill for bill in mock.bills if marker in orjson.dumps(bill["json"]).decode()]


def billed(bills: list[dict[str, Any]]) -> tuple[int, int, int]:
    """(input tokens, output tokens, micro-dollars) of the calls that answered whole, at
    their deployments' prices; a call cancelled before it sent content bills nothing."""
    input_tokens = output_tokens = micros = 0
    for bill in bills:
        if not bill["complete"]:
            assert bill["content_sent"] == 0, bill  # (the loser sent the client nothing)
            continue
        price = PRICES[(bill["provider"], bill["json"]["model"])]
        used_in, used_out = reported(bill)
        input_tokens, output_tokens = input_tokens + used_in, output_tokens + used_out
        micros += price[0] * used_in + price[1] * used_out
    return input_tokens, output_tokens, micros


@pytest.mark.parametrize("scenario,stream", CASES)
@pytest.mark.parametrize("api", sorted(APIS))
@pytest.mark.parametrize("durability", ["batch", "response"])
def test_a_hedged_request_is_billed_what_its_providers_billed(
        billing_mock: MockProviderServer, tmp_path: Path, redis_prefix: str, durability: str,
        api: str, scenario: str, stream: bool) -> None:
    mock = billing_mock
    marker = f"zh{uuid.uuid4().hex[:12]}x"
    faults, winner = SCENARIOS[scenario]
    for fault in faults:
        mock.push_fault(dataclasses.replace(fault, match=marker))
    app = create_app(config_file(tmp_path, mock.url, durability, redis_prefix))
    assert isinstance(app, Kernel)
    quota = next(c for c in app.components if isinstance(c, QuotaMiddleware))
    with ThreadedServer(app) as server:
        request_id, deployment = ask(server.url, api, marker, stream)
        # (the loser's provider ends its call in its own time: its bill comes then)
        assert wait_until(lambda: len(bills_of(mock, marker)) == 2
                          and mock.active_streams == 0)
        bills = bills_of(mock, marker)
        expected = billed(bills)

        def spent() -> int | None:
            value: int | None = server.run(quota.store.committed(
                [budget_check("lifetime", f"key:{KEY_ID}")]))[0]
            return value
        wait_until(lambda: spent() == expected[2], 5)
        budget = spent()
    assert deployment == APIS[api][1][winner]
    [loser] = [bill for bill in bills
               if f"{bill['provider']}/{bill['json']['model']}" != deployment]
    assert loser["status"] == 200 and not loser["complete"]  # (it was called, and cut off)
    if scenario == "hedge_wins_over_an_open_stream":
        assert loser["sent"] and loser["content_sent"] == 0  # (the provider began answering)
    [record] = [r for r in journaled(tmp_path / "journal") if r.request_id == request_id]
    assert row(record) == (deployment, 200, 2, *expected)
    assert budget == expected[2]


def row(record: UsageRecord) -> tuple[Any, ...]:
    return (record.deployment, record.status, record.attempts, record.input_tokens,
            record.output_tokens, record.cost_micros)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_hedged_request_whose_client_leaves_before_an_answer_is_billed_its_input(
        billing_mock: MockProviderServer, tmp_path: Path, redis_prefix: str,
        stream: bool) -> None:
    # Both calls slow to start, and the client leaves before either answers: the request is
    # billed its estimated input at the first call's deployment, as an unhedged one is
    # (providers.base); the hedge, a loser, is not. It was billed nothing.
    mock = billing_mock
    marker = f"zh{uuid.uuid4().hex[:12]}x"
    for _ in range(2):
        mock.push_fault(Fault("slow_first_byte", delay_s=3.0, match=marker))
    app = create_app(config_file(tmp_path, mock.url, "batch", redis_prefix))
    assert isinstance(app, Kernel)
    quota = next(c for c in app.components if isinstance(c, QuotaMiddleware))
    with ThreadedServer(app) as server:
        hang_up_before_the_answer(server.url, {
            "model": "pair", "messages": [{"role": "user", "content": f"{marker} say it"}],
            "max_tokens": 30, "stream": stream}, wait_s=0.8)
        assert wait_until(lambda: len(bills_of(mock, marker)) == 2)  # (the hedge was sent)

        def records() -> list[UsageRecord]:
            return [r for r in journaled(tmp_path / "journal") if r.client_disconnected]
        assert wait_until(lambda: len(records()) == 1)
        [record] = records()

        def spent() -> int | None:
            value: int | None = server.run(quota.store.committed(
                [budget_check("lifetime", f"key:{KEY_ID}")]))[0]
            return value
        wait_until(lambda: spent() == record.cost_micros, 5)
        budget = spent()
    assert record.input_tokens > 0 and record.output_tokens == 0
    assert record.deployment == "openai/gpt-4o-mini"  # (the first call's: $1 a 1M input)
    assert record.cost_micros == record.input_tokens
    assert record.attempts == 2
    assert budget == record.cost_micros
