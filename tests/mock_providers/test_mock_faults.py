"""The mock's fault injection, key checks, HTTP control endpoints, CLI and pure rules."""
from __future__ import annotations

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


@pytest.fixture
def mock(srv: MockProviderServer) -> Iterator[MockProviderServer]:
    srv.clear_faults()
    srv.reset_log()
    yield srv
    srv.clear_faults()


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
