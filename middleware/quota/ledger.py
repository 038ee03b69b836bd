"""The durable record of spend that budget counters are rebuilt from.

Redis holds the live counters; if it restarts or is flushed, a budget's counter is missing
and the quota layer seeds it from here (the spend of that subject since the period began),
so a flush never resets anyone's budget. Each row carries the id the quota store knows its
request's settle by, so the seed can tell which settles of a lost counter it already has.
Rows are written by a background task in batches with COPY, never on the response path;
while PostgreSQL is down they wait in memory (up to `max_pending_rows`, then the oldest are
dropped with an error in the log) and are written once it is back.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Collection, Iterable
from datetime import UTC, datetime
from typing import Any

from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from gateway.readiness import postgres_answers

logger = logging.getLogger("sluicegate.quota")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS {table} (
    ts            timestamptz NOT NULL,
    request_id    text        NOT NULL,
    subject_kind  text        NOT NULL,
    subject_id    text        NOT NULL,
    micros        bigint      NOT NULL
);
CREATE INDEX IF NOT EXISTS {index} ON {table} (subject_kind, subject_id, ts);
"""


class PostgresSpendLedger:
    """Spend per subject (key, project, customer) per request, in PostgreSQL."""

    def __init__(self, dsn: str, *, table: str = "sluicegate_spend",
                 flush_interval_s: float = 0.5, batch_rows: int = 5000,
                 max_pending_rows: int = 1_000_000) -> None:
        self._dsn = dsn
        self.table = table
        self.flush_interval_s = flush_interval_s
        self.batch_rows = batch_rows
        self.max_pending_rows = max_pending_rows
        self._pending: deque[tuple[datetime, str, str, str, int]] = deque()
        self._pool: AsyncConnectionPool | None = None
        self._writer: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._ready = False

    def __repr__(self) -> str:  # the DSN may hold a password
        return f"PostgresSpendLedger(table={self.table!r})"

    async def startup(self) -> None:
        self._pool = AsyncConnectionPool(self._dsn, min_size=1, max_size=4, open=False,
                                         timeout=2.0)
        await self._pool.open(wait=False)
        with contextlib.suppress(Exception):  # PostgreSQL down: the writer retries
            await self._create_schema()
        self._writer = asyncio.create_task(self._write_forever(), name="spend-ledger-writer")

    async def shutdown(self) -> None:
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
            self._writer = None
        with contextlib.suppress(Exception):
            await self._flush()
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def check_ready(self) -> dict[str, str]:
        try:
            await postgres_answers(self._dsn, "sluicegate-spend-ledger-ready")
            return {"spend_ledger": "ok"}
        except Exception as exc:  # noqa: BLE001 (a report, not a failure)
            return {"spend_ledger": f"unavailable: {type(exc).__name__}"}

    # -- writing -----------------------------------------------------------------------------

    def record(self, request_id: str, spend: Iterable[tuple[str, str, int]],
               started_at: float | None = None) -> None:
        """Queues (subject kind, subject id, micro-dollars) rows, dated when the request
        started (epoch seconds; None: now), as the usage ledger bills it and its budget
        counters charged it: a stream that runs past midnight UTC is the day's it began.
        Never blocks."""
        at = datetime.now(UTC) if started_at is None else datetime.fromtimestamp(started_at,
                                                                                 UTC)
        for kind, subject, micros in spend:
            if micros:
                self._pending.append((at, request_id, kind, subject, micros))
        while len(self._pending) > self.max_pending_rows:
            self._pending.popleft()
            logger.error("spend ledger backlog full: dropped the oldest row")
        if len(self._pending) >= self.batch_rows:
            self._wake.set()

    async def _write_forever(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.flush_interval_s)
            self._wake.clear()
            try:
                await self._flush()
            except Exception as exc:  # noqa: BLE001 (PostgreSQL down: keep the rows, retry)
                logger.warning("spend ledger write failed (%s); %d rows kept for retry",
                               type(exc).__name__, len(self._pending))
                await asyncio.sleep(self.flush_interval_s)

    async def _flush(self) -> None:
        if self._pool is None:
            return
        while self._pending:
            if not self._ready:
                await self._create_schema()
            batch = [self._pending[i] for i in range(min(self.batch_rows, len(self._pending)))]
            async with self._pool.connection() as conn, conn.cursor() as cursor:
                copy = sql.SQL("COPY {} (ts, request_id, subject_kind, subject_id, micros) "
                               "FROM STDIN").format(sql.Identifier(self.table))
                async with cursor.copy(copy) as writer:
                    for row in batch:
                        await writer.write_row(row)
            for _ in batch:
                self._pending.popleft()

    async def _create_schema(self) -> None:
        assert self._pool is not None
        statement = sql.SQL(_SCHEMA).format(table=sql.Identifier(self.table),
                                            index=sql.Identifier(self.table + "_subject_ts"))
        async with self._pool.connection() as conn:
            await conn.execute(statement)
        self._ready = True

    # -- reading -----------------------------------------------------------------------------

    async def spent_micros(self, subject_kind: str, subject_id: str, since: datetime) -> int:
        """Spend recorded for the subject since `since`, plus rows not yet written."""
        return (await self.spent_counting(subject_kind, subject_id, since, ()))[0]

    async def spent_counting(self, subject_kind: str, subject_id: str, since: datetime,
                             request_ids: Collection[str]) -> tuple[int, set[str]]:
        """`spent_micros`, and which of `request_ids` it counts (written or not). A row the
        writer moves into PostgreSQL meanwhile may count twice, never not at all: the rows
        not yet written are read before the query."""
        assert self._pool is not None
        if not self._ready:
            await self._create_schema()
        unwritten = [row for row in self._pending
                     if row[2] == subject_kind and row[3] == subject_id and row[0] >= since]
        query = sql.SQL("SELECT coalesce(sum(micros), 0), coalesce(array_agg(DISTINCT "
                        "request_id) FILTER (WHERE request_id = ANY(%s)), '{{}}') FROM {} "
                        "WHERE subject_kind = %s AND subject_id = %s AND ts >= %s"
                        ).format(sql.Identifier(self.table))
        async with self._pool.connection(timeout=2.0) as conn:
            cursor = await conn.execute(query, (list(request_ids), subject_kind, subject_id,
                                                since))
            row: Any = await cursor.fetchone()
        wanted = set(request_ids)
        counted = set(row[1]) | {r[1] for r in unwritten if r[1] in wanted}
        return int(row[0]) + sum(r[4] for r in unwritten), counted
