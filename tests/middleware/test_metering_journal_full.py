"""The metering layer when a PostgreSQL outage has filled the journal's disk: once PostgreSQL
answers, every record reaches it once, nothing is lost at shutdown, and durable responses end.

A full disk, for any user (root included): no file of this process may grow past the journal
segment's size (RLIMIT_FSIZE: a write fails with EFBIG, as it would with ENOSPC), and the
checkpoint cannot be written (a directory stands where its temporary file goes: EISDIR; or
that name leads to /dev/full: ENOSPC, a full disk's own error).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from gateway.context import CONTEXT_KEY, RequestContext
from gateway.kernel import _run_end_hooks
from middleware.metering import MeteringMiddleware
from middleware.metering.journal import Journal
from middleware.metering.store import PostgresUsageStore
from tests.tcp_proxy import TcpProxy

PG_DSN = "host=127.0.0.1 port=5432 user=root dbname=test"


@pytest.fixture
def prefix() -> Iterator[str]:
    name = "sgf_" + uuid.uuid4().hex[:10]
    yield name
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        for table in ("events", "rollups", "schema_version"):
            conn.execute(f"DROP TABLE IF EXISTS {name}_{table} CASCADE")


def events(prefix: str) -> list[str]:
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        return [row[0] for row in conn.execute(f"SELECT request_id FROM {prefix}_events")]


def rollup_requests(prefix: str) -> int:
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        row = conn.execute(f"SELECT coalesce(sum(requests), 0) FROM {prefix}_rollups "
                           "WHERE grain = 'minute' AND kind = 'model'").fetchone()
    assert row is not None
    return int(row[0])


async def answer(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


def metering(proxy: TcpProxy, prefix: str, journal_dir: Path, **options: Any
             ) -> MeteringMiddleware:
    store = PostgresUsageStore(f"host=127.0.0.1 port={proxy.port} user=root dbname=test",
                               prefix=prefix, timeout_s=2)
    return MeteringMiddleware(answer, store=store, journal_dir=str(journal_dir), batch_size=10,
                              flush_interval_s=0.02, retry_interval_s=0.1, **options)


async def request(layer: MeteringMiddleware) -> str:
    """One request through the layer, ended as the kernel ends it; its request id."""
    ctx = RequestContext(request_id=uuid.uuid4().hex, operation="openai.chat",
                         api_format="openai", body={"model": "m", "messages": []},
                         raw_body=b"", model="m", stream=False, status=200)
    sent: list[Any] = []

    async def send(message: Any) -> None:
        sent.append(message)
    await layer({"type": "http", CONTEXT_KEY: ctx}, None, send)  # type: ignore[arg-type]
    if ctx.on_end:  # (a durable response recorded itself before its end)
        _run_end_hooks(ctx)
    assert [message["type"] for message in sent] == ["http.response.start",
                                                     "http.response.body"]
    return ctx.request_id


async def until(condition: Callable[[], bool], what: str, timeout_s: float = 15) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


@contextlib.contextmanager
def disk_full(slot: Path, checkpoint: str) -> Iterator[None]:
    """The journal in `slot` can neither grow nor write its checkpoint (module docstring)."""
    (segment,) = slot.glob("*.sgj")
    obstacle = slot / "checkpoint.tmp"
    if checkpoint == "directory":
        obstacle.mkdir()
    else:
        obstacle.symlink_to("/dev/full")
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # (else it kills the process)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (segment.stat().st_size, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
        if obstacle.is_dir() and not obstacle.is_symlink():
            obstacle.rmdir()
        else:
            obstacle.unlink()


async def outage_filling_the_disk(layer: MeteringMiddleware, proxy: TcpProxy
                                  ) -> list[str]:
    """PostgreSQL goes away and 45 requests are journaled; their ids."""
    await proxy.stop()
    journaled = [await request(layer) for _ in range(45)]
    await until(lambda: layer.journal.pending_count() == 45, "the records were not journaled")
    return journaled


@pytest.mark.parametrize("checkpoint", ["directory", "/dev/full"])
async def test_once_postgresql_answers_every_record_reaches_it_once(
        tmp_path: Path, prefix: str, checkpoint: str) -> None:
    # The replay wrote its first batch and could not save the journal's position, so it
    # sent that batch again for ever; a batch the journal could not take waited in memory
    # behind it, and no later record reached PostgreSQL.
    proxy = TcpProxy(5432)
    await proxy.start()
    layer = metering(proxy, prefix, tmp_path)
    await layer.startup()
    try:
        sent = await outage_filling_the_disk(layer, proxy)
        with disk_full(layer.journal.directory, checkpoint):
            sent += [await request(layer) for _ in range(35)]  # kept in neither: in memory
            await asyncio.sleep(0.3)
            await proxy.start()
            for _ in range(20):  # traffic while the journal is replayed
                sent.append(await request(layer))
                await asyncio.sleep(0.01)
            await until(lambda: set(events(prefix)) == set(sent), "records never arrived")
            await until(lambda: not layer._replaying and layer.journal.pending_count() == 0,
                        "the replay never ended")
            assert not layer.journal.checkpoint_saved  # (all that time)
        sent += [await request(layer) for _ in range(5)]  # the disk has room again
        await until(lambda: set(events(prefix)) == set(sent), "later records never arrived")
        await until(lambda: layer.journal.checkpoint_saved, "the checkpoint was never saved")
    finally:
        await layer.shutdown()
        await proxy.stop()
    assert len(events(prefix)) == rollup_requests(prefix) == len(set(sent)) == 105
    journal = Journal(layer.journal.directory, read_only=True)
    journal.open()
    assert journal.pending() == []  # every record is in PostgreSQL, the position saved


async def test_a_shutdown_on_a_full_disk_writes_what_postgresql_can_take(
        tmp_path: Path, prefix: str, caplog: pytest.LogCaptureFixture) -> None:
    # The replay at shutdown raised out of the writer (CRITICAL: the usage writer stopped),
    # and the batches the journal could not take were logged as lost.
    caplog.set_level(logging.INFO, logger="sluicegate.metering")
    proxy = TcpProxy(5432)
    await proxy.start()
    layer = metering(proxy, prefix, tmp_path)
    await layer.startup()
    try:
        sent = await outage_filling_the_disk(layer, proxy)
        with disk_full(layer.journal.directory, "directory"):
            sent += [await request(layer) for _ in range(35)]
            await asyncio.sleep(0.3)
            await proxy.start()
            await asyncio.wait_for(layer.shutdown(), timeout=20)
    finally:
        await proxy.stop()
    assert set(events(prefix)) == set(sent) and len(sent) == 80
    assert rollup_requests(prefix) == 80
    assert layer._writer_failed is None
    assert not [r for r in caplog.records if r.levelno >= logging.CRITICAL]
    assert "lost" not in caplog.text


async def test_a_durable_response_ends_once_postgresql_has_its_record(
        tmp_path: Path, prefix: str) -> None:
    # durability="response": the response waited for ever, though PostgreSQL was back.
    proxy = TcpProxy(5432)
    await proxy.start()
    layer = metering(proxy, prefix, tmp_path, durability="response")
    await layer.startup()
    try:
        await outage_filling_the_disk(layer, proxy)
        with disk_full(layer.journal.directory, "directory"):
            await proxy.start()
            await asyncio.sleep(0.3)  # (the replay has begun)
            request_id = await asyncio.wait_for(request(layer), timeout=10)
            assert request_id in events(prefix)  # before its response ended
    finally:
        await layer.shutdown()
        await proxy.stop()
