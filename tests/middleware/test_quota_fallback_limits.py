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

import time
from collections.abc import Callable, Iterator
from decimal import Decimal

import httpx
import openai
import psycopg
import pytest
from psycopg import sql

from tests.gateway.test_metrics import parse, value
from tests.middleware.test_quota_fallback_price import ORDERS, PRICEY, ROUTED, chat
from tests.middleware.test_quota_layer import (
    COST,
    PG_DSN,
    SECOND_KEY,
    Gateway,
    MockProviderServer,
    Start,
    auth,
    delete_prefix,
    eventually,
    prefix,
    quota,
    redis_store,
    spend_table,
    start,
    static_key,
    store,
)
from tests.mock_providers import Fault, MockConfig

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


# -- the gate and the request's own admission (failover listed above quota) ------------------

OPENS_AT_ONCE = "BreakerSettings(consecutive_failures=1, cooldown_s=600)"


@pytest.mark.parametrize("order", ORDERS)
def test_a_request_its_own_limits_refuse_takes_nothing_of_a_fallback(
        start: Start, store: str, failing: MockProviderServer, order: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # gpt-mock's breaker opens at its first failure, so a request's first call goes to
    # pricey-mock (2 requests a minute). With the failover layer above, the gate was asked
    # before the quota layer admitted the request itself: key 1's second request, refused by
    # its own rpm=1, still took one of pricey-mock's two, and key 2 was refused by it.
    monkeypatch.setenv("SG_KEY_B", SECOND_KEY)
    keys = auth(static_key("Limits(rpm=1)"), static_key(key_id="k-second", env="SG_KEY_B"))
    gateway = start(keys, *layers(order, quota(
        store, model_limits="{'pricey-mock': Limits(rpm=2)}"), OPENS_AT_ONCE), extra=ROUTED,
        upstream=failing.url)
    assert [gateway.chat().status_code, gateway.chat().status_code,
            gateway.chat(key=SECOND_KEY).status_code] == [200, 429, 200]


@pytest.mark.parametrize("order", ORDERS)
def test_a_request_downgraded_elsewhere_takes_nothing_of_a_fallback(
        start: Start, store: str, failing: MockProviderServer, order: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The same, with key 1's second request downgraded to azure-mock by its rpm=1.
    monkeypatch.setenv("SG_KEY_B", SECOND_KEY)
    keys = auth(static_key("Limits(rpm=1, on_overflow='downgrade', downgrade_to='azure-mock')"),
                static_key(key_id="k-second", env="SG_KEY_B"))
    gateway = start(keys, *layers(order, quota(
        store, model_limits="{'pricey-mock': Limits(rpm=2)}"), OPENS_AT_ONCE), extra=ROUTED,
        upstream=failing.url)
    first, second = gateway.chat(), gateway.chat()
    assert second.headers["x-sluicegate-downgraded"].startswith("gpt-mock -> azure-mock")
    assert [first.status_code, second.status_code,
            gateway.chat(key=SECOND_KEY).status_code] == [200, 200, 200]


@pytest.mark.parametrize("order", ORDERS)
def test_a_request_downgraded_to_the_fallback_it_was_admitted_to_is_admitted_once(
        start: Start, store: str, failing: MockProviderServer, spend_table: str,
        order: str) -> None:
    # gpt-mock downgrades past 1 request a minute to pricey-mock, also its fallback, which
    # takes one request at a time. The second request's first call goes to pricey-mock (the
    # breaker is open): the gate admitted it there, then its own admission downgraded it to
    # pricey-mock, and found pricey-mock's one slot taken, by itself (429); with a budget,
    # pricey-mock was charged twice for it, the counter past what the ledger says.
    ledger = f"PostgresSpendLedger({PG_DSN!r}, table={spend_table!r})"
    model_limits = ("{'gpt-mock': Limits(rpm=1, on_overflow='downgrade', "
                    "downgrade_to='pricey-mock'), 'pricey-mock': Limits(max_concurrent=1, "
                    "budgets=(Budget('1', period='lifetime'),))}")
    gateway = start(auth(), *layers(order, quota(store, model_limits=model_limits,
                                                 ledger=ledger), OPENS_AT_ONCE),
                    extra=ROUTED, upstream=failing.url)
    assert gateway.chat().status_code == 200
    second = gateway.chat()
    assert second.status_code == 200
    assert second.headers["x-sluicegate-downgraded"].startswith("gpt-mock -> pricey-mock")
    assert eventually(lambda: committed(gateway, PRICEY_SUBJECT), 2 * PRICEY) == 2 * PRICEY
    assert eventually(lambda: model_spend(spend_table), {"pricey-mock": 2 * PRICEY}) == \
        {"pricey-mock": 2 * PRICEY}


# -- continuations, the spend ledger, the metrics ---------------------------------------------

@pytest.mark.parametrize("order", ORDERS)
def test_a_stream_continued_on_a_fallback_is_charged_to_the_fallback(
        start: Start, store: str, mock: MockProviderServer, order: str) -> None:
    # gpt-mock's stream breaks after 3 chunks and pricey-mock continues it: the request
    # counts against the model that finished it (the continuation was no fallback call to
    # the layers that ask: gpt-mock was charged all of it, pricey-mock nothing).
    routing = ("Middleware(FailoverMiddleware, breaker=NEVER_OPENS, retry=RetryPolicy("
               "max_attempts=3, budget_ratio=1.0, budget_min_per_s=1000), routes={'gpt-mock': "
               "Route(strategy='priority', fallbacks=('pricey-mock',), continuation=True)})")
    limits = quota(store, model_limits=f"{{'gpt-mock': {budget('1')}, "
                                       f"'pricey-mock': {budget('1')}}}")
    gateway = start(auth(), *([routing, limits] if order == "failover-above"
                              else [limits, routing]), extra=ROUTED)
    mock.reset_log()
    mock.push_fault(Fault("error_event", provider="openai", after_chunks=3))
    chunks = list(gateway.openai().chat.completions.create(
        model="gpt-mock", stream=True, max_tokens=10, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "a b c d e f g"}]))
    assert chunks[-1].usage is not None
    assert providers_called(mock) == ["openai", "azure"]
    assert charged(lambda: committed(gateway, PRICEY_SUBJECT)) > 0
    assert committed(gateway, ASKED_SUBJECT) == 0


def test_a_fallbacks_spend_reaches_the_ledger_with_no_limit_on_the_model_asked_for(
        start: Start, prefix: str, failing: MockProviderServer, spend_table: str) -> None:
    # Only pricey-mock has limits (a budget of 100; each request costs 90). No limit applied
    # to the request as asked, so its own settle (which wrote the spend rows) never ran:
    # pricey-mock's spend never reached the ledger, and after a Redis flush its counter was
    # rebuilt as 0 and admitted a second request, 180 spent of 100.
    ledger = f"PostgresSpendLedger({PG_DSN!r}, table={spend_table!r})"
    gateway = start(auth(), *layers("quota-above", quota(
        redis_store(prefix), model_limits=f"{{'pricey-mock': {budget('0.0001')}}}",
        ledger=ledger)), extra=ROUTED, upstream=failing.url)
    assert chat(gateway)[0] == 200
    assert eventually(lambda: model_spend(spend_table), {"pricey-mock": PRICEY}) == \
        {"pricey-mock": PRICEY}
    delete_prefix(prefix)  # what FLUSHDB does, to this test's keys only
    assert chat(gateway)[0] >= 500  # (gpt-mock's failure: pricey-mock has no room left)
    assert committed(gateway, PRICEY_SUBJECT) == PRICEY


@pytest.mark.parametrize("order", ORDERS)
def test_a_fallbacks_refusal_is_a_quota_refusal_only_when_it_is_the_answer(
        start: Start, failing: MockProviderServer, order: str) -> None:
    # pricey-mock takes 1 request a minute and azure-mock none; gpt-mock's breaker opens at
    # its first failure. Request 2 goes to pricey-mock, refused, then to azure-mock: a 200,
    # which was counted as a quota refusal. Request 3 with only pricey-mock on its route...
    routes = ("Middleware(FailoverMiddleware, breaker=" + OPENS_AT_ONCE + ", retry=RetryPolicy("
              "max_attempts=3, budget_ratio=1.0, budget_min_per_s=1000), routes={'gpt-mock': "
              "Route(strategy='priority', fallbacks=('pricey-mock', 'azure-mock')), "
              "'cheap-mock': Route(strategy='priority', fallbacks=('pricey-mock',))})")
    limits = quota("'memory'", model_limits="{'pricey-mock': Limits(rpm=1)}")
    gateway = start(auth(), *([routes, limits] if order == "failover-above"
                              else [limits, routes]), extra=ROUTED, upstream=failing.url)
    assert chat(gateway)[1]["x-sluicegate-fallback"] == "pricey-mock"
    status, headers = chat(gateway)
    assert (status, headers["x-sluicegate-fallback"]) == (200, "azure-mock")
    assert quota_refusals(gateway) == 0
    # (cheap-mock's only deployment is on the failing OpenAI mock: its breaker opens too)
    assert gateway.chat(model="cheap-mock").status_code >= 500
    refused = gateway.chat(model="cheap-mock")
    assert refused.status_code == 429  # pricey-mock's limit: nothing else to call
    assert quota_refusals(gateway) == 1


def charged(read: Callable[[], int | None], timeout_s: float = 5.0) -> int:
    """Polls `read` (a counter) until it holds something (a settle runs after the
    response); returns what it holds then."""
    deadline = time.monotonic() + timeout_s
    while not (found := read()) and time.monotonic() < deadline:
        time.sleep(0.02)
    return found or 0


def quota_refusals(gateway: Gateway) -> float:
    return value(parse(httpx.get(gateway.url + "/metrics").text),
                 "sluicegate_quota_refusals_total")
