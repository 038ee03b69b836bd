"""Breaker state shared through Redis: two gateway processes agree on a breaker opening.

Two `sluicegate serve` processes share one Redis. Process 1 sees the primary fail until its
breaker opens; process 2, which never called the primary, then skips it too.
"""
from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from tests.harness import start_cli_gateway, stop_process, write_config
from tests.middleware.test_failover_layer import (
    ADMIN_TOKEN,
    chat_at,
    failover_config,
    wait_for,
)
from tests.mock_providers import MockConfig, MockProviderServer

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture
def upstreams() -> Iterator[tuple[MockProviderServer, MockProviderServer]]:
    with MockProviderServer(MockConfig()) as a, MockProviderServer(MockConfig()) as b:
        yield a, b


def breaker_at(url: str, model: str) -> str:
    response = httpx.get(url + "/admin/deployments",
                         headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
    models = response.json()["models"]
    return str(models[model]["deployments"][0]["breaker"]) if model in models else "unknown"


@pytest.mark.parametrize("topology", ["single", "cluster"])
def test_two_processes_sharing_redis_agree_on_a_breaker_opening_and_closing(
        tmp_path: Path, upstreams: tuple[MockProviderServer, MockProviderServer],
        topology: str, request: pytest.FixtureRequest) -> None:
    """On the machine's Redis, and on a Redis Cluster (the sync's keys share a hash tag)."""
    a, b = upstreams
    redis_url = REDIS_URL if topology == "single" else \
        request.getfixturevalue("cluster_redis").url
    prefix = "sgtest-" + uuid.uuid4().hex[:8]
    layer = (f'routes={{"primary": Route(fallbacks=("backup",))}}, '
             f'breaker=BreakerSettings(consecutive_failures=3, cooldown_s=5, min_requests=1000), '
             f'shared=RedisHealth("{redis_url}", prefix="{prefix}", sync_interval_s=0.2)')
    config = write_config(tmp_path, failover_config(a, b, layer))
    first, url1 = start_cli_gateway(config)
    second, url2 = start_cli_gateway(config)
    try:
        assert chat_at(url2, "primary").status_code == 200  # process 2 knows the model
        a.config.update({"fail_ratio": 1.0, "fail_status": 503})
        for _ in range(3):
            assert chat_at(url1, "primary").status_code == 200  # served by the fallback
        assert breaker_at(url1, "primary") == "open"
        opened = time.monotonic()
        assert wait_for(lambda: breaker_at(url2, "primary") == "open", timeout_s=3)
        agreed_after = time.monotonic() - opened
        calls_to_a = len(a.requests)
        response = chat_at(url2, "primary")
        assert response.headers["x-sluicegate-attempts"] == "1"
        assert response.headers["x-sluicegate-fallback"] == "backup"
        assert len(a.requests) == calls_to_a  # process 2 did not pay a call to learn it
        assert agreed_after < 1.5
        # a recovers; one instance's probe after the cool-down closes it for both. (The
        # cool-down is long enough that process 2 asks while the breaker is still open on a
        # loaded host, rather than sending a half-open probe to a.)
        a.config.update({"fail_ratio": 0.0})
        time.sleep(max(0.0, 5.1 - (time.monotonic() - opened)))
        assert chat_at(url1, "primary").headers["x-sluicegate-deployment"] == "a/gpt-4o-mini"
        assert breaker_at(url1, "primary") == "closed"
        assert wait_for(lambda: breaker_at(url2, "primary") == "closed", timeout_s=3)
    finally:
        stop_process(first)
        stop_process(second)
        if topology == "single":
            client = redis.Redis.from_url(REDIS_URL)
            client.delete("{" + prefix + "-health}:open", "{" + prefix + "-health}:ttft")
            client.close()


def test_without_redis_breakers_stay_per_process_and_requests_still_flow(
        tmp_path: Path, upstreams: tuple[MockProviderServer, MockProviderServer]) -> None:
    a, b = upstreams
    layer = ('routes={"primary": Route(fallbacks=("backup",))}, '
             'breaker=BreakerSettings(consecutive_failures=2, cooldown_s=30), '
             'shared=RedisHealth("redis://127.0.0.1:9/0", sync_interval_s=0.1)')
    config = write_config(tmp_path, failover_config(a, b, layer))
    process, url = start_cli_gateway(config)
    try:
        a.config.update({"fail_ratio": 1.0, "fail_status": 503})
        for _ in range(4):
            assert chat_at(url, "primary").status_code == 200
        assert breaker_at(url, "primary") == "open"
        state = httpx.get(url + "/admin/deployments",
                          headers={"authorization": f"Bearer {ADMIN_TOKEN}"}).json()
        assert state["shared"]["errors"] >= 1
        # Still ready (a Redis outage taking every instance out of service at once would be
        # worse than breakers per process), and /readyz says so.
        ready = httpx.get(url + "/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["checks"]["failover-redis"].startswith("degraded: unreachable")
    finally:
        stop_process(process)
