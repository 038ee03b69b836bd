"""A request is reserved at the dearest model that may serve it: the one asked for and the
fallbacks its failover route may go to that the caller's key may use, in either order of the
two layers. A fallback to a pricier model is billed at its price; reserved at the cheaper
model's, every concurrent request near a budget's cap overshot it by the difference.

Prices and arithmetic are test_quota_layer's: `gpt-mock` costs $1 per 1M input and $2 per 1M
output tokens, so PROMPT with max_tokens=10 costs 10 + 2 x 10 = 30 micro-dollars, reserved
and billed alike. `pricey-mock` costs three times as much (90), `cheap-mock` a tenth (3).
Here `gpt-mock` is routed to `pricey-mock` when it fails, and on the `failing` mock every
OpenAI call fails (500), so every request is answered by `pricey-mock` (on the mock's Azure
endpoint).
"""
from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import pytest

from gateway.config import Deployment, Model
from gateway.context import OPENAI_CHAT, RequestContext
from gateway.policy import Principal
from gateway.pricing import Price
from middleware.metering import JournalError, journal_usage
from middleware.quota.plan import reservation_price
from tests.gateway.test_pricing import dated_table
from tests.harness import TEST_KEY
from tests.middleware.test_quota_billing import deltas, metering
from tests.middleware.test_quota_layer import (
    COST,
    CUTOFF_MESSAGE,
    INPUT,
    KEY_ID,
    PROMPT,
    Gateway,
    Start,
    auth,
    cut_off_stream,
    cutoff_quota,
    eventually,
    prefix,
    quota,
    slow,
    slow_mock,
    start,
    static_key,
    store,
    wait_streams_done,
)
from tests.mock_providers import MockConfig, MockProviderServer

__all__ = ["prefix", "slow", "slow_mock", "start", "store"]  # (fixtures, used by name)

PRICEY = 3 * COST  # micro-dollars: what PROMPT with max_tokens=10 costs on pricey-mock
CHEAP = COST // 10  # and on cheap-mock (the prelude's: $0.1 in, $0.2 out per 1M)
PRICEY_MODEL = '''
models["pricey-mock"] = [Deployment("azure", "pricey-deployment",
                                    price=Price(input_per_mtok="3", output_per_mtok="6"))]
'''
# Retries are never refused by the retry budget (every request here retries), and the
# failing deployment's breaker never opens: each request fails over from its own failure.
FALLBACK = ("Middleware(FailoverMiddleware, breaker=NEVER_OPENS, "
            "retry=RetryPolicy(max_attempts=2, budget_ratio=1.0, budget_min_per_s=1000), "
            "routes={'gpt-mock': Route(strategy='priority', fallbacks=('pricey-mock',))})")
ROUTED = "from middleware.failover import Route\n" + PRICEY_MODEL
ORDERS = ["failover-above", "quota-above"]
N = 5  # the requests a budget of N x COST admits at gpt-mock's price (one at pricey-mock's)
CAP = N * COST
NARROW_KEY = "sk-sg-narrow-key-0123456789"


@pytest.fixture(scope="module")
def failing() -> Iterator[MockProviderServer]:
    """A mock on which every OpenAI call fails with a 500 (the other providers answer), and
    every answer starts 0.3 s late, so concurrent requests are all admitted before any ends."""
    server = MockProviderServer(MockConfig(ttft_s=0.3, fail_ratio=1.0, fail_status=500,
                                           fail_providers=["openai"]))
    server.start()
    yield server
    server.stop()


def stack(order: str, quota_layer: str) -> list[str]:
    return [FALLBACK, quota_layer] if order == "failover-above" else [quota_layer, FALLBACK]


def key(limits: str, *, key_id: str = KEY_ID, env: str = "SG_TEST_KEY",
        allowed_models: tuple[str, ...] = ()) -> str:
    return static_key(limits, key_id=key_id, env=env).replace(
        "limits=", f"allowed_models={allowed_models!r}, limits=")


def lifetime(cap_micros: int, **options: object) -> str:
    extra = "".join(f", {name}={value!r}" for name, value in options.items())
    return (f"Limits(budgets=(Budget('{Decimal(cap_micros) / 1_000_000}', period='lifetime'"
            f"{extra}),))")


def chat(gateway: Gateway) -> tuple[int, dict[str, str]]:
    """An official SDK client's chat request: (status, response headers)."""
    client = gateway.openai()
    try:
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-mock", messages=PROMPT, max_tokens=10)  # type: ignore[arg-type]
    except openai.APIStatusError as error:
        return error.status_code, dict(error.response.headers)
    return raw.http_response.status_code, dict(raw.headers)


def ledger_total(journal: Path, requests: int) -> int:
    """What the usage ledger (the metering layer's journal) bills the key for its
    `requests` requests, in micro-dollars, once it has recorded them all."""
    def rows() -> list[dict[str, Any]]:
        try:
            return journal_usage(journal, group_by="key")
        except JournalError:  # (not opened yet)
            return []
    assert eventually(lambda: sum(row["requests"] for row in rows()), requests) == requests
    return int(sum(Decimal(row["cost_usd"]) for row in rows()) * 1_000_000)


@pytest.mark.parametrize("order", ORDERS)
def test_concurrent_requests_that_fall_back_to_a_pricier_model_keep_within_the_cap(
        start: Start, store: str, failing: MockProviderServer, tmp_path: Path,
        order: str) -> None:
    # Reserved at gpt-mock's price (30), each of the five requests fit the cap of 150, and
    # each was billed pricey-mock's 90: 450 spent of 150. Reserved at 90, one fits.
    journal = tmp_path / "journal"
    gateway = start(auth(key(lifetime(CAP))), metering(journal),
                    *stack(order, quota(store)), extra=ROUTED, upstream=failing.url)
    with ThreadPoolExecutor(N) as pool:
        answers = list(pool.map(lambda _: chat(gateway), range(N)))
    statuses = sorted(status for status, _ in answers)
    assert statuses == [200] + [402] * (N - 1)
    served = next(headers for status, headers in answers if status == 200)
    assert served["x-sluicegate-fallback"] == "pricey-mock"
    assert served["x-sluicegate-budget-remaining"] == f"0.{CAP - PRICEY:06d}"
    spent = eventually(gateway.committed, PRICEY)
    assert spent == PRICEY <= CAP
    assert ledger_total(journal, N) == spent


@pytest.mark.parametrize("order", ORDERS)
def test_a_key_not_allowed_the_pricier_fallback_is_reserved_at_the_models_own_price(
        start: Start, store: str, monkeypatch: pytest.MonkeyPatch, order: str) -> None:
    # The failover layer never sends this caller to pricey-mock: reserving its price would
    # refuse what the caller's budget allows. (The session's mock: gpt-mock answers.)
    monkeypatch.setenv("SG_NARROW_KEY", NARROW_KEY)
    narrow = key(lifetime(CAP), key_id="k-narrow", env="SG_NARROW_KEY",
                 allowed_models=("gpt-mock",))
    gateway = start(auth(key(lifetime(CAP)), narrow), *stack(order, quota(store)),
                    extra=ROUTED)
    narrow_answer = gateway.chat(key=NARROW_KEY)
    wide_answer = gateway.chat(key=TEST_KEY)
    assert (narrow_answer.status_code, wide_answer.status_code) == (200, 200)
    assert "x-sluicegate-fallback" not in narrow_answer.headers  # (gpt-mock answered both)
    assert narrow_answer.headers["x-sluicegate-budget-remaining"] == f"0.{CAP - COST:06d}"
    assert wide_answer.headers["x-sluicegate-budget-remaining"] == f"0.{CAP - PRICEY:06d}"
    assert eventually(lambda: gateway.committed(subject="key:k-narrow"), COST) == COST
    assert eventually(gateway.committed, COST) == COST  # (settled to what it cost)


CHEAP_ROUTES = ("Middleware(FailoverMiddleware, breaker=NEVER_OPENS, "
                "routes={'gpt-mock': Route(fallbacks=('pricey-mock',)), "
                "'cheap-mock': Route(fallbacks=('gpt-mock',))})")


@pytest.mark.parametrize("order", ORDERS)
def test_a_downgraded_request_is_reserved_at_the_cheaper_models_route(
        start: Start, store: str, order: str) -> None:
    # gpt-mock may fall back to pricey-mock (90), past a budget of 50 that downgrades to
    # cheap-mock; cheap-mock may fall back to gpt-mock: reserved at 30, not cheap-mock's 3
    # (nor at 90: the route it goes by is cheap-mock's). At gpt-mock's own price (30), the
    # request was not downgraded, and pricey-mock could have served it.
    limits = lifetime(50, on_overflow="downgrade", downgrade_to="cheap-mock")
    layers = [CHEAP_ROUTES, quota(store)] if order == "failover-above" \
        else [quota(store), CHEAP_ROUTES]
    gateway = start(auth(key(limits)), *layers, extra=ROUTED)
    answer = gateway.chat()
    assert answer.status_code == 200
    assert answer.headers["x-sluicegate-downgraded"].startswith("gpt-mock -> cheap-mock")
    assert answer.headers["x-sluicegate-deployment"] == "openai/cheap-upstream"
    assert answer.headers["x-sluicegate-budget-remaining"] == f"0.{50 - COST:06d}"
    assert eventually(gateway.committed, CHEAP) == CHEAP


@pytest.fixture(scope="module")
def failing_slowly() -> Iterator[MockProviderServer]:
    """`failing`, with streams of one character an event (test_quota_layer's `slow_mock`)."""
    server = MockProviderServer(MockConfig(chunk_delay_s=0.02, chunk_chars=1, fail_ratio=1.0,
                                           fail_status=500, fail_providers=["openai"]))
    server.start()
    yield server
    server.stop()


@pytest.mark.parametrize("order", ORDERS)
def test_a_stream_a_pricier_fallback_serves_is_cut_off_at_its_price(
        start: Start, store: str, failing_slowly: MockProviderServer, tmp_path: Path,
        order: str) -> None:
    # A stream without max_tokens, reserved at 10 output tokens (90 at pricey-mock's price),
    # and cut off when its content deltas, each counted a token, would cost more than the
    # budget of 102: after 12 (30 + 6 x 12 = 102). Counted at gpt-mock's price
    # (10 + 2 x 12 = 34), it was never cut off, and a longer one would have run on to three
    # times its budget.
    journal = tmp_path / "journal"
    cap = 3 * INPUT + 6 * 12
    gateway = start(auth(key(lifetime(cap, stream_cutoff=True))), metering(journal),
                    *stack(order, cutoff_quota(store)), extra=ROUTED,
                    upstream=failing_slowly.url)
    wait_streams_done(failing_slowly)
    response = cut_off_stream(gateway)
    assert response.status_code == 200
    assert response.headers["x-sluicegate-fallback"] == "pricey-mock"
    events = response.text.split("\n\n")[:-1]
    assert CUTOFF_MESSAGE in events[-1]
    assert deltas(response.content) == len(events) - 2 == 12  # (and the role chunk)
    spent = eventually(gateway.committed, cap)
    assert spent == cap == ledger_total(journal, 1)
    wait_streams_done(failing_slowly)


@pytest.mark.parametrize("order", ORDERS)
def test_a_stream_its_own_model_serves_is_cut_off_at_its_own_price(
        start: Start, store: str, slow: MockProviderServer, tmp_path: Path,
        order: str) -> None:
    # The same stream and budget of 102, reserved at pricey-mock's price (90), but gpt-mock
    # answers: the stream costs 10 + 2 x 10 = 30, and the cut-off ended it after 12 deltas
    # (30 + 6 x 12 = 102), counted at the dearest price that might have served it, not
    # the price it is billed at. Counted at gpt-mock's price, it has room for 46 deltas.
    journal = tmp_path / "journal"
    cap = 3 * INPUT + 6 * 12
    gateway = start(auth(key(lifetime(cap, stream_cutoff=True))), metering(journal),
                    *stack(order, cutoff_quota(store)), extra=ROUTED, upstream=slow.url)
    wait_streams_done(slow)
    response = cut_off_stream(gateway)
    assert response.status_code == 200
    assert "x-sluicegate-fallback" not in response.headers
    assert CUTOFF_MESSAGE not in response.text
    assert response.text.endswith("data: [DONE]\n\n")
    assert deltas(response.content) == len("Mock reply to: a b c d e f g")
    assert eventually(gateway.committed, COST) == COST == ledger_total(journal, 1)
    wait_streams_done(slow)


def test_the_reservation_follows_a_fallbacks_price_into_force(tmp_path: Path) -> None:
    # The dearest price is remembered per caller and model until one of the prices it was
    # chosen from is followed by another: a fallback's too.
    table = dated_table(tmp_path)  # (1 until 2026, 3 from 2026-01-01, 5 from 2026-06-01)
    dated = table.lookup("acme", "m", at=datetime(2025, 12, 31, tzinfo=UTC))
    models = {"primary": Model([Deployment("p", "a", price=Price("2", "2"))]),
              "fallback": Model([Deployment("p", "m", price=dated)])}
    fallbacks = ("fallback",)
    caller = Principal(key_id="k", project="p")
    narrow = Principal(key_id="n", project="p", allowed_models=("primary",))

    def reserved_input_price(principal: Principal, when: datetime) -> Decimal:
        ctx = RequestContext(request_id="r", operation=OPENAI_CHAT, api_format="openai",
                             body={}, raw_body=b"", model="primary", stream=False,
                             models=models, started_at=when.timestamp(), principal=principal)
        found = reservation_price(ctx, fallbacks)
        assert found is not None
        return found.input_per_mtok

    assert reserved_input_price(caller, datetime(2025, 12, 31, 23, tzinfo=UTC)) == 2
    assert reserved_input_price(caller, datetime(2026, 1, 2, tzinfo=UTC)) == 3
    assert reserved_input_price(caller, datetime(2026, 6, 2, tzinfo=UTC)) == 5
    assert reserved_input_price(narrow, datetime(2026, 6, 2, tzinfo=UTC)) == 2
