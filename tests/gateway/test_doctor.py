"""`sluicegate doctor`: stores (real Redis and PostgreSQL), pgvector and provider probes (the
mock providers), run as the CLI subprocess; redaction, exit statuses and a clean shutdown."""
from __future__ import annotations

import asyncio
import http.server
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
from psycopg import sql

from gateway.config import GatewayConfig
from gateway.doctor import FAIL, OK, Scrubber, diagnose, redact_target, render_table
from tests.harness import REPO, free_port, mock_config, write_config
from tests.mock_providers import MockConfig, MockProviderServer

PG_DSN = "host=127.0.0.1 port=5432 user=root dbname=test"
PG_PASSWORD = "pg-doctor-PASSWORD-4242"  # the server trusts 127.0.0.1: accepted, never checked
REDIS_PASSWORD = "redis-doctor-PASSWORD-4343"
PROVIDER_SECRET = "sk-doctor-SECRET-provider-0123456789abcdef"
PROVIDERS = ("openai", "azure", "anthropic", "gemini")
MODELS_PATHS = {"openai": "/openai/v1/models", "azure": "/azure/openai/models",
                "anthropic": "/anthropic/v1/models", "gemini": "/gemini/v1beta/models"}
KEY_HEADERS = {"openai": ("authorization", f"Bearer {PROVIDER_SECRET}"),
               "azure": ("api-key", PROVIDER_SECRET),
               "anthropic": ("x-api-key", PROVIDER_SECRET),
               "gemini": ("x-goog-api-key", PROVIDER_SECRET)}


def run_doctor(config: Path, *args: str, env: dict[str, str] | None = None
               ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", "doctor", "--config", str(config), *args],
        cwd=REPO, text=True, capture_output=True, check=False, timeout=120,
        env={**os.environ, "MOCK_PROVIDER_KEY": PROVIDER_SECRET, **(env or {})})


def rows_of(result: subprocess.CompletedProcess[str]) -> dict[str, dict[str, str]]:
    rows = orjson.loads(result.stdout)
    assert isinstance(rows, list)
    for row in rows:
        assert set(row) == {"check", "target", "status", "detail"}, row
    by_check = {row["check"]: row for row in rows}
    assert len(by_check) == len(rows), "two rows with the same check"
    return by_check


def assert_no_secret(result: subprocess.CompletedProcess[str], *secrets: str) -> None:
    for secret in (PROVIDER_SECRET, PG_PASSWORD, REDIS_PASSWORD, *secrets):
        assert secret not in result.stdout and secret not in result.stderr, secret


def assert_clean_exit(result: subprocess.CompletedProcess[str]) -> None:
    """Nothing outlived the shutdown: no leftover-task row, no unclosed session or
    destroyed task reported by asyncio, no traceback."""
    for text in ("Unclosed", "Task was destroyed", "Traceback", "never awaited"):
        assert text not in result.stderr, result.stderr
    assert '"shutdown' not in result.stdout and "\nshutdown" not in result.stdout


@pytest.fixture
def prefix() -> Iterator[str]:
    """A name for this test's PostgreSQL tables and schema (dropped afterwards)."""
    name = f"doctor_{uuid.uuid4().hex[:10]}"
    yield name
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        tables = conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public' "
                              "AND tablename LIKE %s", (name + "%",)).fetchall()
        for (table,) in tables:
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {} CASCADE").format(
                sql.Identifier(table)))
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


def full_stack(prefix: str, *, quota_store: str = "redis://127.0.0.1:6379/0",
               vector_table: str | None = None) -> str:
    """Layers with every kind of store: Redis (quota, cache hot tier, failover health) and
    PostgreSQL (keys, spend ledger, cache warm tier, pgvector), the DSNs carrying a password."""
    pg_url = f"postgresql://root:{PG_PASSWORD}@127.0.0.1:5432/test"
    pg_kv = f"{PG_DSN} password='{PG_PASSWORD}'"
    return f'''
from middleware.auth import PostgresKeyStore
from middleware.cache.semantic import HttpEmbedder, PgVectorIndex, SemanticCache
from middleware.cache.stores import PostgresCacheStore, RedisCacheStore, TieredCacheStore
from middleware.failover.shared import RedisHealth
from middleware.quota.ledger import PostgresSpendLedger
middleware = [
    Middleware(AuthMiddleware, keys=[StaticKey('tests', key_env='SG_TEST_KEY')],
               store=PostgresKeyStore({pg_url!r}, schema={prefix!r})),
    Middleware(MeteringMiddleware),
    Middleware(QuotaMiddleware, store={quota_store!r},
               ledger=PostgresSpendLedger({pg_kv!r}, table="{prefix}_spend")),
    Middleware(CacheMiddleware, store=TieredCacheStore(
        RedisCacheStore("redis://127.0.0.1:6379/0", prefix="{{{prefix}}}"),
        PostgresCacheStore({pg_kv!r}, table="{prefix}_cache")),
        semantic=SemanticCache(HttpEmbedder(MOCK), PgVectorIndex(
            {pg_url!r}, dimensions=8, table={vector_table or prefix + "_vec"!r}))),
    Middleware(FailoverMiddleware, retry=RetryPolicy(max_attempts=1), breaker=NEVER_OPENS,
               shared=RedisHealth("redis://127.0.0.1:6379/0", prefix={prefix!r})),
]
'''


# -- the command, end to end -------------------------------------------------------------------

def test_all_ok_exits_0_and_lists_every_store_and_provider(
        tmp_path: Path, mock: MockProviderServer, mock_url: str, prefix: str) -> None:
    config = write_config(tmp_path, mock_config(mock_url, extra=full_stack(prefix)))
    result = run_doctor(config, "--json")
    rows = rows_of(result)
    assert result.returncode == 0, result.stdout + result.stderr
    assert all(row["status"] == OK for row in rows.values()), rows
    assert all(row["detail"].endswith(" ms") for row in rows.values()), rows
    providers = {check for check in rows if check.startswith("provider ")}
    assert providers == {f"provider {name} [MOCK_PROVIDER_KEY]" for name in PROVIDERS}
    for name in PROVIDERS:
        assert rows[f"provider {name} [MOCK_PROVIDER_KEY]"]["target"] == \
            mock_url + MODELS_PATHS[name]
    targets = {check[len("store "):]: row["target"] for check, row in rows.items()
               if check.startswith("store ")}
    assert targets == {
        "auth_keys_postgres": "postgresql://127.0.0.1:5432/test",
        "usage_journal": "-",
        "quota_store": "redis://127.0.0.1:6379/0",
        "spend_ledger": "postgresql://127.0.0.1:5432/test",
        "cache_redis": "redis://127.0.0.1:6379/0",
        "cache_postgres": "postgresql://127.0.0.1:5432/test",
        "semantic_index": "postgresql://127.0.0.1:5432/test",
        "failover-redis": "redis://127.0.0.1:6379/0",
    }
    assert "pgvector" not in rows  # the index's own check covers the extension
    # Each provider got one GET of its model list, with its key header, nothing else.
    probes = [(r["provider"], r["method"], r["path"], r["headers"]) for r in mock.requests]
    assert sorted((p, m, path) for p, m, path, _ in probes) == \
        sorted((p, "GET", MODELS_PATHS[p]) for p in PROVIDERS)
    for provider, _, _, headers in probes:
        name, value = KEY_HEADERS[provider]
        assert headers[name] == value
    azure = next(r for r in mock.requests if r["provider"] == "azure")
    assert azure["query"] == {"api-version": "2024-10-21"}
    assert_no_secret(result)
    assert_clean_exit(result)

    table = run_doctor(config)
    assert table.returncode == 0
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["CHECK", "TARGET", "STATUS", "DETAIL"]
    assert lines[-1].endswith("all ok.")
    for name in PROVIDERS:
        assert any(line.startswith(f"provider {name} ") and " ok " in line for line in lines)
    assert_no_secret(table)
    assert_clean_exit(table)


def test_closed_port_provider_and_dead_quota_store_fail_with_exit_1(
        tmp_path: Path, mock_url: str) -> None:
    extra = f'''
providers["closed"] = Provider("openai", base_url="http://127.0.0.1:9/v1",
                               api_key_env="MOCK_PROVIDER_KEY", timeouts=fast)
models["closed-mock"] = [Deployment("closed", "gpt-4o-mini", price=MOCK_PRICE)]
middleware[2] = Middleware(QuotaMiddleware, store="redis://:{REDIS_PASSWORD}@127.0.0.1:9/0")
'''
    config = write_config(tmp_path, mock_config(mock_url, extra=extra))
    result = run_doctor(config, "--json", "--timeout", "5")
    assert result.returncode == 1, result.stdout + result.stderr
    rows = rows_of(result)
    failed = {check for check, row in rows.items() if row["status"] == FAIL}
    assert failed == {"provider closed [MOCK_PROVIDER_KEY]", "store quota_store"}
    closed = rows["provider closed [MOCK_PROVIDER_KEY]"]
    assert closed["target"] == "http://127.0.0.1:9/v1/models"
    assert "cannot connect" in closed["detail"]
    quota = rows["store quota_store"]
    assert quota["target"] == "redis://127.0.0.1:9/0"
    assert "unavailable" in quota["detail"]
    for name in PROVIDERS:  # the others still pass
        assert rows[f"provider {name} [MOCK_PROVIDER_KEY]"]["status"] == OK
    assert_no_secret(result)
    assert_clean_exit(result)

    table = run_doctor(config, "--timeout", "5")
    assert table.returncode == 1
    failing = [line for line in table.stdout.splitlines() if " FAIL " in line]
    assert len(failing) == 2
    assert any(line.startswith("provider closed") for line in failing)
    assert any(line.startswith("store quota_store") for line in failing)
    assert table.stdout.splitlines()[-1].endswith("2 failed.")
    assert_no_secret(table)


def test_refused_keys_fail_with_the_providers_status_and_never_show_the_key(
        tmp_path: Path) -> None:
    right = "sk-doctor-RIGHT-deployment-key-1111"  # the only key the strict mock accepts
    bad = "sk-doctor-BAD-deployment-key-2222"
    with MockProviderServer(MockConfig(expected_keys=dict.fromkeys(PROVIDERS, right))) as strict:
        extra = '''
providers["keyed"] = Provider("openai", base_url=MOCK + "/openai/v1", timeouts=fast)
models["keyed-mock"] = [Deployment("keyed", "gpt-4o-mini", price=MOCK_PRICE,
                                   api_key_envs=("DOCTOR_GOOD_KEY", "DOCTOR_BAD_KEY"))]
'''
        config = write_config(tmp_path, mock_config(strict.url, middleware="none", extra=extra))
        result = run_doctor(config, "--json",
                            env={"DOCTOR_GOOD_KEY": right, "DOCTOR_BAD_KEY": bad})
        rows = rows_of(result)
        assert result.returncode == 1
        for name in ("openai", "azure", "anthropic"):
            row = rows[f"provider {name} [MOCK_PROVIDER_KEY]"]
            assert (row["status"], row["detail"][:9]) == (FAIL, "HTTP 401 "), row
        gemini = rows["provider gemini [MOCK_PROVIDER_KEY]"]  # Google says 400 to a bad key
        assert gemini["status"] == FAIL and "HTTP 400" in gemini["detail"]
        assert "API key not valid" in gemini["detail"]
        # A provider without a key of its own: each deployment key, by its variable's name.
        assert rows["provider keyed [DOCTOR_GOOD_KEY]"]["status"] == OK
        refused = rows["provider keyed [DOCTOR_BAD_KEY]"]
        assert refused["status"] == FAIL and "401" in refused["detail"]
        assert "provider keyed" not in rows  # no keyless probe: every deployment has keys
        sent = {r["headers"].get("authorization") for r in strict.requests
                if r["path"] == "/openai/v1/models"}
        assert sent == {f"Bearer {PROVIDER_SECRET}", f"Bearer {right}", f"Bearer {bad}"}
    assert_no_secret(result, bad, right)
    assert_clean_exit(result)


def test_a_redirect_is_not_followed(tmp_path: Path, mock_url: str) -> None:
    """The key must not travel to wherever a redirect points."""
    hits: list[tuple[str, str | None]] = []

    class Redirecting(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append((self.path, self.headers.get("authorization")))
            if self.path.startswith("/v1/"):
                self.send_response(307)
                self.send_header("location", "/elsewhere/models")
                self.send_header("content-length", "0")
                self.end_headers()
            else:
                body = b'{"object": "list", "data": []}'
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Redirecting)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        extra = f'''
providers["moved"] = Provider("openai", base_url="http://127.0.0.1:{server.server_port}/v1",
                              api_key_env="MOCK_PROVIDER_KEY", timeouts=fast)
models["moved-mock"] = [Deployment("moved", "gpt-4o-mini", price=MOCK_PRICE)]
'''
        config = write_config(tmp_path, mock_config(mock_url, middleware="none", extra=extra))
        result = run_doctor(config, "--json")
    finally:
        server.shutdown()
        server.server_close()
    row = rows_of(result)["provider moved [MOCK_PROVIDER_KEY]"]
    assert result.returncode == 1
    assert row["status"] == FAIL and "307" in row["detail"] and "redirect" in row["detail"]
    assert hits == [("/v1/models", f"Bearer {PROVIDER_SECRET}")]  # never /elsewhere
    assert_no_secret(result)


def test_pgvector_is_queried_when_the_index_is_not_ready(tmp_path: Path, mock_url: str,
                                                         prefix: str) -> None:
    """A table of the index's name that is not the index's: its startup cannot finish, and
    the doctor says the extension itself is fine."""
    table = f"{prefix}_vec"
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE TABLE {} (unrelated integer)").format(
            sql.Identifier(table)))
    config = write_config(tmp_path, mock_config(mock_url, extra=full_stack(
        prefix, vector_table=table)))
    result = run_doctor(config, "--json", "--timeout", "2")
    rows = rows_of(result)
    assert result.returncode == 1
    assert rows["store semantic_index"]["status"] == FAIL
    assert "not ready" in rows["store semantic_index"]["detail"]
    assert rows["startup CacheMiddleware"]["detail"] == "timed out after 2 s"
    pgvector = rows["pgvector"]
    assert (pgvector["status"], pgvector["target"]) == (OK, "postgresql://127.0.0.1:5432/test")
    assert rows["store cache_redis"]["status"] == OK  # asked although the startup timed out
    assert_no_secret(result)
    assert_clean_exit(result)


def test_config_error_is_one_sentence_and_exit_2(tmp_path: Path, mock_url: str) -> None:
    config = write_config(tmp_path, mock_config(mock_url, extra='''
providers["x"] = Provider("openai", api_key_env="DOCTOR_NOT_SET_ANYWHERE")
'''))
    result = run_doctor(config)
    assert result.returncode == 2
    assert result.stdout == ""
    message = result.stderr.strip()
    assert message.startswith("sluicegate: ") and "\n" not in message
    assert "DOCTOR_NOT_SET_ANYWHERE" in message


def test_timeout_must_be_positive(tmp_path: Path) -> None:
    result = run_doctor(tmp_path / "unused.py", "--timeout", "0")
    assert result.returncode == 2 and "positive" in result.stderr


# -- the parts ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("address", "shown"), [
    ("redis://:pw-1@cache.internal:6380/2", "redis://cache.internal:6380/2"),
    ("rediss://user:pw-1@cache.internal/0?ssl_cert_reqs=none", "rediss://cache.internal:6379/0"),
    ("redis://127.0.0.1", "redis://127.0.0.1:6379"),
    ("redis://:pw-1/x?y#z@cache.internal:6380/2", "redis://cache.internal:6380/2"),  # (unencoded)
    ("redis://:pw-1/x", "(hidden)"),  # (no "@": a URL the gateway cannot read)
    ("unix://:pw-1@/run/redis.sock?db=3", "unix:///run/redis.sock"),
    ("postgresql://app:pw-1@db.internal/gateway?sslmode=require&password=pw-2",
     "postgresql://db.internal:5432/gateway"),
    ("postgres://app:p%40ss@[::1]:5433/gw", "postgres://[::1]:5433/gw"),
    ("postgresql:///gw?host=/var/run/postgresql", "postgresql:///var/run/postgresql:5432/gw"),
    ("host=db.internal port=6543 user=app password='p w\\'1' dbname=gw",
     "postgresql://db.internal:6543/gw"),
    ("dbname=gw password=pw-1", "postgresql://localhost:5432/gw"),
    ("https://user:key-1@api.example.com/v1/models?key=key-2#x",
     "https://api.example.com/v1/models"),
    ("not a dsn 'at all", "(hidden)"),
])
def test_targets_carry_no_credentials(address: str, shown: str) -> None:
    assert redact_target(address) == shown
    for secret in ("pw-1", "pw-2", "p%40ss", "p w", "key-1", "key-2", "app:", "user:"):
        assert secret not in redact_target(address)


def test_scrubber_removes_known_secrets_userinfo_and_passwords() -> None:
    scrub = Scrubber(["sk-live-123456", "hunter2"])
    line = scrub("auth failed for sk-live-123456 at postgresql://u:other@h/db\n"
                 "password=also-secret, then 'hunter2'")
    assert line == ("auth failed for [redacted] at postgresql://[redacted]@h/db "
                    "password=[redacted] then '[redacted]'")
    assert len(Scrubber([], limit=40)("x" * 100)) == 40
    # A password pasted unencoded, holding "/", "?" or "#", as a library quotes its URL.
    for password in ("pa/ss", "pa?ss", "pa#ss", "p/a?s#s"):
        line = scrub(f"cannot connect to 'redis://:{password}@cache:6379/0': refused")
        assert line == "cannot connect to 'redis://[redacted]@cache:6379/0': refused"


class _Component:
    """A stack component for `diagnose`, with scripted behaviour."""

    def __init__(self, name: str, log: list[str], app: Any = None, *, start: str = "ok",
                 report: Any = None, leak: bool = False, url: str | None = None) -> None:
        self.app = app
        self.name, self.log = name, log
        self.start, self.report, self.leak = start, report, leak
        self.url = url
        self.task: asyncio.Task[None] | None = None

    async def startup(self) -> None:
        self.log.append(f"startup {self.name}")
        self.task = asyncio.create_task(asyncio.sleep(3600), name="scripted-background")
        if self.start == "raise":
            raise RuntimeError(f"cannot reach {self.url}")

    async def check_ready(self) -> dict[str, str]:
        self.log.append(f"check_ready {self.name}")
        if self.report == "hang":
            await asyncio.sleep(3600)
        return dict(self.report or {})

    async def shutdown(self) -> None:
        self.log.append(f"shutdown {self.name}")
        if self.task is not None and not self.leak:
            self.task.cancel()
            await asyncio.wait([self.task])


async def test_diagnose_bounds_every_check_and_reports_leftover_tasks() -> None:
    log: list[str] = []
    inner = _Component("inner", log, report={"inner_store": "degraded: down; it waits"},
                       leak=True)
    hanging = _Component("hanging", log, inner, report="hang")
    outer = _Component("outer", log, hanging, start="raise", report={"outer_redis": "ok"},
                       url="redis://:pw-outer@10.0.0.1:6379/0")
    config = GatewayConfig(path="scripted", providers={}, models={})
    rows = await diagnose(config, outer, timeout_s=0.3)
    by_check = {row.check: row for row in rows}
    assert by_check["startup _Component"].status == FAIL
    assert by_check["startup _Component"].detail == \
        "RuntimeError: cannot reach [redacted]"  # the whole address is a secret
    assert by_check["startup _Component"].target == "redis://10.0.0.1:6379/0"
    assert by_check["store outer_redis"].status == OK  # asked although startup failed
    assert by_check["store outer_redis"].target == "redis://10.0.0.1:6379/0"
    assert (by_check["store _Component"].status,
            by_check["store _Component"].detail) == (FAIL, "timed out after 0.3 s")
    assert by_check["store inner_store"].status == FAIL  # degraded is not ok for the doctor
    assert by_check["shutdown"].detail == \
        "1 background task(s) outlived the shutdown: scripted-background"
    # Started innermost first, every one asked, stopped outermost first (even the one whose
    # startup failed: it may hold half of what it opened).
    assert log[:3] == ["startup inner", "startup hanging", "startup outer"]
    assert sorted(log[3:6]) == ["check_ready hanging", "check_ready inner", "check_ready outer"]
    assert log[6:] == ["shutdown outer", "shutdown hanging", "shutdown inner"]
    assert inner.task is not None and inner.task.cancelled()
    assert "pw-outer" not in render_table(rows)
