"""A Gemini 429 through the gateway: its delay is in the body, not a Retry-After header.

Gemini answers RESOURCE_EXHAUSTED with `error.details[]` holding a `google.rpc.RetryInfo`
(`"retryDelay": "31s"`) and no Retry-After header; the gateway reads the delay there, so the
deployment cools down for it and the caller is told it. One Gemini deployment on the
session's mock, one attempt a request; the official openai SDK is the client.
"""
from __future__ import annotations

import time
from pathlib import Path

import openai
import pytest

from middleware.failover import FailoverMiddleware
from providers.gemini_format import gemini_retry_delay
from tests.harness import TEST_KEY, ThreadedServer, config_head, serve
from tests.mock_providers import Fault, MockProviderServer


def config(mock: MockProviderServer) -> str:
    return f'''{config_head()}
providers = {{"gemini": Provider("gemini", base_url="{mock.base_url("gemini")}",
                                 api_key_env=KEY, timeouts=fast)}}
models = {{"flash": [Deployment("gemini", "gemini-2.0-flash", price=PRICE)]}}
middleware = [
    Middleware(AuthMiddleware, keys=[StaticKey("tests", key_env="SG_TEST_KEY")]),
    Middleware(FailoverMiddleware, retry=RetryPolicy(max_attempts=1)),
]
'''


def ask(gateway: ThreadedServer) -> openai.APIStatusError:
    sdk = openai.OpenAI(base_url=gateway.url + "/v1", api_key=TEST_KEY, max_retries=0)
    with pytest.raises(openai.APIStatusError) as refused:
        sdk.chat.completions.create(model="flash", messages=[{"role": "user", "content": "hi"}])
    return refused.value


@pytest.mark.parametrize("sent_status", [None, 200], ids=["as-429", "as-200-with-error"])
def test_the_retry_delay_in_a_gemini_429_body_cools_the_deployment_down(
        tmp_path: Path, mock: MockProviderServer, sent_status: int | None) -> None:
    # (also where the error came in a 200's body, as a proxy in front of Gemini may send it)
    mock.push_fault(Fault("status", provider="gemini", status=429, retry_after_s=45,
                          retry_after_header=False, sent_status=sent_status))
    with serve(tmp_path, config(mock)) as gateway:
        refused = ask(gateway)
        layer = next(c for c in gateway.app.components if isinstance(c, FailoverMiddleware))
        cooling_s = layer.groups["flash"].deployments[0].cooling_s(time.monotonic())
    assert refused.status_code == 429 and refused.response.headers["retry-after"] == "45"
    assert cooling_s is not None and 40 < cooling_s <= 45


@pytest.mark.parametrize("delay,seconds", [("31s", "31"), ("58.217843437s", "59"),
                                           ("0s", "0"), ("0.5s", "1")])
def test_a_retry_delay_is_whole_seconds_rounded_up(delay: str, seconds: str) -> None:
    body = (b'{"error": {"code": 429, "status": "RESOURCE_EXHAUSTED", "details": ['
            b'{"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": []},'
            b'{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "'
            + delay.encode() + b'"}]}}')
    assert gemini_retry_delay(body) == seconds
    assert gemini_retry_delay(b"[" + body + b"]") == seconds  # (a non-SSE stream's error)


@pytest.mark.parametrize("body", [
    b'{"error": {"code": 429, "status": "RESOURCE_EXHAUSTED"}}',
    b'{"error": {"details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo"}]}}',
    (b'{"error": {"details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo", '
     b'"retryDelay": "soon"}]}}'),
    (b'{"error": {"details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo", '
     b'"retryDelay": "' + b"9" * 400 + b's"}]}}'),  # (a float's inf: it was an OverflowError)
    (b'{"error": {"details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo", '
     b'"retryDelay": "\xef\xbc\x95s"}]}}'),  # a full-width 5
    b"<html>Too Many Requests</html>", b""])
def test_a_body_without_a_readable_retry_delay_has_none(body: bytes) -> None:
    assert gemini_retry_delay(body) is None
