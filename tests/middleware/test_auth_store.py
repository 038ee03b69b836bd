"""Key stores against the real PostgreSQL (a fresh schema per test), the static store, and
the in-process cache: TTLs, invalidation across processes, and outages.

Outages are real: a store that was shut down, or a TCP proxy in front of PostgreSQL that
the test closes and reopens.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg import sql

from gateway.policy import Budget, Limits
from middleware.auth.keys import StaticKey, VirtualKey, hash_key
from middleware.auth.store import (
    MIGRATIONS,
    READ_ONLY_MESSAGE,
    UNKNOWN,
    CachedKeys,
    KeyConflict,
    KeyStore,
    KeyStoreReadOnly,
    KeyStoreUnavailable,
    PostgresKeyStore,
    StaticKeyStore,
    SubjectLimits,
    UnreadableLimits,
)
from tests.harness import free_port
from tests.tcp_proxy import TcpProxy

DSN = os.environ.get("SLUICEGATE_TEST_PG_DSN", "host=127.0.0.1 port=5432 dbname=test user=postgres")


# -- fixtures and helpers ----------------------------------------------------------------------

@pytest.fixture
def schema() -> Iterator[str]:
    name = "sg_auth_test_" + uuid.uuid4().hex[:12]
    yield name
    with psycopg.connect(DSN, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


def new_store(schema: str, dsn: str = DSN, **options: Any) -> PostgresKeyStore:
    # A channel per schema: another test's (or another run's) changes are never heard here.
    options = {"reconnect_min_s": 0.05, "reconnect_max_s": 0.3, "connect_timeout_s": 2.0,
               "channel": schema, **options}
    return PostgresKeyStore(dsn, schema=schema, **options)


@pytest.fixture
async def store(schema: str) -> AsyncIterator[PostgresKeyStore]:
    s = new_store(schema)
    await s.startup()
    yield s
    await s.shutdown()


@pytest.fixture
async def other(schema: str, store: PostgresKeyStore) -> AsyncIterator[PostgresKeyStore]:
    """A second gateway process's store on the same database and schema."""
    s = new_store(schema)
    await s.startup()
    yield s
    await s.shutdown()


def run_sql(query: str, *params: Any, schema: str | None = None) -> list[tuple[Any, ...]]:
    """Straight to PostgreSQL, bypassing the store (so no NOTIFY is sent)."""
    with psycopg.connect(DSN, autocommit=True) as conn:
        if schema:
            conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
        cur = conn.execute(query.encode(), params)
        return cur.fetchall() if cur.description else []


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        if await check():
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)


async def drain_notifications(store: PostgresKeyStore) -> None:
    """Waits until the store has heard back its own NOTIFYs (each one evicts from caches):
    notifications reach a listener in commit order, so a marker sent now arrives last."""
    heard: list[str] = []
    store.subscribe(heard.append)
    marker = "test-marker:" + uuid.uuid4().hex
    run_sql("SELECT pg_notify(%s, %s)", store.channel, marker)

    async def arrived() -> bool:
        return marker in heard

    assert await eventually(arrived, 2.0)


async def create_settled(store: PostgresKeyStore, project: str) -> tuple[str, VirtualKey]:
    plaintext, key = await store.create(project)
    await drain_notifications(store)
    return plaintext, key


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def terminate_backend(pid: int | None) -> None:
    assert pid is not None
    run_sql("SELECT pg_terminate_backend(%s)", pid)


class CountingStore(StaticKeyStore):
    """A static store that counts lookups, answers slowly, and can be switched off."""

    def __init__(self, keys: list[StaticKey], delay_s: float = 0.0) -> None:
        super().__init__(keys)
        self.calls = 0
        self.delay_s = delay_s
        self.down = False
        self.callbacks: list[Callable[[str], None]] = []

    def subscribe(self, callback: Callable[[str], None]) -> None:
        self.callbacks.append(callback)

    async def find(self, key_hash: str) -> VirtualKey | None:
        self.calls += 1
        await asyncio.sleep(self.delay_s)
        if self.down:
            raise KeyStoreUnavailable("switched off by the test")
        return await super().find(key_hash)


def static_keys(*plaintexts: str) -> list[StaticKey]:
    return [StaticKey("acme", key_hash=hash_key(p)) for p in plaintexts]


def test_stores_satisfy_the_protocol() -> None:
    stores: list[KeyStore] = [StaticKeyStore([]), PostgresKeyStore(DSN)]
    assert len(stores) == 2


# -- schema and migrations ---------------------------------------------------------------------

def schema_versions(schema: str) -> list[tuple[Any, ...]]:
    return run_sql("SELECT version, description FROM sluicegate_auth_schema_version "
                   "ORDER BY version", schema=schema)


async def test_startup_creates_versioned_tables(store: PostgresKeyStore, schema: str) -> None:
    assert schema_versions(schema) == [(v, d) for v, d, _ in MIGRATIONS]
    tables = {r[0] for r in run_sql(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = %s", schema)}
    assert tables == {"sluicegate_auth_schema_version", "sluicegate_keys",
                      "sluicegate_subject_limits"}
    unique = run_sql("SELECT indexdef FROM pg_indexes WHERE schemaname = %s AND "
                     "tablename = 'sluicegate_keys' AND indexdef LIKE '%%UNIQUE%%key_hash%%'",
                     schema)
    assert len(unique) == 1


async def test_migrations_are_idempotent(store: PostgresKeyStore, schema: str) -> None:
    plaintext, key = await store.create("acme")
    await store.shutdown()
    await store.startup()
    again = new_store(schema)
    await again.startup()
    try:
        assert schema_versions(schema) == [(v, d) for v, d, _ in MIGRATIONS]
        assert await again.find(hash_key(plaintext)) == key
    finally:
        await again.shutdown()


async def test_keys_of_a_version_2_schema_are_their_own_accounts(schema: str) -> None:
    # A schema as version 2 left it, one key in it: migration 3 adds the account, and the
    # key (no account stored) is its own; a rotation of it gives its account to the new key.
    with psycopg.connect(DSN, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
        conn.execute(b"CREATE TABLE sluicegate_auth_schema_version (version integer PRIMARY "
                     b"KEY, description text NOT NULL, applied_at timestamptz NOT NULL "
                     b"DEFAULT now())")
        for version, description, statements in MIGRATIONS[:2]:
            conn.execute(statements.encode())
            conn.execute(b"INSERT INTO sluicegate_auth_schema_version (version, description) "
                         b"VALUES (%s, %s)", (version, description))
        conn.execute(b"INSERT INTO sluicegate_keys (id, key_hash, hint, project) "
                     b"VALUES ('key_old', %s, 'sk-sg-...old', 'acme')", (hash_key("sk-sg-old"),))
    store = new_store(schema)
    await store.startup()
    try:
        assert schema_versions(schema) == [(v, d) for v, d, _ in MIGRATIONS]
        old = await store.find(hash_key("sk-sg-old"))
        assert old is not None and (old.account, old.account_id) == (None, "key_old")
        rotated = await store.rotate("key_old")
        assert rotated is not None and rotated[1].account_id == "key_old"
    finally:
        await store.shutdown()


async def test_concurrent_startup_migrates_once(schema: str) -> None:
    stores = [new_store(schema) for _ in range(5)]
    try:
        await asyncio.gather(*(s.startup() for s in stores))
        assert schema_versions(schema) == [(v, d) for v, d, _ in MIGRATIONS]
        plaintext, key = await stores[0].create("acme")
        assert all([await s.find(hash_key(plaintext)) == key for s in stores])
    finally:
        await asyncio.gather(*(s.shutdown() for s in stores))


async def test_startup_against_a_closed_port_fails_clearly() -> None:
    dsn = f"host=127.0.0.1 port={free_port()} dbname=test user=postgres password=hunter2-secret"
    s = PostgresKeyStore(dsn, connect_timeout_s=0.5)
    with pytest.raises(KeyStoreUnavailable, match="could not reach PostgreSQL") as info:
        await s.startup()
    assert "hunter2" not in str(info.value)
    assert "hunter2" not in repr(s)
    with pytest.raises(KeyStoreUnavailable):
        await s.find(hash_key("anything"))


def test_a_bad_dsn_is_refused_without_echoing_it() -> None:
    with pytest.raises(ValueError, match="not a valid") as info:
        PostgresKeyStore("host=db password=hunter2-secret oops")
    assert info.value.__context__ is None and "hunter2" not in str(info.value)


async def test_check_ready(store: PostgresKeyStore) -> None:
    assert await store.check_ready() == {"auth_keys_postgres": "ok"}
    await store.shutdown()
    assert (await store.check_ready())["auth_keys_postgres"].startswith("error:")
    with pytest.raises(KeyStoreUnavailable, match="not started"):
        await store.find(hash_key("anything"))


# -- keys --------------------------------------------------------------------------------------

async def test_create_stores_only_the_hash(store: PostgresKeyStore, schema: str) -> None:
    expires = datetime(2030, 1, 1, tzinfo=UTC)
    plaintext, key = await store.create(
        "acme", allowed_models=["gpt-*"], expires_at=expires, require_customer=True,
        metadata={"team": "ml"}, limits=Limits(rpm=60, budgets=(Budget("12.5", "daily"),)))
    assert plaintext.startswith("sk-sg-")
    assert key.key_hash == hash_key(plaintext)
    assert key.hint == "sk-sg-…" + plaintext[-4:]
    assert (key.project, key.allowed_models, key.expires_at) == ("acme", ("gpt-*",), expires)
    assert key.require_customer and not key.disabled and key.revoked_at is None
    assert key.metadata == {"team": "ml"}
    assert key.limits == Limits(rpm=60, budgets=(Budget("12.5", "daily"),))
    assert key.created_at.tzinfo is not None
    assert await store.find(hash_key(plaintext)) == key
    assert await store.get(key.id) == key
    rows = run_sql("SELECT row_to_json(k)::text FROM sluicegate_keys k", schema=schema)
    assert len(rows) == 1 and plaintext not in rows[0][0] and plaintext[6:] not in rows[0][0]


async def test_find_get_and_list(store: PostgresKeyStore) -> None:
    _, a = await store.create("acme")
    _, b = await store.create("globex")
    _, c = await store.create("acme")
    assert await store.find(hash_key("sk-sg-never-issued")) is None
    assert await store.get("key_0000000000000000") is None
    assert [k.id for k in await store.list()] == [a.id, b.id, c.id]
    assert [k.id for k in await store.list("acme")] == [a.id, c.id]
    assert await store.list("nobody") == []


async def test_update(store: PostgresKeyStore) -> None:
    _, key = await store.create("acme")
    later = datetime(2031, 6, 1, tzinfo=UTC)
    updated = await store.update(key.id, allowed_models=("claude-*",), expires_at=later,
                                 disabled=True, require_customer=True, metadata={"x": 1},
                                 limits=Limits(tpm=1000))
    assert updated is not None
    assert (updated.allowed_models, updated.expires_at, updated.disabled) == (
        ("claude-*",), later, True)
    assert updated.require_customer and updated.metadata == {"x": 1}
    assert updated.limits == Limits(tpm=1000)
    assert (updated.id, updated.key_hash, updated.project) == (key.id, key.key_hash, "acme")
    assert await store.find(key.key_hash) == updated
    cleared = await store.update(key.id, expires_at=None)
    assert cleared is not None and cleared.expires_at is None and cleared.disabled
    assert await store.update(key.id) == cleared
    assert await store.update("key_missing", disabled=True) is None
    with pytest.raises(ValueError, match="unknown key field"):
        await store.update(key.id, project="other")
    with pytest.raises(TypeError):
        await store.update(key.id, disabled="yes")


async def test_revoke(store: PostgresKeyStore) -> None:
    _, key = await store.create("acme")
    revoked = await store.revoke(key.id)
    assert revoked is not None and revoked.revoked_at is not None
    assert revoked.usable(datetime.now(UTC)) == "revoked"
    again = await store.revoke(key.id)
    assert again is not None and again.revoked_at == revoked.revoked_at
    assert await store.revoke("key_missing") is None


async def test_rotate(store: PostgresKeyStore) -> None:
    old_plaintext, old = await store.create("acme", allowed_models=["gpt-*"],
                                            metadata={"a": 1}, limits=Limits(rpm=3))
    rotated = await store.rotate(old.id)
    assert rotated is not None
    plaintext, new = rotated
    assert plaintext != old_plaintext and new.key_hash == hash_key(plaintext)
    assert new.id != old.id
    assert (new.project, new.allowed_models, new.metadata, new.limits) == (
        "acme", ("gpt-*",), {"a": 1}, Limits(rpm=3))
    assert new.revoked_at is None
    assert (old.account_id, new.account_id) == (old.id, old.id)  # (its limits and spend)
    old_now = await store.find(old.key_hash)
    assert old_now is not None and old_now.revoked_at is not None
    with pytest.raises(KeyConflict, match="revoked"):
        await store.rotate(old.id)
    assert await store.rotate("key_missing") is None


@pytest.mark.parametrize(("state", "reason"), [
    ({"disabled": True}, "disabled"),
    ({"expires_at": datetime(2001, 1, 1, tzinfo=UTC)}, "expired")])
async def test_rotate_refuses_a_key_its_replacement_could_not_be_used_for(
        store: PostgresKeyStore, state: dict[str, Any], reason: str) -> None:
    _, key = await store.create("acme")
    changed = await store.update(key.id, **state)
    with pytest.raises(KeyConflict, match=f"{reason}.*first"):
        await store.rotate(key.id)
    assert await store.get(key.id) == changed  # not revoked
    assert [k.id for k in await store.list("acme")] == [key.id]  # and nothing created


async def test_subject_limits(store: PostgresKeyStore) -> None:
    assert await store.subject_limits("project", "acme") is None
    assert await store.set_limits("project", "acme", Limits(rpm=10)) is True
    assert await store.set_limits("customer", "acme/alice", Limits(tpm=5)) is True
    assert await store.set_limits("project", "acme", Limits(rpm=20)) is True  # replaces
    assert await store.subject_limits("project", "acme") == Limits(rpm=20)
    assert await store.get_limits("customer", "acme/alice") == Limits(tpm=5)
    assert await store.list_limits() == [
        SubjectLimits("customer", "acme/alice", Limits(tpm=5)),
        SubjectLimits("project", "acme", Limits(rpm=20))]
    assert await store.list_limits("project") == [SubjectLimits("project", "acme",
                                                                Limits(rpm=20))]
    assert await store.set_limits("project", "acme", None) is True
    assert await store.set_limits("project", "acme", None) is False
    assert await store.get_limits("project", "acme") is None
    for kind, subject in (("model", "gpt-4o"), ("customer", "alice"), ("project", "a/b")):
        with pytest.raises(ValueError):
            await store.set_limits(kind, subject, Limits(rpm=1))
    with pytest.raises(ValueError):
        await store.list_limits("key")


# -- limits stored by the previous version -----------------------------------------------------

# Rows as 956f523 wrote them (its Limits.to_json of what its admin API accepted), and one
# that no version can read as one thing (stream_cutoff "no" was truthy to 956f523).
OLD_BUDGET = {"limit_usd": "10", "period": "monthly", "on_overflow": "block",
              "downgrade_to": None, "stream_cutoff": False, "on_store_error": "closed",
              "status": 402, "alert_at_percent": [50, 80, 100]}
OLD_DOCS = {
    "float_percent": ({"budgets": [{**OLD_BUDGET, "alert_at_percent": [50.0, 80.0, 100.0]}]},
                      Limits(budgets=(Budget("10"),))),
    "float_status": ({"budgets": [{**OLD_BUDGET, "status": 429.0}]},
                     Limits(budgets=(Budget("10", status=429),))),
    "int_cutoff": ({"budgets": [{**OLD_BUDGET, "stream_cutoff": 1}]},
                   Limits(budgets=(Budget("10", stream_cutoff=True),))),
    "empty_downgrade": ({"rpm": 100, "on_overflow": "block", "downgrade_to": ""},
                        Limits(rpm=100)),
}
UNREADABLE = {"budgets": [{**OLD_BUDGET, "stream_cutoff": "no"}]}


def store_key_limits(schema: str, key_id: str, document: Any) -> None:
    run_sql("UPDATE sluicegate_keys SET limits = %s::jsonb WHERE id = %s",
            json.dumps(document), key_id, schema=schema)


def store_subject_limits(schema: str, kind: str, subject_id: str, document: Any) -> None:
    run_sql("UPDATE sluicegate_subject_limits SET limits = %s::jsonb "
            "WHERE kind = %s AND subject_id = %s", json.dumps(document), kind, subject_id,
            schema=schema)


@pytest.mark.parametrize("name", sorted(OLD_DOCS))
async def test_a_key_row_the_previous_version_wrote_still_reads(
        store: PostgresKeyStore, schema: str, name: str) -> None:
    document, meant = OLD_DOCS[name]
    _, key = await store.create("legacy")
    _, other = await store.create("legacy", limits=Limits(rpm=7))
    store_key_limits(schema, key.id, document)
    found = await store.find(key.key_hash)
    assert found is not None and (found.limits, found.limits_error) == (meant, None)
    assert [(k.id, k.limits) for k in await store.list()] == [(key.id, meant),
                                                             (other.id, Limits(rpm=7))]


async def test_subject_limits_the_previous_version_wrote_still_read(
        store: PostgresKeyStore, schema: str) -> None:
    document, meant = OLD_DOCS["float_percent"]
    await store.set_limits("project", "legacy", Limits(rpm=1))
    await store.set_limits("customer", "legacy/alice", Limits(rpm=2))
    store_subject_limits(schema, "project", "legacy", document)
    assert await store.subject_limits("project", "legacy") == meant
    assert await store.list_limits() == [
        SubjectLimits("customer", "legacy/alice", Limits(rpm=2)),
        SubjectLimits("project", "legacy", meant)]


async def test_a_key_row_that_cannot_be_read_is_flagged_and_can_be_replaced(
        store: PostgresKeyStore, schema: str) -> None:
    _, key = await store.create("legacy")
    _, other = await store.create("legacy", limits=Limits(rpm=7))
    store_key_limits(schema, key.id, UNREADABLE)
    found = await store.get(key.id)
    assert found is not None and found.limits == Limits()
    assert found.limits_error is not None and "stream_cutoff" in found.limits_error
    assert [(k.id, k.limits_error is None) for k in await store.list()] == [
        (key.id, False), (other.id, True)]  # the other key still lists
    public = found.to_public_json()
    assert (public["limits"], public["limits_error"]) == (None, found.limits_error)
    with pytest.raises(KeyConflict, match="limits"):  # its replacement would have none
        await store.rotate(key.id)
    repaired = await store.update(key.id, limits=Limits(rpm=10))
    assert repaired is not None and (repaired.limits, repaired.limits_error) == (
        Limits(rpm=10), None)
    assert "limits_error" not in repaired.to_public_json()


async def test_subject_limits_that_cannot_be_read_are_flagged_and_can_be_replaced(
        store: PostgresKeyStore, schema: str) -> None:
    await store.set_limits("project", "legacy", Limits(rpm=1))
    await store.set_limits("project", "other", Limits(rpm=2))
    store_subject_limits(schema, "project", "legacy", UNREADABLE)
    with pytest.raises(UnreadableLimits, match="project 'legacy'.*stream_cutoff"):
        await store.subject_limits("project", "legacy")
    listed = await store.list_limits()
    assert [(item.subject_id, item.limits, item.error is None) for item in listed] == [
        ("legacy", Limits(), False), ("other", Limits(rpm=2), True)]
    assert await store.set_limits("project", "legacy", Limits(rpm=3)) is True
    assert await store.get_limits("project", "legacy") == Limits(rpm=3)


async def test_values_postgresql_cannot_hold_are_value_errors(store: PostgresKeyStore) -> None:
    """psycopg's DataError (a NUL in text) becomes the ValueError the contract promises."""
    for call in (store.get("key_\u0000"), store.list("a\u0000b"), store.revoke("key_\u0000"),
                 store.rotate("key_\u0000"), store.update("key_\u0000", disabled=True),
                 store.get_limits("project", "a\u0000b")):
        with pytest.raises(ValueError, match="NUL"):
            await call
    with pytest.raises(ValueError, match="NUL"):
        await store.create("acme", metadata={"note": "\u0000"})
    _, key = await store.create("acme", expires_at=datetime(9998, 12, 31, tzinfo=UTC))
    assert await store.get(key.id) == key
    never = datetime(9999, 12, 31, tzinfo=UTC)  # a static key may; a stored one may not
    with pytest.raises(ValueError, match="expires_at"):
        await store.create("acme", expires_at=never)
    with pytest.raises(ValueError, match="expires_at"):
        await store.update(key.id, expires_at=never)


# -- notifications -----------------------------------------------------------------------------

async def test_every_change_notifies_every_instance(
        store: PostgresKeyStore, other: PostgresKeyStore) -> None:
    heard: list[str] = []
    other.subscribe(heard.append)

    async def heard_token(token: str) -> bool:
        return token in heard

    _, key = await store.create("acme")
    assert await eventually(lambda: heard_token("key:" + key.key_hash), 2.0)
    await store.set_limits("customer", "acme/bob", Limits(rpm=1))
    assert await eventually(lambda: heard_token("limits:customer:acme/bob"), 2.0)
    heard.clear()
    await store.update(key.id, metadata={"x": 1})  # (not disabled: that key cannot rotate)
    assert await eventually(lambda: heard_token("key:" + key.key_hash), 2.0)
    heard.clear()
    rotated = await store.rotate(key.id)
    assert rotated is not None
    assert await eventually(lambda: heard_token("key:" + rotated[1].key_hash), 2.0)
    assert "key:" + key.key_hash in heard


async def test_a_channel_name_past_postgresqls_63_bytes_is_refused_at_construction(
        schema: str) -> None:
    """LISTEN takes such a name cut short and pg_notify refuses it: the store started, and
    then every change failed (a ValueError naming a NUL or a date, a 400 in the admin API)."""
    for channel in ("c" * 64, "é" * 32):
        with pytest.raises(ValueError, match="channel name is 64 bytes long; PostgreSQL's "
                                             "limit is 63"):
            new_store(schema, channel=channel)
    longest = (schema + "_" + "c" * 63)[:63]
    store, other = new_store(schema, channel=longest), new_store(schema, channel=longest)
    await store.startup()
    await other.startup()
    try:
        heard: list[str] = []
        other.subscribe(heard.append)
        _, key = await store.create("acme")
        await store.revoke(key.id)

        async def heard_it() -> bool:
            return "key:" + key.key_hash in heard

        assert await eventually(heard_it, 2.0)
    finally:
        await store.shutdown()
        await other.shutdown()


async def test_local_subscribers_hear_their_own_changes(store: PostgresKeyStore) -> None:
    heard: list[str] = []
    store.subscribe(heard.append)
    _, key = await store.create("acme")
    assert heard[:1] == ["key:" + key.key_hash]  # at once, without waiting for the NOTIFY


async def test_listener_reconnects_and_announces_everything(
        store: PostgresKeyStore, other: PostgresKeyStore) -> None:
    heard: list[str] = []
    other.subscribe(heard.append)
    old_pid = other.listener_pid
    terminate_backend(old_pid)

    async def announced() -> bool:
        return "*" in heard

    assert await eventually(announced, 5.0)
    assert other.listener_pid not in (None, old_pid)
    _, key = await store.create("acme")  # and it listens again

    async def heard_key() -> bool:
        return "key:" + key.key_hash in heard

    assert await eventually(heard_key, 2.0)


# -- the static store --------------------------------------------------------------------------

async def test_static_store() -> None:
    store = StaticKeyStore(
        [StaticKey("acme", key_hash=hash_key("sk-sg-one-one-one-one"), limits=Limits(rpm=1)),
         StaticKey("globex", key_hash=hash_key("sk-sg-two-two-two-two"), id="ops")],
        limits={("project", "acme"): Limits(rpm=100),
                ("customer", "acme/alice"): Limits(tpm=9)})
    await store.startup()
    found = await store.find(hash_key("sk-sg-one-one-one-one"))
    assert found is not None and found.project == "acme" and found.limits == Limits(rpm=1)
    assert await store.find(hash_key("sk-sg-unknown")) is None
    assert await store.get("ops") == await store.find(hash_key("sk-sg-two-two-two-two"))
    assert [k.project for k in await store.list()] == ["acme", "globex"]
    assert [k.id for k in await store.list("globex")] == ["ops"]
    assert await store.subject_limits("project", "acme") == Limits(rpm=100)
    assert await store.get_limits("customer", "acme/alice") == Limits(tpm=9)
    assert await store.subject_limits("project", "globex") is None
    # The auth layer's per-request lookups, without a coroutine: the same answers.
    assert store.find_now(hash_key("sk-sg-one-one-one-one")) == found
    assert store.find_now(hash_key("sk-sg-unknown")) is None
    assert store.subject_limits_now("project", "acme") == Limits(rpm=100)
    assert store.subject_limits_now("customer", "acme/alice") == Limits(tpm=9)
    assert store.subject_limits_now("project", "globex") is None
    assert [s.kind for s in await store.list_limits()] == ["customer", "project"]
    assert await store.check_ready() == {"auth_keys_static": "ok"}
    changes: list[Awaitable[Any]] = [
        store.create("acme"), store.revoke("ops"), store.rotate("ops"),
        store.update("ops", disabled=True), store.set_limits("project", "acme", None)]
    for change in changes:
        with pytest.raises(KeyStoreReadOnly, match=READ_ONLY_MESSAGE):
            await change


def test_static_store_refuses_duplicates_and_bad_limits() -> None:
    with pytest.raises(ValueError, match="same key"):
        StaticKeyStore(static_keys("sk-sg-same-same-same", "sk-sg-same-same-same"))
    with pytest.raises(ValueError, match="id 'x'"):
        StaticKeyStore([StaticKey("a", key_hash=hash_key("k1"), id="x"),
                        StaticKey("b", key_hash=hash_key("k2"), id="x")])
    with pytest.raises(ValueError):
        StaticKeyStore([], limits={("model", "gpt-4o"): Limits(rpm=1)})
    with pytest.raises(TypeError):
        StaticKeyStore([], limits={("project", "acme"): {"rpm": 1}})  # type: ignore[dict-item]


# -- the cache ---------------------------------------------------------------------------------

async def test_cache_serves_within_ttl_then_asks_again(
        store: PostgresKeyStore, schema: str) -> None:
    clock = FakeClock()
    cache = CachedKeys(store, ttl_s=30, clock=clock)
    _, key = await create_settled(store, "acme")
    assert cache.find_now(key.key_hash) is UNKNOWN  # (the auth layer then awaits find)
    assert cache.subject_limits_now("project", "acme") is UNKNOWN
    assert await cache.find(key.key_hash) == key
    assert await cache.subject_limits("project", "acme") is None
    assert cache.subject_limits_now("project", "acme") is None  # known: no limits
    run_sql("UPDATE sluicegate_keys SET disabled = true", schema=schema)  # no NOTIFY
    clock.now += 29.9
    assert cache.find_now(key.key_hash) == key  # what find answers, without a coroutine
    # ("No limits" is a negative entry: asked again after negative_ttl_s, as find does.)
    assert cache.subject_limits_now("project", "acme") is UNKNOWN
    cached = await cache.find(key.key_hash)
    assert cached is not None and not cached.disabled
    clock.now += 0.2
    assert cache.find_now(key.key_hash) is UNKNOWN
    fresh = await cache.find(key.key_hash)
    assert fresh is not None and fresh.disabled
    assert cache.find_now(key.key_hash) == fresh


async def test_cache_remembers_unknown_keys_briefly(
        store: PostgresKeyStore, schema: str) -> None:
    clock = FakeClock()
    cache = CachedKeys(store, negative_ttl_s=2, clock=clock)
    _, key = await create_settled(store, "acme")
    unknown = hash_key("sk-sg-not-yet-issued")
    assert await cache.find(unknown) is None
    run_sql("UPDATE sluicegate_keys SET key_hash = %s", unknown, schema=schema)  # no NOTIFY
    clock.now += 1.9
    assert cache.find_now(unknown) is None  # known not to exist (not UNKNOWN)
    assert await cache.find(unknown) is None
    clock.now += 0.2
    assert cache.find_now(unknown) is UNKNOWN
    found = await cache.find(unknown)
    assert found is not None and found.id == key.id


async def test_revoke_reaches_another_instances_cache_within_a_second(
        store: PostgresKeyStore, other: PostgresKeyStore) -> None:
    cache = CachedKeys(other, ttl_s=30, negative_ttl_s=30)
    _, key = await store.create("acme")
    await drain_notifications(other)
    before = await cache.find(key.key_hash)
    assert before is not None and before.revoked_at is None
    assert await cache.subject_limits("project", "acme") is None
    await store.revoke(key.id)

    async def revoked() -> bool:
        seen = await cache.find(key.key_hash)
        return seen is not None and seen.revoked_at is not None

    assert await eventually(revoked, 1.0)
    await store.set_limits("project", "acme", Limits(rpm=7))

    async def limited() -> bool:
        return await cache.subject_limits("project", "acme") == Limits(rpm=7)

    assert await eventually(limited, 1.0)


async def test_whether_customers_have_limits_is_cached_and_dropped_with_theirs(
        store: PostgresKeyStore, other: PostgresKeyStore) -> None:
    """What the auth layer reads during an outage for a customer it has not seen: known per
    project, and dropped on every instance when any of its customers' limits change."""
    cache = CachedKeys(other, ttl_s=300)
    await store.set_limits("project", "acme", Limits(rpm=7))  # a project's own: not a customer's
    await store.set_limits("customer", "acme2/bob", Limits(rpm=1))  # another project's
    await drain_notifications(other)
    assert await cache.has_customer_limits("acme") is False
    assert cache.has_customer_limits_now("acme") is False
    assert await cache.has_customer_limits("acme2") is True
    await store.set_limits("customer", "acme/alice", Limits(rpm=1))

    async def heard() -> bool:
        return await cache.has_customer_limits("acme")

    assert await eventually(heard, 1.0)
    await store.set_limits("customer", "acme/alice", None)

    async def gone() -> bool:
        return not await cache.has_customer_limits("acme")

    assert await eventually(gone, 1.0)
    static = StaticKeyStore([], limits={("customer", "acme/alice"): Limits(rpm=1)})
    assert await static.has_customer_limits("acme") is True
    assert await static.has_customer_limits("acm") is False


async def test_customers_without_limits_are_kept_apart_served_stale_and_dropped_when_changed(
        store: PostgresKeyStore, other: PostgresKeyStore) -> None:
    """Customers known to have no limits are an LRU of their own (any caller may name
    any number of them), dropped on every instance as their limits change, and served
    stale while the store is away, as long as they are kept."""
    clock = FakeClock()
    cache = CachedKeys(other, ttl_s=300, max_entries=1, max_customers_without_limits=1,
                       clock=clock)
    await store.set_limits("project", "acme", Limits(rpm=7))
    await drain_notifications(other)
    assert await cache.subject_limits("project", "acme") == Limits(rpm=7)
    assert await cache.subject_limits("customer", "acme/alice") is None
    await store.set_limits("customer", "acme/alice", Limits(rpm=1))

    async def limited() -> bool:
        return await cache.subject_limits("customer", "acme/alice") == Limits(rpm=1)

    assert await eventually(limited, 1.0)  # (kept where the project's were: pushed out)
    await store.set_limits("customer", "acme/alice", None)

    async def unlimited() -> bool:
        return await cache.subject_limits("customer", "acme/alice") is None

    assert await eventually(unlimited, 1.0)
    assert await cache.subject_limits("project", "acme") == Limits(rpm=7)
    assert await cache.subject_limits("customer", "acme/bob") is None  # alice's room
    await other.shutdown()
    clock.now += 301
    assert await cache.subject_limits("project", "acme") == Limits(rpm=7)  # stale
    assert await cache.subject_limits("customer", "acme/bob") is None  # stale
    with pytest.raises(KeyStoreUnavailable):
        await cache.subject_limits("customer", "acme/alice")


async def test_lost_listener_drops_the_cache(
        store: PostgresKeyStore, other: PostgresKeyStore, schema: str) -> None:
    cache = CachedKeys(other, ttl_s=300)
    _, key = await store.create("acme")
    await drain_notifications(other)
    assert await cache.find(key.key_hash) == key
    # Changed behind the stores' back, as if the NOTIFY was lost with the connection.
    run_sql("UPDATE sluicegate_keys SET disabled = true", schema=schema)
    terminate_backend(other.listener_pid)

    async def refreshed() -> bool:
        seen = await cache.find(key.key_hash)
        return seen is not None and seen.disabled

    assert await eventually(refreshed, 5.0)


async def test_cache_serves_stale_keys_while_the_store_is_shut_down(
        store: PostgresKeyStore) -> None:
    clock = FakeClock()
    cache = CachedKeys(store, ttl_s=30, stale_max_s=3600, clock=clock)
    _, key = await store.create("acme")
    await store.set_limits("project", "acme", Limits(rpm=5))
    await drain_notifications(store)
    assert await cache.find(key.key_hash) == key
    assert await cache.subject_limits("project", "acme") == Limits(rpm=5)
    assert await cache.subject_limits("project", "nolimits") is None
    await store.shutdown()
    clock.now += 31
    assert await cache.find(key.key_hash) == key
    assert await cache.subject_limits("project", "acme") == Limits(rpm=5)
    assert await cache.subject_limits("project", "nolimits") is None  # "no limits" is known
    with pytest.raises(KeyStoreUnavailable):
        await cache.find(hash_key("sk-sg-never-seen"))
    clock.now += 3600
    with pytest.raises(KeyStoreUnavailable):
        await cache.find(key.key_hash)


async def test_cache_through_a_postgres_outage_and_back(schema: str) -> None:
    proxy = TcpProxy(5432, port=free_port())
    await proxy.start()
    clock = FakeClock()
    store = new_store(schema, dsn=DSN.replace("port=5432", f"port={proxy.port}"), connect_timeout_s=1.0, query_timeout_s=2.0)
    await store.startup()
    heard: list[str] = []
    store.subscribe(heard.append)
    cache = CachedKeys(store, ttl_s=30, retry_after_failure_s=1.0, clock=clock)
    try:
        _, key = await create_settled(store, "acme")
        assert await cache.find(key.key_hash) == key
        await proxy.stop()  # PostgreSQL is gone: pooled and listening connections drop
        clock.now += 31
        assert await cache.find(key.key_hash) == key  # stale, but known callers keep going
        with pytest.raises(KeyStoreUnavailable):
            await cache.find(hash_key("sk-sg-new-during-outage"))
        assert (await store.check_ready())["auth_keys_postgres"].startswith("error:")
        await proxy.start()

        async def announced() -> bool:
            return "*" in heard

        assert await eventually(announced, 5.0)  # reconnected: everything may have changed
        assert cache.find_now(key.key_hash) is UNKNOWN  # asked again before its next use
        clock.now += 1.1
        assert await cache.find(key.key_hash) == key
    finally:
        await store.shutdown()
        with contextlib.suppress(AssertionError):
            await proxy.stop()


async def test_concurrent_misses_share_one_query() -> None:
    store = CountingStore(static_keys("sk-sg-aaaa-aaaa-aaaa"), delay_s=0.05)
    cache = CachedKeys(store)
    wanted = hash_key("sk-sg-aaaa-aaaa-aaaa")
    results = await asyncio.gather(*(cache.find(wanted) for _ in range(50)))
    assert store.calls == 1
    assert all(r is not None and r.key_hash == wanted for r in results)
    unknown = await asyncio.gather(*(cache.find(hash_key("nope")) for _ in range(10)))
    assert unknown == [None] * 10 and store.calls == 2


async def test_a_cancelled_caller_does_not_cancel_the_shared_query() -> None:
    store = CountingStore(static_keys("sk-sg-aaaa-aaaa-aaaa"), delay_s=0.05)
    cache = CachedKeys(store)
    wanted = hash_key("sk-sg-aaaa-aaaa-aaaa")
    first = asyncio.create_task(cache.find(wanted))
    second = asyncio.create_task(cache.find(wanted))
    await asyncio.sleep(0.01)
    first.cancel()
    found = await second
    assert found is not None and store.calls == 1
    with pytest.raises(asyncio.CancelledError):
        await first


async def test_cache_is_bounded_lru() -> None:
    plaintexts = ["sk-sg-key-a-aaaaaaaa", "sk-sg-key-b-bbbbbbbb", "sk-sg-key-c-cccccccc"]
    store = CountingStore(static_keys(*plaintexts))
    cache = CachedKeys(store, max_entries=2)
    a, b, c = (hash_key(p) for p in plaintexts)
    await cache.find(a)
    await cache.find(b)
    await cache.find(a)  # a is now the most recent
    assert store.calls == 2
    await cache.find(c)  # evicts b
    assert len(cache) == 2
    await cache.find(a)
    await cache.find(c)
    assert store.calls == 3
    await cache.find(b)
    assert store.calls == 4


async def test_invalidation_during_a_load_is_not_overwritten() -> None:
    store = CountingStore(static_keys("sk-sg-aaaa-aaaa-aaaa"), delay_s=0.05)
    cache = CachedKeys(store)
    wanted = hash_key("sk-sg-aaaa-aaaa-aaaa")
    loading = asyncio.create_task(cache.find(wanted))
    await asyncio.sleep(0.01)
    for callback in store.callbacks:
        callback("key:" + wanted)  # the key changed while the (old) answer was in flight
    assert await loading is not None
    await cache.find(wanted)
    assert store.calls == 2  # the answer read before the change was not kept


async def test_invalidation_tokens() -> None:
    plaintexts = ["sk-sg-key-a-aaaaaaaa", "sk-sg-key-b-bbbbbbbb"]
    store = CountingStore(static_keys(*plaintexts))
    cache = CachedKeys(store)
    a, b = (hash_key(p) for p in plaintexts)
    await cache.find(a)
    await cache.find(b)
    cache.invalidate("key:" + a)
    cache.invalidate("limits:project:acme")  # unrelated tokens are harmless
    await cache.find(a)
    await cache.find(b)
    assert store.calls == 3
    cache.invalidate("*")  # (the listener reconnected: changes may have been missed)
    await cache.find(a)
    assert store.calls == 4  # asked again, though within its TTL
    await cache.find(a)
    assert store.calls == 4
    store.down = True  # a store just back that fails its first query: b is served stale
    assert await cache.find(b) is not None  # (it was a 503 for every known key)
    assert store.calls == 5


async def test_after_a_failure_the_store_is_left_alone_for_a_while() -> None:
    plaintexts = ["sk-sg-key-a-aaaaaaaa", "sk-sg-key-b-bbbbbbbb"]
    store = CountingStore(static_keys(*plaintexts))
    clock = FakeClock()
    cache = CachedKeys(store, ttl_s=10, retry_after_failure_s=1.0, clock=clock)
    a, b = (hash_key(p) for p in plaintexts)
    assert await cache.find(a) is not None
    store.down = True
    clock.now += 11
    assert await cache.find(a) is not None  # stale
    assert store.calls == 2
    with pytest.raises(KeyStoreUnavailable):
        await cache.find(b)
    assert await cache.find(a) is not None
    assert store.calls == 2  # neither lookup went to the failed store
    store.down = False
    clock.now += 1.0
    assert await cache.find(b) is not None
    assert store.calls == 3


async def test_a_store_that_hangs_is_probed_by_one_lookup_at_a_time() -> None:
    """A lookup that outlasts `lookup_timeout_s` goes on in the background, and until it
    has ended no other starts, however long ago it began: each new key would have waited
    for its own (a hung PostgreSQL: 5 s each). Its answer opens the store again."""
    plaintexts = ["sk-sg-key-a-aaaaaaaa", "sk-sg-key-b-bbbbbbbb", "sk-sg-key-c-cccccccc"]
    store = CountingStore(static_keys(*plaintexts))
    clock = FakeClock()
    cache = CachedKeys(store, ttl_s=10, retry_after_failure_s=1.0, lookup_timeout_s=0.05,
                       clock=clock)
    a, b, c = (hash_key(p) for p in plaintexts)
    assert await cache.find(a) is not None
    store.delay_s = 2.0  # it takes the query, and answers long after lookup_timeout_s
    with pytest.raises(KeyStoreUnavailable):
        await cache.find(b)
    store.delay_s = 0
    clock.now += 11  # past the retry interval, and a's TTL
    assert await cache.find(a) is not None  # stale
    with pytest.raises(KeyStoreUnavailable):
        await cache.find(c)
    assert store.calls == 2  # b's lookup, still out: the only one

    async def answered() -> bool:
        with contextlib.suppress(KeyStoreUnavailable):
            return await cache.find(c) is not None
        return False

    assert await eventually(answered, 10.0)
    assert store.calls == 3
    assert cache.find_now(b) is not None  # (kept: the answer came after its caller left)


async def test_an_unknown_key_is_not_served_stale() -> None:
    store = CountingStore(static_keys("sk-sg-key-a-aaaaaaaa"))
    clock = FakeClock()
    cache = CachedKeys(store, negative_ttl_s=2, clock=clock)
    unknown = hash_key("sk-sg-maybe-created-during-the-outage")
    assert await cache.find(unknown) is None
    store.down = True
    clock.now += 2.1
    with pytest.raises(KeyStoreUnavailable):  # it may exist by now: not "no such key"
        await cache.find(unknown)


def test_far_future_is_still_a_datetime() -> None:
    # keys.expires_at round-trips through timestamptz; make sure aware values survive
    assert datetime(9999, 1, 1, tzinfo=UTC) - timedelta(days=1) > datetime.now(UTC)


class _PrincipalProbe:
    """An auth layer over an app that keeps the Principal each request got."""

    def __init__(self, **options: Any) -> None:
        from middleware.auth import AuthMiddleware

        self.seen: list[Any] = []
        self.layer = AuthMiddleware(self._app, **options)

    async def _app(self, scope: Any, receive: Any, send: Any) -> None:
        from gateway.context import CONTEXT_KEY
        self.seen.append(scope[CONTEXT_KEY].principal)

    async def principal(self, plaintext: str, customer: str | None = None) -> Any:
        from gateway.context import CONTEXT_KEY, OPENAI_CHAT, RequestContext
        headers = [(b"authorization", b"Bearer " + plaintext.encode())]
        if customer:
            headers.append((b"x-sluicegate-customer", customer.encode()))
        ctx = RequestContext(request_id="r", operation=OPENAI_CHAT, api_format="openai",
                             body={}, raw_body=b"{}", model="gpt-mock", stream=False)
        await self.layer({"type": "http", "headers": headers, CONTEXT_KEY: ctx}, None, None)
        return self.seen[-1]


async def test_the_auth_layer_reuses_a_principal_until_its_limits_change(
        store: PostgresKeyStore, other: PostgresKeyStore) -> None:
    """The layer makes one Principal per key and customer and keeps it while the key and its
    limits are the same objects; limits set on another instance reach it (a new Principal)."""
    probe = _PrincipalProbe(store=store)
    plaintext, _key = await store.create("memo", limits=Limits(rpm=10))
    await store.set_limits("project", "memo", Limits(tpm=100))
    # The store tells its subscribers of its own changes at once and hears them again from
    # PostgreSQL later; a Principal made before those NOTIFYs arrive would rightly be
    # replaced when they do, so let them arrive first.
    await drain_notifications(store)

    async def call(customer: str | None = None) -> Any:
        return await probe.principal(plaintext, customer)

    first = await call()
    assert await call() is first
    assert first.limits == {"key": Limits(rpm=10), "project": Limits(tpm=100)}
    acme = await call("acme")
    assert acme is not first and acme.customer == "acme" and "customer" not in acme.limits
    assert await call("acme") is acme

    await other.set_limits("customer", "memo/acme", Limits(rpm=3))
    deadline = time.monotonic() + 5
    while (await call("acme")).limits.get("customer") != Limits(rpm=3):
        assert time.monotonic() < deadline, "the new customer limits never arrived"
        await asyncio.sleep(0.05)
    assert await call() is first  # the key without a customer is unchanged

    await other.set_limits("project", "memo", Limits(budgets=(Budget("5"),)))
    deadline = time.monotonic() + 5
    while (changed := await call()) is first:
        assert time.monotonic() < deadline, "the new project limits never arrived"
        await asyncio.sleep(0.05)
    assert changed.limits["project"].budgets[0].limit_usd == 5
    assert await call() is changed


async def test_static_limits_come_first_then_the_stores(store: PostgresKeyStore) -> None:
    """With static keys and a store: a subject's limits from the config win; a subject the
    config has no limits for gets the store's (for static and stored keys alike)."""
    static_plaintext = "sk-sg-static-first-0123456789abcdef"
    probe = _PrincipalProbe(store=store,
                            keys=[StaticKey("acme", key_hash=hash_key(static_plaintext))],
                            limits={("project", "acme"): Limits(rpm=5),
                                    ("customer", "acme/alice"): Limits(tpm=7)})
    call = probe.principal
    await store.set_limits("project", "acme", Limits(rpm=500))  # the config's wins
    await store.set_limits("customer", "acme/bob", Limits(tpm=70))
    stored_plaintext, _key = await store.create("globex")
    await store.set_limits("project", "globex", Limits(rpm=40))

    assert (await call(static_plaintext)).limits == {"project": Limits(rpm=5)}
    assert (await call(static_plaintext, "alice")).limits == {
        "project": Limits(rpm=5), "customer": Limits(tpm=7)}
    assert (await call(static_plaintext, "bob")).limits == {
        "project": Limits(rpm=5), "customer": Limits(tpm=70)}
    assert (await call(stored_plaintext)).limits == {"project": Limits(rpm=40)}


async def test_the_auth_layer_refuses_what_unreadable_limits_govern_and_serves_the_rest(
        store: PostgresKeyStore, schema: str) -> None:
    """Limits the previous version wrote apply as it meant them; limits no version can read
    refuse the requests they govern (503, never served without them), and only those."""
    from gateway.errors import GatewayError

    probe = _PrincipalProbe(store=store)
    legacy_plaintext, legacy = await store.create("legacy")
    broken_plaintext, broken = await store.create("legacy")
    fine_plaintext, _fine = await store.create("fine")
    store_key_limits(schema, legacy.id, OLD_DOCS["float_status"][0])
    store_key_limits(schema, broken.id, UNREADABLE)
    await store.set_limits("customer", "fine/alice", Limits(rpm=1))
    store_subject_limits(schema, "customer", "fine/alice", UNREADABLE)

    assert (await probe.principal(legacy_plaintext)).limits == {
        "key": OLD_DOCS["float_status"][1]}
    assert (await probe.principal(fine_plaintext, "bob")).limits == {}
    for plaintext, customer in ((broken_plaintext, None), (fine_plaintext, "alice")):
        with pytest.raises(GatewayError) as refused:
            await probe.principal(plaintext, customer)
        assert (refused.value.status, refused.value.code) == (503, "limits_unreadable")
