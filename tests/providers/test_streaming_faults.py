"""Provider failures, before and after the first byte, and client disconnects.

Before the first byte a failure is an ordinary error response in the caller's shape, keeping
the provider's status and Retry-After. After it, the stream ends with an in-band error event
in the caller's format (never a second response start).
"""
from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

from gateway import create_app
from tests.harness import (
    AUTH,
    TEST_KEY,
    ThreadedServer,
    mock_config,
    start_cli_gateway,
    stop_process,
    wait_for,
    write_config,
)
from tests.mock_providers import Fault, MockConfig, MockProviderServer

QUESTION = [{"role": "user", "content": "one two three four five six seven eight nine ten"}]


@pytest.fixture(scope="module")
def impatient_gateway(tmp_path_factory: pytest.TempPathFactory,
                      mock_url: str) -> Iterator[ThreadedServer]:
    """A gateway whose providers give up on a first byte after 0.5 s."""
    text = mock_config(mock_url).replace("first_byte_s=5", "first_byte_s=0.5")
    config = write_config(tmp_path_factory.mktemp("impatient"), text)
    with ThreadedServer(create_app(config)) as server:
        yield server


def oai(server: ThreadedServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=TEST_KEY, max_retries=0)


def claude(server: ThreadedServer) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key=TEST_KEY, max_retries=0)


@pytest.mark.parametrize("model,provider", [("gpt-mock", "openai"), ("claude-mock", "anthropic"),
                                            ("gemini-mock", "gemini")])
def test_429_keeps_status_and_retry_after_in_openai_shape(
        gateway: ThreadedServer, mock: MockProviderServer, model: str, provider: str) -> None:
    mock.push_fault(Fault(kind="status", provider=provider, status=429, retry_after_s=7))
    response = httpx.post(gateway.url + "/v1/chat/completions", headers=AUTH,
                          json={"model": model, "messages": QUESTION})
    assert response.status_code == 429
    assert response.headers["retry-after"] == "7"
    error = response.json()["error"]
    # An OpenAI provider's own type and code reach an OpenAI caller as they were.
    assert error["type"] == ("requests" if provider == "openai" else "rate_limit_error")
    assert f"Provider '{provider}' returned 429" in error["message"]


@pytest.mark.parametrize("model,provider", [("claude-mock", "anthropic"), ("gpt-mock", "openai")])
def test_503_in_anthropic_shape(gateway: ThreadedServer, mock: MockProviderServer, model: str,
                                provider: str) -> None:
    mock.push_fault(Fault(kind="status", provider=provider, status=503))
    with pytest.raises(anthropic.APIStatusError) as failure:
        claude(gateway).messages.create(model=model, max_tokens=50, messages=QUESTION)
    assert failure.value.status_code == 503
    assert failure.value.body["type"] == "error"  # type: ignore[index]
    assert failure.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]


@pytest.mark.parametrize("stream", [False, True])
def test_500_before_first_byte_is_an_error_response(gateway: ThreadedServer,
                                                    mock: MockProviderServer, stream: bool) -> None:
    mock.push_fault(Fault(kind="status", provider="openai", status=500))
    with pytest.raises(openai.InternalServerError) as failure:
        result = oai(gateway).chat.completions.create(model="gpt-mock", messages=QUESTION,
                                                      stream=stream)
        list(result) if stream else None  # type: ignore[call-overload]
    assert failure.value.status_code == 500


def test_slow_first_byte_times_out_with_504(impatient_gateway: ThreadedServer,
                                            mock: MockProviderServer) -> None:
    mock.push_fault(Fault(kind="slow_first_byte", provider="openai", delay_s=2.0))
    began = time.monotonic()
    with pytest.raises(openai.APIStatusError) as failure:
        list(oai(impatient_gateway).chat.completions.create(model="gpt-mock", messages=QUESTION,
                                                            stream=True))
    assert failure.value.status_code == 504
    assert "timed out" in failure.value.message
    assert time.monotonic() - began < 2.0  # gave up at the first-byte timeout, not the mock


@pytest.mark.parametrize("kind", ["slow_first_byte", "slow_body"])
def test_an_answer_past_total_s_is_a_504_before_or_after_its_headers(
        tmp_path: Path, mock: MockProviderServer, kind: str) -> None:
    # (its headers in time, its body not: it was a 502 connection_error, "Could not reach
    # provider", which no failover policy reads as a timeout)
    text = mock_config(mock.url).replace("total_s=30", "total_s=1")
    mock.push_fault(Fault(kind=kind, provider="openai", delay_s=3.0))
    with ThreadedServer(create_app(write_config(tmp_path, text))) as server, \
            pytest.raises(openai.APIStatusError) as failure:
        oai(server).chat.completions.create(model="gpt-mock", messages=QUESTION)
    assert (failure.value.status_code, failure.value.code) == (504, "timeout")
    assert "timed out" in failure.value.message


@pytest.mark.parametrize("model,provider", [("gpt-mock", "openai"), ("claude-mock", "anthropic"),
                                            ("gemini-mock", "gemini")])
def test_error_event_before_content_is_an_error_response(
        gateway: ThreadedServer, mock: MockProviderServer, model: str, provider: str) -> None:
    mock.push_fault(Fault(kind="error_event", provider=provider, after_chunks=0))
    response = httpx.post(gateway.url + "/v1/chat/completions", headers=AUTH,
                          json={"model": model, "messages": QUESTION, "stream": True})
    assert response.status_code >= 500
    assert response.headers["content-type"] == "application/json"
    assert "reported an error in its stream" in response.json()["error"]["message"]


@pytest.mark.parametrize("model,provider", [("gpt-mock", "openai"), ("claude-mock", "anthropic"),
                                            ("gemini-mock", "gemini")])
def test_reset_mid_stream_ends_openai_stream_in_band(
        gateway: ThreadedServer, mock: MockProviderServer, model: str, provider: str) -> None:
    mock.push_fault(Fault(kind="reset", provider=provider, after_chunks=2))
    received: list[str] = []
    with pytest.raises(openai.APIError) as failure:
        for chunk in oai(gateway).chat.completions.create(model=model, messages=QUESTION,
                                                          stream=True):
            received.extend(c.delta.content or "" for c in chunk.choices)
    assert "".join(received)  # content arrived before the break
    assert "failed mid-stream" in str(failure.value)


@pytest.mark.parametrize("model,provider", [("claude-mock", "anthropic"), ("gpt-mock", "openai"),
                                            ("gemini-mock", "gemini")])
def test_error_event_mid_stream_ends_anthropic_stream_in_band(
        gateway: ThreadedServer, mock: MockProviderServer, model: str, provider: str) -> None:
    mock.push_fault(Fault(kind="error_event", provider=provider, after_chunks=2))
    response = httpx.post(gateway.url + "/v1/messages", headers={**AUTH, "anthropic-version": "2023-06-01"},
                          json={"model": model, "max_tokens": 50, "messages": QUESTION,
                                "stream": True})
    assert response.status_code == 200
    text = response.text
    assert text.count("event: message_start") == 1
    assert "event: content_block_delta" in text
    assert text.rstrip().split("\n\n")[-1].startswith("event: error")
    with pytest.raises(anthropic.APIError):
        mock.push_fault(Fault(kind="error_event", provider=provider, after_chunks=2))
        with claude(gateway).messages.stream(model=model, max_tokens=50,
                                             messages=QUESTION) as stream:
            "".join(stream.text_stream)


# -- streams cut short: the provider's stream ends cleanly, without its final events ----------

@pytest.mark.parametrize("model,provider", [("gpt-mock", "openai"), ("azure-mock", "azure"),
                                            ("claude-mock", "anthropic"),
                                            ("gemini-mock", "gemini")])
def test_truncated_stream_ends_openai_stream_in_band(
        gateway: ThreadedServer, mock: MockProviderServer, model: str, provider: str) -> None:
    """No [DONE], message_stop or finishReason came: no finish_reason is made up, the stream
    ends with the error event (passthrough and translated alike)."""
    mock.push_fault(Fault("truncate", provider=provider, after_chunks=2))
    received: list[str] = []
    finishes: list[str] = []
    with pytest.raises(openai.APIError) as failure:
        for chunk in oai(gateway).chat.completions.create(model=model, messages=QUESTION,
                                                          stream=True):
            received.extend(c.delta.content or "" for c in chunk.choices)
            finishes.extend(c.finish_reason for c in chunk.choices if c.finish_reason)
    assert "".join(received) and finishes == []
    assert "failed mid-stream: the stream ended before its" in str(failure.value)


def test_a_chat_stream_that_ends_after_its_finish_without_done_is_complete(
        gateway: ThreadedServer, mock: MockProviderServer) -> None:
    """Some OpenAI-compatible servers end after the finish (and usage) chunk, without
    `data: [DONE]`: the finish reason is the stream's end, passthrough and translated."""
    mock.config.update({"omit_done": True})
    try:
        stream = oai(gateway).chat.completions.create(
            model="gpt-mock", messages=QUESTION, stream=True,
            stream_options={"include_usage": True})
        chunks = list(stream)
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
        assert chunks[-1].usage is not None
        with claude(gateway).messages.stream(model="gpt-mock", max_tokens=50,
                                             messages=QUESTION) as events:
            message = events.get_final_message()
        assert message.stop_reason == "end_turn" and message.content[0].text  # type: ignore[union-attr]
    finally:
        mock.config.update({"omit_done": False})


@pytest.mark.parametrize("model,provider", [("claude-mock", "anthropic"), ("gpt-mock", "openai"),
                                            ("gemini-mock", "gemini")])
def test_truncated_stream_ends_anthropic_stream_in_band(
        gateway: ThreadedServer, mock: MockProviderServer, model: str, provider: str) -> None:
    mock.push_fault(Fault("truncate", provider=provider, after_chunks=2))
    response = httpx.post(gateway.url + "/v1/messages",
                          headers={**AUTH, "anthropic-version": "2023-06-01"},
                          json={"model": model, "max_tokens": 50, "messages": QUESTION,
                                "stream": True})
    text = response.text
    assert "event: content_block_delta" in text
    assert "event: message_delta" not in text  # no stop_reason made up
    assert "event: message_stop" not in text
    assert text.rstrip().split("\n\n")[-1].startswith("event: error")
    mock.push_fault(Fault("truncate", provider=provider, after_chunks=2))
    with pytest.raises(anthropic.APIError), claude(gateway).messages.stream(
            model=model, max_tokens=50, messages=QUESTION) as stream:
        stream.get_final_message()


@pytest.mark.parametrize("model,provider", [("claude-mock", "anthropic"), ("gpt-mock", "openai"),
                                            ("gemini-mock", "gemini")])
def test_truncated_stream_before_content_is_an_error_response(
        gateway: ThreadedServer, mock: MockProviderServer, model: str, provider: str) -> None:
    """Cut before any output: a 502 the failover layer may retry, not an empty answer."""
    mock.push_fault(Fault("truncate", provider=provider, after_chunks=0))
    response = httpx.post(gateway.url + "/v1/messages",
                          headers={**AUTH, "anthropic-version": "2023-06-01"},
                          json={"model": model, "max_tokens": 50, "messages": QUESTION,
                                "stream": True})
    assert response.status_code == 502
    assert response.json()["error"]["type"] == "api_error"
    assert "sent a broken stream: the stream ended before its" in \
        response.json()["error"]["message"]


# -- the provider's own error words --------------------------------------------------------------

def test_openai_error_code_and_param_reach_an_openai_caller(gateway: ThreadedServer,
                                                            mock: MockProviderServer) -> None:
    mock.push_fault(Fault("status", provider="openai", status=400,
                          message="This model's maximum context length is 128000 tokens.",
                          code="context_length_exceeded", param="messages"))
    with pytest.raises(openai.BadRequestError) as failure:
        oai(gateway).chat.completions.create(model="gpt-mock", messages=QUESTION)
    assert (failure.value.type, failure.value.code, failure.value.param) == (
        "invalid_request_error", "context_length_exceeded", "messages")
    mock.push_fault(Fault("status", provider="openai", status=400, message="too long",
                          code="context_length_exceeded", param="messages"))
    with pytest.raises(anthropic.BadRequestError) as translated:
        claude(gateway).messages.create(model="gpt-mock", max_tokens=50, messages=QUESTION)
    assert translated.value.body == {"type": "error", "error": {  # type: ignore[comparison-overlap]
        "type": "invalid_request_error", "message": "Provider 'openai' returned 400: too long"}}


def test_anthropic_error_event_mid_stream_keeps_its_type(gateway: ThreadedServer,
                                                         mock: MockProviderServer) -> None:
    mock.push_fault(Fault("error_event", provider="anthropic", after_chunks=2))
    with pytest.raises(anthropic.APIStatusError) as failure, claude(gateway).messages.stream(
            model="claude-mock", max_tokens=50, messages=QUESTION) as stream:
        "".join(stream.text_stream)
    assert failure.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]


@pytest.mark.parametrize("model,provider,kind,code", [
    ("gpt-mock", "openai", "server_error", "server_error"),
    ("claude-mock", "anthropic", "server_error", "overloaded_error"),
    ("gemini-mock", "gemini", "server_error", "UNAVAILABLE")])
def test_error_event_mid_stream_has_an_openai_type(
        gateway: ThreadedServer, mock: MockProviderServer, model: str, provider: str, kind: str,
        code: str) -> None:
    """OpenAI's own words for an OpenAI provider; OpenAI's type with the provider's in
    `code` for the others."""
    mock.push_fault(Fault("error_event", provider=provider, after_chunks=2))
    with httpx.stream("POST", gateway.url + "/v1/chat/completions", headers=AUTH,
                      json={"model": model, "messages": QUESTION, "stream": True}) as response:
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    error = json.loads(events[-1])["error"]
    assert (error["type"], error["code"]) == (kind, code)


def test_client_disconnect_cancels_the_upstream_request(tmp_path: Path) -> None:
    from tests.mock_providers import MockConfig

    slow = MockProviderServer(MockConfig(chunk_delay_s=0.2, chunk_chars=2))
    slow.start()
    try:
        config = write_config(tmp_path, mock_config(f"http://127.0.0.1:{slow.port}"))
        with ThreadedServer(create_app(config)) as server:
            with httpx.stream("POST", server.url + "/v1/chat/completions", headers=AUTH,
                              json={"model": "gpt-mock", "messages": QUESTION, "stream": True}) as r:
                for _ in r.iter_raw():
                    break  # first chunk seen, then the client goes away
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and slow.active_streams:
                time.sleep(0.05)
            assert slow.active_streams == 0
            assert slow.cancelled_streams == 1
    finally:
        slow.stop()


AUDITS_AFTER_SENDING = '''
import asyncio


class AuditsAfterSending:
    """A custom layer that awaits an audit write after each message it forwards, and notes
    how each request ended."""

    def __init__(self, app):
        self.app = app
        self.seen = []

    async def __call__(self, scope, receive, send):
        from gateway.context import find_request_context
        ctx = find_request_context(scope)
        if ctx is not None:
            ctx.at_end(lambda ctx: self.seen.append((ctx.status, ctx.client_disconnected)))

        async def send_then_audit(message):
            await send(message)
            await asyncio.sleep(0.01)  # the audit sink's write

        await self.app(scope, receive, send_then_audit)


middleware = [Middleware(AuditsAfterSending), Middleware(CacheMiddleware)]
'''


def test_a_response_sent_in_full_is_no_disconnect_whatever_a_layer_awaits_after_it(
        tmp_path: Path) -> None:
    # hypercorn reports a disconnect as it sends the end of every response; one that came
    # while the audit layer awaited, past the watcher's start, was taken for the client
    # leaving: the request cancelled and flagged, its answer never cached.
    slow = MockProviderServer(MockConfig(ttft_s=0.3))
    slow.start()
    try:
        config = write_config(tmp_path, mock_config(slow.url, middleware="[]",
                                                    extra=AUDITS_AFTER_SENDING))
        with ThreadedServer(create_app(config)) as server:
            sdk = oai(server)
            streamed = [chunk for chunk in sdk.chat.completions.create(
                model="gpt-mock", messages=QUESTION, stream=True)]

            def cached() -> str:  # (the answer is stored after it went out)
                return sdk.chat.completions.with_raw_response.create(
                    model="gpt-mock", messages=QUESTION, temperature=0
                ).headers["x-sluicegate-cache"]

            first = cached()
            stored = wait_for(lambda: cached() == "hit", timeout_s=5)
            seen = server.app.components[0].seen
    finally:
        slow.stop()
    assert streamed[-1].choices[0].finish_reason == "stop"
    assert first == "miss" and stored
    assert len(seen) >= 3 and set(seen) == {(200, False)}


def test_provider_key_in_an_upstream_error_is_redacted(gateway: ThreadedServer,
                                                       mock: MockProviderServer) -> None:
    mock.push_fault(Fault(kind="status", provider="openai", status=401,
                          message="Incorrect API key provided: provider-secret-123456789"))
    response = httpx.post(gateway.url + "/v1/chat/completions", headers=AUTH,
                          json={"model": "gpt-mock", "messages": QUESTION})
    assert response.status_code == 401
    assert "provider-secret" not in response.text
    assert "[redacted]" in response.json()["error"]["message"]


def test_the_operators_openai_organization_in_an_upstream_error_is_redacted(
        gateway: ThreadedServer, mock: MockProviderServer) -> None:
    said = ("Rate limit reached for gpt-4o in organization org-H9rGLigVW0aTEjgfHIg3Ircj on "
            "tokens per min (TPM): Limit 30000, Used 25265, Requested 8020.")
    mock.push_fault(Fault(kind="status", provider="openai", status=429, message=said))
    response = httpx.post(gateway.url + "/v1/chat/completions", headers=AUTH,
                          json={"model": "gpt-mock", "messages": QUESTION})
    assert response.status_code == 429
    assert response.json()["error"]["message"] == "Provider 'openai' returned 429: " + \
        said.replace("org-H9rGLigVW0aTEjgfHIg3Ircj", "[redacted]")


def test_a_key_like_error_type_is_redacted_where_it_becomes_the_callers_code() -> None:
    # A provider's error type (of a response or an in-band event) becomes the caller's
    # `code` and the recorded error type: redacted as the message is.
    from providers.anthropic import AnthropicAdapter
    from providers.streams import StreamError

    secret = "sk-live-" + "Q7x" * 12
    adapter = AnthropicAdapter(base_url="http://127.0.0.1:9")
    error = adapter._stream_error(StreamError(f"invalid_key {secret}", "nope"), "broke")
    for rendered in (error.render("openai")[2], error.render("anthropic")[2]):
        assert secret.encode() not in rendered
    assert secret not in (error.upstream_error_type or "")


def test_redirects_are_not_followed_with_the_provider_key(tmp_path: Path) -> None:
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    stolen: list[dict[str, str]] = []

    class Thief(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            stolen.append(dict(self.headers))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    thief = ThreadingHTTPServer(("127.0.0.1", 0), Thief)

    class Redirector(Thief):
        def do_POST(self) -> None:
            self.send_response(307)
            self.send_header("location", f"http://127.0.0.1:{thief.server_port}/steal")
            self.send_header("content-length", "0")
            self.end_headers()

    redirector = ThreadingHTTPServer(("127.0.0.1", 0), Redirector)
    for server in (thief, redirector):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        config = write_config(tmp_path, mock_config(f"http://127.0.0.1:{redirector.server_port}"))
        with ThreadedServer(create_app(config)) as gateway:
            response = httpx.post(gateway.url + "/v1/messages",
                                  headers={**AUTH, "anthropic-version": "2023-06-01"},
                                  json={"model": "claude-mock", "max_tokens": 5,
                                        "messages": QUESTION})
        assert response.status_code == 502
        assert "returned 307" in response.json()["error"]["message"]
        assert stolen == []
    finally:
        thief.shutdown()
        redirector.shutdown()


def test_an_error_answered_with_a_200_is_an_error_in_the_callers_shape(
        gateway: ThreadedServer, mock: MockProviderServer) -> None:
    # OpenRouter and some OpenAI-compatible proxies answer a failure with HTTP 200 and an
    # `{"error": {...}}` body. It went to an OpenAI caller as a 200 (billed as an answer
    # without usage), and to an Anthropic caller as an empty, successful message.
    mock.push_fault(Fault("status", provider="openai", status=503, sent_status=200,
                          message="Upstream provider overloaded"))
    response = httpx.post(gateway.url + "/v1/chat/completions", headers=AUTH,
                          json={"model": "gpt-mock", "messages": QUESTION})
    assert response.status_code == 503  # (the status its code gives)
    error = response.json()["error"]
    assert "answered 200 with an error: Upstream provider overloaded" in error["message"]
    mock.push_fault(Fault("status", provider="openai", status=503, sent_status=200,
                          code="overloaded", message="Upstream provider overloaded"))
    with pytest.raises(anthropic.APIStatusError) as failed:
        claude(gateway).messages.create(model="gpt-mock", max_tokens=20, messages=QUESTION)
    assert failed.value.status_code == 502  # (a code that is no status)
    body = failed.value.response.json()
    assert body["type"] == "error" and "Upstream provider overloaded" in \
        body["error"]["message"]


# Two OpenAI deployments of one model, tried in order, the second after any failure.
PAIR = ('models["pair"] = [Deployment("openai", "gpt-4o-mini", price=MOCK_PRICE), '
        'Deployment("openai", "gpt-4o", price=MOCK_PRICE)]\n'
        'from middleware.failover import Route\n'
        'middleware = [Middleware(FailoverMiddleware, retry=RetryPolicy(max_attempts=2), '
        'breaker=NEVER_OPENS, routes={"pair": Route(strategy="priority")})]\n')


def test_an_error_answered_with_a_200_fails_over_as_its_status_would(
        tmp_path: Path, mock: MockProviderServer) -> None:
    config = write_config(tmp_path, mock_config(mock.url, middleware="none", extra=PAIR))
    with ThreadedServer(create_app(config)) as server:
        mock.push_fault(Fault("status", provider="openai", status=429, sent_status=200))
        raw = oai(server).chat.completions.with_raw_response.create(model="pair",
                                                                  messages=QUESTION)
        assert raw.parse().choices[0].message.content
        assert raw.headers["x-sluicegate-deployment"] == "openai/gpt-4o"
        assert raw.headers["x-sluicegate-attempts"] == "2"
        # A caller's error (400) is not retried: it goes back as it is, after one call.
        calls = len(mock.requests)
        mock.push_fault(Fault("status", provider="openai", status=400, sent_status=200,
                              message="Input too long"))
        response = httpx.post(server.url + "/v1/chat/completions", headers=AUTH,
                              json={"model": "pair", "messages": QUESTION})
    assert response.status_code == 400
    assert "Input too long" in response.json()["error"]["message"]
    assert len(mock.requests) == calls + 1


def test_a_json_answer_to_a_stream_request_is_a_502_before_the_stream(
        gateway: ThreadedServer, mock: MockProviderServer) -> None:
    # A server that ignores `stream` answers the JSON completion: it went to an OpenAI
    # caller of an OpenAI deployment as a 200 event stream holding no event (the SDK
    # yielded no chunk, and no error).
    mock.push_fault(Fault("ignore_stream", provider="openai"))
    with pytest.raises(openai.APIStatusError) as failed:
        list(oai(gateway).chat.completions.create(model="gpt-mock", messages=QUESTION,
                                                  stream=True))
    assert (failed.value.status_code, failed.value.code) == (502, "bad_response")
    assert "without an event stream (application/json)" in failed.value.message
    mock.push_fault(Fault("ignore_stream", provider="anthropic"))
    with pytest.raises(anthropic.APIStatusError) as refused:
        claude(gateway).messages.create(model="claude-mock", max_tokens=20, messages=QUESTION,
                                        stream=True)
    assert refused.value.status_code == 502
    assert refused.value.body == {"type": "error", "error": {
        "type": "api_error", "message": refused.value.body["error"]["message"]}}


def test_a_json_answer_to_a_stream_request_fails_over(tmp_path: Path,
                                                      mock: MockProviderServer) -> None:
    config = write_config(tmp_path, mock_config(mock.url, middleware="none", extra=PAIR))
    with ThreadedServer(create_app(config)) as server:
        mock.push_fault(Fault("ignore_stream", provider="openai"))
        raw = oai(server).chat.completions.with_raw_response.create(
            model="pair", messages=QUESTION, stream=True)
        text = "".join(choice.delta.content or "" for chunk in raw.parse()
                       for choice in chunk.choices)
    assert text
    assert raw.headers["x-sluicegate-deployment"] == "openai/gpt-4o"
    assert raw.headers["x-sluicegate-attempts"] == "2"


def test_a_client_that_reads_slowly_is_no_provider_stall(tmp_path: Path) -> None:
    # A client that stops reading a long stream for longer than the provider's idle_s holds
    # the gateway's sends: that wait was timed as the provider's idle gap, and the stream
    # was cut as a provider failure (counted against the deployment, its breaker opened by
    # three such clients), though the provider was streaming all along.
    with MockProviderServer(MockConfig(chunk_chars=2_000)) as mock:
        extra = ('middleware = [Middleware(FailoverMiddleware, retry=RetryPolicy(max_attempts=1), '
                 'breaker=BreakerSettings(consecutive_failures=1, min_requests=1))]\n')
        text = mock_config(mock.url, middleware="none", extra=extra) \
            .replace("idle_s=5", "idle_s=1")
        process, url = start_cli_gateway(write_config(tmp_path, text))
        try:
            body = json.dumps({"model": "gpt-mock", "stream": True, "messages": [
                {"role": "user", "content": "word " * 1_200_000}]}).encode()  # (6 MB back)
            host, port = url.removeprefix("http://").split(":")
            with socket.socket() as conn:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                conn.connect((host, int(port)))
                conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: gateway\r\n"
                             b"content-type: application/json\r\nauthorization: Bearer " +
                             TEST_KEY.encode() + b"\r\nconnection: close\r\n"
                             b"content-length: %d\r\n\r\n" % len(body) + body)
                data = bytearray(conn.recv(4096))
                time.sleep(5.0)  # (busy: not reading, once the buffers between are full)
                while chunk := conn.recv(1 << 20):
                    data += chunk
            # (no failure was counted: the breaker, which one failure opens, lets this by)
            after = httpx.post(url + "/v1/chat/completions", headers=AUTH,
                               json={"model": "gpt-mock", "messages": QUESTION})
        finally:
            stop_process(process)
    assert data.startswith(b"HTTP/1.1 200")
    assert b"timed out" not in data
    assert data.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")  # (chunked: its last chunk)
    assert len(data) > 6_000_000
    assert after.status_code == 200
