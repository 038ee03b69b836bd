"""The Retry-After of `no_healthy_deployment`: the time left until a deployment may take the
request (its breaker, or its key's, half-opens), rounded up, never a whole cool-down.

One deployment on the session's mock, whose breakers (its own and its key's) open at the
first failure and half-open 3 s later; one attempt a request. The official openai SDK is the
client.
"""
from __future__ import annotations

from pathlib import Path

import openai
import pytest

from middleware.failover import FailoverMiddleware
from middleware.failover.health import CircuitBreaker
from tests.harness import TEST_KEY, ThreadedServer, config_head, serve, wait_for
from tests.mock_providers import Fault, MockProviderServer

COOLDOWN_S = 3


def config(mock: MockProviderServer) -> str:
    return f'''{config_head()}
os.environ.setdefault("RETRY_AFTER_KEY", "provider-secret-retry-after-0123")
providers = {{"a": Provider("openai", base_url="{mock.base_url("openai")}", api_key_env=KEY,
                           timeouts=fast)}}
models = {{
    "plain": [Deployment("a", "gpt-4o-mini", price=PRICE)],
    "keyed": [Deployment("a", "gpt-4o-mini", price=PRICE, api_key_envs=("RETRY_AFTER_KEY",))],
}}
middleware = [
    Middleware(AuthMiddleware, keys=[StaticKey("tests", key_env="SG_TEST_KEY")]),
    Middleware(FailoverMiddleware, retry=RetryPolicy(max_attempts=1),
               breaker=BreakerSettings(consecutive_failures=1, cooldown_s={COOLDOWN_S})),
]
'''


def ask(gateway: ThreadedServer, model: str) -> openai.APIStatusError:
    sdk = openai.OpenAI(base_url=gateway.url + "/v1", api_key=TEST_KEY, max_retries=0)
    with pytest.raises(openai.APIStatusError) as refused:
        sdk.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
    return refused.value


def opened_breaker(gateway: ThreadedServer, model: str) -> CircuitBreaker:
    """The breaker the failure opened: the deployment's, or (a deployment with keys) its
    key's."""
    layer = next(c for c in gateway.app.components if isinstance(c, FailoverMiddleware))
    state = layer.groups[model].deployments[0]
    return state.keys[0].breaker if state.keys else state.breaker


@pytest.mark.parametrize("model,status", [("plain", 500), ("keyed", 401)])
def test_no_healthy_deployment_is_retried_after_the_time_left_not_a_cool_down(
        tmp_path: Path, mock: MockProviderServer, model: str, status: int) -> None:
    # Once a second of the 3 s cool-down has gone, a client told 3 s came back a second
    # after the deployment could take it again.
    mock.push_fault(Fault("status", provider="openai", status=status))
    with serve(tmp_path, config(mock)) as gateway:
        assert ask(gateway, model).status_code == status
        breaker = opened_breaker(gateway, model)
        assert breaker.state == "open"
        assert wait_for(lambda: (breaker.reopens_in_s() or 0.0) < COOLDOWN_S - 1.1)
        refused = ask(gateway, model)
        left_s = breaker.reopens_in_s()
    assert refused.status_code == 503
    assert refused.code == "no_healthy_deployment"
    assert left_s is not None and 0 < left_s < COOLDOWN_S - 1.1
    assert 1 <= int(refused.response.headers["retry-after"]) <= COOLDOWN_S - 1
    assert len(mock.requests) == 1
