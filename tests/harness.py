"""Running gateways for tests: in a hypercorn thread (fast) or as `sluicegate serve` processes.

Everything binds to 127.0.0.1 on free ports; every start has a bounded wait.
"""
from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, Self

import httpx
import openai

from gateway import create_app

REPO = Path(__file__).resolve().parent.parent


def pg_names(stem: str) -> Iterator[str]:
    """A unique name for a test module's PostgreSQL usage tables (`<name>_events`,
    `<name>_rollups`, `<name>_schema_version`) and key schema (`<name>`), all dropped once the
    module is done (a module fixture's `yield from`)."""
    import uuid

    import psycopg
    from psycopg import sql

    name = stem + uuid.uuid4().hex[:10]
    yield name
    with psycopg.connect("host=127.0.0.1 port=5432 user=root dbname=test",
                         autocommit=True) as conn:
        for table in ("events", "rollups", "schema_version"):
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {} CASCADE").format(
                sql.Identifier(f"{name}_{table}")))
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until_up(url: str, timeout_s: float = 20.0, process: subprocess.Popen[Any] | None = None,
                  health_path: str = "/healthz") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            if httpx.get(url + health_path, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not come up within {timeout_s} s")


@asynccontextmanager
async def served_here(app: Any, **config: Any) -> AsyncIterator[tuple[int, asyncio.Event,
                                                                    asyncio.Task[None]]]:
    """Hypercorn serving `app` on this event loop on a free 127.0.0.1 port, with the given
    hypercorn `Config` attributes: (port, the event that stops it, its task). Leaving stops
    it and waits (bounded) for it to end."""
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    port = free_port()
    settings = Config()
    settings.bind = [f"127.0.0.1:{port}"]
    settings.accesslog = None
    settings.errorlog = None
    for name, value in config.items():
        setattr(settings, name, value)
    stop = asyncio.Event()
    task = asyncio.create_task(serve(app, settings, shutdown_trigger=stop.wait))
    for _ in range(500):
        try:
            _reader, probe = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.02)
            continue
        probe.close()
        break
    try:
        yield port, stop, task
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def answer_lifespan(receive: Any, send: Any) -> None:
    """A test app's side of the ASGI lifespan: every startup is complete, then the shutdown."""
    while (await receive())["type"] != "lifespan.shutdown":
        await send({"type": "lifespan.startup.complete"})
    await send({"type": "lifespan.shutdown.complete"})


async def read_body(receive: Any) -> bytes:
    """A request's whole body, however many `http.request` messages it comes in."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body


async def kept_alive_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The server of a served-through test (see `kept_alive_then_streamed`): `/stream` sends
    50 events and no length, anything else `{"ok":true}` in two pieces with its length."""
    if scope["type"] == "lifespan":
        await answer_lifespan(receive, send)
        return
    if scope["path"] == "/stream":
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        for index in range(50):
            await send({"type": "http.response.body", "body": b"data: %d\n\n" % index,
                        "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", b"11")]})
    await send({"type": "http.response.body", "body": b'{"ok":', "more_body": True})
    await send({"type": "http.response.body", "body": b"true}", "more_body": False})


@contextmanager
def stock_h11() -> Iterator[None]:
    """h11 as it ships, the reference gateway/h11_body.py and gateway/h11_cycle.py are held to:
    their shortcuts taken out of `h11.Connection` (those this process installed) inside."""
    import h11

    from gateway import h11_body, h11_cycle

    connection = h11.Connection
    patched = (connection.send, connection._process_event, connection.next_event,
               connection.start_next_cycle)
    if h11_body.installed():
        connection.send = h11_body._original  # type: ignore[method-assign]
        connection._process_event = h11_body._original_process_event  # type: ignore[method-assign]
    if h11_cycle.installed():
        connection.next_event = h11_cycle._original_next_event  # type: ignore[method-assign]
        connection.start_next_cycle = h11_cycle._original_start_next_cycle  # type: ignore[method-assign]
    try:
        yield
    finally:
        (connection.send, connection._process_event, connection.next_event,
         connection.start_next_cycle) = patched  # type: ignore[method-assign]


async def kept_alive_then_streamed(port: int, json_body: bytes) -> list[bytes]:
    """The client of a served-through test: three `GET /` on one kept-alive connection, each
    answered 200 with `json_body` and its Content-Length, then `GET /stream` with
    `connection: close`, answered chunked. Returns the stream's chunks in order (the last one
    is the empty chunk that ends it)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for _ in range(3):  # kept alive: one response after another on one connection
            writer.write(b"GET / HTTP/1.1\r\nhost: test\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 200")
            assert b"content-length: %d" % len(json_body) in head
            assert await asyncio.wait_for(reader.readexactly(len(json_body)), 10) == json_body
        writer.write(b"GET /stream HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n")
        received = await asyncio.wait_for(reader.read(), 10)  # to the server's close
    finally:
        writer.close()
    head, _, body = received.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower()
    chunks = []
    while body:
        size, _, rest = body.partition(b"\r\n")
        length = int(size, 16)
        chunks.append(rest[:length])
        body = rest[length + 2:]
    return chunks


class ThreadedServer:
    """An ASGI app served by hypercorn on its own event loop in a background thread."""

    def __init__(self, app: Any, health_path: str = "/healthz") -> None:
        self.app = app
        self.health_path = health_path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        from hypercorn.asyncio import serve
        from hypercorn.config import Config

        config = Config()
        config.bind = [f"127.0.0.1:{self.port}"]
        config.accesslog = None
        config.graceful_timeout = 2
        asyncio.set_event_loop(self._loop)
        self._stop = asyncio.Event()
        self._loop.run_until_complete(serve(self.app, config, shutdown_trigger=self._stop.wait))

    def __enter__(self) -> Self:
        self._thread.start()
        wait_until_up(self.url, health_path=self.health_path)
        return self

    def run(self, coroutine: Any, timeout_s: float = 10.0) -> Any:
        """Runs a coroutine on the server's event loop (e.g. an app's shutdown)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout_s)

    def __exit__(self, *exc: object) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=10)


def write_config(directory: Path, text: str, name: str = "config.py") -> Path:
    path = directory / name
    path.write_text(text)
    return path


# The virtual key the default test stack accepts (declared by env var, as operators do).
TEST_KEY = "sk-sg-" + "test-key-" * 4 + "0123456789"


AUTH = {"authorization": f"Bearer {TEST_KEY}"}



def config_head(admin_env: str | None = None, admin_token: str = "") -> str:
    """The start of a test's config module for its own mock provider servers: the classes
    its layers and deployments use, the providers' key and TEST_KEY in environment variables
    (and `admin_token` in `admin_env`), `fast` timeouts, `KEY` (the providers' key variable)
    and `PRICE` ($1 in, $2 out per 1M tokens)."""
    admin = f'os.environ.setdefault("{admin_env}", "{admin_token}")\n' if admin_env else ""
    return ("import os\n"
            "from gateway.config import Deployment, Middleware, Price, Timeouts\n"
            "from gateway.policy import Limits\n"
            "from middleware.auth import AuthMiddleware, StaticKey\n"
            "from middleware.failover import (BreakerSettings, FailoverMiddleware, RedisHealth,\n"
            "                                 RetryPolicy, Route)\n"
            "from middleware.metering import MeteringMiddleware\n"
            "from middleware.quota import QuotaMiddleware\n"
            "from providers import Provider\n\n"
            'os.environ.setdefault("MOCK_PROVIDER_KEY", "provider-secret-123456789")\n'
            f'os.environ.setdefault("SG_TEST_KEY", "{TEST_KEY}")\n{admin}'
            "fast = Timeouts(connect_s=2, first_byte_s=5, idle_s=5, total_s=30)\n"
            'KEY = "MOCK_PROVIDER_KEY"\n'
            'PRICE = Price(input_per_mtok="1", output_per_mtok="2")\n')

@contextmanager
def serve(tmp_path: Path, text: str) -> Iterator[ThreadedServer]:
    """A gateway on the config module `text` (written into `tmp_path`), in a thread."""
    with ThreadedServer(create_app(write_config(tmp_path, text))) as server:
        yield server


def openai_client(server: ThreadedServer) -> openai.OpenAI:
    """The official SDK on `server` with TEST_KEY, never retrying on its own."""
    return openai.OpenAI(base_url=server.url + "/v1", api_key=TEST_KEY, max_retries=0)


# The quota store of a gateway served by several worker processes (`serve --workers N`
# refuses the in-process one: each worker would hold every limit on its own).
SHARED_QUOTA = "redis://127.0.0.1:6379/0"


def mock_config(mock_url: str, *, middleware: str = "default", extra: str = "",
                quota_store: str = "memory") -> str:
    """A config module serving one public model per mock provider (the default stack's
    failover layer makes one attempt per request and never opens a breaker; its quota
    layer keeps its counters in `quota_store`: `SHARED_QUOTA` for several workers).

    Models: `gpt-mock` (OpenAI), `azure-mock` (Azure), `claude-mock` (Anthropic),
    `gemini-mock` (Gemini), and `*-embed` embedding models for OpenAI and Gemini.
    """
    layers = {
        "default": "[Middleware(AuthMiddleware, keys=[StaticKey('tests', key_env='SG_TEST_KEY')]), "
                   "Middleware(MeteringMiddleware), "
                   f"Middleware(QuotaMiddleware, store={quota_store!r}), "
                   "Middleware(CacheMiddleware), Middleware(FailoverMiddleware, "
                   "retry=RetryPolicy(max_attempts=1), breaker=NEVER_OPENS)]",
        "none": "[]",
    }.get(middleware, middleware)
    return f'''
import os
from gateway.config import Deployment, Middleware, Model, Price, Settings, Timeouts
from gateway.policy import Budget, Limits
from middleware.auth import AuthMiddleware, StaticKey
from middleware.cache import CacheMiddleware
from middleware.failover import BreakerSettings, FailoverMiddleware, RetryPolicy
from middleware.metering import MeteringMiddleware
from middleware.quota import QuotaMiddleware
from providers import Provider

os.environ.setdefault("MOCK_PROVIDER_KEY", "provider-secret-123456789")
os.environ.setdefault("SG_TEST_KEY", "{TEST_KEY}")
MOCK = "{mock_url}"
# The default stack's failover layer makes one attempt and never opens a breaker, so tests of
# the other layers and of the passthrough see each provider answer as it is (the failover
# tests configure the layer themselves).
NEVER_OPENS = BreakerSettings(consecutive_failures=10**9, min_requests=10**9)
fast = Timeouts(connect_s=2, first_byte_s=5, idle_s=5, total_s=30)
providers = {{
    "openai": Provider("openai", base_url=MOCK + "/openai/v1", api_key_env="MOCK_PROVIDER_KEY", timeouts=fast),
    "azure": Provider("azure", base_url=MOCK + "/azure", api_key_env="MOCK_PROVIDER_KEY", timeouts=fast),
    "anthropic": Provider("anthropic", base_url=MOCK + "/anthropic", api_key_env="MOCK_PROVIDER_KEY", timeouts=fast),
    "gemini": Provider("gemini", base_url=MOCK + "/gemini", api_key_env="MOCK_PROVIDER_KEY", timeouts=fast),
}}
# One known price for every mock model, so tests can compute costs: $1 in, $2 out per 1M.
MOCK_PRICE = Price(input_per_mtok="1", output_per_mtok="2")
models = {{
    "gpt-mock": [Deployment("openai", "gpt-4o-mini", price=MOCK_PRICE)],
    "azure-mock": [Deployment("azure", "my-gpt-deployment", price=MOCK_PRICE)],
    "claude-mock": [Deployment("anthropic", "claude-3-5-haiku-latest", price=MOCK_PRICE)],
    "gemini-mock": [Deployment("gemini", "gemini-2.0-flash", price=MOCK_PRICE)],
    "openai-embed": [Deployment("openai", "text-embedding-3-small", price=MOCK_PRICE)],
    "azure-embed": [Deployment("azure", "my-embedding-deployment", price=MOCK_PRICE)],
    "gemini-embed": [Deployment("gemini", "text-embedding-004", price=MOCK_PRICE)],
}}
middleware = {layers}
{extra}
'''


def start_cli_gateway(config_path: Path, *, workers: int = 1, env: dict[str, str] | None = None,
                      log_path: Path | None = None,
                      access_log: bool = False) -> tuple[subprocess.Popen[bytes], str]:
    """`sluicegate serve` (`--access-log` too with `access_log`) as a subprocess; returns
    (process, base URL) once /healthz answers."""
    port = free_port()
    if log_path is None and os.environ.get("SLUICEGATE_TEST_LOG_DIR"):
        # Kept with the run's logs, which are searched for secrets when the run ends.
        log_path = Path(os.environ["SLUICEGATE_TEST_LOG_DIR"]) / f"serve-{port}.log"
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115 (Popen keeps it)
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config_path),
         "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers),
         *(["--access-log"] if access_log else [])],
        cwd=REPO, env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url, timeout_s=30, process=process)
    except Exception:
        process.kill()
        raise
    return process, url


def stop_process(process: subprocess.Popen[Any], timeout_s: float = 15) -> int:
    process.terminate()
    try:
        return process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


# Secrets the tests hand the gateway, by value; and the shape of any virtual key.
KNOWN_SECRETS = (TEST_KEY, "provider-secret-123456789")
_VIRTUAL_KEY = re.compile(rb"sk-sg-[A-Za-z0-9_\-]{20,}")


def find_secrets_in_logs(directory: Path) -> Iterator[tuple[str, str]]:
    """(file, what) for every secret in the log files under `directory` (what is redacted:
    the first characters only)."""
    for path in sorted(directory.rglob("*.log")):
        data = path.read_bytes()
        for secret in KNOWN_SECRETS:
            if secret.encode() in data:
                yield str(path), secret[:10] + "..."
        for match in _VIRTUAL_KEY.finditer(data):
            yield str(path), match.group().decode()[:10] + "..."


def wait_for(condition: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    """Whether `condition()` holds within `timeout_s` (asked every 20 ms, and once more at
    the end)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()
