"""The quota stores: the memory and Redis stores decide identically, atomically and all or nothing.

Every behaviour test runs against both stores; Redis is the real server on 127.0.0.1:6379,
each test under its own key prefix, deleted afterwards. Time is a fake clock that starts at
the real time (budget counters expire on the server's clock too) and moves only when told.
"""
from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import pytest
import redis.asyncio as aioredis

from gateway import resp
from gateway.policy import (
    BUDGET,
    CONCURRENT,
    REQUESTS,
    TOKENS,
    Check,
    Decision,
    QuotaStoreError,
)
from middleware.quota.plan import templated
from middleware.quota.store_memory import BUDGET_SLACK_S, MemoryQuotaStore, validate
from middleware.quota.store_redis import (
    ADMIT,
    SETTLE,
    SETTLE_BATCH_MAX,
    RedisQuotaStore,
    _args,
    _hold_word,
)
from tests.tcp_proxy import TcpProxy

REDIS_PORT = 6379
REDIS_URL = f"redis://127.0.0.1:{REDIS_PORT}/0"

Store = MemoryQuotaStore | RedisQuotaStore


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(float(int(time.time())))


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    """A key prefix of this test's own (a Cluster hash tag), whose keys are deleted after."""
    prefix = f"{{sgtest-{uuid.uuid4().hex}}}"
    yield prefix
    client = aioredis.Redis.from_url(REDIS_URL)
    keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


# The stores under test wait this long for Redis. The production default (half a second) is
# short enough that a loaded two-core CI host, stalling this process or a test Redis node, once
# timed out a CLUSTER SLOTS on a fresh connection; what a timeout does is tested on its own.
_SOCKET_TIMEOUT_S = 5.0


def make_store(kind: str, clock: FakeClock, prefix: str, url: str = REDIS_URL,
               **options: Any) -> Store:
    if kind == "memory":
        return MemoryQuotaStore(clock=clock, **options)
    options.setdefault("socket_timeout_s", _SOCKET_TIMEOUT_S)
    return RedisQuotaStore(url, prefix=prefix, clock=clock, **options)


# The Redis backend runs the suite on the machine's server and, through the same client, on
# a Redis Cluster, a Sentinel-managed primary and a TLS server (tests/redis_topologies.py).
_TOPOLOGIES = {"redis-cluster": "cluster_redis", "redis-sentinel": "sentinel_redis",
               "redis-tls": "tls_redis"}


@pytest.fixture(params=["memory", "redis", *_TOPOLOGIES])
async def store(request: pytest.FixtureRequest, clock: FakeClock,
                prefix: str) -> AsyncIterator[Store]:
    url = REDIS_URL
    if request.param in _TOPOLOGIES:
        url = request.getfixturevalue(_TOPOLOGIES[request.param]).url
    store = make_store(request.param, clock, prefix, url)
    await store.startup()
    yield store
    await store.shutdown()


@pytest.fixture
async def redis_store(clock: FakeClock, prefix: str) -> AsyncIterator[RedisQuotaStore]:
    store = RedisQuotaStore(REDIS_URL, prefix=prefix, clock=clock,
                            socket_timeout_s=_SOCKET_TIMEOUT_S)
    await store.startup()
    yield store
    await store.shutdown()


def rpm(limit: int, *, key: str = "rpm:k", window_s: float = 60.0) -> Check:
    return Check(REQUESTS, key, limit, 1, window_s=window_s)


def tpm(limit: int, amount: int, *, key: str = "tpm:k", window_s: float = 60.0) -> Check:
    return Check(TOKENS, key, limit, amount, window_s=window_s)


def leases(limit: int, *, key: str = "conc:k", lease_s: float = 30.0) -> Check:
    return Check(CONCURRENT, key, limit, 1, lease_s=lease_s)


def budget(limit: int, amount: int, ends_at: float, *, key: str = "budget:k") -> Check:
    return Check(BUDGET, key, limit, amount, expires_at=ends_at)


def refused(failed: int, retry_after_s: Any = None) -> Decision:
    return Decision(allowed=False, failed=failed, retry_after_s=retry_after_s)


# -- all or nothing ----------------------------------------------------------------------------

async def test_a_failing_check_reserves_nothing(store: Store, clock: FakeClock) -> None:
    first, lease, money = rpm(2), leases(1), budget(100, 60, clock.now + 3600)
    await store.seed(money, 50)

    assert await store.admit("r1", [first, lease, money]) == refused(2)

    assert await store.committed([money]) == [50]
    assert (await store.admit("r2", [first, lease])).remaining == (1, 0)  # both were untouched
    assert (await store.admit("r3", [first])).remaining == (0,)
    assert await store.admit("r4", [first]) == refused(0, 30.0)


async def test_admit_reports_remaining_and_reset_per_check(store: Store,
                                                           clock: FakeClock) -> None:
    checks = [rpm(60), tpm(1000, 400), leases(3), budget(1000, 100, clock.now + 3600)]
    await store.seed(checks[3], 200)

    decision = await store.admit("r1", checks)

    assert decision.allowed and decision.failed is None and decision.unseeded == ()
    assert decision.remaining == (59, 600, 2, 700)
    assert decision.reset_s == pytest.approx((1.0, 24.0, 30.0, 3600.0))


async def test_no_checks_admits(store: Store) -> None:
    assert await store.admit("r1", []) == Decision(allowed=True)
    await store.settle("r1", [], [])
    assert await store.committed([]) == []


# -- token buckets -----------------------------------------------------------------------------

async def test_bucket_refills_smoothly_up_to_its_capacity(store: Store, clock: FakeClock) -> None:
    assert (await store.admit("r1", [tpm(60, 60)])).remaining == (0,)
    assert await store.admit("r2", [tpm(60, 1)]) == refused(0, 1.0)

    clock.advance(30)  # half the window: half the capacity
    assert await store.admit("r3", [tpm(60, 31)]) == refused(0, 1.0)
    assert (await store.admit("r4", [tpm(60, 30)])).remaining == (0,)

    clock.advance(600)  # long idle: full, and no fuller
    assert (await store.admit("r5", [tpm(60, 60)])).remaining == (0,)
    assert not (await store.admit("r6", [tpm(60, 1)])).allowed


async def test_retry_after_is_when_the_bucket_holds_enough(store: Store,
                                                           clock: FakeClock) -> None:
    check = rpm(6, window_s=48.0)  # one request every 8 s
    for i in range(6):
        assert (await store.admit(f"r{i}", [check])).allowed
    assert await store.admit("r6", [check]) == refused(0, 8.0)

    clock.advance(7.5)
    assert await store.admit("r7", [check]) == refused(0, 0.5)
    clock.advance(0.5)
    assert (await store.admit("r8", [check])).allowed


async def test_retry_after_is_the_longest_wait_of_the_failing_checks(
        store: Store, clock: FakeClock) -> None:
    # The key's tokens refill 10 a second, the project's requests one every 30 s: both refuse
    # the third request, the first named, and only the project's wait lets it through.
    def checks(tokens: int) -> list[Check]:
        return [tpm(600, tokens, key="key:tpm"), rpm(2, key="project:rpm"), leases(1)]

    assert (await store.admit("r1", checks(590)[:2])).allowed
    assert (await store.admit("r2", checks(10))).allowed

    assert await store.admit("r3", checks(100)) == refused(0, 30.0)
    clock.advance(10)  # the key's wait: the project's bucket still refuses
    decision = await store.admit("r4", checks(100))
    assert decision == refused(1, decision.retry_after_s)
    assert decision.retry_after_s == pytest.approx(20.0)
    await store.settle("r2", checks(10), [10, 1, 1])
    clock.advance(20)
    assert (await store.admit("r5", checks(100))).allowed

    # One failing check that no wait lets through: no wait at all.
    money = budget(100, 60, clock.now + 3600)
    await store.seed(money, 50)
    assert await store.admit("r6", [*checks(100), money]) == refused(1, None)


async def test_more_than_the_capacity_never_passes(store: Store, clock: FakeClock) -> None:
    assert await store.admit("r1", [tpm(100, 101)]) == refused(0, None)
    clock.advance(3600)
    assert await store.admit("r2", [tpm(100, 101)]) == refused(0, None)
    assert (await store.admit("r3", [tpm(100, 100)])).remaining == (0,)  # nothing was taken


async def test_settle_above_the_estimate_leaves_a_debt(store: Store, clock: FakeClock) -> None:
    check = tpm(120, 60)  # refills 2 tokens a second
    assert (await store.admit("r1", [check])).remaining == (60,)
    await store.settle("r1", [check], [180])  # 60 left - 120 more = -60

    assert await store.admit("r2", [tpm(120, 10)]) == refused(0, 35.0)
    clock.advance(34.5)
    assert await store.admit("r3", [tpm(120, 10)]) == refused(0, 0.5)
    clock.advance(0.5)
    assert (await store.admit("r4", [tpm(120, 10)])).remaining == (0,)


async def test_settle_below_the_estimate_refunds_up_to_the_capacity(store: Store) -> None:
    assert (await store.admit("r1", [tpm(100, 80)])).remaining == (20,)
    await store.settle("r1", [tpm(100, 80)], [30])
    assert (await store.admit("r2", [tpm(100, 70)])).remaining == (0,)
    assert not (await store.admit("r3", [tpm(100, 1)])).allowed

    other = tpm(100, 100, key="tpm:other")
    assert (await store.admit("r4", [other])).allowed
    await store.settle("r4", [other], [0])
    await store.settle("r4", [other], [0])  # a second refund cannot overfill the bucket
    assert (await store.admit("r5", [other])).remaining == (0,)
    assert not (await store.admit("r6", [tpm(100, 1, key="tpm:other")])).allowed


# -- concurrency leases ------------------------------------------------------------------------

async def test_leases_are_limited_released_and_expire(store: Store, clock: FakeClock) -> None:
    check = leases(3, lease_s=30.0)
    for request_id, left in (("r1", 2), ("r2", 1), ("r3", 0)):
        decision = await store.admit(request_id, [check])
        assert decision.remaining == (left,) and decision.reset_s == (30.0,)
    # (no wait: a slot frees as soon as a request in flight ends)
    assert await store.admit("r4", [check]) == refused(0, 0.0)

    await store.settle("r2", [check], [1])
    clock.advance(10)
    assert (await store.admit("r4", [check])).reset_s == (30.0,)  # r4's lease, the latest
    assert await store.admit("r5", [check]) == refused(0, 0.0)

    clock.advance(20)  # r1 and r3 were never released: their leases end now
    assert (await store.admit("r5", [check])).remaining == (1,)
    assert (await store.admit("r6", [check])).remaining == (0,)
    assert await store.admit("r7", [check]) == refused(0, 0.0)


async def test_renew_extends_the_leases_still_held(store: Store, clock: FakeClock) -> None:
    check, other = leases(2, lease_s=30.0), leases(1, key="conc:other", lease_s=30.0)
    assert (await store.admit("r1", [check, other])).allowed
    assert (await store.admit("r2", [check, rpm(10)])).allowed
    await store.settle("r2", [check, rpm(10)], [1, 1])
    clock.advance(20)

    await store.renew([("r1", [check, other]), ("r2", [check, rpm(10)])])

    clock.advance(20)  # r1's leases hold 30 s from the renewal, not from the admission
    assert await store.admit("r3", [other]) == refused(0, 0.0)
    decision = await store.admit("r3", [check])
    assert decision.remaining == (0,) and decision.reset_s == (30.0,)  # (r2 was not revived)
    clock.advance(10)
    assert (await store.admit("r4", [other])).allowed  # (r1's renewed lease ends now)
    await store.renew([("r1", [check, other])])  # (one that lapsed stays gone)
    assert (await store.admit("r5", [check])).remaining == (0,)  # r3's and r5's
    assert await store.admit("r6", [check]) == refused(0, 0.0)


# -- budgets -----------------------------------------------------------------------------------

async def test_budget_is_seeded_then_admits_up_to_exactly_its_limit(store: Store,
                                                                     clock: FakeClock) -> None:
    check = budget(1_000_000, 100_000, clock.now + 3600)
    assert await store.admit("r0", [check]) == Decision(allowed=False, unseeded=(0,))
    assert await store.committed([check]) == [None]

    await store.seed(check, 700_000)
    for request_id, left in (("r1", 200_000), ("r2", 100_000), ("r3", 0)):
        assert (await store.admit(request_id, [check])).remaining == (left,)
    assert await store.admit("r4", [check]) == refused(0, None)
    assert await store.committed([check]) == [1_000_000]

    await store.seed(check, 5)  # never overwrites
    assert await store.committed([check]) == [1_000_000]


async def test_unseeded_lists_every_unseeded_budget_and_reserves_nothing(
        store: Store, clock: FakeClock) -> None:
    ends = clock.now + 3600
    checks = [rpm(1), budget(100, 1, ends, key="b:a"), budget(100, 1, ends, key="b:b"),
              budget(100, 1, ends, key="b:c"), leases(1)]
    await store.seed(checks[2], 0)

    assert await store.admit("r1", checks) == Decision(allowed=False, unseeded=(1, 3))

    assert await store.committed(checks[1:4]) == [None, 0, None]
    assert (await store.admit("r2", [checks[0], checks[4]])).remaining == (0, 0)


async def test_settle_moves_the_budget_by_actual_minus_amount(store: Store,
                                                              clock: FakeClock) -> None:
    check = budget(10_000, 100, clock.now + 3600)
    await store.seed(check, 0)
    await store.admit("r1", [check])
    assert await store.committed([check]) == [100]
    await store.settle("r1", [check], [30])
    assert await store.committed([check]) == [30]
    await store.admit("r2", [check])
    await store.settle("r2", [check], [250])
    assert await store.committed([check]) == [280]


async def test_a_settle_replaces_only_a_reservation_the_counter_holds(
        store: Store, clock: FakeClock) -> None:
    # A counter holds the reservations admitted into it. A settle of one it does not hold
    # (it was admitted into a counter Redis lost since, and the seed that rebuilt it from the
    # ledger did not count what was in flight) adds the actual amount; subtracting a
    # reservation never added would let spend past the cap.
    check = budget(1000, 100, clock.now + 3600)
    await store.seed(check, 0)
    await store.settle("never-admitted", [check], [30])
    assert await store.committed([check]) == [30]
    await store.admit("r1", [check])
    await store.settle("r1", [check], [40])
    await store.settle("r1", [check], [40])  # the second time, r1 is no longer held
    assert await store.committed([check]) == [30 + 40 + 40]


async def test_a_settle_sent_again_changes_only_what_the_request_still_holds(
        redis_store: RedisQuotaStore, clock: FakeClock) -> None:
    # A settle (or an admit) whose reply never came may or may not have run: it is sent
    # again as a resettle, which settles a budget reservation the counter still holds and
    # releases a concurrency lease, and changes nothing a settle that ran changed. Sent as
    # a settle, it would have added the actual amount a second time.
    check = budget(1000, 100, clock.now + 3600)
    lease = leases(1)
    await redis_store.seed(check, 0)
    await redis_store.admit("ran", [check, lease])
    await redis_store.settle("ran", [check, lease], [40, 1])
    await redis_store.resettle([("ran", [check, lease], [40, 1])])
    assert await redis_store.committed([check]) == [40]
    await redis_store.admit("never-settled", [check, lease])
    assert (await redis_store.admit("other", [lease])).allowed is False  # (the lease holds)
    for _ in range(2):
        await redis_store.resettle([("never-settled", [check, lease], [25, 1])])
        assert await redis_store.committed([check]) == [40 + 25]
    assert (await redis_store.admit("other", [lease])).allowed is True


async def test_a_settle_that_comes_after_its_resettle_adds_nothing(
        redis_store: RedisQuotaStore, clock: FakeClock) -> None:
    # The first settle was held back on its way (a proxy, a slow link) and reached Redis
    # after the resettle had replaced the reservation: finding no reservation, it added its
    # actual amount again (100 -> 30 -> 60).
    check = budget(1000, 100, clock.now + 3600)
    await redis_store.seed(check, 0)
    await redis_store.admit("late", [check])
    await redis_store.resettle([("late", [check], [30])])
    await redis_store.settle("late", [check], [30])
    assert await redis_store.committed([check]) == [30]
    await redis_store.settle("late", [check], [30])  # (a third one is a stranger's again)
    assert await redis_store.committed([check]) == [60]


async def test_a_top_up_adds_what_every_counter_has_room_for_and_its_settle_replaces_it(
        store: Store, clock: FakeClock) -> None:
    # A stream past its reservation (stream_cutoff) takes more of its budgets as it goes, no
    # more than each has room for; its settle replaces all it holds with what it cost.
    ends = clock.now + 3600
    small, large = budget(100, 30, ends, key="b:small"), budget(1000, 30, ends, key="b:large")
    for check in (small, large):
        await store.seed(check, 0)
    assert (await store.admit("r1", [small, large])).allowed
    assert (await store.admit("r2", [small])).allowed
    more = [replace(small, amount=30), replace(large, amount=30)]
    assert await store.top_up("r1", more) == 30
    assert await store.top_up("r1", more) == 10  # (what is left of the small one)
    assert await store.top_up("r1", more) == 0
    assert await store.committed([small, large]) == [100, 70]
    await store.settle("r1", [small, large], [45, 45])
    assert await store.committed([small, large]) == [30 + 45, 45]
    # One whose reservation the counter does not hold (it lapsed, or went with a counter
    # Redis lost): what it takes is held, and replaced.
    assert await store.top_up("r3", [replace(large, amount=30)]) == 30
    await store.settle("r3", [large], [50])
    assert await store.committed([small, large]) == [75, 95]
    assert await store.top_up("r4", [budget(100, 5, ends, key="b:unseeded")]) == 0


async def test_a_reservation_whose_settle_never_comes_is_taken_back_after_its_lease(
        store: Store, clock: FakeClock) -> None:
    # A gateway that dies mid-request never settles: its reservation stood until the
    # period's end (a lifetime budget's, for ever). Once its lease_s has passed, a request
    # the budget has no room for otherwise takes it back; a late settle adds what it cost.
    # A stream that takes more of its reservation renews its lease.
    ends = clock.now + 3600
    dead = replace(budget(1000, 800, ends), lease_s=60.0)
    streaming = replace(budget(1000, 100, ends), lease_s=60.0)
    needs = budget(1000, 300, ends)
    await store.seed(dead, 0)
    assert (await store.admit("dead", [dead])).allowed
    assert (await store.admit("stream", [streaming])).allowed
    clock.advance(50)
    assert await store.top_up("stream", [streaming]) == 100
    clock.advance(9)
    assert not (await store.admit("r1", [needs])).allowed  # (not lapsed yet)
    clock.advance(1)
    decision = await store.admit("r1", [needs])
    assert decision.allowed and decision.remaining == (1000 - 200 - 300,)  # (the stream holds)
    await store.settle("dead", [dead], [40])  # late: added
    await store.settle("stream", [streaming], [150])  # replaces all it holds
    assert await store.committed([needs]) == [300 + 40 + 150]


async def test_renew_keeps_the_reservation_of_a_request_still_running(
        store: Store, clock: FakeClock) -> None:
    # A call that runs past lease_s (a long reasoning call, not a stream: nothing tops it up)
    # held its reservation for lease_s from admission only: a request the budget had no room
    # for took it back while its call still spent it. Renewed, it is held lease_s from the
    # renewal; one already taken back, or settled, stays gone.
    ends = clock.now + 3600
    running = replace(budget(1000, 800, ends), lease_s=60.0)
    needs = budget(1000, 300, ends)
    await store.seed(running, 0)
    assert (await store.admit("long", [running])).allowed
    clock.advance(50)
    await store.renew([("long", [running])])
    clock.advance(50)  # 100 s after its admission, 50 after its renewal
    assert not (await store.admit("r1", [needs])).allowed
    clock.advance(11)
    assert (await store.admit("r1", [needs])).allowed  # (lapsed now: taken back)
    await store.renew([("long", [running])])  # (taken back: stays so)
    await store.settle("long", [running], [700])
    assert await store.committed([needs]) == [300 + 700]


async def test_in_flight_reservations_do_not_refund_a_counter_rebuilt_after_a_flush(
        redis_store: RedisQuotaStore, clock: FakeClock, prefix: str) -> None:
    limit = budget(1000, 1000, clock.now + 3600)
    await redis_store.seed(limit, 0)
    assert (await redis_store.admit("q1", [limit])).allowed
    client = aioredis.Redis.from_url(REDIS_URL)
    await client.delete(f"{prefix}:{limit.key}")  # Redis lost it (not what it held)
    await client.aclose()
    assert (await redis_store.admit("q2", [limit])).unseeded == (0,)
    await redis_store.seed(limit, 0)  # the ledger has nothing yet: q1 is still in flight
    assert (await redis_store.admit("q2", [limit])).allowed
    await redis_store.settle("q1", [limit], [10])  # q1 spent 10, on top of q2's 1000
    assert await redis_store.committed([limit]) == [1010]
    assert not (await redis_store.admit("q3", [budget(1000, 990, limit.expires_at)])).allowed


async def test_a_seed_holds_the_reservations_in_flight_it_is_given(
        store: Store, clock: FakeClock) -> None:
    # A counter Redis lost is seeded with what the ledger has and the seeding gateway's
    # requests in flight, whose reservations went with it: the counter holds each again, so
    # only what is left of the budget is admitted meanwhile, and each settle replaces its
    # reservation (an id with a space is a word of the scripts' arguments as the admit's is).
    check = budget(1000, 300, clock.now + 3600)
    assert await store.seed(check, 100, {"q1": 300, "q 2": 300, "q3": 0})
    assert await store.committed([check]) == [700]
    assert not (await store.admit("q4", [budget(1000, 301, check.expires_at)])).allowed
    await store.settle("q1", [check], [40])
    await store.settle("q 2", [check], [50])
    assert await store.committed([check]) == [190]
    await store.settle("q 2", [check], [50])  # no longer held: it adds
    assert await store.committed([check]) == [240]
    assert not await store.seed(check, 0, {"q5": 100})  # never overwrites
    assert await store.committed([check]) == [240]


async def test_settles_that_find_a_budget_counter_lost_are_added_by_its_seed(
        store: Store, clock: FakeClock) -> None:
    # A settle that found the counter lost (Redis flushed, not seeded again yet) changed
    # nothing, and the seed counted the ledger alone, which may not have that request yet
    # (its gateway writes it later): its spend was never counted. It waits beside the
    # counter; the seed adds it, but for the requests the ledger already counts.
    check = budget(1000, 100, clock.now + 3600)
    await store.settle("s1", [check], [40])
    await store.settle("s2", [check], [25])
    await store.settle("s3", [check], [0])  # nothing spent: nothing kept
    assert await store.committed([check]) == [None]
    settles = await store.unseeded_settles(check)
    assert settles == {"s1": 40, "s2": 25}
    await store.settle("s4", [check], [10])  # after they were read: maybe in the ledger too
    assert not await store.seed(check, 500, None, list(settles), ["s1"])
    assert await store.committed([check]) == [None]
    settles = await store.unseeded_settles(check)
    assert await store.seed(check, 500, {"q1": 100}, list(settles), ["s1"])
    assert await store.committed([check]) == [500 + 25 + 10 + 100]
    assert await store.unseeded_settles(check) == {}
    ended = budget(1000, 100, clock.now - BUDGET_SLACK_S - 1, key="budget:ended")
    await store.settle("s5", [ended], [30])  # its period is over: nobody seeds it again
    assert await store.unseeded_settles(ended) == {}


async def test_a_debt_that_takes_longer_than_redis_can_expire_is_kept(
        store: Store, clock: FakeClock) -> None:
    # A usage this absurd (reported upstream) leaves a debt that refills in 6.3 million
    # years: its milliseconds overflowed PEXPIRE, which then deleted the bucket in Redis and
    # admitted the next request the memory store refused. Both keep it (68 years at most).
    check = tpm(1, 1)
    assert (await store.admit("r1", [check])).allowed
    await store.settle("r1", [check], [200_000_000_000_000])
    refused = await store.admit("r2", [check])
    assert not refused.allowed and refused.retry_after_s > 10 ** 14


async def test_settle_never_creates_a_budget_nor_fails_on_missing_state(
        store: Store, clock: FakeClock) -> None:
    money = budget(1000, 100, clock.now + 3600, key="b:never")
    await store.settle("r1", [rpm(10), tpm(100, 5), leases(2), money], [1, 500, 1, 900])
    assert await store.committed([money]) == [None]
    assert (await store.admit("r2", [rpm(10)])).remaining == (9,)
    decision = await store.admit("r3", [tpm(100, 1)])
    assert decision == refused(0, decision.retry_after_s)
    assert decision.retry_after_s == pytest.approx(396 * 0.6)  # 100 + 5 - 500


async def test_budget_counter_expires_after_its_period(store: Store, clock: FakeClock) -> None:
    check = budget(1000, 10, clock.now + 3600)
    await store.seed(check, 500)
    assert (await store.admit("r1", [check])).reset_s == (3600.0,)

    clock.advance(3600 + BUDGET_SLACK_S - 1)  # past the period, within the slack
    assert await store.committed([check]) == [510]
    assert (await store.admit("r2", [check])).reset_s == (0.0,)

    clock.advance(1)
    assert await store.committed([check]) == [None]
    assert await store.admit("r3", [check]) == Decision(allowed=False, unseeded=(0,))
    await store.settle("r2", [check], [0])  # the counter is gone: nothing moves
    await store.seed(check, 7)  # a period that is over stays over
    assert await store.committed([check]) == [None]
    following = budget(1000, 10, clock.now + 3600, key="budget:next")
    await store.seed(following, 7)
    assert await store.committed([following]) == [7]


@pytest.mark.parametrize("make", [lambda end: rpm(0), lambda end: tpm(0, 0),
                                  lambda end: leases(0), lambda end: budget(0, 0, end)],
                         ids=["requests", "tokens", "concurrent", "budget"])
async def test_limit_zero_admits_nothing(store: Store, clock: FakeClock,
                                         make: Callable[[float], Check]) -> None:
    check = make(clock.now + 3600)
    if check.kind == BUDGET:
        assert await store.admit("r0", [check]) == refused(0, None)  # no need to seed
        await store.seed(check, 0)
    assert await store.admit("r1", [check]) == refused(0, None)
    clock.advance(3600)
    assert await store.admit("r2", [check]) == refused(0, None)


async def test_committed_reads_every_counter(store: Store, clock: FakeClock) -> None:
    ends = clock.now + 3600
    first, second = budget(100, 1, ends, key="b:1"), budget(100, 1, ends, key="b:2")
    await store.seed(first, 42)
    assert await store.committed([first, second, rpm(5)]) == [42, None, None]


async def test_one_key_used_for_two_kinds_is_a_store_error(store: Store,
                                                           clock: FakeClock) -> None:
    await store.admit("r1", [rpm(5, key="shared")])
    with pytest.raises(QuotaStoreError):
        await store.admit("r2", [budget(100, 1, clock.now + 60, key="shared")])
    with pytest.raises(QuotaStoreError):
        await store.settle("r2", [leases(2, key="shared")], [1])


async def test_bad_calls_are_bugs_not_store_errors(store: Store) -> None:
    with pytest.raises(ValueError):
        await store.admit("r1", [Check("bananas", "k", 1, 1)])
    with pytest.raises(ValueError):
        await store.settle("r1", [rpm(5)], [1, 2])
    with pytest.raises(ValueError):
        await store.seed(rpm(5), 0)
    with pytest.raises(ValueError):
        await store.admit("r1", [rpm(5), tpm(100, 1, key="rpm:k")])


# -- concurrency -------------------------------------------------------------------------------

async def admit_concurrently(stores: Sequence[Store], check: Check, n: int) -> list[Decision]:
    return await asyncio.gather(*(stores[i % len(stores)].admit(f"r{i}", [check])
                                  for i in range(n)))


@asynccontextmanager
async def peers_of(store: Store, clock: FakeClock) -> AsyncIterator[list[Store]]:
    """The store, and for Redis a second store with its own connection pool, same keys."""
    if isinstance(store, MemoryQuotaStore):
        yield [store]
        return
    other = RedisQuotaStore(store.url, prefix=store.prefix, clock=clock,
                            socket_timeout_s=_SOCKET_TIMEOUT_S)
    await other.startup()
    try:
        yield [store, other]
    finally:
        await other.shutdown()


@pytest.mark.parametrize("kind", ["budget", "requests"])
async def test_200_concurrent_admits_take_exactly_the_limit(store: Store, clock: FakeClock,
                                                            kind: str) -> None:
    check = budget(37 * 1000, 1000, clock.now + 3600) if kind == "budget" else rpm(37)
    if kind == "budget":
        await store.seed(check, 0)
    async with peers_of(store, clock) as stores:
        decisions = await admit_concurrently(stores, check, 200)
    admitted = [d for d in decisions if d.allowed]
    assert len(admitted) == 37
    scale = 1000 if kind == "budget" else 1
    assert sorted(d.remaining[0] for d in admitted) == [i * scale for i in range(37)]
    assert all(d == refused(0, d.retry_after_s) for d in decisions if not d.allowed)
    if kind == "budget":
        assert await store.committed([check]) == [37_000]


# -- identical semantics -----------------------------------------------------------------------

@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_memory_and_redis_decide_identically(prefix: str, seed: int) -> None:
    """A random walk of admits, settles, seeds and clock moves gives equal answers, exactly."""
    rng = random.Random(seed)
    start = float(int(time.time()))
    memory_clock, redis_clock = FakeClock(start), FakeClock(start)
    memory = MemoryQuotaStore(clock=memory_clock, budget_slack_s=100.0)
    shared = RedisQuotaStore(REDIS_URL, prefix=prefix, clock=redis_clock, budget_slack_s=100.0)
    await shared.startup()
    templates: list[Callable[[], Check]] = [
        lambda: rpm(5, key="rpm:a", window_s=10.0),
        lambda: tpm(100, rng.randint(0, 120), key="tpm:a", window_s=30.0),
        lambda: leases(2, key="conc:a", lease_s=20.0),
        lambda: budget(5000, rng.randint(0, 400), start + 4000, key="b:a"),
        lambda: budget(500, rng.randint(0, 200), start + 400, key="b:b"),
    ]
    budgets = [templates[3](), templates[4]()]
    admitted: list[tuple[str, list[Check]]] = []

    async def both(method: str, *args: Any) -> Any:
        expected = await getattr(memory, method)(*args)
        assert await getattr(shared, method)(*args) == expected, (method, args)
        return expected

    try:
        for step in range(400):
            op = rng.random()
            if op < 0.45:
                checks = [make() for make in rng.sample(templates, rng.randint(1, 3))]
                if (await both("admit", f"r{step}", checks)).allowed:
                    admitted.append((f"r{step}", checks))
            elif op < 0.65 and admitted:
                request_id, checks = admitted.pop(rng.randrange(len(admitted)))
                actual = [rng.randint(0, 2 * c.amount + 5) for c in checks]
                await both("settle", request_id, checks, actual)
            elif op < 0.75:
                check, value = rng.choice(budgets), rng.randint(0, 900)
                await both("seed", check, value)
            elif op < 0.85:
                await both("committed", budgets)
            else:
                # (Back too: a gateway whose clock is behind another's never moves a
                # bucket's time back.)
                seconds = rng.choice([0.0, 0.5, 1.25, 3.0, 10.0, 45.0, 150.0, -0.75, -4.0])
                memory_clock.advance(seconds)
                redis_clock.advance(seconds)
    finally:
        await shared.shutdown()


# -- Redis only --------------------------------------------------------------------------------

def command_names(stream: bytes) -> list[bytes]:
    """The name of each command in `stream`, the bytes a client wrote to Redis (RESP arrays
    of bulk strings, which the client's own reply parser reads as lists of bytes)."""
    names, at, buffer = [], 0, bytes(stream)
    while at < len(buffer):
        parsed = resp.parse_reply(buffer, at)
        assert isinstance(parsed, tuple), stream[at:at + 40]  # (not cut off mid-command)
        command, at = parsed
        names.append(command[0].upper())
    return names


async def test_admit_and_settle_are_one_evalsha_each(clock: FakeClock, prefix: str) -> None:
    # Counted on the wire: a relay records every byte the store writes to Redis.
    proxy = TcpProxy(REDIS_PORT)
    await proxy.start()
    redis_store = RedisQuotaStore(f"redis://127.0.0.1:{proxy.port}/0", prefix=prefix,
                                  clock=clock, socket_timeout_s=_SOCKET_TIMEOUT_S)
    await redis_store.startup()
    try:
        checks = [rpm(100), tpm(1000, 10), leases(5), budget(1000, 1, clock.now + 3600)]
        await redis_store.seed(checks[3], 0)
        await redis_store.admit("warm", checks)  # connects and caches the scripts
        await redis_store.settle("warm", checks, [1, 10, 1, 1])
        proxy.sent = bytearray()

        assert (await redis_store.admit("r1", checks)).allowed
        assert command_names(proxy.sent) == [b"EVALSHA"]
        proxy.sent.clear()
        await redis_store.settle("r1", checks, [1, 20, 1, 2])
        assert command_names(proxy.sent) == [b"EVALSHA"]

        admin = aioredis.Redis.from_url(REDIS_URL)
        await admin.script_flush()
        await admin.aclose()
        proxy.sent.clear()
        decision = await redis_store.admit("r2", checks)
        assert decision.allowed and decision.remaining == (97, 960, 4, 996)
        # NOSCRIPT, then the full script
        assert command_names(proxy.sent) == [b"EVALSHA", b"EVAL"]
        proxy.sent.clear()
        await redis_store.admit("r3", checks)
        assert command_names(proxy.sent) == [b"EVALSHA"]
    finally:
        await redis_store.shutdown()
        await proxy.stop()


def test_the_encoded_hot_path_sends_exactly_the_command(clock: FakeClock) -> None:
    """Admission and settles encode EVALSHA themselves, with the part before ARGV made once
    per set of keys: the bytes must be what the general encoder makes of the command."""
    store = RedisQuotaStore(REDIS_URL, prefix="{p}", clock=clock)
    checks = [rpm(100), tpm(1000, 10, key="tpm:ключ"), budget(1000, 1, clock.now + 60)]
    for request_id in ("r1", "r 2", "", "r\n3"):  # and ids the ARGV string cannot carry
        for script in (ADMIT, SETTLE):
            args = [f"{_args(check)}" for check in checks]
            expected = resp.encode_command(("EVALSHA", *store._command(script, request_id,
                                                                        checks, args)))
            assert store._payload(script, request_id, checks, args) == expected
            assert store._payload(script, request_id, checks, args) == expected  # memo


def test_a_template_encodes_once_and_sends_exactly_the_command(clock: FakeClock) -> None:
    """Checks planned from one template (plan.Templated, with its memo) are encoded from the
    template's format: the bytes must be what the general encoder makes of the command,
    amounts and actual amounts included, for every request of the template."""
    store = RedisQuotaStore(REDIS_URL, prefix="{p}", clock=clock)
    memo: dict[Any, Any] = {}
    for amounts, actual in (((1, 10, 1, 7), [1, 12, 1, 5]), ((1, 999, 1, 0), [0, 0, 0, 0])):
        checks = templated([rpm(100), tpm(1000, amounts[1], key="tpm:ключ"), leases(5),
                         budget(1000, amounts[3], clock.now + 60)], memo)
        wire = store.wire(checks)
        assert wire is not None and memo[store] is wire
        for request_id in ("r1", "r 2", "", "ключ", "a\tb"):
            admit = [*map(_args, checks), _hold_word(checks)]
            settle = [f"{_args(check)} {used}" for check, used in zip(checks, actual)]
            for script, args, head, sent in (
                    (ADMIT, admit, wire.admit_head, wire.admit_args(checks)),
                    (SETTLE, settle, store._head(SETTLE, tuple([c.key for c in checks])),
                     wire.settle_args(checks, actual))):
                expected = resp.encode_command(("EVALSHA", *store._command(
                    script, request_id, checks, args)))
                assert store._framed(head, store._argv(request_id, [sent])) == expected
                prefix = store._prefix_args(request_id).encode()
                assert store.argv_prefix(request_id) == prefix  # (the Lane's, inlined)
                assert store.argv_prefix(request_id, "0x1p+0") == \
                    store._prefix_args(request_id, "0x1p+0").encode()
                whole = wire.admit_payload(prefix, checks) if script is ADMIT \
                    else store.settle_batch_payload(
                        [wire.keys], wire.count, [wire.settle_argv(prefix, checks, actual)])
                assert whole == expected  # what the hot paths send (a batch of one settle)
        with pytest.raises(ValueError, match="one actual amount per check"):
            wire.settle_args(checks, actual[:2])
        prefix = store._prefix_args("r1").encode()
        with pytest.raises(ValueError, match="this template's checks"):
            wire.admit_payload(prefix, checks[:3])
        with pytest.raises(ValueError, match="this template's checks"):
            wire.settle_argv(prefix, [*checks, rpm(1)], actual)


def test_a_template_is_validated_once_and_anything_else_every_time() -> None:
    """What `validate` checks (kinds, windows, one key per check) is the same for every
    request of a template, so its memo remembers it; the actual amounts' count, and lists that
    are not a whole template, are checked on every call."""
    memo: dict[Any, Any] = {}
    checks = templated([rpm(100), tpm(1000, 10), budget(1000, 5, 60.0)], memo)
    validate(checks)
    assert memo["valid"] == 3
    validate(checks)  # (from the memo)
    with pytest.raises(ValueError, match="one actual amount per check"):
        validate(checks, [1, 2])
    with pytest.raises(ValueError, match="share a storage key"):
        validate([rpm(100), rpm(100)])  # a plain list: no memo, checked
    shorter = templated([rpm(100), rpm(100)], memo)  # not the template the memo holds
    with pytest.raises(ValueError, match="share a storage key"):
        validate(shorter)
    with pytest.raises(ValueError, match="window_s above zero"):
        validate(templated([rpm(100, window_s=0.0)], {}))


async def test_templates_admit_and_settle_like_plain_lists(store: Store, clock: FakeClock
                                                           ) -> None:
    """The same decisions and the same state with or without a template's memo."""
    memo: dict[Any, Any] = {}
    seed = budget(100, 0, clock.now + 3600)
    await store.seed(seed, 0)
    for step in range(6):
        checks = templated([rpm(4), budget(100, 30, clock.now + 3600)], memo)
        decision = await store.admit(f"r{step}", checks)
        if step < 3:
            assert decision.allowed and decision.remaining == (3 - step, 70 - 30 * step)
            await store.settle(f"r{step}", checks, [1, 30])
        else:  # the budget is spent (3 x 30, and 30 more does not fit)
            assert decision == refused(1)


async def test_settle_soon_lands_without_anyone_awaiting_it(store: Store,
                                                            clock: FakeClock) -> None:
    """The layer's path: settles queued together, written at once, replies not awaited.
    Every backend (and every Redis topology: a Cluster or Sentinel falls back to a task)
    applies them; shutdown lets the last ones land."""
    ends = clock.now + 3600
    checks = [rpm(100), budget(1000, 10, ends)]
    await store.seed(checks[1], 0)
    for request_id in ("a", "b", "c"):
        assert (await store.admit(request_id, checks)).allowed
    store.settle_soon([("a", checks, [1, 4]), ("b", checks, [1, 25]), ("c", checks, [1, 0])])
    if isinstance(store, RedisQuotaStore):
        await store.shutdown()  # waits for them to land (the memory store settles at once)
        await store.startup()
    assert await store.committed([checks[1]]) == [29]


async def test_settle_soon_settles_a_batch_as_one_call_each_on_its_own(
        redis_store: RedisQuotaStore, clock: FakeClock, prefix: str,
        caplog: pytest.LogCaptureFixture) -> None:
    """settle_soon's batch (one call of the settle script for requests of different
    templates, and a plain list) leaves what settling each alone leaves (the memory store's
    state, checked through its answers); one request that cannot be settled (its key holds
    something else) is logged, and the others are settled anyway."""
    memory = MemoryQuotaStore(clock=clock)
    ends = clock.now + 3600
    memo_a: dict[Any, Any] = {}
    memo_b: dict[Any, Any] = {}

    def first(amount: int) -> list[Check]:
        return templated([rpm(10), tpm(1000, amount), budget(5000, 40, ends)], memo_a)

    def second() -> list[Check]:
        return templated([leases(2), budget(700, 25, ends, key="budget:other")], memo_b)

    plain = [tpm(500, 100, key="tpm:plain")]
    batch: list[tuple[str, Sequence[Check], Sequence[int]]] = [
        ("r1", first(300), [1, 120, 55]), ("r2", second(), [1, 9]),
        ("r3", first(200), [1, 260, 30]), ("r4", plain, [150]), ("r5", second(), [1, 0])]
    for store in (memory, redis_store):
        await store.seed(first(0)[2], 100)
        await store.seed(second()[1], 0)
        for request_id, checks, _actual in batch:
            assert (await store.admit(request_id, checks)).allowed
        store.settle_soon(batch)
    await redis_store.shutdown()  # (lets the unawaited call land)
    await redis_store.startup()
    assert await redis_store.committed([first(0)[2], second()[1]]) == \
        await memory.committed([first(0)[2], second()[1]]) == [100 + 55 + 30, 9 + 0]
    probes = [first(1), second(), second(), second(), [tpm(500, 1, key="tpm:plain")]]
    for checks in probes:  # (the buckets' levels, and the leases: both were released)
        assert await redis_store.admit("probe", checks) == await memory.admit("probe", checks)

    # A key of the batch holding a string: that request fails, the two around it settle.
    admin = aioredis.Redis.from_url(REDIS_URL)
    await admin.set(f"{prefix}:tpm:broken", "not a bucket")
    await admin.aclose()
    money = budget(5000, 10, ends, key="budget:third")
    await redis_store.seed(money, 0)
    for request_id in ("s1", "s3"):
        assert (await redis_store.admit(request_id, [money])).allowed
    redis_store.settle_soon([("s1", [money], [15]), ("s2", [tpm(100, 5, key="tpm:broken")], [1]),
                             ("s3", [money], [20])])
    await redis_store.shutdown()
    await redis_store.startup()
    assert await redis_store.committed([money]) == [15 + 20]  # (each reserved 10)
    assert "settling 3 request(s) in Redis failed (ERR 1 of 3 settles failed: WRONGTYPE" \
        in caplog.text


async def test_a_burst_of_settles_goes_in_calls_of_at_most_the_batch_size(
        redis_store: RedisQuotaStore, clock: FakeClock) -> None:
    """A long script holds Redis, and every other gateway's admissions with it: a burst of
    settles is cut into calls of SETTLE_BATCH_MAX, all in one write, all applied."""
    memo: dict[Any, Any] = {}
    ends = clock.now + 3600

    def checks() -> list[Check]:
        return templated([rpm(1000), budget(100_000, 10, ends)], memo)

    await redis_store.seed(checks()[1], 0)
    count = 2 * SETTLE_BATCH_MAX + 5
    for i in range(count):
        assert (await redis_store.admit(f"r{i}", checks())).allowed
    client = redis_store.direct_client()
    assert client is not None
    sent = client.commands_sent
    redis_store.settle_soon([(f"r{i}", checks(), [1, i]) for i in range(count)])
    assert client.commands_sent - sent == 3
    await redis_store.shutdown()
    await redis_store.startup()
    assert await redis_store.committed([checks()[1]]) == [sum(range(count))]


async def test_settle_soon_after_a_script_flush_reloads_the_script(
        redis_store: RedisQuotaStore, clock: FakeClock) -> None:
    checks = [budget(1000, 10, clock.now + 3600)]
    await redis_store.seed(checks[0], 0)
    assert (await redis_store.admit("r1", checks)).allowed  # connected, script cached
    admin = aioredis.Redis.from_url(REDIS_URL)
    await admin.script_flush()
    await admin.aclose()
    redis_store.settle_soon([("r1", checks, [7])])  # NOSCRIPT, then EVAL in a task
    await redis_store.shutdown()
    await redis_store.startup()
    assert await redis_store.committed(checks) == [7]


async def test_templated_checks_reload_the_script_after_a_flush(
        redis_store: RedisQuotaStore, clock: FakeClock) -> None:
    """The encoded paths (admit's whole payload, settle_soon's) fall back to EVAL on
    NOSCRIPT with the same arguments."""
    memo: dict[Any, Any] = {}

    def checks() -> list[Check]:
        return templated([rpm(10), budget(1000, 10, clock.now + 3600)], memo)

    await redis_store.seed(checks()[1], 0)
    assert (await redis_store.admit("r1", checks())).allowed
    admin = aioredis.Redis.from_url(REDIS_URL)
    await admin.script_flush()
    decision = await redis_store.admit("r2", checks())  # NOSCRIPT, then EVAL
    assert decision.allowed and decision.remaining[1] == 980
    await admin.script_flush()
    redis_store.settle_soon([("r1", checks(), [1, 3]), ("r2", checks(), [1, 4])])
    await redis_store.shutdown()
    await redis_store.startup()
    await admin.aclose()
    assert await redis_store.committed([checks()[1]]) == [7]


async def test_a_settle_lost_with_its_connection_is_logged(
        clock: FakeClock, prefix: str, caplog: pytest.LogCaptureFixture) -> None:
    proxy = TcpProxy(6379)
    await proxy.start()
    store = RedisQuotaStore(f"redis://127.0.0.1:{proxy.port}/0", prefix=prefix, clock=clock)
    await store.startup()
    try:
        checks = [rpm(100)]
        assert (await store.admit("r1", checks)).allowed
        store.settle_soon([("r1", checks, [1])])  # written on the next loop step...
        await proxy.stop()  # ...to a connection that is gone by then
        for _ in range(100):
            if "settling 1 request(s)" in caplog.text:
                break
            await asyncio.sleep(0.02)
        assert "settling 1 request(s) in Redis failed" in caplog.text
    finally:
        await store.shutdown()
        await proxy.stop()


async def test_redis_keys_expire_when_they_no_longer_matter(redis_store: RedisQuotaStore,
                                                            clock: FakeClock) -> None:
    ends = clock.now + 3600.5
    checks = [tpm(120, 60), leases(3, lease_s=30.0), budget(100, 1, ends)]
    await redis_store.seed(checks[2], 0)
    await redis_store.admit("r1", checks)
    admin = aioredis.Redis.from_url(REDIS_URL)
    try:
        keys = [f"{redis_store.prefix}:{check.key}" for check in checks]
        bucket_ms, leases_ms = await admin.pttl(keys[0]), await admin.pttl(keys[1])
        assert 90_000 <= bucket_ms <= 120_000  # two windows (full again after 30 s, + a window)
        assert 25_000 <= leases_ms <= 30_000  # the latest lease
        at_ms = await admin.pexpiretime(keys[2])
        assert at_ms == int((ends + BUDGET_SLACK_S) * 1000)
        for beside in (":held", ":until"):  # (the reservations, kept as long as the counter)
            assert await admin.pexpiretime(keys[2] + beside) == at_ms
    finally:
        await admin.aclose()


async def test_unreachable_redis_is_a_store_error(clock: FakeClock) -> None:
    store = RedisQuotaStore("redis://127.0.0.1:1/0", clock=clock)
    await store.startup()  # no I/O: the gateway starts while Redis is down
    check = budget(100, 1, clock.now + 60)
    calls: list[Callable[[], Awaitable[Any]]] = [
        lambda: store.admit("r1", [check]), lambda: store.settle("r1", [check], [1]),
        lambda: store.seed(check, 0), lambda: store.committed([check])]
    for call in calls:
        with pytest.raises(QuotaStoreError):
            await asyncio.wait_for(call(), 10)
    assert await store.ping() is False
    await store.shutdown()


async def test_a_store_that_was_not_started_is_a_store_error() -> None:
    with pytest.raises(QuotaStoreError):
        await RedisQuotaStore().admit("r1", [rpm(1)])


async def test_a_silent_redis_times_out_as_a_store_error(clock: FakeClock) -> None:
    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the client hangs up
        writer.close()

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    store = RedisQuotaStore(f"redis://127.0.0.1:{port}/0", socket_timeout_s=0.2, clock=clock)
    await store.startup()
    try:
        with pytest.raises(QuotaStoreError):
            await asyncio.wait_for(store.admit("r1", [rpm(1)]), 10)
    finally:
        await store.shutdown()
        server.close()


async def test_the_store_recovers_when_redis_comes_back(clock: FakeClock, prefix: str) -> None:
    proxy = TcpProxy(6379)
    await proxy.start()
    store = RedisQuotaStore(f"redis://127.0.0.1:{proxy.port}/0", prefix=prefix, clock=clock)
    await store.startup()
    try:
        assert (await store.admit("r1", [rpm(10)])).remaining == (9,)

        await proxy.stop()
        with pytest.raises(QuotaStoreError):
            await asyncio.wait_for(store.admit("r2", [rpm(10)]), 10)
        assert await store.ping() is False

        await proxy.start()  # same port
        assert (await store.admit("r3", [rpm(10)])).remaining == (8,)
        assert await store.ping() is True
    finally:
        await store.shutdown()
        await proxy.stop()


# -- memory only -------------------------------------------------------------------------------

async def test_memory_store_forgets_idle_state(clock: FakeClock) -> None:
    store = MemoryQuotaStore(clock=clock)
    for i in range(50):
        checks = [rpm(10, key=f"rpm:{i}"), leases(2, key=f"c:{i}"),
                  budget(100, 1, clock.now + 60, key=f"b:{i}")]
        await store.seed(checks[2], 0)
        await store.admit(f"r{i}", checks)
    assert len(store) == 150

    clock.advance(121)  # buckets idle for two windows, leases gone; budgets still held
    await store.admit("x", [])
    assert len(store) == 50

    clock.advance(BUDGET_SLACK_S)
    await store.admit("x", [rpm(1, key="rpm:new")])
    assert len(store) == 1


@pytest.mark.parametrize("reply", [b"", b"1 5 0.5", b"[]", b"[7,1]", b"{}", b"5",
                                   b"[1,\"x\",1]", b"[1,5,\"later\"]", b"[0,1,\"soon\"]",
                                   b"[2,\"a\"]", b"[0,null,1]"])
def test_a_nonsense_admit_reply_is_a_store_error(reply: bytes) -> None:
    """Whatever the admit script's reply turns into, a caller sees QuotaStoreError (which
    the layer answers by each limit's on_store_error), never another exception."""
    from middleware.quota import store_redis

    with pytest.raises((AttributeError, IndexError, TypeError, ValueError)):
        store_redis._decision(reply)  # (what RedisQuotaStore.admit turns into QuotaStoreError)
