"""An OpenAI or Azure 429 that gives its pause without a Retry-After header.

Azure's 429 carries `retry-after-ms` beside Retry-After, and OpenAI's every answer the
`x-ratelimit-reset-requests` and `-tokens` durations ("1s", "6m0s", "20ms": when each limit
is whole again); a 429 that comes with only those is read from them, so the deployment cools
down and the caller is told how long. One deployment a provider on the session's mock, one
attempt a request and a 10 s deadline (a cool-down past it is answered at once); the
official openai SDK is the client.
"""
from __future__ import annotations

import time
from pathlib import Path

import anthropic
import openai
import pytest

from middleware.failover import FailoverMiddleware
from providers.openai import rate_limit_pause_s
from tests.harness import TEST_KEY, ThreadedServer, config_head, serve
from tests.mock_providers import Fault, MockProviderServer


def config(mock: MockProviderServer) -> str:
    return f'''{config_head()}
providers = {{
    "openai": Provider("openai", base_url="{mock.base_url("openai")}", api_key_env=KEY,
                       timeouts=fast),
    "azure": Provider("azure", base_url="{mock.base_url("azure")}", api_key_env=KEY,
                      timeouts=fast),
}}
models = {{"openai": [Deployment("openai", "gpt-4o-mini", price=PRICE)],
          "azure": [Deployment("azure", "gpt-4o-mini", price=PRICE)]}}
middleware = [
    Middleware(AuthMiddleware, keys=[StaticKey("tests", key_env="SG_TEST_KEY")]),
    Middleware(FailoverMiddleware, retry=RetryPolicy(max_attempts=1, deadline_s=10)),
]
'''


def ask(gateway: ThreadedServer, model: str) -> openai.APIStatusError:
    sdk = openai.OpenAI(base_url=gateway.url + "/v1", api_key=TEST_KEY, max_retries=0)
    with pytest.raises(openai.APIStatusError) as refused:
        sdk.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
    return refused.value


def cooling_s(gateway: ThreadedServer, model: str) -> float | None:
    layer = next(c for c in gateway.app.components if isinstance(c, FailoverMiddleware))
    return layer.groups[model].deployments[0].cooling_s(time.monotonic())


@pytest.mark.parametrize("fault", [
    Fault("status", provider="openai", status=429, retry_after_header=False,
          headers={"x-ratelimit-reset-requests": "20s", "x-ratelimit-reset-tokens": "1.5s"}),
    Fault("status", provider="openai", status=429, retry_after_header=False,
          headers={"retry-after-ms": "19200", "x-ratelimit-reset-tokens": "6m0s"}),
    Fault("status", provider="azure", status=429, retry_after_s=20, retry_after_header=False),
], ids=["openai-reset-headers", "openai-retry-after-ms-first", "azure-retry-after-ms"])
def test_a_429_without_retry_after_cools_down_for_the_pause_its_headers_give(
        tmp_path: Path, mock: MockProviderServer, fault: Fault) -> None:
    mock.push_fault(fault)
    model = fault.provider or ""
    with serve(tmp_path, config(mock)) as gateway:
        refused = ask(gateway, model)
        cooling = cooling_s(gateway, model)
        again = ask(gateway, model)  # cooling down: answered without a call
    assert refused.status_code == 429 and refused.response.headers["retry-after"] == "20"
    assert cooling is not None and 15 < cooling <= 20
    assert again.status_code == 429 and len(mock.requests) == 1


def test_the_reset_headers_of_an_answer_that_is_no_429_are_no_pause(
        tmp_path: Path, mock: MockProviderServer) -> None:
    # (OpenAI sends them with every answer: "6ms" after any call)
    mock.push_fault(Fault("status", provider="openai", status=503,
                          headers={"x-ratelimit-reset-requests": "20s"}))
    with serve(tmp_path, config(mock)) as gateway:
        refused = ask(gateway, "openai")
        cooling = cooling_s(gateway, "openai")
    assert refused.status_code == 503 and "retry-after" not in refused.response.headers
    assert cooling is None


@pytest.mark.parametrize("headers", [
    {"retry-after": "\uff15"},  # a full-width 5, in UTF-8 on the wire
    {"retry-after": "5 x"},
    dict.fromkeys(("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens"),
                  "9" * 400 + "s"),  # a float's inf
], ids=["full-width-digit", "not-a-value", "overflowing-reset"])
def test_a_429_with_an_unreadable_pause_is_passed_on_without_one(
        tmp_path: Path, mock: MockProviderServer, headers: dict[str, str]) -> None:
    # (it was a 500 in either shape: the header could not be encoded for the caller, or
    # the reset's seconds rounded)
    for _ in range(2):
        mock.push_fault(Fault("status", provider="openai", status=429,
                              retry_after_header=False, headers=headers))
    with serve(tmp_path, config(mock)) as gateway:
        refused = ask(gateway, "openai")
        cooling = cooling_s(gateway, "openai")
        claude = anthropic.Anthropic(base_url=gateway.url, api_key=TEST_KEY, max_retries=0)
        with pytest.raises(anthropic.RateLimitError) as as_anthropic:
            claude.messages.create(model="openai", max_tokens=5,
                                   messages=[{"role": "user", "content": "hi"}])
    assert refused.status_code == 429 and refused.code == "rate_limit_exceeded"
    assert "retry-after" not in refused.response.headers and cooling is None
    assert as_anthropic.value.body == {"type": "error", "error": {
        "type": "rate_limit_error", "message": as_anthropic.value.body["error"]["message"]}}
    assert "retry-after" not in as_anthropic.value.response.headers


@pytest.mark.parametrize("headers,pause_s", [
    ({"retry-after-ms": "20"}, 0.02),
    ({"x-ratelimit-reset-requests": "1s", "x-ratelimit-reset-tokens": "6m0s"}, 360.0),
    ({"x-ratelimit-reset-requests": "20ms"}, 0.02),
    ({"x-ratelimit-reset-tokens": "7.66s"}, 7.66),
    ({"x-ratelimit-reset-tokens": "1h2m3s"}, 3723.0),
    ({"retry-after-ms": "soon", "x-ratelimit-reset-requests": "2s"}, 2.0),
    ({"x-ratelimit-reset-requests": "2 s"}, None),
    ({"x-ratelimit-reset-requests": "-1s"}, None),
    ({}, None),
])
def test_rate_limit_pause_s_reads_openais_formats(headers: dict[str, str],
                                                 pause_s: float | None) -> None:
    assert rate_limit_pause_s(headers) == pytest.approx(pause_s)
