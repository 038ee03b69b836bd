"""Bad input gets the right 4xx in the caller's API shape, never a 500 or a traceback."""
from __future__ import annotations

from typing import Any

import anthropic
import httpx
import openai
import pytest

from tests.harness import AUTH, TEST_KEY, ThreadedServer

CHAT = "/v1/chat/completions"
MESSAGES = "/v1/messages"
GOOD_OPENAI = {"model": "gpt-mock", "messages": [{"role": "user", "content": "hi"}]}
GOOD_ANTHROPIC = {"model": "claude-mock", "max_tokens": 10,
                  "messages": [{"role": "user", "content": "hi"}]}


def assert_openai_error(response: httpx.Response, status: int, fragment: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-request-id"]
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert fragment in error["message"]
    assert "Traceback" not in response.text
    return dict(error)


def assert_anthropic_error(response: httpx.Response, status: int, fragment: str,
                           error_type: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["type"] == "error"
    assert body["error"]["type"] == error_type
    assert fragment in body["error"]["message"]


CASES = [
    # (name, path, content, headers, method, status, message fragment, anthropic error type)
    ("malformed json", b"{not json", {}, "POST", 400, "not valid JSON", "invalid_request_error"),
    ("not an object", b"[1, 2]", {}, "POST", 400, "JSON object", "invalid_request_error"),
    ("missing model", b'{"messages": [{"role": "user", "content": "x"}]}', {}, "POST", 400,
     "provide a model", "invalid_request_error"),
    ("unknown model", b'{"model": "no-such", "messages": [{"role": "user", "content": "x"}]}',
     {}, "POST", 404, "'no-such' does not exist", "not_found_error"),
    ("wrong content type", b"model=x", {"content-type": "application/x-www-form-urlencoded"},
     "POST", 415, "must be application/json", "invalid_request_error"),
    ("non-POST", b"", {}, "GET", 405, "use POST", "invalid_request_error"),
    ("missing messages", b'{"model": "gpt-mock"}', {}, "POST", 400, "'messages' is required",
     "invalid_request_error"),
    ("stream not boolean", (b'{"model": "gpt-mock", "stream": "yes", "messages": '
                            b'[{"role": "user", "content": "x"}]}'), {}, "POST", 400,
     "stream parameter",
     "invalid_request_error"),
]


@pytest.mark.parametrize("name,content,headers,method,status,fragment,anthropic_type", CASES,
                         ids=[case[0] for case in CASES])
def test_openai_shape(gateway: ThreadedServer, name: str, content: bytes, headers: dict[str, str],
                      method: str, status: int, fragment: str, anthropic_type: str) -> None:
    response = httpx.request(method, gateway.url + CHAT, content=content,
                             headers={"content-type": "application/json", **headers})
    assert_openai_error(response, status, fragment)


@pytest.mark.parametrize("name,content,headers,method,status,fragment,anthropic_type", CASES,
                         ids=[case[0] for case in CASES])
def test_anthropic_shape(gateway: ThreadedServer, name: str, content: bytes,
                         headers: dict[str, str], method: str, status: int, fragment: str,
                         anthropic_type: str) -> None:
    content = content.replace(b"gpt-mock", b"claude-mock")
    response = httpx.request(method, gateway.url + MESSAGES, content=content,
                             headers={"content-type": "application/json",
                                      "anthropic-version": "2023-06-01", **headers})
    assert_anthropic_error(response, status, fragment, anthropic_type)


def test_oversized_body_is_413_in_both_shapes(gateway: ThreadedServer) -> None:
    big = b'{"model": "gpt-mock", "messages": [{"role": "user", "content": "' + \
        b"x" * (17 * 1024 * 1024) + b'"}]}'
    response = httpx.post(gateway.url + CHAT, content=big,
                          headers={"content-type": "application/json"}, timeout=30)
    assert_openai_error(response, 413, "exceeds")
    response = httpx.post(gateway.url + MESSAGES, content=big,
                          headers={"content-type": "application/json"}, timeout=30)
    assert_anthropic_error(response, 413, "exceeds", "request_too_large")


def test_oversized_chunked_body_without_content_length_is_413(gateway: ThreadedServer) -> None:
    def body() -> Any:
        yield b'{"model": "gpt-mock", "messages": [{"role": "user", "content": "'
        for _ in range(18):
            yield b"y" * (1024 * 1024)
        yield b'"}]}'

    response = httpx.post(gateway.url + CHAT, content=body(),
                          headers={"content-type": "application/json"}, timeout=30)
    assert_openai_error(response, 413, "exceeds")


def test_unknown_path_is_404_in_the_guessed_shape(gateway: ThreadedServer) -> None:
    assert_openai_error(httpx.post(gateway.url + "/v1/nothing-here", json={}), 404, "Unknown path")
    response = httpx.post(gateway.url + "/v1/nothing-here", json={},
                          headers={"anthropic-version": "2023-06-01"})
    assert_anthropic_error(response, 404, "Unknown path", "not_found_error")


def test_sdks_raise_their_own_typed_errors(gateway: ThreadedServer) -> None:
    oai = openai.OpenAI(base_url=gateway.url + "/v1", api_key=TEST_KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError) as not_found:
        oai.chat.completions.create(model="no-such", messages=[{"role": "user", "content": "x"}])
    assert not_found.value.code == "model_not_found"
    claude = anthropic.Anthropic(base_url=gateway.url, api_key=TEST_KEY, max_retries=0)
    with pytest.raises(anthropic.NotFoundError) as missing:
        claude.messages.create(model="no-such", max_tokens=5,
                               messages=[{"role": "user", "content": "x"}])
    assert "does not exist" in str(missing.value)


def test_request_id_is_generated_or_passed_through(gateway: ThreadedServer) -> None:
    response = httpx.post(gateway.url + CHAT, content=b"{", headers={"x-request-id": "abc-123"})
    assert response.headers["x-request-id"] == "abc-123"
    generated = httpx.post(gateway.url + CHAT, content=b"{").headers["x-request-id"]
    assert len(generated) == 32 and generated != "abc-123"
    unsafe = httpx.post(gateway.url + CHAT, content=b"{", headers={"x-request-id": "a b\tc"})
    assert unsafe.headers["x-request-id"] != "a b\tc"


def test_translation_refusal_is_400_not_500(gateway: ThreadedServer) -> None:
    # Anthropic cannot produce n > 1 choices: a clear 400 from the translator.
    response = httpx.post(gateway.url + CHAT, headers=AUTH,
                          json={**GOOD_OPENAI, "model": "claude-mock", "n": 2})
    assert_openai_error(response, 400, "")


def test_embeddings_to_anthropic_is_unsupported_400(gateway: ThreadedServer) -> None:
    response = httpx.post(gateway.url + "/v1/embeddings", headers=AUTH,
                          json={"model": "claude-mock", "input": "hello"})
    error = assert_openai_error(response, 400, "does not support /v1/embeddings")
    assert error["code"] == "unsupported_operation"
