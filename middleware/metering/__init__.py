"""The metering layer: one usage record per request, written exactly once.

On the request path it does one thing: when the request has ended, its record is encoded (as
the bytes the journal keeps) and appended to an in-memory queue, which so holds a few hundred
bytes per request rather than the request's context with its bodies. The layer does not wrap
the rest of the stack for that: it asks the kernel to call it back at the end
(`RequestContext.on_end`), which costs a request less than another coroutine around everything
below. A background writer takes the queued records in batches (up to `batch_size`, or every
`flush_interval_s`), appends each batch to the local journal (an append-only outbox of
checksummed records, fsync by `fsync` policy), then writes it to PostgreSQL (COPY into staging,
INSERT ... ON CONFLICT DO NOTHING into `usage_events`, and the rollups, in one transaction) and
acknowledges the journal. A record is keyed by its request id, so a replay never counts twice.
A record PostgreSQL refuses (a value it cannot store) is found by writing its batch again in
halves, and set aside in the dead letter beside the journals (`DEAD_LETTER`), so that it
cannot hold up every record after it.

When PostgreSQL is slow or down, batches only go to the journal; once it answers again, the
journal is replayed in order, then writing goes direct again. On startup after a crash the
journal's unacknowledged records are replayed first. With no PostgreSQL configured, the
journal is the ledger (`sluicegate usage --journal DIR` reads it, read-only).

Usage is read back through `GET /admin/usage` (with `admin_token_env`) and, for a virtual key
itself, `GET /v1/usage/self` (see `middleware.metering.usage`).

Loss window: with the defaults (`durability="batch"`, `fsync="batch"`), a record reaches the
journal (the OS's page cache) at most `flush_interval_s` (0.2 s) after its response ended, and
the disk within `fsync_interval_s` (1 s) more, when a batch or the writer's timer finds the
interval passed. A `kill -9` loses what the queue held, the requests of the last ~0.2 s,
though their clients had their answers; what reached the page cache survives it. A power loss
can lose ~1.2 s (with PostgreSQL up, records written there are durable at its commit). An
fsync costs the process's core about as much as a few milliseconds of requests on this
bench's file system (paired rounds, 2026-11-29: 0.923× the bare passthrough's req/s at one
fsync per 0.05 s, 0.971× with none), hence one a second rather than one a batch.
`durability="response"` closes that window: a response's last message waits until its record
is journaled and fsynced (group commit: the requests of one moment share one write and one
fsync), so every answer a client received survives a crash, for the price of an fsync in each
response's latency. If the queue grows past `queue_max` (the disk cannot keep up), requests
append to the journal themselves (a short blocking write) rather than drop anything.

Listed below a failover layer, the layer is called for each call that layer makes for a
request, and records the request once, as it ended; `durability="response"` is refused
there (`learn_routes`).
"""
from __future__ import annotations

import asyncio
import functools
import logging
import math
import os
import stat
import time
from collections.abc import Awaitable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson

from gateway.admin import admin_token_from_env, route_path
from gateway.config import ConfigError, GatewayConfig, is_postgres_dsn
from gateway.context import SELF_USAGE_PATH, RequestContext, find_request_context
from gateway.errors import ClientDisconnected, GatewayError
from gateway.kernel import ASGIApp, Receive, Scope, Send, degraded
from gateway.metrics import Sample
from middleware.metering.journal import FSYNC_POLICIES, Journal, JournalError, Position
from middleware.metering.record import UsageRecord, cleaned, payload_of
from middleware.metering.store import PostgresUsageStore, UsageStoreError
from middleware.metering.usage import journal_usage, serve_admin_usage, serve_own_usage

__all__ = ["JournalError", "MeteringMiddleware", "PostgresUsageStore", "UsageRecord",
           "journal_usage"]

logger = logging.getLogger("sluicegate.metering")

DURABILITY = ("batch", "response")
# Beside the journals: records PostgreSQL refused, one JSON object a line (`_set_aside`).
DEAD_LETTER = "dead-letter.jsonl"
ORPHAN_SCAN_S = 60.0  # how often a process looks for journals no process holds
# Records kept in memory while the journal fails and PostgreSQL cannot take them either;
# past this many, the oldest are dropped (and logged).
QUEUE_HARD_MAX = 1_000_000


class MeteringMiddleware:
    """The usage ledger (see the module docstring).

    `store`: None (the journal is the ledger), a postgresql:// DSN or a PostgresUsageStore.
    `journal_dir`: where the journals live (default: $SLUICEGATE_JOURNAL_DIR, else
    ./sluicegate-journal). Each process takes a free `slot-NNN` subdirectory (an flock), so
    workers never share a journal; a process also replays the slots nobody holds, when
    its writer starts and every ORPHAN_SCAN_S (a minute) after.
    `admin_token_env`: serves `GET /admin/usage` (totals from the rollups).
    Every key may read its own totals at `GET /v1/usage/self` (with a PostgreSQL store and
    AuthMiddleware before this layer).
    """

    passes_json_through = True  # a JSON answer from below goes on as it came
    reads_request_at_end = True  # (so above auth it keeps the body unread: body_after_auth)

    def __init__(
        self,
        app: ASGIApp,
        *,
        store: PostgresUsageStore | str | None = None,
        journal_dir: str | None = None,
        fsync: str = "batch",
        fsync_interval_s: float = 1.0,
        batch_size: int = 2000,
        flush_interval_s: float = 0.2,
        queue_max: int = 100_000,
        retry_interval_s: float = 1.0,
        durability: str = "batch",
        admin_token_env: str | None = None,
    ) -> None:
        self.app = app
        if durability not in DURABILITY:
            raise ConfigError(f"MeteringMiddleware durability must be one of {DURABILITY}.")
        self.durability = durability
        if fsync not in FSYNC_POLICIES:
            raise ConfigError(f"MeteringMiddleware fsync must be one of {FSYNC_POLICIES}.")
        _check_counts(batch_size, queue_max)
        _check_seconds("flush_interval_s", flush_interval_s)
        _check_seconds("retry_interval_s", retry_interval_s)
        _check_seconds("fsync_interval_s", fsync_interval_s, zero_ok=True)
        if isinstance(store, str):
            if not is_postgres_dsn(store):
                raise ConfigError("MeteringMiddleware store must be a PostgreSQL DSN or a "
                                  "PostgresUsageStore.")
            store = PostgresUsageStore(store)
        self.store = store
        if journal_dir is not None and not isinstance(journal_dir, str | os.PathLike):
            raise ConfigError(f"MeteringMiddleware journal_dir must be a directory's path, "
                              f"not a {type(journal_dir).__name__}.")
        self.journal_root = Path(journal_dir or os.environ.get("SLUICEGATE_JOURNAL_DIR")
                                 or "./sluicegate-journal")
        _check_journal_root(self.journal_root)
        self.fsync = fsync
        self.fsync_interval_s = fsync_interval_s
        # Until startup claims a slot: a reader, which creates nothing (check-config and
        # doctor build the stack, as the service's user, in a directory it may not write)
        # and refuses appends, as an unopened journal does.
        self.journal = Journal(self.journal_root / "unclaimed", read_only=True)
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.queue_max = queue_max
        self.retry_interval_s = retry_interval_s
        self.admin_token = (admin_token_from_env(admin_token_env, "MeteringMiddleware")
                            if admin_token_env is not None else None)
        self._queue: list[bytes] = []  # encoded records, oldest first
        self._queued_at = 0.0  # when the oldest of them was queued (monotonic)
        # Requests waiting for their record to be on disk: (how many queued records must be
        # written first, including theirs; the future to resolve then).
        self._waiting: list[tuple[int, asyncio.Future[None]]] = []
        self._wake: asyncio.Event | None = None
        self._writer: asyncio.Task[None] | None = None
        self._writer_failed: str | None = None  # what ended it, if it raised (`_writer_ended`)
        self._io: ThreadPoolExecutor | None = None
        self._replaying = False  # PostgreSQL is behind the journal: replay before direct writes
        self._next_retry = 0.0
        self._next_orphan_scan = 0.0  # (at the writer's start, then every ORPHAN_SCAN_S)
        self._overflowed = False  # records journaled outside the writer (see `_replay`)
        self._overflow_retry = 0.0  # (`_queue_full`: after the journal failed it)
        self._stopping = False
        self.written = 0  # rows PostgreSQL took (for tests and /admin)
        self.set_aside = 0  # records in the dead letter (PostgreSQL refused them, or unreadable)

    def learn_routes(self, router: Any, config: GatewayConfig) -> None:
        """Called by a layer listed above this one that routes every call it makes below
        (the failover layer's `check_config`). Then this layer is called once per call
        (each retry, fallback, continuation, hedge) and records the request once, as it
        ended. With durability="response" it would hold a response's last byte until the
        record is on disk, but the router answers some requests itself (its error after
        the last attempt, a stream it ends in-band), past this layer: refused."""
        if self.durability == "response":
            name, routing = type(self).__name__, type(router).__name__
            raise ConfigError(
                f"{config.path}: {name}(durability='response') is listed below {routing}, "
                "which answers some requests itself (its error after the last attempt, a "
                "stream it ends in-band), so their last byte cannot wait for their record; "
                f"list {name} above {routing} (auth, metering, quota, cache, failover), or "
                "use durability='batch' there.")

    # -- lifecycle ---------------------------------------------------------------------------

    async def startup(self) -> None:
        """Claims a journal slot, connects the store and starts the writer. A start that
        fails (or is cancelled) part-way lets go of the slot and the store again, so the
        kernel's next try (a request's, see gateway/kernel.py) claims the same slot."""
        self._io = io = ThreadPoolExecutor(1, thread_name_prefix="sluicegate-journal")
        loop = asyncio.get_running_loop()
        opening = loop.run_in_executor(io, self._open_free_slot)
        try:
            self.journal = await asyncio.shield(opening)
            if self.store is not None:
                await self.store.startup()
                pending = await loop.run_in_executor(io, self.journal.pending_count)
                self._replaying = pending > 0
                if pending:
                    logger.info("metering: %d record(s) in the journal to replay", pending)
        except BaseException:  # (CancelledError too: re-raised once the slot is let go)
            await self._undo_start(io, opening)
            raise
        self._stopping = False  # (after a shutdown: this is a restart)
        self._writer_failed = None
        self._wake = asyncio.Event()
        self._writer = loop.create_task(self._run(), name="sluicegate-metering-writer")
        self._writer.add_done_callback(self._writer_ended)

    def _writer_ended(self, writer: asyncio.Task[None]) -> None:
        """The writer ends only at shutdown; one that raised is a bug, said loudly and on
        /readyz: from then on records only pile up in memory (journaled by requests past
        queue_max, and at shutdown) and none reaches PostgreSQL."""
        if writer.cancelled() or (exc := writer.exception()) is None:
            return
        self._writer_failed = type(exc).__name__
        logger.critical("metering: the usage writer stopped; usage records wait in memory "
                        "(journaled past queue_max, and at shutdown) and none reaches "
                        "PostgreSQL until a restart", exc_info=exc)

    async def _undo_start(self, io: ThreadPoolExecutor, opening: asyncio.Future[Journal]) -> None:
        if self.store is not None:
            await self.store.shutdown()
        await asyncio.wait([opening])  # (cancelled while opening: the slot is taken even so)
        if opening.exception() is None:
            await asyncio.get_running_loop().run_in_executor(io, opening.result().close)
        io.shutdown(wait=False)
        self._io = None

    def _open_free_slot(self) -> Journal:
        """The journal of the first `slot-NNN` no live process holds (each journal holds an
        flock on its directory while open)."""
        self.journal_root.mkdir(mode=0o700, parents=True, exist_ok=True)
        for number in range(1024):
            journal = Journal(self.journal_root / f"slot-{number:03d}", fsync=self.fsync,
                              fsync_interval_s=self.fsync_interval_s)
            try:
                journal.open()
            except JournalError as exc:
                logger.debug("metering: journal slot %d: %s", number, exc)
                continue
            return journal
        raise ConfigError(f"MeteringMiddleware: no usable journal slot under "
                          f"{self.journal_root}.")

    async def shutdown(self) -> None:
        """Writes what is queued to the journal (and to PostgreSQL if it answers)."""
        self._stopping = True
        if self._wake is not None:
            self._wake.set()
        if self._writer is not None:
            # (asyncio.wait: a writer that raised is no reason to lose its queue, just below;
            # `_writer_ended` said why it stopped)
            finished, _ = await asyncio.wait([self._writer], timeout=30)
            if not finished:
                logger.error("metering: the writer did not finish in 30 s; what it had not "
                             "written is in the journal or lost with the queue")
                self._writer.cancel()
                await asyncio.wait([self._writer])
        if self._queue:  # the writer failed: keep the records anyway
            payloads, waiting = self._drain()
            await self._journal_batch(payloads, sync=True)
            _resolve(waiting)
        if self.store is not None:
            await self.store.shutdown()
        if self._io is not None:
            await asyncio.get_running_loop().run_in_executor(self._io, self.journal.close)
            self._io.shutdown(wait=True)
            self._io = None

    async def check_ready(self) -> dict[str, str]:
        if self._writer_failed is not None:  # not ready: this process records no usage
            return {"usage_journal": f"error: the usage writer stopped ({self._writer_failed})"}
        checks = {"usage_journal": "ok"}
        if self.store is not None:
            checks.update(degraded(await self.store.check_ready(),
                                   "usage waits in the journal"))
        return checks

    # -- requests ----------------------------------------------------------------------------

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        # Not a coroutine: an API request goes on down the stack as it is (no frame of ours
        # around it), with `_record` on the kernel's list of things to run at its end.
        if scope["type"] != "http":
            return self.app(scope, receive, send)
        ctx = find_request_context(scope)
        if ctx is None:
            return self._serve(scope, receive, send)
        if self.durability == "response" and not ctx.reroutable:
            return self._call_durable(ctx, scope, receive, send)
        on_end = ctx.on_end
        if on_end is None:  # (`ctx.at_end`, inline: a call frame on every request)
            ctx.on_end = [self._record]
        elif self._record not in on_end:
            # Below a layer that routes every call (failover: `ctx.reroutable`) this runs for
            # each of its calls (retries, fallbacks, a downgrade's or a refusal's call again,
            # a continuation, a hedge, whose copies share the list): the caller sent one
            # request, and it is recorded once, as it ended, every attempt in it.
            on_end.append(self._record)
        return self.app(scope, receive, send)

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = route_path(scope)
        if path == SELF_USAGE_PATH:
            await serve_own_usage(self.store, scope, send)
        elif self.admin_token is not None and path == "/admin/usage":
            await serve_admin_usage(self.store, self.admin_token, scope, send)
        else:
            await self.app(scope, receive, send)

    def _record(self, ctx: RequestContext) -> bool:
        """Queues the record of a request that has ended (the kernel calls this with the
        status and error final); False if it could not be made (logged)."""
        try:
            payload = payload_of(ctx)
        except Exception:
            logger.exception("metering: request %s could not be recorded", ctx.request_id)
            return False
        queue = self._queue
        if not queue:
            self._queued_at = time.monotonic()
        queue.append(payload)
        if len(queue) >= self.batch_size:
            self._queue_full()
        return True

    async def _call_durable(self, ctx: RequestContext, scope: Scope, receive: Receive,
                            send: Send) -> None:
        """durability="response": the response's last message waits until its record is on
        disk, so the record is made here, before the kernel has seen the end."""
        recorded = False

        async def send_when_recorded(message: Any) -> None:
            nonlocal recorded
            if message["type"] == "http.response.body" and not message.get("more_body") \
                    and not recorded:
                recorded = True
                await self._record_durable(ctx)
            await send(message)
        try:
            await self.app(scope, receive, send_when_recorded)
        except GatewayError as exc:  # the kernel answers it; the record needs it now
            ctx.status = exc.status
            ctx.error_type = ctx.error_type or exc.type_for(ctx.api_format)
            raise
        except ClientDisconnected:
            ctx.client_disconnected = True
            raise
        except Exception:
            ctx.status, ctx.error_type = 500, "internal_error"
            raise
        finally:
            if not recorded:
                await self._record_durable(ctx)

    async def _record_durable(self, ctx: RequestContext) -> None:
        """Queues the record and waits until the batch holding it is fsynced (group commit:
        the requests of one moment share one write and one fsync)."""
        if not self._record(ctx) or not self._queue:
            return  # not recorded, or already journaled and synced (the queue overflowed)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((len(self._queue), future))
        if self._wake is not None:
            self._wake.set()
        await asyncio.shield(future)

    def metric_samples(self) -> list[Sample]:
        """Gauges for /metrics: the queue, the journal and how far the ledger is behind."""
        queue = self._queue
        lag = time.monotonic() - self._queued_at if queue else 0.0
        try:
            journal_bytes = float(self.journal.disk_bytes())
        except OSError:
            journal_bytes = 0.0
        return [
            ("sluicegate_metering_queue_depth", "Usage records waiting for the writer.", {},
             float(len(queue))),
            ("sluicegate_metering_journal_bytes", "Bytes of usage journal on disk.", {},
             journal_bytes),
            ("sluicegate_metering_writer_lag_seconds",
             "Age of the oldest usage record the writer has not taken yet.", {}, lag),
            ("sluicegate_metering_replaying", "1 while PostgreSQL is behind the journal.", {},
             float(self._replaying)),
            ("sluicegate_metering_set_aside_records",
             f"Usage records this process set aside in {DEAD_LETTER} (PostgreSQL refused them).",
             {}, float(self.set_aside)),
        ]

    def _queue_full(self) -> None:
        if self._wake is not None:
            self._wake.set()
        if len(self._queue) > self.queue_max and time.monotonic() >= self._overflow_retry:
            # The writer cannot keep up (a slow disk): keep the records, at a small cost here.
            payloads, waiting = self._drain()
            try:
                self.journal.append(payloads)
                self.journal.sync()
            except (OSError, JournalError) as exc:
                # A failing disk: the records stay queued (up to a bound), the writer tries
                # them again, and this waits a retry interval before it journals again.
                keep = payloads[-QUEUE_HARD_MAX:]
                if len(keep) < len(payloads):
                    logger.error("metering: the journal fails (%s) and the queue is full: "
                                 "%d record(s) are lost", exc, len(payloads) - len(keep))
                self._requeue(keep, waiting)
                self._overflow_retry = time.monotonic() + self.retry_interval_s
                return
            _resolve(waiting)
            if self.store is not None:
                self._replaying = self._overflowed = True

    def _requeue(self, payloads: list[bytes], waiting: list[asyncio.Future[None]]) -> None:
        """Puts records `_drain` took back at the head of the queue, and the requests that
        waited for them back to waiting, for all of them (`_drain` undone, give or take
        where each waiter's own record was)."""
        self._queue[0:0] = payloads
        self._waiting = [(len(payloads), future) for future in waiting] + [
            (needed + len(payloads), future) for needed, future in self._waiting]

    def _drain(self, limit: int | None = None
               ) -> tuple[list[bytes], list[asyncio.Future[None]]]:
        """Takes the oldest `limit` (default: all) queued records, and the futures of the
        requests that wait for exactly those to be written."""
        queue = self._queue
        if limit is None or limit >= len(queue):
            taken, self._queue = queue, []
        else:
            taken = queue[:limit]
            del queue[:limit]  # _queued_at stays: the lag it reports errs on the high side
        if not self._waiting:
            return taken, []
        count, ready, still = len(taken), [], []
        for needed, future in self._waiting:
            if needed <= count:
                ready.append(future)
            else:
                still.append((needed - count, future))
        self._waiting = still
        return taken, ready

    # -- the writer --------------------------------------------------------------------------

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            # Batches fill for flush_interval_s (or to batch_size), unless a request waits.
            urgent = self._waiting and self._queue  # a request waits for what is queued
            if not self._stopping and not urgent and len(self._queue) < self.batch_size:
                try:
                    await asyncio.wait_for(self._wake.wait(), self.flush_interval_s)
                except TimeoutError:
                    pass
                self._wake.clear()
            if self._queue:
                payloads, waiting = self._drain(self.batch_size)
                try:
                    await self._write_batch(payloads, durable=bool(waiting))
                except Exception:
                    # Kept nowhere (the journal failed, and PostgreSQL too or it is behind):
                    # queued again, oldest first, its waiters with it (a durable response
                    # waits until its record is kept), and tried again after a pause; at
                    # shutdown, lost, and said so.
                    if self._stopping:
                        logger.exception("metering: %d record(s) could be kept neither in the "
                                         "journal nor in PostgreSQL, and are lost",
                                         len(payloads))
                        _resolve(waiting)
                    else:
                        logger.exception("metering: a batch could be kept neither in the "
                                         "journal nor in PostgreSQL; it is tried again")
                        self._requeue(payloads, waiting)
                        await asyncio.sleep(self.retry_interval_s)
                else:
                    _resolve(waiting)
            if self.store is not None and not self._replaying and not self._stopping \
                    and time.monotonic() >= self._next_orphan_scan:
                self._next_orphan_scan = time.monotonic() + ORPHAN_SCAN_S
                try:
                    await self._adopt_orphans()
                except Exception:  # (never the writer's end)
                    logger.exception("metering: reading the journals nobody holds failed")
            # (not only when no request is queued: under steady traffic that never is, and
            # the journal would wait for a quiet moment to reach PostgreSQL after an outage)
            if self._replaying and time.monotonic() >= self._next_retry:
                try:
                    await self._replay()
                except Exception:  # (a journal that cannot be read or acknowledged)
                    logger.exception("metering: the replay failed; it is tried again")
                    self._next_retry = time.monotonic() + self.retry_interval_s
            if not self._queue and self.journal.sync_due():
                # A quiet moment: the last batches wait for no later append to reach the disk.
                try:
                    await asyncio.get_running_loop().run_in_executor(self._io, self.journal.sync)
                except OSError as exc:
                    logger.error("metering: the journal could not be synced: %s", exc)
            if self._stopping and not self._queue:
                if self._replaying:
                    try:
                        await self._replay()
                    except Exception:  # (as above: what is left stays in the journal)
                        logger.exception("metering: the replay at shutdown failed; the "
                                         "journal is replayed at the next start")
                return

    async def _write_batch(self, payloads: list[bytes], *, durable: bool = False) -> None:
        """Journals the batch, then writes it to PostgreSQL (unless the journal is behind).
        Raises only when the batch is kept in neither."""
        if not payloads:
            return
        position: Position | None = None
        try:
            position = await self._journal_batch(payloads, sync=durable)
        except (OSError, JournalError) as exc:  # (a full or failing disk)
            if self.store is None:
                raise
            # Even while the journal is replayed: the batch would wait in memory for a
            # journal that may never take it (its disk filled during the outage).
            logger.error("metering: the journal failed (%s); this batch goes to PostgreSQL "
                         "alone", exc)
        if self.store is None or (self._replaying and position is not None):
            return  # the journal is the ledger, or PostgreSQL is behind it
        try:
            self.written += await self._store_batch(payloads)
        except (UsageStoreError, OSError) as exc:  # (OSError: the dead letter failed)
            if position is None:
                raise
            logger.warning("metering: %s; usage goes to the journal until it answers", exc)
            self._replaying = True
            self._next_retry = time.monotonic() + self.retry_interval_s
            return
        if position is not None:
            try:
                await self._acknowledge(position)
            except JournalError as exc:  # written: a replay writes it again, once
                logger.error("metering: the journal could not be acknowledged: %s", exc)

    async def _store_batch(self, payloads: list[bytes],
                           unreadable: list[tuple[bytes, str]] | None = None) -> int:
        """Writes records to PostgreSQL, and sets aside the ones it refuses (and `unreadable`
        ones, of a journal) in the dead letter: rows new. Refused, a record would fail its
        batch at every try, and the journal is replayed in order, so every later record
        would wait behind it, for ever. UsageStoreError: PostgreSQL did not answer; OSError:
        the dead letter could not be written; the batch is then written again later (what
        was written of it is found there, and not written twice)."""
        assert self.store is not None
        written, refused = await self.store.write_each(payloads) if payloads else (0, [])
        refused += unreadable or []
        if refused:
            await asyncio.get_running_loop().run_in_executor(self._io, self._set_aside, refused)
        return written

    def _set_aside(self, refused: list[tuple[bytes, str]]) -> None:
        """Appends records to the dead letter, `<journal_dir>/dead-letter.jsonl`, and fsyncs
        it before the journal lets go of them: each line a JSON object with the time, the
        error and the record as the journal held it (a string of its JSON), so an operator
        can mend it and write it again (a record already in PostgreSQL is not counted
        twice). O_APPEND, one write: processes sharing the directory append whole lines."""
        at = time.time()
        data = b"".join(orjson.dumps({"set_aside_at": at, "error": why, "record": payload.decode(
            "utf-8", "backslashreplace")}) + b"\n" for payload, why in refused)
        path = self.journal_root / DEAD_LETTER
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.set_aside += len(refused)
        logger.error("metering: %d usage record(s) could not be written to PostgreSQL and are "
                     "set aside in %s (they would have held up every later record): %s",
                     len(refused), path, refused[0][1])

    async def _journal_batch(self, payloads: list[bytes], *, sync: bool = False) -> Position:
        journal = self.journal

        def append() -> Position:
            position = journal.append(payloads)
            if sync:
                journal.sync()
            return position
        return await asyncio.get_running_loop().run_in_executor(self._io, append)

    async def _acknowledge(self, position: Position) -> None:
        """Moves the journal past records PostgreSQL holds. A checkpoint the journal cannot
        save (a full disk) stops nothing: the journal reads on from the position in memory
        and saves it at a later acknowledgement; a restart meanwhile replays the records
        since the saved one, which PostgreSQL takes once."""
        journal = self.journal
        was_saved = journal.checkpoint_saved
        try:
            await asyncio.get_running_loop().run_in_executor(self._io, journal.acknowledge,
                                                             position)
        except OSError as exc:
            if was_saved:  # (said once, not at every batch)
                logger.error("metering: the journal's checkpoint cannot be saved (%s); the "
                             "journal goes on from its position in memory", exc)
            return
        if not was_saved:
            logger.info("metering: the journal's checkpoint is saved again")

    async def _adopt_orphans(self) -> None:
        """Replays the journals of slots no live process holds: one whose process crashed
        and was not started again, or is one of fewer workers after a scale-down or a
        reload. Each is held (its flock) while it is read, so a process starting meanwhile
        takes another slot; its records go to PostgreSQL and are acknowledged there."""
        assert self.store is not None
        loop = asyncio.get_running_loop()
        own = self.journal.directory
        paths = await loop.run_in_executor(self._io, lambda: sorted(
            path for path in self.journal_root.glob("slot-*")
            if path.is_dir() and path != own))
        for path in paths:
            orphan = Journal(path, fsync=self.fsync, fsync_interval_s=self.fsync_interval_s)
            try:
                await loop.run_in_executor(self._io, orphan.open)
            except (OSError, JournalError):
                continue  # a live process holds it (or it is not a journal)
            try:
                while not self._stopping:
                    pending = await loop.run_in_executor(
                        self._io, functools.partial(orphan.pending, limit=self.batch_size))
                    if not pending:
                        break
                    self.written += await self._store_batch(*_checked(pending))
                    await loop.run_in_executor(self._io, orphan.acknowledge, pending[-1][0])
                    logger.info("metering: replayed %d record(s) of %s, which no process "
                                "holds", len(pending), path.name)
                    if self._queue:  # new requests first: go on at the writer's next turn
                        self._next_orphan_scan = 0.0
                        return
            except (UsageStoreError, OSError, JournalError) as exc:
                logger.warning("metering: the journal of %s waits (%s)", path.name, exc)
                return
            finally:
                await loop.run_in_executor(self._io, orphan.close)

    async def _replay(self) -> None:
        """Writes the journal's unacknowledged records to PostgreSQL, oldest first."""
        assert self.store is not None
        loop = asyncio.get_running_loop()
        while True:
            self._overflowed = False
            pending = await loop.run_in_executor(
                self._io, lambda: self.journal.pending(limit=self.batch_size))
            if not pending:
                if self._overflowed:  # (journaled by `_queue_full` while this read ran)
                    continue
                self._replaying = False
                logger.info("metering: the journal is replayed; writing directly again")
                return
            try:
                self.written += await self._store_batch(*_checked(pending))
            except (UsageStoreError, OSError) as exc:  # (OSError: the dead letter failed)
                logger.warning("metering: replay paused (%s)", exc)
                self._next_retry = time.monotonic() + self.retry_interval_s
                return
            await self._acknowledge(pending[-1][0])
            if self._queue and not self._stopping:
                return  # new requests first; the replay continues on the next turn


def _checked(pending: list[tuple[Position, bytes]]
             ) -> tuple[list[bytes], list[tuple[bytes, str]]]:
    """Journaled records as PostgreSQL takes them: checked, cleaned (a NUL journaled by a
    gateway from before `cleaned`) and older formats rewritten; and the records that are
    not usage records, with why (for the dead letter)."""
    payloads, unreadable = [], []
    for _, payload in pending:
        try:
            payloads.append(cleaned(UsageRecord.decode(payload)).encode())
        except (ValueError, TypeError, AttributeError) as exc:  # (a field of the wrong type)
            unreadable.append((payload, f"not a usage record: {exc}"))
    return payloads, unreadable


def _check_journal_root(root: Path) -> None:
    """Refuses a journal directory that is clearly unusable, seen without writing anything:
    where it, or the nearest of its parents that exists, is not a directory (a file), its
    creation at startup would fail. What cannot be seen (a parent this user may not search)
    is left to startup."""
    absolute = root.absolute()
    for path in (absolute, *absolute.parents):
        try:
            is_directory = stat.S_ISDIR(path.stat().st_mode)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError:
            return
        if not is_directory:
            raise ConfigError(f"MeteringMiddleware journal_dir {str(root)!r} cannot be "
                              f"created: {str(path)!r} is not a directory.")
        return


def _check_counts(batch_size: int, queue_max: int) -> None:
    """Whole numbers only: the writer slices its queue by `batch_size` (2.5 raised there,
    in the writer, which then recorded nothing more)."""
    for name, value in (("batch_size", batch_size), ("queue_max", queue_max)):
        if type(value) is not int or value < 1:
            raise ConfigError(f"MeteringMiddleware {name} must be a whole number, 1 or more, "
                              f"not {value!r}.")
    if queue_max < batch_size:
        raise ConfigError(f"MeteringMiddleware queue_max ({queue_max}) must be at least "
                          f"batch_size ({batch_size}).")


def _check_seconds(name: str, value: float, *, zero_ok: bool = False) -> None:
    """A finite number of seconds, more than 0 (or 0 too): a NaN flush interval ended the
    writer at its first wait (uvloop's timers refuse it; asyncio's spin), a negative fsync
    interval failed the journal at startup, and a negative retry interval retried a failing
    PostgreSQL without a pause."""
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not (0 <= value if zero_ok else 0 < value) or not value < math.inf:
        least = "0 or more" if zero_ok else "more than 0"
        raise ConfigError(f"MeteringMiddleware {name} must be a finite number of seconds, "
                          f"{least}, not {value!r}.")


def _resolve(waiting: list[asyncio.Future[None]]) -> None:
    for future in waiting:
        if not future.done():
            future.set_result(None)
