"""Where virtual keys and per-subject limits live, and the in-process cache in front of them.

Two stores share one contract (`KeyStore`): `StaticKeyStore`, the read-only keys of the
config module, and `PostgresKeyStore`, shared by every gateway process and changed through
the admin API. Every change is announced as an invalidation token on a PostgreSQL channel,
so `CachedKeys` in every process drops what changed within moments (a revoke takes effect
everywhere in about the time of one NOTIFY), while the request path never waits on
PostgreSQL for a key it has seen recently, even when PostgreSQL is down.
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple, Protocol, TypeVar

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg.pq import TransactionStatus
from psycopg.rows import TupleRow
from psycopg.types.json import Jsonb

from gateway.policy import Limits
from gateway.readiness import postgres_answers
from middleware.auth.keys import (
    StaticKey,
    VirtualKey,
    check_project,
    check_storable_key_fields,
    check_subject_id,
    fits_64_bits,
    generate_key,
    hash_key,
    key_hint,
    new_key_id,
)

logger = logging.getLogger("sluicegate")

LIMIT_KINDS = ("project", "customer")
EVERYTHING = "*"  # the invalidation token meaning "drop everything you cached"
UNKNOWN: Any = object()  # CachedKeys.find_now's "not known without asking the store"
READ_ONLY_MESSAGE = "keys declared in the config module are read-only"

Invalidation = Callable[[str], None]


def key_token(key_hash: str) -> str:
    return "key:" + key_hash


def limits_token(kind: str, subject_id: str) -> str:
    return f"limits:{kind}:{subject_id}"


def customer_limits_token(project: str) -> str:
    """Whether any customer of `project` has stored limits (dropped with any of theirs)."""
    return "customer-limits:" + project


# A key's status (`VirtualKey.usable`, "active" when usable) as a condition on its row.
_STATUS_CONDITIONS = {
    "revoked": "revoked_at IS NOT NULL",
    "disabled": "revoked_at IS NULL AND disabled",
    "expired": "revoked_at IS NULL AND NOT disabled AND expires_at <= now()",
    "active": "revoked_at IS NULL AND NOT disabled AND (expires_at IS NULL OR expires_at > now())",
}
KEY_STATUSES = tuple(_STATUS_CONDITIONS)


class KeyStoreError(Exception):
    """Base of the errors a key store raises on purpose."""


class KeyStoreUnavailable(KeyStoreError):
    """The store cannot be reached (PostgreSQL down, pool exhausted, store not started)."""


class KeyStoreReadOnly(KeyStoreError):
    """The store cannot be changed at run time (keys declared in the config module)."""


class KeyConflict(KeyStoreError):
    """The change contradicts the key's state (e.g. rotating a revoked key)."""


class UnreadableLimits(KeyStoreError):
    """The limits stored for a project or customer cannot be read, even as an older version
    wrote them (`Limits.from_stored`); replacing them (`set_limits`) repairs the row."""


class SubjectLimits(NamedTuple):
    kind: str  # "project" or "customer"
    subject_id: str  # a project name, or "<project>/<customer>"
    limits: Limits  # empty when `error` is set
    error: str | None = None  # why the stored limits cannot be read


KeyList = list[VirtualKey]
LimitsList = list[SubjectLimits]


class KeyStore(Protocol):
    """What the auth layer and the admin API need from a key store.

    Stores raise `KeyStoreUnavailable` when they cannot be reached, `KeyStoreReadOnly` for
    a change they do not accept, and `ValueError` for bad field values.
    """

    async def startup(self) -> None: ...

    async def shutdown(self) -> None: ...

    async def check_ready(self) -> dict[str, str]: ...

    async def find(self, key_hash: str) -> VirtualKey | None:
        """The key with this SHA-256 hex, revoked or not (the caller checks `usable`)."""

    async def subject_limits(self, kind: str, subject_id: str) -> Limits | None:
        """The limits stored for a project ("acme") or a customer ("acme/alice")."""

    async def has_customer_limits(self, project: str) -> bool:
        """Whether limits are stored for any customer of `project`."""

    async def create(
        self, project: str, *, allowed_models: Sequence[str] = (),
        expires_at: datetime | None = None, require_customer: bool = False,
        metadata: Mapping[str, Any] | None = None, limits: Limits | None = None,
    ) -> tuple[str, VirtualKey]:
        """A new key: (its plaintext, shown this once and never stored; its record)."""

    async def get(self, key_id: str) -> VirtualKey | None: ...

    async def list(self, project: str | None = None, *, status: str | None = None,
                   after: str | None = None, limit: int | None = None) -> KeyList:
        """Keys oldest first (by creation, then id): of `project`, of `status` (active,
        revoked, disabled or expired), after the key `after`, at most `limit`."""

    async def revoke(self, key_id: str) -> VirtualKey | None: ...

    async def rotate(self, key_id: str) -> tuple[str, VirtualKey] | None:
        """A new key with the same settings; the old one is revoked at once. `KeyConflict`
        for a revoked, disabled or expired key (its replacement would not work either)."""

    async def update(self, key_id: str, **fields: Any) -> VirtualKey | None:
        """Changes some of `keys.UPDATABLE_FIELDS`; None when there is no such key."""

    async def set_limits(self, kind: str, subject_id: str, limits: Limits | None) -> bool:
        """Stores (or with None, deletes) a subject's limits; False if there was nothing
        to delete."""

    async def get_limits(self, kind: str, subject_id: str) -> Limits | None: ...

    async def list_limits(self, kind: str | None = None) -> LimitsList: ...

    def subscribe(self, callback: Invalidation) -> None:
        """Calls `callback(token)`, on the event loop, whenever any gateway process changed
        something: "key:<hash>", "limits:<kind>:<subject_id>", or "*" for everything."""


# -- the config module's keys ------------------------------------------------------------------

class StaticKeyStore:
    """The keys and limits declared in the config module: read-only, no I/O. (`by_hash`
    and `limits`, never changed after __init__, are read directly by the auth layer on
    every request: a dictionary lookup costs less than a call of `find_now`.)"""

    def __init__(self, keys: Sequence[StaticKey],
                 limits: Mapping[tuple[str, str], Limits] | None = None) -> None:
        self.by_hash: dict[str, VirtualKey] = {}
        self._by_id: dict[str, VirtualKey] = {}
        for static in keys:
            key = static.to_virtual_key()
            if key.key_hash in self.by_hash:
                raise ValueError(f"keys {self.by_hash[key.key_hash].id} and {key.id} in the "
                                 "config module are the same key")
            if key.id in self._by_id:
                raise ValueError(f"two keys in the config module have the id {key.id!r}")
            self.by_hash[key.key_hash] = self._by_id[key.id] = key
        self.limits: dict[tuple[str, str], Limits] = {}
        for (kind, subject_id), value in (limits or {}).items():
            check_subject_id(kind, subject_id)
            if not isinstance(value, Limits):
                raise TypeError(f"the limits of {kind} {subject_id!r} must be Limits(...)")
            self.limits[kind, subject_id] = value

    async def startup(self) -> None:
        pass

    async def shutdown(self) -> None:
        pass

    async def check_ready(self) -> dict[str, str]:
        return {"auth_keys_static": "ok"}

    async def find(self, key_hash: str) -> VirtualKey | None:
        return self.find_now(key_hash)

    def find_now(self, key_hash: str) -> VirtualKey | None:
        """`find` without a coroutine to make and await (the auth layer's per-request path)."""
        return self.by_hash.get(key_hash)

    async def subject_limits(self, kind: str, subject_id: str) -> Limits | None:
        return self.subject_limits_now(kind, subject_id)

    def subject_limits_now(self, kind: str, subject_id: str) -> Limits | None:
        return self.limits.get((kind, subject_id))

    async def has_customer_limits(self, project: str) -> bool:
        return any(kind == "customer" and subject_id.startswith(project + "/")
                   for kind, subject_id in self.limits)

    async def get(self, key_id: str) -> VirtualKey | None:
        return self._by_id.get(key_id)

    async def list(self, project: str | None = None, *, status: str | None = None,
                   after: str | None = None, limit: int | None = None) -> KeyList:
        keys = sorted(self._by_id.values(), key=lambda k: (k.created_at, k.id))
        if after is not None:
            position = next((i for i, k in enumerate(keys) if k.id == after), None)
            keys = keys[position + 1:] if position is not None else []
        found = [k for k in keys if (project is None or k.project == project)
                 and (status is None or (k.usable() or "active") == status)]
        return found if limit is None else found[:limit]

    async def get_limits(self, kind: str, subject_id: str) -> Limits | None:
        return self.limits.get((kind, subject_id))

    async def list_limits(self, kind: str | None = None) -> LimitsList:
        return [SubjectLimits(k, s, v) for (k, s), v in sorted(self.limits.items())
                if kind is None or k == kind]

    def subscribe(self, callback: Invalidation) -> None:
        pass  # nothing ever changes

    async def create(self, project: str, **settings: Any) -> tuple[str, VirtualKey]:
        raise KeyStoreReadOnly(READ_ONLY_MESSAGE)

    async def revoke(self, key_id: str) -> VirtualKey | None:
        raise KeyStoreReadOnly(READ_ONLY_MESSAGE)

    async def rotate(self, key_id: str) -> tuple[str, VirtualKey] | None:
        raise KeyStoreReadOnly(READ_ONLY_MESSAGE)

    async def update(self, key_id: str, **fields: Any) -> VirtualKey | None:
        raise KeyStoreReadOnly(READ_ONLY_MESSAGE)

    async def set_limits(self, kind: str, subject_id: str, limits: Limits | None) -> bool:
        raise KeyStoreReadOnly(READ_ONLY_MESSAGE)


# -- PostgreSQL --------------------------------------------------------------------------------

# Numbered, append-only: a released migration is never edited, a change is a new number.
MIGRATIONS: tuple[tuple[int, str, str], ...] = (
    (1, "virtual keys", """
        CREATE TABLE sluicegate_keys (
            id text PRIMARY KEY,
            key_hash text NOT NULL UNIQUE,
            hint text NOT NULL,
            project text NOT NULL,
            allowed_models text[] NOT NULL DEFAULT '{}',
            expires_at timestamptz,
            disabled boolean NOT NULL DEFAULT false,
            require_customer boolean NOT NULL DEFAULT false,
            metadata jsonb NOT NULL DEFAULT '{}',
            limits jsonb NOT NULL DEFAULT '{}',
            created_at timestamptz NOT NULL DEFAULT now(),
            updated_at timestamptz NOT NULL DEFAULT now(),
            revoked_at timestamptz
        );
        CREATE INDEX sluicegate_keys_project ON sluicegate_keys (project, created_at);
    """),
    (2, "per-subject limits", """
        CREATE TABLE sluicegate_subject_limits (
            kind text NOT NULL CHECK (kind IN ('project', 'customer')),
            subject_id text NOT NULL,
            limits jsonb NOT NULL,
            updated_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (kind, subject_id)
        );
    """),
    (3, "key accounts (a rotated key keeps its limits and spend)", """
        ALTER TABLE sluicegate_keys ADD COLUMN account text;
    """),
)
VERSION_TABLE = "sluicegate_auth_schema_version"
_LOCK_CLASS = 0x53474155  # "SGAU": the advisory-lock namespace of these migrations

_KEY_COLUMNS = sql.SQL("id, key_hash, hint, project, allowed_models, expires_at, disabled, "
                       "require_customer, metadata, limits, created_at, revoked_at, account")
_INSERT_KEY = ("INSERT INTO {keys} (id, key_hash, hint, project, allowed_models, expires_at, "
               "disabled, require_customer, metadata, limits, account) "
               "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING {columns}")
_UNREACHABLE = (psycopg.OperationalError, psycopg.InterfaceError, TimeoutError, OSError)

Connection = psycopg.AsyncConnection[TupleRow]
T = TypeVar("T")


class _BrokenWhileIdle(Exception):
    """A reused connection failed before its work could have changed anything."""


class _Connections:
    """A few reusable connections, opened on demand.

    Not psycopg_pool: its background reconnection backs off exponentially, so after a long
    outage it may wait minutes before trying again; opening on demand uses a recovered
    PostgreSQL at once (and `CachedKeys` already limits how often we try while it is down).

    An idle connection is reused without a check (that would be a round trip more on every
    lookup). One cut while idle (PostgreSQL restarted or failed over, `idle_session_timeout`,
    PgBouncer or a firewall reaping idle sessions) fails its first command instead, and `run`
    then does the work again on a new connection: while PostgreSQL answers, a connection
    broken in the pool is never the caller's problem.
    """

    def __init__(self, dsn: str, *, max_size: int, connect_timeout_s: float) -> None:
        self._dsn = dsn
        self.connect_timeout_s = connect_timeout_s
        self._slots = asyncio.Semaphore(max_size)
        self._idle: list[Connection] = []
        self._closed = False

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Connection]:
        """A connection as it comes, not tried again (the migrations at startup)."""
        self._check_open()
        async with self._slots:
            conn = self._take_idle() or await self._open()
            try:
                yield conn
            finally:
                await self._release(conn)

    async def run(self, work: Callable[[Connection], Awaitable[T]], *, writes: bool) -> T:
        """`work(conn)`, in a transaction when it `writes`. When a reused connection turns
        out broken before `work` could have changed anything, the idle connections are
        dropped (a restart cut them all) and `work` runs once more on a new connection."""
        self._check_open()
        async with self._slots:
            conn = self._take_idle()
            if conn is not None:
                try:
                    return await self._attempt(conn, work, writes=writes, reused=True)
                except _BrokenWhileIdle as exc:
                    logger.info("key store: a pooled connection was broken (%s); "
                                "trying a new one", exc)
                    await self._drop_idle()
            return await self._attempt(await self._open(), work, writes=writes, reused=False)

    async def _attempt(self, conn: Connection, work: Callable[[Connection], Awaitable[T]], *,
                       writes: bool, reused: bool) -> T:
        applying = False  # whether the server may have run part of a write
        try:
            if not writes:  # (a read run twice changes nothing)
                return await work(conn)
            # Nothing is written before BEGIN has answered, and a session that ends inside
            # its transaction rolls it back: a write whose BEGIN failed never happened.
            async with conn.transaction():
                applying = True
                return await work(conn)
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            if reused and conn.closed and not applying:
                raise _BrokenWhileIdle(_describe(exc)) from exc
            raise
        finally:
            await self._release(conn)

    def _check_open(self) -> None:
        if self._closed:
            raise KeyStoreUnavailable("the key store is shut down")

    def _take_idle(self) -> Connection | None:
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed:
                return conn
        return None

    async def _open(self) -> Connection:
        # (libpq's connect_timeout counts whole seconds, 2 at the least)
        async with asyncio.timeout(self.connect_timeout_s):
            return await psycopg.AsyncConnection.connect(
                self._dsn, autocommit=True, application_name="sluicegate-auth",
                connect_timeout=max(2, int(self.connect_timeout_s)))

    async def _release(self, conn: Connection) -> None:
        # Reused only when idle: a cancelled query or a broken link is not.
        if (self._closed or conn.closed
                or conn.info.transaction_status != TransactionStatus.IDLE):
            await conn.close()
        else:
            self._idle.append(conn)

    async def _drop_idle(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.close()

    async def close(self) -> None:
        self._closed = True
        await self._drop_idle()


_MAX_IDENTIFIER_BYTES = 63  # PostgreSQL's NAMEDATALEN - 1 (a channel name is an identifier)


class PostgresKeyStore:
    """Keys and per-subject limits in PostgreSQL, shared by every gateway process.

    `startup` creates or migrates the tables in `schema`, opens a small connection pool
    and a dedicated LISTEN connection on `channel` (at most 63 bytes, PostgreSQL's limit on
    a name); every change sends a NOTIFY in its own transaction, and the listener passes it
    to the subscribers of every process. When the listener loses its connection it
    reconnects with backoff and then announces "*", since it may have missed changes
    meanwhile.
    """

    def __init__(self, dsn: str, *, schema: str = "public", channel: str = "sluicegate_auth",
                 pool_max_size: int = 4, connect_timeout_s: float = 5.0,
                 query_timeout_s: float = 5.0, listen_ping_s: float = 15.0,
                 reconnect_min_s: float = 0.5, reconnect_max_s: float = 30.0) -> None:
        if not schema or not channel:
            raise ValueError("PostgresKeyStore needs a schema and a channel name")
        if len(channel.encode()) > _MAX_IDENTIFIER_BYTES:
            # LISTEN would take it cut short, and pg_notify refuse it: every change would fail.
            raise ValueError(f"the PostgresKeyStore channel name is {len(channel.encode())} "
                             f"bytes long; PostgreSQL's limit is {_MAX_IDENTIFIER_BYTES}")
        if not _valid_dsn(dsn):
            raise ValueError("the PostgreSQL DSN given to PostgresKeyStore is not a valid "
                             "connection string or URI")
        self._dsn = dsn
        self.schema = schema
        self.channel = channel
        self.pool_max_size = pool_max_size
        self.connect_timeout_s = connect_timeout_s
        self.query_timeout_s = query_timeout_s
        self.listen_ping_s = listen_ping_s
        self.reconnect_min_s = reconnect_min_s
        self.reconnect_max_s = reconnect_max_s
        self._keys = sql.Identifier(schema, "sluicegate_keys")
        self._limits = sql.Identifier(schema, "sluicegate_subject_limits")
        self._subscribers: list[Invalidation] = []
        self._pool: _Connections | None = None
        self._listener: asyncio.Task[None] | None = None
        self.listener_pid: int | None = None  # backend pid of the LISTEN connection

    def __repr__(self) -> str:  # the DSN may hold a password
        return f"PostgresKeyStore(schema={self.schema!r})"

    # -- lifecycle ---------------------------------------------------------------------------

    async def startup(self) -> None:
        if self._pool is not None:
            return
        pool = _Connections(self._dsn, max_size=self.pool_max_size,
                            connect_timeout_s=self.connect_timeout_s)
        try:
            async with asyncio.timeout(self.connect_timeout_s + self.query_timeout_s):
                async with pool.connection() as conn:
                    await self._migrate(conn)
            listener = await self._connect_listener()
        except _UNREACHABLE as exc:
            await pool.close()
            raise KeyStoreUnavailable(f"the key store could not reach PostgreSQL at startup "
                                      f"({_describe(exc)})") from exc
        except BaseException:
            await pool.close()
            raise
        self._pool = pool
        self._listener = asyncio.get_running_loop().create_task(
            self._relay_forever(listener), name="sluicegate-auth-listener")

    async def shutdown(self) -> None:
        task, self._listener = self._listener, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    async def check_ready(self) -> dict[str, str]:
        name = "auth_keys_postgres"
        if self._pool is None:
            return {name: "error: the key store is not started"}
        try:  # (not on a pooled connection: `postgres_answers`)
            await postgres_answers(self._dsn, "sluicegate-auth-ready")
        except _UNREACHABLE as exc:
            return {name: f"error: the key store cannot reach PostgreSQL ({_describe(exc)})"}
        if self.listener_pid is None:
            return {name: "error: the notification listener is reconnecting"}
        return {name: "ok"}

    async def _migrate(self, conn: Connection) -> None:
        """Applies the missing migrations in one transaction; an advisory lock makes
        processes that start together take turns."""
        schema = sql.Identifier(self.schema)
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s::int, hashtext(%s))",
                               (_LOCK_CLASS, self.schema))
            cur = await conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s",
                                     (self.schema,))
            if await cur.fetchone() is None:
                await conn.execute(sql.SQL("CREATE SCHEMA {}").format(schema))
            await conn.execute(sql.SQL("SET LOCAL search_path TO {}").format(schema))
            await conn.execute(sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} (version integer PRIMARY KEY, "
                "description text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
            ).format(sql.Identifier(VERSION_TABLE)))
            cur = await conn.execute(sql.SQL("SELECT version FROM {}").format(
                sql.Identifier(VERSION_TABLE)))
            applied = {row[0] for row in await cur.fetchall()}
            for version, description, statements in MIGRATIONS:
                if version not in applied:
                    await conn.execute(statements.encode())
                    await conn.execute(sql.SQL("INSERT INTO {} (version, description) "
                                               "VALUES (%s, %s)").format(
                        sql.Identifier(VERSION_TABLE)), (version, description))
                    logger.info("key store: applied migration %d (%s) in schema %s",
                                version, description, self.schema)
        if applied and max(applied) > MIGRATIONS[-1][0]:
            logger.warning("key store: schema %s is at version %d, newer than this gateway "
                           "knows (%d)", self.schema, max(applied), MIGRATIONS[-1][0])

    # -- connections -------------------------------------------------------------------------

    async def _read(self, query: sql.Composed, params: Sequence[Any]) -> list[TupleRow]:

        async def fetch(conn: Connection) -> list[TupleRow]:
            cur = await conn.execute(query, params)
            return await cur.fetchall()

        return await self._run(fetch, writes=False)

    async def _write(self, work: Callable[[Connection], Awaitable[T]]) -> T:
        """`work` in a transaction (never run twice: `_Connections.run`)."""
        return await self._run(work, writes=True)

    async def _run(self, work: Callable[[Connection], Awaitable[T]], *, writes: bool) -> T:
        if self._pool is None:
            raise KeyStoreUnavailable("the key store is not started")
        try:
            async with asyncio.timeout(self.query_timeout_s):
                return await self._pool.run(work, writes=writes)
        except _UNREACHABLE as exc:
            raise KeyStoreUnavailable(f"the key store cannot reach PostgreSQL "
                                      f"({_describe(exc)})") from exc
        except psycopg.DataError:
            # A value PostgreSQL cannot hold (a NUL in text or jsonb, a date past year 9999)
            # that no check caught; not quoted: the message may hold the value.
            raise ValueError("PostgreSQL cannot store or read a value of this request "
                             "(a NUL character, or a date out of range)") from None

    async def _notify(self, conn: Connection, *tokens: str) -> None:
        for token in tokens:
            await conn.execute("SELECT pg_notify(%s, %s)", (self.channel, token))

    async def _fetch_key(self, query: sql.Composed, params: Sequence[Any]) -> VirtualKey | None:
        rows = await self._read(query, params)
        return _key_from_row(rows[0]) if rows else None

    # -- reads -------------------------------------------------------------------------------

    async def find(self, key_hash: str) -> VirtualKey | None:
        return await self._fetch_key(sql.SQL("SELECT {} FROM {} WHERE key_hash = %s").format(
            _KEY_COLUMNS, self._keys), (key_hash,))

    async def get(self, key_id: str) -> VirtualKey | None:
        return await self._fetch_key(sql.SQL("SELECT {} FROM {} WHERE id = %s").format(
            _KEY_COLUMNS, self._keys), (key_id,))

    async def list(self, project: str | None = None, *, status: str | None = None,
                   after: str | None = None, limit: int | None = None) -> KeyList:
        conditions: list[sql.Composable] = []
        params: list[Any] = []
        if project is not None:
            conditions.append(sql.SQL("project = %s"))
            params.append(project)
        if status is not None:
            conditions.append(sql.SQL(_STATUS_CONDITIONS[status]))
        if after is not None:  # (a key that is not there: nothing after it)
            conditions.append(sql.SQL("(created_at, id) > (SELECT created_at, id FROM {} "
                                      "WHERE id = %s)").format(self._keys))
            params.append(after)
        where = sql.SQL("WHERE ") + sql.SQL(" AND ").join(conditions) if conditions \
            else sql.SQL("")
        query = sql.SQL("SELECT {} FROM {} {} ORDER BY created_at, id {}").format(
            _KEY_COLUMNS, self._keys, where,
            sql.SQL("LIMIT %s") if limit is not None else sql.SQL(""))
        if limit is not None:
            params.append(limit)
        return [_key_from_row(row) for row in await self._read(query, params)]

    async def subject_limits(self, kind: str, subject_id: str) -> Limits | None:
        return await self.get_limits(kind, subject_id)

    async def has_customer_limits(self, project: str) -> bool:
        query = sql.SQL("SELECT EXISTS (SELECT 1 FROM {} WHERE kind = 'customer' "
                        "AND starts_with(subject_id, %s))").format(self._limits)
        rows = await self._read(query, (project + "/",))
        return bool(rows and rows[0][0])

    async def get_limits(self, kind: str, subject_id: str) -> Limits | None:
        _check_limit_kind(kind)
        query = sql.SQL("SELECT limits FROM {} WHERE kind = %s AND subject_id = %s").format(
            self._limits)
        rows = await self._read(query, (kind, subject_id))
        if not rows:
            return None
        limits, error = _read_limits(rows[0][0])
        if error is not None:
            raise UnreadableLimits(f"the limits stored for {kind} {subject_id!r} cannot be "
                                   f"read ({error})")
        return limits

    async def list_limits(self, kind: str | None = None) -> LimitsList:
        if kind is not None:
            _check_limit_kind(kind)
        where = sql.SQL("WHERE kind = %s" if kind is not None else "")
        query = sql.SQL("SELECT kind, subject_id, limits FROM {} {} "
                        "ORDER BY kind, subject_id").format(self._limits, where)
        rows = await self._read(query, (kind,) if kind is not None else ())
        return [SubjectLimits(k, s, *_read_limits(v)) for k, s, v in rows]

    # -- changes -----------------------------------------------------------------------------

    async def create(
        self, project: str, *, allowed_models: Sequence[str] = (),
        expires_at: datetime | None = None, require_customer: bool = False,
        metadata: Mapping[str, Any] | None = None, limits: Limits | None = None,
    ) -> tuple[str, VirtualKey]:
        check_project(project)
        settings = check_storable_key_fields(
            allowed_models=allowed_models, expires_at=expires_at,
            require_customer=require_customer, metadata=metadata or {},
            limits=limits or Limits())

        async def insert(conn: Connection) -> tuple[str, VirtualKey]:
            plaintext, key = await self._insert_key(conn, project, disabled=False, **settings)
            await self._notify(conn, key_token(key.key_hash))
            return plaintext, key

        plaintext, key = await self._write(insert)
        self._emit(key_token(key.key_hash))
        logger.info("key store: created key %s for project %s", key.id, project)
        return plaintext, key

    async def _insert_key(self, conn: Connection, project: str, *, allowed_models: Sequence[str],
                          expires_at: datetime | None, disabled: bool, require_customer: bool,
                          metadata: Mapping[str, Any], limits: Limits,
                          account: str | None = None) -> tuple[str, VirtualKey]:
        plaintext = generate_key()
        cur = await conn.execute(
            sql.SQL(_INSERT_KEY).format(keys=self._keys, columns=_KEY_COLUMNS),
            (new_key_id(), hash_key(plaintext), key_hint(plaintext), project,
             list(allowed_models), expires_at, disabled, require_customer, Jsonb(metadata),
             Jsonb(limits.to_json()), account))
        row = await cur.fetchone()
        assert row is not None  # INSERT ... RETURNING always returns the row
        return plaintext, _key_from_row(row)

    async def update(self, key_id: str, **fields: Any) -> VirtualKey | None:
        fields = check_storable_key_fields(**fields)
        if not fields:
            return await self.get(key_id)
        assignments = sql.SQL(", ").join(
            sql.SQL("{} = %s").format(sql.Identifier(name)) for name in fields)
        # (a revoked key is never changed: a limit set on it would never apply, and a change
        # that waited on a rotation's row lock would land on the old key, not its successor)
        query = sql.SQL("UPDATE {} SET {}, updated_at = now() WHERE id = %s "
                        "AND revoked_at IS NULL RETURNING {}").format(
            self._keys, assignments, _KEY_COLUMNS)
        key = await self._change_key(query, (*map(_db_value, fields.values()), key_id))
        if key is None:
            existing = await self.get(key_id)
            if existing is not None and existing.revoked_at is not None:
                raise KeyConflict(f"key {key_id} is revoked, and a change to it would never "
                                  "apply; change the key that replaced it, or create one")
            return None
        logger.info("key store: updated %s of key %s", ", ".join(fields), key.id)
        return key

    async def revoke(self, key_id: str) -> VirtualKey | None:
        query = sql.SQL("UPDATE {} SET revoked_at = coalesce(revoked_at, now()), "
                        "updated_at = now() WHERE id = %s RETURNING {}").format(
            self._keys, _KEY_COLUMNS)
        key = await self._change_key(query, (key_id,))
        if key is not None:
            logger.info("key store: revoked key %s", key.id)
        return key

    async def _change_key(self, query: sql.Composed,
                          params: Sequence[Any]) -> VirtualKey | None:

        async def change(conn: Connection) -> VirtualKey | None:
            cur = await conn.execute(query, params)
            row = await cur.fetchone()
            if row is None:
                return None
            key = _key_from_row(row)
            await self._notify(conn, key_token(key.key_hash))
            return key

        key = await self._write(change)
        if key is not None:
            self._emit(key_token(key.key_hash))
        return key

    async def rotate(self, key_id: str) -> tuple[str, VirtualKey] | None:
        lock = sql.SQL("SELECT {} FROM {} WHERE id = %s FOR UPDATE").format(
            _KEY_COLUMNS, self._keys)
        revoke = sql.SQL("UPDATE {} SET revoked_at = now(), updated_at = now() "
                         "WHERE id = %s").format(self._keys)

        async def replace(conn: Connection) -> tuple[VirtualKey, str, VirtualKey] | None:
            cur = await conn.execute(lock, (key_id,))
            row = await cur.fetchone()
            if row is None:
                return None
            old = _key_from_row(row)
            _check_rotatable(old)
            await conn.execute(revoke, (key_id,))
            plaintext, new = await self._insert_key(
                conn, old.project, allowed_models=old.allowed_models, expires_at=old.expires_at,
                disabled=old.disabled, require_customer=old.require_customer,
                metadata=old.metadata, limits=old.limits, account=old.account_id)
            await self._notify(conn, key_token(old.key_hash), key_token(new.key_hash))
            return old, plaintext, new

        rotated = await self._write(replace)
        if rotated is None:
            return None
        old, plaintext, new = rotated
        self._emit(key_token(old.key_hash))
        logger.info("key store: rotated key %s to %s", old.id, new.id)
        return plaintext, new

    async def set_limits(self, kind: str, subject_id: str, limits: Limits | None) -> bool:
        check_subject_id(kind, subject_id)
        if limits is None:
            query = sql.SQL("DELETE FROM {} WHERE kind = %s AND subject_id = %s "
                            "RETURNING 1").format(self._limits)
            params: tuple[Any, ...] = (kind, subject_id)
        elif isinstance(limits, Limits):
            query = sql.SQL("INSERT INTO {} (kind, subject_id, limits) VALUES (%s, %s, %s) "
                            "ON CONFLICT (kind, subject_id) DO UPDATE "
                            "SET limits = excluded.limits, updated_at = now() "
                            "RETURNING 1").format(self._limits)
            params = (kind, subject_id, Jsonb(limits.to_json()))
        else:
            raise TypeError("limits must be a Limits(...) value or None")
        token = limits_token(kind, subject_id)

        async def change(conn: Connection) -> bool:
            cur = await conn.execute(query, params)
            if await cur.fetchone() is None:
                return False
            await self._notify(conn, token)
            return True

        changed = await self._write(change)
        if changed:
            self._emit(token)
            logger.info("key store: %s the limits of %s %s",
                        "deleted" if limits is None else "set", kind, subject_id)
        return changed

    # -- notifications -----------------------------------------------------------------------

    def subscribe(self, callback: Invalidation) -> None:
        self._subscribers.append(callback)

    def _emit(self, token: str) -> None:
        for callback in self._subscribers:
            try:
                callback(token)
            except Exception:
                logger.exception("key store: an invalidation subscriber failed")

    async def _connect_listener(self) -> Connection:
        async with asyncio.timeout(self.connect_timeout_s + 1):
            conn = await psycopg.AsyncConnection.connect(
                self._dsn, autocommit=True, application_name="sluicegate-auth-listen",
                connect_timeout=max(2, int(self.connect_timeout_s)))
            try:
                await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
            except BaseException:
                await conn.close()
                raise
        self.listener_pid = conn.info.backend_pid
        return conn

    async def _relay_forever(self, conn: Connection) -> None:
        try:
            while True:
                try:
                    await self._relay(conn)
                except _UNREACHABLE as exc:
                    logger.warning("key store: lost the notification connection (%s); "
                                   "reconnecting", _describe(exc))
                except Exception:  # a deaf listener would silently keep revoked keys alive
                    logger.exception("key store: the notification listener failed; "
                                     "reconnecting")
                self.listener_pid = None
                await conn.close()
                conn = await self._reconnect_listener()
                self._emit(EVERYTHING)  # changes made while away were never heard
        finally:
            self.listener_pid = None
            await conn.close()

    async def _relay(self, conn: Connection) -> None:
        while True:
            async for notify in conn.notifies(timeout=self.listen_ping_s):
                self._emit(notify.payload)
            # No news for a while: make sure the connection is still there (a silent network
            # partition would otherwise leave us deaf for ever).
            async with asyncio.timeout(self.connect_timeout_s):
                await conn.execute("SELECT 1")

    async def _reconnect_listener(self) -> Connection:
        delay_s = self.reconnect_min_s
        while True:
            await asyncio.sleep(delay_s * random.uniform(0.5, 1.0))
            try:
                conn = await self._connect_listener()
            except _UNREACHABLE as exc:
                delay_s = min(delay_s * 2, self.reconnect_max_s)
                logger.warning("key store: cannot reconnect the notification listener (%s); "
                               "retrying within %.1f s", _describe(exc), delay_s)
                continue
            logger.info("key store: notification listener reconnected")
            return conn


def _valid_dsn(dsn: str) -> bool:
    # Not raised from: libpq's message quotes the string, which may hold a password.
    try:
        conninfo_to_dict(dsn)
    except psycopg.Error:
        return False
    return True


def _check_rotatable(key: VirtualKey) -> None:
    # The new key takes the old one's settings: from a disabled or expired key it would be
    # refused just the same, a plaintext that cannot be used. Re-enabling it here instead
    # would undo an operator's decision behind their back, so: say what to do first.
    if key.limits_error is not None:  # the replacement would lose them
        raise KeyConflict(f"the limits stored for key {key.id} cannot be read, and its "
                          f"replacement would have none; replace them first "
                          f"(PUT /admin/limits/key/{key.id}), then rotate")
    reason = key.usable()
    if reason == "revoked":
        raise KeyConflict(f"key {key.id} is revoked; create a new key instead")
    if reason == "disabled":
        raise KeyConflict(f"key {key.id} is disabled, and its replacement would be too; "
                          "enable it first (PATCH disabled=false), or create a new key")
    if reason == "expired":
        raise KeyConflict(f"key {key.id} has expired, and its replacement would have too; "
                          "give it a later expires_at first (PATCH), or create a new key")


def _check_limit_kind(kind: str) -> None:
    if kind not in LIMIT_KINDS:
        raise ValueError(f"limits are stored per project or customer, not per {kind!r}")


def _key_from_row(row: TupleRow) -> VirtualKey:
    (key_id, key_hash, hint, project, models, expires_at, disabled, require_customer, metadata,
     document, created_at, revoked_at, account) = row
    limits, limits_error = _read_limits(document)
    return VirtualKey(
        id=key_id, key_hash=key_hash, hint=hint, project=project, allowed_models=tuple(models),
        expires_at=_utc(expires_at), disabled=disabled, require_customer=require_customer,
        metadata=_narrowed(metadata), limits=limits, limits_error=limits_error,
        created_at=created_at.astimezone(UTC), revoked_at=_utc(revoked_at), account=account)


def _narrowed(value: Any) -> Any:
    """Metadata as read back, its integers past 64 bits as floats: jsonb keeps a float
    such as 1e20 as the integer it equals, which JSON writers of 64-bit integers (orjson,
    the admin API's answers) refuse. (Integers that wide are refused when written: keys.py;
    this also reads the rows an earlier version let in.)"""
    if isinstance(value, int) and not isinstance(value, bool) and not fits_64_bits(value):
        try:
            return float(value)
        except OverflowError:  # (past 2**1024: an integer some earlier Python caller stored)
            return str(value)
    if isinstance(value, dict):
        return {k: _narrowed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_narrowed(item) for item in value]
    return value


def _read_limits(document: Any) -> tuple[Limits, str | None]:
    """A stored limits document, as this or an older version wrote it; or, when it still
    cannot be read, no limits and why. One such row must not break the others (a listing,
    a lookup): the admin API shows it flagged and can replace it, and the auth layer refuses
    the requests it governs rather than serve them without their limits."""
    try:
        return Limits.from_stored(document), None
    except (ValueError, TypeError, ArithmeticError) as exc:
        return Limits(), str(exc)


def _db_value(value: Any) -> Any:
    if isinstance(value, Limits):
        return Jsonb(value.to_json())
    if isinstance(value, dict):
        return Jsonb(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def _utc(value: datetime | None) -> datetime | None:
    return value.astimezone(UTC) if value is not None else None


def _describe(exc: BaseException) -> str:
    # psycopg's messages name the host and port, never the password.
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# -- the in-process cache ----------------------------------------------------------------------

@dataclass(slots=True)
class _Entry:
    value: Any  # VirtualKey, Limits, or None (a negative entry)
    fetched_at: float
    due: bool = False  # to be asked again before use (kept to serve stale if that fails)


class CachedKeys:
    """The auth layer's view of a key store: answers from memory and asks the store at most
    once per `ttl_s` per key (`negative_ttl_s` for unknown keys).

    Entries are dropped as soon as the store announces a change (from any process). When
    the store fails, a known key is served from its last good entry for up to
    `stale_max_s`, so a PostgreSQL outage does not lock out known callers; a key never
    seen raises `KeyStoreUnavailable`. A request waits on the store for `lookup_timeout_s`
    at most: a PostgreSQL that accepts connections but never answers would otherwise hold
    it for the store's own timeouts (5 s for a query, then up to 10 s more as psycopg
    cancels it). The lookup goes on in the background; while the store is failing (a
    lookup failed or took longer than that), no other starts until it ended and then
    `retry_after_failure_s` passed: one lookup at a time probes the store, the other
    requests are answered from memory at once. Concurrent misses for the same key share
    one store query.

    Known keys and limits are kept in one LRU of `max_entries`; keys the store does not
    have in another, of `max_unknown_keys`, so that requests with made-up keys (anyone
    can send them) never push a known key out, and with it its stale entry for an outage;
    customers without limits of their own in a third, of `max_customers_without_limits`,
    as any caller with a valid key can name as many customers as it likes.
    """

    def __init__(self, store: KeyStore, *, ttl_s: float = 30.0, negative_ttl_s: float = 2.0,
                 stale_max_s: float = 3600.0, max_entries: int = 100_000,
                 max_unknown_keys: int = 10_000, max_customers_without_limits: int = 100_000,
                 retry_after_failure_s: float = 1.0, lookup_timeout_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self.negative_ttl_s = negative_ttl_s
        self.stale_max_s = stale_max_s
        self.max_entries = max_entries
        self.max_unknown_keys = max_unknown_keys
        self.max_customers_without_limits = max_customers_without_limits
        self.retry_after_failure_s = retry_after_failure_s
        self.lookup_timeout_s = lookup_timeout_s
        self.clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        # key token -> when the store said it has no such key (never served stale: it may
        # have been created since)
        self._unknown: OrderedDict[str, float] = OrderedDict()
        # customer limits token -> "no limits" (served stale, as in `_entries`)
        self._without_limits: OrderedDict[str, _Entry] = OrderedDict()
        self._loading: dict[str, asyncio.Task[Any]] = {}
        self._failed_at: float | None = None
        store.subscribe(self.invalidate)

    def __len__(self) -> int:
        return len(self._entries)

    def find_now(self, key_hash: str) -> Any:
        """What `find` answers from memory without a coroutine (the auth layer's per-request
        path): the key, or None for a key known not to exist, while the entry is fresh;
        `UNKNOWN` when `find` has to ask the store (or serve a stale entry)."""
        return self._fresh(key_token(key_hash))

    def subject_limits_now(self, kind: str, subject_id: str) -> Any:
        """`subject_limits` from memory while fresh, else `UNKNOWN` (see `find_now`)."""
        return self._fresh(limits_token(kind, subject_id))

    def has_customer_limits_now(self, project: str) -> Any:
        """`has_customer_limits` from memory while fresh, else `UNKNOWN`."""
        return self._fresh(customer_limits_token(project))

    def _fresh(self, token: str) -> Any:
        # (The first step of `_get`, which does the same when this says UNKNOWN.)
        entry = self._entries.get(token)
        if entry is not None:
            if not entry.due and self.clock() - entry.fetched_at < (
                    self.ttl_s if entry.value is not None else self.negative_ttl_s):
                self._entries.move_to_end(token)
                return entry.value
            return UNKNOWN
        entry = self._without_limits.get(token)
        if entry is not None:
            if not entry.due and self.clock() - entry.fetched_at < self.negative_ttl_s:
                self._without_limits.move_to_end(token)
                return None
            return UNKNOWN
        fetched_at = self._unknown.get(token)
        if fetched_at is not None and self.clock() - fetched_at < self.negative_ttl_s:
            self._unknown.move_to_end(token)
            return None
        return UNKNOWN

    async def find(self, key_hash: str) -> VirtualKey | None:
        key: VirtualKey | None = await self._get(
            key_token(key_hash), lambda: self.store.find(key_hash), stale_none=False)
        return key

    async def subject_limits(self, kind: str, subject_id: str) -> Limits | None:
        # "No limits" is a fact worth serving stale; "no such key" is not (it may be new).
        limits: Limits | None = await self._get(
            limits_token(kind, subject_id), lambda: self.store.subject_limits(kind, subject_id),
            stale_none=True)
        return limits

    async def has_customer_limits(self, project: str) -> bool:
        """Served stale like limits: the auth layer reads it while the store is down, to
        know whether a customer it has not seen may have limits of its own."""
        exists: bool = await self._get(customer_limits_token(project),
                                       lambda: self.store.has_customer_limits(project),
                                       stale_none=True)
        return exists

    def invalidate(self, token: str) -> None:
        """Drops what a token names ("key:<hash>", "limits:<kind>:<id>"); "*" (changes may
        have been missed: the listener reconnected) has every entry asked for again before
        its next use, each kept meanwhile as the stale answer should that ask fail (a store
        just back often fails a first query on a connection the outage broke: dropped, every
        known key would be a 503 then)."""
        if token == EVERYTHING:
            for entries in (self._entries, self._without_limits):
                for entry in entries.values():
                    entry.due = True
            self._unknown.clear()  # (never served stale: nothing to keep)
            self._loading.clear()
            return
        self._drop(token)
        customer = _CUSTOMER_LIMITS_PREFIX
        if token.startswith(customer) and "/" in token:
            self._drop(customer_limits_token(token[len(customer):].split("/", 1)[0]))

    def _drop(self, token: str) -> None:
        self._entries.pop(token, None)
        self._unknown.pop(token, None)
        self._without_limits.pop(token, None)
        self._loading.pop(token, None)  # a load in flight may have read the old value

    async def _get(self, token: str, load: Callable[[], Awaitable[Any]], *,
                   stale_none: bool) -> Any:
        fresh = self._fresh(token)
        if fresh is not UNKNOWN:
            return fresh
        now = self.clock()
        if self._failed_at is not None and (
                self._loading or now - self._failed_at < self.retry_after_failure_s):
            return self._stale(token, now, stale_none, None)  # (a probe is out, or was lately)
        # Not cancelled when the wait ends: other callers may share it, and its answer is
        # kept for the next request.
        task = self._load_once(token, load)
        done, _ = await asyncio.wait((task,), timeout=self.lookup_timeout_s)
        if not done:  # the store hangs: this lookup is the probe, the others wait for it
            self._failed_at = self.clock()
            return self._stale(token, now, stale_none, None)
        try:
            return task.result()
        except KeyStoreUnavailable as exc:
            return self._stale(token, now, stale_none, exc)

    def _load_once(self, token: str, load: Callable[[], Awaitable[Any]]) -> asyncio.Task[Any]:
        task = self._loading.get(token)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._load(token, load))
            task.add_done_callback(_retrieve_exception)
            self._loading[token] = task
        return task

    async def _load(self, token: str, load: Callable[[], Awaitable[Any]]) -> Any:
        started = self.clock()
        try:
            value = await load()
        except KeyStoreUnavailable:
            self._failed_at = self.clock()
            raise
        finally:
            current = self._loading.get(token) is asyncio.current_task()
            if current:
                del self._loading[token]
        self._failed_at = None
        if current:  # not invalidated meanwhile
            self._keep(token, value, started)
        return value

    def _keep(self, token: str, value: Any, fetched_at: float) -> None:
        # (a token is in one of the three at most: an answer that changed since, a key
        # deleted or limits set or deleted, moves it)
        if value is None and token.startswith(_KEY_PREFIX):
            self._entries.pop(token, None)
            _remember(self._unknown, token, fetched_at, self.max_unknown_keys)
        elif value is None and token.startswith(_CUSTOMER_LIMITS_PREFIX):
            self._entries.pop(token, None)
            _remember(self._without_limits, token, _Entry(None, fetched_at),
                      self.max_customers_without_limits)
        else:
            self._unknown.pop(token, None)
            self._without_limits.pop(token, None)
            _remember(self._entries, token, _Entry(value, fetched_at), self.max_entries)

    def _stale(self, token: str, now: float, stale_none: bool,
               error: KeyStoreUnavailable | None) -> Any:
        # (read again: it may have been invalidated)
        entry = self._entries.get(token) or self._without_limits.get(token)
        if (entry is not None and (entry.value is not None or stale_none)
                and now - entry.fetched_at < self.stale_max_s):
            return entry.value
        raise KeyStoreUnavailable(
            "the key store is unavailable and this was not looked up recently") from error


_CUSTOMER_LIMITS_PREFIX = limits_token("customer", "")
_KEY_PREFIX = key_token("")


def _remember(lru: OrderedDict[str, Any], token: str, value: Any, max_size: int) -> None:
    lru[token] = value
    lru.move_to_end(token)
    if len(lru) > max_size:
        lru.popitem(last=False)


def _retrieve_exception(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()  # a load whose callers all went away must not log "never retrieved"
