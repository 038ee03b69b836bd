"""The failover layer after a 429's cool-down: one probe goes first, the others wait for it.

A deployment that answered 429 with Retry-After cools down, and requests with nowhere else to
go wait for the cool-down to end. Then one call (`half_open_probes`) goes first: its answer
lets the others go; another 429 starts a new cool-down, which they wait out within their
deadlines or answer 429 for; any other end (a failure, a client that left) gives its slot to
the next. One mock provider plays the only deployment. Each request carries its name as its
message, so the mock's request log tells which of them reached it, and in what order. A
fallback model the caller's key may not use is never waited for (last test: two models on
the mock, two keys).
"""
from __future__ import annotations

import math
import socket
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest

from tests.harness import TEST_KEY, ThreadedServer, serve, wait_for
from tests.mock_providers import Fault, MockConfig, MockProviderServer

ADMIN_TOKEN = "cooldown-admin-token-0123456789"
WAITERS = 4  # the requests that come to wait out the cool-down with the one that earned it
Outcome = tuple[int, int | None]  # status, Retry-After (seconds, rounded up)


@pytest.fixture(scope="module")
def upstream() -> Iterator[MockProviderServer]:
    with MockProviderServer(MockConfig()) as server:
        yield server


@pytest.fixture
def mock(upstream: MockProviderServer) -> Iterator[MockProviderServer]:
    def reset() -> None:
        upstream.clear_faults()
        upstream.reset_log()
        upstream.config.update({"ttft_s": 0.0})
    reset()
    yield upstream
    reset()


def config(mock: MockProviderServer, *, deadline_s: float, first_byte_s: float = 5) -> str:
    return f'''
import os
from gateway.config import Deployment, Middleware, Price, Timeouts
from middleware.auth import AuthMiddleware, StaticKey
from middleware.failover import FailoverMiddleware, RetryPolicy
from providers import Provider

os.environ.setdefault("MOCK_PROVIDER_KEY", "provider-secret-123456789")
os.environ.setdefault("SG_TEST_KEY", "{TEST_KEY}")
os.environ.setdefault("SG_COOLDOWN_ADMIN", "{ADMIN_TOKEN}")
timeouts = Timeouts(connect_s=2, first_byte_s={first_byte_s}, idle_s=5, total_s=60)
providers = {{"a": Provider("openai", base_url="{mock.base_url("openai")}",
                           api_key_env="MOCK_PROVIDER_KEY", timeouts=timeouts)}}
models = {{"primary": [Deployment("a", "gpt-4o-mini",
                                  price=Price(input_per_mtok="1", output_per_mtok="2"))]}}
middleware = [
    Middleware(AuthMiddleware, keys=[StaticKey("tests", key_env="SG_TEST_KEY")]),
    Middleware(FailoverMiddleware, admin_token_env="SG_COOLDOWN_ADMIN",
               retry=RetryPolicy(deadline_s={deadline_s})),
]
'''


def ask(gateway: ThreadedServer, name: str) -> Outcome:
    sdk = openai.OpenAI(base_url=gateway.url + "/v1", api_key=TEST_KEY, max_retries=0)
    try:
        sdk.chat.completions.create(model="primary",
                                    messages=[{"role": "user", "content": name}])
    except openai.APIStatusError as error:
        retry_after = error.response.headers.get("retry-after")
        return error.status_code, None if retry_after is None else math.ceil(float(retry_after))
    return 200, None


def waiters() -> list[str]:
    return [f"request {number}" for number in range(1, WAITERS + 1)]


def admin(gateway: ThreadedServer) -> dict[str, Any]:
    response = httpx.get(gateway.url + "/admin/deployments",
                         headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def deployment(gateway: ThreadedServer) -> dict[str, Any]:
    state: dict[str, Any] = admin(gateway)["models"]["primary"]["deployments"][0]
    return state


def reached(mock: MockProviderServer) -> list[str]:
    """The requests that reached the mock, by name, in the order they did."""
    return [entry["json"]["messages"][0]["content"] for entry in mock.requests]


def wait_out_a_cool_down(gateway: ThreadedServer, mock: MockProviderServer,
                         ask: Callable[[ThreadedServer, str], Outcome] = ask,
                         ) -> dict[str, Outcome]:
    """Every request's outcome: "request 0" earns the 429 the first queued fault gives, the
    waiters come while the deployment cools down (all are in the layer before this goes on)."""
    with ThreadPoolExecutor(1 + WAITERS) as pool:
        calls = {"request 0": pool.submit(ask, gateway, "request 0")}
        assert wait_for(lambda: len(mock.requests) == 1)
        calls |= {name: pool.submit(ask, gateway, name) for name in waiters()}
        assert wait_for(lambda: admin(gateway)["counters"]["requests"] == 1 + WAITERS)
        return {name: call.result(timeout=30) for name, call in calls.items()}


@contextmanager
def leaving_client(gateway: ThreadedServer, name: str) -> Iterator[None]:
    """A request whose client goes away (closes its connection) when the block ends: a raw
    socket, so that the moment it leaves is the test's, not a timeout's."""
    body = orjson.dumps({"model": "primary", "messages": [{"role": "user", "content": name}]})
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1:{gateway.port}\r\n"
            f"authorization: Bearer {TEST_KEY}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", gateway.port)) as connection:
        connection.sendall(head + body)
        yield


def test_after_a_cool_down_one_probe_goes_first_and_the_others_follow_its_answer(
        tmp_path: Path, mock: MockProviderServer) -> None:
    # The first call after the cool-down is held 2 s by the mock, the calls after it 0.5 s.
    # Let go all at once (as before the probe), the others would be answered while the
    # probe is held; behind one probe, they reach the mock only once it has answered, so its
    # answer comes back first.
    mock.push_fault(Fault("status", provider="openai", status=429, retry_after_s=2))
    mock.push_fault(Fault("slow_first_byte", provider="openai", delay_s=2.0))
    answered: list[str] = []

    def ask_and_note(gateway: ThreadedServer, name: str) -> Outcome:
        outcome = ask(gateway, name)
        answered.append(name)
        return outcome

    def slow_the_calls_after_the_probe() -> None:
        assert wait_for(lambda: len(mock.requests) >= 2)
        mock.config.update({"ttft_s": 0.5})

    with serve(tmp_path, config(mock, deadline_s=30)) as gateway, ThreadPoolExecutor(1) as pool:
        slowing = pool.submit(slow_the_calls_after_the_probe)
        outcomes = wait_out_a_cool_down(gateway, mock, ask_and_note)
        slowing.result()
        state = deployment(gateway)
    assert outcomes == {name: (200, None) for name in ["request 0", *waiters()]}
    log = reached(mock)
    assert log[0] == "request 0" and sorted(log[1:]) == sorted(outcomes)  # each went once
    assert answered[0] == log[1]  # the probe answered first; the others went after it
    assert (state["cooling_s"], state["cool_down_probes"], state["in_flight"]) == (0, 0, 0)


def test_a_probe_refused_with_another_429_keeps_the_others_from_going(
        tmp_path: Path, mock: MockProviderServer) -> None:
    # The probe earns a 30 s cool-down, past every request's 10 s deadline: the requests that
    # waited with it are answered 429 with the time left and never reach the mock. (Let go
    # all at once, one of them would earn that 429 and the others be served.)
    mock.push_fault(Fault("status", provider="openai", status=429, retry_after_s=2))
    mock.push_fault(Fault("status", provider="openai", status=429, retry_after_s=30))
    with serve(tmp_path, config(mock, deadline_s=10)) as gateway:
        outcomes = wait_out_a_cool_down(gateway, mock)
        state = deployment(gateway)
    log = reached(mock)
    assert len(log) == 2 and log[0] == "request 0"
    assert outcomes[log[1]] == (429, 30)  # the provider's own answer to the probe
    assert {status for status, _ in outcomes.values()} == {429}
    for name in set(outcomes) - set(log):  # waited, and heard of the probe's cool-down
        retry_after = outcomes[name][1]
        assert retry_after is not None and 20 <= retry_after <= 30, (name, outcomes[name])
    assert state["cooling_s"] > 20 and (state["cool_down_probes"], state["in_flight"]) == (0, 0)


def test_a_probe_that_fails_otherwise_gives_its_slot_to_the_next(
        tmp_path: Path, mock: MockProviderServer) -> None:
    # The probe fails with a 503: its slot goes to the next request, whose call is the next
    # probe (it earns a 30 s cool-down, so the rest answer 429 without reaching the mock). A
    # slot kept by the failed probe would hold them all until their deadline.
    mock.push_fault(Fault("status", provider="openai", status=429, retry_after_s=2))
    mock.push_fault(Fault("status", provider="openai", status=503))
    mock.push_fault(Fault("status", provider="openai", status=429, retry_after_s=30))
    with serve(tmp_path, config(mock, deadline_s=10)) as gateway:
        outcomes = wait_out_a_cool_down(gateway, mock)
        state = deployment(gateway)
    log = reached(mock)
    assert len(log) == 3 and log[0] == "request 0"
    assert 200 not in {status for status, _ in outcomes.values()}
    for name in set(outcomes) - set(log):
        assert outcomes[name][0] == 429
        retry_after = outcomes[name][1]
        assert retry_after is not None and 20 <= retry_after <= 30, (name, outcomes[name])
    assert (state["cool_down_probes"], state["in_flight"]) == (0, 0)


def test_a_probe_whose_client_left_gives_its_slot_to_the_next(
        tmp_path: Path, mock: MockProviderServer) -> None:
    # "request 0" earns the 429, waits the cool-down out alone and is its probe, held by the
    # mock. The waiters come; then its client leaves: the probe is cancelled and its slot
    # goes to a waiter, whose probe earns a 30 s cool-down (the rest answer 429 without
    # reaching the mock). A slot kept by the cancelled probe would hold them until their
    # deadline, and then they would be answered 429 "1 s" having heard of no cool-down.
    mock.push_fault(Fault("status", provider="openai", status=429, retry_after_s=1))
    mock.push_fault(Fault("slow_first_byte", provider="openai", delay_s=30.0))
    mock.push_fault(Fault("status", provider="openai", status=429, retry_after_s=30))
    text = config(mock, deadline_s=10, first_byte_s=40)
    with serve(tmp_path, text) as gateway, ThreadPoolExecutor(WAITERS) as pool:
        with leaving_client(gateway, "request 0"):
            assert wait_for(lambda: len(mock.requests) == 2)  # its 429, then its probe
            calls = {name: pool.submit(ask, gateway, name) for name in waiters()}
            assert wait_for(lambda: admin(gateway)["counters"]["requests"] == 1 + WAITERS)
        outcomes = {name: call.result(timeout=30) for name, call in calls.items()}
        assert wait_for(lambda: deployment(gateway)["in_flight"] == 0)
        state = deployment(gateway)
    log = reached(mock)
    assert len(log) == 3 and log[:2] == ["request 0", "request 0"]
    assert outcomes[log[2]] == (429, 30)
    for name in set(outcomes) - set(log):
        retry_after = outcomes[name][1]
        assert outcomes[name][0] == 429 and retry_after is not None and 20 <= retry_after <= 30
    assert state["cool_down_probes"] == 0


def test_requests_waiting_on_a_probe_are_answered_at_their_deadline(
        tmp_path: Path, mock: MockProviderServer) -> None:
    # The probe is held for as long as its client stays; the waiters' 3 s deadline comes
    # first: they are answered 429 (the time left unknown: 1 s) while it is still out, and
    # never reach the mock. Then the probe's client leaves, and its slot is given back.
    mock.push_fault(Fault("status", provider="openai", status=429, retry_after_s=1))
    mock.push_fault(Fault("slow_first_byte", provider="openai", delay_s=30.0))
    text = config(mock, deadline_s=3, first_byte_s=40)
    with serve(tmp_path, text) as gateway, ThreadPoolExecutor(WAITERS) as pool:
        with leaving_client(gateway, "request 0"):
            assert wait_for(lambda: len(mock.requests) == 2)  # its 429, then its probe
            calls = {name: pool.submit(ask, gateway, name) for name in waiters()}
            outcomes = {name: call.result(timeout=30) for name, call in calls.items()}
            assert outcomes == {name: (429, 1) for name in waiters()}
            assert reached(mock) == ["request 0", "request 0"]
            assert deployment(gateway)["cool_down_probes"] == 1  # still out
        assert wait_for(lambda: deployment(gateway)["cool_down_probes"] == 0)
        assert wait_for(lambda: deployment(gateway)["in_flight"] == 0)


LIMITED_KEY = "sk-sg-primary-only-0123456789abcdef0123456789"


def fallback_config(mock: MockProviderServer) -> str:
    """"primary" falls back to "backup" (both on the mock); the "limited" key may use only
    "primary"."""
    return f'''
import os
from gateway.config import Deployment, Middleware, Price, Timeouts
from middleware.auth import AuthMiddleware, StaticKey
from middleware.failover import FailoverMiddleware, RetryPolicy, Route
from providers import Provider

os.environ.setdefault("MOCK_PROVIDER_KEY", "provider-secret-123456789")
os.environ.setdefault("SG_TEST_KEY", "{TEST_KEY}")
os.environ.setdefault("SG_LIMITED_KEY", "{LIMITED_KEY}")
os.environ.setdefault("SG_COOLDOWN_ADMIN", "{ADMIN_TOKEN}")
timeouts = Timeouts(connect_s=2, first_byte_s=5, idle_s=5, total_s=60)
providers = {{"a": Provider("openai", base_url="{mock.base_url("openai")}",
                           api_key_env="MOCK_PROVIDER_KEY", timeouts=timeouts)}}
PRICE = Price(input_per_mtok="1", output_per_mtok="2")
models = {{"primary": [Deployment("a", "gpt-4o-mini", price=PRICE)],
          "backup": [Deployment("a", "gpt-4o", price=PRICE)]}}
middleware = [
    Middleware(AuthMiddleware, keys=[
        StaticKey("tests", key_env="SG_TEST_KEY"),
        StaticKey("limited", key_env="SG_LIMITED_KEY", allowed_models=("primary",))]),
    Middleware(FailoverMiddleware, admin_token_env="SG_COOLDOWN_ADMIN",
               routes={{"primary": Route(fallbacks=("backup",))}},
               retry=RetryPolicy(max_attempts=1, deadline_s=10)),
]
'''


def ask_as(gateway: ThreadedServer, key: str, model: str) -> Outcome:
    sdk = openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)
    try:
        sdk.chat.completions.create(model=model, messages=[{"role": "user", "content": model}])
    except openai.APIStatusError as error:
        retry_after = error.response.headers.get("retry-after")
        return error.status_code, None if retry_after is None else math.ceil(float(retry_after))
    return 200, None


@pytest.mark.parametrize("backup_cooling_s", [5, 20])
def test_a_fallback_the_key_may_not_use_is_not_waited_for(
        tmp_path: Path, mock: MockProviderServer, backup_cooling_s: int) -> None:
    # Both models cool down, "primary" for 30 s (past the 10 s deadline). The limited key's
    # request has nowhere to go: it is answered at once, 429 with primary's time left.
    # Before: it waited out backup's 5 s cool-down (then heard 25 s), or was told backup's
    # 20 s, although it may never go there.
    mock.push_fault(Fault("status", provider="openai", status=429,
                          retry_after_s=backup_cooling_s))
    mock.push_fault(Fault("status", provider="openai", status=429, retry_after_s=30))
    with serve(tmp_path, fallback_config(mock)) as gateway:
        assert ask_as(gateway, TEST_KEY, "backup") == (429, backup_cooling_s)
        assert ask_as(gateway, TEST_KEY, "primary") == (429, 30)
        status, retry_after = ask_as(gateway, LIMITED_KEY, "primary")
    assert status == 429
    assert retry_after is not None and 28 < retry_after <= 30, retry_after
    assert reached(mock) == ["backup", "primary"]


def test_a_client_that_leaves_while_its_request_waits_ends_the_wait(
        tmp_path: Path, mock: MockProviderServer) -> None:
    # "request 0" earns a 3 s cool-down and waits it out (its deadline is 30 s); its client
    # leaves meanwhile. The wait ends there: no call after the cool-down (it would be a call
    # nobody reads), and its concurrency slot (max_concurrent=1) is free at once, so the
    # next request is admitted while the deployment still cools down, and served after it.
    mock.push_fault(Fault("status", provider="openai", status=429, retry_after_s=3))
    text = "from gateway.policy import Limits\nfrom middleware.quota import QuotaMiddleware\n" \
        + config(mock, deadline_s=30).replace("    Middleware(FailoverMiddleware", (
            "    Middleware(QuotaMiddleware, limits=Limits(max_concurrent=1)),\n"
            "    Middleware(FailoverMiddleware"))
    with serve(tmp_path, text) as gateway:
        with leaving_client(gateway, "request 0"):
            assert wait_for(lambda: len(mock.requests) == 1)
            assert wait_for(lambda: deployment(gateway)["cooling_s"] > 0)
        assert wait_for(lambda: "sluicegate_client_disconnects_total{" in httpx.get(
            gateway.url + "/metrics").text)  # its request has ended
        assert ask(gateway, "request 1") == (200, None)  # (waits out the rest of it)
    assert reached(mock) == ["request 0", "request 1"]
