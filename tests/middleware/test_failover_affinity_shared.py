"""Responses API affinity shared through Redis (`shared=RedisHealth(...)`).

Two gateways on one Redis: a follow-up may reach the other one at once, before any sync, and
still goes to the account that holds its previous response. A previous response whose holder
cannot take calls (its breaker, or its key's, opened by another instance) is answered 503 with
a Retry-After of the time left until it can, not a whole cool-down. Redis down: answers and
follow-ups go on in each process; Redis slow: after one call waited for it, requests leave it
alone until a sync reaches it again.
"""
from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from middleware.failover import RedisHealth
from middleware.failover.affinity import Pin
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
from tests.middleware.test_quota_layer import late_redis
from tests.mock_providers import MockProviderServer
from tests.tcp_proxy import TcpProxy

NO_REDIS = "redis://127.0.0.1:9/0"  # (the discard port: nothing listens)
DUO = 'Deployment("a", "gpt-4o-mini", **on_a), Deployment("b", "gpt-4o-mini", **on_b)'

__all__ = ["late_redis"]  # (a fixture, used by name)


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


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_follow_up_reaching_another_instance_at_once_goes_where_its_response_is(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer, prefix: str,
        stream: bool) -> None:
    """The two route `duo` by priority in opposite orders and sync once an hour (the first
    sync, at startup, is before any response): only the pin written before the answer went
    out can send the follow-up to the account that holds its previous response."""
    shared = f'RedisHealth("{REDIS_URL}", prefix="{prefix}", sync_interval_s=3600)'
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    with serve(tmp_path / "one", shared_config(a, b, shared)) as one, \
            serve(tmp_path / "two", shared_config(a, b, shared, b_first=True)) as two:
        sdk1, sdk2 = openai_client(one), openai_client(two)
        previous, served = turn(sdk1, "duo", None, stream)
        assert served == A_MINI
        assert redis.Redis.from_url(REDIS_URL).ttl(f"{prefix}-response:{previous}") > 0
        for _ in range(2):
            previous, served = turn(sdk2, "duo", previous, stream)
            assert served == A_MINI
        # And the other way round: started on the second (on b), on through the first.
        previous, served = turn(sdk2, "duo", None, stream)
        assert served == B_MINI
        assert turn(sdk1, "duo", previous, stream)[1] == B_MINI
    assert len(a.requests) == 3 and len(b.requests) == 2  # no call was refused


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


def test_without_redis_answers_and_follow_ups_go_on_in_each_process(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer) -> None:
    """Each answer's pin fails to reach Redis (and waits for a sync), each follow-up's
    lookup is not needed: the process knows where it made its responses."""
    shared = f'RedisHealth("{NO_REDIS}", sync_interval_s=0.1)'
    with serve(tmp_path, shared_config(a, b, shared)) as gateway:
        sdk = openai_client(gateway)
        previous = turn(sdk, "keys", None, False)[0]
        made_with = keys_called(a)[-1]
        for _ in range(3):
            previous, _ = turn(sdk, "keys", previous, True)
        assert keys_called(a)[1:] == [made_with] * 3
        # (the first pin's SET failed, unless the first sync had failed already)
        assert deployments(gateway)["shared"]["lookup_errors"] <= 1  # type: ignore[index]


def test_while_redis_is_late_requests_wait_for_it_once_not_each(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer, prefix: str,
        late_redis: TcpProxy) -> None:
    """Redis's replies come after `lookup_timeout_s`: one answer waits for its pin's SET,
    then neither answers nor follow-ups call Redis (no connection is even opened) until a
    sync reaches it (once an hour here)."""
    shared = (f'RedisHealth("redis://127.0.0.1:{late_redis.port}/0", prefix="{prefix}", '
              'sync_interval_s=3600, lookup_timeout_s=0.2)')
    with serve(tmp_path, shared_config(a, b, shared)) as gateway:
        sdk = openai_client(gateway)
        made = turn(sdk, "trio", None, False)[0]
        assert redis.Redis.from_url(REDIS_URL).exists(f"{prefix}-response:{made}")
        late_redis.reply_delay_s = 1.0
        assert turn(sdk, "trio", None, False)[1] == "a/gpt-4o-mini"  # its SET timed out
        connections = late_redis.accepted
        for _ in range(3):
            turn(sdk, "trio", None, True)
        unknown = httpx.post(gateway.url + "/v1/responses", headers=AUTH, timeout=10,
                             json={"model": "trio", "input": "Go on",
                                   "previous_response_id": "resp_made_elsewhere"})
        assert unknown.json()["error"]["code"] == "previous_response_not_found"
        assert late_redis.accepted == connections
        assert deployments(gateway)["shared"]["lookup_errors"] == 1  # type: ignore[index]


async def test_requests_call_redis_again_once_a_sync_reaches_it(
        late_redis: TcpProxy, prefix: str, caplog: pytest.LogCaptureFixture) -> None:
    shared = RedisHealth(f"redis://127.0.0.1:{late_redis.port}/0", prefix=prefix,
                         sync_interval_s=3600, lookup_timeout_s=0.2)
    pin = Pin("a/gpt-4o-mini", "a", "AFFINITY_KEY_A")
    await shared.startup()
    try:
        await shared.sync()
        late_redis.reply_delay_s = 1.0
        with caplog.at_level(logging.WARNING, logger="sluicegate.failover"):
            assert await shared.pin_of("resp_1") is None  # timed out
            await shared.publish_pin("resp_2", pin)  # left to the sync
            assert await shared.pin_of("resp_3") is None
        assert shared.lookup_errors == 1
        late_redis.reply_delay_s = 0.0
        await shared.sync()
        assert await shared.pin_of("resp_2") == pin  # written by the sync, read by a request
    finally:
        await shared.shutdown()
    warned = ("failover affinity call to Redis failed (TimeoutError); until a sync reaches "
              "it, new pins wait for the sync and follow-ups whose previous_response_id is not "
              "known here route as unknown ones")
    assert [record.getMessage() for record in caplog.records
            if "affinity" in record.getMessage()] == [warned]  # one, for the whole outage
