"""A stream broken and continued elsewhere is billed both parts, however durably metered.

The stack of test_failover_hedge_billing.py (the README's order: auth with a lifetime budget,
metering with `durability` "batch" and "response", quota on Redis, the exact cache, failover
over two deployments priced apart), its route with `continuation=True`. Clients are the
official SDKs: OpenAI chat to `pair` (two OpenAI deployments), Anthropic messages to `mix`
(an Anthropic deployment, then an OpenAI one). A stream breaks with the provider's in-band
error event after some content and is continued on the other deployment; unhedged, or as
the hedge that won the race (the first call slow to start, the hedge breaking).

The request's row in the ledger must be what the mock providers billed, by the README's
rules: the broken call the input its provider reported (else the request's estimate) and
the larger of what it reported, a token per content delta, and the estimate of the text it
delivered (continuation.py), at its own deployment's price; the continuation its reported
usage at its price; every call an attempt. The budget is settled to the same amount. With
`durability="response"` the metering layer records the request as the continuation's last
message passes it, before the failover layer has seen the continuation's call end.
"""
from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path
from typing import Any

import pytest

from gateway import create_app
from gateway.kernel import Kernel
from gateway.tokens import estimate_messages, estimate_text
from middleware.quota import QuotaMiddleware
from tests.harness import ThreadedServer
from tests.middleware.test_exact_billing_sweep import prefill_of, reported, text_sent, wait_until
from tests.middleware.test_failover_hedge_billing import (
    APIS,
    HEDGE_AFTER_S,
    KEY_ID,
    PRICES,
    ask,
    billing_mock,
    bills_of,
    config_file,
    redis_prefix,
    row,
)
from tests.middleware.test_metering_below_failover import journaled
from tests.middleware.test_quota_layer import budget_check
from tests.mock_providers import Fault, MockProviderServer

__all__ = ["billing_mock", "redis_prefix"]  # (fixtures, used by name)

ROUTES = {"unhedged": "continuation=True",
          "hedged": f"hedge_after_s={HEDGE_AFTER_S}, continuation=True"}
BREAK = Fault("error_event", after_chunks=3)
# route -> the faults of the calls in the order they reach the mock: unhedged, the first
# call breaks; hedged, the first call is slow to start, the hedge wins and breaks.
FAULTS = {"unhedged": [BREAK], "hedged": [Fault("slow_first_byte", delay_s=2.0), BREAK]}


def failover(route: str) -> str:
    return ("Middleware(FailoverMiddleware, breaker=NEVER_OPENS, retry=RetryPolicy("
            "max_attempts=3, budget_ratio=1.0, budget_min_per_s=1000), routes={name: Route("
            f"strategy='priority', {ROUTES[route]}) for name in models}})")


def billed(bills: list[dict[str, Any]], marker: str) -> tuple[int, int, int]:
    """(input tokens, output tokens, micro-dollars) by the README's rules (module docstring);
    a call cancelled before it sent content bills nothing."""
    asked = estimate_messages([{"role": "user", "content": f"{marker} say something"}])
    input_tokens = output_tokens = micros = 0
    for bill in bills:
        price = PRICES[(bill["provider"], bill["json"]["model"])]
        used_in, used_out = reported(bill)
        if not bill["complete"]:
            if bill["content_sent"] == 0:
                continue
            used_in = used_in or asked
            used_out = max(used_out, bill["content_sent"], estimate_text(text_sent(bill)))
        input_tokens, output_tokens = input_tokens + used_in, output_tokens + used_out
        micros += price[0] * used_in + price[1] * used_out
    return input_tokens, output_tokens, micros


@pytest.mark.parametrize("route", sorted(ROUTES))
@pytest.mark.parametrize("api", sorted(APIS))
@pytest.mark.parametrize("durability", ["batch", "response"])
def test_a_continued_stream_is_billed_both_parts(
        billing_mock: MockProviderServer, tmp_path: Path, redis_prefix: str, durability: str,
        api: str, route: str) -> None:
    mock = billing_mock
    marker = f"zk{uuid.uuid4().hex[:12]}x"
    for fault in FAULTS[route]:
        mock.push_fault(dataclasses.replace(fault, match=marker))
    calls = len(FAULTS[route]) + 1
    app = create_app(config_file(tmp_path, mock.url, durability, redis_prefix,
                                 failover(route)))
    assert isinstance(app, Kernel)
    quota = next(c for c in app.components if isinstance(c, QuotaMiddleware))
    with ThreadedServer(app) as server:
        request_id, _ = ask(server.url, api, marker, True)
        # (a hedge's loser ends its call in its own time: its bill comes then)
        assert wait_until(lambda: len(bills_of(mock, marker)) == calls
                          and mock.active_streams == 0)
        bills = bills_of(mock, marker)
        expected = billed(bills, marker)

        def spent() -> int | None:
            value: int | None = server.run(quota.store.committed(
                [budget_check("lifetime", f"key:{KEY_ID}")]))[0]
            return value
        wait_until(lambda: spent() == expected[2], 5)
        budget = spent()
    # (the mock keeps a bill as its call ends: the hedge's loser's last)
    [continuation] = [bill for bill in bills if prefill_of(bill) is not None]
    [broken] = [bill for bill in bills if bill["content_sent"] and not bill["complete"]]
    assert continuation["complete"] and prefill_of(continuation) == text_sent(broken).rstrip()
    if route == "hedged":
        [loser] = [bill for bill in bills if bill is not broken and bill is not continuation]
        assert loser["status"] == 200 and loser["content_sent"] == 0
    served = f"{continuation['provider']}/{continuation['json']['model']}"
    [record] = [r for r in journaled(tmp_path / "journal") if r.request_id == request_id]
    assert row(record) == (served, 200, calls, *expected)
    assert budget == expected[2]
