"""The quota layer under a failover layer: one request, one admission, one settle.

With the failover layer above the quota layer (an order the operator may choose), every
attempt the failover layer makes passes through the quota layer. The caller still sent one
request: it counts once against RPM and a concurrency limit, and its budget is charged once,
what the usage ledger bills for it (the ledger records the request once, every attempt in
it). Here `gpt-mock` has two deployments on the session's mock, so a fault injected for the
next call hits the first attempt only; prices and arithmetic are test_quota_layer's. The
layer knows a request it admitted by a mark of its own, so two quota layers in one stack
still each admit it.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from middleware.failover import FailoverMiddleware
from tests.middleware.test_quota_billing import billed, deltas, metering, post, streamed
from tests.middleware.test_quota_layer import (
    CUTOFF_BUDGET,
    CUTOFF_MESSAGE,
    INPUT,
    LIFETIME_BUDGET,
    OUTPUT,
    Gateway,
    Start,
    auth,
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
from tests.mock_providers import Fault, MockProviderServer

__all__ = ["prefix", "slow", "slow_mock", "start", "store"]  # (fixtures, used by name)

BUDGET = 35  # CUTOFF_BUDGET's, in micro-dollars

TWO_DEPLOYMENTS = '''
from middleware.failover import Route
models["gpt-mock"] = [Deployment("openai", "gpt-4o-mini", price=MOCK_PRICE),
                      Deployment("openai", "gpt-4o", price=MOCK_PRICE)]
'''
FAILOVER = ("Middleware(FailoverMiddleware, breaker=NEVER_OPENS, "
            "routes={'gpt-mock': Route(strategy='priority', continuation=True)})")
# kind -> the fault the first attempt meets: an error before any output (failed over to the
# second deployment), or a stream broken after three content events (continued there).
FAULTS = {
    "error_before_output": Fault(kind="status", provider="openai", status=500),
    "stream_broken_after_output": Fault(kind="error_event", provider="openai",
                                        after_chunks=3),
}


def failover_above_quota(start: Start, store: str, limits: str, journal: Path,
                         **options: str) -> Gateway:
    return start(auth(static_key(limits)), metering(journal), FAILOVER, quota(store),
                 extra=TWO_DEPLOYMENTS, **options)


@pytest.mark.parametrize("kind,stream", [("error_before_output", False),
                                         ("error_before_output", True),
                                         ("stream_broken_after_output", True)])
def test_a_request_that_failed_over_is_charged_once_what_the_ledger_bills(
        start: Start, store: str, mock: MockProviderServer, tmp_path: Path, kind: str,
        stream: bool) -> None:
    # Each attempt was admitted under the request's one lease id, so the second reservation
    # took the first's place in the store and the first was never given back (240 for 30
    # billed); a continued stream was charged its broken part twice.
    journal = tmp_path / "journal"
    gateway = failover_above_quota(start, store, LIFETIME_BUDGET, journal)
    mock.push_fault(FAULTS[kind])
    response = post(gateway, "openai", {**streamed("openai", 100), "stream": stream})
    assert response.status_code == 200
    assert len(mock.requests) == 2  # (failed over)
    cost = billed(journal)
    assert eventually(gateway.committed, cost) == cost


@pytest.mark.parametrize("kind", sorted(FAULTS))
def test_a_request_that_failed_over_counts_once_against_rpm(
        start: Start, store: str, mock: MockProviderServer, tmp_path: Path,
        kind: str) -> None:
    # The caller's RPM counts the caller's requests, not the gateway's attempts at them.
    gateway = failover_above_quota(start, store, "Limits(rpm=2)", tmp_path / "journal")
    mock.push_fault(FAULTS[kind])
    response = post(gateway, "openai", streamed("openai", 100))
    assert response.status_code == 200
    assert len(mock.requests) == 2  # (failed over)
    assert response.headers.get_list("x-ratelimit-remaining-requests") == ["1"]
    assert gateway.chat().headers["x-ratelimit-remaining-requests"] == "0"


def test_a_stream_that_failed_over_is_still_cut_off_at_its_budget(
        start: Start, slow: MockProviderServer, tmp_path: Path) -> None:
    # The second attempt was admitted against the first one's reservation as well, and
    # refused (402) though the request was within its budget.
    journal = tmp_path / "journal"
    gateway = start(auth(static_key(CUTOFF_BUDGET)), metering(journal), FAILOVER,
                    cutoff_quota("'memory'"), extra=TWO_DEPLOYMENTS, upstream=slow.url)
    wait_streams_done(slow)
    slow.push_fault(FAULTS["error_before_output"])
    response = post(gateway, "openai", streamed("openai", None))  # (see CUTOFF_BUDGET)
    assert response.status_code == 200
    assert len(slow.requests) == 2  # (failed over)
    assert CUTOFF_MESSAGE in response.text.split("\n\n")[-2]  # (cut off)
    wait_streams_done(slow)
    cost = billed(journal)
    assert cost == INPUT + 2 * deltas(response.content)
    assert eventually(gateway.committed, cost) == cost


def test_two_quota_layers_in_one_stack_each_admit_the_request(
        start: Start, store: str, mock: MockProviderServer) -> None:
    # (The inner layer must not take the outer one's admission for its own.)
    gateway = start(auth(static_key("Limits(rpm=5)")), quota(store),
                    quota("'memory'", limits="Limits(rpm=1)"))
    assert gateway.chat().status_code == 200
    refused = gateway.chat()
    assert refused.status_code == 429
    assert "All callers together may use 1 requests per minute" in refused.text
    assert len(mock.requests) == 1


@pytest.mark.parametrize("failover_first", [True, False], ids=["failover-above", "quota-above"])
def test_a_continued_stream_is_cut_off_within_its_budget(
        start: Start, slow: MockProviderServer, tmp_path: Path, failover_first: bool) -> None:
    # A continuation's input (the prompt plus the text so far) is billed again: counted at
    # the first attempt's input alone, the stream went on past its budget.
    journal = tmp_path / "journal"
    layers = [FAILOVER, quota("'memory'")] if failover_first else [quota("'memory'"), FAILOVER]
    gateway = start(auth(static_key(CUTOFF_BUDGET)), metering(journal), *layers,
                    extra=TWO_DEPLOYMENTS, upstream=slow.url)
    wait_streams_done(slow)
    slow.push_fault(FAULTS["stream_broken_after_output"])
    response = post(gateway, "openai", streamed("openai", OUTPUT))
    assert response.status_code == 200
    assert len(slow.requests) == 2  # (continued)
    assert CUTOFF_MESSAGE in response.text.split("\n\n")[-2]  # (cut off)
    wait_streams_done(slow)
    cost = billed(journal)
    assert cost <= BUDGET  # (was 48: 24 input tokens, the continuation's 14 among them)
    assert eventually(gateway.committed, cost) == cost


# -- a downgrade under a failover layer ----------------------------------------------------------

# The key's budget (10) is below a gpt-mock request's reservation (30), above cheap-mock's
# (3), so every request is downgraded. cheap-mock has two deployments on the mock, priced a
# tenth of the others: what it serves costs 3.
DOWNGRADING_BUDGET = ("Limits(budgets=(Budget('0.00001', period='lifetime', "
                      "on_overflow='downgrade', downgrade_to='cheap-mock'),))")
CHEAP_COST = 3
TWO_CHEAP_DEPLOYMENTS = TWO_DEPLOYMENTS + '''
CHEAP_PRICE = Price(input_per_mtok="0.1", output_per_mtok="0.2")
models["cheap-mock"] = [Deployment("openai", "cheap-upstream", price=CHEAP_PRICE),
                        Deployment("openai", "cheap-second", price=CHEAP_PRICE)]
'''


CONTINUED = "Route(strategy='priority', continuation=True)"


def downgrading(start: Start, store: str, journal: Path, *, failover_first: bool,
                max_attempts: int = 3, limits: str = DOWNGRADING_BUDGET,
                breaker: str = "NEVER_OPENS", gpt_route: str = CONTINUED,
                cheap_route: str = CONTINUED, extra: str = TWO_CHEAP_DEPLOYMENTS) -> Gateway:
    failover = (f"Middleware(FailoverMiddleware, breaker={breaker}, "
                f"retry=RetryPolicy(max_attempts={max_attempts}), "
                f"routes={{'gpt-mock': {gpt_route}, 'cheap-mock': {cheap_route}}})")
    layers = [failover, quota(store)] if failover_first else [quota(store), failover]
    return start(auth(static_key(limits)), metering(journal), *layers, extra=extra)


@pytest.mark.parametrize("failover_first", [True, False], ids=["failover-above", "quota-above"])
@pytest.mark.parametrize("kind", sorted(FAULTS))
def test_a_downgraded_request_is_retried_on_the_cheaper_model(
        start: Start, store: str, mock: MockProviderServer, tmp_path: Path,
        failover_first: bool, kind: str) -> None:
    # With the failover layer above, its retry (or continuation) went to the deployment it
    # picked for gpt-mock (gpt-4o): the caller was told cheap-mock and billed gpt-4o's 30,
    # past a budget of 10 that reserved cheap-mock's 3.
    journal = tmp_path / "journal"
    gateway = downgrading(start, store, journal, failover_first=failover_first)
    mock.push_fault(FAULTS[kind])
    before_output = kind == "error_before_output"
    response = post(gateway, "openai", {**streamed("openai", OUTPUT), "stream": not before_output})
    assert response.status_code == 200
    assert [r["json"]["model"] for r in mock.requests] == ["cheap-upstream", "cheap-second"]
    # (a continued stream's response started with its first deployment's answer)
    assert response.headers["x-sluicegate-deployment"] == \
        ("openai/cheap-second" if before_output else "openai/cheap-upstream")
    assert response.headers["x-sluicegate-downgraded"] == \
        "gpt-mock -> cheap-mock (key k-test lifetime budget)"
    cost = billed(journal)
    if before_output:
        assert cost == CHEAP_COST
    else:  # the broken part, then the continuation with its input billed again
        assert CHEAP_COST < cost <= 10
    assert eventually(gateway.committed, cost) == cost


def test_a_downgraded_request_names_the_deployment_that_served_it(
        start: Start, store: str, mock: MockProviderServer, tmp_path: Path) -> None:
    # The failover layer above named the deployment it picked for gpt-mock (gpt-4o-mini),
    # though cheap-mock's first deployment served the request.
    gateway = downgrading(start, store, tmp_path / "journal", failover_first=True)
    response = gateway.chat()
    assert response.status_code == 200
    assert [r["json"]["model"] for r in mock.requests] == ["cheap-upstream"]
    assert response.headers["x-sluicegate-deployment"] == "openai/cheap-upstream"


def test_a_downgraded_request_whose_cheaper_deployments_fail_gets_their_error(
        start: Start, store: str, mock: MockProviderServer, tmp_path: Path) -> None:
    # The failover layer above makes three attempts; cheap-mock has two deployments. Every
    # attempt stays on cheap-mock (its first deployment again for the third), and the caller
    # gets the last one's error: never an answer of the model the budget had no room for.
    journal = tmp_path / "journal"
    gateway = downgrading(start, store, journal, failover_first=True)
    for _ in range(3):
        mock.push_fault(Fault(kind="status", provider="openai", status=500,
                              message="cheap-mock is down"))
    response = gateway.chat()
    assert response.status_code == 500
    assert response.json()["error"]["message"] == \
        "Provider 'openai' returned 500: cheap-mock is down"
    assert [r["json"]["model"] for r in mock.requests] == \
        ["cheap-upstream", "cheap-second", "cheap-upstream"]
    assert response.headers["x-sluicegate-downgraded"].startswith("gpt-mock -> cheap-mock")
    assert billed(journal) == 0
    assert eventually(gateway.committed, 0) == 0


# -- the failover layer above routes a downgraded request for the cheaper model ------------------

OPENS_AT_ONCE = "BreakerSettings(consecutive_failures=1, cooldown_s=60)"
# gpt-mock's route -> how the failover layer makes its first call: inline (a plain route), in
# its attempt loop (a route that continues streams), or in a hedge (a route that hedges).
FIRST_CALLS = {"plain": "Route(strategy='priority')", "attempt-loop": CONTINUED,
               "hedged": "Route(strategy='priority', hedge_after_s=30)"}


def failover_of(gateway: Gateway) -> FailoverMiddleware:
    return next(c for c in gateway.app.components if isinstance(c, FailoverMiddleware))


def health(gateway: Gateway, model: str) -> dict[str, tuple[str, int]]:
    """Each deployment of `model` as the failover layer sees it: (its breaker, its failures)."""
    group = failover_of(gateway).groups[model]
    return {state.name: (state.breaker.state, state.failures) for state in group.deployments}


@pytest.mark.parametrize("first_call", sorted(FIRST_CALLS))
def test_a_downgraded_request_is_routed_by_the_cheaper_models_health(
        start: Start, store: str, mock: MockProviderServer, tmp_path: Path,
        first_call: str) -> None:
    # The quota layer below took cheap-mock's deployments in turn, blind to their health, and
    # the failover layer recorded cheap-upstream's failure against the gpt-mock deployment it
    # had picked (its breaker opened: gpt-mock's first deployment, never called, was out).
    journal = tmp_path / "journal"
    gateway = downgrading(start, store, journal, failover_first=True, breaker=OPENS_AT_ONCE,
                          gpt_route=FIRST_CALLS[first_call])
    mock.push_fault(Fault(kind="status", provider="openai", status=500))
    first = gateway.chat()
    assert first.status_code == 200
    assert [r["json"]["model"] for r in mock.requests] == ["cheap-upstream", "cheap-second"]
    assert first.headers["x-sluicegate-deployment"] == "openai/cheap-second"
    assert first.headers["x-sluicegate-attempts"] == "2"
    assert first.headers["x-sluicegate-downgraded"].startswith("gpt-mock -> cheap-mock")
    assert health(gateway, "cheap-mock")["openai/cheap-upstream"] == ("open", 1)
    assert set(health(gateway, "gpt-mock").values()) == {("closed", 0)}
    cost = billed(journal)
    assert cost == CHEAP_COST
    assert eventually(gateway.committed, cost) == cost
    # cheap-upstream's breaker is open: the failover layer sends the next one elsewhere.
    second = gateway.chat()
    assert second.status_code == 200
    assert [r["json"]["model"] for r in mock.requests[2:]] == ["cheap-second"]
    assert second.headers["x-sluicegate-deployment"] == "openai/cheap-second"
    assert second.headers["x-sluicegate-attempts"] == "1"


def test_a_downgraded_request_is_hedged_on_the_cheaper_models_route(
        start: Start, store: str, mock: MockProviderServer, tmp_path: Path) -> None:
    # The failover layer went on with gpt-mock's route, which does not hedge: the caller
    # waited for cheap-upstream's slow answer.
    journal = tmp_path / "journal"
    gateway = downgrading(start, store, journal, failover_first=True,
                          cheap_route="Route(strategy='priority', hedge_after_s=0.2)")
    mock.push_fault(Fault("slow_first_byte", provider="openai", delay_s=5))
    response = post(gateway, "openai", streamed("openai", OUTPUT))
    assert response.status_code == 200
    assert response.headers["x-sluicegate-deployment"] == "openai/cheap-second"
    assert response.headers["x-sluicegate-attempts"] == "2"
    assert response.text.count("data: [DONE]") == 1
    assert [r["json"]["model"] for r in mock.requests] == ["cheap-upstream", "cheap-second"]
    assert failover_of(gateway).counters["hedges"] == 1
    cost = billed(journal)
    assert cost == CHEAP_COST
    assert eventually(gateway.committed, cost) == cost


@pytest.mark.parametrize("first_call", sorted(FIRST_CALLS))
def test_a_downgraded_request_with_no_healthy_cheap_deployment_names_none(
        start: Start, store: str, mock: MockProviderServer, tmp_path: Path,
        first_call: str) -> None:
    # The refusal named the gpt-mock deployment the failover layer had picked before the
    # downgrade, which was never called.
    journal = tmp_path / "journal"
    gateway = downgrading(start, store, journal, failover_first=True, max_attempts=2,
                          breaker=OPENS_AT_ONCE, gpt_route=FIRST_CALLS[first_call])
    for _ in range(2):  # (both cheap-mock deployments fail, and their breakers open)
        mock.push_fault(Fault(kind="status", provider="openai", status=500))
    assert gateway.chat().status_code == 500
    response = gateway.chat()
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "no_healthy_deployment"
    assert "model 'cheap-mock'" in response.json()["error"]["message"]
    assert response.headers["x-sluicegate-downgraded"].startswith("gpt-mock -> cheap-mock")
    assert "x-sluicegate-deployment" not in response.headers
    assert "x-sluicegate-attempts" not in response.headers
    assert [r["json"]["model"] for r in mock.requests] == ["cheap-upstream", "cheap-second"]
    assert eventually(gateway.committed, 0) == 0


# cheap-mock's first deployment calls another account (a key of its own), which does not
# hold the responses made by gpt-mock's deployments (the provider's own key).
CHEAP_ON_ANOTHER_ACCOUNT = TWO_DEPLOYMENTS + '''
os.environ.setdefault("OTHER_ACCOUNT_KEY", "provider-secret-other-account-0123")
CHEAP_PRICE = Price(input_per_mtok="0.1", output_per_mtok="0.2")
models["cheap-mock"] = [Deployment("openai", "cheap-upstream", price=CHEAP_PRICE,
                                   api_key_envs=("OTHER_ACCOUNT_KEY",)),
                        Deployment("openai", "cheap-second", price=CHEAP_PRICE)]
'''


@pytest.mark.parametrize("first_call", ["pinned", "attempt-loop"])
def test_a_downgraded_follow_up_goes_where_its_previous_response_is(
        start: Start, store: str, mock: MockProviderServer, tmp_path: Path,
        first_call: str) -> None:
    # A Responses follow-up goes first to the deployment that made its previous response
    # (pinned), or, when that one is out, into the attempt loop with the others that see
    # it. The downgrade it met in the first reached the caller as a 500; in the second the
    # follow-up went to cheap-upstream, whose account does not hold the previous response.
    gateway = downgrading(start, store, tmp_path / "journal", failover_first=True,
                          limits="Limits(rpm=2, on_overflow='downgrade', "
                                 "downgrade_to='cheap-mock')",
                          breaker=OPENS_AT_ONCE, extra=CHEAP_ON_ANOTHER_ACCOUNT)
    sdk = gateway.openai()
    first = sdk.responses.with_raw_response.create(model="gpt-mock", input="hello")
    assert first.headers["x-sluicegate-deployment"] == "openai/gpt-4o-mini"
    if first_call == "attempt-loop":  # gpt-4o-mini fails, and its breaker opens
        mock.push_fault(Fault(kind="status", provider="openai", status=500))
    assert gateway.chat().status_code == 200  # (the caller's second request of the minute)
    second = sdk.responses.with_raw_response.create(
        model="gpt-mock", input="go on", previous_response_id=first.parse().id)
    assert second.parse().output_text.startswith("Mock reply to: ")
    assert second.headers["x-sluicegate-downgraded"].startswith("gpt-mock -> cheap-mock")
    assert second.headers["x-sluicegate-deployment"] == "openai/cheap-second"
    assert [r["json"]["model"] for r in mock.requests] == \
        ["gpt-4o-mini", *(["gpt-4o-mini", "gpt-4o"] if first_call == "attempt-loop" else
                          ["gpt-4o-mini"]), "cheap-second"]


@pytest.mark.parametrize("hedged", [False, True], ids=["one-call", "hedged"])
def test_a_hedging_route_keeps_the_quota_layers_headers(
        start: Start, store: str, mock: MockProviderServer, tmp_path: Path,
        hedged: bool) -> None:
    # A hedging route makes its calls in copies of the context, and the headers the quota
    # layer below put on the copy that answered were lost.
    route = f"Route(strategy='priority', hedge_after_s={0.2 if hedged else 30})"
    gateway = downgrading(start, store, tmp_path / "journal", failover_first=True,
                          limits="Limits(rpm=5)", gpt_route=route)
    if hedged:
        mock.push_fault(Fault("slow_first_byte", provider="openai", delay_s=5))
    response = post(gateway, "openai", streamed("openai", OUTPUT))
    assert response.status_code == 200
    assert response.headers["x-sluicegate-deployment"] == \
        ("openai/gpt-4o" if hedged else "openai/gpt-4o-mini")
    assert response.headers.get_list("x-ratelimit-remaining-requests") == ["4"]


DEARER_SECOND = TWO_DEPLOYMENTS.replace(
    'Deployment("openai", "gpt-4o", price=MOCK_PRICE)',
    'Deployment("openai", "gpt-4o", price=Price(input_per_mtok="2", output_per_mtok="4"))')


@pytest.mark.parametrize("order", ["failover-above", "quota-above"])
def test_a_continuation_is_cut_off_at_its_own_deployments_price(
        start: Start, slow: MockProviderServer, tmp_path: Path, order: str) -> None:
    # A stream without max_tokens (reserved 20 + 4 x 10 = 60 at the dearer deployment's
    # price, of a budget of 60) breaks after "Moc" on the first deployment ($1 in, $2 out:
    # 10 + 2 x 3 = 16), and goes on from the second ($2 in, $4 out), whose input of 14 is
    # billed again: 16 + 28 + 4 x 4 = 60, so its fifth delta is cut off. Counted at the
    # price the stream started at, it ran to its 16th (16 + 14 + 2 x 16 > 60), and was
    # billed 16 + 28 + 4 x 15 = 104.
    journal = tmp_path / "journal"
    limits = "Limits(budgets=(Budget('0.00006', period='lifetime', stream_cutoff=True),))"
    quota_layer = cutoff_quota("'memory'")
    layers = [FAILOVER, quota_layer] if order == "failover-above" else [quota_layer, FAILOVER]
    gateway = start(auth(static_key(limits)), metering(journal), *layers,
                    extra=DEARER_SECOND, upstream=slow.url)
    wait_streams_done(slow)
    slow.push_fault(Fault(kind="error_event", provider="openai", after_chunks=3))
    response = post(gateway, "openai", streamed("openai", None))
    assert response.status_code == 200
    assert len(slow.requests) == 2  # (continued)
    assert CUTOFF_MESSAGE in response.text.split("\n\n")[-2]
    assert deltas(response.content) == 3 + 4
    wait_streams_done(slow)
    cost = billed(journal)
    assert cost == INPUT + 2 * 3 + 2 * 14 + 4 * 4 == 60
    assert eventually(gateway.committed, cost) == cost
