"""The auth layer through a real gateway process: keys in every header form, refusals in both
API shapes, the customer, and no attempted key in any log line."""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

import anthropic
import httpx
import openai
import psycopg
import pytest
from psycopg import sql

from gateway import create_app
from gateway.config import ConfigError
from middleware.auth import AuthMiddleware, PostgresKeyStore
from tests.harness import (
    TEST_KEY,
    ThreadedServer,
    free_port,
    mock_config,
    start_cli_gateway,
    stop_process,
    write_config,
)
from tests.middleware.stored_limits import OLD_DOCS, UNREADABLE
from tests.tcp_proxy import TcpProxy

RESTRICTED_KEY = "sk-sg-restricted-key-for-auth-tests-0123456789"
CUSTOMER_KEY = "sk-sg-needs-a-customer-key-0123456789abcdef"
ATTEMPTED = "sk-sg-attempted-" + "Zq7" * 12  # never valid; must never be logged
QUESTION = [{"role": "user", "content": "hello"}]

STACK = """[Middleware(AuthMiddleware, keys=[
    StaticKey('tests', key_env='SG_TEST_KEY'),
    StaticKey('restricted', key_env='SG_RESTRICTED_KEY', allowed_models=('claude-*',)),
    StaticKey('shop', key_env='SG_CUSTOMER_KEY', require_customer=True),
], limits={('customer', 'shop/caf\\u00e9'): Limits(rpm=1)}), Middleware(QuotaMiddleware)]"""


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, mock_url: str):  # type: ignore[no-untyped-def]
    directory = tmp_path_factory.mktemp("auth")
    config = write_config(directory, mock_config(
        mock_url, middleware=STACK, extra="settings = Settings(log_level='debug')"))
    log = directory / "gateway.log"
    process, url = start_cli_gateway(config, log_path=log, env={
        "SG_RESTRICTED_KEY": RESTRICTED_KEY, "SG_CUSTOMER_KEY": CUSTOMER_KEY})
    yield url, log
    stop_process(process)


def chat(url: str, headers: dict[str, str], **body: object) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", headers=headers,
                      json={"model": "gpt-mock", "messages": QUESTION, **body}, timeout=10)


def test_every_key_header_is_accepted(gateway: tuple[str, Path]) -> None:
    url, _ = gateway
    for headers in ({"authorization": f"Bearer {TEST_KEY}"}, {"x-api-key": TEST_KEY},
                    {"x-goog-api-key": TEST_KEY}):
        assert chat(url, headers).status_code == 200, headers


def test_missing_and_unknown_keys_are_401_in_both_shapes(gateway: tuple[str, Path]) -> None:
    url, _ = gateway
    missing = chat(url, {})
    assert missing.status_code == 401
    assert missing.json()["error"]["code"] == "missing_api_key"
    unknown = chat(url, {"authorization": f"Bearer {ATTEMPTED}"})
    assert unknown.status_code == 401 and unknown.json()["error"]["type"] == "authentication_error"
    assert ATTEMPTED not in unknown.text
    claude = anthropic.Anthropic(base_url=url, api_key=ATTEMPTED, max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as refused:
        claude.messages.create(model="claude-mock", max_tokens=5, messages=QUESTION)
    assert refused.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]


def test_a_model_the_key_may_not_use_is_403(gateway: tuple[str, Path]) -> None:
    url, _ = gateway
    client = openai.OpenAI(base_url=url + "/v1", api_key=RESTRICTED_KEY, max_retries=0)
    with pytest.raises(openai.PermissionDeniedError) as refused:
        client.chat.completions.create(model="gpt-mock", messages=QUESTION)
    assert refused.value.code == "model_not_allowed"
    claude = client.chat.completions.create(model="claude-mock", messages=QUESTION)
    assert claude.choices[0].message.content == "Mock reply to: hello"


def test_the_model_list_needs_a_key_and_shows_the_models_it_may_use(
        gateway: tuple[str, Path]) -> None:
    url, _ = gateway
    missing = httpx.get(url + "/v1/models", timeout=10)
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "missing_api_key"
    claude_shaped = httpx.get(url + "/v1/models", headers={
        "x-api-key": ATTEMPTED, "anthropic-version": "2023-06-01"}, timeout=10)
    assert claude_shaped.status_code == 401
    assert claude_shaped.json()["error"]["type"] == "authentication_error"
    every = {model.id for model in openai.OpenAI(
        base_url=url + "/v1", api_key=TEST_KEY, max_retries=0).models.list()}
    assert {"gpt-mock", "claude-mock", "gemini-mock"} <= every
    restricted = openai.OpenAI(base_url=url + "/v1", api_key=RESTRICTED_KEY, max_retries=0)
    assert {model.id for model in restricted.models.list()} == {
        name for name in every if name.startswith("claude-")}
    claude = anthropic.Anthropic(base_url=url, api_key=RESTRICTED_KEY, max_retries=0)
    assert [model.id for model in claude.models.list()] == sorted(
        name for name in every if name.startswith("claude-"))


def test_one_model_needs_a_key_and_is_one_the_key_may_use(gateway: tuple[str, Path]) -> None:
    """`models.retrieve()` shows what the list shows: a model the key may not use is as
    unknown, a 404, in the caller's shape."""
    url, _ = gateway
    assert httpx.get(url + "/v1/models/gpt-mock", timeout=10).status_code == 401
    restricted = openai.OpenAI(base_url=url + "/v1", api_key=RESTRICTED_KEY, max_retries=0)
    assert restricted.models.retrieve("claude-mock").id == "claude-mock"
    with pytest.raises(openai.NotFoundError) as hidden:
        restricted.models.retrieve("gpt-mock")
    assert hidden.value.code == "model_not_found"
    claude = anthropic.Anthropic(base_url=url, api_key=RESTRICTED_KEY, max_retries=0)
    assert claude.models.retrieve("claude-mock").display_name == "claude-mock"
    with pytest.raises(anthropic.NotFoundError):
        claude.models.retrieve("gpt-mock")
    every = openai.OpenAI(base_url=url + "/v1", api_key=TEST_KEY, max_retries=0)
    assert every.models.retrieve("gpt-mock").id == "gpt-mock"


def test_a_key_may_require_the_customer(gateway: tuple[str, Path]) -> None:
    url, _ = gateway
    auth = {"authorization": f"Bearer {CUSTOMER_KEY}"}
    refused = chat(url, auth)
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "customer_required"
    assert chat(url, {**auth, "x-sluicegate-customer": "alice"}).status_code == 200
    assert chat(url, auth, user="bob").status_code == 200
    # A `user` that is no string names nobody: a 400 saying so (it was served without the
    # customer's limits, or told to send the `user` it had sent).
    for user in (123, {"id": "bob"}):
        wrong = chat(url, auth, user=user)
        assert wrong.status_code == 400, wrong.text
        assert wrong.json()["error"]["code"] == "invalid_customer"


def test_the_customer_required_error_names_the_field_of_the_callers_api(
        gateway: tuple[str, Path]) -> None:
    """Anthropic's Messages API has no `user`: an Anthropic caller is told of
    `metadata.user_id`, which the layer reads (it was told to send 'the user field')."""
    url, _ = gateway
    refused = chat(url, {"authorization": f"Bearer {CUSTOMER_KEY}"})
    assert refused.json()["error"]["param"] == "user"
    assert "or the 'user' field." in refused.json()["error"]["message"]
    claude = anthropic.Anthropic(base_url=url, api_key=CUSTOMER_KEY, max_retries=0)
    with pytest.raises(anthropic.BadRequestError) as told:
        claude.messages.create(model="claude-mock", max_tokens=5, messages=QUESTION)
    assert told.value.body == {"type": "error", "error": {
        "type": "invalid_request_error",
        "message": "This API key requires the end user to be named: send the "
                   "'X-Sluicegate-Customer' header or the 'metadata.user_id' field."}}
    answer = claude.messages.create(model="claude-mock", max_tokens=5, messages=QUESTION,
                                    metadata={"user_id": "bob"})
    assert answer.content[0].type == "text"


def test_the_customer_header_is_utf8_else_latin1(gateway: tuple[str, Path]) -> None:
    url, _ = gateway
    auth = {"authorization": f"Bearer {CUSTOMER_KEY}"}
    assert chat(url, auth, user="café €").status_code == 200
    assert chat(url, {**auth, "x-sluicegate-customer": "café €".encode()}).status_code == 200
    # Python's http.client (urllib, requests) and Node's fetch send a str header as Latin-1:
    # b"caf\xe9" is the customer the `user` field names "café". Customer "shop/café" may make
    # one request a minute, so the second and third, however they name it, are refused.
    assert chat(url, {**auth, "x-sluicegate-customer": b"caf\xe9"}).status_code == 200
    for limited in (chat(url, auth, user="café"),
                    chat(url, {**auth, "x-sluicegate-customer": "café".encode()})):
        assert limited.status_code == 429, limited.text
        assert "shop/café" in limited.json()["error"]["message"]


def test_the_attempted_key_never_reaches_a_log_line(gateway: tuple[str, Path]) -> None:
    url, log = gateway
    for headers in ({"authorization": f"Bearer {ATTEMPTED}"}, {"x-api-key": ATTEMPTED},
                    {"authorization": f"Basic {ATTEMPTED}"}):
        assert chat(url, headers).status_code == 401
    client = openai.OpenAI(base_url=url + "/v1", api_key=ATTEMPTED, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model="gpt-mock", messages=QUESTION, stream=True)
    assert chat(url, {"authorization": f"Bearer {TEST_KEY}"}).status_code == 200
    text = log.read_text()
    assert text.strip()  # the log is being written (debug level)
    assert ATTEMPTED not in text and "Zq7Zq7" not in text
    assert TEST_KEY not in text and RESTRICTED_KEY not in text


def test_a_key_pasted_into_a_url_never_reaches_the_access_log(tmp_path: Path,
                                                             mock_url: str) -> None:
    """`serve --access-log` logs each request's line, path included, from hypercorn (no
    layer sees it): a key pasted into the path is redacted there too."""
    config = write_config(tmp_path, mock_config(mock_url, middleware=STACK))
    log = tmp_path / "gateway.log"
    process, url = start_cli_gateway(config, log_path=log, access_log=True, env={
        "SG_RESTRICTED_KEY": RESTRICTED_KEY, "SG_CUSTOMER_KEY": CUSTOMER_KEY})
    try:
        auth = {"authorization": f"Bearer {TEST_KEY}"}
        assert httpx.get(f"{url}/v1/models/{ATTEMPTED}", headers=auth).status_code == 404
        assert httpx.get(f"{url}/admin/keys/{ATTEMPTED}").status_code == 404
        assert httpx.get(f"{url}/{ATTEMPTED}/x").status_code == 404
        assert httpx.get(f"{url}/v1/models", headers=auth).status_code == 200
    finally:
        stop_process(process)
    lines = log.read_text().splitlines()
    access = [json.loads(line)["message"] for line in lines if '"hypercorn.access"' in line]
    assert [line.split('"')[1] for line in access][-4:] == [  # (after the /healthz waits)
        "GET /v1/models/[redacted] 1.1", "GET /admin/keys/[redacted] 1.1",
        "GET /[redacted]/x 1.1", "GET /v1/models 1.1"]
    assert not any("sk-sg-" in line or "Zq7" in line for line in lines)


# -- keys and limits in PostgreSQL -------------------------------------------------------------

DSN = os.environ.get("SLUICEGATE_TEST_PG_DSN", "host=127.0.0.1 port=5432 dbname=test user=postgres")
ADMIN_TOKEN = "auth-layer-admin-" + uuid.uuid4().hex


@pytest.fixture(scope="module")
def pg_gateway(tmp_path_factory: pytest.TempPathFactory, mock_url: str
               ) -> Iterator[tuple[ThreadedServer, str]]:
    schema = "sg_auth_layer_" + uuid.uuid4().hex[:10]
    os.environ["SG_AUTH_LAYER_ADMIN"] = ADMIN_TOKEN
    stack = (f"[Middleware(AuthMiddleware, store=PostgresKeyStore({DSN!r}, schema={schema!r}, "
             f"channel={schema!r}), admin_token_env='SG_AUTH_LAYER_ADMIN'), "
             "Middleware(QuotaMiddleware)]")
    config = write_config(tmp_path_factory.mktemp("auth-pg"), mock_config(
        mock_url, middleware="[]",
        extra="from middleware.auth import PostgresKeyStore\nmiddleware = " + stack))
    try:
        with ThreadedServer(create_app(config)) as server:
            yield server, schema
    finally:
        del os.environ["SG_AUTH_LAYER_ADMIN"]
        with psycopg.connect(DSN, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(
                sql.Identifier(schema)))


def stored_key(server: ThreadedServer, schema: str, limits: object) -> tuple[str, str]:
    """A key made through the admin API whose limits are then written straight to
    PostgreSQL, as an older version wrote them; (plaintext, id)."""
    created = httpx.post(server.url + "/admin/keys", json={"project": "legacy"}, timeout=10,
                         headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
    assert created.status_code == 201, created.text
    with psycopg.connect(DSN, autocommit=True) as conn:
        conn.execute(sql.SQL("UPDATE {} SET limits = %s::jsonb WHERE id = %s").format(
            sql.Identifier(schema, "sluicegate_keys")),
            (json.dumps(limits), created.json()["id"]))
    return created.json()["key"], created.json()["id"]


def test_keys_with_limits_the_previous_version_stored_are_served(
        pg_gateway: tuple[ThreadedServer, str]) -> None:
    server, schema = pg_gateway
    for document in OLD_DOCS:
        plaintext, _ = stored_key(server, schema, document)
        answer = chat(server.url, {"authorization": f"Bearer {plaintext}"})
        assert answer.status_code == 200, (document, answer.text)


def test_a_key_whose_limits_cannot_be_read_is_503_in_both_shapes_until_replaced(
        pg_gateway: tuple[ThreadedServer, str], caplog: pytest.LogCaptureFixture) -> None:
    server, schema = pg_gateway
    fine, _ = stored_key(server, schema, {"rpm": 1000})
    broken, key_id = stored_key(server, schema, UNREADABLE)
    with caplog.at_level(logging.ERROR, logger="sluicegate.auth"):
        refused = chat(server.url, {"authorization": f"Bearer {broken}"})
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "limits_unreadable"
    assert refused.json()["error"]["type"] == "service_unavailable"
    assert any(key_id in r.getMessage() and "cannot be read" in r.getMessage()
               for r in caplog.records)
    claude = anthropic.Anthropic(base_url=server.url, api_key=broken, max_retries=0)
    with pytest.raises(anthropic.InternalServerError) as overloaded:
        claude.messages.create(model="claude-mock", max_tokens=5, messages=QUESTION)
    assert overloaded.value.status_code == 503
    assert overloaded.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]
    assert chat(server.url, {"authorization": f"Bearer {fine}"}).status_code == 200

    repaired = httpx.put(f"{server.url}/admin/limits/key/{key_id}", json={"rpm": 10},
                         headers={"authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=10)
    assert repaired.status_code == 200, repaired.text
    assert chat(server.url, {"authorization": f"Bearer {broken}"}).status_code == 200


class ProxyThread:
    """A `TcpProxy` in front of PostgreSQL on an event loop of its own, so that it answers
    before the gateway starts (its key store connects at startup) and can be switched off
    while the gateway runs: a PostgreSQL outage as the gateway sees it."""

    def __init__(self) -> None:
        self.proxy = TcpProxy(5432, port=free_port())
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        self.run(self.proxy.start())
        return self

    def run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(10)

    def __exit__(self, *exc: object) -> None:
        self.run(self.proxy.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


@pytest.fixture
def pg_behind_a_proxy(tmp_path: Path, mock_url: str, monkeypatch: pytest.MonkeyPatch,
                      request: pytest.FixtureRequest
                      ) -> Iterator[tuple[ThreadedServer, ProxyThread]]:
    """A gateway whose key store reaches PostgreSQL through a relay the test switches off
    (the auth layer's further options: the fixture's param, indirectly)."""
    options = getattr(request, "param", "")
    schema = "sg_auth_outage_" + uuid.uuid4().hex[:10]
    monkeypatch.setenv("SG_AUTH_LAYER_ADMIN", ADMIN_TOKEN)  # (pg_gateway's may be set too)
    try:
        with ProxyThread() as relay:
            dsn = DSN.replace("port=5432", f"port={relay.proxy.port}")
            stack = (f"[Middleware(AuthMiddleware, store=PostgresKeyStore({dsn!r}, "
                     f"schema={schema!r}, channel={schema!r}, connect_timeout_s=1, "
                     f"query_timeout_s=2), admin_token_env='SG_AUTH_LAYER_ADMIN'{options}), "
                     "Middleware(QuotaMiddleware)]")
            config = write_config(tmp_path, mock_config(
                mock_url, middleware="[]",
                extra="from middleware.auth import PostgresKeyStore\nmiddleware = " + stack))
            with ThreadedServer(create_app(config)) as server:
                yield server, relay
    finally:
        with psycopg.connect(DSN, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(
                sql.Identifier(schema)))


@pytest.mark.parametrize("pg_behind_a_proxy", [", cache_ttl_s=0.5, stale_max_s=1"],
                         indirect=True)
def test_stale_max_s_bounds_how_long_a_known_key_works_while_postgresql_is_away(
        pg_behind_a_proxy: tuple[ThreadedServer, ProxyThread]) -> None:
    # (an hour, always: an instance cut off from PostgreSQL served a key revoked elsewhere
    # for that long, whatever the operator wanted)
    server, relay = pg_behind_a_proxy
    key = admin(server, "POST", "/admin/keys", project="stale").json()["key"]
    sdk = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
    sdk.chat.completions.create(model="gpt-mock", messages=QUESTION)
    relay.run(relay.proxy.stop())
    sdk.chat.completions.create(model="gpt-mock", messages=QUESTION)  # from the cache
    time.sleep(1.5)
    with pytest.raises(openai.InternalServerError) as refused:
        sdk.chat.completions.create(model="gpt-mock", messages=QUESTION)
    assert refused.value.status_code == 503


@pytest.mark.parametrize("pg_behind_a_proxy",
                         [", cache_max_keys=50, cache_max_unknown_keys=20"], indirect=True)
def test_made_up_keys_never_push_a_known_key_out_of_the_cache(
        pg_behind_a_proxy: tuple[ThreadedServer, ProxyThread]) -> None:
    """Anyone can send made-up keys: their "no such key" entries are kept apart, so that
    after a flood of them a known key is still served from the cache while PostgreSQL is
    away (it shared one LRU with them, pushed out: a 503)."""
    server, relay = pg_behind_a_proxy
    key = admin(server, "POST", "/admin/keys", project="flooded").json()["key"]
    sdk = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
    sdk.chat.completions.create(model="gpt-mock", messages=QUESTION)
    with httpx.Client(base_url=server.url, timeout=10) as client:
        for n in range(200):  # ten times the unknown keys' room, four times the known's
            made_up = f"sk-sg-made-up-{n:04d}-" + uuid.uuid4().hex
            refused = client.get("/v1/models", headers={"authorization": f"Bearer {made_up}"})
            assert refused.status_code == 401
    relay.run(relay.proxy.stop())
    for _ in range(3):
        sdk.chat.completions.create(model="gpt-mock", messages=QUESTION)  # from the cache


@pytest.mark.parametrize(
    "pg_behind_a_proxy",
    [", cache_max_keys=50, cache_max_customers_without_limits=20"], indirect=True)
def test_made_up_customers_never_push_a_known_key_out_of_the_cache(
        pg_behind_a_proxy: tuple[ThreadedServer, ProxyThread]) -> None:
    """A caller with a valid key can name any number of customers: their "no limits"
    entries are kept apart, so that after a flood of them another known key is still
    served from the cache while PostgreSQL is away (it shared one LRU with them: a 503)."""
    server, relay = pg_behind_a_proxy
    keys = [admin(server, "POST", "/admin/keys", project=project).json()["key"]
            for project in ("quiet", "busy")]
    sdk = openai.OpenAI(base_url=server.url + "/v1", api_key=keys[0], max_retries=0)
    sdk.chat.completions.create(model="gpt-mock", messages=QUESTION)
    with httpx.Client(base_url=server.url, timeout=10) as client:
        for n in range(200):  # ten times the customers' room, four times the keys'
            served = client.post("/v1/chat/completions", json={
                "model": "gpt-mock", "messages": QUESTION, "user": f"made-up-{n:04d}"},
                headers={"authorization": f"Bearer {keys[1]}"})
            assert served.status_code == 200
    relay.run(relay.proxy.stop())
    for _ in range(3):
        sdk.chat.completions.create(model="gpt-mock", messages=QUESTION)  # from the cache


def store_attempts(sent: bytes) -> int:
    """The key store's lookups in what the gateway sent PostgreSQL: queries of its tables,
    and connections its pool opened (the listener's is named apart)."""
    return (sent.count(b"sluicegate_keys") + sent.count(b"sluicegate_subject_limits")
            + sent.count(b"\x00sluicegate-auth\x00"))


@pytest.mark.parametrize("pg_behind_a_proxy", [", lookup_timeout_s=0.5"], indirect=True)
def test_a_hung_postgresql_is_asked_once_while_new_customers_are_served(
        pg_behind_a_proxy: tuple[ThreadedServer, ProxyThread]) -> None:
    """PostgreSQL taking queries and never answering: the first new customer waits for
    `lookup_timeout_s`, then it and the next ones are served as in an outage, without
    another lookup while that one is out (each waited 5 s, the first 15, psycopg cancelling
    the hung query; a refused connection costs nothing). The client's timeout, 4 s, is
    below those stalls."""
    server, relay = pg_behind_a_proxy
    key = admin(server, "POST", "/admin/keys", project="hung").json()["key"]
    sdk = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=4)
    sdk.chat.completions.create(model="gpt-mock", messages=QUESTION, user="known")
    relay.proxy.sent = bytearray()
    relay.proxy.reply_delay_s = 60  # what the gateway sends arrives; no reply comes back
    for n in range(4):
        served = sdk.chat.completions.with_raw_response.create(
            model="gpt-mock", messages=QUESTION, user=f"new-{n}")
        assert served.status_code == 200
        assert served.headers["x-sluicegate-degraded"] == "customer-limits-unknown"
    known = sdk.chat.completions.with_raw_response.create(
        model="gpt-mock", messages=QUESTION, user="known")
    assert known.status_code == 200 and "x-sluicegate-degraded" not in known.headers
    assert store_attempts(relay.proxy.sent) == 1
    relay.run(relay.proxy.stop())  # (the hung lookup ends, and the gateway stops at once)


def test_auth_cache_bounds_that_are_not_whole_numbers_refuse_to_start() -> None:
    for option in ({"cache_max_keys": 0}, {"cache_max_unknown_keys": 1.5},
                   {"cache_max_keys": True}, {"cache_max_customers_without_limits": 0}):
        with pytest.raises(ConfigError, match="must be a whole number, 1 or more"):
            AuthMiddleware(lambda *a: None, keys=[], store=PostgresKeyStore(DSN),
                           **option)  # type: ignore[arg-type]


def test_auth_timings_that_are_not_positive_refuse_to_start() -> None:
    for option in ({"cache_ttl_s": 0}, {"stale_max_s": -1}, {"stale_max_s": float("inf")},
                   {"lookup_timeout_s": 0}):
        with pytest.raises(ConfigError, match="must be a positive number of seconds"):
            AuthMiddleware(lambda *a: None, keys=[], store=PostgresKeyStore(DSN),
                           **option)  # type: ignore[arg-type]


def admin(server: ThreadedServer, method: str, path: str, **body: object) -> httpx.Response:
    return httpx.request(method, server.url + path, json=body or None, timeout=10,
                         headers={"authorization": f"Bearer {ADMIN_TOKEN}"})


def test_a_new_customer_is_served_while_postgresql_is_down_unless_customers_have_limits(
        pg_behind_a_proxy: tuple[ThreadedServer, ProxyThread]) -> None:
    """A known key naming a customer the gateway has not looked up keeps working while
    PostgreSQL is away, under its key's and project's limits, when no customer of the
    project has limits of its own; in a project where some do, this one might be among
    them, and it is refused rather than served without its budget."""
    server, relay = pg_behind_a_proxy
    made = {project: admin(server, "POST", "/admin/keys", project=project).json()
            for project in ("plain", "shop")}
    assert admin(server, "PUT", "/admin/limits/project/plain", rpm=1000).status_code == 200
    assert admin(server, "PUT", "/admin/limits/customer/shop/vip",
                 budgets=[{"limit_usd": "1", "period": "monthly"}]).status_code == 200
    sdks = {project: openai.OpenAI(base_url=server.url + "/v1", api_key=key["key"],
                                   max_retries=0) for project, key in made.items()}
    for sdk in sdks.values():  # known keys (and what their projects' limits are)
        sdk.chat.completions.create(model="gpt-mock", messages=QUESTION, user="known")

    relay.run(relay.proxy.stop())
    served = sdks["plain"].chat.completions.with_raw_response.create(
        model="gpt-mock", messages=QUESTION, user="new-" + uuid.uuid4().hex)
    assert served.status_code == 200
    assert served.headers["x-sluicegate-degraded"] == "customer-limits-unknown"
    assert served.headers["x-ratelimit-limit-requests"] == "1000"  # the project's still apply
    header = sdks["plain"].chat.completions.with_raw_response.create(
        model="gpt-mock", messages=QUESTION, extra_headers={"X-Sluicegate-Customer": "other"})
    assert header.status_code == 200
    with pytest.raises(openai.InternalServerError) as refused:
        sdks["shop"].chat.completions.create(model="gpt-mock", messages=QUESTION,
                                             user="vip")  # its budget is not known here
    assert refused.value.status_code == 503
    assert refused.value.body["code"] == "key_store_unavailable"  # type: ignore[index]
    known = sdks["shop"].chat.completions.with_raw_response.create(
        model="gpt-mock", messages=QUESTION, user="known")  # looked up, so known: no limits
    assert known.status_code == 200 and "x-sluicegate-degraded" not in known.headers

    relay.run(relay.proxy.start())
    deadline = time.monotonic() + 10
    while True:  # back (once a pooled connection cut by the outage was dropped): asked
        with contextlib.suppress(openai.InternalServerError):  # again, known to have none
            again = sdks["plain"].chat.completions.with_raw_response.create(
                model="gpt-mock", messages=QUESTION, user="another-new")
            if "x-sluicegate-degraded" not in again.headers:
                break
        assert time.monotonic() < deadline, "PostgreSQL was never asked again"
        time.sleep(0.2)
