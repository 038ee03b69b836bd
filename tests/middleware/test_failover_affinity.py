"""Responses API affinity: a follow-up goes to the account that holds its previous response.

The mock OpenAI servers store each response for the key that made it and refuse another's
`previous_response_id` with 400 `previous_response_not_found`, as OpenAI does. Two mock
servers `a` and `b` (tests/conftest.py) play two accounts, each on a key of its own; the
model `duo` balances over both at random (`weighted`), so without affinity about half of the
follow-ups would reach the account that does not hold their previous response.
"""
from __future__ import annotations

import uuid
from pathlib import Path

import httpx
import openai
import pytest
import redis

from tests.harness import (
    AUTH,
    TEST_KEY,
    config_head,
    openai_client,
    serve,
    start_cli_gateway,
    stop_process,
    wait_for,
    write_config,
)
from tests.middleware.test_failover_in_band import health
from tests.middleware.test_failover_layer import ADMIN_TOKEN
from tests.mock_providers import Fault, MockProviderServer

KEYS = 'os.environ.setdefault("AFFINITY_KEY_A", "provider-secret-123456789-a")\n' \
       'os.environ.setdefault("AFFINITY_KEY_B", "provider-secret-123456789-b")\n'
A_MINI, A_FULL, B_MINI = "a/gpt-4o-mini", "a/gpt-4o", "b/gpt-4o-mini"
REDIS_URL = "redis://127.0.0.1:6379/0"


def affinity_config(a: MockProviderServer, b: MockProviderServer, layer: str = "") -> str:
    return f'''
{config_head("SG_FAILOVER_ADMIN", ADMIN_TOKEN)}{KEYS}providers = {{
    "a": Provider("openai", base_url="{a.base_url("openai")}", api_key_env=KEY, timeouts=fast),
    "b": Provider("openai", base_url="{b.base_url("openai")}", api_key_env=KEY, timeouts=fast),
}}
on_a = dict(price=PRICE, api_key_envs=("AFFINITY_KEY_A",))
on_b = dict(price=PRICE, api_key_envs=("AFFINITY_KEY_B",))
models = {{
    "duo": [Deployment("a", "gpt-4o-mini", **on_a), Deployment("b", "gpt-4o-mini", **on_b)],
    # One deployment, two keys (two accounts on one server): keys are balanced at random.
    "keys": [Deployment("a", "gpt-4o-mini", price=PRICE,
                        api_key_envs=("AFFINITY_KEY_A", "AFFINITY_KEY_B"))],
    # By priority: a's mini, then b (another account), then a's full model (a's account).
    "trio": [Deployment("a", "gpt-4o-mini", **on_a), Deployment("b", "gpt-4o-mini", **on_b),
             Deployment("a", "gpt-4o", **on_a)],
}}
middleware = [
    Middleware(AuthMiddleware, keys=[StaticKey("tests", key_env="SG_TEST_KEY")]),
    Middleware(FailoverMiddleware, admin_token_env="SG_FAILOVER_ADMIN",
               routes={{"trio": Route(strategy="priority")}}, {layer}),
]
'''


def turn(sdk: openai.OpenAI, model: str, previous: str | None,
         stream: bool) -> tuple[str, str]:
    """One conversation turn through the gateway: (the response id, the deployment that
    answered it)."""
    options = {} if previous is None else {"previous_response_id": previous}
    if not stream:
        raw = sdk.responses.with_raw_response.create(model=model, input="Go on", **options)
        response = raw.parse()
        assert response.output_text.startswith("Mock reply to: ")
        return response.id, raw.headers["x-sluicegate-deployment"]
    with sdk.responses.with_streaming_response.create(model=model, input="Go on",
                                                      stream=True, **options) as raw:
        served = raw.headers["x-sluicegate-deployment"]
        events = list(raw.parse())
    assert events[-1].type == "response.completed"
    return events[0].response.id, served  # type: ignore[union-attr]


def keys_called(server: MockProviderServer) -> list[str]:
    return [entry["headers"]["authorization"][-1] for entry in server.requests]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_each_follow_up_goes_to_the_deployment_that_made_its_previous_response(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer, stream: bool) -> None:
    with serve(tmp_path, affinity_config(a, b)) as gateway:
        sdk = openai_client(gateway)
        conversations = [turn(sdk, "duo", None, stream) for _ in range(12)]
        # New conversations are balanced over both accounts...
        assert {served for _, served in conversations} == {A_MINI, B_MINI}
        # ...and each goes on, turn after turn, where it started.
        for response_id, started_at in conversations[:4]:
            previous = response_id
            for _ in range(5):
                previous, served = turn(sdk, "duo", previous, stream)
                assert served == started_at
    assert len(a.requests) + len(b.requests) == 12 + 4 * 5


def test_a_follow_up_keeps_to_the_provider_key_that_made_its_previous_response(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer) -> None:
    with serve(tmp_path, affinity_config(a, b)) as gateway:
        sdk = openai_client(gateway)
        starts = [turn(sdk, "keys", None, False)[0] for _ in range(8)]
        first_keys = keys_called(a)
        assert set(first_keys) == {"a", "b"}  # the keys are balanced
        for previous in starts:
            for _ in range(3):
                previous = turn(sdk, "keys", previous, False)[0]
        follow_ups = keys_called(a)[8:]
    assert follow_ups == [key for key in first_keys for _ in range(3)]


def test_when_its_deployment_fails_a_follow_up_goes_only_where_its_response_is_seen(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer) -> None:
    """`trio` by priority: a's mini made the response and fails; b comes next by priority
    but is another account: the follow-up goes to a's other deployment, on the same key."""
    with serve(tmp_path, affinity_config(a, b)) as gateway:
        sdk = openai_client(gateway)
        previous, served = turn(sdk, "trio", None, False)
        assert served == A_MINI
        a.push_fault(Fault("status", provider="openai", status=503))
        raw = sdk.responses.with_raw_response.create(model="trio", input="Go on",
                                                     previous_response_id=previous)
        assert raw.parse().output_text.startswith("Mock reply to: ")
        assert raw.headers["x-sluicegate-deployment"] == A_FULL
        assert raw.headers["x-sluicegate-attempts"] == "2"
    assert len(b.requests) == 0
    assert [entry["json"]["model"] for entry in a.requests] == [
        "gpt-4o-mini", "gpt-4o-mini", "gpt-4o"]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_when_no_deployment_that_sees_the_response_can_serve_the_caller_is_told(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer, stream: bool) -> None:
    """`duo`: the deployment that made the response fails (its breaker opens at once): the
    follow-up gets its error, never b's `previous_response_not_found`; while its breaker is
    open, a clear 503 in OpenAI's shape; a new conversation still goes to b."""
    layer = ("breaker=BreakerSettings(consecutive_failures=1, cooldown_s=60), "
             "retry=RetryPolicy(max_attempts=3, deadline_s=5)")  # (no wait for the breaker)
    with serve(tmp_path, affinity_config(a, b, layer)) as gateway:
        sdk = openai_client(gateway)
        previous, served = turn(sdk, "duo", None, stream)
        down, up = (a, b) if served == A_MINI else (b, a)
        calls_before = len(up.requests)
        down.push_fault(Fault("status", provider="openai", status=503))
        with pytest.raises(openai.InternalServerError) as failed:
            turn(sdk, "duo", previous, stream)
        assert failed.value.status_code == 503  # the holder's own error
        assert health(gateway, "duo", 0 if down is a else 1)[:2] == ("open", 1)
        refused = httpx.post(gateway.url + "/v1/responses", headers=AUTH, timeout=10,
                             json={"model": "duo", "input": "Go on", "stream": stream,
                                   "previous_response_id": previous})
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "60"
        assert refused.json() == {"error": {
            "message": f"The previous response '{previous}' is held by deployment "
                       f"'{served}' (and visible only to deployments on its provider key), "
                       "and none of them can take requests right now. Retry later, or send "
                       "the conversation without previous_response_id.",
            "type": "service_unavailable", "param": "previous_response_id",
            "code": "previous_response_unavailable"}}
        assert len(up.requests) == calls_before  # no follow-up went to the other account
        assert turn(sdk, "duo", None, stream)[1] != served  # a new conversation goes on


def test_a_previous_response_id_the_gateway_never_saw_routes_as_any_request(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer) -> None:
    """Made before the gateway started, or elsewhere: the provider answers for it."""
    with serve(tmp_path, affinity_config(a, b)) as gateway:
        refused = httpx.post(gateway.url + "/v1/responses", headers=AUTH, timeout=10,
                             json={"model": "trio", "input": "Go on",
                                   "previous_response_id": "resp_made_elsewhere"})
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "previous_response_not_found"
    assert len(a.requests) == 1 and len(b.requests) == 0  # priority's first, no retry



def test_instances_sharing_redis_send_a_follow_up_where_another_saw_its_response_made(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer) -> None:
    """Two `sluicegate serve` processes with `shared=RedisHealth(...)`: a conversation
    started on the first goes on through the second, on the account that holds it."""
    prefix = "sgtest-" + uuid.uuid4().hex[:8]
    layer = f'shared=RedisHealth("{REDIS_URL}", prefix="{prefix}", sync_interval_s=0.1)'
    config = write_config(tmp_path, affinity_config(a, b, layer))
    first, url1 = start_cli_gateway(config)
    second, url2 = start_cli_gateway(config)
    try:
        sdk1, sdk2 = (openai.OpenAI(base_url=url + "/v1", api_key=TEST_KEY, max_retries=0)
                      for url in (url1, url2))
        started = [turn(sdk1, "duo", None, False) for _ in range(6)]
        assert wait_for(lambda: all(redis.Redis.from_url(REDIS_URL).exists(
            f"{prefix}-response:{response_id}") for response_id, _ in started))
        for previous, served in started:
            for _ in range(3):
                previous, served_now = turn(sdk2, "duo", previous, False)
                assert served_now == served
        ttl = redis.Redis.from_url(REDIS_URL).ttl(f"{prefix}-response:{started[0][0]}")
        assert 0 < ttl <= 86_400
    finally:
        stop_process(first)
        stop_process(second)
        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(f"{prefix}-*"))
        if keys:
            client.delete(*keys)


def test_another_projects_response_cannot_be_continued(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The provider holds every response under the gateway's one account: a key of project
    # "other" that knew a "tests" response's id continued it (its context, billed to
    # "other"). It now gets OpenAI's answer for an id it does not hold; the project's other
    # keys continue it as before.
    monkeypatch.setenv("SG_SAME_PROJECT_KEY", "sk-sg-same-project-key-0123456789")
    monkeypatch.setenv("SG_OTHER_PROJECT_KEY", "sk-sg-other-project-key-0123456789")
    config = affinity_config(a, b).replace(
        'keys=[StaticKey("tests", key_env="SG_TEST_KEY")]',
        'keys=[StaticKey("tests", key_env="SG_TEST_KEY"), StaticKey("tests", '
        'key_env="SG_SAME_PROJECT_KEY", id="k-same"), StaticKey("other", '
        'key_env="SG_OTHER_PROJECT_KEY", id="k-other")]')
    assert "SG_OTHER_PROJECT_KEY" in config
    with serve(tmp_path, config) as gateway:
        made, served = turn(openai_client(gateway), "duo", None, False)
        calls = len(a.requests) + len(b.requests)
        other = openai.OpenAI(base_url=gateway.url + "/v1", max_retries=0,
                              api_key="sk-sg-other-project-key-0123456789")
        with pytest.raises(openai.BadRequestError) as refused:
            other.responses.create(model="duo", input="Go on", previous_response_id=made)
        assert refused.value.code == "previous_response_not_found"
        assert refused.value.param == "previous_response_id"
        assert len(a.requests) + len(b.requests) == calls  # (nothing went upstream)
        same = openai.OpenAI(base_url=gateway.url + "/v1", max_retries=0,
                             api_key="sk-sg-same-project-key-0123456789")
        assert turn(same, "duo", made, True)[1] == served
