"""Where exact-cache entries live: in process, in Redis (hot), in PostgreSQL (warm), or tiered.

Every store keeps `CachedResponse` entries under the key of `keys.cache_key`, each with a TTL
and the invalidation tags it carries (`keys.cache_tags`: its model, project and namespace).
`invalidate(*tags)` drops every entry that carries *all* the given tags, so one admin call
drops a project, a model, a namespace, or an intersection of them. How each store finds
those entries:

- memory: no index; `invalidate` reads each entry's tags, a slice of entries per turn of the
  event loop (an index written on every store and eviction cost every request);
- Redis: per tag a sorted set of entry keys scored by expiry (`<prefix>:t:<tag>`), written
  atomically with the entry by one Lua call and trimmed of expired members on each write; it
  expires with its last entry, so nothing outlives the entries it points at;
- PostgreSQL: a `tags text[]` column with a GIN index (`DELETE ... WHERE tags @> $1`, in
  batches walked by key).

Any failure of a store is a `CacheStoreError`: the layer answers it as a miss, never an error.
A store that cannot reach its server fails fast for `retry_interval_s` afterwards, so an
outage costs one timeout per interval, not one per request.
"""
from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import math
import os
import re
import struct
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
import psycopg
from psycopg import sql
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from gateway.resp import RespClient, RespError, encode_command, require_hash_tag
from gateway.supervisor import SHARED_DIR_ENV
from middleware.cache.shared import FILE_NAME, InvalidationLog

__all__ = [
    "CacheStore",
    "CacheStoreError",
    "CachedResponse",
    "MemoryCacheStore",
    "PostgresCacheStore",
    "RedisCacheStore",
    "TieredCacheStore",
]

logger = logging.getLogger("sluicegate.cache")

class CacheStoreError(Exception):
    """A cache store could not do what was asked (unreachable, not ready, refused)."""


# -- the entry -----------------------------------------------------------------------------------

_MAGIC = b"SGC1"
_HEADER_SIZE = struct.Struct(">I")
_API_FORMATS = ("openai", "anthropic")


@dataclass(slots=True)
class CachedResponse:
    """One stored answer: the final non-stream JSON body a non-stream client of the ingress
    format received (`api_format`), and what the layer needs to replay and meter it. Or,
    when `stream_operation` is set, the event stream a stream client of that operation
    received, as it went out, LZ4-compressed: the cache layer makes the JSON answer of it
    (and its `usage`, None until then) when it is first asked for again (see
    `CacheMiddleware._entry_of`).

    `tags` are the invalidation tags (`keys.cache_tags`); `expires_at` (epoch seconds) is set
    by the store that keeps the entry, so a tier that promotes it keeps its remaining TTL.
    An entry is shared by every hit on it: treat it, and its `usage`, as read-only. (It is
    not a frozen dataclass only because a frozen one takes four times as long to build, and
    a miss builds two; a NamedTuple took 3.4k instructions more a miss than this.)
    """

    body: bytes
    api_format: str
    status: int
    created_at: float
    usage: dict[str, Any] | None
    model: str
    cost_micros: int
    tags: tuple[str, ...] = ()
    expires_at: float | None = None
    stream_operation: str | None = None

    def encode(self) -> bytes:
        """`SGC1`, the header's length (4 bytes, big-endian), the orjson header, the body
        as is: the body is neither escaped nor parsed again on the way back. A stream's
        format is written with its operation, `[api_format, operation]`, which a reader from
        before streams were kept as such refuses (a miss) rather than take the stream for
        the JSON answer."""
        header = self._header()
        return b"".join((_MAGIC, _HEADER_SIZE.pack(len(header)), header, self.body))

    def _header(self) -> bytes:
        form = self.api_format if self.stream_operation is None else \
            [self.api_format, self.stream_operation]
        return orjson.dumps({
            "f": form, "s": self.status, "c": self.created_at, "u": self.usage,
            "m": self.model, "$": self.cost_micros, "t": self.tags, "e": self.expires_at})

    @classmethod
    def decode(cls, data: bytes) -> CachedResponse:
        """The entry `encode` wrote; ValueError for anything else."""
        if data[:4] != _MAGIC or len(data) < 8:
            raise ValueError("not a Sluicegate cache entry")
        (size,) = _HEADER_SIZE.unpack_from(data, 4)
        if 8 + size > len(data):
            raise ValueError("truncated cache entry")
        header = orjson.loads(data[8:8 + size])  # orjson.JSONDecodeError is a ValueError
        _expect(isinstance(header, dict), "cache entry header is not an object")
        try:
            form, stream_operation = header["f"], None
            if type(form) is list and len(form) == 2:
                form, stream_operation = form[0], _text(form[1])
            return cls(body=bytes(data[8 + size:]), api_format=_one_of(form),
                       status=_status(header["s"]), created_at=_number(header["c"]),
                       usage=_usage(header["u"]), model=_text(header["m"]),
                       cost_micros=_integer(header["$"]), tags=_tags(header["t"]),
                       expires_at=None if header["e"] is None else _number(header["e"]),
                       stream_operation=stream_operation)
        except KeyError as exc:
            raise ValueError(f"cache entry header lacks {exc}") from None


def _expect(ok: bool, problem: str) -> None:
    if not ok:
        raise ValueError(problem)


def _one_of(value: Any) -> str:
    if value not in _API_FORMATS:
        raise ValueError(f"unknown api_format {value!r} in cache entry")
    return str(value)


def _integer(value: Any) -> int:
    if type(value) is not int:
        raise ValueError(f"expected an integer in cache entry, got {value!r}")
    return value


def _status(value: Any) -> int:
    if not 100 <= _integer(value) <= 599:
        raise ValueError(f"invalid HTTP status {value!r} in cache entry")
    return int(value)


def _number(value: Any) -> float:
    if type(value) not in (int, float):
        raise ValueError(f"expected a number in cache entry, got {value!r}")
    return float(value)


def _text(value: Any) -> str:
    _expect(isinstance(value, str), f"expected a string in cache entry, got {value!r}")
    return str(value)


def _usage(value: Any) -> dict[str, Any] | None:
    _expect(value is None or isinstance(value, dict),
            "cache entry usage is neither an object nor null")
    return None if value is None else dict(value)


def _tags(value: Any) -> tuple[str, ...]:
    _expect(isinstance(value, list), "cache entry tags are not a list")
    return tuple(_text(tag) for tag in value)


def _check_ttl(ttl_s: float) -> None:
    if not math.isfinite(ttl_s):
        raise ValueError(f"a cache TTL must be a finite number of seconds, not {ttl_s!r}")


def _expiring(entry: CachedResponse, ttl_s: float, body: bytes | None = None
              ) -> CachedResponse:
    """The entry as a store keeps it: expiring `ttl_s` from now (and with `body` instead of
    its own, if given)."""
    _check_ttl(ttl_s)
    # Positional: dataclasses.replace costs about twice as much, on every store.
    return CachedResponse(entry.body if body is None else body, entry.api_format,
                          entry.status, entry.created_at,
                          entry.usage, entry.model, entry.cost_micros, entry.tags,
                          time.time() + ttl_s, entry.stream_operation)


# -- the contract --------------------------------------------------------------------------------

class CacheStore(Protocol):
    """What the cache layer and the admin API need from an exact-cache store."""

    name: str

    async def startup(self) -> None: ...

    async def shutdown(self) -> None: ...

    async def check_ready(self) -> dict[str, str]:
        """{component: "ok" | "error: ..."}; never raises."""

    async def get(self, key: str) -> CachedResponse | None:
        """The live entry under `key` (its `expires_at` set), or None."""

    async def set(self, key: str, entry: CachedResponse, ttl_s: float) -> None:
        """Stores `entry` for `ttl_s` seconds, replacing any entry under `key`; a TTL of
        zero or less stores nothing."""

    async def invalidate(self, *tags: str) -> int:
        """Drops every entry carrying all of `tags` (at least one); how many were dropped."""


class OutageGate:
    """After a store (or the semantic index) could not reach its server, refuses at once
    for `retry_interval_s`, with `error` (a miss, as the server's failure is): a server that
    accepts connections but never answers would cost every request its timeout."""

    def __init__(self, what: str, retry_interval_s: float,
                 error: type[Exception] = CacheStoreError) -> None:
        self.what = what
        self.retry_interval_s = retry_interval_s
        self.error = error
        self._closed_until = 0.0
        self._reason = ""

    def check(self) -> None:
        if self._closed_until and time.monotonic() < self._closed_until:
            raise self.error(f"{self.what} is unavailable ({self._reason})")

    def trip(self, exc: BaseException) -> Exception:
        self._reason = _describe(exc)
        self._closed_until = time.monotonic() + self.retry_interval_s
        logger.warning("%s is unavailable (%s); cache lookups miss for %.1fs", self.what,
                       self._reason, self.retry_interval_s)
        return self.error(f"{self.what} is unavailable ({self._reason})")

    def reopen(self) -> None:
        """The server answered (a readiness probe gets through the gate): open at once."""
        self._closed_until = 0.0


def _describe(exc: BaseException) -> str:
    # psycopg's messages name the host and port, never the password.
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _covered(entry: CachedResponse, cutoffs: Mapping[frozenset[str], float]) -> bool:
    """Whether an invalidation in `cutoffs` (its tags -> when it was made) covers `entry`: it
    carries all of one's tags and was written before it."""
    return any(entry.created_at <= at and wanted.issubset(entry.tags)
               for wanted, at in cutoffs.items())


def _check_tags(tags: Sequence[str]) -> None:
    if not tags:
        raise ValueError("invalidate() needs at least one tag")


# -- in process ----------------------------------------------------------------------------------

# What an entry costs in memory beyond its body and its key: the entry object, its usage dict
# and the LRU's slots. Measured with tracemalloc on the bench's chat answer (its usage nests
# two dicts, as OpenAI's does): 852 bytes beyond body and key over 20,000 entries (957 with
# the index by tag the store kept until 2026-11-30, 1,077 when each entry was kept in a tuple
# beside its size); counted with a margin for larger usages.
ENTRY_OVERHEAD_BYTES = 1200


# An invalidation reads this many entries between two turns of the event loop (~2 ms).
INVALIDATE_SLICE = 8192


def memory_size(key: str, entry: CachedResponse) -> int:
    """What the memory store counts for an entry against its bound (no encoding: a miss
    pays for this on every store)."""
    return len(entry.body) + len(key) + ENTRY_OVERHEAD_BYTES


# Invalidations a memory store remembers (each: its tags and when); past that, the oldest
# are forgotten and every entry made before the newest forgotten one counts as invalidated.
MAX_CUTOFFS = 1024


class MemoryCacheStore:
    """The embedded default: an LRU in this process, bounded by what its entries take in
    memory (`memory_size`: encoded size, key and a measured per-entry overhead). Expired
    entries are dropped when read or when the LRU reaches them.

    An invalidation holds for answers in flight too: it is remembered (its tags and time),
    and an entry created (its request began) before an invalidation of all its tags is
    refused when written. With `shared_path`, or under `serve --workers N` (the supervisor
    names a directory in `$SLUICEGATE_SHARED_DIR`), invalidations are shared with the other
    workers through a small mapped file (middleware/cache/shared.py): each lookup checks
    whether one was made elsewhere and, if so, applies it before answering.
    """

    name = "memory"

    def __init__(self, *, max_bytes: int = 64 * 1024 * 1024,
                 shared_path: str | None = None) -> None:
        if max_bytes <= 0:
            raise ValueError("MemoryCacheStore needs max_bytes > 0")
        self.max_bytes = max_bytes
        self.shared_path = shared_path
        self.bytes_used = 0
        # Invalidations: when each set of tags was last invalidated; the newest time of all
        # (an entry created after it is never looked at further); `_floor`: every entry
        # created at or before it is invalidated. `_sweeping`: how many scans dropping
        # invalidated entries are under way (meanwhile a hit checks its entry).
        self._cutoffs: dict[frozenset[str], float] = {}
        self._newest_cutoff = -math.inf
        self._floor = -math.inf
        self._sweeping = 0
        self._sweeps: set[asyncio.Task[None]] = set()
        self._log: InvalidationLog | None = None
        # The entries, least recently used first (each counted as `memory_size`). There is
        # no index by tag: an invalidation reads every entry's tags (~10 ms for the default
        # bound's ~35,000 answers), which spares each store and each eviction a write into
        # a set as large as the store (a cache miss on every one).
        self._entries: OrderedDict[str, CachedResponse] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    async def startup(self) -> None:
        directory = os.environ.get(SHARED_DIR_ENV)
        path = self.shared_path or (os.path.join(directory, FILE_NAME) if directory else None)
        if path is not None and self._log is None:
            self._log = InvalidationLog(path)
            self.get_now = self._get_now_shared  # type: ignore[method-assign]

    async def shutdown(self) -> None:
        if self._sweeps:
            await asyncio.wait(list(self._sweeps))
        log, self._log = self._log, None
        if log is not None:
            del self.get_now  # (the class's again)
            log.close()
        self._entries.clear()
        self.bytes_used = 0

    async def check_ready(self) -> dict[str, str]:
        return {"cache_memory": "ok"}

    async def get(self, key: str) -> CachedResponse | None:
        return self.get_now(key)

    def get_now(self, key: str) -> CachedResponse | None:
        """`get`, answered at once (nothing to wait for)."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires_at is not None and entry.expires_at <= time.time():
            self._remove(key)
            return None
        if self._sweeping and entry.created_at <= self._newest_cutoff and self._is_cut(entry):
            self._remove(key)  # (invalidated; the scan under way has not reached it yet)
            return None
        self._entries.move_to_end(key)
        return entry

    def _get_now_shared(self, key: str) -> CachedResponse | None:
        """`get_now` of a store that shares its invalidations (its `get_now` from startup):
        `get_now`, once another worker's invalidations are applied. (A lookup without a
        shared file does not pay for the check.)"""
        log = self._log
        assert log is not None
        if log.generation[0] != log.read_up_to:
            self._catch_up(log)  # another worker invalidated: applied before answering
        return MemoryCacheStore.get_now(self, key)

    async def set(self, key: str, entry: CachedResponse, ttl_s: float) -> None:
        if ttl_s <= 0:  # (NaN goes on, to be refused as the other stores refuse it)
            return
        # The body is copied: orjson returns each result in a 4 KiB buffer, which a kept
        # entry would hold for its whole life (a 700-byte answer took 4.1 KB).
        self._keep(key, _expiring(entry, ttl_s, b"".join((entry.body, b""))))

    def set_soon(self, key: str, entry: CachedResponse, ttl_s: float) -> bool:
        """`set`, done at once (there is nothing to wait for); always True. The entry is
        taken over: the caller made it for this call (the cache layer's `_entry_of`) and
        never uses it again, so it is kept itself, its body copied and its expiry set,
        rather than as a copy (`set` copies what it is given)."""
        if ttl_s <= 0:  # (NaN goes on, to be refused as `set` refuses it)
            return True
        if not ttl_s < math.inf:  # (infinite or NaN; `_check_ttl` inline: on every miss)
            _check_ttl(ttl_s)
        entry.body = b"".join((entry.body, b""))  # (as `set`, for the same reason)
        entry.expires_at = time.time() + ttl_s
        self._keep(key, entry)
        return True

    def _keep(self, key: str, entry: CachedResponse) -> None:
        """Stores an entry that is the store's own (body and expiry as kept), unless an
        invalidation of its tags came after its request began."""
        log = self._log
        if log is not None and log.generation[0] != log.read_up_to:
            self._catch_up(log)
        if entry.created_at <= self._newest_cutoff and self._is_cut(entry):
            return
        size = len(entry.body) + len(key) + ENTRY_OVERHEAD_BYTES  # (`memory_size`, inline)
        entries = self._entries
        if key in entries:
            self._remove(key)
        if size > self.max_bytes:
            return  # would evict everything and still not fit
        used = self.bytes_used + size
        if used > self.max_bytes:  # evict from the least recently used end (`_remove` inline)
            popitem = entries.popitem
            while used > self.max_bytes:
                old_key, old = popitem(False)
                used -= len(old.body) + len(old_key) + ENTRY_OVERHEAD_BYTES  # (memory_size)
        entries[key] = entry
        self.bytes_used = used

    async def invalidate(self, *tags: str) -> int:
        _check_tags(tags)
        at = time.time()
        log = self._log
        if log is not None:
            if log.generation[0] != log.read_up_to:
                self._catch_up(log)
            log.append(tags, at)  # the other workers apply it before their next answer
        self._cut(tags, at)
        self._sweeping += 1
        try:
            return await self._drop_tagged(tags)
        finally:
            self._sweeping -= 1

    async def _drop_tagged(self, tags: tuple[str, ...]) -> int:
        wanted = set(tags)
        carries: dict[tuple[str, ...], bool] = {}  # per set of tags: does it hold every wanted
        entries = self._entries
        keys = list(entries)  # (a snapshot: the scan lets the loop run between slices)
        now, live = time.time(), 0
        for start in range(0, len(keys), INVALIDATE_SLICE):
            if start:
                await asyncio.sleep(0)
            for key in keys[start:start + INVALIDATE_SLICE]:
                entry = entries.get(key)
                if entry is None:  # (gone while the loop ran)
                    continue
                match = carries.get(entry.tags)
                if match is None:
                    match = carries[entry.tags] = wanted.issubset(entry.tags)
                if match:
                    expires_at = entry.expires_at
                    live += expires_at is None or expires_at > now  # as Redis and PostgreSQL
                    self._remove(key)
        return live

    def _remove(self, key: str) -> None:
        entry = self._entries.pop(key)
        self.bytes_used -= memory_size(key, entry)

    def _cut(self, tags: Iterable[str] | None, at: float) -> None:
        """Remembers that the entries carrying all `tags` (None: every entry) created at or
        before `at` are invalidated."""
        if tags is None:
            self._floor = max(self._floor, at)
        else:
            wanted = frozenset(tags)
            if len(self._cutoffs) >= MAX_CUTOFFS and wanted not in self._cutoffs:
                self._floor = max(self._floor, *self._cutoffs.values())
                self._cutoffs.clear()
            self._cutoffs[wanted] = max(at, self._cutoffs.get(wanted, at))
        self._newest_cutoff = max(self._newest_cutoff, at)

    def _is_cut(self, entry: CachedResponse) -> bool:
        return entry.created_at <= self._floor or _covered(entry, self._cutoffs)

    def _catch_up(self, log: InvalidationLog) -> None:
        """Applies the invalidations other workers made since the last look: remembered at
        once (lookups and writes check them), the entries they drop removed by a scan."""
        records = log.read_new()
        for tags, at in records:
            self._cut(tags, at)
        if not records:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # (no loop: the scan runs here)
            self._drop_invalidated(list(self._entries))
            return
        self._sweeping += 1
        task = loop.create_task(self._sweep())
        self._sweeps.add(task)
        task.add_done_callback(self._sweeps.discard)

    async def _sweep(self) -> None:
        try:
            keys = list(self._entries)  # (entries written meanwhile were checked then)
            for start in range(0, len(keys), INVALIDATE_SLICE):
                if start:
                    await asyncio.sleep(0)
                self._drop_invalidated(keys[start:start + INVALIDATE_SLICE])
        finally:
            self._sweeping -= 1

    def _drop_invalidated(self, keys: list[str]) -> None:
        entries, newest = self._entries, self._newest_cutoff
        for key in keys:
            entry = entries.get(key)
            if entry is not None and entry.created_at <= newest and self._is_cut(entry):
                self._remove(key)


# -- Redis ---------------------------------------------------------------------------------------

class _Script:
    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


# KEYS[1]: the entry; KEYS[2]: the invalidations (a hash: tag set -> when, in µs);
# KEYS[3..]: its tag sets. ARGV: value, ttl in ms, now in ms, when the entry's request
# began (µs), then every set of its tags that an invalidation may have named. An entry whose
# request began before an invalidation of its tags is not written (an answer from before it).
_SET = _Script("""
local ttl, now, created = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
if #ARGV > 4 then
  for _, at in ipairs(redis.call('HMGET', KEYS[2], unpack(ARGV, 5))) do
    if at and tonumber(at) >= created then return 0 end
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl)
for i = 3, #KEYS do
  redis.call('ZADD', KEYS[i], now + ttl, KEYS[1])
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', '(' .. now)
  if redis.call('PTTL', KEYS[i]) < ttl then redis.call('PEXPIRE', KEYS[i], ttl) end
end
return 1
""")

# KEYS[1]: the set being walked; KEYS[2..n+1]: the n wanted tags' sets; then one batch of
# entry keys. ARGV: n, the n wanted tags. A tag set may still name an entry that was since
# rewritten with other tags (or evicted), so each entry's own tags are read from its header
# (see CachedResponse.encode) and only an entry carrying every wanted tag is dropped.
_INVALIDATE = _Script("""
local n, dropped = tonumber(ARGV[1]), 0
for i = n + 2, #KEYS do
  local entry, carried = KEYS[i], {}
  local value = redis.call('GET', entry)
  if value and string.sub(value, 1, 4) == 'SGC1' then
    local ok, header = pcall(function()
      return cjson.decode(string.sub(value, 9, 8 + struct.unpack('>I4', value, 5)))
    end)
    if ok and type(header) == 'table' and type(header.t) == 'table' then
      for _, tag in ipairs(header.t) do carried[tag] = true end
    end
  end
  local all = value and true or false
  for t = 1, n do all = all and carried[ARGV[t + 1]] == true end
  if all then
    redis.call('DEL', entry)
    dropped = dropped + 1
  end
  redis.call('ZREM', KEYS[1], entry)
  for t = 1, n do
    if all or not carried[ARGV[t + 1]] then redis.call('ZREM', KEYS[t + 1], entry) end
  end
end
return dropped
""")
_INVALIDATE_BATCH = 500

# KEYS[1]: the invalidations. ARGV: the tag set, when (µs), how long to keep them (ms): longer
# than any request (one in flight when its tags are invalidated must not store its answer).
_RECORD = _Script("""
local old = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if tonumber(ARGV[2]) > old then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
""")
_KEEP_INVALIDATIONS_MS = 24 * 3600 * 1000


_DECODED_MAX_BYTES = 8 << 20  # the decoded-entry memo of a Redis store, all entries
_DECODED_MAX_ENTRY_BYTES = 64 << 10  # larger entries are decoded on every hit


class RedisCacheStore:
    """The hot tier, shared by every gateway process: one GET per lookup.

    Entries live at `<prefix>:e:<key>` with a PX TTL, tag sets at `<prefix>:t:<tag>`. The
    default prefix is a hash tag, so every key of the cache sits in one Redis Cluster slot
    and no script spans slots. Invalidation walks the tag set (or, for several tags, their
    intersection) in batches of 500 entries, one script call each, so Redis never blocks
    long on a large one; an entry written while it runs may survive it.
    """

    name = "redis"

    def __init__(self, url: str, *, prefix: str = "{sgcache}",
                 timeout_s: float = 0.25, retry_interval_s: float = 1.0,
                 admin_timeout_s: float = 10.0) -> None:
        if not prefix:
            raise ValueError("RedisCacheStore needs a key prefix")
        self.prefix = prefix
        self.timeout_s = timeout_s
        self._client = RespClient(url, timeout_s=timeout_s)
        require_hash_tag(self._client.endpoint, prefix, "RedisCacheStore")
        # Writes (made after the response) and invalidations (which walk many keys) get their
        # own connection and patience: they neither time out on a busy server nor queue
        # lookups behind them on the hot connection.
        self._admin = RespClient(url, timeout_s=admin_timeout_s)
        self._gate = OutageGate("the Redis cache", retry_interval_s)
        # Hot entries decoded once per process: the exact bytes Redis returned map to the
        # (immutable) entry they decode to, so a hit skips parsing and checking the header.
        # Keyed by the bytes themselves, a rewritten or re-expiring entry is a new key.
        self._decoded: dict[bytes, CachedResponse] = {}
        self._decoded_bytes = 0
        self._resends: set[asyncio.Task[Any]] = set()  # writes re-sent after NOSCRIPT
        self._invalidations_key = f"{prefix}:i"
        self._tag_sets: dict[tuple[str, ...], list[str]] = {}  # (see `_write`)
        # Invalidations this process is deleting the entries of (tags -> when made), and
        # those whose deleting failed: lookups here skip what they cover meanwhile
        # (`_cut_off`), as the other stores do. (Another instance's lookups do not see them:
        # a GET takes no more round trips; the deleting takes seconds.)
        self._sweeps: dict[frozenset[str], float] = {}

    def __repr__(self) -> str:
        return f"RedisCacheStore({self._client!r}, prefix={self.prefix!r})"

    async def startup(self) -> None:
        pass  # connects on first use: a Redis that is down must not stop the gateway

    async def shutdown(self) -> None:
        try:  # let the writes sent with set_soon land (Redis answers in order)
            await self._admin.drain()
        except (RespError, OSError):
            pass
        if self._resends:
            await asyncio.wait(list(self._resends), timeout=self.timeout_s * 4)
        await self._client.close()
        await self._admin.close()

    async def check_ready(self) -> dict[str, str]:
        try:
            self._gate.check()
            await self._client.ping()  # on a Cluster: every node, and the cluster's state
        except CacheStoreError as exc:
            return {"cache_redis": f"error: {exc}"}
        except RespError as exc:
            return {"cache_redis": f"error: the Redis cache refused PING: {exc}"}
        except OSError as exc:
            return {"cache_redis": f"error: {self._gate.trip(exc)}"}
        return {"cache_redis": "ok"}

    def entry_key(self, key: str) -> str:
        return f"{self.prefix}:e:{key}"

    def tag_key(self, tag: str) -> str:
        return f"{self.prefix}:t:{tag}"

    async def get(self, key: str) -> CachedResponse | None:
        data = await self._call("GET", self.entry_key(key))
        if data is None:
            return None
        decoded = self._decoded.get(data)
        if decoded is not None:
            return None if self._sweeps and self._cut_off(decoded) else decoded
        try:
            entry = CachedResponse.decode(data)
        except ValueError as exc:
            logger.warning("the Redis cache holds an unreadable entry at %s (%s); ignored",
                           self.entry_key(key), exc)
            return None
        if len(data) <= _DECODED_MAX_ENTRY_BYTES:
            if self._decoded_bytes + len(data) > _DECODED_MAX_BYTES:
                self._decoded.clear()
                self._decoded_bytes = 0
            self._decoded[data] = entry
            self._decoded_bytes += len(data)
        return None if self._sweeps and self._cut_off(entry) else entry

    def _cut_off(self, entry: CachedResponse) -> bool:
        """Whether an invalidation this process is deleting (`_sweeps`) covers `entry`."""
        return _covered(entry, self._sweeps)

    async def set(self, key: str, entry: CachedResponse, ttl_s: float) -> None:
        if ttl_s <= 0:
            return
        await self._run(_SET, *self._write(key, entry, ttl_s), client=self._admin)

    def _write(self, key: str, entry: CachedResponse, ttl_s: float
               ) -> tuple[list[str], list[str | bytes]]:
        """The _SET script's keys (the entry's, its tag sets') and arguments."""
        entry = _expiring(entry, ttl_s)
        tag_sets = self._tag_sets.get(entry.tags)
        if tag_sets is None:
            if len(self._tag_sets) >= 4096:  # (namespaces come from requests)
                self._tag_sets.clear()
            tag_sets = self._tag_sets[entry.tags] = _tag_sets(entry.tags)
        return ([self.entry_key(key), self._invalidations_key, *map(self.tag_key, entry.tags)],
                [entry.encode(), str(max(1, math.ceil(ttl_s * 1000))),
                 str(int(time.time() * 1000)), str(int(entry.created_at * 1e6)), *tag_sets])

    def set_soon(self, key: str, entry: CachedResponse, ttl_s: float) -> bool:
        """`set` without waiting for Redis: the write goes out with the loop's next flush
        and nobody awaits its reply (an error reply is logged; NOSCRIPT re-sends the script
        in a task). False, having done nothing, when it cannot go that way (no connection
        open yet, a Cluster or Sentinel, an outage): the caller awaits `set` then."""
        if ttl_s <= 0:
            return True
        try:
            self._gate.check()
        except CacheStoreError:
            return False
        keys, args = self._write(key, entry, ttl_s)
        payload = encode_command(("EVALSHA", _SET.sha, str(len(keys)), *keys, *args))
        return self._admin.send_unawaited([payload], self._set_failed, [(keys, args)])

    def _set_failed(self, error: Exception,
                    write: tuple[list[str], list[str | bytes]]) -> None:
        if isinstance(error, RespError) and str(error).startswith("NOSCRIPT"):
            task = asyncio.ensure_future(self._resend(*write))
            self._resends.add(task)
            task.add_done_callback(self._resends.discard)
        elif isinstance(error, OSError):
            try:
                self._gate.check()
            except CacheStoreError:
                return  # tripped already (by another write lost with the same connection)
            self._gate.trip(error)  # logs it, once per outage
        else:
            logger.debug("cache write failed: the Redis cache refused it: %s", error)

    async def _resend(self, keys: list[str], args: list[str | bytes]) -> None:
        try:
            await self._run(_SET, keys, args, client=self._admin)
        except CacheStoreError as exc:
            logger.debug("cache write failed: %s", exc)

    async def invalidate(self, *tags: str) -> int:
        _check_tags(tags)
        tags = tuple(dict.fromkeys(tags))
        # First remembered (a write of an answer from before it is refused from then on),
        # then the entries already written are dropped.
        made = time.time()
        await self._run(_RECORD, [self._invalidations_key],
                        [_tag_set(tags), str(int(made * 1e6)),
                         str(_KEEP_INVALIDATIONS_MS)], client=self._admin)
        wanted = frozenset(tags)
        if len(self._sweeps) >= 1024 and wanted not in self._sweeps:  # (bounded)
            self._sweeps.pop(next(iter(self._sweeps)))
        self._sweeps[wanted] = max(made, self._sweeps.get(wanted, made))
        dropped = await self._drop_entries(tags)
        # (all deleted: nothing left to skip; a failure above keeps skipping them here)
        if self._sweeps.get(wanted) == made:
            del self._sweeps[wanted]
        return dropped

    async def _drop_entries(self, tags: tuple[str, ...]) -> int:
        tag_keys = [self.tag_key(tag) for tag in tags]
        if len(tag_keys) == 1:
            return await self._drop_members(tag_keys[0], tags, tag_keys)
        scratch = f"{self.prefix}:x:{uuid.uuid4().hex}"
        await self._many([("ZINTERSTORE", scratch, str(len(tag_keys)), *tag_keys),
                          ("PEXPIRE", scratch, "60000")], client=self._admin)
        try:
            return await self._drop_members(scratch, tags, tag_keys)
        finally:
            await self._call("DEL", scratch, client=self._admin)

    async def _drop_members(self, source: str, tags: Sequence[str],
                            tag_keys: list[str]) -> int:
        dropped = 0
        while True:
            members = await self._call("ZRANGE", source, "0", str(_INVALIDATE_BATCH - 1),
                                       client=self._admin)
            if not members:
                return dropped
            dropped += int(await self._run(_INVALIDATE, [source, *tag_keys, *members],
                                           [str(len(tags)), *tags], client=self._admin))

    async def _run(self, script: _Script, keys: Sequence[str | bytes],
                   args: Sequence[str | bytes], *, client: RespClient | None = None) -> Any:
        command = [str(len(keys)), *keys, *args]
        try:
            return await self._call("EVALSHA", script.sha, *command, client=client)
        except CacheStoreError as exc:
            if not str(exc.__cause__).startswith("NOSCRIPT"):
                raise
            return await self._call("EVAL", script.source, *command, client=client)

    async def _call(self, *args: str | bytes, client: RespClient | None = None) -> Any:
        self._gate.check()
        try:
            return await (client or self._client).call(*args)
        except RespError as exc:
            raise CacheStoreError(f"the Redis cache refused {args[0]!s}: {exc}") from exc
        except OSError as exc:
            raise self._gate.trip(exc) from exc

    async def _many(self, commands: Sequence[Sequence[str | bytes]], *,
                    client: RespClient | None = None) -> list[Any]:
        self._gate.check()
        try:
            replies = await (client or self._client).call_many(commands)
        except OSError as exc:
            raise self._gate.trip(exc) from exc
        for reply in replies:
            if isinstance(reply, OSError):
                raise self._gate.trip(reply)
            if isinstance(reply, BaseException):
                raise CacheStoreError(f"the Redis cache refused a command: {reply}")
        return replies


def _tag_set(tags: Iterable[str]) -> str:
    """The name of a set of tags in the record of invalidations."""
    return "\n".join(sorted(set(tags)))


def _tag_sets(tags: tuple[str, ...]) -> list[str]:
    """Every set of these tags an invalidation may have named (an entry has at most three
    tags: its model, project and namespace; seven sets)."""
    unique = sorted(set(tags))
    return [_tag_set(chosen) for size in range(1, len(unique) + 1)
            for chosen in itertools.combinations(unique, size)]


# -- PostgreSQL ----------------------------------------------------------------------------------

# Numbered, append-only: a released migration is never edited, a change is a new number.
_MIGRATIONS: tuple[tuple[int, str, str], ...] = (
    (1, "exact cache entries", """
        CREATE TABLE {table} (
            key text PRIMARY KEY,
            tags text[] NOT NULL DEFAULT '{{}}',
            entry bytea NOT NULL,
            created_at timestamptz NOT NULL,
            expires_at timestamptz NOT NULL
        );
        CREATE INDEX {expires_index} ON {table} (expires_at);
        CREATE INDEX {tags_index} ON {table} USING gin (tags);
    """),
    (2, "invalidations remembered", """
        CREATE TABLE {invalidations} (
            tags text[] PRIMARY KEY,
            at timestamptz NOT NULL
        );
    """),
)
_LOCK_CLASS = 0x53474341  # "SGCA": the advisory-lock namespace of these migrations
_TABLE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,39}")  # room for the index and version suffixes
# Rows one DELETE of a purge, an invalidation or a forget takes (each a statement of its own
# under admin_timeout_s: a large one is neither one long transaction nor one long wait).
_DELETE_BATCH = 5000
_UNREACHABLE = (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout, OSError,
                TimeoutError)

Connection = psycopg.AsyncConnection[TupleRow]


def _batch(where: str, counted: str) -> str:
    """A DELETE of the first %(batch)s rows matching `where` by key after %(after)s,
    answering how many it deleted, `counted` of them, and the last key. (Walked by key, each
    batch starts where the last one ended: from the start, every batch would step again over
    the rows the ones before it deleted, which stay in the table and its indexes until
    vacuumed. A row locked by a write is skipped: replaced, it is newer than what goes.)"""
    return ("WITH gone AS (DELETE FROM {table} WHERE key = ANY(ARRAY(SELECT key FROM {table} "
            f"WHERE {where} AND key > %(after)s ORDER BY key LIMIT %(batch)s "
            "FOR UPDATE SKIP LOCKED)) RETURNING key, expires_at) "
            f"SELECT count(*), {counted}, max(key) FROM gone")


class PostgresCacheStore:
    """The warm tier: survives restarts and Redis eviction; shared by every process.

    `startup` never waits on PostgreSQL for more than `startup_wait_s`: it starts a
    background task that creates or migrates the table (in one transaction under an advisory
    lock, so processes that start together take turns), retrying with backoff, then opens a
    small psycopg pool and purges expired rows every `purge_interval_s`. Until then, and
    while PostgreSQL cannot be reached, every call raises CacheStoreError at once. Expired
    rows are never returned, purged or not.

    Lookups and writes have `timeout_s`, and one that takes longer counts as an outage.
    Invalidations and purges delete in batches of a statement each, every one with
    `admin_timeout_s`: one that takes longer fails that call only (lookups already skip the
    rows an invalidation covers; asked again, it goes on where it stopped).
    """

    name = "postgres"

    def __init__(self, dsn: str, *, table: str = "sluicegate_cache", pool_max_size: int = 4,
                 timeout_s: float = 1.0, connect_timeout_s: float = 2.0,
                 startup_wait_s: float = 2.0, purge_interval_s: float = 60.0,
                 retry_interval_s: float = 1.0, migrate_retry_max_s: float = 30.0,
                 admin_timeout_s: float = 10.0) -> None:
        if not _TABLE_NAME.fullmatch(table):
            raise ValueError(f"invalid cache table name {table!r}: lower-case letters, digits "
                             "and underscores, at most 40 characters")
        self._dsn = dsn
        self.table = table
        self.pool_max_size = pool_max_size
        self.timeout_s = timeout_s
        self.admin_timeout_s = admin_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.startup_wait_s = startup_wait_s
        self.purge_interval_s = purge_interval_s
        self.migrate_retry_max_s = migrate_retry_max_s
        self._gate = OutageGate("the PostgreSQL cache", retry_interval_s)
        self._pool: AsyncConnectionPool[Connection] | None = None
        self._maintainer: asyncio.Task[None] | None = None
        self._not_ready_reason = "not started"
        names = {"table": sql.Identifier(table),
                 "versions": sql.Identifier(table + "_schema_version"),
                 "invalidations": sql.Identifier(table + "_invalidations")}
        # An entry whose request began before an invalidation of its tags is neither written
        # nor read (a write whose statement began before the invalidation committed can still
        # land after its DELETE: the read keeps it out).
        self._sql = {name: sql.SQL(text).format(**names) for name, text in {
            "get": "SELECT entry FROM {table} WHERE key = %s AND expires_at > to_timestamp(%s) "
                   "AND NOT EXISTS (SELECT 1 FROM {invalidations} i WHERE "
                   "i.tags <@ {table}.tags AND i.at >= {table}.created_at)",
            "set": "INSERT INTO {table} (key, tags, entry, created_at, expires_at) "
                   "SELECT %s, %s, %s, to_timestamp(%s), to_timestamp(%s) "
                   "WHERE NOT EXISTS (SELECT 1 FROM {invalidations} WHERE tags <@ %s::text[] "
                   "AND at >= to_timestamp(%s)) "
                   "ON CONFLICT (key) DO UPDATE SET tags = EXCLUDED.tags, "
                   "entry = EXCLUDED.entry, created_at = EXCLUDED.created_at, "
                   "expires_at = EXCLUDED.expires_at",
            "record": "INSERT INTO {invalidations} (tags, at) VALUES (%s, to_timestamp(%s)) "
                      "ON CONFLICT (tags) DO UPDATE SET at = greatest({invalidations}.at, "
                      "EXCLUDED.at)",
            # Kept a day, longer than any request; the entries one covers go first.
            "forgotten": "SELECT tags, at FROM {invalidations} "
                         "WHERE at < now() - interval '1 day'",
            "forget": "DELETE FROM {invalidations} WHERE tags = %s AND at = %s",
            # The batches of `_delete_batches`.
            "forget_batch": _batch("tags @> %(tags)s AND created_at <= %(at)s", "count(*)"),
            "invalidate_batch": _batch("tags @> %(tags)s", "count(*) FILTER "
                                       "(WHERE expires_at > to_timestamp(%(now)s))"),
            "purge": "DELETE FROM {table} WHERE ctid = ANY(ARRAY(SELECT ctid FROM {table} "
                     "WHERE expires_at <= now() LIMIT %s FOR UPDATE SKIP LOCKED))",
            "versions": "CREATE TABLE IF NOT EXISTS {versions} (version integer PRIMARY KEY, "
                        "description text NOT NULL, "
                        "applied_at timestamptz NOT NULL DEFAULT now())",
            "applied": "SELECT version FROM {versions}",
            "version": "INSERT INTO {versions} (version, description) VALUES (%s, %s)",
        }.items()}

    def __repr__(self) -> str:  # the DSN may hold a password
        return f"PostgresCacheStore(table={self.table!r})"

    # -- lifecycle ---------------------------------------------------------------------------

    async def startup(self) -> None:
        if self._maintainer is not None:
            return
        first_attempt = asyncio.Event()
        self._maintainer = asyncio.get_running_loop().create_task(
            self._maintain(first_attempt), name=f"sluicegate-cache-{self.table}")
        try:
            async with asyncio.timeout(self.startup_wait_s):
                await first_attempt.wait()
        except TimeoutError:
            logger.warning("the PostgreSQL cache is still connecting; it misses until ready")

    async def shutdown(self) -> None:
        task, self._maintainer = self._maintainer, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close(timeout=self.timeout_s)
        self._not_ready_reason = "shut down"

    async def check_ready(self) -> dict[str, str]:
        try:
            async with self._connection() as conn:
                await conn.execute("SELECT 1")
        except CacheStoreError as exc:
            return {"cache_postgres": f"error: {exc}"}
        return {"cache_postgres": "ok"}

    async def _maintain(self, first_attempt: asyncio.Event) -> None:
        delay = 0.5
        while True:
            try:
                await self._migrate()
                break
            except (psycopg.Error, OSError, TimeoutError) as exc:
                self._not_ready_reason = _describe(exc)
                logger.warning("the PostgreSQL cache cannot prepare table %s (%s); retrying "
                               "in %.1fs", self.table, self._not_ready_reason, delay)
            first_attempt.set()
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.migrate_retry_max_s)
        pool: AsyncConnectionPool[Connection] = AsyncConnectionPool(
            self._dsn, min_size=1, max_size=self.pool_max_size, open=False,
            name=f"sluicegate-cache-{self.table}", reconnect_timeout=5.0,
            kwargs={"autocommit": True, "application_name": "sluicegate-cache",
                    "connect_timeout": max(2, int(self.connect_timeout_s))})
        await pool.open(wait=False)
        self._pool = pool
        first_attempt.set()
        while True:
            await asyncio.sleep(self.purge_interval_s)
            try:
                await self.purge_expired()
                await self._forget()
            except CacheStoreError as exc:
                logger.warning("the PostgreSQL cache could not purge expired rows (%s)", exc)

    async def _migrate(self) -> None:
        """Applies the missing migrations in one transaction, on a connection of its own."""
        async with asyncio.timeout(self.connect_timeout_s + 10.0):  # may wait for the lock
            conn = await psycopg.AsyncConnection.connect(
                self._dsn, autocommit=True, application_name="sluicegate-cache",
                connect_timeout=max(2, int(self.connect_timeout_s)))
            async with conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(%s::int, hashtext(%s))",
                                   (_LOCK_CLASS, self.table))
                await conn.execute(self._sql["versions"])
                cur = await conn.execute(self._sql["applied"])
                applied = {row[0] for row in await cur.fetchall()}
                for version, description, statements in _MIGRATIONS:
                    if version not in applied:
                        await conn.execute(sql.SQL(statements).format(
                            table=sql.Identifier(self.table),
                            expires_index=sql.Identifier(self.table + "_expires_at"),
                            tags_index=sql.Identifier(self.table + "_tags"),
                            invalidations=sql.Identifier(self.table + "_invalidations")))
                        await conn.execute(self._sql["version"], (version, description))
                        logger.info("cache store: applied migration %d (%s) to table %s",
                                    version, description, self.table)

    # -- entries -----------------------------------------------------------------------------

    @asynccontextmanager
    async def _connection(self, *, admin: bool = False) -> AsyncIterator[Connection]:
        """A pooled connection, its use bounded by `timeout_s`, or `admin_timeout_s` for an
        admin statement (a batch of a purge or an invalidation): that one taking longer is
        no outage, and does not make lookups miss."""
        pool = self._pool
        if pool is None:
            raise CacheStoreError(f"the PostgreSQL cache is not ready ({self._not_ready_reason})")
        self._gate.check()
        try:
            async with asyncio.timeout(self.admin_timeout_s if admin else self.timeout_s):
                async with pool.connection(timeout=self.timeout_s) as conn:
                    yield conn
        except TimeoutError as exc:
            if admin:
                raise CacheStoreError(f"the PostgreSQL cache did not finish a statement in "
                                      f"admin_timeout_s ({self.admin_timeout_s:g}s)") from exc
            raise self._gate.trip(exc) from exc
        except _UNREACHABLE as exc:
            raise self._gate.trip(exc) from exc
        except psycopg.Error as exc:
            raise CacheStoreError(f"the PostgreSQL cache failed: {_describe(exc)}") from exc

    async def get(self, key: str) -> CachedResponse | None:
        async with self._connection() as conn:
            cur = await conn.execute(self._sql["get"], (key, time.time()))
            row = await cur.fetchone()
        if row is None:
            return None
        try:
            return CachedResponse.decode(row[0])
        except ValueError as exc:
            logger.warning("the PostgreSQL cache holds an unreadable entry %s (%s); ignored",
                           key, exc)
            return None

    async def set(self, key: str, entry: CachedResponse, ttl_s: float) -> None:
        if ttl_s <= 0:
            return
        entry = _expiring(entry, ttl_s)
        async with self._connection() as conn:
            await conn.execute(self._sql["set"], (key, list(entry.tags), entry.encode(),
                                                  entry.created_at, entry.expires_at,
                                                  list(entry.tags), entry.created_at))

    async def invalidate(self, *tags: str) -> int:
        _check_tags(tags)
        async with self._connection(admin=True) as conn:
            # Remembered first (committed: writes from before it are refused, lookups skip
            # what it covers), then dropped.
            await conn.execute(self._sql["record"], (sorted(set(tags)), time.time()))
        return await self._delete_batches("invalidate_batch",
                                          {"tags": list(tags), "now": time.time()})

    async def purge_expired(self) -> int:
        """Deletes expired rows in batches (several processes may purge at once); how many."""
        purged = 0
        while True:
            async with self._connection(admin=True) as conn:
                cur = await conn.execute(self._sql["purge"], (_DELETE_BATCH,))
            purged += cur.rowcount
            if cur.rowcount < _DELETE_BATCH:
                return purged

    async def _forget(self) -> None:
        """Forgets the invalidations older than a day, each once the rows it covers are
        deleted (forgotten first, they would be read again)."""
        async with self._connection(admin=True) as conn:
            cur = await conn.execute(self._sql["forgotten"])
            old = await cur.fetchall()
        for tags, at in old:
            await self._delete_batches("forget_batch", {"tags": tags, "at": at})
            async with self._connection(admin=True) as conn:
                await conn.execute(self._sql["forget"], (tags, at))

    async def _delete_batches(self, statement: str, params: dict[str, Any]) -> int:
        """Runs a batch DELETE (`_batch`) until one deletes less than a batch; the rows it
        counted."""
        counted, after = 0, ""
        while True:
            async with self._connection(admin=True) as conn:
                cur = await conn.execute(self._sql[statement],
                                         {**params, "after": after, "batch": _DELETE_BATCH})
                row = await cur.fetchone()
            assert row is not None  # (an aggregate's one row)
            deleted, batch_counted, after = row
            counted += int(batch_counted)
            if int(deleted) < _DELETE_BATCH:
                return counted


# -- tiers ---------------------------------------------------------------------------------------

class TieredCacheStore:
    """A hot store in front of a warm one (Redis in front of PostgreSQL).

    Reads try hot, then warm; a warm hit is copied to hot with its remaining TTL, after the
    read returned. Writes go to both. A failing tier is a miss for that tier; only when both
    fail does a read or write raise. Invalidation must reach both, so it raises if either
    failed (after trying both).

    A promotion must not bring back what an invalidation dropped: invalidation first waits
    for the promotions in flight, and a read that overlapped an invalidation promotes
    nothing. (This holds within one process; another process's promotion can still land
    in the few milliseconds between its warm read and its hot write.)
    """

    name = "tiered"

    def __init__(self, hot: CacheStore, warm: CacheStore) -> None:
        self.hot = hot
        self.warm = warm
        self._promotions: set[asyncio.Task[None]] = set()
        self._invalidations = 0  # how many began: a read that saw this change promotes nothing

    async def startup(self) -> None:
        await self.hot.startup()
        await self.warm.startup()

    async def shutdown(self) -> None:
        if self._promotions:
            await asyncio.wait(self._promotions)
        await self.warm.shutdown()
        await self.hot.shutdown()

    async def check_ready(self) -> dict[str, str]:
        return {**await self.hot.check_ready(), **await self.warm.check_ready()}

    async def get(self, key: str) -> CachedResponse | None:
        invalidations = self._invalidations
        hot_failure: CacheStoreError | None = None
        try:
            entry = await self.hot.get(key)
        except CacheStoreError as exc:
            entry, hot_failure = None, exc
        if entry is not None:
            return entry
        try:
            entry = await self.warm.get(key)
        except CacheStoreError as exc:
            if hot_failure is not None:
                raise CacheStoreError(f"both cache tiers failed: {hot_failure}; {exc}") from exc
            return None
        if entry is not None and entry.expires_at is not None and hot_failure is None:
            self._promote_soon(key, entry, entry.expires_at - time.time(), invalidations)
        return entry

    def _promote_soon(self, key: str, entry: CachedResponse, ttl_s: float,
                      invalidations: int) -> None:
        if ttl_s <= 0 or invalidations != self._invalidations:
            return
        task = asyncio.get_running_loop().create_task(
            self._promote(key, entry, ttl_s))
        self._promotions.add(task)
        task.add_done_callback(self._promotions.discard)

    async def _promote(self, key: str, entry: CachedResponse, ttl_s: float) -> None:
        try:
            await self.hot.set(key, entry, ttl_s)
        except CacheStoreError as exc:
            logger.debug("could not promote a cache entry to %s: %s", self.hot.name, exc)

    async def set(self, key: str, entry: CachedResponse, ttl_s: float) -> None:
        failures = await _each(self.hot.set(key, entry, ttl_s), self.warm.set(key, entry, ttl_s))
        if len(failures) == 2:
            raise CacheStoreError(f"both cache tiers failed: {failures[0]}; {failures[1]}")

    async def invalidate(self, *tags: str) -> int:
        _check_tags(tags)
        self._invalidations += 1
        if self._promotions:
            await asyncio.wait(self._promotions)
        counts: list[int] = []

        async def counting(operation: Awaitable[int]) -> None:
            counts.append(await operation)

        failures = await _each(counting(self.hot.invalidate(*tags)),
                               counting(self.warm.invalidate(*tags)))
        if failures:
            raise CacheStoreError("invalidation did not reach every cache tier: "
                                  + "; ".join(str(failure) for failure in failures))
        return max(counts)


async def _each(*operations: Awaitable[None]) -> list[CacheStoreError]:
    """Runs the operations concurrently; the CacheStoreErrors they raised (others propagate)."""
    results = await asyncio.gather(*operations, return_exceptions=True)
    failures = []
    for result in results:
        if isinstance(result, CacheStoreError):
            failures.append(result)
        elif isinstance(result, BaseException):
            raise result
    return failures

