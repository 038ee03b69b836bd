"""Bad input gets the right 4xx in the caller's API shape, never a 500 or a traceback."""
from __future__ import annotations

import http.client
import json
from typing import Any

import anthropic
import httpx
import openai
import pytest

from tests.harness import AUTH, TEST_KEY, ThreadedServer
from tests.mock_providers import MockProviderServer

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
                             headers={"content-type": "application/json", **AUTH, **headers})
    assert_openai_error(response, status, fragment)


@pytest.mark.parametrize("name,content,headers,method,status,fragment,anthropic_type", CASES,
                         ids=[case[0] for case in CASES])
def test_anthropic_shape(gateway: ThreadedServer, name: str, content: bytes,
                         headers: dict[str, str], method: str, status: int, fragment: str,
                         anthropic_type: str) -> None:
    content = content.replace(b"gpt-mock", b"claude-mock")
    response = httpx.request(method, gateway.url + MESSAGES, content=content,
                             headers={"content-type": "application/json", "x-api-key": TEST_KEY,
                                      "anthropic-version": "2023-06-01", **headers})
    assert_anthropic_error(response, status, fragment, anthropic_type)


# What a request's body holds is looked at only once its key is checked: without a valid key
# every bad body gets the 401, and the 404 of a model that does not exist is not there to
# tell a caller without a key which models do.
BODY_CASES = [case for case in CASES if case[4] not in (405, 415)]


@pytest.mark.parametrize("credential", [None, "sk-sg-" + "x" * 43], ids=["no key", "unknown key"])
@pytest.mark.parametrize("name,content,headers,method,status,fragment,anthropic_type",
                         BODY_CASES, ids=[case[0] for case in BODY_CASES])
def test_a_bad_body_without_a_valid_key_is_a_401_in_both_shapes(
        gateway: ThreadedServer, credential: str | None, name: str, content: bytes,
        headers: dict[str, str], method: str, status: int, fragment: str,
        anthropic_type: str) -> None:
    given = {} if credential is None else {"authorization": f"Bearer {credential}"}
    response = httpx.request(method, gateway.url + CHAT, content=content,
                             headers={"content-type": "application/json", **given})
    assert_openai_error(response, 401, "API key")
    given = {} if credential is None else {"x-api-key": credential}
    response = httpx.request(method, gateway.url + MESSAGES, content=content,
                             headers={"content-type": "application/json",
                                      "anthropic-version": "2023-06-01", **given})
    assert_anthropic_error(response, 401, "API key", "authentication_error")


def test_a_model_that_exists_and_one_that_does_not_look_the_same_without_a_key(
        gateway: ThreadedServer) -> None:
    answers = []
    for model in ("gpt-mock", "no-such-model"):
        response = httpx.post(gateway.url + CHAT, json={
            "model": model, "messages": [{"role": "user", "content": "x"}]})
        answers.append((response.status_code, response.json()["error"]))
    assert answers[0] == answers[1]
    assert answers[0][0] == 401 and "no-such-model" not in str(answers)


def test_a_large_body_refused_for_its_key_leaves_the_connection_usable(
        gateway: ThreadedServer) -> None:
    # Refused before it was parsed (it is not JSON), the body was read to its end: the client
    # reads the 401 and its next request goes over the same connection.
    host, port = gateway.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.request("POST", CHAT, body=b"{" + b"x" * (4 * 1024 * 1024),
                           headers={"content-type": "application/json"})
        response = connection.getresponse()
        assert response.status == 401 and b"Missing API key" in response.read()
        assert response.getheader("connection") != "close"
        sock = connection.sock
        connection.request("POST", CHAT, body=json.dumps(GOOD_OPENAI),
                           headers={"content-type": "application/json", **AUTH})
        response = connection.getresponse()
        assert response.status == 200, response.read()
        assert json.loads(response.read())["choices"]
        assert connection.sock is sock  # (the same connection, not a new one)
    finally:
        connection.close()


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
                          headers={"content-type": "application/json", **AUTH}, timeout=30)
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
    # A key sent as the request id would be in every log line, record and span of the
    # request: one that looks like a key is replaced.
    for key_like in (TEST_KEY, "SK-proj-abc123", "sk-ant-api03-xyz"):
        keyed = httpx.post(gateway.url + CHAT, content=b"{", headers={"x-request-id": key_like})
        assert keyed.headers["x-request-id"] != key_like
        assert len(keyed.headers["x-request-id"]) == 32


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


def test_count_tokens_of_an_odd_message_is_not_a_500(gateway: ThreadedServer) -> None:
    response = httpx.post(gateway.url + "/v1/messages/count_tokens", json={
        "model": "gpt-mock", "messages": [{"role": "user", "content": "hi", "tool_calls": 1}]},
        headers={"x-api-key": TEST_KEY, "anthropic-version": "2023-06-01"})
    assert response.status_code != 500, response.text
    assert response.status_code in (200, 400), response.text


def test_responses_without_input_go_to_the_provider(gateway: ThreadedServer,
                                                    mock: MockProviderServer) -> None:
    # `input` is optional in the Responses API (a stored prompt, a conversation can stand for
    # it): the provider decides.
    httpx.post(gateway.url + "/v1/responses", headers=AUTH, json={
        "model": "gpt-mock", "prompt": {"id": "pmpt_123", "variables": {"city": "Paris"}}})
    assert any(r["path"].endswith("/responses") for r in mock.requests)
    bad = httpx.post(gateway.url + "/v1/responses", headers=AUTH,
                     json={"model": "gpt-mock", "input": 5})
    assert_openai_error(bad, 400, "'input' is required")


def test_background_responses_are_refused_in_the_callers_shape(gateway: ThreadedServer,
                                                               mock: MockProviderServer) -> None:
    response = httpx.post(gateway.url + "/v1/responses", headers=AUTH, json={
        "model": "gpt-mock", "input": "hi", "background": True})
    error = assert_openai_error(response, 400, "Background responses are not supported")
    assert error["param"] == "background"
    assert mock.requests == []
