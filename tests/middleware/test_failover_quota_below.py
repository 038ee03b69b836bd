"""The failover layer above a quota layer: a call the quota layer ends without calling below
says nothing of a deployment's health, and a hedged request is admitted and settled once.

Prices, prompt and budgets are test_quota_layer's (a cost in micro-dollars is input tokens +
2 x output tokens); `gpt-mock` and `claude-mock` have two deployments each on one mock,
routed by priority, so a fault injected for the next call hits the first deployment.
"""
from __future__ import annotations

import pytest

from tests.harness import wait_for
from tests.middleware.test_quota_billing import post, streamed
from tests.middleware.test_quota_cutoff import (
    NO_ROOM,
    TWO_CLAUDE_DEPLOYMENTS,
    committed,
    read_until_cut_off,
)
from tests.middleware.test_quota_failover import TWO_DEPLOYMENTS, failover_of
from tests.middleware.test_quota_layer import (
    COST,
    CUTOFF_BUDGET,
    INPUT,
    OUTPUT,
    RESERVED_100,
    Start,
    auth,
    eventually,
    late_redis,
    prefix,
    quota,
    redis_store,
    slow,
    slow_mock,
    start,
    static_key,
    store,
    wait_streams_done,
)
from tests.mock_providers import Fault, MockProviderServer
from tests.tcp_proxy import TcpProxy

__all__ = ["late_redis", "prefix", "slow", "slow_mock", "start", "store"]  # (fixtures)

MODELS = {"openai": "gpt-mock", "anthropic": "claude-mock"}
PRIORITY = ("routes={'gpt-mock': Route(strategy='priority', continuation=True), "
            "'claude-mock': Route(strategy='priority', continuation=True)}")


# -- a continuation the quota layer ends without calling below -----------------------------------

# Each breaker opens at its first failure and half-opens 0.3 s later; two attempts a request.
HALF_OPENING = ("Middleware(FailoverMiddleware, retry=RetryPolicy(max_attempts=2), "
                "breaker=BreakerSettings(consecutive_failures=1, cooldown_s=0.3), "
                f"{PRIORITY})")


@pytest.mark.parametrize("api,after_chunks", NO_ROOM)
def test_a_continuation_the_quota_layer_ends_uncalled_is_no_verdict_on_its_deployment(
        start: Start, slow: MockProviderServer, api: str, after_chunks: int) -> None:
    # The quota layer below ends a continuation with no room left in its budget without
    # calling below (test_quota_cutoff). The failover layer took that for an answer, and
    # recorded a success for the deployment it had picked, which was never called: its
    # half-open breaker closed on a call that never went out.
    gateway = start(auth(static_key(CUTOFF_BUDGET)), HALF_OPENING, quota("'memory'"),
                    extra=TWO_CLAUDE_DEPLOYMENTS, upstream=slow.url)
    wait_streams_done(slow)
    for _ in range(2):  # both deployments fail: both breakers open
        slow.push_fault(Fault(kind="status", provider=api, status=500))
    assert post(gateway, api, streamed(api, OUTPUT)).status_code == 500
    broken, continuation = failover_of(gateway).groups[MODELS[api]].deployments
    assert wait_for(lambda: broken.breaker.reopens_in_s() == continuation.breaker.reopens_in_s()
                    == 0.0)
    assert eventually(gateway.committed, 0) == 0  # (the failed request cost nothing)
    slow.push_fault(Fault(kind="error_event", provider=api, after_chunks=after_chunks))
    read = read_until_cut_off(gateway, api)  # (the broken stream's half-open probe failed)
    assert len(slow.requests) == 3  # (no continuation call)
    cost = INPUT + 2 * read.deltas  # (settled once the request has ended, the failover
    assert committed(gateway, cost) == cost  # layer's bookkeeping included)
    assert broken.breaker.state == "open"
    assert (continuation.breaker.state, continuation.breaker.probes_in_flight) == \
        ("half_open", 0)
    assert continuation.failures == 1  # (its failure in the first request, no other)
    wait_streams_done(slow)


# -- hedged calls ----------------------------------------------------------------------------------

def hedging(hedge_after_s: float) -> str:
    return ("Middleware(FailoverMiddleware, routes={'gpt-mock': Route(strategy='priority', "
            f"hedge_after_s={hedge_after_s})}})")


def test_a_hedged_request_is_settled_without_a_metering_layer(
        start: Start, store: str, mock: MockProviderServer) -> None:
    # The quota layer asks to settle the request once it has ended (RequestContext.on_end).
    # It asked in the hedged call's copy of the context, which had no such list yet (the
    # metering layer makes one): the request was never settled. Its reservation stood
    # (210 for 30) and so did its concurrency lease, which shut the key out for lease_s.
    limits = "Limits(max_concurrent=1, budgets=(Budget('0.001', period='lifetime'),))"
    gateway = start(auth(static_key(limits)), hedging(0.2), quota(store),
                    extra=TWO_DEPLOYMENTS)
    mock.push_fault(Fault("slow_first_byte", provider="openai", delay_s=5))
    response = gateway.chat(max_tokens=100)
    assert response.status_code == 200
    assert response.headers["x-sluicegate-deployment"] == "openai/gpt-4o"  # (hedged)
    assert eventually(gateway.committed, COST) == COST != RESERVED_100
    assert gateway.chat().status_code == 200


def test_a_hedge_made_while_the_first_call_is_admitted_is_not_admitted_again(
        start: Start, prefix: str, late_redis: TcpProxy) -> None:
    # Redis answers 0.5 s late; the route hedges after 0.05 s. The first call is still in
    # its admission when the hedge goes, and the hedge's call reaches the quota layer below
    # before the first one is admitted. It waits for that admission (ctx.state, which the
    # copies share, marks it under way). It was admitted again: one more request against
    # RPM and another reservation under the same lease id, which nothing settled (the first
    # call won, the second was cancelled while its admission ran): 90 committed for 60.
    url = f"redis://127.0.0.1:{late_redis.port}/0"
    limits = "Limits(rpm=5, budgets=(Budget('0.001', period='lifetime'),))"
    gateway = start(auth(static_key(limits)), hedging(0.05),
                    quota(redis_store(prefix, url, socket_timeout_s=5.0)),
                    extra=TWO_DEPLOYMENTS)
    assert gateway.chat().status_code == 200  # (connected, scripts loaded: one request)
    late_redis.reply_delay_s = 0.5
    hedged = gateway.chat()
    late_redis.reply_delay_s = 0.0
    assert hedged.status_code == 200
    assert hedged.headers.get_list("x-ratelimit-remaining-requests") == ["3"]
    assert eventually(gateway.committed, 2 * COST) == 2 * COST
    assert gateway.chat().headers["x-ratelimit-remaining-requests"] == "2"
