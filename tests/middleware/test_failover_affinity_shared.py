"""Responses API affinity shared through Redis (`shared=RedisHealth(...)`).

A previous response whose holder cannot take calls (its breaker, or its key's, opened by
another instance) is answered 503 with a Retry-After of the time left until it can, not a
whole cool-down.
"""
from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.harness import AUTH, openai_client, serve, wait_for
from tests.middleware.test_failover_affinity import (
    A_MINI,
    B_MINI,
    REDIS_URL,
    affinity_config,
    keys_called,
    turn,
)
from tests.middleware.test_failover_layer import deployments
from tests.mock_providers import MockProviderServer

DUO = 'Deployment("a", "gpt-4o-mini", **on_a), Deployment("b", "gpt-4o-mini", **on_b)'


@pytest.fixture
def prefix() -> Iterator[str]:
    prefix = "sgtest-" + uuid.uuid4().hex[:8]
    yield prefix
    client = redis.Redis.from_url(REDIS_URL)
    keys = [*client.scan_iter(f"{prefix}-*"), *client.scan_iter("{" + prefix + "-health}*")]
    if keys:
        client.delete(*keys)


def shared_config(a: MockProviderServer, b: MockProviderServer, shared: str, *,
                  b_first: bool = False, layer: str = "") -> str:
    """`affinity_config` with `shared=` and `duo` routed by priority (b's deployment first
    with `b_first`)."""
    text = affinity_config(a, b, f"shared={shared}, {layer}")
    if b_first:
        text = text.replace(DUO, 'Deployment("b", "gpt-4o-mini", **on_b), '
                                 'Deployment("a", "gpt-4o-mini", **on_a)')
    return text.replace('routes={"trio": Route(strategy="priority")}',
                        'routes={"trio": Route(strategy="priority"), '
                        '"duo": Route(strategy="priority")}')


@pytest.mark.parametrize("opened", ["deployment", "key"])
def test_an_unavailable_previous_response_is_retried_after_the_time_left_not_a_cool_down(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer, prefix: str,
        opened: str) -> None:
    """Another instance opened the breaker of the deployment that made the response (or of
    its key) 30 s before it half-opens; the breakers' cool-down is an hour."""
    shared = f'RedisHealth("{REDIS_URL}", prefix="{prefix}", sync_interval_s=0.05)'
    config = shared_config(a, b, shared, layer="breaker=BreakerSettings(cooldown_s=3600)")
    model = "duo" if opened == "deployment" else "keys"
    with serve(tmp_path, config) as gateway:
        previous, served = turn(openai_client(gateway), model, None, False)
        index = [A_MINI, B_MINI].index(served) if model == "duo" else 0
        field, key = f"{model}|{served}", None
        if opened == "key":
            key = "AFFINITY_KEY_" + keys_called(a)[-1].upper()
            field += "|" + key
        redis.Redis.from_url(REDIS_URL).hset("{" + prefix + "-health}:open", field,
                                             f"{time.time() + 30:.3f}")

        def breaker() -> Any:
            state: Any = deployments(gateway)["models"]
            state = state[model]["deployments"][index]
            return state["breaker"] if key is None else \
                next(k["breaker"] for k in state["keys"] if k["key"] == key)

        assert wait_for(lambda: breaker() == "open")
        refused = httpx.post(gateway.url + "/v1/responses", headers=AUTH, timeout=10,
                             json={"model": model, "input": "Go on",
                                   "previous_response_id": previous})
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "previous_response_unavailable"
    assert 1 <= int(refused.headers["retry-after"]) <= 30
    assert len(a.requests) + len(b.requests) == 1  # the follow-up went nowhere
