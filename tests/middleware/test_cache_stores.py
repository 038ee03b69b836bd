"""The exact-cache stores: memory, Redis, PostgreSQL and Redis+PostgreSQL behave alike.

Real servers: Redis on 127.0.0.1:6379 (each test under its own key prefix, deleted after) and
PostgreSQL on 127.0.0.1:5432 (each test with its own table, dropped after). Outages are real
too: a port nobody listens on, a server that never answers, a TCP relay switched off.
"""
from __future__ import annotations

import asyncio
import dataclasses
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
import redis.asyncio as aioredis
from psycopg import sql

from middleware.cache.keys import model_tag, namespace_tag, project_tag
from middleware.cache.stores import (
    INVALIDATE_SLICE,
    CachedResponse,
    CacheStore,
    CacheStoreError,
    MemoryCacheStore,
    PostgresCacheStore,
    RedisCacheStore,
    TieredCacheStore,
    memory_size,
)
from tests.harness import free_port
from tests.tcp_proxy import TcpProxy

REDIS_URL = "redis://127.0.0.1:6379/0"
PG_DSN = "host=127.0.0.1 port=5432 user=root dbname=test"
# The Redis store also runs the suite on a Redis Cluster and a Sentinel-managed primary
# (tests/redis_topologies.py), through the same client.
_TOPOLOGIES = {"redis-cluster": "cluster_redis", "redis-sentinel": "sentinel_redis"}
BACKENDS = ["memory", "redis", "postgres", "tiered", *_TOPOLOGIES]


def entry(*tags: str, body: bytes = b'{"id":"chatcmpl-1","choices":[]}',
          **fields: Any) -> CachedResponse:
    values: dict[str, Any] = {
        "body": body, "api_format": "openai", "status": 200, "created_at": time.time(),
        "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15},
        "model": "gpt-4o", "cost_micros": 1234, "tags": tags}
    return CachedResponse(**(values | fields))


async def eventually(check: Callable[[], Awaitable[bool]], *, timeout_s: float = 15.0) -> None:
    """Polls `check` (a CacheStoreError counts as "not yet") until it holds."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if await check():
                return
        except CacheStoreError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"still not true after {timeout_s}s")
        await asyncio.sleep(0.05)


# -- fixtures ------------------------------------------------------------------------------------

@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    """A key prefix (a Cluster hash tag) of this test's own; its keys are deleted after."""
    prefix = f"{{sgtest-cache-{uuid.uuid4().hex}}}"
    yield prefix
    client = aioredis.Redis.from_url(REDIS_URL)
    keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


@pytest.fixture
async def redis_client() -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(REDIS_URL)
    yield client
    await client.aclose()


@pytest.fixture
async def table() -> AsyncIterator[str]:
    """A table name of this test's own; the table and its version table are dropped after."""
    name = f"sgtest_cache_{uuid.uuid4().hex[:16]}"
    yield name
    async with await psycopg.AsyncConnection.connect(PG_DSN, autocommit=True) as conn:
        for dropped in (name, name + "_schema_version", name + "_invalidations"):
            await conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(
                sql.Identifier(dropped)))


async def pg_rows(table: str) -> int:
    async with await psycopg.AsyncConnection.connect(PG_DSN, autocommit=True) as conn:
        cur = await conn.execute(sql.SQL("SELECT count(*) FROM {}").format(
            sql.Identifier(table)))
        row = await cur.fetchone()
    assert row is not None
    return int(row[0])


def make_store(kind: str, prefix: str, table: str, url: str = REDIS_URL,
               **options: Any) -> CacheStore:
    if kind == "memory":
        return MemoryCacheStore(**options)
    # Patient timeouts: a test that writes 1,200 entries through a pool of four, or a Redis
    # node stalled a moment on a loaded CI host, must not trip the outage gate (timeouts have
    # tests of their own).
    if kind.startswith("redis"):
        return RedisCacheStore(url, prefix=prefix, **{"timeout_s": 5.0, **options})
    if kind == "postgres":
        return PostgresCacheStore(PG_DSN, table=table, **{"timeout_s": 10.0, **options})
    return TieredCacheStore(RedisCacheStore(REDIS_URL, prefix=prefix, timeout_s=5.0),
                            PostgresCacheStore(PG_DSN, table=table, timeout_s=10.0))


@pytest.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest, prefix: str,
                table: str) -> AsyncIterator[CacheStore]:
    url = REDIS_URL
    if request.param in _TOPOLOGIES:
        url = request.getfixturevalue(_TOPOLOGIES[request.param]).url
    store = make_store(request.param, prefix, table, url)
    await store.startup()
    assert all(state == "ok" for state in (await store.check_ready()).values())
    yield store
    await store.shutdown()


@pytest.fixture
async def tiered(prefix: str, table: str) -> AsyncIterator[TieredCacheStore]:
    store = TieredCacheStore(RedisCacheStore(REDIS_URL, prefix=prefix),
                             PostgresCacheStore(PG_DSN, table=table))
    await store.startup()
    yield store
    await store.shutdown()


# -- the entry format ----------------------------------------------------------------------------

@pytest.mark.parametrize("original", [
    entry(),
    entry("model:gpt-4o", "project:acme", "namespace:faq", expires_at=1764000000.25),
    entry(body=b"", usage=None, api_format="anthropic", status=529, model="claude-\u00e9",
          cost_micros=0, created_at=0.0),
    entry(body=bytes(range(256)) * 10),  # the body is carried as bytes, never parsed
])
def test_an_entry_survives_encoding(original: CachedResponse) -> None:
    assert CachedResponse.decode(original.encode()) == original


def test_the_encoding_is_compact() -> None:
    encoded = entry(body=b"x" * 1000).encode()
    assert encoded.startswith(b"SGC1") and len(encoded) < 1000 + 200


def _with_header(header: bytes, body: bytes = b"{}") -> bytes:
    return b"SGC1" + len(header).to_bytes(4, "big") + header + body


GOOD_HEADER = (b'{"f":"openai","s":200,"c":1.5,"u":null,"m":"m","$":1,"t":[],"e":null}')


@pytest.mark.parametrize("garbage", [
    b"",
    b"SGC1",
    b'{"choices": []}',
    b"SGC2" + GOOD_HEADER[8:],
    b"SGC1\x00\x00\x10\x00{}",  # a header longer than the data
    _with_header(b"{not json"),
    _with_header(b"[1, 2]"),
    _with_header(b'{"f":"openai"}'),
    _with_header(GOOD_HEADER.replace(b'"openai"', b'"gemini"')),
    _with_header(GOOD_HEADER.replace(b'"s":200', b'"s":"200"')),
    _with_header(GOOD_HEADER.replace(b'"s":200', b'"s":true')),
    _with_header(GOOD_HEADER.replace(b'"s":200', b'"s":99')),
    _with_header(GOOD_HEADER.replace(b'"c":1.5', b'"c":"now"')),
    _with_header(GOOD_HEADER.replace(b'"u":null', b'"u":[1]')),
    _with_header(GOOD_HEADER.replace(b'"m":"m"', b'"m":5')),
    _with_header(GOOD_HEADER.replace(b'"$":1', b'"$":1.5')),
    _with_header(GOOD_HEADER.replace(b'"t":[]', b'"t":"tag"')),
    _with_header(GOOD_HEADER.replace(b'"t":[]', b'"t":[1]')),
    _with_header(GOOD_HEADER.replace(b'"e":null', b'"e":"later"')),
    _with_header(GOOD_HEADER.replace(b'"openai"', b'["openai"]')),
    _with_header(GOOD_HEADER.replace(b'"openai"', b'["gemini","openai.chat"]')),
    _with_header(GOOD_HEADER.replace(b'"openai"', b'["openai",5]')),
    _with_header(GOOD_HEADER.replace(b'"openai"', b'["openai","openai.chat","x"]')),
])
def test_garbage_is_not_an_entry(garbage: bytes) -> None:
    with pytest.raises(ValueError):
        CachedResponse.decode(garbage)


def test_the_good_header_of_the_garbage_cases_decodes() -> None:
    assert CachedResponse.decode(_with_header(GOOD_HEADER)).status == 200


def test_a_kept_stream_round_trips_and_a_reader_of_answers_only_refuses_it() -> None:
    """A stream kept as it went out (`stream_operation`) keeps its operation through the
    stores' encoding; its format is written as `[format, operation]`, which a reader from
    before (one format string) refuses: a miss, not the stream taken for a JSON answer."""
    stream = entry("a", body=b"data: {}\n\ndata: [DONE]\n\n", usage=None,
                   stream_operation="anthropic.messages", api_format="anthropic")
    assert CachedResponse.decode(stream.encode()) == stream
    assert header_of(stream.encode())["f"] == ["anthropic", "anthropic.messages"]
    answer = entry("a")
    assert CachedResponse.decode(answer.encode()) == answer
    assert header_of(answer.encode())["f"] == "openai"  # (all an earlier reader takes)


def header_of(encoded: bytes) -> Any:
    return orjson.loads(encoded[8:8 + int.from_bytes(encoded[4:8], "big")])


# -- every store ---------------------------------------------------------------------------------

async def test_set_then_get(store: CacheStore) -> None:
    original = entry("model:gpt-4o", "project:acme")
    assert await store.get("k1") is None

    before = time.time()
    await store.set("k1", original, 60)
    found = await store.get("k1")

    assert found is not None
    assert dataclasses.replace(found, expires_at=None) == original
    assert found.expires_at is not None and before + 60 <= found.expires_at <= time.time() + 60
    assert await store.get("k2") is None


async def test_a_set_replaces_the_entry_and_its_tags(store: CacheStore) -> None:
    await store.set("k", entry("project:old", body=b"1"), 60)
    await store.set("k", entry("project:new", body=b"2"), 60)

    assert await store.invalidate("project:old") == 0
    found = await store.get("k")
    assert found is not None and found.body == b"2"
    assert await store.invalidate("project:new") == 1
    assert await store.get("k") is None


async def test_entries_expire(store: CacheStore) -> None:
    await store.set("short", entry(), 1.0)  # (two writes and a read fit in it, loaded host)
    await store.set("long", entry(), 60)
    assert await store.get("short") is not None

    async def short_expired() -> bool:
        return await store.get("short") is None

    await eventually(short_expired)
    assert await store.get("long") is not None


@pytest.mark.parametrize("ttl_s", [0, -1])
async def test_a_ttl_of_zero_or_less_stores_nothing(store: CacheStore, ttl_s: float) -> None:
    await store.set("k", entry(), ttl_s)
    assert await store.get("k") is None


@pytest.mark.parametrize("ttl_s", [math.inf, math.nan])
async def test_a_ttl_that_is_not_a_finite_number_is_refused(store: CacheStore,
                                                            ttl_s: float) -> None:
    with pytest.raises(ValueError, match="finite"):
        await store.set("k", entry(), ttl_s)
    set_soon = getattr(store, "set_soon", None)
    if set_soon is not None:
        with pytest.raises(ValueError, match="finite"):
            set_soon("k", entry(), ttl_s)
    assert await store.get("k") is None


POPULATION = {  # key: (project, model, namespace)
    "a-m1-faq": ("a", "m1", "faq"),
    "a-m2": ("a", "m2", None),
    "b-m1-faq": ("b", "m1", "faq"),
    "b-m2": ("b", "m2", None),
}


async def populate(store: CacheStore) -> None:
    for key, (project, model, namespace) in POPULATION.items():
        tags = [project_tag(project), model_tag(model)]
        if namespace:
            tags.append(namespace_tag(namespace))
        await store.set(key, entry(*tags), 60)


@pytest.mark.parametrize(("tags", "dropped"), [
    ([project_tag("a")], {"a-m1-faq", "a-m2"}),
    ([model_tag("m1")], {"a-m1-faq", "b-m1-faq"}),
    ([namespace_tag("faq")], {"a-m1-faq", "b-m1-faq"}),
    ([project_tag("b"), namespace_tag("faq")], {"b-m1-faq"}),  # one project's namespace
    ([project_tag("b"), model_tag("m2"), project_tag("b")], {"b-m2"}),
    ([project_tag("c")], set()),
    ([project_tag("a"), project_tag("b")], set()),  # no entry is in both
], ids=["project", "model", "namespace", "namespace-of-project", "three-tags", "unknown",
        "disjoint"])
async def test_invalidation_drops_the_entries_with_all_the_tags(
        store: CacheStore, tags: list[str], dropped: set[str]) -> None:
    await populate(store)

    assert await store.invalidate(*tags) == len(dropped)

    for key in POPULATION:
        assert (await store.get(key) is None) == (key in dropped), key
    assert await store.invalidate(*tags) == 0


async def test_invalidated_entries_can_be_stored_again(store: CacheStore) -> None:
    await populate(store)
    assert await store.invalidate(project_tag("a")) == 2

    await store.set("a-m2", entry(project_tag("a"), model_tag("m2")), 60)
    assert await store.get("a-m2") is not None
    assert await store.invalidate(model_tag("m2")) == 2  # the new one and b-m2


async def test_an_answer_from_before_an_invalidation_is_not_stored_after_it(
        store: CacheStore) -> None:
    """A request in flight when its tags are invalidated (its entry created when it began)
    must not store its answer after the invalidation answered; entries with other tags, or
    from requests that began after it, are stored."""
    began = time.time()
    await asyncio.sleep(0.01)
    assert await store.invalidate(project_tag("a"), model_tag("m")) == 0
    await store.set("in flight", entry(project_tag("a"), model_tag("m"), created_at=began), 60)
    await store.set("other model", entry(project_tag("a"), model_tag("n"), created_at=began),
                    60)
    await store.set("after", entry(project_tag("a"), model_tag("m")), 60)
    assert await store.get("in flight") is None
    assert await store.get("other model") is not None
    assert await store.get("after") is not None


async def test_memory_stores_sharing_a_file_apply_each_others_invalidations(
        tmp_path: Path) -> None:
    """The workers of one gateway (`serve --workers N`): an invalidation made in one holds
    in the others from their next lookup, and keeps their answers in flight out too."""
    path = str(tmp_path / "invalidations")
    one, other = MemoryCacheStore(shared_path=path), MemoryCacheStore(shared_path=path)
    await one.startup()
    await other.startup()
    try:
        began = time.time()
        for store in (one, other):
            await store.set("k", entry(project_tag("a")), 60)
            await store.set("kept", entry(project_tag("b")), 60)
        assert await one.invalidate(project_tag("a")) == 1
        assert other.get_now("k") is None  # at once: before its scan of the rest has run
        assert other.get_now("kept") is not None
        other.set_soon("in flight", entry(project_tag("a"), created_at=began), 60)
        assert other.get_now("in flight") is None
        await other.set("after", entry(project_tag("a")), 60)
        assert other.get_now("after") is not None
        await asyncio.sleep(0.05)  # (the scan ran: the entry is gone, not only hidden)
        assert "k" not in other._entries and len(other) == 2
        assert await other.invalidate(project_tag("b")) == 1  # and the other way round
        assert one.get_now("kept") is None and one.get_now("k") is None
    finally:
        await one.shutdown()
        await other.shutdown()


async def test_a_damaged_record_in_the_shared_file_drops_more_and_breaks_nothing(
        tmp_path: Path) -> None:
    """A record the worker cannot read (the file damaged, or shared with a gateway of
    another layout) invalidates everything made before it, as a record too old to read
    does; lookups go on."""
    from middleware.cache import shared

    path = str(tmp_path / shared.FILE_NAME)
    store = MemoryCacheStore(shared_path=path)
    await store.startup()
    writer = shared.InvalidationLog(path)
    try:
        await store.set("k", entry(project_tag("a")), 60)
        await store.set("other", entry(project_tag("b")), 60)
        writer.append([project_tag("a")], time.time())
        offset = shared._HEADER_BYTES + (writer.generation[0] - 1) % shared.RING_SLOTS \
            * shared.SLOT_BYTES
        writer._map[offset + shared._RECORD.size] = 0xFF  # its tags no longer UTF-8
        for _ in range(3):
            assert store.get_now("k") is None and store.get_now("other") is None
        await store.set("later", entry(project_tag("b")), 60)
        assert store.get_now("later") is not None
    finally:
        writer.close()
        await store.shutdown()


async def test_a_memory_store_far_behind_the_shared_file_drops_everything_older(
        tmp_path: Path) -> None:
    """A worker that missed more invalidations than the file's ring holds cannot know what
    they named: everything older than the newest counts as invalidated (more, never less)."""
    from middleware.cache.shared import RING_SLOTS
    path = str(tmp_path / "invalidations")
    one, other = MemoryCacheStore(shared_path=path), MemoryCacheStore(shared_path=path)
    await one.startup()
    await other.startup()
    try:
        await other.set("k", entry(project_tag("a")), 60)
        for i in range(RING_SLOTS):
            await one.invalidate(project_tag(f"elsewhere{i}"))
        assert other.get_now("k") is None
        await other.set("new", entry(project_tag("a")), 60)
        assert other.get_now("new") is not None
    finally:
        await one.shutdown()
        await other.shutdown()


async def test_a_large_invalidation(store: CacheStore) -> None:
    await asyncio.gather(*(store.set(f"k{i}", entry(project_tag("big"), model_tag("m")), 60)
                           for i in range(1200)))
    await store.set("other", entry(project_tag("small"), model_tag("m")), 60)

    assert await store.invalidate(project_tag("big")) == 1200
    assert await store.get("k0") is None and await store.get("k1199") is None
    assert await store.get("other") is not None


async def test_invalidation_counts_live_entries_only(store: CacheStore) -> None:
    await store.set("gone", entry(project_tag("a")), 0.05)
    await store.set("live", entry(project_tag("a"), project_tag("a")), 60)  # a repeated tag
    await asyncio.sleep(0.1)

    assert await store.invalidate(project_tag("a")) == 1
    assert await store.get("live") is None and await store.get("gone") is None
    await store.set("alone", entry(model_tag("m"), model_tag("m")), 60)
    assert await store.invalidate(model_tag("m")) == 1


async def test_invalidate_needs_a_tag(store: CacheStore) -> None:
    with pytest.raises(ValueError, match="at least one tag"):
        await store.invalidate()


# -- memory --------------------------------------------------------------------------------------

async def test_memory_evicts_the_least_recently_used_by_bytes() -> None:
    probe = MemoryCacheStore()
    await probe.set("probe", entry(body=b"x" * 1000), 60)
    size = probe.bytes_used
    store = MemoryCacheStore(max_bytes=3 * size + size // 2)  # room for three

    for key in "abc":
        await store.set(key, entry(body=b"x" * 1000), 60)
    assert await store.get("a") is not None  # "a" is now the most recent; "b" the oldest
    await store.set("d", entry(body=b"x" * 1000), 60)
    assert [key for key in "abcd" if await store.get(key) is not None] == ["a", "c", "d"]

    await store.set("e", entry(body=b"x" * 1000), 60)  # those reads left the order a, c, d
    assert [key for key in "acde" if await store.get(key) is not None] == ["c", "d", "e"]
    assert store.bytes_used <= store.max_bytes and len(store) == 3


async def test_memory_evicts_several_for_one_large_entry() -> None:
    one = memory_size("a", entry(body=b"x" * 1500))
    big = memory_size("big", entry(body=b"x" * 5000))
    assert 2 * one < big <= 3 * one  # room for it takes three of the small ones
    store = MemoryCacheStore(max_bytes=5 * one + 10)
    for key in "abcde":
        await store.set(key, entry(body=b"x" * 1500), 60)
    await store.set("big", entry(body=b"x" * 5000), 60)

    kept = [key for key in ["a", "b", "c", "d", "e", "big"] if await store.get(key) is not None]
    assert kept == ["d", "e", "big"]
    assert store.bytes_used <= store.max_bytes


async def test_memory_set_soon_keeps_the_entry_it_is_given_and_set_a_copy() -> None:
    store = MemoryCacheStore()
    given = entry(model_tag("m"), body=b'{"id":"x"}')
    before = time.time()
    assert store.set_soon("soon", given, 60) is True
    kept = store.get_now("soon")
    assert kept is given  # taken over: its body copied and its expiry set, in place
    assert given.body == b'{"id":"x"}' and given.expires_at is not None
    assert before + 60 <= given.expires_at <= time.time() + 60

    original = entry(model_tag("m"))
    await store.set("later", original, 60)
    assert store.get_now("later") is not original and original.expires_at is None
    with pytest.raises(ValueError, match="finite"):
        store.set_soon("never", entry(), math.inf)
    assert store.get_now("never") is None


async def test_memory_evicted_entries_leave_no_tags_behind() -> None:
    one = memory_size("a", entry(body=b"x" * 1000))
    store = MemoryCacheStore(max_bytes=2 * one + 10)  # room for two
    for key, tag in [("a", "model:a"), ("b", "model:b"), ("c", "model:c"), ("d", "model:b")]:
        assert store.set_soon(key, entry(tag, body=b"x" * 1000), 60)
    assert [key for key in "abcd" if store.get_now(key) is not None] == ["c", "d"]
    assert await store.invalidate("model:a") == 0  # evicted, and its tag with it
    assert await store.invalidate("model:b") == 1  # "d" only: "b" was evicted
    assert [key for key in "abcd" if store.get_now(key) is not None] == ["c"]
    assert store.bytes_used == memory_size("c", store.get_now("c"))  # type: ignore[arg-type]


async def test_memory_invalidation_lets_the_loop_run_and_misses_nothing() -> None:
    # The memory store keeps no index by tag: an invalidation reads every entry, a slice at a
    # time, and requests go on between slices (storing, evicting, reading).
    store = MemoryCacheStore(max_bytes=1 << 40)
    count = 2 * INVALIDATE_SLICE + 500
    for i in range(count):
        store.set_soon(f"k{i}", entry(model_tag("a" if i % 2 else "b"), project_tag("p")), 60)
    store.set_soon("old", entry(model_tag("a"), project_tag("p")), 0.05)
    await asyncio.sleep(0.1)  # "old" is expired: dropped, but not counted as live
    turns: list[int] = []

    async def meanwhile() -> None:
        for turn in range(3):
            turns.append(turn)
            store.set_soon(f"new{turn}", entry(model_tag("a"), project_tag("p")), 60)
            await store.invalidate(project_tag("elsewhere"))  # (matches nothing)
            await asyncio.sleep(0)

    side = asyncio.ensure_future(meanwhile())
    dropped = await store.invalidate(model_tag("a"), project_tag("p"))
    assert turns  # the loop ran during the scan (three slices: two turns)
    await side
    assert dropped == count // 2  # the live ones it found ("old" had expired)
    assert store.get_now("old") is None
    assert all(store.get_now(f"k{i}") is None for i in range(1, count, 2))
    kept = [f"k{i}" for i in range(0, count, 2)] + ["new0", "new1", "new2"]  # (stored after
    found = [store.get_now(key) for key in kept]  # the invalidation began: not its to drop)
    assert all(item is not None for item in found) and len(store) == len(kept)
    assert store.bytes_used == sum(memory_size(key, item)  # type: ignore[arg-type]
                                   for key, item in zip(kept, found, strict=True))


async def test_memory_refuses_an_entry_larger_than_the_bound_without_evicting() -> None:
    store = MemoryCacheStore(max_bytes=2000)
    await store.set("small", entry(body=b"x" * 100), 60)
    await store.set("huge", entry(body=b"x" * 5000), 60)
    assert await store.get("huge") is None
    assert await store.get("small") is not None


async def test_memory_counts_what_entries_take_in_memory() -> None:
    """The bound counts at least what the entries really take (tracemalloc), not just their
    encoded bytes: a bound of 64 MiB must not mean 130 MiB of memory."""
    import tracemalloc
    store = MemoryCacheStore(max_bytes=1 << 40)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(2000):
            await store.set(f"{i:064x}", entry(body=b"x" * 700 + str(i).encode()), 60)
        taken = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert store.bytes_used >= 0.9 * taken


@pytest.mark.parametrize("how", ["set", "set_soon"])
async def test_memory_counts_a_real_answer_and_not_orjsons_buffer(how: str) -> None:
    """A chat answer as the layer stores it (body written by orjson, usage with nested
    details): the bound counts at least what the entry takes, and the entry does not keep
    the 4 KiB buffer orjson returns its output in, whether `set` keeps a copy of it or
    `set_soon` (the layer's way) keeps the entry itself."""
    import tracemalloc
    answer = orjson.loads((Path(__file__).parents[1] / "bench" / "chat.json").read_bytes())
    store = MemoryCacheStore(max_bytes=1 << 40)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(2000):
            parsed = orjson.loads(orjson.dumps(answer))
            made = entry(body=orjson.dumps(parsed), usage=parsed["usage"])
            if how == "set":
                await store.set(f"{i:064x}", made, 60)
            else:
                assert store.set_soon(f"{i:064x}", made, 60) is True
            del parsed, made
        taken = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert store.bytes_used >= 0.9 * taken
    assert taken / 2000 < 3000  # about 1.8 KB; 5.2 KB with orjson's buffers


async def test_memory_counts_bytes_exactly() -> None:
    store = MemoryCacheStore()

    async def stored_bytes(*keys: str) -> int:
        entries = [(key, await store.get(key)) for key in keys]
        return sum(memory_size(key, found) for key, found in entries if found is not None)

    await store.set("k", entry(body=b"x" * 100), 60)
    assert store.bytes_used == await stored_bytes("k") > 100

    await store.set("k", entry(body=b"x" * 300), 60)  # a replacement is not counted twice
    assert store.bytes_used == await stored_bytes("k") > 300
    await store.set("short", entry(), 0.05)
    await store.set("tagged", entry(model_tag("m")), 60)
    assert store.bytes_used == await stored_bytes("k", "short", "tagged")

    await asyncio.sleep(0.1)
    assert await store.get("short") is None  # an expired entry gives its bytes back
    assert await store.invalidate(model_tag("m")) == 1
    assert store.bytes_used == await stored_bytes("k") and len(store) == 1


def test_memory_needs_a_positive_bound() -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        MemoryCacheStore(max_bytes=0)


# -- Redis ---------------------------------------------------------------------------------------

async def test_redis_set_soon_writes_without_waiting(prefix: str,
                                                     redis_client: aioredis.Redis) -> None:
    """The layer's path for a miss: the write is queued and nobody awaits its reply. Before
    the store has a connection it declines (the caller awaits set); afterwards the entry,
    its TTL and its tags land as set() would write them, also after a script flush."""
    store = RedisCacheStore(REDIS_URL, prefix=prefix)
    try:
        assert store.set_soon("k0", entry(project_tag("a")), 30) is False  # not connected
        await store.set("k0", entry(project_tag("a")), 30)
        assert store.set_soon("k1", entry(project_tag("a"), model_tag("m")), 30) is True
        await redis_client.script_flush()
        assert store.set_soon("k2", entry(project_tag("a")), 30) is True  # NOSCRIPT: re-sent
    finally:
        await store.shutdown()  # lets both land
    store = RedisCacheStore(REDIS_URL, prefix=prefix)
    try:
        for key in ("k1", "k2"):
            found = await store.get(key)
            assert found is not None and found.body == entry().body
            assert 25_000 <= await redis_client.pttl(store.entry_key(key)) <= 30_000
        assert await store.invalidate(model_tag("m")) == 1
        assert await store.get("k1") is None and await store.get("k2") is not None
    finally:
        await store.shutdown()


@asynccontextmanager
async def behind_a_proxy(prefix: str, retry_interval_s: float
                         ) -> AsyncIterator[tuple[TcpProxy, RedisCacheStore]]:
    """A Redis store reaching Redis through a relay the test can switch off."""
    proxy = TcpProxy(6379)
    await proxy.start()
    store = RedisCacheStore(f"redis://127.0.0.1:{proxy.port}/0", prefix=prefix,
                            retry_interval_s=retry_interval_s)
    try:
        yield proxy, store
    finally:
        await store.shutdown()
        await proxy.stop()


async def test_redis_set_soon_declines_during_an_outage(prefix: str) -> None:
    async with behind_a_proxy(prefix, 30) as (proxy, store):
        await store.set("k", entry(), 30)  # connected
        await proxy.stop()
        assert store.set_soon("lost", entry(), 30) is True  # queued on a connection now gone
        for _ in range(100):  # the lost write trips the outage gate...
            if store.set_soon("k3", entry(), 30) is False:
                break
            await asyncio.sleep(0.02)
        assert store.set_soon("k3", entry(), 30) is False  # ...writes decline (set() raises)
        with pytest.raises(CacheStoreError):  # and lookups fail fast (the layer: a miss)
            await store.get("k")


async def test_redis_keys_all_expire(prefix: str, redis_client: aioredis.Redis) -> None:
    store = RedisCacheStore(REDIS_URL, prefix=prefix)
    await store.set("k2", entry(project_tag("a"), model_tag("n")), 90)
    await store.set("k", entry(project_tag("a"), model_tag("m")), 30)  # does not shorten "a"

    keys = sorted([key async for key in redis_client.scan_iter(match=f"{prefix}*")])
    assert keys == sorted(f"{prefix}:{name}".encode() for name in
                          ["e:k", "e:k2", "t:project:a", "t:model:m", "t:model:n"])
    assert 29_000 < await redis_client.pttl(f"{prefix}:e:k") <= 30_000
    assert 89_000 < await redis_client.pttl(f"{prefix}:t:project:a") <= 90_000  # the longest
    assert 29_000 < await redis_client.pttl(f"{prefix}:t:model:m") <= 30_000
    await store.shutdown()


async def test_redis_tag_sets_forget_expired_entries(prefix: str,
                                                   redis_client: aioredis.Redis) -> None:
    store = RedisCacheStore(REDIS_URL, prefix=prefix)
    await store.set("long", entry(project_tag("a")), 30)  # keeps the tag set alive
    for i in range(3):
        await store.set(f"old{i}", entry(project_tag("a")), 0.05)
    await asyncio.sleep(0.1)
    await store.set("new", entry(project_tag("a")), 30)

    members = await redis_client.zrange(f"{prefix}:t:project:a", 0, -1)
    assert sorted(members) == [f"{prefix}:e:long".encode(), f"{prefix}:e:new".encode()]
    await store.shutdown()


async def test_redis_invalidation_leaves_nothing_behind(prefix: str,
                                                        redis_client: aioredis.Redis) -> None:
    """Nothing but the record of the invalidations themselves, which expires (a day after
    the last one: longer than any request in flight, whose answer it keeps out)."""
    store = RedisCacheStore(REDIS_URL, prefix=prefix)
    await store.set("k", entry(project_tag("a"), namespace_tag("faq")), 30)
    await store.set("k2", entry(project_tag("a")), 30)

    assert await store.invalidate(project_tag("a"), namespace_tag("faq")) == 1
    assert await redis_client.zrange(f"{prefix}:t:project:a", 0, -1) == [f"{prefix}:e:k2".encode()]
    assert await store.invalidate(project_tag("a")) == 1
    assert [key async for key in redis_client.scan_iter(match=f"{prefix}*")] == \
        [f"{prefix}:i".encode()]
    assert 0 < await redis_client.pttl(f"{prefix}:i") <= 24 * 3600 * 1000
    await store.shutdown()


async def test_redis_lookups_skip_an_invalidations_entries_while_it_deletes_them(
        prefix: str, redis_client: aioredis.Redis) -> None:
    # The entries go in batches of 500; a lookup between batches found one that was to go
    # (12 of 13 lookups during a 20,000-entry invalidation), as the other stores do not.
    store = RedisCacheStore(REDIS_URL, prefix=prefix, timeout_s=10.0)
    count = 6000
    for start in range(0, count, 500):
        await asyncio.gather(*(store.set(f"k{i}", entry(project_tag("acme")), 60)
                               for i in range(start, start + 500)))
    await store.set("other", entry(project_tag("other")), 60)
    sweep = asyncio.create_task(store.invalidate(project_tag("acme")))
    while not await redis_client.exists(f"{prefix}:i"):  # the invalidation is recorded
        await asyncio.sleep(0)
    looked, found = 0, 0
    while not sweep.done():
        for key in (f"k{count - 1}", f"k{count // 2}", "k0"):
            looked += 1
            found += await store.get(key) is not None
    assert await sweep == count
    assert looked > 0 and found == 0, (looked, found)
    assert await store.get("other") is not None  # (another tag: untouched)
    await store.shutdown()


async def test_redis_ignores_a_value_it_did_not_write(prefix: str,
                                                      redis_client: aioredis.Redis) -> None:
    store = RedisCacheStore(REDIS_URL, prefix=prefix)
    await redis_client.set(f"{prefix}:e:k", b"not an entry", ex=30)
    assert await store.get("k") is None
    await store.shutdown()


async def test_redis_reloads_its_script_after_a_flush(prefix: str,
                                                      redis_client: aioredis.Redis) -> None:
    store = RedisCacheStore(REDIS_URL, prefix=prefix)
    await store.set("k", entry(), 30)
    await redis_client.script_flush()
    await store.set("k2", entry(), 30)
    assert await store.get("k2") is not None
    await store.shutdown()


async def test_redis_down_is_a_store_error_at_once() -> None:
    store = RedisCacheStore(f"redis://127.0.0.1:{free_port()}/0", prefix="{sgtest}")
    await store.startup()  # does not connect: a Redis that is down does not stop the gateway
    async with asyncio.timeout(2):
        with pytest.raises(CacheStoreError, match="unavailable"):
            await store.get("k")
        with pytest.raises(CacheStoreError):
            await store.set("k", entry(), 30)
        with pytest.raises(CacheStoreError):
            await store.invalidate(project_tag("a"))
        assert (await store.check_ready())["cache_redis"].startswith("error:")
    await store.shutdown()


async def test_a_silent_redis_times_out_and_is_not_asked_again_at_once() -> None:
    connections = 0

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await reader.read()
        writer.close()

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    store = RedisCacheStore(f"redis://127.0.0.1:{port}/0", timeout_s=0.2,
                            retry_interval_s=60)
    try:
        async with asyncio.timeout(5):
            with pytest.raises(CacheStoreError, match="TimeoutError"):
                await store.get("k")
            for _ in range(5):
                with pytest.raises(CacheStoreError, match="unavailable"):
                    await store.get("k")
        assert connections == 1  # refused from memory, without a connection or a timeout
    finally:
        await store.shutdown()
        server.close()


async def test_redis_outage_and_recovery(prefix: str) -> None:
    async with behind_a_proxy(prefix, 0.1) as (proxy, store):
        await store.set("k", entry(), 30)
        assert await store.get("k") is not None

        await proxy.stop()
        async with asyncio.timeout(2):
            with pytest.raises(CacheStoreError):
                await store.get("k")

        await proxy.start()  # the same port

        async def found() -> bool:
            return await store.get("k") is not None

        await eventually(found)


# -- PostgreSQL ----------------------------------------------------------------------------------

async def test_postgres_schema_is_created_once_under_concurrent_startup(table: str) -> None:
    stores = [PostgresCacheStore(PG_DSN, table=table) for _ in range(4)]
    await asyncio.gather(*(store.startup() for store in stores))
    try:
        for store in stores:
            assert await store.check_ready() == {"cache_postgres": "ok"}
        async with await psycopg.AsyncConnection.connect(PG_DSN, autocommit=True) as conn:
            cur = await conn.execute(sql.SQL("SELECT version FROM {}").format(
                sql.Identifier(table + "_schema_version")))
            assert await cur.fetchall() == [(1,), (2,)]
        await stores[0].set("k", entry(), 30)
        assert await stores[3].get("k") is not None
    finally:
        for store in stores:
            await store.shutdown()

    again = PostgresCacheStore(PG_DSN, table=table)  # a restart: the data survived
    await again.startup()
    assert await again.get("k") is not None
    await again.shutdown()


async def test_postgres_ignores_expired_rows_and_purges_them(table: str) -> None:
    store = PostgresCacheStore(PG_DSN, table=table, purge_interval_s=3600)
    await store.startup()
    try:
        await store.set("old", entry(), 0.05)
        await store.set("new", entry(), 60)
        await asyncio.sleep(0.1)

        assert await store.get("old") is None
        assert await pg_rows(table) == 2  # still there, but never returned
        assert await store.purge_expired() == 1
        assert await pg_rows(table) == 1
        assert await store.get("new") is not None
    finally:
        await store.shutdown()


async def test_postgres_purges_in_the_background(table: str) -> None:
    store = PostgresCacheStore(PG_DSN, table=table, purge_interval_s=0.1)
    await store.startup()
    try:
        await store.set("old", entry(), 0.05)
        await store.set("new", entry(), 60)

        async def purged() -> bool:
            return await pg_rows(table) == 1

        await eventually(purged)
    finally:
        await store.shutdown()


async def test_postgres_ignores_a_row_it_did_not_write(table: str) -> None:
    store = PostgresCacheStore(PG_DSN, table=table)
    await store.startup()
    try:
        await store.set("k", entry(), 60)
        async with await psycopg.AsyncConnection.connect(PG_DSN, autocommit=True) as conn:
            await conn.execute(sql.SQL("UPDATE {} SET entry = 'garbage'::bytea").format(
                sql.Identifier(table)))
        assert await store.get("k") is None
    finally:
        await store.shutdown()


@asynccontextmanager
async def deletes_held_back(table: str) -> AsyncIterator[Callable[[], Awaitable[bool]]]:
    """Holds a lock on `table` that lets reads through and makes every DELETE wait (until
    the block ends); yields a check that a DELETE of it is waiting."""
    async with await psycopg.AsyncConnection.connect(PG_DSN, autocommit=True) as lock, \
            await psycopg.AsyncConnection.connect(PG_DSN, autocommit=True) as watch, \
            lock.transaction():
        await lock.execute(sql.SQL("LOCK TABLE {} IN SHARE MODE").format(sql.Identifier(table)))

        async def delete_waits() -> bool:
            cur = await watch.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND query LIKE 'WITH gone AS (DELETE%%' AND position(%s in query) > 0",
                (table,))
            row = await cur.fetchone()
            return row is not None and row[0] > 0

        yield delete_waits


async def test_postgres_invalidation_is_not_judged_by_the_lookup_timeout(table: str) -> None:
    """A large invalidation's DELETE outlasts timeout_s, the lookups' bound: it has
    admin_timeout_s, and lookups go on meanwhile (they are not taken for an outage)."""
    store = PostgresCacheStore(PG_DSN, table=table, timeout_s=0.5, retry_interval_s=60)
    await store.startup()
    try:
        await store.set("gone", entry(project_tag("big")), 60)
        await store.set("kept", entry(project_tag("small")), 60)
        async with deletes_held_back(table) as delete_waits:
            invalidation = asyncio.ensure_future(store.invalidate(project_tag("big")))
            await eventually(delete_waits)
            await asyncio.sleep(3 * store.timeout_s)  # (past what a lookup may take)
            assert not invalidation.done()
            assert await store.get("kept") is not None
            assert await store.get("gone") is None  # (skipped from the moment it is asked)
        assert await invalidation == 1
        assert await pg_rows(table) == 1
        assert (await store.check_ready())["cache_postgres"] == "ok"
    finally:
        await store.shutdown()


async def test_postgres_invalidation_past_admin_timeout_fails_alone(table: str) -> None:
    """Past admin_timeout_s the admin call fails, and nothing else: lookups still skip what
    it covers, and asked again it drops the rest."""
    store = PostgresCacheStore(PG_DSN, table=table, admin_timeout_s=0.3, retry_interval_s=60)
    await store.startup()
    try:
        await store.set("gone", entry(project_tag("big")), 60)
        await store.set("kept", entry(project_tag("small")), 60)
        async with deletes_held_back(table):
            with pytest.raises(CacheStoreError, match="admin_timeout_s"):
                await store.invalidate(project_tag("big"))
            assert await store.get("kept") is not None
            assert await store.get("gone") is None
            assert (await store.check_ready())["cache_postgres"] == "ok"
        assert await pg_rows(table) == 2
        assert await store.invalidate(project_tag("big")) == 1
        assert await pg_rows(table) == 1
    finally:
        await store.shutdown()


async def insert_rows(table: str, count: int, tags: list[str], *, created: str = "now()",
                      expires: str = "now() + interval '1 hour'") -> None:
    """`count` rows straight into the table (the store would take a statement each)."""
    async with await psycopg.AsyncConnection.connect(PG_DSN, autocommit=True) as conn:
        await conn.execute(sql.SQL(
            "INSERT INTO {} (key, tags, entry, created_at, expires_at) "
            "SELECT %s || g, %s, %s, " + created + ", " + expires +
            " FROM generate_series(1, %s) g").format(sql.Identifier(table)),
            (uuid.uuid4().hex, tags, entry(*tags).encode(), count))


async def test_postgres_invalidation_drops_many_batches(table: str) -> None:
    store = PostgresCacheStore(PG_DSN, table=table)
    await store.startup()
    try:
        await insert_rows(table, 11_000, [project_tag("big")])
        await insert_rows(table, 1_000, [project_tag("big")], expires="now()")  # expired
        await insert_rows(table, 10, [project_tag("small")])

        assert await store.invalidate(project_tag("big")) == 11_000  # (live ones)
        assert await pg_rows(table) == 10
    finally:
        await store.shutdown()


async def test_postgres_forgets_day_old_invalidations_after_their_rows(table: str) -> None:
    store = PostgresCacheStore(PG_DSN, table=table, purge_interval_s=0.1)
    await store.startup()
    try:
        old = [project_tag("old")]
        await insert_rows(table, 6_000, old, created="now() - interval '3 days'",
                          expires="now() + interval '7 days'")
        await insert_rows(table, 10, old, created="now() - interval '1 hour'",
                          expires="now() + interval '7 days'")
        invalidations = sql.Identifier(table + "_invalidations")
        async with await psycopg.AsyncConnection.connect(PG_DSN, autocommit=True) as conn:
            await conn.execute(sql.SQL("INSERT INTO {} (tags, at) VALUES "
                                       "(%s, now() - interval '2 days')").format(invalidations),
                               (old,))

            async def forgotten() -> bool:
                cur = await conn.execute(sql.SQL("SELECT count(*) FROM {}").format(
                    invalidations))
                row = await cur.fetchone()
                return row is not None and row[0] == 0

            await eventually(forgotten)
        assert await pg_rows(table) == 10  # (what came after it stays)
    finally:
        await store.shutdown()


def test_postgres_refuses_an_unsafe_table_name() -> None:
    with pytest.raises(ValueError, match="invalid cache table name"):
        PostgresCacheStore(PG_DSN, table='cache"; DROP TABLE x; --')


async def test_postgres_down_does_not_block_startup_and_is_a_store_error(table: str) -> None:
    dsn = f"host=127.0.0.1 port={free_port()} user=root dbname=test"
    store = PostgresCacheStore(dsn, table=table, startup_wait_s=30)
    try:
        async with asyncio.timeout(5):  # the refused connection ends the first attempt
            await store.startup()
            with pytest.raises(CacheStoreError, match="not ready"):
                await store.get("k")
            with pytest.raises(CacheStoreError, match="not ready"):
                await store.set("k", entry(), 30)
            with pytest.raises(CacheStoreError, match="not ready"):
                await store.invalidate(project_tag("a"))
            assert (await store.check_ready())["cache_postgres"].startswith("error:")
    finally:
        await store.shutdown()


async def test_postgres_becomes_ready_when_it_comes_up_after_startup(table: str) -> None:
    proxy = TcpProxy(5432, port=free_port())  # not started yet: nothing listens
    store = PostgresCacheStore(f"host=127.0.0.1 port={proxy.port} user=root dbname=test",
                               table=table, startup_wait_s=0.5)
    try:
        await store.startup()
        with pytest.raises(CacheStoreError):
            await store.get("k")
        await proxy.start()

        async def ready() -> bool:
            await store.set("k", entry(), 30)
            return await store.get("k") is not None

        await eventually(ready)
    finally:
        await store.shutdown()
        await proxy.stop()


async def test_postgres_outage_and_recovery(table: str) -> None:
    proxy = TcpProxy(5432)
    await proxy.start()
    store = PostgresCacheStore(f"host=127.0.0.1 port={proxy.port} user=root dbname=test",
                               table=table, retry_interval_s=0.1)
    try:
        await store.startup()
        await store.set("k", entry(), 60)
        assert await store.get("k") is not None

        await proxy.stop()
        async with asyncio.timeout(3):
            with pytest.raises(CacheStoreError):
                await store.get("k")
            with pytest.raises(CacheStoreError):
                await store.set("k2", entry(), 60)

        await proxy.start()  # the same port

        async def found() -> bool:
            return await store.get("k") is not None

        await eventually(found, timeout_s=30)
    finally:
        await store.shutdown()
        await proxy.stop()


# -- tiers ---------------------------------------------------------------------------------------

async def test_a_warm_hit_is_promoted_to_hot_with_its_remaining_ttl(
        tiered: TieredCacheStore, prefix: str, redis_client: aioredis.Redis) -> None:
    await tiered.warm.set("k", entry(project_tag("a")), 30)
    stored = await tiered.warm.get("k")
    assert stored is not None and await tiered.hot.get("k") is None
    await asyncio.sleep(1.1)  # a second of the TTL is gone

    assert await tiered.get("k") == stored

    async def promoted() -> bool:
        return await tiered.hot.get("k") is not None

    await eventually(promoted)
    hot = await tiered.hot.get("k")
    assert hot is not None and hot.expires_at is not None and stored.expires_at is not None
    assert dataclasses.replace(hot, expires_at=None) == dataclasses.replace(stored,
                                                                            expires_at=None)
    # The same expiry (read at two moments; a fresh TTL would be 1.1 s later), and what is
    # left of it in Redis.
    assert abs(hot.expires_at - stored.expires_at) < 0.5
    assert 25_000 < await redis_client.pttl(f"{prefix}:e:k") <= 29_000
    assert await tiered.hot.invalidate(project_tag("a")) == 1  # promoted with its tags


async def test_an_expired_warm_entry_is_not_promoted(tiered: TieredCacheStore) -> None:
    await tiered.warm.set("k", entry(), 0.2)
    await asyncio.sleep(0.3)
    assert await tiered.get("k") is None
    await asyncio.sleep(0.1)
    assert await tiered.hot.get("k") is None


async def test_a_hot_hit_does_not_need_warm(tiered: TieredCacheStore) -> None:
    await tiered.hot.set("k", entry(), 30)
    assert await tiered.warm.get("k") is None
    assert await tiered.get("k") is not None


async def test_a_tiered_set_writes_both(tiered: TieredCacheStore) -> None:
    await tiered.set("k", entry(), 30)
    hot, warm = await tiered.hot.get("k"), await tiered.warm.get("k")
    assert hot is not None and warm is not None
    assert hot.expires_at is not None and warm.expires_at is not None
    assert abs(hot.expires_at - warm.expires_at) < 1


class SlowHot(MemoryCacheStore):
    """A hot tier whose writes wait until released."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()

    async def set(self, key: str, entry: CachedResponse, ttl_s: float) -> None:
        await self.release.wait()
        await super().set(key, entry, ttl_s)


class SlowWarm(MemoryCacheStore):
    """A warm tier whose reads find the entry, then wait until released to return it."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()

    async def get(self, key: str) -> CachedResponse | None:
        found = await super().get(key)
        await self.release.wait()
        return found


async def test_an_invalidation_waits_for_promotions_in_flight() -> None:
    hot, warm = SlowHot(), MemoryCacheStore()
    store = TieredCacheStore(hot, warm)
    await warm.set("k", entry(project_tag("a")), 60)
    assert await store.get("k") is not None  # its promotion now waits to write

    invalidation = asyncio.create_task(store.invalidate(project_tag("a")))
    await asyncio.sleep(0.05)
    hot.release.set()  # the promotion lands; then the invalidation must still drop it

    assert await invalidation == 1
    await asyncio.sleep(0.05)  # whatever was still to land has landed
    assert await hot.get("k") is None and await store.get("k") is None


async def test_a_read_that_overlapped_an_invalidation_promotes_nothing() -> None:
    hot, warm = MemoryCacheStore(), SlowWarm()
    store = TieredCacheStore(hot, warm)
    await warm.set("k", entry(project_tag("a")), 60)
    read = asyncio.create_task(store.get("k"))  # finds the entry, then is slow to return it
    await asyncio.sleep(0.05)

    assert await store.invalidate(project_tag("a")) == 1
    warm.release.set()
    assert await read is not None  # this request began before the invalidation
    await asyncio.sleep(0.05)
    assert await hot.get("k") is None


async def test_a_failing_hot_tier_is_a_miss_for_that_tier(prefix: str, table: str) -> None:
    store = TieredCacheStore(RedisCacheStore(f"redis://127.0.0.1:{free_port()}/0"),
                             PostgresCacheStore(PG_DSN, table=table))
    await store.startup()
    try:
        await store.set("k", entry(), 30)  # only warm took it; not an error
        assert await store.get("k") is not None
        assert (await store.check_ready())["cache_redis"].startswith("error:")
        with pytest.raises(CacheStoreError, match="every cache tier"):
            await store.invalidate(project_tag("a"))  # a stale hot tier must be known
    finally:
        await store.shutdown()


async def test_a_failing_warm_tier_is_a_miss_for_that_tier(prefix: str) -> None:
    dead = f"host=127.0.0.1 port={free_port()} user=root dbname=test"
    store = TieredCacheStore(RedisCacheStore(REDIS_URL, prefix=prefix),
                             PostgresCacheStore(dead, table="unused"))
    await store.startup()
    try:
        assert await store.get("k") is None  # hot missed, warm failed: a miss
        await store.set("k", entry(), 30)
        assert await store.get("k") is not None
    finally:
        await store.shutdown()


async def test_both_tiers_failing_is_a_store_error() -> None:
    store = TieredCacheStore(
        RedisCacheStore(f"redis://127.0.0.1:{free_port()}/0"),
        PostgresCacheStore(f"host=127.0.0.1 port={free_port()} user=root dbname=test"))
    await store.startup()
    try:
        async with asyncio.timeout(5):
            with pytest.raises(CacheStoreError, match="both cache tiers"):
                await store.get("k")
            with pytest.raises(CacheStoreError, match="both cache tiers"):
                await store.set("k", entry(), 30)
    finally:
        await store.shutdown()


async def test_redis_hits_reuse_decoded_entries_without_going_stale(
        prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from middleware.cache import stores as stores_module
    monkeypatch.setattr(stores_module, "_DECODED_MAX_BYTES", 1000)
    store = RedisCacheStore(REDIS_URL, prefix=prefix)
    await store.startup()
    try:
        await store.set("k", entry(body=b'{"answer":1}'), 60)
        first, again = await store.get("k"), await store.get("k")
        assert first is not None and again is first  # decoded once
        await store.set("k", entry(body=b'{"answer":2}'), 60)  # rewritten: new bytes
        replaced = await store.get("k")
        assert replaced is not None and replaced.body == b'{"answer":2}'
        for i in range(20):  # the memo stays within its byte bound
            await store.set(f"k{i}", entry(body=b'{"n":%d}' % i), 60)
            assert (await store.get(f"k{i}")) is not None
            assert store._decoded_bytes <= 1000
        assert len(store._decoded) < 20
    finally:
        await store.shutdown()
