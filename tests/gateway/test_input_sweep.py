"""An adversarial sweep of the whole default stack: bodies, fields, headers, methods, paths and
disconnects, as a hostile or buggy client sends them.

One gateway for the module: auth (a static key, with limits, and keys in PostgreSQL for the
admin API), metering on PostgreSQL, quota on Redis, the cache and failover, over the mock
providers. Every refusal is checked for its status and for the error shape of the API the
caller spoke; no case may get a 500 of the gateway's own (`The gateway failed ...`). What a
provider answers is its own: the mock providers crash (500) on some field types where the
real APIs answer 400, and the gateway relays that as it would relay the 400.
"""
from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
import pytest
from psycopg import sql

from gateway.ingress import MAX_NESTING
from tests.harness import TEST_KEY, ThreadedServer, mock_config, pg_names, serve
from tests.mock_providers import MockProviderServer

PG_DSN = "host=127.0.0.1 port=5432 user=root dbname=test"
ADMIN_TOKEN = "sweep-admin-token-0123456789"
AUTH = {"authorization": f"Bearer {TEST_KEY}"}
ANTHROPIC = {"x-api-key": TEST_KEY, "anthropic-version": "2023-06-01"}
JSON = {"content-type": "application/json"}

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
RESPONSES = "/v1/responses"
EMBEDDINGS = "/v1/embeddings"
MESSAGES = "/v1/messages"
COUNT = "/v1/messages/count_tokens"
ANTHROPIC_PATHS = (MESSAGES, COUNT)

MESSAGES_OPENAI = [{"role": "user", "content": "hi"}]
# path -> (a good body without its model, the models it is swept with)
GOOD: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
    CHAT: ({"messages": MESSAGES_OPENAI}, ("gpt-mock", "claude-mock", "gemini-mock")),
    COMPLETIONS: ({"prompt": "hi"}, ("gpt-mock",)),
    RESPONSES: ({"input": "hi"}, ("gpt-mock",)),
    EMBEDDINGS: ({"input": "hi"}, ("openai-embed", "gemini-embed")),
    MESSAGES: ({"max_tokens": 10, "messages": MESSAGES_OPENAI},
               ("claude-mock", "gpt-mock", "gemini-mock")),
    COUNT: ({"messages": MESSAGES_OPENAI}, ("claude-mock", "gpt-mock", "gemini-mock")),
}


def headers_for(path: str) -> dict[str, str]:
    return {**JSON, **(ANTHROPIC if path in ANTHROPIC_PATHS else AUTH)}


def body_of(path: str, model: str | None = None, **fields: Any) -> bytes:
    base, models = GOOD[path]
    return json.dumps({"model": model or models[0], **base, **fields}).encode()


def body_with(path: str, model: str, fields: dict[str, Any]) -> bytes:
    """The path's good body for `model`, with `fields` (the model among them, maybe)."""
    base, _ = GOOD[path]
    return json.dumps({"model": model, **base, **fields}).encode()


@pytest.fixture(scope="module")
def prefix() -> Iterator[str]:
    """This module's PostgreSQL tables (usage) and schema (keys), dropped afterwards."""
    yield from pg_names("sweep_")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, mock_url: str, prefix: str,
          ) -> Iterator[ThreadedServer]:
    layers = (
        "[Middleware(AuthMiddleware, keys=[StaticKey('tests', key_env='SG_TEST_KEY', "
        "limits=Limits(rpm=10**6, tpm=10**9, budgets=(Budget('100000'),)))], "
        f"store=PostgresKeyStore({PG_DSN!r}, schema={prefix!r}), admin_token_env='SG_SWEEP_ADMIN'), "
        f"Middleware(MeteringMiddleware, store=PostgresUsageStore({PG_DSN!r}, prefix={prefix!r}), "
        "flush_interval_s=0.05, admin_token_env='SG_SWEEP_ADMIN'), "
        "Middleware(QuotaMiddleware, store='redis://127.0.0.1:6379/0', "
        "admin_token_env='SG_SWEEP_ADMIN'), "
        "Middleware(CacheMiddleware, admin_token_env='SG_SWEEP_ADMIN'), "
        "Middleware(FailoverMiddleware, retry=RetryPolicy(max_attempts=1), breaker=NEVER_OPENS)]")
    text = mock_config(mock_url, middleware=layers).replace(
        "from providers import Provider",
        "from providers import Provider\n"
        "from middleware.auth import PostgresKeyStore\n"
        "from middleware.metering import PostgresUsageStore\n"
        f"os.environ.setdefault('SG_SWEEP_ADMIN', {ADMIN_TOKEN!r})")
    with serve(tmp_path_factory.mktemp("sweep"), text) as server:
        yield server


@pytest.fixture(scope="module")
def http(stack: ThreadedServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.url, timeout=30) as client:
        yield client


def assert_refusal(response: httpx.Response, path: str, status: int,
                   fragment: str = "") -> str:
    """A refusal with `status`, in the error shape of the API `path` belongs to; returns its
    message."""
    assert response.status_code == status, (path, response.status_code, response.text[:500])
    return assert_error_shape(response, path, fragment)


def assert_error_shape(response: httpx.Response, path: str, fragment: str = "") -> str:
    assert response.headers["content-type"] == "application/json", response.headers
    assert response.headers.get("x-request-id")
    assert "Traceback" not in response.text
    body = response.json()
    if path in ANTHROPIC_PATHS or path.startswith(MESSAGES):
        assert set(body) == {"type", "error"} and body["type"] == "error", body
        assert set(body["error"]) == {"type", "message"}, body
    else:
        assert set(body) == {"error"}, body
        assert set(body["error"]) == {"message", "type", "param", "code"}, body
    message: str = body["error"]["message"]
    assert fragment in message, (fragment, message)
    return message


def assert_not_the_gateways_failure(response: httpx.Response, path: str, case: Any) -> None:
    """Any status but a 5xx of the gateway's own; an error in the caller's shape."""
    if response.status_code < 400:
        return
    message = assert_error_shape(response, path)
    if response.status_code >= 500:
        # (relayed: the mock providers crash on some field types the real APIs refuse)
        assert message.startswith("Provider '"), (case, response.status_code, message)


# -- bodies ------------------------------------------------------------------------------------

def nested(levels: int) -> bytes:
    return b"[" * levels + b"]" * levels


def with_field(path: str, raw_value: bytes) -> bytes:
    """The path's good body with one more field, `x`, written as `raw_value`."""
    return body_of(path)[:-1] + b', "x": ' + raw_value + b"}"


BODY_CASES: list[tuple[str, Any, dict[str, str], int, str]] = [
    # (name, body (bytes, or a function of the path), extra headers, status, fragment)
    ("empty", b"", {}, 400, "not valid JSON"),
    ("not json", b"{model: gpt}", {}, 400, "not valid JSON"),
    ("a string", b'"hello"', {}, 400, "must be a JSON object"),
    ("a number", b"42", {}, 400, "must be a JSON object"),
    ("null", b"null", {}, 400, "must be a JSON object"),
    ("an array", b"[{}]", {}, 400, "must be a JSON object"),
    ("two objects", lambda p: body_of(p) * 2, {}, 400, "not valid JSON"),
    ("trailing garbage", lambda p: body_of(p) + b"xyz", {}, 400, "not valid JSON"),
    ("a byte order mark", lambda p: b"\xef\xbb\xbf" + body_of(p), {}, 400, "not valid JSON"),
    ("a number too large for a double", lambda p: with_field(p, b"1e400"), {}, 400,
     "not valid JSON"),
    ("NaN", lambda p: with_field(p, b"NaN"), {}, 400, "not valid JSON"),
    ("-Infinity", lambda p: with_field(p, b"-Infinity"), {}, 400, "not valid JSON"),
    ("invalid UTF-8", lambda p: body_of(p).replace(b'"hi"', b'"h\xff\xfei"'), {}, 400,
     "not valid JSON"),
    ("an encoded surrogate", lambda p: body_of(p).replace(b'"hi"', b'"h\xed\xa0\x80i"'), {},
     400, "not valid JSON"),
    ("an escaped lone high surrogate", lambda p: body_of(p).replace(b'"hi"', b'"h\\ud800i"'),
     {}, 400, "not valid JSON"),
    ("an escaped lone low surrogate", lambda p: body_of(p).replace(b'"hi"', b'"h\\udc00"'),
     {}, 400, "not valid JSON"),
    ("deeper than orjson reads", lambda p: with_field(p, nested(1100)), {}, 400,
     "not valid JSON"),
    # Deeper than the gateway writes again (orjson: 254 levels), shallower than it reads.
    ("nested 200 deep", lambda p: with_field(p, nested(200)), {}, 400,
     f"more than {MAX_NESTING} levels deep"),
    ("nested one level too deep", lambda p: with_field(p, nested(MAX_NESTING)), {}, 400,
     f"more than {MAX_NESTING} levels deep"),
    ("a duplicate model key: the last counts", lambda p: body_of(p)[:-1] + b', "model": "x"}',
     {}, 404, "'x' does not exist"),
    ("a model name of 100 kB", lambda p: body_of(p, model="m" * 100_000), {}, 404,
     "does not exist"),
    ("a model name with a newline", lambda p: body_of(p, model="gpt-mock\r\nx-a: b"), {}, 404,
     "does not exist"),
    ("text/plain", lambda p: body_of(p), {"content-type": "text/plain"}, 415,
     "must be application/json"),
    ("a form", b"model=gpt-mock", {"content-type": "application/x-www-form-urlencoded"}, 415,
     "must be application/json"),
    ("a JSON-like media type", lambda p: body_of(p),
     {"content-type": "application/vnd.api+json"}, 415, "must be application/json"),
    ("gzip content encoding", lambda p: __import__("gzip").compress(body_of(p)),
     {"content-encoding": "gzip"}, 415, "Content-Encoding 'gzip' is not supported"),
    ("a plain body labelled br", lambda p: body_of(p), {"content-encoding": "br"}, 415,
     "Content-Encoding 'br' is not supported"),
]


@pytest.mark.parametrize("path", list(GOOD))
@pytest.mark.parametrize("name,content,headers,status,fragment", BODY_CASES,
                         ids=[case[0] for case in BODY_CASES])
def test_a_bad_body_is_refused_in_the_callers_shape(
        http: httpx.Client, path: str, name: str, content: Any, headers: dict[str, str],
        status: int, fragment: str) -> None:
    raw = content(path) if callable(content) else content
    response = http.post(path, content=raw, headers={**headers_for(path), **headers})
    message = assert_refusal(response, path, status, fragment)
    assert len(message) < 1024  # (nothing the caller sent is echoed whole)


@pytest.mark.parametrize("path", list(GOOD))
def test_bodies_just_inside_the_limits_are_served(http: httpx.Client, path: str) -> None:
    """The positive controls of the table above: the same body as it should be."""
    for raw, headers in [
            (with_field(path, nested(MAX_NESTING - 1)), {}),
            (body_of(path), {"content-encoding": "identity"}),
            (body_of(path), {"content-type": "application/json; charset=utf-8"}),
            (body_of(path).replace(b'"hi"', b'"h\\u0000i \\ud83d\\ude00"'), {})]:
        response = http.post(path, content=raw, headers={**headers_for(path), **headers})
        assert response.status_code == 200, (raw[:80], response.text[:300])


@pytest.mark.parametrize("path", list(GOOD))
def test_deep_nesting_in_each_field_a_layer_reads_is_a_400(
        http: httpx.Client, path: str) -> None:
    """Each model family: the field goes through the cache key, the quota's token estimate,
    a translator or a local token count, all of which once failed on it with a 500."""
    _, models = GOOD[path]
    for model in models:
        for field in ("tools", "metadata", "response_format", "messages", "system", "input"):
            for stream in ((False, True) if path not in (EMBEDDINGS, COUNT) else (False,)):
                value: Any = 1
                for _ in range(200):
                    value = [value]
                fields = {field: value, **({"stream": True} if stream else {})}
                response = http.post(path, content=body_of(path, model, **fields),
                                     headers=headers_for(path))
                assert_refusal(response, path, 400, "levels deep")


# -- every field the gateway reads, of every wrong type ------------------------------------------

VALUES: list[Any] = [None, True, -1, 0, 1.5, 10**30, 2**63, "", "x", [], [1], [None], {},
                     {"type": 5}, [{}], [{"type": "text"}]]
FIELDS: dict[str, list[str]] = {
    CHAT: ["model", "messages", "stream", "stream_options", "max_tokens",
           "max_completion_tokens", "n", "stop", "temperature", "top_p", "user", "metadata",
           "response_format", "tools", "tool_choice", "seed", "logprobs", "top_logprobs",
           "parallel_tool_calls", "logit_bias", "functions", "function_call", "modalities",
           "reasoning_effort", "prediction"],
    COMPLETIONS: ["model", "prompt", "stream", "stream_options", "max_tokens", "stop",
                  "temperature", "user", "echo", "suffix"],
    RESPONSES: ["model", "input", "stream", "instructions", "max_output_tokens", "tools",
                "tool_choice", "text", "reasoning", "metadata", "user", "temperature",
                "include", "truncation", "prompt"],
    EMBEDDINGS: ["model", "input", "encoding_format", "user"],
    MESSAGES: ["model", "messages", "system", "max_tokens", "stream", "stop_sequences",
               "temperature", "top_k", "top_p", "tools", "tool_choice", "metadata",
               "thinking"],
    COUNT: ["model", "messages", "system", "tools", "tool_choice", "thinking"],
}
CONTENT_PARTS: list[Any] = [
    5, None, [1], [{}], [{"type": 5}], [{"type": "text"}], [{"type": "text", "text": 5}],
    [{"type": "image_url"}], [{"type": "image_url", "image_url": 5}],
    [{"type": "image_url", "image_url": {"url": 5}}],
    [{"type": "image_url", "image_url": {"url": "data:nothing"}}],
    [{"type": "image"}], [{"type": "image", "source": 5}],
    [{"type": "image", "source": {"type": "url", "url": 5}}],
    [{"type": "tool_result"}], [{"type": "tool_result", "tool_use_id": 5, "content": [5]}],
    [{"type": "tool_use", "id": 5, "name": 5, "input": 5}],
]
MESSAGE_SHAPES: list[Any] = [
    [1], [None], ["hi"], [{}], [{"role": 1, "content": "x"}], [{"role": "user"}],
    [{"role": "weird", "content": "x"}], [{"role": "system", "content": 5}],
    [{"role": "assistant", "content": "x", "tool_calls": 5}],
    [{"role": "assistant", "tool_calls": [{"id": 1, "type": "function", "function": 5}]}],
    [{"role": "assistant", "tool_calls": [{"id": "a", "type": "function",
                                           "function": {"name": "f", "arguments": "{bad"}}]}],
    [{"role": "tool", "tool_call_id": 5, "content": 5}],
    *[[{"role": "user", "content": parts}] for parts in CONTENT_PARTS],
]
TOOLS: list[Any] = [[5], [{"type": "function"}], [{"type": "function", "function": 5}],
                    [{"type": "function", "function": {"name": 5, "parameters": 5}}],
                    [{"name": 5}], [{"name": "f", "input_schema": 5}]]
TOOL_CHOICES: list[Any] = ["auto", "required", "any", "bogus", {"type": "function"},
                           {"type": "function", "function": 5}, {"type": "tool", "name": 5},
                           {"type": "auto", "disable_parallel_tool_use": 5}]
MORE_VALUES = {"messages": MESSAGE_SHAPES, "tools": TOOLS, "tool_choice": TOOL_CHOICES,
               "system": [[5], [{"type": "text", "text": 5}]],
               "stop": [[5], ["a"] * 10, ["x" * 10_000]],
               "stop_sequences": [[5], ["a"] * 10],
               "input": [[5], [{"role": "user", "content": 5}],
                         [{"role": "user", "content": [{"type": "input_text", "text": 5}]}]]}


def field_cases() -> list[tuple[str, str, str]]:
    return [(path, model, field) for path, (_, models) in GOOD.items() for model in models
            for field in FIELDS[path]]


@pytest.mark.parametrize("path,model,field", field_cases(),
                         ids=[f"{p}-{m}-{f}" for p, m, f in field_cases()])
def test_a_field_of_any_type_is_never_a_500_of_the_gateways(
        http: httpx.Client, path: str, model: str, field: str) -> None:
    streams = (False,) if path in (EMBEDDINGS, COUNT) or field == "stream" else (False, True)
    for value in VALUES + MORE_VALUES.get(field, []):
        for stream in streams:
            fields = {field: value, **({"stream": True} if stream else {})}
            response = http.post(path, content=body_with(path, model, fields),
                                 headers=headers_for(path))
            assert_not_the_gateways_failure(response, path, (field, value, stream))


# -- headers -----------------------------------------------------------------------------------

OTHER_KEY = "sk-sg-" + "z" * 43
KEY = (b"authorization", f"Bearer {TEST_KEY}".encode())
HEADER_CASES: list[tuple[str, list[tuple[bytes, bytes]], int, str]] = [
    # (name, headers beside content-type, status, fragment of the refusal)
    ("Bearer without a key", [(b"authorization", b"Bearer")], 401, "Missing API key"),
    ("Basic", [(b"authorization", b"Basic " + TEST_KEY.encode())], 401, "Missing API key"),
    ("a key without a scheme", [(b"authorization", TEST_KEY.encode())], 401, "Missing API key"),
    ("a lower-case scheme", [(b"authorization", b"bearer " + TEST_KEY.encode())], 200, ""),
    ("two spaces before the key", [(b"authorization", b"Bearer  " + TEST_KEY.encode())], 200,
     ""),
    ("UTF-8 in the key", [(b"authorization", b"Bearer sk-sg-\xc3\xa9" + b"a" * 40)], 401,
     "Invalid API key"),
    ("Latin-1 bytes in the key", [(b"authorization", b"Bearer sk-sg-\xff\xfe")], 401,
     "Invalid API key"),
    ("an 8 kB key", [(b"authorization", b"Bearer sk-sg-" + b"a" * 8000)], 401,
     "Invalid API key"),
    ("the key twice", [(b"authorization", b"Bearer " + TEST_KEY.encode())] * 2, 200, ""),
    ("an unknown key first", [(b"authorization", b"Bearer " + OTHER_KEY.encode()),
                              (b"authorization", b"Bearer " + TEST_KEY.encode())], 401,
     "Invalid API key"),
    ("x-goog-api-key", [(b"x-goog-api-key", TEST_KEY.encode())], 200, ""),
    ("a customer in UTF-8", [KEY, (b"x-sluicegate-customer", "cliënt".encode())],
     200, ""),
    ("a customer in Latin-1", [KEY, (b"x-sluicegate-customer", b"cli\xebnt")], 200,
     ""),
    ("an empty customer", [KEY, (b"x-sluicegate-customer", b"")], 200, ""),
    ("a customer of 5000 characters", [KEY, (b"x-sluicegate-customer", b"c" * 5000)],
     400, "customer id"),
    ("a customer with a control character",
     [KEY, (b"x-sluicegate-customer", b"c\x7f")], 400, "customer id"),
    ("two customers", [KEY, (b"x-sluicegate-customer", b"a"),
                       (b"x-sluicegate-customer", b"b")], 200, ""),
    *[(f"cache-control: {value!r}", [KEY, (b"cache-control", value)], 200, "")
      for value in (b"no-cache", b"no-store", b"max-age=abc", b"max-age=-1",
                    b"max-age=99999999999999999999999", b"s-maxage=", b",,,",
                    b'no-cache="x", max-age="5"', "max-age=５".encode(), b"max-age=\xff",
                    b"min-fresh=abc, max-stale=xyz")],
    ("cache-control: only-if-cached", [KEY, (b"cache-control", b"only-if-cached"),
                                       (b"x-sluicegate-cache-namespace", b"never-stored")],
     504, "only-if-cached"),
    *[(f"namespace {value[:20]!r}", [KEY, (b"x-sluicegate-cache-namespace", value)],
       400, "x-sluicegate-cache-namespace")
      for value in (b"n" * 5000, "名前".encode(), b"n\xff", b"n\x01")],
    *[(f"namespace {value!r}", [KEY, (b"x-sluicegate-cache-namespace", value)],
       200, "") for value in (b"", b"{a}:b*?[c]", b"a b")],
    *[(f"{name.decode()} of Latin-1 bytes", [KEY, (name, b"\xff\xfe")], 200, "")
      for name in (b"x-request-id", b"anthropic-version", b"anthropic-beta", b"traceparent",
                   b"user-agent", b"accept", b"x-sluicegate-tag-team", b"idempotency-key",
                   b"openai-organization")],
]


@pytest.mark.parametrize("name,headers,status,fragment", HEADER_CASES,
                         ids=[case[0] for case in HEADER_CASES])
def test_odd_headers(http: httpx.Client, name: str, headers: list[tuple[bytes, bytes]],
                     status: int, fragment: str) -> None:
    sent = [(b"content-type", b"application/json"), *headers]
    for stream in (False, True):
        response = http.post(CHAT, content=body_of(CHAT, stream=stream), headers=sent)
        if status == 200:
            assert response.status_code == 200, response.text[:300]
        else:
            assert_refusal(response, CHAT, status, fragment)


# -- methods and paths -------------------------------------------------------------------------

@pytest.mark.parametrize("path", list(GOOD))
@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS", "PUT", "PATCH", "DELETE"])
def test_another_method_on_a_post_endpoint_is_405(http: httpx.Client, path: str,
                                                  method: str) -> None:
    response = http.request(method, path, headers=headers_for(path))
    assert response.status_code == 405 and response.headers["allow"] == "POST"
    if method != "HEAD":
        assert_refusal(response, path, 405, f"Method {method} is not allowed")


PATH_CASES = [
    ("/v1/chat/completions/", 404), ("/v1/messages/", 404), ("//v1/chat/completions", 404),
    ("/v1//chat/completions", 404), ("/V1/CHAT/COMPLETIONS", 404), ("/v1/chat/%zz", 404),
    ("/v1/%FF", 404), ("/v1/chat/completions%00", 404), ("/v1/../v1/chat/completions", 404),
    ("/v1/images/generations", 404), ("/v1/messages/batches", 404), ("/v1/models/", 404),
    # hypercorn decodes the path: these are the endpoints themselves
    ("/v1/chat%2Fcompletions", 200), ("/v1/%63hat/completions", 200),
    ("/v1/chat/completions?a=%zz%ff&&=", 200),
]


@pytest.mark.parametrize("path,status", PATH_CASES, ids=[case[0] for case in PATH_CASES])
def test_odd_paths(stack: ThreadedServer, path: str, status: int) -> None:
    api = MESSAGES if "/messages" in path else CHAT
    # (raw, as sent: httpx would normalise some of them)
    answer = raw_exchange(stack.port, request_bytes(path, body_of(api), headers_for(api)))
    response = httpx.Response(answer.status, headers=answer.headers, content=answer.body)
    if status == 200:
        assert answer.status == 200, answer.body[:300]
    else:
        assert_refusal(response, api, status, "Unknown path")
        assert b"\x00" not in answer.body


@pytest.mark.parametrize("path", ["/v1beta/models/gemini-mock:generateContent",
                                  "/v1beta/models/gemini-mock:streamGenerateContent?alt=sse",
                                  "/v1/models/gemini-mock:embedContent", "/v1beta/models"])
def test_a_gemini_path_is_a_404_in_geminis_shape(http: httpx.Client, path: str) -> None:
    """The gateway serves no Gemini ingress; Gemini's SDK, pointed at it, reads its 404."""
    response = http.post(path, json={"contents": [{"parts": [{"text": "hi"}]}]},
                         headers={"x-goog-api-key": TEST_KEY})
    assert response.status_code == 404 and response.headers["x-request-id"]
    error = response.json()["error"]
    assert set(response.json()) == {"error"} and set(error) == {"code", "message", "status"}
    assert (error["code"], error["status"]) == (404, "NOT_FOUND")
    assert error["message"].startswith("Unknown path '/v")


ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.mark.parametrize("path", ["/admin/keys", "/admin/limits", "/admin/usage",
                                  "/admin/usage/key/x", "/admin/cache/invalidate"])
def test_admin_without_the_admin_token_is_401(http: httpx.Client, path: str) -> None:
    method = "POST" if path.endswith("invalidate") else "GET"
    for headers in ([], [(b"authorization", b"Bearer wrong-token-0123456789")],
                    [(b"authorization", b"Bearer \xff\xfe")], [KEY],
                    [(b"authorization", b"Basic YWRtaW46YWRtaW4=")]):
        response = http.request(method, path, headers=headers, json={"project": "p"})
        assert response.status_code == 401, (path, headers, response.text)
        assert "error" in response.json() and "Traceback" not in response.text
        assert ADMIN_TOKEN not in response.text and TEST_KEY not in response.text


def test_admin_refuses_a_key_too_deeply_nested_to_list_again(http: httpx.Client) -> None:
    """Stored, the key's metadata made every listing of keys a 500 (orjson writes 254
    levels, reads 1024)."""
    metadata = b'{"project": "sweep", "metadata": {"a": ' + nested(300) + b"}}"
    response = http.post("/admin/keys", content=metadata, headers={**ADMIN, **JSON})
    assert_refusal(response, "/admin/keys", 400, "levels deep")
    assert response.json()["error"]["code"] == "invalid_json"
    listed = http.get("/admin/keys", headers=ADMIN)
    assert listed.status_code == 200, listed.text
    assert all(key["project"] != "sweep" for key in listed.json()["data"])


ADMIN_CASES: list[tuple[str, str, bytes, int, str]] = [
    ("POST", "/admin/keys", b"{nope", 400, "not valid JSON"),
    ("POST", "/admin/keys", b"[]", 400, "JSON object"),
    ("POST", "/admin/keys", b"", 400, "not valid JSON"),
    ("POST", "/admin/keys", b'{"project": 5}', 400, "project"),
    ("POST", "/admin/keys", b'{"project": "p\\u0000"}', 400, "project"),
    ("POST", "/admin/keys", b'{"project": "p", "limits": {"budgets": 5}}', 400, "limits"),
    ("POST", "/admin/keys", b'{"project": "p", "expires_at": 1e300}', 400, "expires_at"),
    ("POST", "/admin/keys", b'{"project": "p\xff"}', 400, "not valid JSON"),
    ("PATCH", "/admin/keys/nope", b'{"disabled": "yes"}', 400, "disabled"),
    ("GET", "/admin/keys?project=%FF%00", b"", 400, "project"),
    ("PUT", "/admin/limits/planet/x", b'{"rpm": 5}', 400, "kind"),
    ("PUT", "/admin/limits/project/p", b'{"rpm": 18446744073709551615}', 400, "rpm"),
    ("GET", "/admin/keys/%FF%FE", b"", 404, "No key"),
    ("DELETE", "/admin/keys", b"", 405, "not allowed"),
    ("GET", "/admin/nothing", b"", 404, "Unknown admin path"),
]


@pytest.mark.parametrize("method,path,content,status,fragment", ADMIN_CASES,
                         ids=[f"{case[0]} {case[1]} {case[2][:20]!r}" for case in ADMIN_CASES])
def test_admin_bad_input(http: httpx.Client, method: str, path: str, content: bytes,
                         status: int, fragment: str) -> None:
    response = http.request(method, path, content=content, headers={**ADMIN, **JSON})
    assert_refusal(response, path, status, fragment)
    listed = http.get("/admin/keys?project=p", headers=ADMIN)
    assert listed.status_code == 200, listed.text


def test_quota_spend_of_an_unknown_kind_is_a_404(http: httpx.Client) -> None:
    # It answered 200, every period's spend null.
    response = http.get("/admin/usage/planet/x", headers=ADMIN)
    assert response.status_code == 404, response.text
    assert "key, project, customer, model, global" in response.json()["error"]["message"]
    assert http.get("/admin/usage/key/x", headers=ADMIN).status_code == 200


EARLY_REFUSALS = [
    ("PUT", MESSAGES, {**ANTHROPIC, **JSON}, 405),
    ("POST", CHAT, {**AUTH, "content-type": "text/plain"}, 415),
    ("POST", CHAT, {**AUTH, **JSON, "content-encoding": "gzip"}, 415),
    ("POST", "/v1/nothing-here", {**AUTH, **JSON}, 404),
    ("POST", "/healthz", JSON, 405),
    ("POST", "/admin/keys", JSON, 401),
    ("POST", "/admin/nothing", {**ADMIN, **JSON}, 404),
]


@pytest.mark.parametrize("method,path,headers,status", EARLY_REFUSALS,
                         ids=[f"{case[0]} {case[1]} {case[3]}" for case in EARLY_REFUSALS])
def test_a_refusal_before_the_body_arrived_leaves_the_connection_usable(
        stack: ThreadedServer, method: str, path: str, headers: dict[str, str],
        status: int) -> None:
    """Refused from its headers alone, a request's body is still read to its end before the
    answer: answered first, hypercorn never recycled the connection once the body came, and
    the client's next request on it went unanswered."""
    body = body_of(CHAT)
    head = request_bytes(path, None, headers, **{"content-length": str(len(body))})
    with socket.create_connection(("127.0.0.1", stack.port), timeout=10) as sock:
        sock.sendall(head.replace(b"POST ", method.encode() + b" ", 1))
        time.sleep(0.2)  # (time for an answer that does not wait for the body)
        sock.sendall(body)
        first = read_answer(sock)
        assert first.status == status, first.body
        sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: sweep\r\n\r\n")
        assert read_answer(sock).status == 200


# -- disconnects -------------------------------------------------------------------------------

class Answer:
    def __init__(self, raw: bytes) -> None:
        head, _, self.body = raw.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        self.status = int(lines[0].split(b" ")[1])
        self.headers = [(name, value) for name, _, value in
                        (line.partition(b": ") for line in lines[1:])]


def request_bytes(path: str, body: bytes | None, headers: dict[str, str],
                  **more: str) -> bytes:
    fields = {"host": "sweep", **headers, **more}
    if body is not None and "transfer-encoding" not in fields:
        fields.setdefault("content-length", str(len(body)))
    head = "".join(f"{name}: {value}\r\n" for name, value in fields.items())
    return f"POST {path} HTTP/1.1\r\n{head}\r\n".encode("latin-1") + (body or b"")


def raw_exchange(port: int, data: bytes) -> Answer:
    """Sends `data` on a new connection and reads one answer with a Content-Length."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(data)
        return read_answer(sock)


def read_answer(sock: socket.socket) -> Answer:
    """One answer with a Content-Length (a socket timeout fails the test)."""
    received = b""
    while True:
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed: {received!r}"
        received += chunk
        head, found, body = received.partition(b"\r\n\r\n")
        if found:
            length = next(int(line.split(b":")[1]) for line in head.lower().split(b"\r\n")
                          if line.startswith(b"content-length:"))
            if len(body) >= length:
                return Answer(received)


def usage_rows(prefix: str) -> dict[str, tuple[Any, ...]]:
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        try:
            found = conn.execute(sql.SQL(
                "SELECT request_id, status, client_disconnected, stream FROM {}").format(
                    sql.Identifier(f"{prefix}_events"))).fetchall()
        except psycopg.errors.UndefinedTable:
            return {}
    return {row[0].split(".")[0]: row[1:] for row in found}


def wait_for_row(prefix: str, request_id: str, timeout_s: float = 15) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while request_id not in (rows := usage_rows(prefix)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return rows


STREAMS = [(CHAT, "gpt-mock"), (CHAT, "claude-mock"), (CHAT, "gemini-mock"),
           (COMPLETIONS, "gpt-mock"), (RESPONSES, "gpt-mock"), (MESSAGES, "claude-mock"),
           (MESSAGES, "gpt-mock"), (MESSAGES, "gemini-mock")]


@pytest.mark.parametrize("path,model", STREAMS, ids=[f"{p}-{m}" for p, m in STREAMS])
def test_a_disconnect_mid_stream_is_metered_and_mid_body_is_not(
        stack: ThreadedServer, mock: MockProviderServer, prefix: str, path: str,
        model: str) -> None:
    tag = uuid.uuid4().hex[:12]
    body = body_of(path, model, stream=True)
    # A stream still going when the client leaves: 1 character per chunk, 50 ms apart.
    slow = {"chunk_delay_s": 0.05, "chunk_chars": 1}
    before = {name: getattr(mock.config, name) for name in slow}
    mock.config.update(slow)
    try:
        disconnect_then_request(stack.port, prefix, path, model, body, tag)
    finally:
        mock.config.update(before)


def disconnect_then_request(port: int, prefix: str, path: str, model: str, body: bytes,
                            tag: str) -> None:
    half = f"half{tag}"
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request_bytes(path, body, headers_for(path), **{
            "x-request-id": half, "content-length": str(len(body) + 100)}))
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request_bytes(path, None, headers_for(path), **{
            "x-request-id": half + "c", "transfer-encoding": "chunked"}) +
            b"10\r\n" + body[:16] + b"\r\n")
    gone = f"gone{tag}"
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        # (never an answer from the cache, which could arrive whole before the client left)
        sock.sendall(request_bytes(path, body, headers_for(path), **{
            "x-request-id": gone, "cache-control": "no-cache, no-store"}))
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    rows = wait_for_row(prefix, gone)
    assert rows.get(gone) == (200, True, True), rows.get(gone)
    # After it, a whole request: its row comes after any the half-sent ones would have made.
    after = f"after{tag}"
    answer = raw_exchange(port, request_bytes(path, body_of(path, model), headers_for(
        path), **{"x-request-id": after}))
    assert answer.status == 200, answer.body[:300]
    rows = wait_for_row(prefix, after)
    assert after in rows and half not in rows and half + "c" not in rows
