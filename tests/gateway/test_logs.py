"""Structured logs: JSON lines carrying the request id and trace id of the request served."""
from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import httpx
import pytest

from gateway import create_app
from gateway.doctor import Scrubber
from gateway.kernel import stack_components
from gateway.logs import JsonFormatter, configure_logging
from tests.harness import (
    AUTH,
    TEST_KEY,
    ThreadedServer,
    find_secrets_in_logs,
    mock_config,
    start_cli_gateway,
    stop_process,
    wait_for,
    write_config,
)

LAYER = '''
import logging
class Chatty:
    def __init__(self, app):
        self.app = app
    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            logging.getLogger("sluicegate.chatty").warning("serving", extra={"step": 1})
        await self.app(scope, receive, send)
middleware.insert(0, Middleware(Chatty))
from tests.tracing_support import PROVIDER
settings = Settings(tracer_provider=PROVIDER)
'''


def test_log_lines_carry_the_request_and_trace_ids(tmp_path: Path, mock_url: str) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("sluicegate.chatty")
    logger.addHandler(handler)
    try:
        app = create_app(write_config(tmp_path, mock_config(mock_url, extra=LAYER)))
        with ThreadedServer(app) as server:
            response = httpx.post(server.url + "/v1/chat/completions", headers={
                **AUTH, "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
                json={"model": "gpt-mock", "messages": [{"role": "user", "content": "hi"}]})
    finally:
        logger.removeHandler(handler)
    (line,) = stream.getvalue().splitlines()
    entry = json.loads(line)
    assert entry["message"] == "serving" and entry["level"] == "warning"
    assert entry["logger"] == "sluicegate.chatty" and entry["step"] == 1
    assert entry["request_id"] == response.headers["x-request-id"]
    assert entry["trace_id"] == "0af7651916cd43dd8448eb211c80319c"
    assert entry["ts"].endswith("Z")


def test_the_secret_search_finds_keys(tmp_path: Path) -> None:
    (tmp_path / "a.log").write_text('{"message": "key sk-sg-abcdefghijklmnopqrstuvwxyz012345"}')
    (tmp_path / "b.log").write_text("provider said provider-secret-123456789 oops")
    (tmp_path / "c.log").write_text("nothing to see: sk-sg-short")
    found = sorted(where.rsplit("/", 1)[1] for where, _ in find_secrets_in_logs(tmp_path))
    assert found == ["a.log", "b.log"]


# -- no secret in the log ----------------------------------------------------------------------

# Every store address and secret a config may hold, each password its own (pw-<where>).
EVERY_STORE = '''
from gateway.config import Settings
from middleware.auth import PostgresKeyStore
from middleware.cache.semantic import OpenAIEmbedder, PgVectorIndex, SemanticCache
from middleware.cache.stores import PostgresCacheStore, RedisCacheStore, TieredCacheStore
from middleware.failover import RedisHealth
from middleware.quota import PostgresSpendLedger
def pg(password): return f"postgresql://sg:{password}@127.0.0.1:5432/test"
middleware = [
    Middleware(AuthMiddleware, store=PostgresKeyStore(pg("pw-keys")),
               keys=[StaticKey("tests", key_env="SG_TEST_KEY")], admin_token_env="SG_T_ADMIN"),
    Middleware(MeteringMiddleware, store=pg("pw-meter"), journal_dir=JOURNAL),
    Middleware(QuotaMiddleware, store="redis://:pw-quota/x@127.0.0.1:6379/0",
               ledger=PostgresSpendLedger(pg("pw-ledger"))),
    Middleware(CacheMiddleware, store=TieredCacheStore(
        RedisCacheStore("redis://:pw-cache@127.0.0.1:6379/0"), PostgresCacheStore(pg("pw-warm"))),
        admin_token_env="SG_T_CACHE_ADMIN", semantic=SemanticCache(
            OpenAIEmbedder("http://127.0.0.1:9/v1", "e", key_env="SG_T_EMBED"),
            PgVectorIndex(pg("pw-vector")))),
    Middleware(FailoverMiddleware, shared=RedisHealth(url_env="SG_T_HEALTH_URL")),
]
settings = Settings(metrics_token_env="SG_T_METRICS")
'''
EVERY_SECRET = {
    "SG_T_ADMIN": "admin-token-pw-admin-0123", "SG_T_CACHE_ADMIN": "cache-admin-pw-cache-0123",
    "SG_T_EMBED": "embed-key-pw-embed-0123", "SG_T_METRICS": "metrics-token-pw-metrics",
    "SG_T_HEALTH_URL": "redis://:pw-health@127.0.0.1:6379/0",
}


def test_every_configured_secret_is_known_to_the_log_filter(
        tmp_path: Path, mock_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in EVERY_SECRET.items():
        monkeypatch.setenv(name, value)
    text = mock_config(mock_url, middleware="[]", extra=f"JOURNAL = {str(tmp_path)!r}\n"
                       + EVERY_STORE)
    kernel = create_app(write_config(tmp_path, text))
    redact = Scrubber.for_config(kernel.config, stack_components(kernel.app)).redact
    passwords = [f"pw-{where}" for where in ("keys", "meter", "quota/x", "ledger", "cache",
                                             "warm", "vector", "health")]
    tokens = [value for value in EVERY_SECRET.values() if "://" not in value]
    for secret in [*passwords, *tokens, "provider-secret-123456789", TEST_KEY]:
        said = redact(f'error: invalid token "{secret}" here')
        assert said == 'error: invalid token "[redacted]" here', secret


def test_library_logs_carry_no_dsn_password(tmp_path: Path, mock_url: str) -> None:
    # psycopg.pool logs "invalid percent-encoded token: <the password>" while it retries.
    text = mock_config(mock_url, middleware="[]", extra=(
        "from middleware.quota import PostgresSpendLedger\n"
        "middleware = [Middleware(QuotaMiddleware, ledger=PostgresSpendLedger("
        "'postgresql://sg:50%offSECRETpw@127.0.0.1:5432/test'))]\n"))
    log = tmp_path / "serve.log"
    process, _ = start_cli_gateway(write_config(tmp_path, text), log_path=log)
    try:
        assert wait_for(lambda: b'"logger":"psycopg.pool"' in log.read_bytes(), timeout_s=30)
    finally:
        stop_process(process)
    assert b"invalid percent-encoded token" in log.read_bytes()
    assert b"SECRETpw" not in log.read_bytes()


def test_the_filter_redacts_exceptions_and_extra_fields(capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    configure_logging("info", "json", redact=Scrubber(["hunter2"]).redact)
    try:
        try:
            raise ValueError("cannot connect with hunter2")
        except ValueError:
            logging.getLogger("somelib").exception("failed: %s", "pw hunter2",
                                                   extra={"dsn": "postgresql://u:hunter2@h/db"})
    finally:
        root.handlers[:], root.level = handlers, level
    entry = json.loads(capsys.readouterr().err)
    assert entry["message"] == "failed: pw [redacted]"
    assert "ValueError: cannot connect with [redacted]" in entry["exception"]
    assert entry["dsn"] == "postgresql://[redacted]@h/db"
