"""The usage ledger in PostgreSQL: `usage_events` (one row per request, partitioned by month)
and `usage_rollups` (per minute and per day, per key, project, customer and model).

A batch is written in one transaction: the records go in as the JSON the journal keeps (COPY
into a temporary table of jsonb), PostgreSQL takes them apart into a staging table of
`usage_events` rows, then one statement inserts the staged rows into `usage_events` with `ON
CONFLICT (request_id, started_at) DO NOTHING` and adds *only the rows it inserted* to the
rollups. A batch written twice (a replay after a crash) therefore changes nothing the second
time, and the rollups always equal the sums of the events.

Taking the records apart in SQL rather than in Python leaves the gateway's process one bulk
write per batch instead of a row to format per request. The conversions are Python's:
timestamps are rounded half-even to the microsecond, as `datetime.fromtimestamp` does, so a
replay finds the rows an earlier direct write made.

Schema versions are recorded in `<prefix>_schema_version`; migrations run under an advisory
lock, so processes starting together take turns. Monthly partitions are created on demand, in
the transaction of the batch that needs them. Retention: `drop_partitions_before(month)` drops
whole months of events (rollups stay; they are small); nothing is dropped automatically.

Indexes exist only for what the usage API asks: events by (project, started_at) for a
project's recent requests; rollups by their primary key (grain, kind, subject, bucket).
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from gateway.config import ConfigError
from gateway.policy import usd_to_micros
from gateway.readiness import postgres_answers
from middleware.metering.record import ARRAY_FIELDS, UsageRecord

logger = logging.getLogger("sluicegate.metering")

__all__ = ["GRAINS", "GROUPS", "PostgresUsageStore", "UsageRecordRefused",
           "UsageStoreError"]

_COLUMNS = (
    "request_id", "started_at", "ended_at", "key_id", "project", "customer", "labels",
    "api_format", "operation", "model", "served_model", "provider", "deployment",
    "input_tokens", "output_tokens", "cached_input_tokens", "reasoning_tokens", "cost",
    "cost_saved", "latency_ms", "ttft_ms", "status", "error_type", "cache_status", "attempts",
    "fallbacks", "stream", "client_disconnected", "cache_write_tokens", "cache_write_1h_tokens",
)
GROUPS = ("key", "project", "customer", "model")  # what usage is totalled by
GRAINS = ("minute", "day")                        # the rollups' buckets

_MIGRATIONS: tuple[tuple[int, str, str], ...] = (
    (1, "usage events (partitioned by month) and rollups", """
CREATE TABLE IF NOT EXISTS {events} (
    request_id          text             NOT NULL,
    started_at          timestamptz      NOT NULL,
    ended_at            timestamptz      NOT NULL,
    key_id              text,
    project             text,
    customer            text,
    labels              jsonb            NOT NULL DEFAULT '{{}}',
    api_format          text             NOT NULL,
    operation           text             NOT NULL,
    model               text             NOT NULL,
    served_model        text,
    provider            text,
    deployment          text,
    input_tokens        bigint           NOT NULL,
    output_tokens       bigint           NOT NULL,
    cached_input_tokens bigint           NOT NULL,
    reasoning_tokens    bigint           NOT NULL,
    cost                numeric(20, 6)   NOT NULL,
    cost_saved          numeric(20, 6)   NOT NULL,
    latency_ms          double precision NOT NULL,
    ttft_ms             double precision,
    status              integer          NOT NULL,
    error_type          text,
    cache_status        text,
    attempts            integer          NOT NULL,
    fallbacks           integer          NOT NULL,
    stream              boolean          NOT NULL,
    client_disconnected boolean          NOT NULL,
    PRIMARY KEY (request_id, started_at)
) PARTITION BY RANGE (started_at);
CREATE INDEX IF NOT EXISTS {events_project} ON {events} (project, started_at);
CREATE TABLE IF NOT EXISTS {rollups} (
    grain               text           NOT NULL,
    bucket              timestamptz    NOT NULL,
    kind                text           NOT NULL,
    subject             text           NOT NULL,
    requests            bigint         NOT NULL,
    errors              bigint         NOT NULL,
    input_tokens        bigint         NOT NULL,
    output_tokens       bigint         NOT NULL,
    cached_input_tokens bigint         NOT NULL,
    reasoning_tokens    bigint         NOT NULL,
    cost                numeric(20, 6) NOT NULL,
    cost_saved          numeric(20, 6) NOT NULL,
    PRIMARY KEY (grain, kind, subject, bucket)
);
"""),
    # (a constant default: no table is rewritten; a gateway from before it writes 0)
    (2, "input written to provider-side prompt caches", """
ALTER TABLE {events} ADD COLUMN IF NOT EXISTS cache_write_tokens bigint NOT NULL DEFAULT 0;
ALTER TABLE {events} ADD COLUMN IF NOT EXISTS cache_write_1h_tokens bigint NOT NULL DEFAULT 0;
ALTER TABLE {rollups} ADD COLUMN IF NOT EXISTS cache_write_tokens bigint NOT NULL DEFAULT 0;
ALTER TABLE {rollups} ADD COLUMN IF NOT EXISTS cache_write_1h_tokens bigint NOT NULL DEFAULT 0;
"""),
)

# The journal's JSON arrays taken apart into rows of the events table, a field found by its
# place in ARRAY_FIELDS (after the format number). Timestamps: whole seconds plus the fraction
# rounded half-even to the microsecond (float8 round() is rint()), exactly as
# datetime.fromtimestamp rounds. A field an older, shorter array lacks takes its default.
def _at(name: str) -> str:
    return f"d->>{ARRAY_FIELDS.index(name) + 1}"


def _timestamp(name: str) -> str:
    x = f"({_at(name)})::float8"
    return f"to_timestamp(trunc({x})) + round(({x} - trunc({x})) * 1e6) * interval '1 microsecond'"


def _number(name: str, sql_type: str, default: str) -> str:
    return f"COALESCE(({_at(name)})::{sql_type}, {default})"


# How many of the staged records are new, and the months they fall in.
_NEW_AND_MONTHS = (
    "SELECT (SELECT count(DISTINCT (request_id, started_at)) FROM {staging} s"
    " WHERE NOT EXISTS (SELECT 1 FROM {events} e WHERE e.request_id = "
    "s.request_id AND e.started_at = s.started_at)), "
    "(SELECT array_agg(DISTINCT date_trunc('month', started_at, 'UTC')) "
    "FROM {staging})")
_FROM_JSON = f"""
INSERT INTO {{staging}} ({{columns}})
SELECT {_at("request_id")}, {_timestamp("started_at")}, {_timestamp("ended_at")},
       {_at("key_id")}, {_at("project")}, {_at("customer")},
       COALESCE(d->{ARRAY_FIELDS.index("labels") + 1}, '{{{{}}}}'),
       COALESCE({_at("api_format")}, 'openai'), COALESCE({_at("operation")}, ''),
       COALESCE({_at("model")}, ''), {_at("served_model")}, {_at("provider")},
       {_at("deployment")}, {_number("input_tokens", "bigint", "0")},
       {_number("output_tokens", "bigint", "0")}, {_number("cached_input_tokens", "bigint", "0")},
       {_number("reasoning_tokens", "bigint", "0")},
       {_number("cost_micros", "numeric", "0")} * 0.000001,
       {_number("saved_micros", "numeric", "0")} * 0.000001,
       {_number("latency_ms", "float8", "0")}, ({_at("ttft_ms")})::float8,
       {_number("status", "integer", "0")}, {_at("error_type")}, {_at("cache_status")},
       {_number("attempts", "integer", "0")}, {_number("fallbacks", "integer", "0")},
       {_number("stream", "boolean", "false")},
       {_number("client_disconnected", "boolean", "false")},
       {_number("cache_write_tokens", "bigint", "0")},
       {_number("cache_write_1h_tokens", "bigint", "0")}
FROM {{raw}}
"""

# The staged rows go into the events; the ones that were new are summed into the rollups.
_INSERT = """
WITH inserted AS (
    INSERT INTO {events} ({columns})
    SELECT {columns} FROM {staging}
    ON CONFLICT (request_id, started_at) DO NOTHING
    RETURNING started_at, key_id, project, customer, model, status, input_tokens,
              output_tokens, cached_input_tokens, reasoning_tokens, cost, cost_saved,
              cache_write_tokens, cache_write_1h_tokens
), grouped AS (
    SELECT g.grain, date_trunc(g.grain, i.started_at, 'UTC') AS bucket, s.kind, s.subject,
           count(*) AS requests, count(*) FILTER (WHERE i.status >= 400) AS errors,
           sum(i.input_tokens) AS input_tokens, sum(i.output_tokens) AS output_tokens,
           sum(i.cached_input_tokens) AS cached_input_tokens,
           sum(i.reasoning_tokens) AS reasoning_tokens, sum(i.cost) AS cost,
           sum(i.cost_saved) AS cost_saved, sum(i.cache_write_tokens) AS cache_write_tokens,
           sum(i.cache_write_1h_tokens) AS cache_write_1h_tokens
    FROM inserted i
    CROSS JOIN (VALUES ('minute'), ('day')) AS g(grain)
    CROSS JOIN LATERAL (VALUES ('key', i.key_id), ('project', i.project),
                               ('customer', i.project || '/' || i.customer),
                               ('model', i.model)) AS s(kind, subject)
    WHERE s.subject IS NOT NULL
    GROUP BY 1, 2, 3, 4
)
INSERT INTO {rollups} AS r (grain, bucket, kind, subject, requests, errors, input_tokens,
                            output_tokens, cached_input_tokens, reasoning_tokens, cost,
                            cost_saved, cache_write_tokens, cache_write_1h_tokens)
SELECT grain, bucket, kind, subject, requests, errors, input_tokens, output_tokens,
       cached_input_tokens, reasoning_tokens, cost, cost_saved, cache_write_tokens,
       cache_write_1h_tokens FROM grouped
ON CONFLICT (grain, kind, subject, bucket) DO UPDATE SET
    requests = r.requests + EXCLUDED.requests, errors = r.errors + EXCLUDED.errors,
    input_tokens = r.input_tokens + EXCLUDED.input_tokens,
    output_tokens = r.output_tokens + EXCLUDED.output_tokens,
    cached_input_tokens = r.cached_input_tokens + EXCLUDED.cached_input_tokens,
    reasoning_tokens = r.reasoning_tokens + EXCLUDED.reasoning_tokens,
    cost = r.cost + EXCLUDED.cost, cost_saved = r.cost_saved + EXCLUDED.cost_saved,
    cache_write_tokens = r.cache_write_tokens + EXCLUDED.cache_write_tokens,
    cache_write_1h_tokens = r.cache_write_1h_tokens + EXCLUDED.cache_write_1h_tokens
"""


class UsageStoreError(Exception):
    """PostgreSQL could not take or answer (the writer keeps the records in the journal)."""


class UsageRecordRefused(UsageStoreError):
    """PostgreSQL answered, and refused what the batch holds (a value it cannot store), not
    the connection: written again, the same batch fails again (`write_each`)."""


def _month_start(at: datetime) -> datetime:
    return at.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def _next_month(start: datetime) -> datetime:
    return start.replace(year=start.year + 1, month=1) if start.month == 12 else \
        start.replace(month=start.month + 1)


class PostgresUsageStore:
    """`usage_events` and `usage_rollups` (module docstring). One connection of its own for
    writes (batches are serial), and a small pool for the usage API's reads."""

    def __init__(self, dsn: str, *, prefix: str = "sluicegate_usage",
                 timeout_s: float = 10.0) -> None:
        if not prefix.replace("_", "").isalnum() or not prefix.islower() or len(prefix) > 40:
            raise ConfigError(f"PostgresUsageStore prefix {prefix!r}: lower-case letters, "
                              "digits and underscores, at most 40 characters.")
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise ConfigError("PostgresUsageStore needs psycopg: pip install "
                              "'sluicegate[postgres]'.") from None
        self._dsn = dsn
        self.prefix = prefix
        self.events = f"{prefix}_events"
        self.rollups = f"{prefix}_rollups"
        self.timeout_s = timeout_s
        self._conn: Any = None
        self._migrated = False
        self._partitions: set[datetime] = set()
        self._lock = asyncio.Lock()
        self._rendered: dict[str, bytes] = {}

    def __repr__(self) -> str:  # the DSN may hold a password
        return f"PostgresUsageStore(prefix={self.prefix!r})"

    def _sql(self, text: str) -> Any:
        from psycopg import sql
        return sql.SQL(text).format(
            events=sql.Identifier(self.events), rollups=sql.Identifier(self.rollups),
            staging=sql.Identifier(f"{self.prefix}_staging"),
            raw=sql.Identifier(f"{self.prefix}_raw"),
            events_project=sql.Identifier(f"{self.events}_project"),
            versions=sql.Identifier(f"{self.prefix}_schema_version"),
            columns=sql.SQL(", ").join(sql.Identifier(c) for c in _COLUMNS))

    def _query(self, conn: Any, text: str) -> bytes:
        """`_sql(text)` as the bytes PostgreSQL gets, made once per statement: composing it
        again for every batch cost more than the rest of the batch's Python."""
        found = self._rendered.get(text)
        if found is None:
            found = self._rendered[text] = self._sql(text).as_bytes(conn)
        return found

    async def _connection(self) -> Any:
        import psycopg
        if self._conn is not None and not self._conn.closed:
            return self._conn
        self._conn = await psycopg.AsyncConnection.connect(
            self._dsn, autocommit=False, connect_timeout=max(2, int(self.timeout_s)),
            application_name="sluicegate-metering")
        async with self._conn.transaction():
            await self._conn.execute("SET TIME ZONE 'UTC'")
            await self._conn.execute("SET client_encoding TO 'UTF8'")  # the JSON we COPY
        if not self._migrated:
            await self._migrate(self._conn)
            self._migrated = True
        async with self._conn.transaction():
            await self._conn.execute(self._sql(
                "CREATE TEMP TABLE IF NOT EXISTS {staging} "
                "(LIKE {events} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"))
            await self._conn.execute(self._sql(
                "CREATE TEMP TABLE IF NOT EXISTS {raw} (d jsonb NOT NULL) "
                "ON COMMIT DELETE ROWS"))
        return self._conn

    async def _migrate(self, conn: Any) -> None:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (self.prefix,))
            await conn.execute(self._sql(
                "CREATE TABLE IF NOT EXISTS {versions} (version integer PRIMARY KEY, "
                "description text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"))
            cur = await conn.execute(self._sql("SELECT version FROM {versions}"))
            applied = {row[0] for row in await cur.fetchall()}
            for version, description, statements in _MIGRATIONS:
                if version in applied:
                    continue
                await conn.execute(self._sql(statements))
                await conn.execute(self._sql("INSERT INTO {versions} (version, description) "
                                             "VALUES (%s, %s)"), (version, description))
                logger.info("metering: applied migration %d (%s)", version, description)

    async def startup(self) -> None:
        try:
            async with self._lock:
                async with asyncio.timeout(self.timeout_s):
                    await self._connection()
        except Exception as exc:  # noqa: BLE001 (psycopg errors, OSError, timeouts)
            logger.warning("metering: PostgreSQL is not reachable at startup (%s); usage waits "
                           "in the journal", type(exc).__name__)
            await self._drop_connection()

    async def shutdown(self) -> None:
        await self._drop_connection()

    async def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await conn.close()
            except Exception as exc:  # noqa: BLE001 (closing a broken connection)
                logger.debug("metering: closing the connection failed: %s", exc)

    async def check_ready(self) -> dict[str, str]:
        # Not on the writer's connection: a batch holds it up to `timeout_s`, and a check
        # waiting behind it was no answer for as long (`postgres_answers`).
        try:
            await postgres_answers(self._dsn, "sluicegate-metering-ready")
        except Exception as exc:  # noqa: BLE001 (psycopg errors, OSError, timeouts)
            return {"usage_postgres": f"error: {type(exc).__name__}"}
        return {"usage_postgres": "ok"}

    async def write(self, records: Sequence[UsageRecord]) -> int:
        """Writes a batch exactly once (module docstring); how many rows were new."""
        return await self.write_payloads([record.encode() for record in records])

    async def write_payloads(self, payloads: Sequence[bytes]) -> int:
        """`write` for records already encoded (`UsageRecord.encode`, the array form): the
        metering writer's batches, as queued and journaled."""
        if not payloads:
            return 0
        # COPY's text format: one record per line; JSON never holds a raw newline or tab,
        # but its backslashes must be doubled.
        data = b"\n".join(payloads).replace(b"\\", b"\\\\") + b"\n"
        try:
            async with self._lock, asyncio.timeout(self.timeout_s):
                conn = await self._connection()
                async with conn.transaction(), conn.cursor() as cur:
                    async with cur.copy(self._query(conn, "COPY {raw} (d) FROM STDIN")) as copy:
                        await copy.write(data)
                    await cur.execute(self._query(conn, _FROM_JSON))
                    await cur.execute(self._query(conn, _NEW_AND_MONTHS))
                    found = await cur.fetchone()
                    assert found is not None
                    new, months = int(found[0]), set(found[1] or ())
                    await self._create_partitions(cur, months - self._partitions)
                    await cur.execute(self._query(conn, _INSERT))
                self._partitions |= months  # they exist once the batch has committed
                return new
        except Exception as exc:  # noqa: BLE001 (psycopg errors, OSError, timeouts)
            said = f"PostgreSQL did not take the usage batch: {type(exc).__name__}: {exc}"
            if _refuses_data(exc):  # (rolled back; the connection is as good as before)
                raise UsageRecordRefused(said) from None
            await self._drop_connection()
            raise UsageStoreError(said) from None

    async def write_each(self, payloads: Sequence[bytes]) -> tuple[int, list[tuple[bytes, str]]]:
        """`write_payloads`, with the records PostgreSQL refuses left out: (rows new, [(a
        refused record, why)]). A batch is one transaction, so one record it cannot store
        (a value out of range, say) fails the rest with it, every time it is written: a
        refused batch is written again in halves, down to the record, ~2 log2(n)
        transactions for one such record. A record is still written once at most: halves
        already written before a failure are written again as a replay is (ON CONFLICT DO
        NOTHING). UsageStoreError when PostgreSQL does not answer."""
        try:
            return await self.write_payloads(payloads), []
        except UsageRecordRefused as exc:
            if len(payloads) == 1:
                return 0, [(payloads[0], str(exc))]
        half = len(payloads) // 2
        new_first, refused_first = await self.write_each(payloads[:half])
        new_rest, refused_rest = await self.write_each(payloads[half:])
        return new_first + new_rest, refused_first + refused_rest

    async def _create_partitions(self, cur: Any, months: set[datetime]) -> None:
        """Creates monthly partitions in the batch's transaction (an advisory lock per
        partition keeps processes from racing on the DDL)."""
        for start in sorted(months):
            end = _next_month(start)
            name = f"{self.events}_{start:%Y%m}"
            await cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (name,))
            # DDL takes no parameters: the bounds are literals of our own making.
            await cur.execute(self._sql(
                f"CREATE TABLE IF NOT EXISTS {_quote(name)} PARTITION OF {{events}} "
                f"FOR VALUES FROM ('{start.isoformat()}') TO ('{end.isoformat()}')"))

    async def drop_partitions_before(self, month: datetime) -> list[str]:
        """Drops every monthly partition of events that ends on or before `month` (UTC)."""
        cutoff = _month_start(month.astimezone(UTC))
        dropped = []
        async with self._lock:
            conn = await self._connection()
            async with conn.transaction():
                cur = await conn.execute(
                    "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                    "JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = %s",
                    (self.events,))
                for (name,) in await cur.fetchall():
                    stamp = name.rsplit("_", 1)[-1]
                    if len(stamp) == 6 and stamp.isdigit():
                        start = datetime(int(stamp[:4]), int(stamp[4:]), 1, tzinfo=UTC)
                        if _next_month(start) <= cutoff:
                            await conn.execute(f"DROP TABLE {_quote(name)}")
                            dropped.append(name)
                            self._partitions.discard(start)
        return dropped

    # -- reads (the usage API) -----------------------------------------------------------

    async def usage(self, *, group_by: str, since: datetime, until: datetime,
                    grain: str = "day", subject: str | None = None) -> list[dict[str, Any]]:
        """Totals per subject of `group_by` (key, project, customer, model) between `since`
        and `until`, from the rollups of `grain` ("minute" or "day")."""
        if group_by not in GROUPS or grain not in GRAINS:
            raise ValueError(f"group_by must be one of {GROUPS} and grain minute or day")
        query = ("SELECT subject, sum(requests), sum(errors), sum(input_tokens), "
                 "sum(output_tokens), sum(cached_input_tokens), sum(reasoning_tokens), "
                 "sum(cost), sum(cost_saved), sum(cache_write_tokens), "
                 "sum(cache_write_1h_tokens) FROM {rollups} WHERE grain = %s AND kind = %s "
                 "AND bucket >= %s AND bucket < %s"
                 + (" AND subject = %s" if subject is not None else "")
                 + " GROUP BY subject ORDER BY sum(cost) DESC, subject")
        params: list[Any] = [grain, group_by, since, until]
        if subject is not None:
            params.append(subject)
        try:
            async with self._lock, asyncio.timeout(self.timeout_s):
                conn = await self._connection()
                async with conn.transaction():
                    cur = await conn.execute(self._sql(query), params)
                    rows = await cur.fetchall()
        except Exception as exc:  # noqa: BLE001
            await self._drop_connection()
            raise UsageStoreError(f"PostgreSQL did not answer: {type(exc).__name__}") from None
        return [{"subject": row[0], "requests": int(row[1]), "errors": int(row[2]),
                 "input_tokens": int(row[3]), "output_tokens": int(row[4]),
                 "cached_input_tokens": int(row[5]), "reasoning_tokens": int(row[6]),
                 "cache_write_tokens": int(row[9]), "cache_write_1h_tokens": int(row[10]),
                 "cost_usd": str(row[7]), "cost_saved_usd": str(row[8])} for row in rows]

    async def spent_micros(self, subject_kind: str, subject_id: str, since: datetime) -> int:
        """A SpendLedger for the quota layer: the cost of `subject` since `since` (a period
        start, so a whole number of UTC days), from the day rollups. The gateway-wide
        subject ("global") is every request: the sum over all models (every record has
        one; an anonymous caller's has no key or project). Only what the metering layers
        have written counts: records still queued, or journalled while PostgreSQL is down,
        do not (PostgresSpendLedger adds its own unwritten spend)."""
        until = datetime(9999, 1, 1, tzinfo=UTC)
        if subject_kind == "global":
            rows = await self.usage(group_by="model", since=since, until=until)
        else:
            rows = await self.usage(group_by=subject_kind, since=since, until=until,
                                    subject=subject_id)
        return sum(usd_to_micros(row["cost_usd"]) for row in rows)


def _refuses_data(exc: Exception) -> bool:
    """Whether PostgreSQL refused a value of the batch rather than failed: a data exception
    (SQLSTATE class 22: a NUL in text, a number out of range, a malformed timestamp), an
    integrity one (23: a NULL where a column needs a value), or a program limit (54000: a
    text too long for an index, as a rollup's subject). Not a connection lost, a timeout, a
    missing table: those pass, and the batch waits in the journal until they do."""
    import psycopg
    return isinstance(exc, psycopg.DataError | psycopg.IntegrityError |
                      psycopg.errors.ProgramLimitExceeded)


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'
