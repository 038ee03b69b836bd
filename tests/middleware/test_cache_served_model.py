"""The cache keeps an answer under the model it was asked of only when that model gave it.

A layer below the cache may send a request elsewhere: the quota layer's downgrade to a
cheaper model, failover's fallback model, a broken stream continued on another deployment.
Such an answer was once kept under the key of the model asked for, so one key's spent budget
or one provider's outage answered every later caller of that model (keys that may not use the
fallback model included) for the whole TTL, and an invalidation of the model never reached
it. Now each is a miss that stores nothing. Real gateway, real mock providers, the official
`openai` SDK; the in-process store (the rule is the layer's, the same for every store).
"""
from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from gateway.app import create_app
from tests.harness import TEST_KEY, ThreadedServer, mock_config, write_config
from tests.mock_providers import Fault, MockProviderServer

OTHER_KEY = "sk-sg-served-model-other-key-0123456789abcdef"
CHEAP = '''
models["cheap-mock"] = [Deployment("azure", "cheap-deployment", price=MOCK_PRICE)]
'''
# The test key goes to cheap-mock past one request a minute; the other key has no limit.
KEYS = ("keys=[StaticKey('tests', key_env='SG_TEST_KEY', id='limited', limits=Limits(rpm=1, "
        "on_overflow='downgrade', downgrade_to='cheap-mock')), "
        "StaticKey('tests', key_env='SG_OTHER_KEY', id='other')]")
FAILOVER = ("Middleware(FailoverMiddleware, breaker=NEVER_OPENS, "
            "retry=RetryPolicy(max_attempts=2, budget_ratio=1.0, budget_min_per_s=1000), "
            "routes={'gpt-mock': Route(strategy='priority', fallbacks=('cheap-mock',), "
            "continuation=True)})")
STACKS = {
    # the quota layer below the cache routes the request itself (`route_to`)
    "downgrade": f"[Middleware(AuthMiddleware, {KEYS}), Middleware(CacheMiddleware), "
                 f"Middleware(QuotaMiddleware)]",
    # below failover, the quota layer raises `Rerouted` and failover calls cheap-mock
    "downgrade-rerouted": f"[Middleware(AuthMiddleware, {KEYS}), Middleware(CacheMiddleware), "
                          f"{FAILOVER}, Middleware(QuotaMiddleware)]",
    # the default order: failover's fallback model answers under the cache
    "fallback": f"[Middleware(AuthMiddleware, {KEYS}), Middleware(CacheMiddleware), "
                f"{FAILOVER}]",
    # the cache below failover: it is called for the fallback's attempt too
    "cache-below-failover": f"[Middleware(AuthMiddleware, {KEYS}), {FAILOVER}, "
                            f"Middleware(CacheMiddleware)]",
    # gpt-mock's deployment out after one failure: the next request's first pick is
    # cheap-mock, hedged between its two deployments
    "hedged-fallback": f"[Middleware(AuthMiddleware, {KEYS}), Middleware(CacheMiddleware), "
                       "Middleware(FailoverMiddleware, breaker=BreakerSettings("
                       "consecutive_failures=1, min_requests=10**9, cooldown_s=600), "
                       "retry=RetryPolicy(max_attempts=2, budget_ratio=1.0, "
                       "budget_min_per_s=1000), routes={'gpt-mock': Route(strategy='priority', "
                       "fallbacks=('cheap-mock',), hedge_after_s=5)})]",
}
TWO_CHEAP = '''
models["cheap-mock"] = [Deployment("azure", "cheap-a", price=MOCK_PRICE),
                        Deployment("azure", "cheap-b", price=MOCK_PRICE)]
'''


@pytest.fixture
def gateway(request: pytest.FixtureRequest, tmp_path: Path, mock_url: str,
            monkeypatch: pytest.MonkeyPatch) -> Iterator[ThreadedServer]:
    monkeypatch.setenv("SG_OTHER_KEY", OTHER_KEY)
    text = mock_config(mock_url, middleware=STACKS[request.param],
                       extra=TWO_CHEAP if request.param == "hedged-fallback" else CHEAP)
    config = write_config(tmp_path, text.replace(
        "import BreakerSettings,", "import BreakerSettings, Route,"))
    with ThreadedServer(create_app(config)) as server:
        yield server


def ask(server: ThreadedServer, text: str, *, key: str = OTHER_KEY, model: str = "gpt-mock",
        **extra: Any) -> Any:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
    return client.chat.completions.with_raw_response.create(
        model=model, temperature=0, messages=[{"role": "user", "content": text}], **extra)


def cached(server: ThreadedServer, text: str, model: str = "gpt-mock") -> bool:
    """Whether `text` is stored (asked of the cache only, by the key without a limit)."""
    try:
        ask(server, text, model=model, extra_headers={"cache-control": "only-if-cached"})
    except openai.APIStatusError as exc:
        assert exc.status_code == 504, exc
        return False
    return True


def wait_cached(server: ThreadedServer, text: str, model: str = "gpt-mock") -> None:
    """Waits until `text` is stored; misses are stored in the order they were answered, so
    every answer before it has been stored or left out by then."""
    deadline = time.monotonic() + 10
    while not cached(server, text, model) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert cached(server, text, model)


def upstreams(mock: MockProviderServer, text: str) -> list[str]:
    return [r["provider"] for r in mock.requests if text in str(r.get("json"))]


def marker() -> str:
    return uuid.uuid4().hex


@pytest.mark.parametrize("gateway", ["downgrade", "downgrade-rerouted"], indirect=True)
def test_a_downgraded_answer_is_not_kept_for_the_model_asked(
        gateway: ThreadedServer, mock: MockProviderServer) -> None:
    first, downgraded, after = (f"{name} {marker()}" for name in ("first", "down", "after"))
    assert ask(gateway, first, key=TEST_KEY).headers["x-sluicegate-cache"] == "miss"
    over = ask(gateway, downgraded, key=TEST_KEY)  # past the key's rpm: to cheap-mock
    assert over.headers["x-sluicegate-downgraded"].startswith("gpt-mock -> cheap-mock")
    assert over.headers["x-sluicegate-cache"] == "miss"
    assert upstreams(mock, downgraded) == ["azure"]
    assert ask(gateway, after).headers["x-sluicegate-cache"] == "miss"
    wait_cached(gateway, after)
    assert cached(gateway, first)  # what gpt-mock answered is kept
    assert not cached(gateway, downgraded)
    # The other key asking the same gets gpt-mock's answer, which is kept.
    again = ask(gateway, downgraded)
    assert again.headers["x-sluicegate-cache"] == "miss"
    assert "x-sluicegate-downgraded" not in again.headers
    assert upstreams(mock, downgraded) == ["azure", "openai"]
    wait_cached(gateway, downgraded)


@pytest.mark.parametrize("gateway", ["fallback", "cache-below-failover"], indirect=True)
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_fallback_models_answer_is_not_kept_for_the_model_asked(
        gateway: ThreadedServer, mock: MockProviderServer, stream: bool) -> None:
    failed, after = f"failed {marker()}", f"after {marker()}"
    mock.push_fault(Fault("status", provider="openai", status=500, match=failed))
    answered = ask(gateway, failed, stream=stream)
    if stream:
        list(answered.parse())  # (read to its end)
    assert answered.headers["x-sluicegate-fallback"] == "cheap-mock"
    assert upstreams(mock, failed) == ["openai", "azure"]
    after_answer = ask(gateway, after, stream=stream)
    if stream:
        list(after_answer.parse())
    assert after_answer.headers["x-sluicegate-cache"] == "miss"
    wait_cached(gateway, after)
    assert not cached(gateway, failed)
    # Once gpt-mock answers, its answer is kept.
    ask(gateway, failed)
    assert upstreams(mock, failed) == ["openai", "azure", "openai"]
    wait_cached(gateway, failed)


@pytest.mark.parametrize("gateway", ["fallback"], indirect=True)
def test_a_stream_continued_elsewhere_is_not_kept(gateway: ThreadedServer,
                                                 mock: MockProviderServer) -> None:
    broken, after = f"broken {marker()}", f"after {marker()}"
    mock.push_fault(Fault("reset", provider="openai", after_chunks=2, match=broken))
    stream = ask(gateway, broken, stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream.parse()
                   if chunk.choices)
    assert text  # the caller got a whole answer: two calls' parts
    assert upstreams(mock, broken) == ["openai", "azure"]
    ask(gateway, after)
    wait_cached(gateway, after)
    assert not cached(gateway, broken)


@pytest.mark.parametrize("gateway", ["hedged-fallback"], indirect=True)
def test_a_hedged_call_to_a_fallback_model_is_not_kept_for_the_model_asked(
        gateway: ThreadedServer, mock: MockProviderServer) -> None:
    failed, hedged, after = (f"{name} {marker()}" for name in ("failed", "hedged", "after"))
    mock.push_fault(Fault("status", provider="openai", status=500, match=failed))
    assert ask(gateway, failed).headers["x-sluicegate-fallback"] == "cheap-mock"
    # gpt-mock's one deployment is out: the first pick is a fallback, hedged.
    answered = ask(gateway, hedged)
    assert answered.headers["x-sluicegate-fallback"] == "cheap-mock"
    assert upstreams(mock, hedged) == ["azure"]
    ask(gateway, after, model="cheap-mock")
    wait_cached(gateway, after, model="cheap-mock")
    assert not cached(gateway, hedged)
    assert not cached(gateway, failed)
