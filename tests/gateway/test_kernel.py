"""The kernel driven directly over ASGI: disconnects, lifespan and settings."""
from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from psycopg import sql

from gateway import create_app
from gateway.config import ConfigError, load_config
from tests.harness import ThreadedServer, free_port, mock_config, write_config
from tests.tcp_proxy import TcpProxy, relay_in_thread


async def call(app: Any, scope: dict[str, Any], messages: list[dict[str, Any]]) -> list[Any]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


def http_scope(path: str = "/v1/chat/completions") -> dict[str, Any]:
    return {"type": "http", "method": "POST", "path": path, "root_path": "", "query_string": b"",
            "headers": [(b"content-type", b"application/json")]}


async def test_disconnect_while_reading_the_body_sends_nothing(tmp_path: Path) -> None:
    app = create_app(write_config(tmp_path, mock_config("http://127.0.0.1:9")))
    sent = await call(app, http_scope(), [
        {"type": "http.request", "body": b'{"model":', "more_body": True},
        {"type": "http.disconnect"}])
    assert sent == []
    await app.shutdown()


async def test_lifespan_starts_and_stops_every_component(tmp_path: Path) -> None:
    app = create_app(write_config(tmp_path, mock_config("http://127.0.0.1:9")))
    sent = await call(app, {"type": "lifespan"},
                      [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
    assert [m["type"] for m in sent] == ["lifespan.startup.complete",
                                         "lifespan.shutdown.complete"]
    passthrough = app.components[-1]
    assert all(adapter._session is None for adapter in passthrough.providers.values())


@pytest.mark.parametrize("settings,fragment", [
    ("Settings(max_body_bytes='16MB')", "max_body_bytes must be a positive number"),
    ("Settings(log_level='verbose')", "log_level must be one of"),
])
def test_bad_settings_are_one_sentence(tmp_path: Path, settings: str, fragment: str) -> None:
    path = write_config(tmp_path, mock_config("http://127.0.0.1:9", extra=f"settings = {settings}"))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert fragment in str(caught.value) and str(caught.value).startswith(str(path))


END_WATCHER = '''
from gateway.context import find_request_context


class EndWatcher:
    """Adds two end-of-request hooks: one that fails, then one that notes the outcome."""

    def __init__(self, app):
        self.app = app
        self.seen = []

    def __call__(self, scope, receive, send):
        ctx = find_request_context(scope)
        if ctx is not None:
            ctx.on_end = [*(ctx.on_end or []), self.fail, self.note]
        return self.app(scope, receive, send)

    def fail(self, ctx):
        raise RuntimeError("this hook fails")

    def note(self, ctx):
        self.seen.append((ctx.request_id, ctx.status, ctx.error_type))


middleware = [Middleware(EndWatcher)]
'''


async def test_end_hooks_see_the_final_outcome_and_a_failing_one_harms_nothing(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The kernel runs a request's `on_end` hooks after the response, with the status it
    sent, even when the response is an error it rendered for a failure further down; a hook
    that raises is logged and the next hook still runs."""
    app = create_app(write_config(tmp_path, mock_config("http://127.0.0.1:9", middleware="[]",
                                                        extra=END_WATCHER)))
    body = b'{"model":"gpt-mock","messages":[{"role":"user","content":"hi"}]}'
    scope = {**http_scope(), "headers": [(b"content-type", b"application/json"),
                                         (b"x-request-id", b"req-end-1")]}
    sent = await call(app, scope, [{"type": "http.request", "body": body}])
    await app.shutdown()
    status = sent[0]["status"]
    assert status >= 500  # nothing listens on port 9: the kernel renders the upstream error
    watcher = app.components[0]
    assert watcher.seen == [("req-end-1", status, watcher.seen[0][2])]
    assert watcher.seen[0][2]  # the error's type, as the response body names it
    assert "an end-of-request hook failed for request req-end-1" in caplog.text


HUNG_CHECK = '''
import asyncio


class HungCheck:
    """A layer whose store never answers its readiness check; counts the checks begun."""

    def __init__(self, app):
        self.app = app
        self.checks_begun = 0

    def __call__(self, scope, receive, send):
        return self.app(scope, receive, send)

    async def check_ready(self):
        self.checks_begun += 1
        await asyncio.Event().wait()
'''


@pytest.fixture
def postgres_relay() -> Iterator[TcpProxy]:
    """A relay to PostgreSQL (on a loop of its own) whose replies can be held back."""
    with relay_in_thread(5432, port=free_port()) as proxy:
        yield proxy


def test_a_hung_postgresql_leaves_the_gateway_ready_and_says_which_stores_lack_it(
        tmp_path: Path, mock_url: str, postgres_relay: TcpProxy) -> None:
    # PostgreSQL accepting connections and never answering (a partition that drops packets)
    # made /readyz a 503 after 16-19 s, "error: TimeoutError" for every layer using it, while
    # the gateway served: the checks ran one after another, each waiting for psycopg to
    # cancel its query, the usage store's behind the writer's batch. Kubernetes would have
    # taken every pod out of the Service. A refused connection was already "degraded".
    name = "sg_kernel_ready_" + uuid.uuid4().hex[:10]
    dsn = f"host=127.0.0.1 port={postgres_relay.port} user=root dbname=test"
    stack = (f"[Middleware(AuthMiddleware, store=PostgresKeyStore({dsn!r}, schema={name!r}, "
             f"channel={name!r}), keys=[StaticKey('tests', key_env='SG_TEST_KEY')]), "
             f"Middleware(MeteringMiddleware, store=PostgresUsageStore({dsn!r}, "
             f"prefix={name!r}), journal_dir={str(tmp_path / 'journal')!r}), "
             f"Middleware(QuotaMiddleware, ledger=PostgresSpendLedger({dsn!r}, "
             f"table={name + '_spend'!r})), Middleware(HungCheck)]")
    config = write_config(tmp_path, mock_config(mock_url, middleware="[]", extra=(
        "from middleware.auth import PostgresKeyStore\n"
        "from middleware.metering import PostgresUsageStore\n"
        "from middleware.quota import PostgresSpendLedger\n"
        f"{HUNG_CHECK}\nmiddleware = {stack}")))
    try:
        with ThreadedServer(create_app(config)) as server:
            postgres_relay.reply_delay_s = 3600
            probes = [httpx.get(server.url + "/readyz", timeout=60) for _ in range(3)]
            postgres_relay.reply_delay_s = 0
            hung = next(layer for layer in server.app.components
                        if type(layer).__name__ == "HungCheck")
    finally:
        with psycopg.connect("host=127.0.0.1 port=5432 user=root dbname=test",
                             autocommit=True) as conn:
            for table in ("events", "rollups", "schema_version", "spend"):
                conn.execute(sql.SQL("DROP TABLE IF EXISTS {} CASCADE").format(
                    sql.Identifier(f"{name}_{table}")))
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(
                sql.Identifier(name)))
    for probe in probes:
        assert probe.status_code == 200, probe.text
        checks = probe.json()["checks"]
        assert checks.pop("HungCheck") == "degraded: no answer within 3 s"
        assert checks.pop("usage_journal") == "ok"
        assert sorted(checks) == ["auth_keys_postgres", "spend_ledger", "usage_postgres"]
        assert all(value.startswith("degraded: ") and "TimeoutError" in value
                   for value in checks.values()), checks
    assert hung.checks_begun == 1  # one check in flight, awaited again by each probe
