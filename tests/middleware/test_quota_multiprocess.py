"""Issue 3's acceptance tests: limits, budgets and revocations hold across gateway processes.

Every test runs two `sluicegate serve` processes (one worker each) that share one real Redis
(127.0.0.1:6379) under a key prefix of the test's own, deleted afterwards, and sends them
requests over real sockets, half to each. The mock provider reports known usage; the prompt
and max_tokens below are chosen so that a request reserves exactly what it then uses (tokens
and cost), which makes "exactly N admitted" an exact expectation: a settle never hands
capacity back for a later request to take.

Redis round trips are counted at a TCP proxy the test puts between the gateways and Redis
(`RedisProxy`), which sees the commands of these two gateways and of nothing else. MONITOR and
INFO commandstats are server-wide: they would also count the commands of every other test
that uses the same Redis meanwhile, so a count taken there is only right on an idle server.
The same proxy, stopped and started again, is how Redis "goes away" for the gateways without
stopping the Redis that other tests share.

Both processes normally read the same clock; one test runs process B with every reading of
`time.time` ahead, as on two hosts whose clocks disagree.
"""
from __future__ import annotations

import asyncio
import math
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, Self

import httpx
import psycopg
import pytest
import redis
import redis.asyncio as aioredis
from psycopg import sql

from gateway.context import Usage
from gateway.policy import micros_to_usd
from gateway.pricing import Price, cost_micros, estimate_micros
from gateway.tokens import estimate_messages
from middleware.quota.store_redis import ADMIT, SETTLE
from tests.harness import free_port, mock_config, start_cli_gateway, stop_process, write_config
from tests.mock_providers import MockProviderServer
from tests.mock_providers.faults import Fault

REDIS_URL = "redis://127.0.0.1:6379/0"
PG_DSN = os.environ.get("SLUICEGATE_TEST_PG_DSN",
                        "host=127.0.0.1 port=5432 dbname=test user=root")
ADMIN_TOKEN = "mp-admin-token-0123456789abcdef"

# The harness prices every mock model at $1 per 1M input tokens and $2 per 1M output tokens.
PRICE = Price(input_per_mtok="1", output_per_mtok="2")
# Six one-letter words: the gateway estimates 3 + 3 + 3 = 9 input tokens, and the mock counts
# 6 words + 3 = 9. Its reply ("Mock reply to: a b c d e f") is cut to max_tokens words. So a
# request reserves 9 + 5 = 14 tokens and 19 micro-dollars, and uses exactly that.
MESSAGES = [{"role": "user", "content": "a b c d e f"}]
MAX_TOKENS = 5
CHAT = {"model": "gpt-mock", "max_tokens": MAX_TOKENS, "messages": MESSAGES}
RESERVED_TOKENS = estimate_messages(MESSAGES) + MAX_TOKENS
RESERVED_MICROS = estimate_micros(PRICE, estimate_messages(MESSAGES), MAX_TOKENS)

BURST = 200  # concurrent requests, half to each process
ADMITTED = 20  # what the budget admits
RATE_ADMITTED = 10  # what RPM / TPM admit; the bucket refills one request per 60/10 = 6 s

StartTwo = Callable[..., tuple[str, str]]


# -- fixtures ----------------------------------------------------------------------------------

@pytest.fixture
def prefix() -> Iterator[str]:
    """A Redis key prefix of this test's own (a Cluster hash tag); its keys are deleted after."""
    prefix = f"{{sgmp-{uuid.uuid4().hex}}}"
    yield prefix
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=f"{prefix}*"))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
def start_two(tmp_path: Path) -> Iterator[StartTwo]:
    """Starts two `sluicegate serve --workers 1` processes on one config; stops them after."""
    processes: list[Any] = []

    def start(config: str, env: dict[str, str],
              env_b: dict[str, str] | None = None) -> tuple[str, str]:
        """(URL of A, URL of B); `env_b` adds to process B's environment."""
        path = write_config(tmp_path, config)
        urls = []
        for name, own_env in (("a", env), ("b", {**env, **(env_b or {})})):
            process, url = start_cli_gateway(path, workers=1, env=own_env,
                                             log_path=tmp_path / f"gateway-{name}.log")
            processes.append(process)
            urls.append(url)
        return urls[0], urls[1]

    yield start
    for process in processes:
        stop_process(process)


@pytest.fixture
def schema() -> Iterator[str]:
    """A PostgreSQL schema of this test's own for the key store, dropped after."""
    name = "sgmp_" + uuid.uuid4().hex[:12]
    yield name
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


# -- configuration -----------------------------------------------------------------------------

@dataclass(frozen=True)
class KeySpec:
    id: str
    env: str  # the environment variable holding the plaintext
    limits: str  # a Limits(...) expression


# First in the config module, before it imports any layer: a process whose environment sets
# SG_MP_CLOCK_AHEAD_S reads the time that many seconds ahead, as on a host whose clock is.
CLOCK_AHEAD = """
import os, time
if os.environ.get("SG_MP_CLOCK_AHEAD_S"):
    _host_time, _ahead_s = time.time, float(os.environ["SG_MP_CLOCK_AHEAD_S"])
    time.time = lambda: _host_time() + _ahead_s
"""


def config(mock_url: str, layers: str) -> str:
    """The harness's config module (its models and prices) with `layers` as the stack."""
    extra = ("from middleware.auth import PostgresKeyStore\n"
             "from middleware.quota import RedisQuotaStore\n"
             f"middleware = {layers}\n")
    return CLOCK_AHEAD + mock_config(mock_url, middleware="[]", extra=extra)


def quota_stack(redis_url: str, prefix: str, keys: Sequence[KeySpec],
                quota_options: str = "") -> str:
    """Auth with static keys, then quota on Redis."""
    static = ", ".join(f"StaticKey('mp', key_env={k.env!r}, id={k.id!r}, limits={k.limits})"
                       for k in keys)
    return (f"[Middleware(AuthMiddleware, keys=[{static}]), "
            f"Middleware(QuotaMiddleware, store=RedisQuotaStore({redis_url!r}, "
            f"prefix={prefix!r}){quota_options})]")


def new_key() -> str:
    return "sk-sg-mp-" + uuid.uuid4().hex


# -- requests ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Outcome:
    status: int
    code: str | None  # the OpenAI error code of a refusal
    retry_after: str | None
    usage: dict[str, Any] | None
    headers: httpx.Headers


def outcome(response: httpx.Response) -> Outcome:
    body = response.json()
    error = body.get("error") if isinstance(body, dict) else None
    return Outcome(response.status_code, error.get("code") if error else None,
                   response.headers.get("retry-after"),
                   body.get("usage") if response.status_code == 200 else None,
                   response.headers)


async def chat(client: httpx.AsyncClient, url: str, key: str) -> Outcome:
    response = await client.post(url + "/v1/chat/completions", json=CHAT,
                                 headers={"authorization": f"Bearer {key}"})
    return outcome(response)


async def burst(urls: Sequence[str], key: str, count: int) -> tuple[list[Outcome], float]:
    """`count` requests released at once, alternating between `urls`; (outcomes, seconds)."""
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        go = asyncio.Event()

        async def one(index: int) -> Outcome:
            await go.wait()
            return await chat(client, urls[index % len(urls)], key)

        tasks = [asyncio.create_task(one(i)) for i in range(count)]
        await asyncio.sleep(0)  # every task is waiting on `go`
        started = time.monotonic()
        go.set()
        outcomes = await asyncio.gather(*tasks)
        return outcomes, time.monotonic() - started


def actual_micros(usage: dict[str, Any]) -> int:
    return cost_micros(PRICE, Usage(input_tokens=usage["prompt_tokens"],
                                    output_tokens=usage["completion_tokens"]))


async def eventually(probe: Callable[[], Awaitable[bool]], timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await probe():
            return True
        await asyncio.sleep(0.02)
    return await probe()


# -- a. budgets --------------------------------------------------------------------------------

async def test_budget_admits_exactly_n_requests_across_two_processes(
        mock_url: str, prefix: str, start_two: StartTwo) -> None:
    cap = ADMITTED * RESERVED_MICROS
    limits = f"Limits(budgets=(Budget({str(micros_to_usd(cap))!r}, period='lifetime'),))"
    key = new_key()
    stack = quota_stack(REDIS_URL, prefix, [KeySpec("k_mp", "SG_MP_KEY", limits)],
                        ", admin_token_env='SG_MP_ADMIN'")
    a, b = start_two(config(mock_url, stack), {"SG_MP_KEY": key, "SG_MP_ADMIN": ADMIN_TOKEN})
    counter = f"{prefix}:key:k_mp:budget:lifetime:all"
    client = aioredis.Redis.from_url(REDIS_URL)
    highest = 0
    sampling = True

    async def sample_counter() -> None:  # committed spend (spent + reserved) during the burst
        nonlocal highest
        while sampling:
            value = await client.get(counter)
            highest = max(highest, int(value or 0))
            await asyncio.sleep(0.002)

    sampler = asyncio.create_task(sample_counter())
    try:
        outcomes, _ = await burst((a, b), key, BURST)
    finally:
        sampling = False
        await sampler

    assert Counter((o.status, o.code) for o in outcomes) == {
        (200, None): ADMITTED, (402, "budget_exceeded"): BURST - ADMITTED}
    spent = [actual_micros(o.usage) for o in outcomes if o.usage is not None]
    assert spent == [RESERVED_MICROS] * ADMITTED  # the premise: reservations are exact
    reservation_error = max(0, *(s - RESERVED_MICROS for s in spent))
    assert highest <= cap

    async def all_settled() -> bool:
        return int(await client.get(counter) or 0) == sum(spent)

    assert await eventually(all_settled), await client.get(counter)
    await asyncio.sleep(0.3)  # a late settle would move the counter again
    recorded = int(await client.get(counter) or 0)
    await client.aclose()
    assert recorded == sum(spent) == cap
    assert recorded <= cap + reservation_error
    async with httpx.AsyncClient(timeout=10) as http:  # the other process reads the same total
        usage = (await http.get(b + "/admin/usage/key/k_mp",
                                headers={"authorization": f"Bearer {ADMIN_TOKEN}"})).json()
    assert Decimal(usage["periods"]["lifetime"]["committed_usd"]) == micros_to_usd(recorded)


def test_the_reservation_of_a_gateway_that_died_is_taken_back_after_its_lease(
        mock: MockProviderServer, mock_url: str, prefix: str, tmp_path: Path) -> None:
    # Process A is killed while a request of max_tokens=400 (9 + 2 x 400 = 809 of a budget
    # of 1000) waits for its answer: its settle never comes. The reservation stood for good
    # in a lifetime budget: the next request of max_tokens=100 (9 + 2 x 100 = 209) was
    # refused, the budget spent by nothing. Once the quota layer's lease_s (2 s here; 900 s
    # by default) has gone by on Redis's clock, the one every gateway reads, the reservation
    # has lapsed, and process B takes it back.
    limits = "Limits(budgets=(Budget('0.001', period='lifetime'),))"
    key = new_key()
    path = write_config(tmp_path, config(mock_url, quota_stack(
        REDIS_URL, prefix, [KeySpec("k_mp", "SG_MP_KEY", limits)], ", lease_s=2")))
    env = {"SG_MP_KEY": key}
    headers = {"authorization": f"Bearer {key}"}
    dying, a = start_cli_gateway(path, env=env, log_path=tmp_path / "gateway-a.log")
    try:
        mock.push_fault(Fault("slow_first_byte", provider="openai", delay_s=10.0))
        with ThreadPoolExecutor(1) as pool:
            lost = pool.submit(httpx.post, a + "/v1/chat/completions", headers=headers,
                               json={**CHAT, "max_tokens": 400}, timeout=30)
            deadline = time.monotonic() + 10
            while mock.pending_faults and time.monotonic() < deadline:
                time.sleep(0.02)
            assert mock.pending_faults == []  # (A admitted it, and called the provider)
            dying.kill()  # (SIGKILL: nothing runs after it)
            lapsed_at = time.monotonic() + 2.5  # (admitted before the kill)
            dying.wait(10)
            with pytest.raises(httpx.TransportError):
                lost.result(30)
    finally:
        stop_process(dying)
    later, b = start_cli_gateway(path, env=env, log_path=tmp_path / "gateway-b.log")
    try:
        time.sleep(max(0.0, lapsed_at - time.monotonic()))  # (the lease runs out, no more)
        response = httpx.post(b + "/v1/chat/completions", headers=headers,
                              json={**CHAT, "max_tokens": 100}, timeout=10)
        assert response.status_code == 200, response.text
        assert response.headers["x-sluicegate-budget-remaining"] == "0.000791"  # 1000 - 209
    finally:
        stop_process(later)


# -- b. RPM and TPM ----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["rpm", "tpm"])
async def test_rate_limit_admits_exactly_n_requests_across_two_processes(
        mock_url: str, prefix: str, start_two: StartTwo, kind: str) -> None:
    limit = RATE_ADMITTED if kind == "rpm" else RATE_ADMITTED * RESERVED_TOKENS
    key = new_key()
    stack = quota_stack(REDIS_URL, prefix, [KeySpec("k_mp", "SG_MP_KEY",
                                                    f"Limits({kind}={limit})")])
    a, b = start_two(config(mock_url, stack), {"SG_MP_KEY": key})

    outcomes, elapsed_s = await burst((a, b), key, BURST)

    refill_s = 60 / RATE_ADMITTED  # the time the bucket takes to refill one request
    # The full bucket, and one more request for each refill the burst lasted: exactly
    # RATE_ADMITTED when it took less than refill_s, as it does on an idle machine; a loaded
    # one (a 2-core CI box) may take longer, and the limit then rightly admits what refilled.
    refills = int(elapsed_s // refill_s)
    admitted = sum(o.status == 200 for o in outcomes)
    assert RATE_ADMITTED <= admitted <= RATE_ADMITTED + refills, (admitted, elapsed_s)
    assert Counter((o.status, o.code) for o in outcomes) == {
        (200, None): admitted, (429, "rate_limit_exceeded"): BURST - admitted}
    waits = [o.retry_after for o in outcomes if o.status == 429]
    assert all(w is not None and 1 <= int(w) <= math.ceil(refill_s) for w in waits), waits
    used = [o.usage for o in outcomes if o.usage is not None]
    assert [u["total_tokens"] for u in used] == [RESERVED_TOKENS] * admitted
    suffix = "requests" if kind == "rpm" else "tokens"
    assert {o.headers[f"x-ratelimit-limit-{suffix}"] for o in outcomes if o.status == 200} \
        == {str(limit)}
    client = redis.Redis.from_url(REDIS_URL)
    level = client.hget(f"{prefix}:key:k_mp:{kind}", "tokens")
    client.close()
    assert level is not None and float(level) < limit / RATE_ADMITTED  # the shared bucket


@pytest.mark.parametrize("first", ["ahead", "behind"])
async def test_rate_limit_holds_when_the_two_processes_clocks_differ(
        mock_url: str, prefix: str, start_two: StartTwo, first: str) -> None:
    # Either process may create the bucket. Each used to pass its own clock to the scripts:
    # with the one behind (A) first, B's requests refilled the bucket by B's lead (20 s, a
    # third of the limit) on top of the real time elapsed; the scripts now read Redis's.
    rpm, ahead_s = 100, 20.0
    key = new_key()
    stack = quota_stack(REDIS_URL, prefix, [KeySpec("k_mp", "SG_MP_KEY", f"Limits(rpm={rpm})")])
    a, b = start_two(config(mock_url, stack), {"SG_MP_KEY": key},
                     {"SG_MP_CLOCK_AHEAD_S": str(ahead_s)})
    started = time.monotonic()
    async with httpx.AsyncClient(timeout=10) as client:
        opening = await chat(client, b if first == "ahead" else a, key)
    outcomes, _ = await burst((a, b), key, BURST)
    elapsed_s = time.monotonic() - started

    admitted = sum(o.status == 200 for o in [opening, *outcomes])
    assert rpm <= admitted <= rpm + math.floor(elapsed_s * rpm / 60), (admitted, elapsed_s)


async def test_a_process_whose_clock_is_ahead_leaves_the_others_leases_alone(
        mock: MockProviderServer, mock_url: str, prefix: str, start_two: StartTwo) -> None:
    # (B, 60 s ahead, expired A's 30 s lease of the one slot while A's request still ran,
    # and admitted a second request beside it)
    key = new_key()
    stack = quota_stack(REDIS_URL, prefix, [KeySpec("k_mp", "SG_MP_KEY",
                                                    "Limits(max_concurrent=1)")], ", lease_s=30")
    a, b = start_two(config(mock_url, stack), {"SG_MP_KEY": key}, {"SG_MP_CLOCK_AHEAD_S": "60"})
    async with httpx.AsyncClient(timeout=10) as client:
        mock.push_fault(Fault("slow_first_byte", provider="openai", delay_s=2))
        calls = len(mock.requests)
        held = asyncio.create_task(chat(client, a, key))
        while len(mock.requests) == calls:  # A's request holds the slot, its answer 2 s away
            await asyncio.sleep(0.01)
        beside = await chat(client, b, key)
        assert (await held).status == 200
    assert (beside.status, beside.code) == (429, "rate_limit_exceeded")
    assert len(mock.requests) == calls + 1


# -- c. revocation -----------------------------------------------------------------------------

async def test_revocation_reaches_the_other_process_within_one_second(
        mock_url: str, schema: str, start_two: StartTwo) -> None:
    channel = "sgmp_" + uuid.uuid4().hex[:12]
    store = f"PostgresKeyStore({PG_DSN!r}, schema={schema!r}, channel={channel!r})"
    stack = f"[Middleware(AuthMiddleware, store={store}, admin_token_env='SG_MP_ADMIN')]"
    a, b = start_two(config(mock_url, stack), {"SG_MP_ADMIN": ADMIN_TOKEN})
    admin = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    async with httpx.AsyncClient(timeout=10) as client:
        created = await client.post(a + "/admin/keys", headers=admin, json={"project": "mp"})
        assert created.status_code == 201, created.text
        key, key_id = created.json()["key"], created.json()["id"]
        for url in (a, b, b):  # B now holds the key in its cache
            assert (await chat(client, url, key)).status == 200

        started = time.monotonic()
        revoked = await client.post(f"{a}/admin/keys/{key_id}/revoke", headers=admin)
        assert revoked.status_code == 200, revoked.text
        assert (await chat(client, a, key)).code == "key_revoked"
        seen_by_b = None
        while time.monotonic() - started < 5.0:
            answer = await chat(client, b, key)
            if answer.status != 200:
                seen_by_b = time.monotonic() - started
                assert (answer.status, answer.code) == (401, "key_revoked")
                break
            await asyncio.sleep(0.005)

    print(f"\nrevocation reached process B {seen_by_b} s after the revoke call started")
    assert seen_by_b is not None and seen_by_b <= 1.0, seen_by_b


# -- a TCP proxy in front of Redis -------------------------------------------------------------

class RedisProxy:
    """A TCP proxy to Redis on its own thread and event loop, recording every command sent.

    `stop` closes the listener and cuts every connection, as a Redis that died would; `start`
    listens again on the same port. Commands are parsed from the client side of the stream
    (redis-py sends each one as a RESP array of bulk strings).
    """

    def __init__(self, upstream_port: int = 6379) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._commands: list[list[bytes]] = []
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    def __enter__(self) -> Self:
        self._thread.start()
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    @property
    def commands(self) -> list[list[bytes]]:
        with self._lock:
            return list(self._commands)

    def clear(self) -> None:
        with self._lock:
            self._commands.clear()

    def start(self) -> None:
        asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(5)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(5)

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port,
                                                  reuse_address=True)

    async def _close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        await asyncio.gather(self._pump(reader, up_writer, record=True),
                             self._pump(up_reader, writer, record=False))

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                    record: bool) -> None:
        buffer = bytearray()
        try:
            while data := await reader.read(65536):
                if record:
                    buffer += data
                    commands = take_commands(buffer)
                    with self._lock:
                        self._commands.extend(commands)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self._writers.discard(writer)
            writer.transport.abort()


def take_commands(buffer: bytearray) -> list[list[bytes]]:
    """Removes every complete RESP command from the front of `buffer` and returns them."""
    commands = []
    while (parsed := _parse_command(buffer)) is not None:
        command, used = parsed
        del buffer[:used]
        commands.append(command)
    return commands


def _parse_command(buffer: bytearray) -> tuple[list[bytes], int] | None:
    end = buffer.find(b"\r\n")
    if end < 0:
        return None
    assert buffer[:1] == b"*", bytes(buffer[:40])  # redis-py never sends inline commands
    position, args = end + 2, []
    for _ in range(int(buffer[1:end])):
        end = buffer.find(b"\r\n", position)
        if end < 0:
            return None
        start = end + 2
        length = int(buffer[position + 1:end])
        if len(buffer) < start + length + 2:
            return None
        args.append(bytes(buffer[start:start + length]))
        position = start + length + 2
    return args, position


def named(commands: Sequence[list[bytes]]) -> list[tuple[str, ...]]:
    """Each command as (NAME,) or, for EVALSHA, (EVALSHA, which script)."""
    scripts = {ADMIT.sha.encode(): "admit", SETTLE.sha.encode(): "settle"}
    return [(c[0].decode().upper(), scripts.get(c[1], c[1].decode()))
            if c[0].upper() == b"EVALSHA" else (c[0].decode().upper(),) for c in commands]


async def quiet(proxy: RedisProxy, quiet_s: float = 0.3, timeout_s: float = 5.0) -> None:
    """Waits until every admission seen has its settle (which goes out after the response,
    later still on a loaded machine), then until the gateways have sent Redis nothing for
    `quiet_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        scripts = [name[1] for name in named(proxy.commands) if name[0] == "EVALSHA"]
        if scripts.count("admit") <= scripts.count("settle"):
            break
        await asyncio.sleep(0.01)
    deadline = time.monotonic() + timeout_s
    seen = -1
    while time.monotonic() < deadline:
        now = len(proxy.commands)
        if now == seen:
            return
        seen = now
        await asyncio.sleep(quiet_s)


# -- d. round trips ----------------------------------------------------------------------------

async def test_a_request_makes_one_redis_round_trip_before_the_call_and_one_after(
        mock: MockProviderServer, mock_url: str, prefix: str, start_two: StartTwo) -> None:
    limits = ("Limits(rpm=1000, tpm=1_000_000, max_concurrent=50, "
              "budgets=(Budget('1000', period='lifetime'),))")
    key = new_key()
    with RedisProxy() as proxy:
        stack = quota_stack(proxy.url, prefix, [KeySpec("k_mp", "SG_MP_KEY", limits)])
        a, b = start_two(config(mock_url, stack), {"SG_MP_KEY": key})
        async with httpx.AsyncClient(timeout=10) as client:
            # Warm up each process: its connection handshake, the script cache, the budget seed.
            for url in (a, a, b, b):
                assert (await chat(client, url, key)).status == 200
                await quiet(proxy)
            for url in (a, b, a, b):
                proxy.clear()
                calls = len(mock.requests)
                mock.push_fault(Fault("slow_first_byte", provider="openai", delay_s=0.5))
                request = asyncio.create_task(chat(client, url, key))
                while len(mock.requests) == calls:  # the upstream holds its answer 0.5 s
                    assert not request.done()
                    await asyncio.sleep(0.002)
                at_upstream = named(proxy.commands)
                assert (await request).status == 200
                await quiet(proxy)
                commands = proxy.commands
                assert at_upstream == [("EVALSHA", "admit")], url
                assert named(commands) == [("EVALSHA", "admit"), ("EVALSHA", "settle")], url
                for command in commands:  # all four checks ride in each single call
                    assert int(command[2]) == 4
                    assert all(k.startswith(prefix.encode()) for k in command[3:7])
    print(f"\nround trips per request: 1 EVALSHA (admit) before the upstream call, "
          f"1 EVALSHA (settle) after; commands seen for the last one: {named(commands)}")


# -- e. Redis goes away and comes back ---------------------------------------------------------

async def test_redis_outage_follows_each_limits_policy_and_recovers_on_both_processes(
        mock_url: str, prefix: str, start_two: StartTwo) -> None:
    rpm = 6  # refills one request per 10 s, longer than the test takes
    open_key, closed_key = new_key(), new_key()
    keys = [KeySpec("k_open", "SG_MP_KEY_OPEN", f"Limits(rpm={rpm}, on_store_error='open')"),
            KeySpec("k_closed", "SG_MP_KEY_CLOSED",
                    "Limits(budgets=(Budget('1', period='lifetime', on_store_error='closed'),))")]
    with RedisProxy() as proxy:
        stack = quota_stack(proxy.url, prefix, keys, ", store_retry_s=0.2")
        a, b = start_two(config(mock_url, stack),
                         {"SG_MP_KEY_OPEN": open_key, "SG_MP_KEY_CLOSED": closed_key})
        async with httpx.AsyncClient(timeout=10) as client:
            started = time.monotonic()
            # Redis up: one bucket for both processes.
            first, second = await chat(client, a, open_key), await chat(client, b, open_key)
            assert [first.status, second.status] == [200, 200]
            assert [first.headers["x-ratelimit-remaining-requests"],
                    second.headers["x-ratelimit-remaining-requests"]] == ["5", "4"]
            for url in (a, b):
                assert (await chat(client, url, closed_key)).status == 200

            proxy.stop()
            for url in (a, b, a, b):  # open: served, limited in process
                assert (await chat(client, url, open_key)).status == 200
            for url in (a, b):  # closed: refused
                refused = await chat(client, url, closed_key)
                assert (refused.status, refused.code, refused.retry_after) == \
                    (503, "quota_store_unavailable", "1")

            proxy.start()
            for url in (a, b):  # no restart: each process finds Redis again by itself
                async def served(url: str = url) -> bool:
                    return (await chat(client, url, closed_key)).status == 200
                assert await eventually(served), url
            # Shared again: what is left of the one bucket (6 - 2 used while Redis was up;
            # the 4 served during the outage were counted in process), across both processes.
            statuses = [(await chat(client, url, open_key)).status for url in (a, b) * 4]
            elapsed_s = time.monotonic() - started
    assert elapsed_s < 60 / rpm, f"took {elapsed_s:.1f} s; the bucket refilled meanwhile"
    assert statuses == [200, 200, 200, 200, 429, 429, 429, 429]
