"""A fallback model's own limits (`model_limits`) hold when the failover layer sends a request
to it, in either order of the two layers: the request is admitted against them before the
first call to that model, and a refusal takes the model out of the request's way. A model's
tokens and cost count against the model that answered, in the quota store and in the spend
ledger: the model asked for is charged none of them when a fallback answered.

Before, a fallback's rate limits and budgets were never checked for the requests it served
by failover (a model limited to 1 request a minute served every request that failed over to
it), and the model asked for was charged what its fallback cost.

Prices and arithmetic are test_quota_fallback_price's: PROMPT with max_tokens=10 costs 30
micro-dollars on `gpt-mock` and 90 on `pricey-mock`. On the `failing` mock every OpenAI call
fails (500), so every request is answered by `pricey-mock` (on the mock's Azure endpoint).
"""
from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal

import openai
import psycopg
import pytest
from psycopg import sql

from tests.middleware.test_quota_fallback_price import ORDERS, PRICEY, ROUTED, chat
from tests.middleware.test_quota_layer import (
    COST,
    PG_DSN,
    Gateway,
    MockProviderServer,
    Start,
    auth,
    eventually,
    prefix,
    quota,
    spend_table,
    start,
    store,
)
from tests.mock_providers import MockConfig

__all__ = ["prefix", "spend_table", "start", "store"]  # (fixtures, used by name)

PRICEY_SUBJECT = "model:pricey-mock"
ASKED_SUBJECT = "model:gpt-mock"


@pytest.fixture(scope="module")
def failing() -> Iterator[MockProviderServer]:
    """A mock on which every OpenAI call fails with a 500 (the other providers answer)."""
    server = MockProviderServer(MockConfig(fail_ratio=1.0, fail_status=500,
                                           fail_providers=["openai"]))
    server.start()
    yield server
    server.stop()


def failover(breaker: str = "NEVER_OPENS") -> str:
    """gpt-mock falls back to pricey-mock; retries are never refused by the retry budget."""
    return (f"Middleware(FailoverMiddleware, breaker={breaker}, "
            "retry=RetryPolicy(max_attempts=3, budget_ratio=1.0, budget_min_per_s=1000), "
            "routes={'gpt-mock': Route(strategy='priority', fallbacks=('pricey-mock',))})")


def layers(order: str, quota_layer: str, breaker: str = "NEVER_OPENS") -> list[str]:
    routing = failover(breaker)
    return [routing, quota_layer] if order == "failover-above" else [quota_layer, routing]


def providers_called(mock: MockProviderServer) -> list[str]:
    return [entry["provider"] for entry in mock.requests]


def budget(dollars: str) -> str:
    return f"Limits(budgets=(Budget('{dollars}', period='lifetime'),))"


@pytest.mark.parametrize("order", ORDERS)
def test_a_fallbacks_rate_limit_is_checked_before_it_is_called(
        start: Start, store: str, failing: MockProviderServer, order: str) -> None:
    # pricey-mock takes 1 request a minute: the first request that fails over to it is
    # served there; the second is not sent there, and gets gpt-mock's failure.
    gateway = start(auth(), *layers(order, quota(
        store, model_limits="{'pricey-mock': Limits(rpm=1)}")), extra=ROUTED,
        upstream=failing.url)
    failing.reset_log()
    status, headers = chat(gateway)
    assert (status, headers["x-sluicegate-fallback"]) == (200, "pricey-mock")
    status, headers = chat(gateway)
    assert status >= 500
    assert "x-sluicegate-fallback" not in headers
    assert providers_called(failing).count("azure") == 1  # (gpt-mock may be retried)


@pytest.mark.parametrize("order", ORDERS)
def test_with_nowhere_else_to_go_the_fallbacks_limit_is_the_answer(
        start: Start, store: str, failing: MockProviderServer, order: str) -> None:
    # gpt-mock's breaker opens at its first failure: the second request has only
    # pricey-mock to go to, whose limit refuses it. The caller is told which limit, and
    # when to come back, not that no deployment is healthy.
    breaker = "BreakerSettings(consecutive_failures=1, cooldown_s=600)"
    gateway = start(auth(), *layers(order, quota(
        store, model_limits="{'pricey-mock': Limits(rpm=1)}"), breaker), extra=ROUTED,
        upstream=failing.url)
    failing.reset_log()
    assert chat(gateway)[0] == 200
    client = gateway.openai()
    raw = client.chat.completions.with_raw_response
    with pytest.raises(openai.RateLimitError) as refused:
        raw.create(model="gpt-mock", max_tokens=10,
                   messages=[{"role": "user", "content": "a b c d e f g"}])
    error = refused.value
    assert "pricey-mock" in error.message
    assert "requests per minute" in error.message or "rpm" in error.message
    assert 0 < int(error.response.headers["retry-after"]) <= 60
    assert providers_called(failing) == ["openai", "azure"]


@pytest.mark.parametrize("order", ORDERS)
def test_the_model_that_answered_is_charged_and_the_model_asked_for_is_not(
        start: Start, store: str, failing: MockProviderServer, spend_table: str,
        order: str) -> None:
    # Both models have budgets; every request is answered by pricey-mock. Before, gpt-mock's
    # budget was charged pricey-mock's cost (90 a request) and pricey-mock's nothing.
    ledger = f"PostgresSpendLedger({PG_DSN!r}, table={spend_table!r})"
    model_limits = f"{{'gpt-mock': {budget('1')}, 'pricey-mock': {budget('1')}}}"
    gateway = start(auth(), *layers(order, quota(store, model_limits=model_limits,
                                                 ledger=ledger)),
                    extra=ROUTED, upstream=failing.url)
    for _ in range(2):
        status, headers = chat(gateway)
        assert (status, headers["x-sluicegate-fallback"]) == (200, "pricey-mock")
    assert eventually(lambda: committed(gateway, PRICEY_SUBJECT), 2 * PRICEY) == 2 * PRICEY
    assert eventually(lambda: committed(gateway, ASKED_SUBJECT), 0) == 0
    assert eventually(lambda: model_spend(spend_table), {"pricey-mock": 2 * PRICEY}) == \
        {"pricey-mock": 2 * PRICEY}


@pytest.mark.parametrize("order", ORDERS)
def test_a_fallbacks_budget_refuses_what_would_overspend_it(
        start: Start, store: str, failing: MockProviderServer, order: str) -> None:
    # pricey-mock's budget of 100 has room for one request at its price (90): the second
    # is not sent there. Its counter holds what the one it served cost.
    gateway = start(auth(), *layers(order, quota(
        store, model_limits=f"{{'pricey-mock': {budget('0.0001')}}}")), extra=ROUTED,
        upstream=failing.url)
    failing.reset_log()
    assert chat(gateway)[0] == 200
    assert chat(gateway)[0] >= 500
    assert providers_called(failing).count("azure") == 1  # (gpt-mock may be retried)
    assert eventually(lambda: committed(gateway, PRICEY_SUBJECT), PRICEY) == PRICEY


@pytest.mark.parametrize("order", ORDERS)
def test_a_request_its_own_model_answers_leaves_the_fallbacks_limits_alone(
        start: Start, store: str, order: str) -> None:
    # (The session's mock: gpt-mock answers.) pricey-mock's limit of 1 request a minute and
    # its budget are never asked; gpt-mock's budget is charged each request's 30.
    model_limits = (f"{{'gpt-mock': {budget('1')}, 'pricey-mock': Limits(rpm=1, "
                    "budgets=(Budget('0.00001', period='lifetime'),))}")
    gateway = start(auth(), *layers(order, quota(store, model_limits=model_limits)),
                    extra=ROUTED)
    for _ in range(3):
        status, headers = chat(gateway)
        assert status == 200
        assert "x-sluicegate-fallback" not in headers
    assert eventually(lambda: committed(gateway, ASKED_SUBJECT), 3 * COST) == 3 * COST
    assert committed(gateway, PRICEY_SUBJECT) is None


def committed(gateway: Gateway, subject: str) -> int | None:
    value: int | None = gateway.committed(subject=subject)
    return value


def model_spend(table: str) -> dict[str, int]:
    """The spend ledger's total per model."""
    query = sql.SQL("SELECT subject_id, sum(micros) FROM {} WHERE subject_kind = 'model' "
                    "GROUP BY subject_id").format(sql.Identifier(table))
    try:
        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            return {row[0]: int(Decimal(row[1])) for row in conn.execute(query).fetchall()}
    except psycopg.errors.UndefinedTable:
        return {}
