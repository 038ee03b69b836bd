"""The mock's fault injection, key checks, HTTP control endpoints, CLI and pure rules."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import orjson
import pytest

from tests.mock_providers import Fault, MockConfig, MockProviderServer
from tests.mock_providers.behaviour import sample_arguments, truncate
from tests.mock_providers.wire import cut_index

QUESTION = "What is the capital of France"
REPLY = "Mock reply to: " + QUESTION
USER: list[Any] = [{"role": "user", "content": QUESTION}]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def srv() -> Iterator[MockProviderServer]:
    with MockProviderServer() as server:
        yield server


NO_RANDOM_FAILURES: dict[str, Any] = {"fail_ratio": 0.0, "fail_status": 503,
                                      "fail_retry_after_s": None, "fail_seed": None,
                                      "fail_providers": None}


@pytest.fixture
def mock(srv: MockProviderServer) -> Iterator[MockProviderServer]:
    srv.clear_faults()
    srv.reset_log()
    srv.reset_ratio_failures()
    yield srv
    srv.clear_faults()
    srv.config.update(NO_RANDOM_FAILURES)


def call(srv: MockProviderServer, provider: str, *, stream: bool = False, key: str = "k",
         **client: Any) -> httpx.Response:
    """One raw chat request in `provider`'s own format (no key header when `key` is empty)."""
    base = srv.base_url(provider)
    header = {"openai": "authorization", "azure": "api-key", "anthropic": "x-api-key",
              "gemini": "x-goog-api-key"}[provider]
    headers = {header: f"Bearer {key}" if provider == "openai" else key} if key else {}
    if provider == "openai":
        return httpx.post(base + "/chat/completions", headers=headers,
                          json={"model": "m", "messages": USER, "stream": stream}, **client)
    if provider == "azure":
        return httpx.post(base + "/openai/deployments/d/chat/completions?api-version=2024-10-21",
                          headers=headers, json={"messages": USER, "stream": stream}, **client)
    if provider == "anthropic":
        return httpx.post(base + "/v1/messages", headers={
            **headers, "anthropic-version": "2023-06-01"}, json={
            "model": "c", "max_tokens": 50, "messages": USER, "stream": stream}, **client)
    method = "streamGenerateContent?alt=sse" if stream else "generateContent"
    return httpx.post(f"{base}/v1beta/models/gemini-2.0-flash:{method}", headers=headers,
                      json={"contents": [{"role": "user", "parts": [{"text": QUESTION}]}]},
                      **client)


RATE_LIMIT_SHAPES: dict[str, Callable[[Any], bool]] = {
    "openai": lambda b: b["error"]["code"] == "rate_limit_exceeded"
    and b["error"]["type"] == "requests" and "param" in b["error"],
    "azure": lambda b: b["error"]["code"] == "429" and "rate limit" in b["error"]["message"],
    "anthropic": lambda b: b["type"] == "error" and b["error"]["type"] == "rate_limit_error"
    and b["request_id"].startswith("req_"),
    "gemini": lambda b: b["error"]["status"] == "RESOURCE_EXHAUSTED" and b["error"]["code"] == 429
    and b["error"]["details"][0]["retryDelay"] == "7s",
}


@pytest.mark.parametrize("provider", list(RATE_LIMIT_SHAPES))
def test_status_fault_uses_the_provider_shape_then_is_consumed(mock: MockProviderServer,
                                                               provider: str) -> None:
    mock.push_fault(Fault("status", provider=provider, status=429, retry_after_s=6.2))
    for stream in (True, False):
        limited = call(mock, provider, stream=stream)
        if stream:
            assert limited.status_code == 429 and limited.headers["retry-after"] == "7"
            assert limited.headers["content-type"].startswith("application/json")
            assert RATE_LIMIT_SHAPES[provider](limited.json())
            continue
        assert limited.status_code == 200  # the fault was used up by the first request
    assert mock.pending_faults == []


def test_a_status_fault_may_leave_the_retry_after_header_out(mock: MockProviderServer) -> None:
    """As Gemini's API answers a 429: the delay only in the body's RetryInfo."""
    mock.push_fault(Fault("status", provider="gemini", status=429, retry_after_s=6.2,
                          retry_after_header=False))
    limited = call(mock, "gemini")
    assert limited.status_code == 429 and "retry-after" not in limited.headers
    assert RATE_LIMIT_SHAPES["gemini"](limited.json())


def test_a_status_fault_may_carry_headers_of_its_own(mock: MockProviderServer) -> None:
    """As OpenAI says a pause only in its rate-limit headers."""
    mock.push_fault(Fault("status", provider="openai", status=429, retry_after_header=False,
                          headers={"x-ratelimit-reset-requests": "20s"}))
    limited = call(mock, "openai")
    assert limited.status_code == 429 and "retry-after" not in limited.headers
    assert limited.headers["x-ratelimit-reset-requests"] == "20s"


def test_anthropic_overloaded_through_the_sdk(mock: MockProviderServer) -> None:
    client = anthropic.Anthropic(base_url=mock.base_url("anthropic"), api_key="k", max_retries=0)
    mock.push_fault(Fault("status", provider="anthropic", status=529, message="Overloaded"))
    with pytest.raises(anthropic.APIStatusError) as failure:
        client.messages.create(model="c", max_tokens=10, messages=USER)
    assert failure.value.status_code == 529
    assert failure.value.body["error"] == {"type": "overloaded_error",  # type: ignore[index]
                                           "message": "Overloaded"}


def test_faults_match_provider_in_fifo_order(mock: MockProviderServer) -> None:
    mock.push_fault(Fault("status", provider="anthropic", status=500))
    mock.push_fault(Fault("status", status=502))
    mock.push_fault(Fault("status", provider="openai", status=503))
    assert call(mock, "openai").status_code == 502  # the any-provider fault comes first
    assert call(mock, "gemini").status_code == 200  # nothing left for gemini
    assert call(mock, "anthropic").status_code == 500
    assert call(mock, "openai").status_code == 503
    assert mock.pending_faults == []


def test_reset_mid_stream_and_before_a_json_answer(mock: MockProviderServer) -> None:
    client = openai.OpenAI(base_url=mock.base_url("openai"), api_key="k", max_retries=0)
    mock.push_fault(Fault("reset", provider="openai", after_chunks=2))
    received = ""
    with pytest.raises(openai.APIConnectionError):
        for chunk in client.chat.completions.create(model="m", messages=USER,
                                                    stream=True):
            received += "".join(c.delta.content or "" for c in chunk.choices)
    assert received == REPLY[:16]  # two 8-character chunks, then the connection broke
    mock.push_fault(Fault("reset", provider="openai"))
    with pytest.raises(openai.APIConnectionError):
        client.chat.completions.create(model="m", messages=USER)
    mock.push_fault(Fault("reset", provider="anthropic", after_chunks=1))
    body = b""
    headers = {"x-api-key": "k", "anthropic-version": "2023-06-01"}
    request = {"model": "c", "max_tokens": 50, "messages": USER, "stream": True}
    with pytest.raises(httpx.HTTPError), httpx.stream(
            "POST", mock.base_url("anthropic") + "/v1/messages", headers=headers,
            json=request) as response:
        for piece in response.iter_raw():
            body += piece
    assert body.count(b"event: content_block_delta") == 1 and b"message_stop" not in body


def test_error_event_ends_streams_in_band(mock: MockProviderServer) -> None:
    client = openai.OpenAI(base_url=mock.base_url("openai"), api_key="k", max_retries=0)
    mock.push_fault(Fault("error_event", provider="openai", after_chunks=1, message="boom"))
    received = ""
    with pytest.raises(openai.APIError) as failure:
        for chunk in client.chat.completions.create(model="m", messages=USER,
                                                    stream=True):
            received += "".join(c.delta.content or "" for c in chunk.choices)
    assert (received, failure.value.message) == (REPLY[:8], "boom")
    assert (failure.value.type, failure.value.code) == ("server_error", None)
    mock.push_fault(Fault("error_event", provider="openai", after_chunks=1, code="invalid_prompt"))
    with pytest.raises(openai.APIError) as refused:
        list(client.chat.completions.create(model="m", messages=USER, stream=True))
    assert (refused.value.type, refused.value.code) == ("invalid_request_error", "invalid_prompt")
    claude = anthropic.Anthropic(base_url=mock.base_url("anthropic"), api_key="k", max_retries=0)
    mock.push_fault(Fault("error_event", provider="anthropic", after_chunks=0))
    with pytest.raises(anthropic.APIStatusError) as overloaded, claude.messages.stream(
            model="c", max_tokens=50, messages=USER) as stream:
        "".join(stream.text_stream)
    assert overloaded.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]
    mock.push_fault(Fault("error_event", provider="gemini", after_chunks=1))
    lines = [line for line in call(mock, "gemini", stream=True).text.splitlines() if line]
    assert len(lines) == 2 and '"candidates"' in lines[0]
    assert '"status":"UNAVAILABLE"' in lines[1] and lines[1].startswith("data: {\"error\"")


def test_error_event_of_a_request_the_caller_must_fix_in_anthropic_and_gemini_streams(
        mock: MockProviderServer) -> None:
    """A fault's code is the type of Anthropic's `error` event and the status of Gemini's
    error object (with its HTTP code), as a chat stream's code sets its chunk's."""
    claude = anthropic.Anthropic(base_url=mock.base_url("anthropic"), api_key="k", max_retries=0)
    mock.push_fault(Fault("error_event", provider="anthropic", after_chunks=1,
                          code="invalid_request_error"))
    received = ""
    with pytest.raises(anthropic.APIStatusError) as refused, claude.messages.stream(
            model="c", max_tokens=50, messages=USER) as stream:
        for text in stream.text_stream:
            received += text
    assert received == REPLY[:8]
    assert refused.value.body == {"type": "error", "error": {  # type: ignore[comparison-overlap]
        "type": "invalid_request_error", "message": "Invalid request."}}
    invalid = {"error": {"code": 400, "message": "bad", "status": "INVALID_ARGUMENT"}}
    mock.push_fault(Fault("error_event", provider="gemini", after_chunks=1, message="bad",
                          code="INVALID_ARGUMENT"))
    lines = [line for line in call(mock, "gemini", stream=True).text.splitlines() if line]
    assert len(lines) == 2 and '"candidates"' in lines[0]
    assert json.loads(lines[1].removeprefix("data: ")) == invalid
    mock.push_fault(Fault("error_event", provider="gemini", after_chunks=1, message="bad",
                          code="INVALID_ARGUMENT"))
    array = httpx.post(mock.base_url("gemini") + "/v1beta/models/gemini-2.0-flash:"
                       "streamGenerateContent", headers={"x-goog-api-key": "k"},
                       json={"contents": [{"role": "user", "parts": [{"text": QUESTION}]}]})
    assert json.loads(array.text)[-1] == invalid  # (the JSON array form, without alt=sse)


def test_responses_error_events_in_their_three_shapes(mock: MockProviderServer) -> None:
    """The documented flat `error` event and `response.failed` reach the SDK as typed events;
    the live API's nested `error` makes it raise, as openai-python's `_streaming.py` does.
    An `error` event is followed by `response.failed`."""
    client = openai.OpenAI(base_url=mock.base_url("openai"), api_key="k", max_retries=0)
    mock.push_fault(Fault("error_event", provider="openai", after_chunks=1, message="boom",
                          code="rate_limit_exceeded"))
    events = list(client.responses.create(model="m", input=QUESTION, stream=True))
    flat, failed_after = events[-2], events[-1]
    assert (flat.type, flat.code, flat.message, flat.param) == (  # type: ignore[union-attr]
        "error", "rate_limit_exceeded", "boom", None)
    assert flat.sequence_number == events[-3].sequence_number + 1
    # ... then, as on the live API, the failed response.
    assert failed_after.type == "response.failed"
    assert failed_after.sequence_number == flat.sequence_number + 1
    assert failed_after.response.error.code == "rate_limit_exceeded"  # type: ignore[union-attr]
    mock.push_fault(Fault("error_event", provider="openai", after_chunks=1, event="error.nested"))
    with pytest.raises(openai.APIError) as nested:
        list(client.responses.create(model="m", input=QUESTION, stream=True))
    assert nested.value.body["code"] == "server_error"  # type: ignore[index]
    mock.push_fault(Fault("error_event", provider="openai", after_chunks=0, event="error.nested",
                          code="invalid_prompt"))
    with pytest.raises(openai.APIError) as refused:
        list(client.responses.create(model="m", input=QUESTION, stream=True))
    assert (refused.value.type, refused.value.code) == ("invalid_request_error", "invalid_prompt")
    mock.push_fault(Fault("error_event", provider="openai", after_chunks=0,
                          event="response.failed", message="boom"))
    events = list(client.responses.create(model="m", input=QUESTION, stream=True))
    assert [e.type for e in events] == ["response.created", "response.in_progress",
                                        "response.output_item.added",
                                        "response.content_part.added", "response.failed"]
    failed = events[-1].response  # type: ignore[union-attr]
    assert failed.status == "failed" and failed.error is not None
    assert (failed.error.code, failed.error.message) == ("server_error", "boom")
    with pytest.raises(ValueError, match="unknown Responses error event"):
        Fault("error_event", event="response.cancelled")


def test_a_stalled_responses_error_event_comes_alone_and_holds_the_stream_open(
        mock: MockProviderServer) -> None:
    """`stall_s`: the `error` event without its `response.failed`, then silence (a read
    that waits less than the stall times out), then the end of the stream."""
    client = openai.OpenAI(base_url=mock.base_url("openai"), api_key="k", max_retries=0)
    mock.push_fault(Fault("error_event", provider="openai", after_chunks=1, stall_s=0.3))
    events = list(client.responses.create(model="m", input=QUESTION, stream=True))
    assert [e.type for e in events[-2:]] == ["response.output_text.delta", "error"]
    mock.push_fault(Fault("error_event", provider="openai", after_chunks=1, stall_s=5))
    with httpx.stream("POST", mock.base_url("openai") + "/responses",
                      headers={"authorization": "Bearer k"}, timeout=httpx.Timeout(30, read=1),
                      json={"model": "m", "input": QUESTION, "stream": True}) as response, \
            pytest.raises(httpx.ReadTimeout):
        for _ in response.iter_raw():
            pass


def test_truncate_ends_streams_cleanly_without_their_closing_events(
        mock: MockProviderServer) -> None:
    for provider, ending in (("openai", b"[DONE]"), ("anthropic", b"message_stop"),
                             ("gemini", b"finishReason")):
        mock.push_fault(Fault("truncate", provider=provider, after_chunks=2))
        body = call(mock, provider, stream=True).content  # ends without an error
        assert body.count(REPLY[8:16].encode()) == 1 and REPLY[16:24].encode() not in body
        assert ending not in body and b"error" not in body


def test_a_fault_with_a_match_waits_for_a_request_that_holds_it(
        mock: MockProviderServer) -> None:
    mock.push_fault(Fault("status", status=500, match="marker-7"))
    assert call(mock, "openai").status_code == 200  # (USER holds no marker: passed over)
    marked = {"model": "m", "messages": [{"role": "user", "content": "hi marker-7"}]}
    response = httpx.post(mock.base_url("openai") + "/chat/completions", json=marked,
                          headers={"authorization": "Bearer k"})
    assert response.status_code == 500 and mock.pending_faults == []


def test_stall_holds_a_stream_silent_after_its_content_events(mock: MockProviderServer) -> None:
    mock.push_fault(Fault("stall", provider="openai", after_chunks=2, delay_s=3.0))
    body = b""
    with pytest.raises(httpx.ReadTimeout), httpx.stream(
            "POST", mock.base_url("openai") + "/chat/completions",
            headers={"authorization": "Bearer k"}, timeout=httpx.Timeout(5.0, read=0.5),
            json={"model": "m", "messages": USER, "stream": True}) as response:
        for piece in response.iter_raw():
            body += piece
    assert body.count(b'"content":"') == 3  # the opening chunk's "" and two content chunks
    assert REPLY[8:16].encode() in body and REPLY[16:24].encode() not in body
    mock.push_fault(Fault("stall", provider="openai", after_chunks=1, delay_s=0.2))
    assert call(mock, "openai", stream=True).content.endswith(b"data: [DONE]\n\n")


def test_bills_keep_what_each_call_answered(mock: MockProviderServer) -> None:
    mock.config.record_bills = True
    try:
        mock.push_fault(Fault("status", provider="openai", status=429, retry_after_s=1))
        assert call(mock, "openai").status_code == 429
        answer = call(mock, "openai").json()
        mock.push_fault(Fault("truncate", provider="anthropic", after_chunks=2))
        call(mock, "anthropic", stream=True)
        assert call(mock, "anthropic", stream=True).status_code == 200
    finally:
        mock.config.record_bills = False
    refused, answered, cut, whole = mock.bills
    assert (refused["status"], refused["sent"], refused["complete"]) == (429, b"", False)
    assert answered["complete"] and orjson.loads(answered["sent"]) == answer
    assert answered["json"]["messages"] == USER and answered["path"].endswith("/completions")
    assert (cut["content_sent"], cut["complete"], cut["stream"]) == (2, False, True)
    assert cut["content_events"] == whole["content_events"] == whole["content_sent"] > 2
    assert whole["complete"] and whole["sent"].endswith(b"event: message_stop\n"
                                                        b"data: {\"type\":\"message_stop\"}\n\n")
    mock.reset_log()
    assert mock.bills == []


def test_status_fault_code_and_param_in_openai_shape(mock: MockProviderServer) -> None:
    mock.push_fault(Fault("status", provider="openai", status=400, message="too long",
                          code="context_length_exceeded", param="messages"))
    assert call(mock, "openai").json() == {"error": {
        "message": "too long", "type": "invalid_request_error", "param": "messages",
        "code": "context_length_exceeded"}}


def test_status_fault_error_type_any_json_string(mock: MockProviderServer) -> None:
    # A provider names its own error types; JSON lets one hold a NUL (a ledger must cope).
    mock.push_fault(Fault("status", provider="openai", status=400,
                          error_type="invalid\u0000request"))
    mock.push_fault(Fault("status", provider="anthropic", status=400, error_type="odd_error"))
    assert b'"type":"invalid\\u0000request"' in call(mock, "openai").content
    assert call(mock, "anthropic").json()["error"]["type"] == "odd_error"


def test_slow_first_byte_and_ttft_hold_back_the_headers(mock: MockProviderServer) -> None:
    mock.push_fault(Fault("slow_first_byte", provider="gemini", delay_s=3.0))
    with pytest.raises(httpx.ReadTimeout):
        call(mock, "gemini", timeout=httpx.Timeout(5.0, read=0.3))
    assert call(mock, "gemini").status_code == 200
    mock.config.ttft_s = 3.0
    try:
        with pytest.raises(httpx.ReadTimeout):
            call(mock, "openai", stream=True, timeout=httpx.Timeout(5.0, read=0.3))
    finally:
        mock.config.ttft_s = 0.0


def test_client_disconnect_is_counted_as_a_cancelled_stream() -> None:
    with MockProviderServer(MockConfig(chunk_delay_s=0.05, chunk_chars=2)) as slow:
        with httpx.stream("POST", slow.base_url("openai") + "/chat/completions",
                          headers={"authorization": "Bearer k"},
                          json={"model": "m", "messages": USER, "stream": True}) as response:
            for _ in response.iter_raw():
                break
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (slow.active_streams or not slow.cancelled_streams):
            time.sleep(0.02)
        assert (slow.active_streams, slow.cancelled_streams) == (0, 1)


WRONG_KEY_SHAPES: dict[str, tuple[int, Callable[[Any], Any]]] = {
    "openai": (401, lambda b: b["error"]["code"]),
    "azure": (401, lambda b: b["error"]["code"]),
    "anthropic": (401, lambda b: b["error"]["type"]),
    "gemini": (400, lambda b: b["error"]["details"][0]["reason"]),  # Google's answer, not 401
}


@pytest.mark.parametrize("provider,expected", [
    ("openai", "invalid_api_key"), ("azure", "401"), ("anthropic", "authentication_error"),
    ("gemini", "API_KEY_INVALID")])
def test_expected_keys_refuse_other_keys(provider: str, expected: str) -> None:
    keys = {"openai": "o-key", "azure": "a-key", "anthropic": "c-key", "gemini": "g-key"}
    with MockProviderServer(MockConfig(expected_keys=keys)) as strict:
        refused = call(strict, provider, key="wrong-key-123")
        status, detail = WRONG_KEY_SHAPES[provider]
        assert (refused.status_code, detail(refused.json())) == (status, expected)
        assert call(strict, provider, key=keys[provider]).status_code == 200


@pytest.mark.parametrize("provider", ["openai", "azure", "anthropic", "gemini"])
def test_any_key_will_do_but_none_is_refused(mock: MockProviderServer, provider: str) -> None:
    assert call(mock, provider, key="whatever").status_code == 200
    missing = call(mock, provider, key="")
    assert missing.status_code == (403 if provider == "gemini" else 401)
    assert mock.requests[-1]["provider"] == provider  # refused requests are logged too


def test_http_control_endpoints(mock: MockProviderServer) -> None:
    control = mock.url + "/_mock"
    assert httpx.post(control + "/faults", json={"kind": "bogus"}).status_code == 400
    queued = httpx.post(control + "/faults", json=[
        {"kind": "status", "provider": "gemini", "status": 503},
        {"kind": "status", "provider": "gemini", "status": 504}])
    assert queued.status_code == 201 and len(httpx.get(control + "/faults").json()) == 2
    assert call(mock, "gemini").json()["error"]["status"] == "UNAVAILABLE"
    assert httpx.delete(control + "/faults").status_code == 200
    assert call(mock, "gemini").status_code == 200
    assert httpx.put(control + "/config", json={"chunk_chars": 3}).json()["chunk_chars"] == 3
    try:
        text = call(mock, "openai", stream=True).text
        assert '"content":"Moc"' in text and '"content":"k r"' in text
    finally:
        httpx.put(control + "/config", json={"chunk_chars": 8})
    logged = httpx.get(control + "/requests").json()
    assert [entry["provider"] for entry in logged] == ["gemini", "gemini", "openai"]
    assert logged[-1]["json"]["stream"] is True
    httpx.delete(control + "/requests")
    assert mock.requests == []


# -- random failures (MockConfig.fail_ratio) --------------------------------------------------

def test_fail_ratio_fails_about_half_in_openai_shape_reproducibly(
        mock: MockProviderServer) -> None:
    client = openai.OpenAI(base_url=mock.base_url("openai"), api_key="k", max_retries=0)

    def run(requests: int) -> list[bool]:
        failed = []
        for _ in range(requests):
            try:
                reply = client.chat.completions.create(model="m", messages=USER)
            except openai.APIStatusError as exc:
                assert exc.status_code == 503
                assert exc.body == {"message": "The server is overloaded or not ready yet.",
                                    "type": "server_error", "param": None, "code": None}
                assert exc.response.headers["x-request-id"].startswith("req_")
                failed.append(True)
            else:
                assert reply.choices[0].message.content == REPLY
                failed.append(False)
        return failed

    mock.config.update({"fail_ratio": 0.5, "fail_seed": 1234})
    first = run(200)
    assert 70 <= sum(first) <= 130  # 100 expected; the seed makes it one fixed number
    assert mock.ratio_failures() == mock.ratio_failures("openai") == sum(first)
    assert mock.ratio_failures("anthropic") == 0
    stats = httpx.get(mock.url + "/_mock/stats").json()
    assert stats["ratio_failures"] == sum(first)
    assert stats["ratio_failures_by_provider"] == {"openai": sum(first)}
    mock.config.update({"fail_seed": 1234})  # the same seed again: the same sequence
    assert run(50) == first[:50]
    mock.config.fail_seed = 99  # assigned directly: reseeded at the next draw
    other = run(50)
    mock.config.fail_seed = 1234
    assert run(50) == first[:50] and other != first[:50]


def test_fail_ratio_one_fails_only_the_chosen_providers(mock: MockProviderServer) -> None:
    assert httpx.put(mock.url + "/_mock/config", json={
        "fail_ratio": 1, "fail_providers": ["anthropic"], "fail_status": 529}).status_code == 200
    claude = anthropic.Anthropic(base_url=mock.base_url("anthropic"), api_key="k", max_retries=0)
    for _ in range(5):
        with pytest.raises(anthropic.APIStatusError) as failure:
            claude.messages.create(model="c", max_tokens=10, messages=USER)
        assert failure.value.status_code == 529
        assert failure.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]
    for provider in ("openai", "azure", "gemini"):
        for stream in (False, True):
            assert call(mock, provider, stream=stream).status_code == 200
    assert call(mock, "anthropic", stream=True).status_code == 529
    assert [mock.ratio_failures(p) for p in ("openai", "azure", "anthropic", "gemini")] == [
        0, 0, 6, 0]
    assert httpx.get(mock.url + "/_mock/stats").json()["ratio_failures_by_provider"] == {
        "anthropic": 6}


def test_fail_ratio_zero_fails_nothing(mock: MockProviderServer) -> None:
    mock.config.update({"fail_ratio": 0.0, "fail_seed": 5})
    for provider in ("openai", "azure", "anthropic", "gemini"):
        for _ in range(5):
            assert call(mock, provider).status_code == 200
    assert mock.ratio_failures() == 0
    assert httpx.get(mock.url + "/_mock/stats").json()["ratio_failures"] == 0


VOLATILE = {"date", "x-request-id", "apim-request-id", "request-id"}


def _comparable(response: httpx.Response) -> tuple[int, dict[str, str], Any]:
    headers = {k: v for k, v in response.headers.items() if k not in VOLATILE}
    for name in [k for k in headers if k.startswith("anthropic-ratelimit-") and
                 k.endswith("-reset")]:  # a timestamp to the second: two calls can straddle one
        headers[name] = "<reset>"
    body = response.json()
    body.pop("request_id", None)  # Anthropic's, random like the header
    return response.status_code, headers, body


@pytest.mark.parametrize("provider", ["openai", "azure", "anthropic", "gemini"])
def test_a_random_failure_answers_like_the_status_fault(mock: MockProviderServer,
                                                        provider: str) -> None:
    mock.push_fault(Fault("status", status=429, retry_after_s=2.5))
    queued = call(mock, provider)
    mock.config.update({"fail_ratio": 1.0, "fail_status": 429, "fail_retry_after_s": 2.5})
    drawn = call(mock, provider)
    assert queued.status_code == 429 and queued.headers["retry-after"] == "3"
    assert _comparable(drawn) == _comparable(queued)
    assert mock.ratio_failures(provider) == 1  # the queued fault is not counted


def test_queued_faults_come_before_the_ratio(mock: MockProviderServer) -> None:
    mock.config.update({"fail_ratio": 1.0, "fail_seed": 0})
    mock.push_fault(Fault("status", provider="gemini", status=504))
    mock.push_fault(Fault("slow_first_byte", provider="openai", delay_s=0.0))
    assert call(mock, "gemini").status_code == 504
    assert call(mock, "openai").status_code == 200  # drew the queued fault, not the ratio
    assert [call(mock, "gemini").status_code, call(mock, "openai").status_code] == [503, 503]
    assert mock.ratio_failures() == 2


@pytest.mark.parametrize("values", [
    {"fail_ratio": 1.5}, {"fail_ratio": -0.1}, {"fail_ratio": float("nan")},
    {"fail_ratio": "half"}, {"fail_ratio": True}, {"fail_status": 200}, {"fail_status": 600},
    {"fail_status": 503.0}, {"fail_retry_after_s": -1}, {"fail_seed": "seven"},
    {"fail_providers": ["bedrock"]}, {"fail_providers": ["openai", "Azure"]},
    {"fail_providers": "anthropic"}, {"fail_ratio": 0.5, "chunk_chars": 0},
    {"fail_ratio": 0.5, "_rng": None}])
def test_bad_failure_settings_are_refused_and_change_nothing(values: dict[str, Any]) -> None:
    config = MockConfig()
    before = config.as_dict()
    with pytest.raises(ValueError):
        config.update(values)
    assert config.as_dict() == before


def test_failure_settings_over_http_and_in_the_constructor(mock: MockProviderServer) -> None:
    control = mock.url + "/_mock/config"
    refused = httpx.put(control, json={"fail_ratio": 0.5, "fail_providers": ["bedrock"]})
    assert refused.status_code == 400 and "fail_providers" in refused.json()["error"]
    assert httpx.put(control, json={"fail_status": 99}).status_code == 400
    assert mock.config.fail_ratio == 0.0  # nothing of a refused update was applied
    shown = httpx.put(control, json={"fail_ratio": 0.25, "fail_providers": ["openai"],
                                     "fail_seed": 3}).json()
    assert {k: v for k, v in shown.items() if k.startswith("fail_")} == {
        "fail_ratio": 0.25, "fail_status": 503, "fail_retry_after_s": None, "fail_seed": 3,
        "fail_providers": ["openai"]}
    assert not any(k.startswith("_") for k in httpx.get(control).json())
    with pytest.raises(ValueError):
        MockConfig(fail_ratio=2.0)
    with pytest.raises(ValueError):
        mock.ratio_failures("bedrock")


def test_cli_serves_in_the_foreground(tmp_path: Path) -> None:
    with MockProviderServer() as probe:  # a free port: take one, then give it back
        port = probe.port
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.mock_providers", "--port", str(port), "--chunk-chars",
         "4"], cwd=REPO, stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if httpx.get(base + "/_mock/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.05)
        assert httpx.get(base + "/_mock/config").json()["chunk_chars"] == 4
        reply = httpx.post(base + "/openai/v1/chat/completions", headers={
            "authorization": "Bearer k"}, json={"model": "m", "messages": USER})
        assert reply.json()["choices"][0]["message"]["content"] == REPLY
    finally:
        process.terminate()
        _, banner = process.communicate(timeout=10)
    assert process.returncode == 0
    assert banner.decode().startswith(f"mock providers listening: openai {base}/openai/v1,")
    refused = subprocess.run([sys.executable, "-m", "tests.mock_providers", "--host", "0.0.0.0"],
                             cwd=REPO, capture_output=True, text=True, timeout=30, check=False)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        "mock providers: the mock binds to loopback addresses only, not '0.0.0.0'."]


def test_schema_samples_truncation_and_fault_cut_points() -> None:
    assert sample_arguments({"properties": {
        "unit": {"enum": ["C", "F"]}, "name": {"type": ["string", "null"]},
        "count": {"type": "INTEGER"}, "anything": {}}}) == {
        "unit": "C", "name": "test", "count": 1, "anything": "test"}
    assert sample_arguments(None) == {}
    assert truncate("a b c", 2) == ("a b", True) and truncate("a b", 2) == ("a b", False)
    items = [(b"start", False), (b"1", True), (b"2", True), (b"end", False)]
    assert [cut_index(items, n) for n in (0, 1, 2, 5)] == [1, 2, 3, 3]
