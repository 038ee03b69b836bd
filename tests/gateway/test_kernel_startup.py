"""The kernel's startup when a component fails to start: what started is shut down again, and
a start retried by requests (a host that never forwards lifespan) or cancelled by a shutdown
leaves no task, journal slot or connection behind. Real Redis, PostgreSQL and journals; the
failing component is a custom layer of the test's config module."""
from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway import create_app
from gateway.kernel import Kernel
from middleware.metering.journal import Journal
from tests.harness import mock_config, pg_names, write_config

REDIS_URL = "redis://127.0.0.1:6379/0"
PG_DSN = "host=127.0.0.1 port=5432 user=root dbname=test"
# The background tasks the stack below starts (metering's writer, failover's shared health).
TASK_NAMES = {"sluicegate-metering-writer", "sluicegate-failover-health"}

LAYERS = '''
import asyncio
from middleware.cache import CacheMiddleware
from middleware.cache.semantic import SemanticCache
from middleware.cache.stores import PostgresCacheStore
from middleware.failover.shared import RedisHealth
from middleware.metering.store import PostgresUsageStore

EVENTS = []


class Recorder:
    """Notes its startup and shutdown in `events`."""

    def __init__(self, app, *, name, events):
        self.app, self.name, self.events = app, name, events

    def __call__(self, scope, receive, send):
        return self.app(scope, receive, send)

    async def startup(self):
        self.events.append(f"start {self.name}")

    async def shutdown(self):
        self.events.append(f"stop {self.name}")


class StoreGate(Recorder):
    """A layer whose store is unreachable for its first `failures` startups; with `hangs`,
    its startup waits for a store that never answers."""

    def __init__(self, app, *, name, events, failures=0, hangs=False):
        super().__init__(app, name=name, events=events)
        self.failures, self.hangs = failures, hangs
        self.waiting = asyncio.Event()

    async def startup(self):
        if self.hangs:
            self.waiting.set()
            await asyncio.Event().wait()
        if self.failures > 0:
            self.failures -= 1
            raise RuntimeError(f"the store of {self.name} is unreachable")
        await super().startup()


class BrokenEmbedder:
    async def startup(self):
        raise RuntimeError("the embedding model is not on disk")

    async def shutdown(self):
        pass

    async def embed(self, texts):
        raise RuntimeError("not started")


class FailsToStop(Recorder):
    async def shutdown(self):
        await super().shutdown()
        raise OSError(f"{self.name} could not close its pool")
'''


@pytest.fixture
def usage_prefix() -> Iterator[str]:
    yield from pg_names("startup_usage_")


def kernel(tmp_path: Path, layers: str) -> Kernel:
    config = mock_config("http://127.0.0.1:9", middleware="[]",
                         extra=f"{LAYERS}\nmiddleware = [{layers}]\n")
    return create_app(write_config(tmp_path, config))


def stateful_layers(tmp_path: Path, usage_prefix: str) -> str:
    """Metering (a journal slot, a writer task, a PostgreSQL connection), quota on Redis and
    failover sharing its health through Redis (a task), around two recorders."""
    return (f"Middleware(Recorder, name='a', events=EVENTS), "
            f"Middleware(MeteringMiddleware, journal_dir={str(tmp_path / 'journal')!r}, "
            f"store=PostgresUsageStore({PG_DSN!r}, prefix={usage_prefix!r})), "
            f"Middleware(Recorder, name='b', events=EVENTS), "
            f"Middleware(QuotaMiddleware, store={REDIS_URL!r}), "
            f"Middleware(FailoverMiddleware, retry=RetryPolicy(max_attempts=1), "
            f"shared=RedisHealth({REDIS_URL!r}, prefix={usage_prefix!r}))")


def running_tasks() -> list[str]:
    return sorted(task.get_name() for task in asyncio.all_tasks()
                  if task.get_name() in TASK_NAMES and not task.done())


def slot_is_free(tmp_path: Path, number: int = 0) -> bool:
    journal = Journal(tmp_path / "journal" / f"slot-{number:03d}")
    try:
        journal.open()
    except Exception:  # noqa: BLE001 (held by a journal the gateway left open)
        return False
    journal.close()
    return True


def component(app: Kernel, kind: str) -> Any:
    return next(c for c in app.components if type(c).__name__ == kind)


async def lifespan_startup(app: Kernel) -> dict[str, Any]:
    messages = [{"type": "lifespan.startup"}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app({"type": "lifespan"}, receive, send)
    return sent[0]


async def get(app: Kernel, path: str = "/healthz") -> int:
    """A request through a host that never forwarded lifespan: its status."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": path, "root_path": "",
             "query_string": b"", "headers": []}
    await app(scope, receive, send)
    return int(sent[0]["status"])


async def test_a_failed_startup_shuts_down_what_started_in_reverse_order(
        tmp_path: Path, usage_prefix: str) -> None:
    layers = ("Middleware(StoreGate, name='gate', events=EVENTS, failures=1), "
              + stateful_layers(tmp_path, usage_prefix))
    app = kernel(tmp_path, layers)
    answer = await lifespan_startup(app)
    assert answer == {"type": "lifespan.startup.failed",
                      "message": "the store of gate is unreachable"}
    recorder = component(app, "Recorder")
    assert recorder.events == ["start b", "start a", "stop a", "stop b"]
    assert running_tasks() == []
    assert slot_is_free(tmp_path)
    assert component(app, "MeteringMiddleware").store._conn is None
    assert component(app, "QuotaMiddleware").store._client is None
    passthrough = app.components[-1]
    assert all(adapter._session is None for adapter in passthrough.providers.values())


async def test_a_failing_rollback_is_logged_and_the_startup_error_raised(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    app = kernel(tmp_path, "Middleware(StoreGate, name='gate', events=EVENTS, failures=1), "
                           "Middleware(Recorder, name='a', events=EVENTS), "
                           "Middleware(FailsToStop, name='pool', events=EVENTS), "
                           "Middleware(Recorder, name='b', events=EVENTS)")
    with pytest.raises(RuntimeError, match="^the store of gate is unreachable$"):
        await app.startup()
    assert component(app, "Recorder").events == [
        "start b", "start pool", "start a", "stop a", "stop pool", "stop b"]
    assert "shutdown of FailsToStop failed" in caplog.text
    assert "pool could not close its pool" in caplog.text
    await app.shutdown()  # (nothing left to stop)
    assert component(app, "Recorder").events[-1] == "stop b"


async def test_a_failing_shutdown_still_stops_the_layers_after_it(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    app = kernel(tmp_path, "Middleware(Recorder, name='a', events=EVENTS), "
                           "Middleware(FailsToStop, name='pool', events=EVENTS), "
                           "Middleware(Recorder, name='b', events=EVENTS)")
    await app.startup()
    with pytest.raises(OSError, match="pool could not close its pool"):
        await app.shutdown()
    assert component(app, "Recorder").events[-3:] == ["stop a", "stop pool", "stop b"]
    assert "shutdown of FailsToStop failed" in caplog.text


async def test_a_start_retried_by_requests_holds_one_journal_slot_and_one_writer(
        tmp_path: Path, usage_prefix: str) -> None:
    layers = ("Middleware(StoreGate, name='gate', events=EVENTS, failures=2), "
              + stateful_layers(tmp_path, usage_prefix))
    app = kernel(tmp_path, layers)
    assert [await get(app), await get(app)] == [503, 503]
    assert running_tasks() == []
    assert await get(app) == 200
    try:
        assert running_tasks() == sorted(TASK_NAMES)
        assert component(app, "MeteringMiddleware").journal.directory.name == "slot-000"
        assert component(app, "Recorder").events == [
            "start b", "start a", "stop a", "stop b",
            "start b", "start a", "stop a", "stop b",
            "start b", "start a", "start gate"]
    finally:
        await app.shutdown()
    assert running_tasks() == []
    assert slot_is_free(tmp_path)


async def test_shutdown_cancels_a_pending_lazy_start(tmp_path: Path, usage_prefix: str) -> None:
    layers = ("Middleware(StoreGate, name='gate', events=EVENTS, hangs=True), "
              + stateful_layers(tmp_path, usage_prefix))
    app = kernel(tmp_path, layers)
    request = asyncio.create_task(get(app))
    try:
        await component(app, "StoreGate").waiting.wait()
        # (bounded: without the cancel, this shutdown waits for the start forever)
        await asyncio.wait_for(app.shutdown(), timeout=30)
        assert await request == 503
    finally:
        request.cancel()
    assert component(app, "Recorder").events == ["start b", "start a", "stop a", "stop b"]
    assert running_tasks() == []
    assert slot_is_free(tmp_path)


async def test_metering_cancelled_while_its_store_connects_lets_go_of_its_journal(
        tmp_path: Path) -> None:
    """Shut down while metering's PostgreSQL does not answer (a server that accepted the
    connection and never replies): its half-done start closes the journal it opened."""
    accepted = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set()
        await reader.read()  # until the client hangs up
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    dsn = f"host=127.0.0.1 port={port} user=root dbname=test"
    app = kernel(tmp_path, f"Middleware(MeteringMiddleware, "
                           f"journal_dir={str(tmp_path / 'journal')!r}, "
                           f"store=PostgresUsageStore({dsn!r}, timeout_s=600))")
    request = asyncio.create_task(get(app))
    try:
        await accepted.wait()
        await asyncio.wait_for(app.shutdown(), timeout=30)
        assert await request == 503
    finally:
        request.cancel()
        server.close()
    metering = component(app, "MeteringMiddleware")
    assert slot_is_free(tmp_path)
    assert metering._io is None
    assert running_tasks() == []


async def test_a_layer_that_fails_part_way_through_its_startup_closes_what_it_opened(
        tmp_path: Path) -> None:
    # The cache layer's PostgreSQL store starts (a pool, a maintenance task); then its
    # semantic cache's embedder fails to load. The kernel stops only layers that started;
    # the cache layer closes its own store.
    table = f"startup_cache_{uuid.uuid4().hex[:12]}"
    layers = ("Middleware(CacheMiddleware, store=PostgresCacheStore("
              f"{PG_DSN!r}, table={table!r}), semantic=SemanticCache(BrokenEmbedder()))")
    app = kernel(tmp_path, layers)
    with pytest.raises(RuntimeError, match="the embedding model is not on disk"):
        await app.startup()
    store = component(app, "CacheMiddleware").store
    assert store._pool is None and store._maintainer is None
