"""Scaling out: three gateway processes sharing one Redis and one PostgreSQL behave as one.

The acceptance test of "observability and deployment": three `sluicegate serve` processes
(one worker each) run ONE config with every layer on the shared stores, in the default order
(top = outermost):

- auth: keys in PostgreSQL (`PostgresKeyStore`, a schema and NOTIFY channel of this run's
  own), admin API on; every key used here is created through it;
- metering: usage into PostgreSQL (`PostgresUsageStore`, table prefix of this run's own), a
  journal directory of this module's own (so no other test's journal is replayed into it);
- quota: `RedisQuotaStore` under a key prefix of this run's own;
- cache: `RedisCacheStore` under another prefix of this run's own;
- failover: `RedisHealth` (prefix of this run's own), and a primary/fallback pair of mock
  servers of this module's own ("primary" on mock A, falling back to "backup" on mock B).

A tiny round-robin client sends request i to process i % 3 (tests that need one process name
it) and keeps the `x-request-id` and status of every API answer, so the last test can check
that usage landed exactly once. Everything this run created in Redis and PostgreSQL is deleted
afterwards.
"""
from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import redis
from psycopg import sql

from gateway.context import Usage
from gateway.policy import micros_to_usd
from gateway.pricing import Price, cost_micros, estimate_micros
from gateway.tokens import estimate_messages
from tests.harness import mock_config, start_cli_gateway, stop_process, write_config
from tests.middleware.test_metering import assert_rollups_match_events
from tests.mock_providers import MockConfig, MockProviderServer

REDIS_URL = "redis://127.0.0.1:6379/0"
PG_DSN = "host=127.0.0.1 port=5432 user=root dbname=test"
ADMIN_TOKEN = "scale-out-admin-token-0123456789abcdef"
ADMIN_ENV = "SG_SCALE_OUT_ADMIN"
PROCESSES = 3

# The harness prices every mock model at $1 per 1M input tokens and $2 per 1M output tokens.
PRICE = Price(input_per_mtok=Decimal(1), output_per_mtok=Decimal(2))
# As in tests/middleware/test_quota_multiprocess.py: six one-letter words are estimated at 9
# input tokens and counted as 9 by the mock, whose reply is cut to max_tokens words, so a
# request reserves exactly what it then uses: 9 + 5 tokens, 9 * 1 + 5 * 2 = 19 micro-dollars.
MESSAGES = [{"role": "user", "content": "a b c d e f"}]
MAX_TOKENS = 5
CHAT = {"model": "gpt-mock", "max_tokens": MAX_TOKENS, "messages": MESSAGES}
RESERVED_MICROS = estimate_micros(PRICE, estimate_messages(MESSAGES), MAX_TOKENS)

RPM = 12  # the bucket refills one request every 60 / 12 = 5 s
BUDGET_REQUESTS = 10  # what the budget admits


# -- the round-robin client --------------------------------------------------------------------

@dataclass(frozen=True)
class Reply:
    """One API answer as the client saw it."""

    process: int
    status: int
    request_id: str
    code: str | None  # the OpenAI error code of a refusal
    headers: httpx.Headers
    body: Any


class RoundRobin:
    """Sends API request i to process i % 3 (or to a named process) and keeps every answer's
    `x-request-id` and status in `seen`."""

    def __init__(self, urls: list[str]) -> None:
        self.urls = urls
        self.http = httpx.Client(timeout=30, limits=httpx.Limits(max_connections=32))
        self.seen: list[Reply] = []
        self._sent = 0
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(len(urls), thread_name_prefix="round-robin")

    def close(self) -> None:
        self._pool.shutdown()
        self.http.close()

    def _next(self) -> int:
        with self._lock:
            index = self._sent
            self._sent += 1
        return index % len(self.urls)

    def chat(self, key: str, body: dict[str, Any], *, process: int | None = None) -> Reply:
        index = self._next() if process is None else process
        response = self.http.post(self.urls[index] + "/v1/chat/completions", json=body,
                                  headers={"authorization": f"Bearer {key}"})
        return self._keep(index, response, response.json())

    def stream(self, key: str, body: dict[str, Any]) -> Reply:
        index = self._next()
        with self.http.stream("POST", self.urls[index] + "/v1/chat/completions",
                              json={**body, "stream": True,
                                    "stream_options": {"include_usage": True}},
                              headers={"authorization": f"Bearer {key}"}) as response:
            text = response.read().decode()
        return self._keep(index, response, text)

    def wave(self, key: str, body: dict[str, Any]) -> list[Reply]:
        """The next len(urls) requests, sent at once: one to each process."""
        targets = [self._next() for _ in self.urls]
        return list(self._pool.map(lambda p: self.chat(key, body, process=p), targets))

    def _keep(self, process: int, response: httpx.Response, body: Any) -> Reply:
        error = body.get("error") if isinstance(body, dict) else None
        reply = Reply(process, response.status_code, response.headers["x-request-id"],
                      error.get("code") if isinstance(error, dict) else None,
                      response.headers, body)
        with self._lock:
            self.seen.append(reply)
        return reply

    def admin(self, process: int, method: str, path: str,
              json: dict[str, Any] | None = None) -> httpx.Response:
        return self.http.request(method, self.urls[process] + path, json=json,
                                 headers={"authorization": f"Bearer {ADMIN_TOKEN}"})


@dataclass
class Cluster:
    urls: list[str]
    client: RoundRobin
    primary: MockProviderServer  # mock A: the "primary" model's upstream
    fallback: MockProviderServer  # mock B: "backup", the fallback
    quota_prefix: str
    cache_prefix: str
    usage_prefix: str
    project: str

    def new_key(self, limits: dict[str, Any] | None = None, *, process: int = 0
                ) -> tuple[str, str]:
        """(plaintext, id) of a new key of this run's project, created on `process`."""
        body: dict[str, Any] = {"project": self.project}
        if limits is not None:
            body["limits"] = limits
        created = self.client.admin(process, "POST", "/admin/keys", body)
        assert created.status_code == 201, created.text
        return created.json()["key"], created.json()["id"]


# -- the three processes -----------------------------------------------------------------------

def cluster_config(mock_url: str, primary: MockProviderServer, fallback: MockProviderServer,
                   *, schema: str, channel: str, usage_prefix: str, journal: Path,
                   quota_prefix: str, cache_prefix: str, health_prefix: str) -> str:
    """The harness's config module (its models and prices) plus primary/backup, with every
    layer on the shared stores."""
    extra = f"""
from middleware.auth import PostgresKeyStore
from middleware.cache.stores import RedisCacheStore
from middleware.failover import RedisHealth, Route
from middleware.metering import PostgresUsageStore
from middleware.quota import RedisQuotaStore

providers["a"] = Provider("openai", base_url={primary.base_url("openai")!r},
                          api_key_env="MOCK_PROVIDER_KEY", timeouts=fast)
providers["b"] = Provider("openai", base_url={fallback.base_url("openai")!r},
                          api_key_env="MOCK_PROVIDER_KEY", timeouts=fast)
models["primary"] = [Deployment("a", "gpt-4o-mini", price=MOCK_PRICE)]
models["backup"] = [Deployment("b", "gpt-4o-mini", price=MOCK_PRICE)]
middleware = [
    Middleware(AuthMiddleware,
               store=PostgresKeyStore({PG_DSN!r}, schema={schema!r}, channel={channel!r}),
               admin_token_env={ADMIN_ENV!r}),
    Middleware(MeteringMiddleware,
               store=PostgresUsageStore({PG_DSN!r}, prefix={usage_prefix!r}, timeout_s=5),
               journal_dir={str(journal)!r}, flush_interval_s=0.05),
    Middleware(QuotaMiddleware, store=RedisQuotaStore({REDIS_URL!r}, prefix={quota_prefix!r}),
               admin_token_env={ADMIN_ENV!r}),
    Middleware(CacheMiddleware, store=RedisCacheStore({REDIS_URL!r}, prefix={cache_prefix!r})),
    Middleware(FailoverMiddleware, routes={{"primary": Route(fallbacks=("backup",))}},
               breaker=BreakerSettings(consecutive_failures=3, min_requests=1000,
                                       cooldown_s=120),
               shared=RedisHealth({REDIS_URL!r}, prefix={health_prefix!r}, sync_interval_s=0.5),
               admin_token_env={ADMIN_ENV!r}),
]
"""
    return mock_config(mock_url, middleware="[]", extra=extra)


def drop_postgres(schema: str, usage_prefix: str) -> None:
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
        for table in ("events", "rollups", "schema_version"):
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {} CASCADE").format(
                sql.Identifier(f"{usage_prefix}_{table}")))


def delete_redis(pattern: str) -> None:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(match=pattern, count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, mock_url: str) -> Iterator[Cluster]:
    """Three `sluicegate serve --workers 1` processes on one config, started together (their
    store migrations take turns under advisory locks), and the round-robin client."""
    run = uuid.uuid4().hex[:10]
    directory = tmp_path_factory.mktemp("scale-out")
    schema, usage_prefix = f"sgso_keys_{run}", f"sgso_{run}"
    quota_prefix, cache_prefix = f"{{sgso-{run}}}", f"{{sgso-{run}-cache}}"
    processes: list[Any] = []
    with MockProviderServer(MockConfig()) as primary, \
            MockProviderServer(MockConfig()) as fallback:
        config = write_config(directory, cluster_config(
            mock_url, primary, fallback, schema=schema, channel=f"sgso_{run}",
            usage_prefix=usage_prefix, journal=directory / "journal",
            quota_prefix=quota_prefix, cache_prefix=cache_prefix,
            health_prefix=f"sgso-{run}"))

        def start(index: int) -> tuple[Any, str]:
            return start_cli_gateway(config, env={ADMIN_ENV: ADMIN_TOKEN},
                                     log_path=directory / f"gateway-{index}.log")

        client: RoundRobin | None = None
        try:
            with ThreadPoolExecutor(PROCESSES) as pool:
                futures = [pool.submit(start, i) for i in range(PROCESSES)]
                for future in futures:  # every one, so a failure leaves none running
                    try:
                        processes.append(future.result())
                    except Exception:  # noqa: BLE001 (raised again below)
                        processes.append(None)
            started = [p for p in processes if p is not None]
            assert len(started) == PROCESSES, \
                f"a gateway did not start; see the logs in {directory}"
            urls = [url for _, url in started]
            client = RoundRobin(urls)
            yield Cluster(urls, client, primary, fallback, quota_prefix, cache_prefix,
                          usage_prefix, project=f"sgso-{run}")
        finally:
            if client is not None:
                client.close()
            for item in processes:
                if item is not None:
                    stop_process(item[0])
            drop_postgres(schema, usage_prefix)
            delete_redis(f"*sgso-{run}*")


@pytest.fixture
def client(cluster: Cluster) -> RoundRobin:
    return cluster.client


def actual_micros(reply: Reply) -> int:
    usage = reply.body["usage"]
    return cost_micros(PRICE, Usage(input_tokens=usage["prompt_tokens"],
                                    output_tokens=usage["completion_tokens"]))


def eventually(probe: Callable[[], bool], timeout_s: float, interval_s: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if probe():
            return True
        time.sleep(interval_s)
    return probe()


# -- 1. an RPM limit ---------------------------------------------------------------------------

def test_an_rpm_limit_is_shared_by_the_three_processes(
        cluster: Cluster, client: RoundRobin, mock: MockProviderServer) -> None:
    key, key_id = cluster.new_key({"rpm": RPM})
    started = time.monotonic()
    replies = [reply for _ in range(RPM) for reply in client.wave(key, CHAT)]  # 3 * RPM
    elapsed_s = time.monotonic() - started

    refill_s = 60 / RPM
    assert elapsed_s < refill_s, f"{elapsed_s:.1f} s; exactness needs less than {refill_s} s"
    assert Counter((r.status, r.code) for r in replies) == {
        (200, None): RPM, (429, "rate_limit_exceeded"): 2 * RPM}
    # Waves of three (one request per process) go one after the other, so exactly the first
    # RPM / 3 waves fit: every process admitted its share, none admitted more.
    assert Counter(r.process for r in replies if r.status == 200) == {
        p: RPM // PROCESSES for p in range(PROCESSES)}
    assert all(r.headers.get("retry-after") for r in replies if r.status == 429)
    assert {r.headers["x-ratelimit-limit-requests"] for r in replies if r.status == 200} \
        == {str(RPM)}
    shared = redis.Redis.from_url(REDIS_URL)
    level = shared.hget(f"{cluster.quota_prefix}:key:{key_id}:rpm", "tokens")
    shared.close()
    assert level is not None and float(level) < 1  # one bucket, in the shared Redis


# -- 2. a budget -------------------------------------------------------------------------------

def test_a_budget_is_shared_by_the_three_processes(
        cluster: Cluster, client: RoundRobin, mock: MockProviderServer) -> None:
    cap = BUDGET_REQUESTS * RESERVED_MICROS
    key, key_id = cluster.new_key(
        {"budgets": [{"limit_usd": str(micros_to_usd(cap)), "period": "lifetime"}]})
    replies: list[Reply] = []
    while len(replies) < 6 * BUDGET_REQUESTS:  # until each process has refused once more
        replies.append(client.chat(key, CHAT))
        if len(replies) >= PROCESSES and all(r.status != 200 for r in replies[-PROCESSES:]):
            break

    admitted = [r for r in replies if r.status == 200]
    refused = [r for r in replies if r.status != 200]
    assert refused, f"{len(admitted)} requests admitted and none refused: the budget is not " \
                    "enforced (or not shared)"
    assert {(r.status, r.code) for r in refused} == {(402, "budget_exceeded")}
    first_refusal = replies.index(refused[0])
    assert all(r.status != 200 for r in replies[first_refusal:]), "admitted after a refusal"
    spent = [actual_micros(r) for r in admitted]
    # The quota layer reserves the estimate (input estimate + max_tokens at the price) before
    # the call and settles the actual cost after it: what is admitted may exceed the budget
    # by at most one request's reservation (the actual beyond the estimate of the last one).
    assert sum(spent) <= cap + RESERVED_MICROS, (sum(spent), cap)
    assert spent == [RESERVED_MICROS] * len(admitted)  # the premise: reservations are exact
    assert len(admitted) == BUDGET_REQUESTS  # so exactly the budget's worth was admitted
    assert {r.process for r in admitted} == set(range(PROCESSES))

    def committed_at(process: int) -> Decimal | None:
        usage = client.admin(process, "GET", f"/admin/usage/key/{key_id}").json()
        value = usage["periods"]["lifetime"]["committed_usd"]
        return None if value is None else Decimal(value)

    def all_read_the_total() -> bool:
        return all(committed_at(p) == micros_to_usd(sum(spent)) for p in range(PROCESSES))

    # Every process reads the same total (settled after the responses: poll briefly).
    assert eventually(all_read_the_total, timeout_s=3), \
        [committed_at(p) for p in range(PROCESSES)]


# -- 3. a key revocation -----------------------------------------------------------------------

def test_a_revocation_on_one_process_reaches_the_others_within_a_second(
        cluster: Cluster, client: RoundRobin, mock: MockProviderServer) -> None:
    key, key_id = cluster.new_key(process=0)
    for process in range(PROCESSES):  # every process now holds the key in its cache
        assert client.chat(key, CHAT, process=process).status == 200

    started = time.monotonic()
    revoked = client.admin(1, "POST", f"/admin/keys/{key_id}/revoke")
    assert revoked.status_code == 200, revoked.text
    answer = client.chat(key, CHAT, process=1)
    assert (answer.status, answer.code) == (401, "key_revoked")
    seen_after: dict[int, float] = {}
    while len(seen_after) < 2 and time.monotonic() - started < 5.0:
        for process in (0, 2):
            if process in seen_after:
                continue
            answer = client.chat(key, CHAT, process=process)
            if answer.status != 200:
                seen_after[process] = time.monotonic() - started
                assert (answer.status, answer.code) == (401, "key_revoked")
        time.sleep(0.005)

    print(f"\nrevocation reached processes 0 and 2 after {seen_after} s")
    assert set(seen_after) == {0, 2}, f"still accepted after 5 s by {({0, 2} - set(seen_after))}"
    assert max(seen_after.values()) <= 1.0, seen_after
    for process in range(PROCESSES):  # and it stays revoked
        assert client.chat(key, CHAT, process=process).code == "key_revoked"


# -- 4. a breaker opening ----------------------------------------------------------------------

def breaker_at(cluster: Cluster, process: int, model: str = "primary") -> str:
    state = cluster.client.admin(process, "GET", "/admin/deployments")
    assert state.status_code == 200, state.text
    models = state.json()["models"]
    return str(models[model]["deployments"][0]["breaker"]) if model in models else "unknown"


def test_a_breaker_opened_by_one_process_is_open_on_the_others(
        cluster: Cluster, client: RoundRobin) -> None:
    key, _ = cluster.new_key()
    primary, fallback = cluster.primary, cluster.fallback
    question = {"model": "primary", "messages": MESSAGES}
    for _ in range(PROCESSES):  # every process knows the model and has called the primary
        reply = client.chat(key, question)
        assert reply.status == 200 and reply.headers["x-sluicegate-deployment"] == \
            "a/gpt-4o-mini", reply.body
    assert [breaker_at(cluster, p) for p in range(PROCESSES)] == ["closed"] * PROCESSES

    primary.config.update({"fail_ratio": 1.0, "fail_status": 503})
    try:
        for _ in range(10):
            reply = client.chat(key, question, process=0)
            assert reply.status == 200 and reply.headers["x-sluicegate-fallback"] == "backup"
            if breaker_at(cluster, 0) == "open":
                break
        assert breaker_at(cluster, 0) == "open"
        opened = time.monotonic()
        agreed_after: dict[int, float] = {}
        while len(agreed_after) < 2 and time.monotonic() - opened < 5.0:
            for process in (1, 2):
                if process not in agreed_after and breaker_at(cluster, process) == "open":
                    agreed_after[process] = time.monotonic() - opened
            time.sleep(0.02)
        print(f"\nprocesses 1 and 2 saw the breaker open after {agreed_after} s")
        assert set(agreed_after) == {1, 2}, f"not open after 5 s on {({1, 2} - set(agreed_after))}"
        # Within two sync intervals (0.5 s: written at process 0's next sync, read at each
        # other's), with a second to spare for three gateways on a loaded host.
        assert max(agreed_after.values()) <= 2.0, agreed_after

        calls_to_primary, calls_to_fallback = len(primary.requests), len(fallback.requests)
        replies = [client.chat(key, question, process=p) for p in (1, 2, 1, 2)]
        assert [(r.status, r.headers.get("x-sluicegate-attempts"),
                 r.headers.get("x-sluicegate-fallback"),
                 r.headers.get("x-sluicegate-deployment")) for r in replies] == \
            [(200, "1", "backup", "b/gpt-4o-mini")] * 4
        assert len(primary.requests) == calls_to_primary  # nobody paid a call to learn it
        assert len(fallback.requests) == calls_to_fallback + 4
    finally:
        primary.config.update({"fail_ratio": 0.0})


# -- 5. a cache entry --------------------------------------------------------------------------

def test_a_cache_entry_written_by_one_process_is_a_hit_on_the_others(
        cluster: Cluster, client: RoundRobin, mock: MockProviderServer) -> None:
    key, _ = cluster.new_key()
    text = f"cache me {uuid.uuid4().hex}"
    question = {"model": "gpt-mock", "temperature": 0,
                "messages": [{"role": "user", "content": text}]}
    shared = redis.Redis.from_url(REDIS_URL)
    entries = f"{cluster.cache_prefix}:e:*"
    try:
        before = set(shared.scan_iter(match=entries))
        miss = client.chat(key, question, process=0)
        assert (miss.status, miss.headers["x-sluicegate-cache"]) == (200, "miss")
        # The entry is written after the response went out: wait for it to be in Redis.
        assert eventually(lambda: bool(set(shared.scan_iter(match=entries)) - before),
                          timeout_s=3), "process 0 never stored the answer in Redis"
    finally:
        shared.close()
    for process in (1, 2):
        hit = client.chat(key, question, process=process)
        assert (hit.status, hit.headers["x-sluicegate-cache"]) == (200, "hit"), process
        assert hit.body["choices"] == miss.body["choices"]
        assert hit.body["usage"].get("x_sluicegate_cached") is True
    asked = [r for r in mock.requests
             if text in str((r.get("json") or {}).get("messages"))]
    assert len(asked) == 1  # only the miss reached the provider


# -- 6. usage lands exactly once ---------------------------------------------------------------

def test_usage_of_every_request_lands_exactly_once(
        cluster: Cluster, client: RoundRobin, mock: MockProviderServer) -> None:
    """Runs last: the traffic of the tests above plus a few requests of its own. The metering
    layer sits below auth, so every answer but an auth refusal (401) has its record, quota
    refusals (402/429) included; requests answered by the kernel or the admin API have none."""
    key, _ = cluster.new_key()
    for i in range(PROCESSES):
        assert client.chat(key, {**CHAT, "messages": [
            {"role": "user", "content": f"usage {i}"}]}).status == 200
    assert client.stream(key, CHAT).status == 200
    assert client.chat("sk-sg-" + "x" * 43, CHAT).status == 401

    seen = list(client.seen)
    metered = {r.request_id: r.status for r in seen if r.status != 401}
    unmetered = {r.request_id for r in seen if r.status == 401}
    assert len(metered) + len(unmetered) == len(seen), "a request id was answered twice"
    assert {r.process for r in seen} == set(range(PROCESSES))
    assert Counter(r.status for r in seen)[200] > 0

    events = f"{cluster.usage_prefix}_events"

    def rows() -> dict[str, int]:
        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            found = conn.execute(
                sql.SQL("SELECT request_id, status FROM {}").format(sql.Identifier(events))
            ).fetchall()
        return dict(found)

    assert eventually(lambda: set(metered) <= set(rows()), timeout_s=10, interval_s=0.05), \
        f"{len(set(metered) - set(rows()))} of {len(metered)} requests have no usage row"
    time.sleep(0.5)  # a late duplicate would land meanwhile
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        total, distinct = conn.execute(sql.SQL(
            "SELECT count(*), count(DISTINCT request_id) FROM {}").format(
                sql.Identifier(events))).fetchone() or (0, 0)
    found = rows()
    assert (total, distinct) == (len(metered), len(metered))  # one row per request, no more
    assert found == metered  # the same ids, each with the status the client saw
    assert not unmetered & set(found)
    assert_rollups_match_events(cluster.usage_prefix)
    with psycopg.connect(PG_DSN, autocommit=True) as conn:  # and their error counts
        expected = conn.execute(sql.SQL(
            "SELECT key_id, count(*) FILTER (WHERE status >= 400) FROM {} "
            "GROUP BY 1 ORDER BY 1").format(sql.Identifier(events))).fetchall()
        errors = conn.execute(sql.SQL(
            "SELECT subject, sum(errors) FROM {} WHERE grain = 'day' AND kind = 'key' "
            "GROUP BY 1 ORDER BY 1").format(
                sql.Identifier(f"{cluster.usage_prefix}_rollups"))).fetchall()
    assert errors == expected
