"""A Lane (middleware/quota/lane.py) against the quota layer's general path.

The first tests hold a Lane to the general path's own encoding and reading, template by
template: the same admit and settle commands, byte for byte, the same checks when it hands a
settle back, and the same response headers from the same reply. The rest run the layer with
the Redis store, where every admission tries its Lane first, through what a Lane hands back to
the general path: a script Redis lost (before the admission, and before the settle), a
refusal (answered from the Lane's one reply, with no second round trip), and budget counters
to seed.
"""
from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime

import httpx
import orjson
import pytest
import redis

from gateway.context import OPENAI_CHAT, RequestContext
from gateway.policy import Budget, Check, Limits
from middleware.quota import RedisQuotaStore, _admitted, plan
from middleware.quota.lane import Lane, lane_for
from middleware.quota.store_redis import SETTLE
from tests.harness import TEST_KEY
from tests.middleware.test_quota_layer import (
    COST,
    INPUT,
    KEY_ID,
    OUTPUT,
    PROMPT,
    REDIS_URL,
    RESERVED_100,
    Gateway,
    Start,
    auth,
    budget_check,
    eventually,
    prefix,
    quota,
    redis_store,
    settled,
    slow,
    slow_mock,
    start,
    static_key,
    wait_streams_done,
)
from tests.mock_providers import MockProviderServer

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
PREFIX = b"0x1.9e3f4c8p+30 req-1 86400.0 "

TEMPLATES = {
    "rpm": [("key", "k1", Limits(rpm=60))],
    "tpm and budget": [("key", "k1", Limits(tpm=10_000)),
                       ("project", "p1", Limits(budgets=(Budget("5", period="monthly"),)))],
    "every kind": [("key", "k1", Limits(rpm=60, tpm=10_000, max_concurrent=4,
                                       budgets=(Budget("2.5", period="daily"),))),
                   ("global", "all", Limits(max_concurrent=1_000))],
    "budget only": [("customer", "p1/c1", Limits(budgets=(Budget("1", period="lifetime"),)))],
    "two of each": [("key", "k1", Limits(rpm=60, tpm=10_000,
                                        budgets=(Budget("1", period="daily"),))),
                    ("project", "p1", Limits(rpm=600, tpm=50_000,
                                             budgets=(Budget("9", period="monthly"),))),
                    ("global", "all", Limits(rpm=6_000))],
    "concurrency only": [("key", "k1", Limits(max_concurrent=2))],
}


def lane_and_general(name: str, est: plan.Estimate) -> tuple[
        Lane, RedisQuotaStore, plan.Templated[plan.Planned], plan.Templated[Check]]:
    """A Lane for the template `name` in a new store, and what the general path plans for a
    request of `est`."""
    store = RedisQuotaStore(REDIS_URL, prefix="{sgq-lane}")
    compiled = plan.template(TEMPLATES[name], NOW, 900.0)
    planned, checks = plan.planned_from(compiled, est)
    lane = lane_for(store, compiled)
    assert lane_for(store, compiled) is lane  # made once per template and store
    assert lane.planned is planned
    return lane, store, planned, checks


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_a_lane_sends_the_commands_of_the_general_path(name: str) -> None:
    est = plan.Estimate(123, 7, 477)
    lane, store, _planned, checks = lane_and_general(name, est)
    wire = store.wire(checks)  # type: ignore[arg-type]
    assert wire is not None
    assert lane.admit_payload(PREFIX, 130, 477) == wire.admit_payload(
        PREFIX, checks)  # type: ignore[arg-type]
    actual = plan.actual_amounts(checks, 95, 301)  # type: ignore[arg-type]
    # A batch of one settle is the general path's single settle, byte for byte.
    names = tuple([check.key for check in checks])
    assert store.settle_batch_payload(
        [lane.settle_keys], lane.key_count, [lane.settle_argv(PREFIX, 130, 477, 95, 301)]
    ) == store._framed(store._head(SETTLE, names),
                       PREFIX.decode() + wire.settle_args(checks, actual))  # type: ignore[arg-type]
    assert lane.checks(est) == list(checks)


@pytest.mark.parametrize("name", list(TEMPLATES))
@pytest.mark.parametrize("numbers", [(7, 0.25, 9_000, 61.0, 1_234_567, 86_400.0, 7, 3.5),
                                     (0, 59.01, 0, 3723.2, -40, 0.0, 0, 1.0),
                                     (1, 6e-07, 3, 1.0, 0, 12.5, 9, 2.0),
                                     (5, 1.0, 5, 2.0, 5, 3.0, 5, 4.0)])  # ties: the first
def test_a_lane_reads_an_admitted_reply_as_the_general_path_does(
        name: str, numbers: tuple[float, ...]) -> None:
    """Against the loop (a plain list has no memo, so no made code): the tightest limit of
    each kind, the least budget left, the same texts."""
    lane, store, planned, _checks = lane_and_general(name, plan.Estimate(3, 7, 10))
    values: list[float] = [1]
    for index in range(len(planned)):
        values += [int(numbers[(2 * index) % 8]), numbers[(2 * index + 1) % 8]]
    reply = orjson.dumps(values)
    decision = store.decision(reply)
    loop = plan.rate_limit_headers(list(planned), decision)
    assert lane.headers(orjson.loads(reply)) == loop
    assert plan.rate_limit_headers(planned, decision) == loop  # the template's made code
    assert bool(loop) == (name != "concurrency only")


@pytest.mark.parametrize("reply", [
    b'[1,"7",0.25,9000,61.0]',  # a count as a string (the general path reads it)
    b'[1,7,0.25]',  # too short for the template (two checks)
    b'[1,7,0.25,9000,61.0,5,5.0]',  # too long
    b'[0,1,null]',  # refused
    b'[2,2]',  # a budget counter to seed
    b'{"admitted":1}',
    b"not json",
    7,
])
def test_a_lane_hands_back_any_reply_but_a_plain_admission(reply: object) -> None:
    lane, _store, _planned, _checks = lane_and_general("tpm and budget",
                                                       plan.Estimate(3, 7, 10))
    ctx = RequestContext(request_id="r", operation=OPENAI_CHAT, api_format="openai", body={},
                         raw_body=b"{}", model="gpt-mock", stream=False)
    assert _admitted(reply, lane, ctx) is None
    assert ctx.response_headers == []  # the general path adds what it makes of the reply
    admitted = _admitted(b"[1,7,0.25,9000,61.0]", lane, ctx)
    assert admitted == [1, 7, 0.25, 9000, 61.0]
    assert dict(ctx.response_headers)[b"x-ratelimit-remaining-tokens"] == b"7"


# -- the layer, with what a Lane hands back ------------------------------------------------------

__all__ = ["prefix", "slow", "slow_mock", "start"]  # the quota layer tests' fixtures, used here

LIFETIME_1000 = "Limits(budgets=(Budget('0.001', period='lifetime'),))"  # 1,000 micro-dollars


def sent(gateway: Gateway) -> int:
    """The commands the gateway's quota store has sent to Redis (reading the budget through
    the store would send one more: tests that count read Redis themselves)."""
    client = gateway.quota.store._client  # type: ignore[attr-defined]
    return int(client.commands_sent)


def counter(shared: redis.Redis, prefix: str) -> int | None:
    """The key's lifetime budget counter, read by the test's own client."""
    value = shared.get(f"{prefix}:{budget_check('lifetime').key}")
    return None if value is None else int(value)


@pytest.fixture
def shared() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL)
    yield client
    client.close()


def test_an_admission_after_redis_lost_its_scripts_is_sent_whole(
        start: Start, prefix: str, shared: redis.Redis) -> None:
    gateway = start(auth(static_key(LIFETIME_1000)), quota(redis_store(prefix)))
    assert gateway.chat().status_code == 200
    assert settled(gateway.committed, None) == COST
    shared.script_flush()
    response = gateway.chat()  # the Lane's EVALSHA: NOSCRIPT; the general path: EVAL
    assert response.status_code == 200
    assert response.headers["x-sluicegate-budget-remaining"] == "0.000940"  # 1000 - 2 x 30
    assert settled(gateway.committed, None) == 2 * COST


def test_a_settle_after_redis_lost_its_scripts_is_sent_whole(
        start: Start, prefix: str, shared: redis.Redis, slow: MockProviderServer) -> None:
    """The settle of a Lane admission, sent unawaited, meets NOSCRIPT and is sent again
    whole: the reservation (max_tokens=100) still comes down to the actual cost."""
    gateway = start(auth(static_key(LIFETIME_1000)), quota(redis_store(prefix)),
                    upstream=slow.url)
    assert gateway.chat().status_code == 200  # loads the scripts
    assert settled(gateway.committed, None) == COST
    done = threading.Event()

    def stream() -> None:
        body = {"model": "gpt-mock", "messages": PROMPT, "max_tokens": 100, "stream": True}
        with httpx.stream("POST", gateway.url + "/v1/chat/completions", json=body,
                          headers={"authorization": f"Bearer {TEST_KEY}"}, timeout=30) as r:
            assert r.status_code == 200
            for _ in r.iter_bytes():
                pass
        done.set()

    thread = threading.Thread(target=stream)
    thread.start()
    assert settled(gateway.committed, COST) == COST + RESERVED_100  # admitted, streaming
    shared.script_flush()
    thread.join(timeout=30)
    assert done.is_set()
    wait_streams_done(slow)
    assert settled(gateway.committed, COST + RESERVED_100) == 2 * COST


def test_a_refusal_takes_one_round_trip(start: Start, prefix: str,
                                        shared: redis.Redis) -> None:
    """The Lane's reply refuses; the general path answers from it without asking again."""
    gateway = start(auth(static_key("Limits(rpm=1, max_concurrent=5)")),
                    quota(redis_store(prefix)))
    assert gateway.chat().status_code == 200
    leases = f"{prefix}:key:{KEY_ID}:concurrent"
    assert eventually(lambda: shared.zcard(leases), 0) == 0  # settled: the lease is gone
    before = sent(gateway)
    refused = gateway.chat()
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert sent(gateway) == before + 1  # one admit, nothing to settle


def test_a_new_budget_counter_is_seeded_then_admitted(
        start: Start, prefix: str, shared: redis.Redis) -> None:
    """The Lane's reply says the budget counter is missing (a fresh period here): the
    general path seeds it and admits; the next request goes through the Lane alone, one
    command before the call and one (the settle) after it."""
    gateway = start(auth(static_key(LIFETIME_1000)), quota(redis_store(prefix)))
    first = gateway.chat(max_tokens=100)
    assert first.status_code == 200
    assert first.headers["x-sluicegate-budget-remaining"] == f"0.000{1000 - RESERVED_100}"
    assert eventually(lambda: counter(shared, prefix), COST) == COST  # settled
    before = sent(gateway)
    second = gateway.chat(max_tokens=100)
    assert second.status_code == 200
    assert second.headers["x-sluicegate-budget-remaining"] == f"0.000{1000 - COST - RESERVED_100}"
    assert eventually(lambda: counter(shared, prefix), 2 * COST) == 2 * COST  # settled
    assert sent(gateway) == before + 2


def test_reservations_through_the_lane_match_the_estimate(start: Start, prefix: str) -> None:
    gateway = start(auth(static_key("Limits(tpm=1000)")), quota(redis_store(prefix)))
    response = gateway.chat(max_tokens=100)
    assert response.status_code == 200
    # Reserved: the input estimate plus the output bound, before the settle refunds.
    assert response.headers["x-ratelimit-remaining-tokens"] == str(1000 - INPUT - 100)
    later = gateway.chat()
    assert int(later.headers["x-ratelimit-remaining-tokens"]) >= 1000 - 2 * (INPUT + OUTPUT) - 1


@pytest.mark.parametrize("topology", ["sentinel_redis", "cluster_redis"])
def test_settles_reach_a_sentinel_primary_and_a_cluster(
        start: Start, prefix: str, topology: str, request: pytest.FixtureRequest) -> None:
    """Behind Sentinel a Lane admits (its client takes encoded commands) but cannot send its
    settles unawaited (a READONLY reply must move the client): they go the general path's
    way, in a task. A Cluster routes by key, so the general path admits there. Either way the
    reservation (max_tokens=100) comes down to the actual cost."""
    url = request.getfixturevalue(topology).url
    gateway = start(auth(static_key(LIFETIME_1000)), quota(redis_store(prefix, url)))
    assert gateway.chat().status_code == 200  # seeds the budget counter (the general path)
    assert settled(gateway.committed, None) == COST
    response = gateway.chat(max_tokens=100)  # the Lane, behind Sentinel
    assert response.status_code == 200
    assert response.headers["x-sluicegate-budget-remaining"] == \
        f"0.000{1000 - COST - RESERVED_100}"
    assert settled(gateway.committed, COST + RESERVED_100) == 2 * COST
