"""The PostgreSQL key store after its pooled connections were cut while idle: PostgreSQL
restarted or failed over (the backends terminated, as a restart does), or
`idle_session_timeout` (or PgBouncer, or a firewall) reaping idle sessions.

While PostgreSQL answers, a broken idle connection is never the caller's problem: the
lookup or change runs again, once, on a new connection; a write only when it cannot have
been applied (its BEGIN failed), so it is never applied twice.
"""
from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from middleware.auth.keys import hash_key
from middleware.auth.store import CachedKeys, KeyStoreUnavailable, PostgresKeyStore
from tests.middleware.test_auth_store import (
    DSN,
    drain_notifications,
    eventually,
    new_store,
    run_sql,
)

POOL_SIZE = 4


@pytest.fixture
def schema() -> Iterator[str]:
    name = "sg_auth_reconnect_" + uuid.uuid4().hex[:12]
    yield name
    with psycopg.connect(DSN, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


@pytest.fixture
async def store(schema: str) -> AsyncIterator[PostgresKeyStore]:
    s = new_store(schema, pool_max_size=POOL_SIZE)
    await s.startup()
    yield s
    await s.shutdown()


def pool_backends(schema: str, state: str = "idle") -> list[int]:
    """The pids of the pool's connections whose last query read this test's schema (other
    tests' stores, in this run or another, are left alone)."""
    rows = run_sql("SELECT pid FROM pg_stat_activity WHERE application_name = 'sluicegate-auth' "
                   "AND state = %s AND position(%s in query) > 0", state, f'"{schema}"')
    return [pid for (pid,) in rows]


async def warm_pool(store: PostgresKeyStore, schema: str) -> list[int]:
    """Fills the pool with idle connections (concurrent lookups each take one)."""
    keys = [(await store.create("warm"))[1] for _ in range(POOL_SIZE)]
    assert await asyncio.gather(*(store.find(key.key_hash) for key in keys)) == keys
    pids = pool_backends(schema)
    assert len(pids) == POOL_SIZE
    return pids


def terminate(pids: list[int]) -> None:
    """What a PostgreSQL restart does to each session: FATAL 57P01, then the socket closes."""
    for pid in pids:
        run_sql("SELECT pg_terminate_backend(%s)", pid)


def keys_of(schema: str, project: str) -> list[tuple[Any, ...]]:
    return run_sql("SELECT id, key_hash, revoked_at FROM sluicegate_keys WHERE project = %s "
                   "ORDER BY created_at, id", project, schema=schema)


async def test_an_uncached_key_is_found_at_once_after_the_pool_was_cut(
        store: PostgresKeyStore, schema: str) -> None:
    """Each lookup took the next dead connection: with four, 503s for ~4 s (one probe a
    second, `retry_after_failure_s`), though PostgreSQL was up all along."""
    new_keys = [(await store.create("acme"))[1] for _ in range(POOL_SIZE + 1)]
    terminate(await warm_pool(store, schema))
    cache = CachedKeys(store)
    for key in new_keys:  # (none looked up before: nothing to serve stale)
        assert await cache.find(key.key_hash) == key
    assert await cache.find(hash_key("sk-sg-made-up")) is None


async def test_a_revoke_right_after_the_pool_was_cut_is_applied_once(
        store: PostgresKeyStore, schema: str) -> None:
    other = new_store(schema)
    await other.startup()
    try:
        heard: list[str] = []
        other.subscribe(heard.append)
        _, key = await store.create("acme")
        terminate(await warm_pool(store, schema))

        revoked = await store.revoke(key.id)

        assert revoked is not None and revoked.revoked_at is not None
        assert keys_of(schema, "acme") == [(key.id, key.key_hash, revoked.revoked_at)]
        assert await store.get(key.id) == revoked
        await drain_notifications(other)
        assert heard.count("key:" + key.key_hash) == 2  # its creation, then one revoke
    finally:
        await other.shutdown()


async def test_a_rotate_and_a_create_right_after_the_pool_was_cut_are_applied_once(
        store: PostgresKeyStore, schema: str) -> None:
    """Neither is idempotent: run twice, a rotate would fail on the key the first run
    revoked, and a create would leave a second key whose plaintext nobody saw."""
    _, key = await store.create("acme")
    terminate(await warm_pool(store, schema))
    rotated = await store.rotate(key.id)
    assert rotated is not None
    plaintext, new = rotated
    rows = keys_of(schema, "acme")
    assert [(key_id, revoked_at is not None) for key_id, _, revoked_at in rows] == [
        (key.id, True), (new.id, False)]
    assert (await store.find(hash_key(plaintext))) == new

    terminate(await warm_pool(store, schema))
    plaintext, created = await store.create("fresh")
    assert [key_id for key_id, _, _ in keys_of(schema, "fresh")] == [created.id]
    assert (await store.find(hash_key(plaintext))) == created


async def test_connections_reaped_by_idle_session_timeout_are_replaced(schema: str) -> None:
    """PostgreSQL 14+ ends a session idle for `idle_session_timeout` (FATAL 57P05), as
    PgBouncer's `server_idle_timeout` or a firewall would: every idle pooled connection."""
    store = new_store(schema, dsn=make_conninfo(DSN, options="-c idle_session_timeout=300"))
    await store.startup()
    try:
        _, key = await store.create("acme")
        await warm_pool(store, schema)
        await asyncio.sleep(0.6)
        assert pool_backends(schema) == []  # all reaped
        cache = CachedKeys(store)
        assert await cache.find(key.key_hash) == key
        await asyncio.sleep(0.6)
        revoked = await store.revoke(key.id)
        assert revoked is not None and revoked.revoked_at is not None
        await asyncio.sleep(0.6)
        assert await store.set_limits("project", "acme", None) is False
    finally:
        await store.shutdown()


async def test_a_write_whose_transaction_began_is_not_run_again(
        store: PostgresKeyStore, schema: str) -> None:
    """Once BEGIN has answered, a lost connection may have lost a COMMIT that happened:
    that is the store's failure, not a reason to run the write again. (Here the rotate
    waits on a row lock when its session ends: rolled back, and not done a second time.)"""
    _, key = await store.create("acme")
    await warm_pool(store, schema)
    with psycopg.connect(DSN, autocommit=True) as locker:
        with locker.transaction():
            locker.execute(sql.SQL("SELECT 1 FROM {} WHERE id = %s FOR UPDATE").format(
                sql.Identifier(schema, "sluicegate_keys")), (key.id,))
            rotating = asyncio.get_running_loop().create_task(store.rotate(key.id))

            async def waiting_on_the_lock() -> bool:
                return len(pool_backends(schema, state="active")) == 1

            assert await eventually(waiting_on_the_lock, 2.0)
            terminate(pool_backends(schema, state="active"))
            done, _ = await asyncio.wait([rotating], timeout=2.0)
        # (the lock is released: a write run again would now go through)
        await asyncio.wait([rotating], timeout=2.0)
    assert done, "the rotate was run again after its connection broke mid-transaction"
    with pytest.raises(KeyStoreUnavailable):
        rotating.result()
    assert keys_of(schema, "acme") == [(key.id, key.key_hash, None)]
