"""The shared quota store: the same buckets, leases and counters as the memory store, in Redis.

`admit` and `settle` are one Lua script call each (one round trip, atomic), run with EVALSHA
and sent in full with EVAL when the server has lost its script cache (SCRIPT FLUSH, restart,
failover). Every key a script touches arrives in KEYS, but for the keys beside each budget
counter (`<counter>:held`, the reservations in it; `<counter>:until`, when each lapses;
`<counter>:settled`, the settles that found it lost, which its seed adds;
`<counter>:resettled`, the reservations settled again after a settle's reply never came,
`resettle`), and all share the
prefix's hash tag (`{sluicegate}`), so a call never spans Redis Cluster slots. The time is
Redis's own (TIME, read once per script call): every gateway sharing the store reads one
clock, so buckets refill, leases expire and reservations lapse alike whatever the gateways'
hosts' clocks say (a gateway whose clock ran ahead refilled the buckets by its lead, and
expired the others' live leases). Redis 5 and later replicate a script's effects, not the
script, so a replica or the AOF stores the values the script wrote. A store given a `clock`
passes its readings instead (tests that move time). The arithmetic is the memory store's,
step for step. Floats cross the Lua boundary exactly: to Lua as Python's shortest repr or,
for a given clock, as a hexadecimal float (`float.hex()`, a tenth of the cost of a repr;
Lua's `tonumber` reads it with C's strtod), and back as "%.17g" strings.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from string import Formatter
from typing import Any

import orjson

from gateway.policy import BUDGET, CONCURRENT, Check, Decision, QuotaStoreError
from gateway.resp import (
    RespClient,
    RespError,
    encode_command,
    parse_redis_url,
    require_hash_tag,
)
from middleware.quota.store_memory import BUCKET_TTL_MAX_S, BUDGET_SLACK_S, validate

logger = logging.getLogger("sluicegate.quota")

# One request's settle: (its id, its checks, the actual amounts, one a check).
Settle = tuple[str, Sequence[Check], Sequence[int]]

# ARGV[1], split on spaces: now (SERVER_TIME: Redis's TIME), request_id, budget_slack_s, then
# per check: kind, limit, amount, param, [actual]
# where param is window_s (requests, tokens), lease_s (concurrent) or expires_at (budget).
SERVER_TIME = "t"
_PRELUDE = """
-- All arguments arrive as one space-separated string: one RESP argument to encode and
-- send instead of twenty, and splitting it is Redis's work, not the gateway's.
local A, now, request_id, slack
local server_now
local hold_s = 0  -- (how long a budget reservation is held: the scripts that hold set it)
local function read_args(text)
  A = {}
  for word in string.gmatch(text, '%S+') do A[#A + 1] = word end
  request_id, slack = A[2], tonumber(A[3])
  if A[1] ~= '{server_time}' then
    now = tonumber(A[1])
  else
    if server_now == nil then  -- (one reading for every request a call settles)
      local time = redis.call('TIME')
      server_now = tonumber(time[1]) + tonumber(time[2]) / 1000000
    end
    now = server_now
  end
end
read_args(ARGV[1])

local function fmt(x) return string.format('%.17g', x) end
local BUCKET_TTL_MAX_S = {bucket_ttl_max_s}

-- The bucket's level now, and the time it was last stored (nil for a new bucket), which
-- store_bucket takes back: the script reads the hash once.
local function bucket_level(key, limit, window)
  local state = redis.call('HMGET', key, 'tokens', 'updated')
  if not state[1] then return limit, nil end
  local updated = tonumber(state[2])
  local elapsed = math.max(0, now - updated)
  return math.min(limit, tonumber(state[1]) + elapsed * (limit / window)), updated
end

local function store_bucket(key, limit, window, level, previous)
  -- (at most BUCKET_TTL_MAX_S: a debt that takes longer to pay off would overflow PEXPIRE's
  -- milliseconds, which deletes the key)
  local ttl = math.min(math.max(2 * window, (limit - level) / (limit / window) + window),
                       BUCKET_TTL_MAX_S)
  -- Never move a bucket's time back: a gateway whose clock is behind would otherwise make
  -- the next one refill the skew again on every switch between them.
  local at = now
  if previous and previous > now then at = previous end
  redis.call('HSET', key, 'tokens', fmt(level), 'updated', fmt(at))
  redis.call('PEXPIRE', key, string.format('%d', math.ceil(ttl * 1000)))
end

-- What a budget counter holds: its committed amount (a string, INCRBY), and beside it,
-- `<counter>:held`, the reservations in that amount (request id -> amount; none for an
-- amount of 0), so a settle knows whether the one it replaces is there, and how much it
-- is (see the settle script), and `<counter>:until`, when each lapses (a sorted set: request
-- id by time). Both are kept as long as the counter: their entries go with their settles,
-- or lapse (`take_back_lapsed`). The settles that find a counter lost are kept a day past
-- the last (see the settle script).
local HELD_TTL_MS = 86400000
local LAPSED_MAX = 16  -- reservations taken back per counter and call, at most

-- Holds `amount` (a string) more of budget counter `key` for `id`, which the counter has
-- just added (an admission's reservation, or more of it: `_TOP_UP`), until now + hold_s.
local function hold(key, id, amount, expires_at)
  redis.call('HINCRBY', key .. ':held', id, amount)
  redis.call('ZADD', key .. ':until', fmt(now + hold_s), id)
  if expires_at > 0 then
    local at_ms = string.format('%d', math.ceil((expires_at + slack) * 1000))
    redis.call('PEXPIREAT', key .. ':held', at_ms)
    redis.call('PEXPIREAT', key .. ':until', at_ms)
  end
end

-- Takes back from budget counter `key` (its value `value`) the reservations whose settle
-- never came by their lapse (their gateway died mid-request), the earliest first, at most
-- LAPSED_MAX; returns the counter's value after. A late settle of one adds its actual amount.
local function take_back_lapsed(key, value)
  local ids = redis.call('ZRANGEBYSCORE', key .. ':until', '-inf', fmt(now), 'LIMIT', 0,
                         LAPSED_MAX)
  if #ids == 0 then return value end
  local amounts = redis.call('HMGET', key .. ':held', unpack(ids))
  local freed = 0
  for i = 1, #ids do freed = freed + (tonumber(amounts[i]) or 0) end
  redis.call('HDEL', key .. ':held', unpack(ids))
  redis.call('ZREM', key .. ':until', unpack(ids))
  if freed == 0 then return value end
  return redis.call('INCRBY', key, string.format('%d', -freed))
end

local function counter(key, expires_at)
  local value = redis.call('GET', key)
  if not value or (expires_at > 0 and now >= expires_at + slack) then return nil end
  return tonumber(value)
end

local function lease_score(key, index)
  local found = redis.call('ZRANGE', key, index, index, 'WITHSCORES')
  return tonumber(found[2])
end
""".replace("{bucket_ttl_max_s}", str(BUCKET_TTL_MAX_S)).replace("{server_time}", SERVER_TIME)

# Returns one string (one reply to parse), a JSON array (one orjson call reads every number):
# [1, remaining_1, reset_1, remaining_2, reset_2, ...] when admitted; [0, failed, retry_after
# or null] when refused; [2, i, j, ...] when budgets are unseeded. Indices are 0-based.
# Every check is judged before anything is reserved. After the checks' words, one more: how
# long a budget reservation is held (`_hold_word`). A budget short of room takes back its
# lapsed reservations first.
_ADMIT = _PRELUDE + """
hold_s = tonumber(A[4 + #KEYS * 4])
local levels, updated, unseeded = {}, {}, {}
-- The first check that fails (named in the refusal), and the longest wait of all that fail
-- (false once one of them never passes by waiting), as the memory store's _refusal.
local failed, retry = nil, 0
for i = 1, #KEYS do
  local a = 4 + (i - 1) * 4
  local key, kind = KEYS[i], A[a]
  local limit, amount, param = tonumber(A[a + 1]), tonumber(A[a + 2]), tonumber(A[a + 3])
  local passes, wait = false, false
  if kind == 'budget' then
    local value = counter(key, param)
    if limit <= 0 then
      passes = false
    elseif value == nil then
      passes = true
      unseeded[#unseeded + 1] = i - 1
    else
      passes = value + amount <= limit
      if not passes then passes = take_back_lapsed(key, value) + amount <= limit end
    end
  elseif kind == 'concurrent' then
    redis.call('ZREMRANGEBYSCORE', key, '-inf', fmt(now))
    local count = redis.call('ZCARD', key)
    passes = count < limit
    if limit > 0 then wait = 0 end  -- (a slot frees when any request ends: see _judge)
  elseif limit > 0 and amount <= limit then
    levels[i], updated[i] = bucket_level(key, limit, param)
    passes = levels[i] >= amount
    wait = (amount - levels[i]) / (limit / param)
  end
  if not passes then
    if failed == nil then failed = i - 1 end
    if not wait then retry = false elseif retry and wait > retry then retry = wait end
  end
end
if #unseeded > 0 then return '[2,' .. table.concat(unseeded, ',') .. ']' end
if failed ~= nil then return '[0,' .. failed .. ',' .. (retry and fmt(retry) or 'null') .. ']' end

local out = {'1'}
for i = 1, #KEYS do
  local a = 4 + (i - 1) * 4
  local key, kind = KEYS[i], A[a]
  local limit, amount, param = tonumber(A[a + 1]), tonumber(A[a + 2]), tonumber(A[a + 3])
  if kind == 'budget' then
    local value = redis.call('INCRBY', key, A[a + 2])
    if amount ~= 0 then hold(key, request_id, A[a + 2], param) end
    out[#out + 1] = string.format('%d', math.max(limit - value, 0))
    out[#out + 1] = fmt(param > 0 and math.max(param - now, 0) or 0)
  elseif kind == 'concurrent' then
    redis.call('ZADD', key, fmt(now + param), request_id)
    local count = redis.call('ZCARD', key)
    local latest = lease_score(key, -1)
    redis.call('PEXPIRE', key, string.format('%d', math.ceil((latest - now) * 1000)))
    out[#out + 1] = string.format('%d', math.max(limit - count, 0))
    out[#out + 1] = fmt(latest - now)
  else
    local level = levels[i] - amount
    store_bucket(key, limit, param, level, updated[i])
    out[#out + 1] = string.format('%d', math.max(math.floor(level), 0))
    out[#out + 1] = fmt((limit - level) / (limit / param))
  end
end
return '[' .. table.concat(out, ',') .. ']'
"""

# Settles one request per ARGV string (each as the prelude reads ARGV[1], with five words per
# check: the fifth is the actual amount), its keys in KEYS in the same order, one request's
# after another's: the quota layer settles what one event-loop step finished in one call.
# Each request is settled on its own (pcall): one that fails leaves the others settled, and
# the error reply names how many failed and the first error. Returns 0.
_SETTLE = _PRELUDE + """
local function settle(first, count)
  for i = 1, count do
    local a = 4 + (i - 1) * 5
    local key, kind = KEYS[first + i], A[a]
    local limit, amount, param = tonumber(A[a + 1]), tonumber(A[a + 2]), tonumber(A[a + 3])
    local actual = tonumber(A[a + 4])
    if kind == 'budget' then
      -- The reservation (what the counter holds for the request: its admission's, and
      -- what a stream took on top, `_TOP_UP`) becomes the actual amount, if the counter
      -- holds it: it does not when it lapsed (`take_back_lapsed`), or when Redis lost the
      -- counter after the admit and another gateway seeded it again (from the ledger and
      -- its own requests in flight); then the actual amount is added.
      if counter(key, param) ~= nil then
        local held = redis.call('HGET', key .. ':held', request_id)
        if held then
          redis.call('HDEL', key .. ':held', request_id)
          redis.call('ZREM', key .. ':until', request_id)
          actual = actual - tonumber(held)
        elseif redis.call('HDEL', key .. ':resettled', request_id) == 1 then
          actual = 0  -- settled again before this came (`_RESETTLE`): counted once
        end
        redis.call('INCRBY', key, string.format('%d', actual))
      elseif actual > 0 and (param <= 0 or now < param + slack) then
        -- Redis lost the counter, and it is not seeded again yet: the amount waits beside
        -- it for the seed, which adds it unless the ledger has it by then.
        redis.call('HSET', key .. ':settled', request_id, string.format('%d', actual))
        redis.call('PEXPIRE', key .. ':settled', HELD_TTL_MS)
      end
    elseif kind == 'concurrent' then
      redis.call('ZREM', key, request_id)
    elseif limit > 0 then
      local level, previous = bucket_level(key, limit, param)
      store_bucket(key, limit, param, math.min(limit, level + (amount - actual)), previous)
    end
  end
end

local first, failed, problem = 0, 0, nil
for j = 1, #ARGV do
  if j > 1 then read_args(ARGV[j]) end
  local count = (#A - 3) / 5
  if count ~= math.floor(count) or first + count > #KEYS then
    return redis.error_reply('ERR settle: ARGV ' .. j .. ' does not match KEYS')
  end
  local ok, err = pcall(settle, first, count)
  if not ok then
    failed = failed + 1
    problem = problem or (type(err) == 'table' and err.err or tostring(err))
  end
  first = first + count
end
if first ~= #KEYS then return redis.error_reply('ERR settle: KEYS left over') end
if failed > 0 then
  return redis.error_reply('ERR ' .. failed .. ' of ' .. #ARGV .. ' settles failed: ' .. problem)
end
return 0
"""

# One budget check (amount = the committed value to seed), then the reservations in flight
# to add and hold: their number, then request id and amount of each; then how long they are
# held (`_hold_word`); then how many of the lost counter's settles (`<counter>:settled`) the
# caller read (-1: unchecked), and the request ids of those the committed value counts.
# Returns 1 if it set the counter; 0 if it was set, or if the lost counter has settles the
# caller did not read (read them again).
_SEED = _PRELUDE + """
local value, expires_at = tonumber(A[6]), tonumber(A[7])
if counter(KEYS[1], expires_at) ~= nil then return 0 end
local held, settled = KEYS[1] .. ':held', KEYS[1] .. ':settled'
local in_flight = tonumber(A[8] or '0')
local after = 9 + 2 * in_flight
hold_s = tonumber(A[after] or '0')
local read, counted = tonumber(A[after + 1] or '-1'), {}
if read >= 0 and redis.call('HLEN', settled) ~= read then return 0 end
for i = after + 2, #A do counted[A[i]] = true end
local amounts = redis.call('HGETALL', settled)
for i = 1, #amounts, 2 do
  if not counted[amounts[i]] then value = value + tonumber(amounts[i + 1]) end
end
-- (what the lost counter held, if any of it is left)
redis.call('DEL', held, KEYS[1] .. ':until', settled)
for i = 9, after - 1, 2 do
  value = value + tonumber(A[i + 1])
  hold(KEYS[1], A[i], A[i + 1], expires_at)
end
value = string.format('%d', value)
if expires_at > 0 then
  local at_ms = string.format('%d', math.ceil((expires_at + slack) * 1000))
  redis.call('SET', KEYS[1], value, 'PXAT', at_ms)
else
  redis.call('SET', KEYS[1], value)
end
return 1
"""


class _Script:
    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


# Extends concurrency leases still held to lease_s from now (one released, or past its
# expiry though the admit script has not removed it yet, stays gone, as in the memory store),
# one request per ARGV string (read as the admit script reads ARGV[1], its concurrent checks
# only), its keys in KEYS in the same order. Returns 0.
_RENEW = _PRELUDE + """
local first = 0
for j = 1, #ARGV do
  if j > 1 then read_args(ARGV[j]) end
  local count = (#A - 3) / 4
  for i = 1, count do
    local key, a = KEYS[first + i], 4 + (i - 1) * 4
    if A[a] == 'budget' then
      -- (a reservation still held, lapsed or not: its request runs; one taken back stays so)
      redis.call('ZADD', key .. ':until', 'XX', fmt(now + tonumber(A[a + 3])), request_id)
    else
      local held = redis.call('ZSCORE', key, request_id)
      if held and tonumber(held) > now then
        redis.call('ZADD', key, fmt(now + tonumber(A[a + 3])), request_id)
        local latest = lease_score(key, -1)
        redis.call('PEXPIRE', key, string.format('%d', math.ceil((latest - now) * 1000)))
      end
    end
  end
  first = first + count
end
return 0
"""

# Settles a request again whose settle (or admit) failed, perhaps after it ran (a reply that
# never came): only what is still there is settled, so one that ran is not counted twice. A
# budget reservation the counter still holds (`<counter>:held`) is replaced by the actual
# amount; a concurrency lease is released; a rate limit's bucket is left alone (a refund
# sent twice would give its tokens back twice; the bucket refills). A reservation it settles
# leaves a mark (`<counter>:resettled`, a day), so the first settle, should it come after all
# (held back on its way), adds nothing. The settle script's arguments, one request per
# call. Returns 0.
_RESETTLE = _PRELUDE + """
for i = 1, #KEYS do
  local a = 4 + (i - 1) * 5
  local key, kind = KEYS[i], A[a]
  if kind == 'budget' then
    local held = redis.call('HGET', key .. ':held', request_id)
    if held and counter(key, tonumber(A[a + 3])) ~= nil then
      redis.call('HDEL', key .. ':held', request_id)
      redis.call('ZREM', key .. ':until', request_id)
      redis.call('INCRBY', key, string.format('%d', tonumber(A[a + 4]) - tonumber(held)))
      redis.call('HSET', key .. ':resettled', request_id, '1')
      redis.call('PEXPIRE', key .. ':resettled', HELD_TTL_MS)
    end
  elseif kind == 'concurrent' then
    redis.call('ZREM', key, request_id)
  end
end
return 0
"""

ADMIT, SETTLE, SEED, RENEW = _Script(_ADMIT), _Script(_SETTLE), _Script(_SEED), _Script(_RENEW)
RESETTLE = _Script(_RESETTLE)
_SETTLE_SHA = SETTLE.sha.encode()
# Settles per call of the settle script: about 13 us of Redis each, so a burst of finished
# requests holds Redis (and every other gateway's admissions) for at most ~0.4 ms at a time.
SETTLE_BATCH_MAX = 32
# Requests per call of the renew script: a few microseconds of Redis each.
RENEW_BATCH_MAX = 128

# Adds to budget counters that are there (checks as the admit script reads them, the amount
# to add as a check's amount): spend the quota layer's in-process fallback took while Redis
# was unreachable. A counter that is not there is left to its seed from the ledger, which has
# that spend. Returns a JSON array of 1 (added) or 0, one per key.
_ADD = _PRELUDE + """
local out = {}
for i = 1, #KEYS do
  local a = 4 + (i - 1) * 4
  out[i] = '0'
  if A[a] == 'budget' and counter(KEYS[i], tonumber(A[a + 3])) ~= nil then
    redis.call('INCRBY', KEYS[i], A[a + 2])
    out[i] = '1'
  end
end
return '[' .. table.concat(out, ',') .. ']'
"""
ADD = _Script(_ADD)

# More of a reservation, for a stream past it (budget checks as the admit script reads them,
# their amount the most to add, the same in each; then `_hold_word`): as much as every counter
# has room for under its limit, a budget short of room taking back its lapsed reservations
# first, added and held for the request (its settle replaces it all), which renews the
# hold's lapse. Returns what it added: 0 when a counter has no room left, or is not there.
_TOP_UP = _PRELUDE + """
hold_s = tonumber(A[4 + #KEYS * 4])
local grant = tonumber(A[6])
for i = 1, #KEYS do
  local a = 4 + (i - 1) * 4
  local key, limit = KEYS[i], tonumber(A[a + 1])
  local value = counter(key, tonumber(A[a + 3]))
  if value == nil then return 0 end
  if value + grant > limit then value = take_back_lapsed(key, value) end
  grant = math.min(grant, limit - value)
  if grant <= 0 then return 0 end
end
local added = string.format('%d', grant)
for i = 1, #KEYS do
  redis.call('INCRBY', KEYS[i], added)
  hold(KEYS[i], request_id, added, tonumber(A[4 + (i - 1) * 4 + 3]))
end
return grant
"""
TOP_UP = _Script(_TOP_UP)

# What each budget counter has spent: its committed amount less the reservations it holds
# (checks as the admit script reads them). Returns a JSON array, null for a counter that is
# not there.
_SPENT = _PRELUDE + """
local out = {}
for i = 1, #KEYS do
  local a = 4 + (i - 1) * 4
  local value = counter(KEYS[i], tonumber(A[a + 3]))
  out[i] = 'null'
  if value ~= nil then
    for _, held in ipairs(redis.call('HVALS', KEYS[i] .. ':held')) do
      value = value - tonumber(held)
    end
    out[i] = string.format('%d', value)
  end
end
return '[' .. table.concat(out, ',') .. ']'
"""
SPENT = _Script(_SPENT)


class RedisQuotaStore:
    """Quota state in Redis, shared by every gateway process: one round trip per admission.

    Any connection error, timeout or error reply becomes `QuotaStoreError`; commands are not
    retried (a script that timed out may have run), and a connection the server dropped is
    replaced on the next call. The scripts read the Redis server's clock (one for every
    gateway); `clock`, when given, gives them epoch seconds instead, and should follow real
    time: key expiry (garbage collection only) runs on the server's clock.
    """

    name = "redis"

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", *, prefix: str = "{sluicegate}",
                 socket_timeout_s: float = 0.5, clock: Callable[[], float] | None = None,
                 budget_slack_s: float = BUDGET_SLACK_S) -> None:
        self.url = url
        self.prefix = prefix
        self.socket_timeout_s = socket_timeout_s
        self.clock = clock
        self.budget_slack_s = budget_slack_s
        require_hash_tag(parse_redis_url(url), prefix, "RedisQuotaStore")  # at config time
        self._client: RespClient | None = None
        self._pending: set[asyncio.Future[Any]] = set()  # settles in flight
        self._heads: dict[tuple[str, tuple[str, ...]], bytes] = {}  # see _payload
        self._slack = repr(float(budget_slack_s))
        # Told of settles that may not have run (a connection lost or timed out, an error
        # reply): the quota layer releases their concurrency leases once Redis answers.
        self.on_unsettled: Callable[[Sequence[Settle]], None] | None = None

    def __repr__(self) -> str:  # the URL may hold a password
        return f"RedisQuotaStore(prefix={self.prefix!r})"

    async def startup(self) -> None:
        # No I/O: the gateway starts, and limits follow their store-error policy, while
        # Redis is down. The connection opens on first use.
        self._client = RespClient(self.url, timeout_s=self.socket_timeout_s)

    async def shutdown(self) -> None:
        if self._client is not None:  # let the unawaited settles land: Redis answers in order
            with contextlib.suppress(RespError, OSError, ValueError):
                await self._client.drain()
        if self._pending:  # settles that went through a task (also NOSCRIPT's re-sends)
            await asyncio.wait(list(self._pending), timeout=self.socket_timeout_s * 2)
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    async def ping(self) -> bool:
        """True when Redis answers within the socket timeout (on a Cluster: every node
        serving slots, with the cluster's state ok)."""
        if self._client is None:
            return False
        try:
            await self._client.ping()
        except (RespError, OSError, ValueError):
            return False
        return True

    async def admit(self, request_id: str, checks: Sequence[Check]) -> Decision:
        wire = self.wire(checks) if checks else None
        if wire is None:
            validate(checks)
            if not checks:
                return Decision(allowed=True)
            reply = await self._run(ADMIT, request_id, checks,
                                    [*map(_args, checks), _hold_word(checks)])
        else:
            client = self._client
            if client is not None and not client.routed:
                payload = wire.admit_payload(self.argv_prefix(request_id), checks)
                try:  # the client awaited here, not through _run (one frame less to resume)
                    reply = await client.call_encoded(payload)
                except RespError as exc:
                    if not str(exc).startswith("NOSCRIPT"):
                        raise QuotaStoreError(f"Redis quota store: {exc}") from exc
                    reply = await self._eval(ADMIT, request_id, checks,
                                             [*map(_args, checks), _hold_word(checks)])
                except (OSError, ValueError) as failed:  # never re-sent: it may have run
                    # (named apart from `exc`: compiled, one name holds one type)
                    raise QuotaStoreError(f"Redis quota store: {failed}") from failed
            else:
                reply = await self._run(ADMIT, request_id, checks, [wire.admit_args(checks)])
        return self.decision(reply)

    async def settle(self, request_id: str, checks: Sequence[Check],
                     actual: Sequence[int]) -> None:
        wire = self.wire(checks) if checks else None
        if wire is not None:
            await self._run(SETTLE, request_id, checks, [wire.settle_args(checks, actual)])
            return
        validate(checks, actual)
        if checks:
            await self._run(SETTLE, request_id, checks, _settle_args(checks, actual))

    def settle_soon(self, batch: Sequence[tuple[str, Sequence[Check], Sequence[int]]]) -> None:
        """Settles many requests in calls of the settle script, up to SETTLE_BATCH_MAX
        settles each, in one write, without awaiting them (no task, no future); an error
        reply is logged, or answered with EVAL on NOSCRIPT. Falls back to a `settle_many`
        task when not connected (or on a Cluster, where the commands need routing)."""
        client = self._client
        if client is None or client.routed:
            if client is not None:
                self._track(asyncio.ensure_future(self._settle_or_tell(batch)))
            return
        settles = [settle for settle in batch if settle[1]]
        clock = self.clock_text()  # one reading for the batch: they settle together
        keys, counts, argvs = [], [], []
        for request_id, checks, actual in settles:
            wire = self.wire(checks)
            if wire is None:
                keys.append(self._encoded_keys(tuple([check.key for check in checks])))
                argvs.append(self.argv_prefix(request_id, clock)
                             + " ".join(_settle_args(checks, actual)).encode())
            else:
                keys.append(wire.keys)
                argvs.append(wire.settle_argv(self.argv_prefix(request_id, clock), checks,
                                              actual))
            counts.append(len(checks))
        if settles and not self.send_settles(client, keys, counts, argvs, settles,
                                             self.settle_batch_failed):
            self._track(asyncio.ensure_future(self._settle_or_tell(batch)))

    async def _settle_or_tell(self, batch: Sequence[Settle]) -> None:
        """`settle_many` in a task: when it fails, `on_unsettled` is told (then logged)."""
        try:
            await self.settle_many(batch)
        except Exception:
            self._unsettled(batch)
            raise

    def _unsettled(self, batch: Sequence[Settle]) -> None:
        if self.on_unsettled is not None:
            self.on_unsettled(batch)

    @staticmethod
    def send_settles(client: RespClient, keys: Sequence[bytes], counts: Sequence[int],
                     argvs: Sequence[bytes], contexts: Sequence[Any],
                     on_error: Callable[[Exception, Any], None]) -> bool:
        """Sends settles, given per request as its keys (`_Wire.keys`), how many, and its
        ARGV string, in calls of the settle script of up to SETTLE_BATCH_MAX requests each,
        all in one write, unawaited: a call that fails calls `on_error(error, its requests'
        contexts)`. False, sending nothing, when the client cannot send unawaited."""
        payloads, batches = [], []
        for start in range(0, len(argvs), SETTLE_BATCH_MAX):
            end = start + SETTLE_BATCH_MAX
            payloads.append(RedisQuotaStore.settle_batch_payload(
                keys[start:end], sum(counts[start:end]), argvs[start:end]))
            batches.append(contexts[start:end])
        return client.send_unawaited(payloads, on_error, batches)

    @staticmethod
    def settle_batch_payload(keys: Sequence[bytes], key_count: int,
                             argvs: Sequence[bytes]) -> bytes:
        """One EVALSHA of the settle script for many requests: `keys` each request's keys
        as encoded arguments (`_Wire.keys`, `key_count` of them in all) and `argvs` each
        request's ARGV string, in the same order. The script settles each on its own."""
        parts = [b"*%d\r\n$7\r\nEVALSHA\r\n$40\r\n%b\r\n$%d\r\n%d\r\n" % (
            3 + key_count + len(argvs), _SETTLE_SHA, len(b"%d" % key_count), key_count), *keys]
        for data in argvs:
            parts.append(b"$%d\r\n%b\r\n" % (len(data), data))
        return b"".join(parts)

    def settle_batch_failed(self, error: Exception,
                            batch: Sequence[tuple[str, Sequence[Check], Sequence[int]]]
                            ) -> None:
        """What a batched settle's failure does: NOSCRIPT (nothing ran) sends each again
        whole (EVAL); anything else is logged once (the script settles each request on its
        own, so those it did not name went through), and `on_unsettled` told: which ran is
        not known (a connection lost, a reply late), and only a release of a lease may be
        sent again safely."""
        if isinstance(error, RespError) and str(error).startswith("NOSCRIPT"):
            for settle in batch:
                self.settle_failed(error, settle)
        else:
            logger.warning("settling %d request(s) in Redis failed (%s); what did not settle "
                           "stays reserved until the limits refill (concurrency leases: "
                           "until Redis answers)", len(batch), error)
            self._unsettled(batch)

    def settle_failed(self, error: Exception,
                      settle: tuple[str, Sequence[Check], Sequence[int]]) -> None:
        """What an unawaited settle's failure does: NOSCRIPT sends it again whole (EVAL),
        anything else is logged, and `on_unsettled` told."""
        if isinstance(error, RespError) and str(error).startswith("NOSCRIPT"):
            self._track(asyncio.ensure_future(self._settle_again(settle)))
        else:
            logger.warning("could not settle a request in Redis (%s); its reservation stands "
                           "until the limits refill (a concurrency lease: until Redis "
                           "answers)", error)
            self._unsettled([settle])

    async def _settle_again(self, settle: Settle) -> None:
        """A settle sent whole (EVAL) after NOSCRIPT; when it fails, `on_unsettled` is told."""
        request_id, checks, actual = settle  # (the same words as the wire's encoding)
        command = self._command(SETTLE, request_id, checks, _settle_args(checks, actual))
        try:
            await self._call("EVAL", SETTLE.source, *command[1:])
        except Exception:
            self._unsettled([settle])
            raise

    def _track(self, task: asyncio.Future[Any]) -> None:
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        task.add_done_callback(_log_task_failure)

    def _settle_commands(self, batch: Sequence[tuple[str, Sequence[Check], Sequence[int]]],
                         script: _Script = SETTLE) -> list[list[str]]:
        """One command of `script` (the settle script, or another that takes its
        arguments: RESETTLE) per settle of `batch`."""
        commands = []
        for request_id, checks, actual in batch:
            if checks:  # (the layer built these checks; zip(strict) guards the lengths)
                commands.append(self._command(script, request_id, checks,
                                              _settle_args(checks, actual)))
        return commands

    async def settle_many(self, batch: Sequence[tuple[str, Sequence[Check], Sequence[int]]]
                          ) -> None:
        """Settles many requests in one write (one script call each, pipelined)."""
        await self._pipelined(SETTLE, self._settle_commands(batch))

    async def resettle(self, batch: Sequence[Settle]) -> None:
        """Settles requests again whose settle (or admit) failed and may have run (see
        `_RESETTLE`): what they still hold of budgets becomes their actual amounts, their
        concurrency leases are released, nothing else changes. One script call each,
        pipelined in one write."""
        await self._pipelined(RESETTLE, self._settle_commands(batch, RESETTLE))

    async def renew(self, leases: Sequence[tuple[str, Sequence[Check]]]) -> None:
        """Extends what the requests still running hold to `lease_s` from now (the checks of
        each (request id, checks)): a concurrency lease still held, and a budget reservation
        not taken back (lapsed or not). One that is gone (released, settled, taken back)
        stays gone. One script call per RENEW_BATCH_MAX requests, pipelined in one write."""
        commands = []
        for start in range(0, len(leases), RENEW_BATCH_MAX):
            keys, argvs = [], []
            for request_id, checks in leases[start:start + RENEW_BATCH_MAX]:
                held = [check for check in checks if check.kind in _HELD]
                if held:
                    keys.extend([self._key(check) for check in held])
                    argvs.append(self._argv(request_id, [_renew_args(check) for check in held]))
            if argvs:
                commands.append([RENEW.sha, str(len(keys)), *keys, *argvs])
        await self._pipelined(RENEW, commands)

    async def _pipelined(self, script: _Script, commands: list[list[str]]) -> None:
        """Runs `script` once per command (its sha, key count, keys, argv), all in one write;
        one the server lost the script for is sent again whole (EVAL)."""
        if not commands or self._client is None:
            return
        try:
            replies = await self._client.call_many([("EVALSHA", *cmd) for cmd in commands])
        except (OSError, ValueError) as exc:
            raise QuotaStoreError(f"Redis quota store: {exc}") from exc
        for command, reply in zip(commands, replies, strict=True):
            if isinstance(reply, RespError) and str(reply).startswith("NOSCRIPT"):
                await self._call("EVAL", script.source, *command[1:])
            elif isinstance(reply, BaseException):
                raise QuotaStoreError(f"Redis quota store: {reply}") from reply

    async def seed(self, check: Check, committed: int,
                   held: Mapping[str, int] | None = None,
                   settled: Collection[str] | None = None, counted: Collection[str] = ()
                   ) -> bool:
        validate([check])
        if check.kind != BUDGET:
            raise ValueError(f"only budget checks are seeded, not {check.kind!r}")
        seeding = Check(check.kind, check.key, check.limit, committed,
                        expires_at=check.expires_at)
        reserved = [(script_id(request_id), amount)
                    for request_id, amount in (held or {}).items() if amount]
        words = [_args(seeding), f"{len(reserved)}"]
        words.extend(f"{request_id} {int(amount)}" for request_id, amount in reserved)
        words.append(_hold_word([check]))
        words.append(f"{-1 if settled is None else len(settled)}")
        words.extend(script_id(request_id) for request_id in counted)
        return bool(await self._run(SEED, "", [seeding], words))

    async def add_committed(self, checks: Sequence[Check]) -> list[bool]:
        """Adds each budget check's amount to its counter where the counter is there (one
        that is not is seeded from the ledger, which has that spend), in one script call:
        whether it was, per check."""
        return [value == 1 for value in await self._per_check(ADD, checks)]

    async def top_up(self, request_id: str, checks: Sequence[Check]) -> int:
        """Adds to the request's reservation in each budget counter of `checks` up to their
        amount (the same in each), as much as every one has room for: what it added (0:
        none has room, or a counter is not there). One script call."""
        validate(checks)
        if not checks:
            return 0
        reply = await self._run(TOP_UP, request_id, checks,
                                [*map(_args, checks), _hold_word(checks)])
        if type(reply) is not int:
            raise QuotaStoreError(f"the Redis quota store answered nonsense: {reply!r}")
        return reply

    async def spent(self, checks: Sequence[Check]) -> list[int | None]:
        """What each budget counter has spent: what it has committed less the reservations
        of the requests still running (None: not seeded). One script call."""
        values = await self._per_check(SPENT, checks)
        try:
            return [None if value is None else int(value) for value in values]
        except (TypeError, ValueError) as exc:
            raise QuotaStoreError(f"the Redis quota store answered nonsense: {values!r}") \
                from exc

    async def _per_check(self, script: _Script, checks: Sequence[Check]) -> list[Any]:
        """`script`'s JSON array over `checks`, one answer per check (one script call)."""
        validate(checks)
        if not checks:
            return []
        reply = await self._run(script, "", checks, [_args(check) for check in checks])
        try:
            answers = orjson.loads(reply)
            if type(answers) is not list or len(answers) != len(checks):
                raise ValueError("not one answer per counter")
        except (TypeError, ValueError) as exc:
            raise QuotaStoreError(f"the Redis quota store answered nonsense: {reply!r}") \
                from exc
        return answers

    async def unseeded_settles(self, check: Check) -> dict[str, int]:
        values = await self._call("HGETALL", f"{self._key(check)}:settled")
        try:
            return {_text(values[i]): int(values[i + 1]) for i in range(0, len(values), 2)}
        except (TypeError, ValueError) as exc:
            raise QuotaStoreError(f"a settle of a lost budget counter is not a number: {exc}") \
                from exc

    async def committed(self, checks: Sequence[Check]) -> list[int | None]:
        if not checks:
            return []
        values = await self._call("MGET", *(self._key(check) for check in checks))
        now = time.time() if self.clock is None else self.clock()
        try:
            return [None if value is None or _over(check, now, self.budget_slack_s)
                    else int(value) for check, value in zip(checks, values, strict=True)]
        except ValueError as exc:
            raise QuotaStoreError(f"a budget counter is not a number: {exc}") from exc

    # -- the wire ------------------------------------------------------------------------

    def _key(self, check: Check) -> str:
        return f"{self.prefix}:{check.key}"

    def _command(self, script: _Script, request_id: str, checks: Sequence[Check],
                 args: Sequence[str]) -> list[str]:
        """sha, number of keys, keys, and the one ARGV string: what EVALSHA takes."""
        prefix = self.prefix
        keys = [f"{prefix}:{check.key}" for check in checks]
        return [script.sha, str(len(keys)), *keys, self._argv(request_id, args)]

    def _payload(self, script: _Script, request_id: str, checks: Sequence[Check],
                 args: Sequence[str]) -> bytes:
        """`EVALSHA` + `_command`, encoded for the wire. Everything before the ARGV string
        (sha, key count, keys) is encoded once per script and set of keys."""
        names = tuple([check.key for check in checks])
        return self._framed(self._head(script, names), self._argv(request_id, args))

    def _head(self, script: _Script, names: tuple[str, ...]) -> bytes:
        head = self._heads.get((script.sha, names))
        if head is None:
            if len(self._heads) >= 10_000:
                self._heads.clear()
            # One more argument (the ARGV string) follows the keys: the count says so.
            head = encode_command(("EVALSHA", script.sha, str(len(names))))
            head = b"*%d\r\n" % (len(names) + 4) + head[head.index(b"\r\n") + 2:] \
                + self._encoded_keys(names)
            self._heads[(script.sha, names)] = head
        return head

    def _encoded_keys(self, names: tuple[str, ...]) -> bytes:
        """The Redis keys of `names` (under the prefix), encoded as command arguments."""
        return encode_command([f"{self.prefix}:{name}" for name in names]).split(b"\r\n", 1)[1]

    @staticmethod
    def _framed(head: bytes, argv: str) -> bytes:
        data = argv.encode()
        return b"%b$%d\r\n%b\r\n" % (head, len(data), data)

    def direct_client(self) -> RespClient | None:
        """The client, when a command can go to it as encoded bytes (`call_encoded`, and
        `send_unawaited` for settles): started, and not a Cluster, which routes by key."""
        client = self._client
        return client if client is not None and not client.routed else None

    def argv_prefix(self, request_id: str, clock: str | None = None) -> bytes:
        """`_prefix_args`, encoded (what the encoded paths start an ARGV string with)."""
        return self._prefix_args(request_id, clock).encode()

    def clock_text(self) -> str:
        """A reading of the store's clock as the scripts take it (one per batch of settles,
        which settle together): SERVER_TIME, or the given clock's reading."""
        return SERVER_TIME if self.clock is None else float(self.clock()).hex()

    @staticmethod
    def decision(reply: Any) -> Decision:
        """The admit script's reply as a Decision; QuotaStoreError when it is nonsense."""
        try:
            return _decision(reply)
        except (AttributeError, IndexError, TypeError, ValueError) as exc:
            raise QuotaStoreError(f"the Redis quota store answered nonsense: {reply!r}") \
                from exc

    def wire(self, checks: Sequence[Check]) -> _Wire | None:
        """The encoding of the template `checks` were planned from (see plan.Templated), made
        (and the checks validated) on its first use; None for checks without a memo."""
        memo = getattr(checks, "memo", None)
        if memo is None:
            return None
        wire: _Wire | None = memo.get(self)
        if wire is None:
            validate(checks)
            wire = memo[self] = _Wire(self, checks)
        return wire

    def _argv(self, request_id: str, args: Sequence[str]) -> str:
        return self._prefix_args(request_id) + " ".join(args)

    def _prefix_args(self, request_id: str, clock: str | None = None) -> str:
        """What every script's ARGV string starts with: the clock (`clock`, as `clock_text`
        gives it, or read now), the request id, the budget slack, and a space before the
        checks' words."""
        # (isalnum first: compiled, it runs as C, and the kernel's ids pass it)
        if not request_id.isalnum() and (not request_id or " " in request_id or
                                         not request_id.isprintable()):
            request_id = script_id(request_id)
        if clock is None:  # (clock_text, inline: this runs for every admission)
            clock = SERVER_TIME if self.clock is None else float(self.clock()).hex()
        return f"{clock} {request_id} {self._slack} "

    async def _run(self, script: _Script, request_id: str, checks: Sequence[Check],
                   args: Sequence[str]) -> Any:
        """One script call: EVALSHA, encoded here (routed by the client on a Cluster), then
        EVAL when the server lost its script cache (which runs and caches it again). (The
        admit of a templated list sends its ready payload itself: see `admit`.)"""
        client = self._client
        if client is None:
            raise QuotaStoreError("the Redis quota store is not started")
        try:
            if client.routed:
                return await client.call("EVALSHA", *self._command(script, request_id, checks,
                                                                   args))
            return await client.call_encoded(self._payload(script, request_id, checks, args))
        except RespError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise QuotaStoreError(f"Redis quota store: {exc}") from exc
        except (OSError, ValueError) as failed:  # TimeoutError is an OSError
            raise QuotaStoreError(f"Redis quota store: {failed}") from failed  # (see admit)
        return await self._eval(script, request_id, checks, args)

    async def _eval(self, script: _Script, request_id: str, checks: Sequence[Check],
                    args: Sequence[str]) -> Any:
        """The script sent whole (EVAL), after the server answered NOSCRIPT."""
        return await self._call("EVAL", script.source,
                                *self._command(script, request_id, checks, args)[1:])

    async def _call(self, *command: str) -> Any:
        if self._client is None:
            raise QuotaStoreError("the Redis quota store is not started")
        try:
            return await self._client.call(*command)
        except (RespError, OSError, ValueError) as exc:  # TimeoutError is an OSError
            raise QuotaStoreError(f"Redis quota store: {exc}") from exc


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def script_id(request_id: str) -> str:
    """A request id as the scripts know it: one word of their ARGV string."""
    if not request_id or " " in request_id or not request_id.isprintable():
        return "".join(c if c.isalnum() else "_" for c in request_id) or "_"
    return request_id


def _log_task_failure(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.warning("a Redis settle failed: %s", task.exception())


def _args(check: Check) -> str:
    return f"{check.kind} {int(check.limit)} {int(check.amount)} {_param(check)}"


def _hold_word(checks: Sequence[Check]) -> str:
    """How long the budget reservations of `checks` are held (their lease_s, the quota
    layer's: the same in each), the word after their checks' in the scripts that hold."""
    held = [check.lease_s for check in checks if check.kind == BUDGET]
    return _repr(max(held)) if held else "0"


_HELD = (CONCURRENT, BUDGET)  # the kinds a request holds while it runs (renewed)


def _renew_args(check: Check) -> str:
    """A check's words for the renew script: its param is how long to hold it for."""
    return f"{check.kind} {int(check.limit)} 0 {_repr(check.lease_s)}"


def _param(check: Check) -> str:
    kind = check.kind
    param = check.expires_at if kind == BUDGET else \
        check.lease_s if kind == CONCURRENT else check.window_s
    # A window, lease or period end is one of a few values: its repr (a few thousand
    # instructions of shortest-digits arithmetic) is made once.
    text = _REPRS.get(param)
    return _repr(param) if text is None else text


class _Wire:
    """One template's script arguments (plan.Templated: the same keys, kinds, limits and
    params for every request planned from it), encoded once with the amounts (and, for
    settles, the actual amounts) left to fill in. Per request that is one bytes %-format
    (a third of str.format's cost) instead of an f-string per check, and the command's head
    without a lookup."""

    __slots__ = ("admit_bytes", "admit_format", "admit_head", "amounts", "count",
                 "interleaved", "keys", "settle_bytes", "settle_format")

    def __init__(self, store: RedisQuotaStore, checks: Sequence[Check]) -> None:
        names = tuple([check.key for check in checks])
        count = self.count = len(names)
        self.admit_head = store._head(ADMIT, names)
        self.keys = store._encoded_keys(names)  # (for a batch of settles)
        admit, settle = [], []
        for index, check in enumerate(checks):
            # The same words as _args and _settle_args, with {i} where the amounts go.
            head = f"{check.kind} {int(check.limit)} {{{index}}} {_param(check)}"
            admit.append(head)
            settle.append(f"{head} {{{count + index}}}")
        self.admit_format = " ".join([*admit, _hold_word(checks)])
        self.settle_format = " ".join(settle)
        # The same again for bytes %-formatting: amounts (and actual amounts, each after its
        # check's) in check order. The words hold no "%" (kinds, integers, float reprs).
        marks = {str(index): b"%d" for index in range(2 * count)}
        self.admit_bytes = _percent_template(self.admit_format, marks)
        self.settle_bytes = _percent_template(self.settle_format, marks)
        self.amounts = _fields_reader(count, with_actual=False)
        self.interleaved = _fields_reader(count, with_actual=True)

    def admit_args(self, checks: Sequence[Check]) -> str:
        return self.admit_format.format(*[int(check.amount) for check in checks])

    def settle_args(self, checks: Sequence[Check], actual: Sequence[int]) -> str:
        if len(actual) != self.count:
            raise ValueError("settle needs one actual amount per check")
        return self.settle_format.format(*[int(check.amount) for check in checks], *actual)

    def admit_payload(self, prefix: bytes, checks: Sequence[Check]) -> bytes:
        """The whole EVALSHA of the admit script: the head, then the ARGV string (`prefix`
        from the store, then this template's words with the amounts)."""
        if len(checks) != self.count:
            raise ValueError("admit needs this template's checks")
        data = prefix + self.admit_bytes % self.amounts(checks)
        return b"%b$%d\r\n%b\r\n" % (self.admit_head, len(data), data)

    def settle_argv(self, prefix: bytes, checks: Sequence[Check],
                    actual: Sequence[int]) -> bytes:
        """One request's ARGV string for the settle script (after its keys, `keys`)."""
        if len(actual) != self.count:
            raise ValueError("settle needs one actual amount per check")
        if len(checks) != self.count:
            raise ValueError("settle needs this template's checks")
        data: bytes = prefix + self.settle_bytes % self.interleaved(checks, actual)
        return data


def _fields_reader(count: int, *, with_actual: bool) -> Callable[..., tuple[int, ...]]:
    """A function giving the %-format's arguments for `count` checks: their amounts, or each
    amount followed by its actual amount. Straight-line code made once per count (as
    dataclasses makes its __init__): for three checks, a chain of iterators over them cost 7k
    instructions, this about 1k. The source holds nothing but integers."""
    if with_actual:
        fields = ", ".join(f"checks[{i}].amount, actual[{i}]" for i in range(count))
        source = f"lambda checks, actual: ({fields},)"
    else:
        fields = ", ".join(f"checks[{i}].amount" for i in range(count))
        source = f"lambda checks: ({fields},)"
    made: Callable[..., tuple[int, ...]] = eval(source)  # (integers only, above)
    return made


def _percent_template(words: str, marks: dict[str, bytes]) -> bytes:
    """A str.format template of `{i}` fields, as bytes with %d in their places."""
    out = []
    for literal, field, _spec, _conversion in Formatter().parse(words):
        if "%" in literal:
            raise ValueError(f"a quota script argument holds a %: {literal!r}")
        out.append(literal.encode())
        if field is not None:
            out.append(marks[field])
    return b"".join(out)


_REPRS: dict[float, str] = {}


def _repr(value: float) -> str:
    text = repr(float(value))
    if len(_REPRS) >= 4096:
        _REPRS.clear()
    _REPRS[value] = text
    return text


def _settle_args(checks: Sequence[Check], actual: Sequence[int]) -> list[str]:
    return [f"{_args(check)} {used}" for check, used in zip(checks, actual, strict=True)]


def _over(check: Check, now: float, slack_s: float) -> bool:
    return check.expires_at > 0 and now >= check.expires_at + slack_s


def _decision(reply: bytes) -> Decision:
    """The admit script's answer (a JSON array: one orjson call costs less than int() and
    float() on each word of a split string, 14.0k against 16.0k instructions here)."""
    values = orjson.loads(reply)
    if type(values) is not list:
        raise ValueError("not an array")
    status = values[0]
    # int() and float() of what already is one are cheap, and refuse anything else.
    if status == 1:  # admitted (positional: a keyword call costs more)
        return Decision(True, None, None, tuple(map(int, values[1::2])),
                        tuple(map(float, values[2::2])))
    if status == 2:
        return Decision(allowed=False, unseeded=tuple(map(int, values[1:])))
    if status == 0:
        retry = values[2]
        return Decision(allowed=False, failed=int(values[1]),
                        retry_after_s=None if retry is None else float(retry))
    raise ValueError(f"unknown admission status {status!r}")
