"""The metering layer: records, the PostgreSQL ledger (exactly once, rollups = events), and
requests through a real gateway with the SDKs: JSON, streams, errors, cache hits, client
disconnects, a PostgreSQL outage and a restart that replays the journal."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import ROUND_CEILING, Decimal
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import orjson
import psycopg
import pytest

from gateway.app import create_app
from gateway.config import ConfigError
from gateway.context import CONTEXT_KEY, RequestContext, Usage
from gateway.kernel import _run_end_hooks
from gateway.pricing import Price
from gateway.upstream import Deployment
from middleware.metering import DEAD_LETTER, MeteringMiddleware
from middleware.metering.journal import Journal
from middleware.metering.record import (
    ARRAY_FIELDS,
    ARRAY_FORMAT,
    UsageRecord,
    labels_of,
    payload_of,
    record_of,
)
from middleware.metering.store import PostgresUsageStore, UsageStoreError
from middleware.metering.usage import journal_usage
from tests.harness import REPO, TEST_KEY, ThreadedServer, free_port, mock_config, write_config
from tests.mock_providers import MockProviderServer
from tests.mock_providers.faults import Fault
from tests.tcp_proxy import TcpProxy

PG_DSN = "host=127.0.0.1 port=5432 user=root dbname=test"


def context(**fields: Any) -> RequestContext:
    defaults: dict[str, Any] = {
        "request_id": uuid.uuid4().hex, "operation": "openai.chat", "api_format": "openai",
        "body": {"model": "m", "messages": []}, "raw_body": b"", "model": "m",
        "stream": False}
    return RequestContext(**{**defaults, **fields})


# -- records -------------------------------------------------------------------------------------

def test_a_record_prices_the_served_call_and_keeps_the_labels() -> None:
    ctx = context(headers=[(b"x-sluicegate-tag-team", b"search"), (b"x-other", b"no")],
                  body={"model": "m", "metadata": {"feature": "autocomplete", "team": "x"}})
    ctx.served_deployment = Deployment("openai", "gpt-x",
                                       price=Price(input_per_mtok="1", output_per_mtok="2"))
    ctx.usage = Usage(input_tokens=1000, output_tokens=500)
    ctx.status = 200
    record = record_of(ctx)
    assert record.cost_micros == 2000  # 1000 * $1/M + 500 * $2/M = $0.002
    assert record.cost == Decimal("0.002000")
    assert record.labels == {"team": "search", "feature": "autocomplete"}  # headers win
    assert record.deployment == "openai/gpt-x" and record.saved_micros == 0
    assert UsageRecord.decode(record.encode()) == record


def test_the_request_path_encodes_exactly_the_record() -> None:
    """What the request path queues (`payload_of`) is the record's own encoding, for a served
    call, a cache hit and a request that never reached a model."""
    served = context(headers=[(b"x-sluicegate-tag-team", b"search")], stream=True,
                     customer="c1", status=200, first_byte_s=0.0123456)
    served.served_deployment = Deployment("openai", "gpt-x",
                                          price=Price(input_per_mtok="1", output_per_mtok="2"))
    served.usage = Usage(input_tokens=1000, output_tokens=500, reasoning_tokens=20)
    hit = context(cache_status="hit", state={"cache.saved_micros": 99}, first_byte_s=0.001)
    hit.usage = Usage(input_tokens=10, output_tokens=5)
    refused = context(status=429, error_type="rate_limit_error")
    for ctx in (served, hit, refused):
        payload = payload_of(ctx, 1_700_000_000.25, ctx.started_monotonic + 0.5)
        record = record_of(ctx, ended_at=1_700_000_000.25,
                           ended_monotonic=ctx.started_monotonic + 0.5)
        assert payload == record.encode()
        assert UsageRecord.decode(payload) == record
    assert record_of(served).ttft_ms == 12.346 and record_of(hit).ttft_ms is None


def test_a_queued_record_holds_its_own_bytes_only() -> None:
    """orjson returns each result in a 4 KiB buffer; a queued payload must not keep it (the
    queue holds up to `queue_max` of them during an outage: 400 MB, not 25)."""
    import tracemalloc
    ctx = context(status=200)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        payloads = [payload_of(ctx) for _ in range(1000)]
        held = (tracemalloc.get_traced_memory()[0] - before) / len(payloads)
    finally:
        tracemalloc.stop()
    assert held < 2 * max(map(len, payloads)) < 1024


def test_a_cache_hit_costs_nothing_and_records_what_it_saved() -> None:
    ctx = context(cache_status="semantic-hit", state={"cache.saved_micros": 1234})
    ctx.usage = Usage(input_tokens=10, output_tokens=5)
    ctx.served_deployment = Deployment("openai", "gpt-x",
                                       price=Price(input_per_mtok="1", output_per_mtok="2"))
    record = record_of(ctx)
    assert (record.cost_micros, record.saved_micros) == (0, 1234)
    assert record.input_tokens == 10 and record.deployment is None


def test_labels_are_bounded() -> None:
    headers = [(f"x-sluicegate-tag-k{i}".encode(), b"v" * 999) for i in range(40)]
    labels = labels_of(context(headers=headers))
    assert len(labels) == 16 and all(len(v) == 256 for v in labels.values())


def test_records_the_object_format_wrote_still_decode() -> None:
    """Journals written before the array format hold JSON objects: a restart replays them."""
    record = UsageRecord("req-1", 1.5, 2.5, key_id="k", labels={"team": "a"}, input_tokens=7,
                         cost_micros=42, ttft_ms=1.25, stream=True)
    old = orjson.dumps(record)  # what encode() wrote: the dataclass as an object
    assert old.startswith(b'{"request_id":"req-1"')
    assert UsageRecord.decode(old) == record
    assert record.encode().startswith(b'[2,"req-1",1.5,2.5,"k"')
    assert UsageRecord.decode(record.encode()) == record


def test_an_array_from_an_older_gateway_leaves_newer_fields_at_their_defaults() -> None:
    shorter = orjson.dumps([ARRAY_FORMAT, "req-2", 1.0, 2.0, "k", "p"])
    assert UsageRecord.decode(shorter) == UsageRecord("req-2", 1.0, 2.0, key_id="k", project="p")


def test_an_array_from_a_newer_gateway_gives_the_fields_this_one_knows() -> None:
    record = UsageRecord("req-3", 1.0, 2.0, key_id="k", input_tokens=5, cache_write_tokens=3)
    longer = orjson.dumps([*orjson.loads(record.encode()), 17, "a field to come"])
    assert UsageRecord.decode(longer) == record


def test_a_record_without_cache_writes_is_as_long_as_the_previous_gateway_reads() -> None:
    # The gateway before the cache-write fields refused an array longer than its 28 fields
    # (a rollback would have dropped every record): they are written only when not 0.
    plain = UsageRecord("req-4", 1.0, 2.0, input_tokens=5, cost_micros=9)
    assert len(orjson.loads(plain.encode())) == 1 + len(ARRAY_FIELDS) - 2
    assert UsageRecord.decode(plain.encode()) == plain
    writes = dataclasses.replace(plain, cache_write_tokens=4, cache_write_1h_tokens=1)
    assert len(orjson.loads(writes.encode())) == 1 + len(ARRAY_FIELDS)
    assert UsageRecord.decode(writes.encode()) == writes
    ctx = context(usage=Usage(input_tokens=5, output_tokens=1))
    assert len(orjson.loads(payload_of(ctx))) == 1 + len(ARRAY_FIELDS) - 2
    ctx.usage = Usage(input_tokens=5, output_tokens=1, cache_write_tokens=2)
    assert orjson.loads(payload_of(ctx))[-2:] == [2, 0]


@pytest.mark.parametrize("garbage", [
    b"[]", b'{"x": 1}', b'{"request_id": "a", "nope": [}', b'[2]', b'[1, "a", 1.0, 2.0]',
    b'[2, 7, 1.0, 2.0]',
])
def test_garbage_is_not_a_record(garbage: bytes) -> None:
    with pytest.raises(ValueError):
        UsageRecord.decode(garbage)


async def test_durable_records_that_overflow_the_queue_are_written_and_nobody_hangs(
        tmp_path: Path) -> None:
    """durability="response" with a queue bound of one: the second request's record
    overflows the queue, so the request path journals and fsyncs both itself; neither request
    then waits on a batch the writer will never take."""
    async def answer(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    layer = MeteringMiddleware(answer, journal_dir=str(tmp_path), durability="response",
                               batch_size=1, queue_max=1, flush_interval_s=60)
    await layer.startup()
    sent: list[Any] = []

    async def send(message: Any) -> None:
        sent.append(message)

    async def request(project: str) -> None:
        ctx = context(status=200)
        ctx.principal = type("P", (), {"key_id": "k", "project": project})()
        await layer({"type": "http", CONTEXT_KEY: ctx}, None, send)  # type: ignore[arg-type]
    try:
        await asyncio.wait_for(asyncio.gather(request("a"), request("b")), timeout=10)
    finally:
        await asyncio.wait_for(layer.shutdown(), timeout=10)
    assert len(sent) == 4
    assert {row["subject"]: row["requests"] for row in journal_usage(tmp_path)} == \
        {"a": 1, "b": 1}


async def test_a_quiet_journal_reaches_the_disk_within_the_fsync_interval(
        tmp_path: Path, fsync_calls: list[int]) -> None:
    """With fsync="batch", a batch appended less than fsync_interval_s after the last fsync
    is not synced by its append; with no later append, the writer's timer syncs it (before
    the timer, such records waited for the next append, however long)."""

    async def answer(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    layer = MeteringMiddleware(answer, journal_dir=str(tmp_path), flush_interval_s=0.05,
                               fsync_interval_s=0.5)
    await layer.startup()

    async def send(message: Any) -> None:
        pass
    try:
        ctx = context(status=200)
        await layer({"type": "http", CONTEXT_KEY: ctx}, None, send)  # type: ignore[arg-type]
        _run_end_hooks(ctx)  # what the kernel does when a request has ended
        deadline = time.monotonic() + 5
        while layer.journal.pending_count() < 1:  # journaled by the writer's next batch
            assert time.monotonic() < deadline, "the record was never journaled"
            await asyncio.sleep(0.01)
        while layer.journal.unsynced:  # (an append 0.5 s after the last fsync syncs itself)
            assert time.monotonic() < deadline, "the journal was never synced"
            await asyncio.sleep(0.01)
        assert fsync_calls
    finally:
        await asyncio.wait_for(layer.shutdown(), timeout=10)


@pytest.mark.parametrize("option", [
    {"batch_size": 2.5}, {"batch_size": True}, {"queue_max": 0}, {"queue_max": "100"},
    {"flush_interval_s": float("nan")}, {"flush_interval_s": 0},
    {"retry_interval_s": -5}, {"retry_interval_s": float("inf")},
    {"fsync_interval_s": -1}, {"fsync_interval_s": float("nan")}], ids=str)
def test_options_the_writer_cannot_use_are_refused_in_one_sentence(
        tmp_path: Path, option: dict[str, Any]) -> None:
    """Each of these passed check-config, then failed the startup (fsync_interval_s=-1) or
    ended the writer after the first request (NaN, 2.5: every later record was lost), or
    retried a failing PostgreSQL without a pause (-5)."""
    (name, value), = option.items()
    with pytest.raises(ConfigError) as refused:
        MeteringMiddleware(lambda *_: None, journal_dir=str(tmp_path), **option)
    message = str(refused.value)
    assert message.startswith(f"MeteringMiddleware {name} must be ")
    assert message.endswith(f", not {value!r}.") and message.count(". ") == 0


def test_a_zero_fsync_interval_is_allowed(tmp_path: Path) -> None:  # (an fsync a batch)
    layer = MeteringMiddleware(lambda *_: None, journal_dir=str(tmp_path), fsync_interval_s=0)
    assert layer.fsync_interval_s == 0


def check_config_in(cwd: Path, config: Path) -> subprocess.CompletedProcess[str]:
    """`sluicegate check-config` run in `cwd`, with no SLUICEGATE_JOURNAL_DIR (as the
    systemd unit's documented check ran it: systemd-run leaves the unit's Environment= out)."""
    env = {name: value for name, value in os.environ.items()
           if name != "SLUICEGATE_JOURNAL_DIR"}
    return subprocess.run([sys.executable, "-m", "gateway.cli", "check-config", str(config)],
                          cwd=cwd, env={**env, "PYTHONPATH": str(REPO)}, text=True,
                          capture_output=True, timeout=60, check=False)


def test_check_config_writes_nothing_in_its_working_directory(tmp_path: Path) -> None:
    """The layer's construction made ./sluicegate-journal/unclaimed, so check-config (and
    doctor) failed on a valid config in a directory its user cannot write (/, where
    systemd-run starts it); the journal directory is made at startup only."""
    config = write_config(tmp_path, mock_config("http://127.0.0.1:9"))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    checked = check_config_in(cwd, config)
    assert checked.returncode == 0, checked.stderr
    assert "MeteringMiddleware" in checked.stdout
    assert list(cwd.iterdir()) == []


def test_a_journal_dir_under_a_file_is_refused_at_check_config(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    config = write_config(tmp_path, mock_config("http://127.0.0.1:9", middleware=(
        f"[Middleware(MeteringMiddleware, journal_dir={str(tmp_path / 'a-file' / 'j')!r})]")))
    checked = check_config_in(tmp_path, config)
    assert checked.returncode == 2
    assert checked.stderr == (
        f"sluicegate: {config}: layer MeteringMiddleware has wrong options: MeteringMiddleware "
        f"journal_dir '{tmp_path / 'a-file' / 'j'}' cannot be created: "
        f"'{tmp_path / 'a-file'}' is not a directory.\n")


async def test_a_writer_that_dies_says_so_and_its_queue_is_journaled_at_shutdown(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A writer ended by an exception (a bug: here an interval set past the checks) used to
    end silently, and shutdown raised its exception again, losing the queue with it."""
    async def answer(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def send(message: Any) -> None:
        pass

    layer = MeteringMiddleware(answer, journal_dir=str(tmp_path))
    layer.batch_size = 2.5  # type: ignore[assignment]  # slicing a batch of 3 raises TypeError
    await layer.startup()
    try:
        for project in ("a", "b", "c"):  # (queued together: the writer waits for more)
            ctx = context(status=200)
            ctx.principal = type("P", (), {"key_id": "k", "project": project})()
            await layer({"type": "http", CONTEXT_KEY: ctx}, None, send)  # type: ignore[arg-type]
            _run_end_hooks(ctx)
        deadline = time.monotonic() + 5
        while await layer.check_ready() == {"usage_journal": "ok"}:
            assert time.monotonic() < deadline, "the writer's end was never reported"
            await asyncio.sleep(0.01)
        assert await layer.check_ready() == {
            "usage_journal": "error: the usage writer stopped (TypeError)"}
        assert "metering: the usage writer stopped" in caplog.text
    finally:
        await asyncio.wait_for(layer.shutdown(), timeout=10)
    assert {row["subject"]: row["requests"] for row in journal_usage(tmp_path)} == \
        {"a": 1, "b": 1, "c": 1}


# -- the PostgreSQL ledger -----------------------------------------------------------------------

def drop_tables(prefix: str) -> None:
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        for table in ("events", "rollups", "schema_version"):
            conn.execute(f"DROP TABLE IF EXISTS {prefix}_{table} CASCADE")


@pytest.fixture
def prefix() -> Iterator[str]:
    name = "sgu_" + uuid.uuid4().hex[:10]
    yield name
    drop_tables(name)


def rows(query: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        return conn.execute(query, params).fetchall()  # type: ignore[arg-type]


def assert_rollups_match_events(prefix: str) -> None:
    """Every rollup equals the sums of its events, for every grain and grouping."""
    for grain in ("minute", "day"):
        for kind, subject in (("key", "key_id"), ("project", "project"), ("model", "model"),
                              ("customer", "project || '/' || customer")):
            expected = rows(
                f"SELECT {subject}, date_trunc('{grain}', started_at, 'UTC'), count(*), "
                f"sum(input_tokens), sum(output_tokens), sum(cost), sum(cost_saved) "
                f"FROM {prefix}_events WHERE {subject} IS NOT NULL GROUP BY 1, 2 ORDER BY 1, 2")
            found = rows(
                f"SELECT subject, bucket, requests, input_tokens, output_tokens, cost, "
                f"cost_saved FROM {prefix}_rollups WHERE grain = %s AND kind = %s "
                f"ORDER BY 1, 2", grain, kind)
            assert found == expected, (grain, kind)


def sample(n: int, *, at: float | None = None, project: str = "p") -> list[UsageRecord]:
    at = time.time() if at is None else at
    return [UsageRecord(request_id=uuid.uuid4().hex, started_at=at - i * 7, ended_at=at,
                        key_id=f"k{i % 3}", project=project,
                        customer=None if i % 2 else f"c{i % 4}", model=f"m{i % 2}",
                        input_tokens=i, output_tokens=2 * i, cost_micros=100 + i,
                        saved_micros=i % 5, status=200 if i % 10 else 500)
            for i in range(n)]


async def test_batches_are_written_exactly_once_and_rollups_equal_events(prefix: str) -> None:
    store = PostgresUsageStore(PG_DSN, prefix=prefix)
    await store.startup()
    try:
        batch = sample(500)
        assert await store.write(batch) == 500
        assert await store.write(batch[:100]) == 0  # a replay adds nothing
        extra = sample(50)
        assert await store.write([*batch[400:], *extra]) == 50
        assert rows(f"SELECT count(*) FROM {prefix}_events")[0][0] == 550
        assert_rollups_match_events(prefix)
        # Day buckets from yesterday's: the sample goes an hour back, across midnight UTC
        # when the test runs just after it (a bucket counts if it starts within the range).
        start = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        totals = await store.usage(group_by="project", since=start - timedelta(days=1),
                                   until=start + timedelta(days=1))
        assert totals[0]["subject"] == "p" and totals[0]["requests"] == 550
        expected = sum(r.cost_micros for r in [*batch, *extra] if r.key_id == "k1"
                       and r.started_at >= start.timestamp())
        assert await store.spent_micros("key", "k1", start) == expected
        # The gateway-wide budgets' subject: every request.
        everyone = sum(r.cost_micros for r in [*batch, *extra] if r.started_at >= start.timestamp())
        assert await store.spent_micros("global", "all", start) == everyone
    finally:
        await store.shutdown()


def journal_records(slot: Path, records: list[UsageRecord]) -> None:
    """Journals `records` in `slot` as a process that then stopped would have left them."""
    journal = Journal(slot)
    journal.open()
    journal.append([record.encode() for record in records])
    journal.close()


async def started_process_writes(journal_dir: Path, prefix: str, expected: int, *,
                                 settle_s: float = 0.0) -> int:
    """Starts a metering layer (no requests) over `journal_dir` and PostgreSQL, waits until
    it has written `expected` rows (at most 10 s, then `settle_s` more), stops it, and
    returns how many rows it wrote."""
    async def nothing(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("no request is sent")
    layer = MeteringMiddleware(nothing, store=PostgresUsageStore(PG_DSN, prefix=prefix),
                               journal_dir=str(journal_dir), flush_interval_s=0.05)
    await layer.startup()
    try:
        deadline = time.monotonic() + 10
        while layer.written < expected and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(settle_s)
    finally:
        await layer.shutdown()
    return layer.written


async def test_journals_no_process_holds_are_replayed(tmp_path: Path, prefix: str) -> None:
    # Two workers crashed while PostgreSQL was away, and one comes back: it replays its own
    # slot, and the other slot too, which no process holds (it waited for ever before).
    records = {}
    for number in (0, 1, 3):
        batch = sample(5)
        journal_records(tmp_path / f"slot-{number:03d}", batch)
        records.update({record.request_id: record for record in batch})
    held = Journal(tmp_path / "slot-003")  # a live process holds slot 3
    held.open()
    try:
        written_by_it = await started_process_writes(tmp_path, prefix, 10, settle_s=0.2)
    finally:
        held.close()
    written = {row[0] for row in rows(f"SELECT request_id FROM {prefix}_events")}
    in_slot_3 = {record.request_id for record in list(records.values())[10:]}
    assert written == set(records) - in_slot_3 and written_by_it == 10


async def test_a_journaled_nul_from_an_older_gateway_is_replayed_cleaned(
        tmp_path: Path, prefix: str) -> None:
    # Journals written before labels were cleaned may hold a NUL, which would fail every
    # replay batch: the replay cleans what it reads.
    dirty = sample(3)
    dirty[1] = dataclasses.replace(dirty[1], labels={"te\x00am": "a\x00b"})
    journal_records(tmp_path / "slot-000", dirty)
    await started_process_writes(tmp_path, prefix, 3)
    labels = dict(rows(f"SELECT request_id, labels FROM {prefix}_events"))
    assert labels[dirty[1].request_id] == {"te\ufffdam": "a\ufffdb"} and len(labels) == 3


async def test_a_journaled_nul_in_any_field_is_replayed_cleaned(
        tmp_path: Path, prefix: str) -> None:
    # Only labels were cleaned: a NUL in any other string (an upstream's error type, the
    # model it named) was journaled as it came, and failed every replay of its batch.
    dirty = sample(3)
    dirty[1] = dataclasses.replace(
        dirty[1], request_id="r\x00" + dirty[1].request_id, key_id="k\x00", project="p\x00",
        customer="c\x00", model="m\x00", served_model="s\x00", provider="v\x00",
        deployment="d\x00", status=400, error_type="invalid\x00request", cache_status="x\x00")
    journal_records(tmp_path / "slot-000", dirty)
    await started_process_writes(tmp_path, prefix, 3)
    found = {row[0]: row[1:] for row in rows(
        f"SELECT request_id, key_id, project, customer, model, served_model, provider, "
        f"deployment, error_type, cache_status FROM {prefix}_events")}
    assert len(found) == 3 and not (tmp_path / DEAD_LETTER).exists()
    assert found["r\ufffd" + dirty[1].request_id[2:]] == (
        "k\ufffd", "p\ufffd", "c\ufffd", "m\ufffd", "s\ufffd", "v\ufffd", "d\ufffd",
        "invalid\ufffdrequest", "x\ufffd")


def dead_letters(journal_dir: Path) -> list[dict[str, Any]]:
    path = journal_dir / DEAD_LETTER
    return [orjson.loads(line) for line in path.read_bytes().splitlines()] \
        if path.exists() else []


async def test_a_record_postgresql_refuses_is_set_aside_and_the_rest_written_once(
        tmp_path: Path, prefix: str) -> None:
    # A batch is one transaction: one record PostgreSQL cannot store (here a token count
    # past bigint, as a provider may report) failed the whole batch at every replay, and
    # every later record waited behind it. Two of the batch's records had been written
    # before (a crash before the journal's acknowledgement): they still count once.
    records = sample(6)
    poison = records[3] = dataclasses.replace(records[3], input_tokens=2**63)
    store = PostgresUsageStore(PG_DSN, prefix=prefix)
    await store.startup()
    try:
        assert await store.write(records[:2]) == 2
    finally:
        await store.shutdown()
    journal_records(tmp_path / "slot-000", records)
    assert await started_process_writes(tmp_path, prefix, 3, settle_s=0.2) == 3
    written = [row[0] for row in rows(f"SELECT request_id FROM {prefix}_events")]
    assert sorted(written) == sorted(r.request_id for r in records if r is not poison)
    assert_rollups_match_events(prefix)
    [letter] = dead_letters(tmp_path)
    assert UsageRecord.decode(letter["record"].encode()) == poison
    assert "NumericValueOutOfRange" in letter["error"]
    # The journal let go of the batch: a restart writes nothing again, sets nothing aside.
    assert await started_process_writes(tmp_path, prefix, 0, settle_s=0.3) == 0
    assert len(dead_letters(tmp_path)) == 1
    assert rows(f"SELECT count(*) FROM {prefix}_events")[0][0] == 5


async def test_a_refused_record_leaves_the_writer_writing_directly(
        tmp_path: Path, prefix: str) -> None:
    # Refused in a direct write, the batch sent the writer to the journal: every later
    # batch queued behind it there, and the replay retried it for ever.
    async def answer(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def send(message: Any) -> None:
        pass

    layer = MeteringMiddleware(answer, store=PostgresUsageStore(PG_DSN, prefix=prefix),
                               journal_dir=str(tmp_path), flush_interval_s=0.05)
    await layer.startup()

    async def request(input_tokens: int) -> str:
        ctx = context(status=200)
        ctx.usage = Usage(input_tokens=input_tokens, output_tokens=1)
        await layer({"type": "http", CONTEXT_KEY: ctx}, None, send)  # type: ignore[arg-type]
        _run_end_hooks(ctx)
        return ctx.request_id

    async def written(count: int) -> None:
        deadline = time.monotonic() + 10
        while layer.written < count and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
    try:
        poison = [await request(tokens) for tokens in (1, 2**63, 3)][1]
        await written(2)
        later = await request(4)
        await written(3)
        gauges = {name: value for name, _, _, value in layer.metric_samples()}
    finally:
        await layer.shutdown()
    assert layer.written == 3 and gauges["sluicegate_metering_replaying"] == 0.0
    assert gauges["sluicegate_metering_set_aside_records"] == 1.0
    assert later in {row[0] for row in rows(f"SELECT request_id FROM {prefix}_events")}
    assert [orjson.loads(letter["record"])[1] for letter in dead_letters(tmp_path)] == [poison]


async def test_events_are_partitioned_by_month_and_old_months_drop(prefix: str) -> None:
    store = PostgresUsageStore(PG_DSN, prefix=prefix)
    await store.startup()
    try:
        old = datetime(2025, 1, 15, tzinfo=UTC).timestamp()
        await store.write(sample(3, at=old) + sample(3))
        partitions = {name for (name,) in rows(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = %s", f"{prefix}_events")}
        assert f"{prefix}_events_202501" in partitions and len(partitions) == 2
        assert await store.drop_partitions_before(datetime(2025, 6, 1, tzinfo=UTC)) == \
            [f"{prefix}_events_202501"]
        assert rows(f"SELECT count(*) FROM {prefix}_events")[0][0] == 3
    finally:
        await store.shutdown()


async def test_postgres_takes_records_apart_as_python_would(prefix: str) -> None:
    """The records reach PostgreSQL as JSON and are taken apart in SQL: every column equals
    what Python makes of the field (Decimal money, labels with quotes, backslashes, newlines
    and non-ASCII), and timestamps round to the microsecond as datetime.fromtimestamp does
    (half-even), so a replay of a record finds the row a direct write made."""
    store = PostgresUsageStore(PG_DSN, prefix=prefix)
    await store.startup()
    base = float(int(time.time()))
    stamps = [base + f for f in (0.0, 0.5, 0.0000005, 0.0000015, 0.0000025, 0.9999995,
                                 0.9999996, 0.1234565, 0.7654325, 0.333333333)]
    stamps += [base - 86_400 * 40 + i * 0.0137 + i / 7_000_000 for i in range(40)]
    records = [UsageRecord(request_id=f"r{i}", started_at=at, ended_at=at + 0.25 + i / 3e6,
                           key_id="k", project="p", customer="c\\u00e9",
                           labels={"quote": 'a"b', "slash": "a\\b\\\\n", "line": "x\ny\tz",
                                   "ünï": "çødé ✓"},
                           api_format="anthropic", operation="anthropic.messages", model="m",
                           served_model="sm", provider="prov", deployment="prov/sm",
                           input_tokens=10**12 + i, output_tokens=i, cached_input_tokens=3,
                           reasoning_tokens=2, cost_micros=123_456_789_012 + i,
                           saved_micros=i, latency_ms=12.345 + i, ttft_ms=None if i % 2 else 1.5,
                           status=200 + i, error_type=None if i % 3 else "api_error",
                           cache_status="miss", attempts=2, fallbacks=1, stream=bool(i % 2),
                           client_disconnected=i == 3, cache_write_tokens=5 + i,
                           cache_write_1h_tokens=i)
               for i, at in enumerate(stamps)]
    try:
        assert await store.write(records) == len(records)
        found = {row[0]: row for row in rows(
            f"SELECT request_id, started_at, ended_at, key_id, project, customer, labels, "
            f"api_format, operation, model, served_model, provider, deployment, input_tokens, "
            f"output_tokens, cached_input_tokens, reasoning_tokens, cost, cost_saved, "
            f"latency_ms, ttft_ms, status, error_type, cache_status, attempts, fallbacks, "
            f"stream, client_disconnected, cache_write_tokens, cache_write_1h_tokens "
            f"FROM {prefix}_events")}
        for r in records:
            assert found[r.request_id] == (
                r.request_id, datetime.fromtimestamp(r.started_at, UTC),
                datetime.fromtimestamp(r.ended_at, UTC), r.key_id, r.project, r.customer,
                r.labels, r.api_format, r.operation, r.model, r.served_model, r.provider,
                r.deployment, r.input_tokens, r.output_tokens, r.cached_input_tokens,
                r.reasoning_tokens, r.cost, r.cost_saved, r.latency_ms, r.ttft_ms, r.status,
                r.error_type, r.cache_status, r.attempts, r.fallbacks, r.stream,
                r.client_disconnected, r.cache_write_tokens, r.cache_write_1h_tokens), r.request_id
        assert await store.write(records) == 0  # the same records again: all found
        assert_rollups_match_events(prefix)
    finally:
        await store.shutdown()


async def test_a_ledger_from_before_cache_writes_gains_their_columns(prefix: str) -> None:
    """Migration 2 on a ledger that has only migration 1's tables (a gateway from before it):
    its rows keep 0 writes, new rows carry theirs, in the events, rollups and usage API."""
    store = PostgresUsageStore(PG_DSN, prefix=prefix)
    await store.startup()
    try:
        await store.write(sample(2, project="old"))
    finally:
        await store.shutdown()
    with psycopg.connect(PG_DSN, autocommit=True) as conn:  # back to migration 1
        for table in ("events", "rollups"):
            conn.execute(f"ALTER TABLE {prefix}_{table} DROP COLUMN cache_write_tokens, "
                         f"DROP COLUMN cache_write_1h_tokens")
        conn.execute(f"DELETE FROM {prefix}_schema_version WHERE version = 2")
    store = PostgresUsageStore(PG_DSN, prefix=prefix)
    await store.startup()
    try:
        new = dataclasses.replace(sample(1, project="new")[0], input_tokens=900,
                                  cache_write_tokens=700, cache_write_1h_tokens=200)
        assert await store.write([new]) == 1
        found = rows(f"SELECT project, sum(cache_write_tokens), sum(cache_write_1h_tokens) "
                     f"FROM {prefix}_events GROUP BY 1 ORDER BY 1")
        assert found == [("new", 700, 200), ("old", 0, 0)]
        since = datetime.now(UTC) - timedelta(days=1)
        until = datetime.now(UTC) + timedelta(days=1)
        totals = {row["subject"]: (row["cache_write_tokens"], row["cache_write_1h_tokens"])
                  for row in await store.usage(group_by="project", since=since, until=until)}
        assert totals == {"new": (700, 200), "old": (0, 0)}
        assert [version for (version,) in rows(
            f"SELECT version FROM {prefix}_schema_version ORDER BY 1")] == [1, 2]
    finally:
        await store.shutdown()


async def test_an_unreachable_database_is_a_store_error(prefix: str) -> None:
    store = PostgresUsageStore(f"host=127.0.0.1 port={free_port()} user=root dbname=test",
                               prefix=prefix, timeout_s=2)
    await store.startup()  # does not raise: usage waits in the journal
    with pytest.raises(UsageStoreError):
        await store.write(sample(1))
    assert "error" in (await store.check_ready())["usage_postgres"]


# -- through a gateway ---------------------------------------------------------------------------

def metering_config(tmp_path: Path, mock_url: str, dsn: str, prefix: str, journal: Path,
                    *, cache: bool = False) -> Path:
    layers = ("[Middleware(AuthMiddleware, keys=[StaticKey('tests', key_env='SG_TEST_KEY')]), "
              f"Middleware(MeteringMiddleware, store=PostgresUsageStore({dsn!r}, "
              f"prefix={prefix!r}, timeout_s=2), journal_dir={str(journal)!r}, "
              "flush_interval_s=0.05, retry_interval_s=0.2, admin_token_env='SG_USAGE_ADMIN'), "
              + ("Middleware(CacheMiddleware, policy='always'), " if cache else "")
              + "Middleware(FailoverMiddleware)]")
    extra = "from middleware.metering import PostgresUsageStore"
    tmp_path.mkdir(parents=True, exist_ok=True)
    text = mock_config(mock_url, middleware=layers).replace(
        "from middleware.metering import MeteringMiddleware",
        "from middleware.metering import MeteringMiddleware\n" + extra)
    return write_config(tmp_path, text)


def events(prefix: str) -> dict[str, tuple[Any, ...]]:
    found = rows(f"SELECT request_id, status, input_tokens, output_tokens, cost, cost_saved, "
                 f"cache_status, stream, client_disconnected, error_type, labels "
                 f"FROM {prefix}_events")
    return {row[0]: row[1:] for row in found}


def wait_for_rows(prefix: str, count: int, timeout_s: float = 10) -> dict[str, tuple[Any, ...]]:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            found = events(prefix)
        except psycopg.errors.UndefinedTable:
            found = {}
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def events_with(prefix: str, request_id: str, timeout_s: float = 5) -> dict[str, tuple[Any, ...]]:
    """The events, once `request_id`'s row is among them (or the timeout passed)."""
    deadline = time.monotonic() + timeout_s
    while request_id not in (found := events(prefix)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return found


@pytest.fixture
def journal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SG_USAGE_ADMIN", "usage-admin-token")
    return tmp_path / "journal"


def client(server: ThreadedServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=TEST_KEY, max_retries=0)


def test_every_request_has_one_row_with_its_usage(
        tmp_path: Path, mock_url: str, mock: MockProviderServer, prefix: str,
        journal: Path) -> None:
    config = metering_config(tmp_path, mock_url, PG_DSN, prefix, journal)
    ids: dict[str, Any] = {}
    with ThreadedServer(create_app(config)) as server:
        sdk = client(server)
        for i in range(5):
            raw = sdk.chat.completions.with_raw_response.create(
                model="gpt-mock", messages=[{"role": "user", "content": f"meter {i}"}],
                extra_headers={"x-sluicegate-tag-team": "search"})
            ids[raw.headers["x-request-id"]] = raw.parse().usage
        with sdk.chat.completions.with_streaming_response.create(
                model="gpt-mock", stream=True, stream_options={"include_usage": True},
                messages=[{"role": "user", "content": "meter a stream"}]) as response:
            chunks = list(response.parse())
            stream_id = response.headers["x-request-id"]
        for _ in range(3):  # the failover layer's first call and its two retries
            mock.push_fault(Fault("status", provider="openai", status=500))
        with pytest.raises(openai.InternalServerError) as failed:
            sdk.chat.completions.create(model="gpt-mock",
                                        messages=[{"role": "user", "content": "fail"}])
        error_id = failed.value.response.headers["x-request-id"]
        found = wait_for_rows(prefix, 7)
        usage = httpx.get(server.url + "/admin/usage?group_by=key",
                          headers={"authorization": "Bearer usage-admin-token"}).json()
    assert len(found) == 7
    for request_id, sdk_usage in ids.items():
        status, prompt, completion, cost, *_, labels = found[request_id]
        assert (status, prompt, completion) == (200, sdk_usage.prompt_tokens,
                                                sdk_usage.completion_tokens)
        assert cost == Decimal(prompt) / 10**6 + Decimal(completion) * 2 / 10**6
        assert labels == {"team": "search"}
    streamed = found[stream_id]
    assert streamed[0] == 200 and streamed[6] is True
    assert streamed[2] == chunks[-1].usage.completion_tokens  # type: ignore[union-attr]
    assert found[error_id][0] == 500 and found[error_id][3] == 0
    assert usage["data"][0]["requests"] == 7
    assert_rollups_match_events(prefix)


def test_requests_sent_with_one_request_id_are_recorded_apart(
        tmp_path: Path, mock_url: str, prefix: str, journal: Path) -> None:
    # The caller chooses x-request-id and may send one with many requests. Records are kept
    # by request id (and start time): each of these gets one of its own, which begins with
    # the caller's id, while the response still carries the caller's id as sent.
    config = metering_config(tmp_path, mock_url, PG_DSN, prefix, journal)
    with ThreadedServer(create_app(config)) as server:
        sdk = client(server)
        for i in range(3):
            raw = sdk.chat.completions.with_raw_response.create(
                model="gpt-mock", messages=[{"role": "user", "content": f"same id {i}"}],
                extra_headers={"x-request-id": "caller-chosen-id"})
            assert raw.headers["x-request-id"] == "caller-chosen-id"
        found = wait_for_rows(prefix, 3)
    assert len(found) == 3
    for request_id in found:
        head, dot, digits = request_id.partition(".")
        assert (head, dot, len(digits)) == ("caller-chosen-id", ".", 16)


def test_a_nul_in_a_label_does_not_stop_the_ledger(
        tmp_path: Path, mock_url: str, prefix: str, journal: Path) -> None:
    # PostgreSQL's jsonb refuses \u0000: a label holding one failed its whole batch, and the
    # replay retried that batch for ever, so no later record reached PostgreSQL.
    config = metering_config(tmp_path, mock_url, PG_DSN, prefix, journal)
    with ThreadedServer(create_app(config)) as server:
        sdk = client(server)
        poisoned = sdk.chat.completions.with_raw_response.create(
            model="gpt-mock", messages=[{"role": "user", "content": "nul"}],
            metadata={"team": "a\u0000b", "o\u0000k": "v"})  # (a customer id is checked)
        for i in range(5):
            sdk.chat.completions.create(model="gpt-mock",
                                        messages=[{"role": "user", "content": f"after {i}"}])
        found = wait_for_rows(prefix, 6)
    assert len(found) == 6
    assert found[poisoned.headers["x-request-id"]][-1] == {"team": "a\ufffdb",
                                                           "o\ufffdk": "v"}


def test_a_nul_in_an_upstream_error_type_does_not_stop_the_ledger(
        tmp_path: Path, mock_url: str, mock: MockProviderServer, prefix: str,
        journal: Path) -> None:
    # A provider's error type is any JSON string, "\u0000" too, and went into the record as
    # it came (only labels were cleaned): PostgreSQL refused the batch holding it, and the
    # replay retried that batch for ever, so no later record reached PostgreSQL.
    mock.push_fault(Fault("status", provider="openai", status=400,
                          error_type="invalid\u0000request"))
    config = metering_config(tmp_path, mock_url, PG_DSN, prefix, journal)
    with ThreadedServer(create_app(config)) as server:
        sdk = client(server)
        with pytest.raises(openai.BadRequestError) as refused:
            sdk.chat.completions.create(model="gpt-mock",
                                        messages=[{"role": "user", "content": "nul type"}])
        for i in range(5):
            sdk.chat.completions.create(model="gpt-mock",
                                        messages=[{"role": "user", "content": f"after {i}"}])
        found = wait_for_rows(prefix, 6)
    assert len(found) == 6
    status, *_, error_type, _ = found[refused.value.response.headers["x-request-id"]]
    assert (status, error_type) == (400, "invalid\ufffdrequest")
    assert dead_letters(journal) == []  # (cleaned, not set aside)


def test_a_stream_recorded_before_its_end_is_sent_has_its_usage(
        tmp_path: Path, mock_url: str, prefix: str, journal: Path) -> None:
    # With durability="response" the record is made as the stream's last message passes the
    # layer; the passthrough set the usage only after sending it, so streams recorded 0.
    config = metering_config(tmp_path, mock_url, PG_DSN, prefix, journal)
    config.write_text(config.read_text().replace("journal_dir=",
                                                 "durability='response', journal_dir="))
    with ThreadedServer(create_app(config)) as server:
        with client(server).chat.completions.with_streaming_response.create(
                model="gpt-mock", stream=True, stream_options={"include_usage": True},
                messages=[{"role": "user", "content": "durable stream"}]) as response:
            usage = [chunk.usage for chunk in response.parse() if chunk.usage][-1]
            request_id = response.headers["x-request-id"]
        found = wait_for_rows(prefix, 1)
    status, prompt, completion, cost = found[request_id][:4]
    assert (status, prompt, completion) == (200, usage.prompt_tokens, usage.completion_tokens)
    assert cost == Decimal(prompt) / 10**6 + Decimal(completion) * 2 / 10**6 > 0


@pytest.mark.parametrize("model", ["gpt-mock", "claude-mock"])
def test_a_stream_the_client_leaves_is_billed_what_it_was_sent(
        tmp_path: Path, mock_url: str, mock: MockProviderServer, prefix: str, journal: Path,
        model: str) -> None:
    # OpenAI reports usage in a stream's last chunk, Anthropic its output in the last
    # events: a client that left before them was recorded at 0 tokens and $0 (Anthropic:
    # the input, and message_start's output_tokens=1), though the provider bills both.
    mock.config.update({"chunk_delay_s": 0.05, "chunk_chars": 4})
    prompt = "a long prompt " * 50
    try:
        config = metering_config(tmp_path, mock_url, PG_DSN, prefix, journal)
        with ThreadedServer(create_app(config)) as server, httpx.stream(
                "POST", server.url + "/v1/chat/completions",
                headers={"authorization": f"Bearer {TEST_KEY}"},
                json={"model": model, "stream": True, "stream_options": {"include_usage": True},
                      "messages": [{"role": "user", "content": prompt}]}) as response:
            read = 0
            for line in response.iter_lines():
                read += '"content":"' in line and '"content":""' not in line  # (not the role's)
                if read >= 5:
                    break
            request_id = response.headers["x-request-id"]
            response.close()
            found = events_with(prefix, request_id)
    finally:
        mock.config.update({"chunk_delay_s": 0.0, "chunk_chars": 8})
    _status, prompt_tokens, completion_tokens, cost, *_ = found[request_id]
    assert found[request_id][7] is True  # client_disconnected
    assert prompt_tokens >= 150  # ~ the gateway's estimate of the prompt (or the provider's)
    assert completion_tokens >= 5  # at least one a content event it was sent
    assert cost == Decimal(prompt_tokens) / 10**6 + Decimal(completion_tokens) * 2 / 10**6


def test_an_anthropic_stream_left_midway_keeps_the_input_its_provider_reported(
        tmp_path: Path, mock_url: str, mock: MockProviderServer, prefix: str,
        journal: Path) -> None:
    # message_start reports the exact input; the floor for a stream cut short is only for
    # what the provider did not say, and framing events (message_start, pings) are not
    # output tokens.
    mock.config.update({"chunk_delay_s": 0.05, "chunk_chars": 4})
    try:
        config = metering_config(tmp_path, mock_url, PG_DSN, prefix, journal)
        with ThreadedServer(create_app(config)) as server, httpx.stream(
                "POST", server.url + "/v1/messages",
                headers={"x-api-key": TEST_KEY, "anthropic-version": "2023-06-01"},
                json={"model": "claude-mock", "max_tokens": 100, "stream": True,
                      "messages": [{"role": "user", "content": "short words " * 40}]}
                ) as response:
            started, deltas = None, 0
            for line in response.iter_lines():
                if line.startswith("data: ") and '"message_start"' in line:
                    started = json.loads(line[6:])["message"]["usage"]["input_tokens"]
                deltas += '"content_block_delta"' in line
                if deltas >= 3:
                    break
            request_id = response.headers["x-request-id"]
            response.close()
            found = events_with(prefix, request_id)
    finally:
        mock.config.update({"chunk_delay_s": 0.0, "chunk_chars": 8})
    _status, prompt_tokens, completion_tokens, *_ = found[request_id]
    assert started is not None and prompt_tokens == started  # not the gateway's estimate
    assert 3 <= completion_tokens <= 8  # the deltas sent (a few more may have left)


# Claude Sonnet 4's prices: $3 input, $0.30 cache reads, $3.75 5-minute and $6 1-hour writes.
_PROMPT_CACHE_PRICE = ("Price(input_per_mtok='3', output_per_mtok='15', "
                       "cached_input_per_mtok='0.30', cache_write_per_mtok='3.75', "
                       "cache_write_1h_per_mtok='6')")


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_anthropic_prompt_cache_writes_and_reads_are_billed_at_their_own_rates(
        tmp_path: Path, mock_url: str, prefix: str, journal: Path, stream: bool) -> None:
    config = metering_config(tmp_path, mock_url, PG_DSN, prefix, journal)
    text = config.read_text()
    served = 'Deployment("anthropic", "claude-3-5-haiku-latest", price=MOCK_PRICE)'
    assert served in text
    config.write_text(text.replace(served, served.replace("MOCK_PRICE", _PROMPT_CACHE_PRICE)))
    # A new prompt for each run: the mock's prompt cache outlives a test.
    marker = uuid.uuid4().hex
    long_5m = [{"type": "text", "text": f"{marker} rules " + "stay calm " * 700,
                "cache_control": {"type": "ephemeral"}}]
    long_1h = [{"type": "text", "text": f"{marker} facts " + "be brief " * 900,
                "cache_control": {"type": "ephemeral", "ttl": "1h"}}]
    usages: dict[str, Any] = {}
    with ThreadedServer(create_app(config)) as server:
        sdk = anthropic.Anthropic(base_url=server.url, api_key=TEST_KEY, max_retries=0)
        for system in (long_5m, long_5m, long_1h):
            kwargs: dict[str, Any] = {"model": "claude-mock", "max_tokens": 50,
                                      "system": system,
                                      "messages": [{"role": "user", "content": "hello there"}]}
            if stream:
                with sdk.messages.stream(**kwargs) as events_stream:
                    message = events_stream.get_final_message()
                    request_id = events_stream.response.headers["x-request-id"]
            else:
                raw = sdk.messages.with_raw_response.create(**kwargs)
                message, request_id = raw.parse(), raw.headers["x-request-id"]
            usages[request_id] = message.usage
        wait_for_rows(prefix, 3)
    found = {row[0]: row[1:] for row in rows(
        f"SELECT request_id, input_tokens, cached_input_tokens, cache_write_tokens, "
        f"cache_write_1h_tokens, cost FROM {prefix}_events")}
    assert len(found) == 3
    written, read, written_1h = [], [], []
    for request_id, usage in usages.items():
        writes = usage.cache_creation_input_tokens or 0
        for_an_hour = usage.cache_creation.ephemeral_1h_input_tokens \
            if usage.cache_creation is not None else 0
        reads = usage.cache_read_input_tokens or 0
        fresh = usage.input_tokens
        exact = Decimal(fresh * 3) + Decimal(reads) * Decimal("0.30") \
            + Decimal(writes - for_an_hour) * Decimal("3.75") + Decimal(for_an_hour * 6) \
            + Decimal(usage.output_tokens * 15)
        cost_micros = exact.to_integral_value(rounding=ROUND_CEILING)
        assert found[request_id] == (fresh + reads + writes, reads, writes, for_an_hour,
                                     cost_micros / 1_000_000), request_id
        written.append(writes - for_an_hour)
        read.append(reads)
        written_1h.append(for_an_hour)
    # What the requests were: a 5-minute write, its read, a 1-hour write.
    assert written[0] > 1024 and read[1] == written[0] and written_1h[2] > 1024
    assert written[1:] == [0, 0] and read[0] == read[2] == 0 and written_1h[:2] == [0, 0]


def test_cache_hits_and_disconnects_are_recorded(
        tmp_path: Path, mock_url: str, mock: MockProviderServer, prefix: str,
        journal: Path) -> None:
    config = metering_config(tmp_path, mock_url, PG_DSN, prefix, journal, cache=True)
    with ThreadedServer(create_app(config)) as server:
        sdk = client(server)
        text = "hit me " + uuid.uuid4().hex
        first = sdk.chat.completions.with_raw_response.create(
            model="gpt-mock", messages=[{"role": "user", "content": text}])
        deadline = time.monotonic() + 5
        while True:
            again = sdk.chat.completions.with_raw_response.create(
                model="gpt-mock", messages=[{"role": "user", "content": text}])
            if again.headers["x-sluicegate-cache"] == "hit" or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        mock.push_fault(Fault("slow_first_byte", provider="openai", delay_s=1.0))
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/chat/completions", timeout=0.3,
                       headers={"authorization": f"Bearer {TEST_KEY}"},
                       json={"model": "gpt-mock", "stream": True,
                             "messages": [{"role": "user", "content": "bye " + text}]})
        found = wait_for_rows(prefix, 3)
        deadline = time.monotonic() + 5
        while not any(row[7] for row in found.values()) and time.monotonic() < deadline:
            time.sleep(0.1)
            found = events(prefix)
    hit = found[again.headers["x-request-id"]]
    miss = found[first.headers["x-request-id"]]
    assert hit[5] == "hit" and hit[3] == 0 and hit[4] == miss[3] > 0  # saved = what it cost
    assert any(row[7] for row in found.values()), "the disconnect was not recorded"


def test_a_postgres_outage_loses_nothing_and_counts_nothing_twice(
        tmp_path: Path, mock_url: str, prefix: str, journal: Path) -> None:
    proxy = TcpProxy(5432, port=free_port())  # runs on the gateway's own event loop
    dsn = f"host=127.0.0.1 port={proxy.port} user=root dbname=test"
    config = metering_config(tmp_path, mock_url, dsn, prefix, journal)
    sent: list[str] = []
    with ThreadedServer(create_app(config)) as server:
        sdk = client(server)

        def ask(n: int) -> None:
            for i in range(n):
                raw = sdk.chat.completions.with_raw_response.create(
                    model="gpt-mock", messages=[{"role": "user", "content": f"o{i}"}])
                sent.append(raw.headers["x-request-id"])
        server.run(proxy.start())
        ask(20)
        assert len(wait_for_rows(prefix, 20)) == 20
        server.run(proxy.stop())
        ask(30)  # every one succeeds while PostgreSQL is away
        time.sleep(0.5)
        server.run(proxy.start())
        ask(10)
        found = wait_for_rows(prefix, 60, timeout_s=15)
        server.run(proxy.stop())
    assert sorted(found) == sorted(sent) and len(sent) == 60
    assert_rollups_match_events(prefix)


def test_the_journal_reaches_postgresql_under_steady_traffic_after_an_outage(
        tmp_path: Path, mock_url: str, prefix: str, journal: Path) -> None:
    # The replay ran only when no record was queued; under traffic there always is one, and
    # what the journal kept during an outage reached PostgreSQL only at the next quiet moment.
    proxy = TcpProxy(5432, port=free_port())
    dsn = f"host=127.0.0.1 port={proxy.port} user=root dbname=test"
    config = metering_config(tmp_path, mock_url, dsn, prefix, journal)
    with ThreadedServer(create_app(config)) as server:
        sdk = client(server)
        server.run(proxy.start())
        sdk.chat.completions.create(model="gpt-mock", messages=[{"role": "user", "content": "up"}])
        assert len(wait_for_rows(prefix, 1)) == 1
        server.run(proxy.stop())
        during = [sdk.chat.completions.with_raw_response.create(
            model="gpt-mock", messages=[{"role": "user", "content": f"down {i}"}]
        ).headers["x-request-id"] for i in range(20)]
        server.run(proxy.start())
        stop = threading.Event()

        def traffic() -> None:  # a request every ~10 ms, without a pause
            own = client(server)
            while not stop.is_set():
                own.chat.completions.create(model="gpt-mock",
                                            messages=[{"role": "user", "content": "steady"}])
                time.sleep(0.01)
        sender = threading.Thread(target=traffic, daemon=True)
        sender.start()
        try:
            deadline = time.monotonic() + 10
            while not set(during) <= set(wait_for_rows(prefix, 1, timeout_s=0)) \
                    and time.monotonic() < deadline:
                time.sleep(0.1)
            arrived = set(during) & set(events(prefix))
            assert sender.is_alive()  # (the traffic never paused)
        finally:
            stop.set()
            sender.join(10)
        server.run(proxy.stop())
    assert len(arrived) == 20


def test_a_journal_that_cannot_be_acknowledged_does_not_stop_the_writer(
        tmp_path: Path, mock_url: str, prefix: str, journal: Path) -> None:
    # The replay's acknowledgement raised out of the writer task (its checkpoint could not be
    # written: here a directory stands where the checkpoint's temporary file goes), and no
    # record was written after it.
    proxy = TcpProxy(5432, port=free_port())
    dsn = f"host=127.0.0.1 port={proxy.port} user=root dbname=test"
    config = metering_config(tmp_path, mock_url, dsn, prefix, journal)
    with ThreadedServer(create_app(config)) as server:
        sdk = client(server)

        def ask(n: int) -> list[str]:
            return [sdk.chat.completions.with_raw_response.create(
                model="gpt-mock", messages=[{"role": "user", "content": f"ack {i}"}]
            ).headers["x-request-id"] for i in range(n)]
        before = ask(5)  # PostgreSQL is away: these go to the journal
        time.sleep(0.3)
        (journal / "slot-000" / "checkpoint.tmp").mkdir()
        server.run(proxy.start())
        time.sleep(1.0)  # the replay writes them, and cannot acknowledge them
        after = ask(5)
        found = wait_for_rows(prefix, 10)
        server.run(proxy.stop())
    assert set(found) == set(before) | set(after)  # each once (a replay counts once)


def test_a_restart_replays_the_journal_exactly_once(
        tmp_path: Path, mock_url: str, prefix: str, journal: Path) -> None:
    dead = f"host=127.0.0.1 port={free_port()} user=root dbname=test"
    sent = []
    with ThreadedServer(create_app(metering_config(tmp_path / "a", mock_url, dead, prefix,
                                                   journal))) as server:
        for i in range(12):
            raw = client(server).chat.completions.with_raw_response.create(
                model="gpt-mock", messages=[{"role": "user", "content": f"j{i}"}])
            sent.append(raw.headers["x-request-id"])
    assert any(journal.rglob("*.sgj")), "nothing reached the journal"
    for attempt in ("b", "c"):  # the second restart finds nothing left to replay
        with ThreadedServer(create_app(metering_config(tmp_path / attempt, mock_url, PG_DSN,
                                                       prefix, journal))):
            found = wait_for_rows(prefix, 12)
    assert sorted(found) == sorted(sent)
    assert rows(f"SELECT count(*) FROM {prefix}_events")[0][0] == 12
    assert_rollups_match_events(prefix)


def _crash_config(tmp_path: Path, mock_url: str, prefix: str, journal: Path,
                  durability: str) -> Path:
    path = metering_config(tmp_path, mock_url, PG_DSN, prefix, journal)
    path.write_text(path.read_text().replace(
        "journal_dir=", f"durability={durability!r}, journal_dir="))
    return path


def test_kill_9_under_load_loses_no_answered_request(
        tmp_path: Path, mock_url: str, prefix: str, journal: Path) -> None:
    """durability="response": a response's last byte waits for its record to be fsynced, so
    every answer a client got survives a kill -9 of the gateway, exactly once."""
    import os
    import signal
    import threading

    from tests.harness import start_cli_gateway
    config = _crash_config(tmp_path, mock_url, prefix, journal, "response")
    process, url = start_cli_gateway(config, env={"SG_USAGE_ADMIN": "usage-admin-token"})
    answered: list[str] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(base_url=url, timeout=5) as http:
            while not stop.is_set():
                try:
                    response = http.post("/v1/chat/completions",
                                         headers={"authorization": f"Bearer {TEST_KEY}"},
                                         json={"model": "gpt-mock", "messages": [
                                             {"role": "user", "content": "crash me"}]})
                except httpx.HTTPError:
                    return  # the gateway is gone
                if response.status_code == 200:
                    answered.append(response.headers["x-request-id"])
    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 10
    while len(answered) < 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    stop.set()
    for thread in threads:
        thread.join()
    assert len(answered) >= 200
    restarted, _ = start_cli_gateway(_crash_config(tmp_path / "again", mock_url, prefix,
                                                   journal, "response"),
                                     env={"SG_USAGE_ADMIN": "usage-admin-token"})
    try:
        found = wait_for_rows(prefix, len(answered), timeout_s=15)
    finally:
        restarted.terminate()
        restarted.wait(10)
    missing = set(answered) - set(found)
    assert not missing, f"{len(missing)} answered request(s) have no row"
    counts = rows(f"SELECT count(*), count(DISTINCT request_id) FROM {prefix}_events")[0]
    assert counts[0] == counts[1]  # exactly once
    assert_rollups_match_events(prefix)


def test_sigterm_finishes_streams_in_flight_and_flushes_their_records(
        tmp_path: Path, mock_url: str, mock: MockProviderServer, prefix: str,
        journal: Path) -> None:
    """SIGTERM: no new connections, the stream in flight completes, then every record
    queued (a long flush interval keeps them queued) reaches PostgreSQL before the exit."""
    import signal
    import threading

    from tests.harness import start_cli_gateway
    config = metering_config(tmp_path, mock_url, PG_DSN, prefix, journal)
    config.write_text(config.read_text().replace("flush_interval_s=0.05",
                                                 "flush_interval_s=60"))
    process, url = start_cli_gateway(config, env={"SG_USAGE_ADMIN": "usage-admin-token"})
    headers = {"authorization": f"Bearer {TEST_KEY}"}
    answered = [httpx.post(url + "/v1/chat/completions", headers=headers, timeout=10, json={
        "model": "gpt-mock", "messages": [{"role": "user", "content": f"t{i}"}]}
    ).headers["x-request-id"] for i in range(5)]
    mock.push_fault(Fault("slow_first_byte", provider="openai", delay_s=1.5))
    streamed: dict[str, Any] = {}

    def stream() -> None:
        with httpx.stream("POST", url + "/v1/chat/completions", headers=headers, timeout=10,
                          json={"model": "gpt-mock", "stream": True, "messages": [
                              {"role": "user", "content": "finish me"}]}) as response:
            streamed["id"] = response.headers["x-request-id"]
            streamed["body"] = b"".join(response.iter_bytes())
    calls = len(mock.requests)
    thread = threading.Thread(target=stream)
    thread.start()
    deadline = time.monotonic() + 10
    while len(mock.requests) == calls:  # until the stream waits for its first byte
        assert time.monotonic() < deadline, "the stream never reached the upstream"
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    thread.join(15)
    assert process.wait(30) == 0
    assert b"data: [DONE]" in streamed["body"]
    found = events(prefix)  # no waiting: the process is gone, its records must be there
    assert set(found) == {*answered, streamed["id"]}
