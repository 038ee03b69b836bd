"""The in-process quota store: token buckets, leases and spend counters for one gateway process.

It is also the local fallback when Redis is down. It is the reference for the Redis store's
Lua: both do the same float arithmetic in the same order, so they decide identically. Nothing
here awaits, so under asyncio every method runs as one atomic step.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from gateway.policy import BUDGET, CONCURRENT, REQUESTS, TOKENS, Check, Decision, QuotaStoreError
from middleware.quota.plan import Templated

KINDS = (REQUESTS, TOKENS, CONCURRENT, BUDGET)

# A budget counter outlives its period by a day: gateways whose clocks disagree by a little
# still find it, and nobody reads it after that (the next period has its own key).
BUDGET_SLACK_S = 86_400.0
# A bucket is kept until it is full again, but at most this long (68 years): a debt that
# takes longer to pay off (absurd usage reported upstream) would overflow Redis's PEXPIRE.
BUCKET_TTL_MAX_S = 2 ** 31


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float
    expires: float


@dataclass(slots=True)
class _Leases:
    until: dict[str, float]  # request id -> lease expiry


@dataclass(slots=True)
class _Counter:
    value: int
    expires: float
    # The reservations in `value` (request id -> amount: an admission's, and what a stream
    # took on top, `top_up`), so that a settle knows whether the one it replaces is there,
    # and how much it is: not when the counter was lost and seeded again after the
    # admit by a gateway that did not have the request in flight (in Redis; a seed counts
    # what the ledger has and the seeding gateway's own requests in flight), or lapsed.
    held: dict[str, int] = field(default_factory=dict)
    # When each of `held` lapses (request id -> time): one whose settle has not come by then
    # is taken back when the room is wanted (`_take_back_lapsed`).
    until: dict[str, float] = field(default_factory=dict)
    expires_at: float = 0.0  # the end of its period (its check's), 0 for a lifetime budget
    # What of `value` another store counts too: what it was seeded with, and what has been
    # handed over since (`take_spend_to_hand_over`). The rest went through this store only.
    handed: int = 0


@dataclass(slots=True)
class _Settled:
    # Beside a budget counter that was lost (`<key>:settled`): the settles that found it
    # missing (request id -> actual amount), which the seed that rebuilds it adds.
    amounts: dict[str, int]
    expires: float


# The settles of a lost counter are kept a day past the last (as Redis keeps them).
_SETTLED_TTL_S = 86_400.0
# Lapsed reservations taken back per counter and call, at most (as the Redis scripts do).
_LAPSED_MAX = 16

_State = TypeVar("_State", _Bucket, _Leases, _Counter, _Settled)


# What judging one check found: (passes, retry_after_s, unseeded, level, state) where level is
# the bucket's tokens or the lease count after the refill or expiry, or the budget counter,
# and state the bucket, lease set or counter found (None: none yet), which taking the check
# changes without looking it up again. A tuple, not a class: one is made per check on every
# admission.
_Verdict = tuple[bool, "float | None", bool, float, "_Bucket | _Leases | _Counter | None"]
_REFUSED: _Verdict = (False, None, False, 0.0, None)
_UNSEEDED: _Verdict = (False, None, True, 0.0, None)


class MemoryQuotaStore:
    """Quota state in this process's memory, for a single gateway process.

    `clock` gives epoch seconds. Idle buckets, free lease sets and budget counters past their
    period (plus `budget_slack_s`) are forgotten, swept every `sweep_every_s` of the clock.
    """

    name = "memory"

    def __init__(self, *, clock: Callable[[], float] = time.time,
                 budget_slack_s: float = BUDGET_SLACK_S, sweep_every_s: float = 60.0) -> None:
        self.clock = clock
        self.budget_slack_s = budget_slack_s
        self.sweep_every_s = sweep_every_s
        self._state: dict[str, _Bucket | _Leases | _Counter | _Settled] = {}
        self._next_sweep = -math.inf
        # budget counter key -> (expires_at, amount, held): spend not handed over yet of
        # counters since forgotten, or that a hand-over gave back (`owe`)
        self._owed: dict[str, tuple[float, int, int]] = {}

    def __len__(self) -> int:
        """How many buckets, lease sets and counters are held (swept or not)."""
        return len(self._state)

    def forget_budgets(self) -> None:
        """Drops every budget counter: the next admission seeds each again from the ledger
        (the quota layer's fallback, as an outage of the shared store begins: spend that
        went through that store since the fallback last counted is not in its counters).
        What a counter took that was not handed over yet is kept for the next hand-over."""
        for key, entry in list(self._state.items()):
            if type(entry) is _Counter:
                self.owe(key, entry.expires_at, entry.value - entry.handed)
                del self._state[key]

    def take_spend_to_hand_over(self) -> list[tuple[Check, int]]:
        """What the budget counters took since they were seeded or last handed over (spend
        and reservations), for the shared store to add to its own counters when it answers
        again (the quota layer's fallback): per counter, a budget Check whose amount it is,
        and the part of it reservations still hold. Taken: `owe` gives back what was not
        handed over."""
        now = self.clock()
        owed, self._owed = self._owed, {}
        for key, entry in self._state.items():
            if type(entry) is _Counter and entry.value != entry.handed and entry.expires > now:
                expires_at, amount, held = owed.get(key, (entry.expires_at, 0, 0))
                owed[key] = (expires_at, amount + entry.value - entry.handed,
                             held + sum(entry.held.values()))
                entry.handed = entry.value
        return [(Check(BUDGET, key, 0, amount, expires_at=expires_at), held)
                for key, (expires_at, amount, held) in owed.items()
                if amount and not (expires_at > 0 and now >= expires_at + self.budget_slack_s)]

    def owe(self, key: str, expires_at: float, amount: int, held: int = 0) -> None:
        """Keeps `amount` of the budget counter `key` (`held` of it reserved) for the next
        `take_spend_to_hand_over`."""
        if amount:
            _, owed, owed_held = self._owed.get(key, (expires_at, 0, 0))
            self._owed[key] = (expires_at, owed + amount, owed_held + held)

    async def startup(self) -> None:
        pass

    async def shutdown(self) -> None:
        self._state.clear()
        self._owed.clear()

    async def admit(self, request_id: str, checks: Sequence[Check]) -> Decision:
        validate(checks)
        now = self._now()
        judge = self._judge
        verdicts = [judge(check, now) for check in checks]
        for verdict in verdicts:
            if not verdict[0]:  # (an unseeded budget does not pass either)
                return self._refusal(verdicts)
        if not verdicts:
            return Decision(allowed=True)
        take = self._take
        remaining, reset_s = zip(*[take(request_id, check, verdict, now)
                                   for check, verdict in zip(checks, verdicts, strict=True)])
        return Decision(True, None, None, remaining, reset_s)

    @staticmethod
    def _refusal(verdicts: list[_Verdict]) -> Decision:
        """Budgets to seed first, if any; else the first check that does not pass, and the
        longest wait of all that do not (None if waiting never lets one pass): a caller
        told the first one's wait would be refused again by the others."""
        unseeded = tuple([i for i, verdict in enumerate(verdicts) if verdict[2]])
        if unseeded:
            return Decision(allowed=False, unseeded=unseeded)
        failed = next(i for i, verdict in enumerate(verdicts) if not verdict[0])
        waits = [verdict[1] for verdict in verdicts if not verdict[0]]
        retry = None if None in waits else max([wait for wait in waits if wait is not None])
        return Decision(allowed=False, failed=failed, retry_after_s=retry)

    async def settle(self, request_id: str, checks: Sequence[Check],
                     actual: Sequence[int]) -> None:
        self._settle_now(request_id, checks, actual)

    def settle_soon(self, batch: Sequence[tuple[str, Sequence[Check], Sequence[int]]]) -> None:
        """Settles at once (no I/O here): what the quota layer calls after responses."""
        for request_id, checks, actual in batch:
            self._settle_now(request_id, checks, actual)

    def _settle_now(self, request_id: str, checks: Sequence[Check],
                    actual: Sequence[int]) -> None:
        validate(checks, actual)
        now = self._now()
        for check, used in zip(checks, actual, strict=True):
            if check.kind == BUDGET:
                counter = self._get(check.key, _Counter, now)
                if counter is not None:  # (its reservation, if it holds it, becomes `used`)
                    held = counter.held.pop(request_id, None)
                    if held is not None:
                        del counter.until[request_id]
                    counter.value += used if held is None else used - held
                elif used and now < self._counter_expiry(check):  # lost, not seeded again
                    self._settled_while_lost(check.key, request_id, used, now)
            elif check.kind == CONCURRENT:
                leases = self._get(check.key, _Leases, now)
                if leases is not None:
                    leases.until.pop(request_id, None)
            elif check.limit > 0:
                bucket = self._get(check.key, _Bucket, now)
                level = _level(bucket, check, now) + (check.amount - used)
                self._store_bucket(check, bucket, min(float(check.limit), level), now)

    async def settle_many(self, batch: Sequence[tuple[str, Sequence[Check], Sequence[int]]]
                          ) -> None:
        for request_id, checks, actual in batch:
            await self.settle(request_id, checks, actual)

    async def renew(self, leases: Sequence[tuple[str, Sequence[Check]]]) -> None:
        """Extends what the requests still running hold to `lease_s` from now (the checks of
        each (request id, checks)): a concurrency lease still held, and a budget reservation
        not taken back (lapsed or not). One that is gone (released, settled, taken back)
        stays gone."""
        now = self._now()
        for request_id, checks in leases:
            for check in checks:
                if check.kind == CONCURRENT:
                    held = self._get(check.key, _Leases, now)
                    if held is not None and request_id in held.until:
                        held.until[request_id] = now + check.lease_s
                elif check.kind == BUDGET:
                    counter = self._get(check.key, _Counter, now)
                    if counter is not None and request_id in counter.until:
                        counter.until[request_id] = now + check.lease_s

    def _settled_while_lost(self, key: str, request_id: str, used: int, now: float) -> None:
        settled = self._get(f"{key}:settled", _Settled, now)
        if settled is None:
            settled = self._state[f"{key}:settled"] = _Settled({}, 0.0)
        settled.amounts[request_id] = used
        settled.expires = now + _SETTLED_TTL_S

    async def seed(self, check: Check, committed: int,
                   held: Mapping[str, int] | None = None,
                   settled: Collection[str] | None = None, counted: Collection[str] = ()
                   ) -> bool:
        validate([check])
        if check.kind != BUDGET:
            raise ValueError(f"only budget checks are seeded, not {check.kind!r}")
        now = self._now()
        if self._get(check.key, _Counter, now) is not None:
            return False
        lost = self._get(f"{check.key}:settled", _Settled, now)
        amounts = lost.amounts if lost is not None else {}
        if settled is not None and len(amounts) != len(settled):
            return False  # (settled since the caller read them: read them again)
        known = set(counted)
        value = committed + sum([used for request_id, used in amounts.items()
                                 if request_id not in known])
        self._state.pop(f"{check.key}:settled", None)
        reserved = {request_id: amount for request_id, amount in (held or {}).items()
                    if amount}
        until = dict.fromkeys(reserved, now + check.lease_s)
        # (the ledger's spend and the requests in flight, admitted elsewhere, are counted by
        # the other store too: not handed over to it; the settles kept while the counter
        # was lost went through this store alone)
        handed = committed + sum(reserved.values())
        self._state[check.key] = _Counter(value + sum(reserved.values()),
                                          self._counter_expiry(check), reserved, until,
                                          expires_at=check.expires_at, handed=handed)
        return True

    async def unseeded_settles(self, check: Check) -> dict[str, int]:
        lost = self._get(f"{check.key}:settled", _Settled, self._now())
        return dict(lost.amounts) if lost is not None else {}

    async def add_committed(self, checks: Sequence[Check]) -> list[bool]:
        """Adds each budget check's amount to its counter where the counter is there (one
        that is not is seeded from the ledger, which has that spend): whether it was."""
        validate(checks)
        now = self._now()
        added = []
        for check in checks:
            counter = self._get(check.key, _Counter, now) if check.kind == BUDGET else None
            if counter is not None:
                counter.value += check.amount
                counter.handed += check.amount
            added.append(counter is not None)
        return added

    async def top_up(self, request_id: str, checks: Sequence[Check]) -> int:
        """Adds to the request's reservation in each budget counter of `checks` up to their
        amount (the same in each), as much as every one has room for: what it added (0:
        none has room, or a counter is not there). It is held as the admission's is, until
        lease_s from now."""
        validate(checks)
        if not checks:
            return 0
        now = self._now()
        counters, grant = [], checks[0].amount
        for check in checks:
            counter = self._get(check.key, _Counter, now) if check.kind == BUDGET else None
            if counter is None:
                return 0
            if counter.value + grant > check.limit:
                _take_back_lapsed(counter, now)
            grant = min(grant, check.limit - counter.value)
            if grant <= 0:
                return 0
            counters.append(counter)
        for check, counter in zip(checks, counters, strict=True):
            counter.value += grant
            counter.held[request_id] = counter.held.get(request_id, 0) + grant
            counter.until[request_id] = now + check.lease_s  # (renewed)
        return grant

    async def spent(self, checks: Sequence[Check]) -> list[int | None]:
        """What each budget counter has spent: what it has committed less the reservations
        of the requests still running (None: not seeded)."""
        now = self._now()
        counters = [self._get(check.key, _Counter, now) for check in checks]
        return [None if counter is None else counter.value - sum(counter.held.values())
                for counter in counters]

    async def committed(self, checks: Sequence[Check]) -> list[int | None]:
        now = self.clock()
        counters = [self._state.get(check.key) for check in checks]
        return [c.value if isinstance(c, _Counter) and now < c.expires else None
                for c in counters]

    # -- one check -----------------------------------------------------------------------
    # (Here and below, two-way min and max are written out where they run per request: the
    # builtins parse their arguments on each call. `b if b < a else a` is min(a, b) and
    # `b if b > a else a` is max(a, b), ties and all, as the Redis store's Lua computes them.)

    def _judge(self, check: Check, now: float) -> _Verdict:
        kind = check.kind
        if kind == BUDGET:
            counter = self._get(check.key, _Counter, now)
            if check.limit <= 0:
                return _REFUSED
            if counter is None:
                return _UNSEEDED
            if counter.value + check.amount > check.limit and counter.until:
                _take_back_lapsed(counter, now)
            return (counter.value + check.amount <= check.limit, None, False, counter.value,
                    counter)
        if kind == CONCURRENT:
            leases = self._get(check.key, _Leases, now)
            until = leases.until if leases else {}
            if len(until) < check.limit:
                return (True, None, False, len(until), leases)
            # A slot frees as soon as any request in flight ends, which may be at once: the
            # first lease's expiry bounds the wait, but requests end long before theirs.
            return (False, 0.0 if check.limit > 0 else None, False, 0.0, None)
        if check.limit <= 0 or check.amount > check.limit:
            return _REFUSED  # waiting never helps
        bucket = self._get(check.key, _Bucket, now)
        level = _level(bucket, check, now)
        if level >= check.amount:
            return (True, None, False, level, bucket)
        return (False, (check.amount - level) / (check.limit / check.window_s), False, 0.0,
                None)

    def _take(self, request_id: str, check: Check, verdict: _Verdict,
              now: float) -> tuple[int, float]:
        """Reserves a check that passed: (remaining, seconds until it resets)."""
        kind = check.kind
        state = verdict[4]  # (judged just now, with no await in between)
        if kind == BUDGET:
            counter = state
            assert type(counter) is _Counter
            counter.value += check.amount
            if check.amount:  # (settling an amount of 0 adds `used` either way)
                held = counter.held
                held[request_id] = held.get(request_id, 0) + check.amount
                counter.until[request_id] = now + check.lease_s
            left = check.expires_at - now
            reset = (0.0 if 0.0 > left else left) if check.expires_at > 0 else 0.0  # noqa: FURB136
            left_amount = check.limit - counter.value
            return (0 if 0 > left_amount else left_amount), reset  # noqa: FURB136
        if kind == CONCURRENT:
            leases = state
            if leases is None:
                leases = self._state[check.key] = _Leases({})
            assert type(leases) is _Leases
            leases.until[request_id] = now + check.lease_s
            return max(check.limit - len(leases.until), 0), max(leases.until.values()) - now
        level = verdict[3] - check.amount
        assert state is None or type(state) is _Bucket
        self._store_bucket(check, state, level, now)
        floor = math.floor(level)
        remaining = 0 if 0 > floor else floor  # noqa: FURB136
        return remaining, (check.limit - level) / (check.limit / check.window_s)

    # -- state ---------------------------------------------------------------------------

    def _store_bucket(self, check: Check, previous: _Bucket | None, level: float,
                      now: float) -> None:
        """Stores `level` in the bucket `previous` (`_get` found it just now) or a new one."""
        # Kept until a window after it is full again: forgetting it then changes nothing.
        window_s = check.window_s
        full_again = (check.limit - level) / (check.limit / window_s) + window_s
        ttl = full_again if full_again > 2 * window_s else 2 * window_s  # noqa: FURB136
        ttl = ttl if ttl < BUCKET_TTL_MAX_S else BUCKET_TTL_MAX_S  # noqa: FURB136
        if previous is not None:  # (one bucket per key, changed in place)
            updated = previous.updated  # never move a bucket's time back
            previous.tokens = level
            previous.updated = updated if updated > now else now  # noqa: FURB136
            previous.expires = now + ttl
        else:
            self._state[check.key] = _Bucket(level, now, now + ttl)

    def _counter_expiry(self, check: Check) -> float:
        return check.expires_at + self.budget_slack_s if check.expires_at > 0 else math.inf

    def _get(self, key: str, kind: type[_State], now: float) -> _State | None:
        entry = self._state.get(key)
        if entry is None:
            return None
        if type(entry) is not kind:
            raise QuotaStoreError(f"quota key {key!r} holds a different kind of state")
        if _expired(entry, now) if isinstance(entry, _Leases) else entry.expires <= now:
            del self._state[key]
            return None
        return entry

    def _now(self) -> float:
        now = self.clock()
        if now >= self._next_sweep:
            self._next_sweep = now + self.sweep_every_s
            for key in [key for key, entry in self._state.items() if _expired(entry, now)]:
                del self._state[key]
        return now


def _level(bucket: _Bucket | None, check: Check, now: float) -> float:
    """The tokens in `check`'s bucket now: it starts full and refills smoothly, up to the
    limit."""
    limit = float(check.limit)
    if bucket is None:
        return limit
    elapsed = now - bucket.updated
    elapsed = elapsed if elapsed > 0.0 else 0.0  # noqa: FURB136
    level = bucket.tokens + elapsed * (check.limit / check.window_s)
    return level if level < limit else limit  # noqa: FURB136


def _take_back_lapsed(counter: _Counter, now: float) -> None:
    """Takes back from `counter` the reservations whose settle never came by their lapse
    (their request ran past lease_s, or its gateway died mid-request), the earliest first,
    at most _LAPSED_MAX, as the Redis scripts do. A late settle of one adds its actual
    amount."""
    lapsed = sorted([(until, request_id) for request_id, until in counter.until.items()
                     if until <= now])[:_LAPSED_MAX]
    for _, request_id in lapsed:
        del counter.until[request_id]
        counter.value -= counter.held.pop(request_id, 0)


def _expired(entry: _Bucket | _Leases | _Counter | _Settled, now: float) -> bool:
    if isinstance(entry, _Leases):
        # Same rule as the Redis store's ZREMRANGEBYSCORE -inf now: a lease ends at its expiry.
        for request_id in [r for r, until in entry.until.items() if until <= now]:
            del entry.until[request_id]
        return not entry.until
    return entry.expires <= now


def validate(checks: Sequence[Check], actual: Sequence[int] | None = None) -> None:
    """Refuses a call that is a bug in the caller (both stores share this). What it checks is
    the same for every request of one limit template (`plan.Templated`): such a list is
    checked once, and its template's memo remembers it."""
    if actual is not None and len(actual) != len(checks):
        raise ValueError("settle needs one actual amount per check")
    memo = checks.memo if type(checks) is Templated else None
    if memo is not None and memo.get(_VALID) == len(checks):
        return
    for check in checks:
        if check.kind not in KINDS:
            raise ValueError(f"unknown kind of check {check.kind!r}")
        if check.kind in (REQUESTS, TOKENS) and check.window_s <= 0:
            raise ValueError(f"check {check.key!r} needs a window_s above zero")
    if len({check.key for check in checks}) != len(checks):
        # Each check is judged against the state before the call: one key, one check.
        raise ValueError("two checks of one call share a storage key")
    if memo is not None:
        memo[_VALID] = len(checks)


_VALID = "valid"  # the template memo's entry: its checks passed `validate` (how many)
