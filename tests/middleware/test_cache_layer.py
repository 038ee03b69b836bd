"""The exact cache through a real gateway and the mock providers, on every store (in process,
Redis, PostgreSQL, and Redis in front of PostgreSQL), with the official SDKs as clients.

Real servers: Redis on 127.0.0.1:6379 (each test under its own key prefix, deleted after) and
PostgreSQL on 127.0.0.1:5432 (each test with its own table, dropped after). Outages are real
too: the gateway reaches its stores through TCP relays (tests/tcp_proxy.py) switched off.
"""
from __future__ import annotations

import asyncio
import random
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import lz4.block
import openai
import orjson
import psycopg
import pytest
import redis
from psycopg import sql

from gateway.app import build_stack, create_app
from gateway.config import load_config
from gateway.context import Usage
from gateway.kernel import stack_components
from gateway.layers import json_passes_through
from middleware.cache import CacheMiddleware
from middleware.cache.replay import mark_cached
from middleware.cache.stores import CachedResponse, MemoryCacheStore
from tests.harness import AUTH, TEST_KEY, ThreadedServer, mock_config, write_config
from tests.mock_providers import Fault, MockProviderServer
from tests.tcp_proxy import TcpProxy

OTHER_KEY = "sk-sg-another-project-key-0123456789abcdef"
ADMIN_TOKEN = "cache-admin-" + uuid.uuid4().hex
OPT_IN = {"x-sluicegate-cache": "on"}  # cached without temperature 0
REDIS_PORT, PG_PORT = 6379, 5432
PG_DSN = f"host=127.0.0.1 port={PG_PORT} user=root dbname=test"
BACKENDS = ["memory", "redis", "postgres", "tiered"]
OUTAGE_BACKENDS = ["redis", "postgres", "tiered"]  # the in-process store cannot be down
# Through a relay, a store that lost its server tries it again after this long.
FAST_RETRY = "retry_interval_s=0.2"


def stack(store: str, options: str = "") -> str:
    cache_options = f", {options}" if options else ""
    return ("[Middleware(AuthMiddleware, keys=[StaticKey('tests', key_env='SG_TEST_KEY'), "
            "StaticKey('other', key_env='SG_OTHER_KEY')]), "
            "Middleware(QuotaMiddleware, limits=Limits(budgets=(Budget('100'),))), "
            f"Middleware(CacheMiddleware, store={store}, admin_token_env='SG_CACHE_ADMIN'"
            f"{cache_options})]")


class Proxies:
    """TCP relays to the real Redis and PostgreSQL on an event loop of their own (the tests
    are synchronous): `stop` is an outage of that server for whoever connects through it,
    `start` ends it, on the same port."""

    def __init__(self) -> None:
        self.redis = TcpProxy(REDIS_PORT)
        self.postgres = TcpProxy(PG_PORT)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.start()

    def _run(self, coroutine: Coroutine[Any, Any, None]) -> None:
        asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(10)

    def start(self, *proxies: TcpProxy) -> None:
        for proxy in proxies or (self.redis, self.postgres):
            if proxy.server is None:
                self._run(proxy.start())

    def stop(self, *proxies: TcpProxy) -> None:
        for proxy in proxies or (self.redis, self.postgres):
            self._run(proxy.stop())

    def close(self) -> None:
        self.stop()

        async def settle() -> None:  # the relays of the aborted connections end
            others = [task for task in asyncio.all_tasks() if task is not
                      asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)

        self._run(settle())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()


class Backend:
    """One test's store: its kind, and the Redis key prefix and PostgreSQL table of its own
    that it uses (removed by `clean`)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.prefix = "{sgct-" + uuid.uuid4().hex + "}"
        self.table = "sgct_cache_" + uuid.uuid4().hex[:16]

    def store(self, proxies: Proxies | None = None) -> str:
        """The store as config source; through `proxies` when given."""
        redis_port = proxies.redis.port if proxies else REDIS_PORT
        pg_port = proxies.postgres.port if proxies else PG_PORT
        retry = f", {FAST_RETRY}" if proxies else ""
        hot = (f"RedisCacheStore('redis://127.0.0.1:{redis_port}/0', prefix={self.prefix!r}"
               f"{retry})")
        warm = (f"PostgresCacheStore('host=127.0.0.1 port={pg_port} user=root dbname=test', "
                f"table={self.table!r}{retry})")
        return {"memory": "'memory'", "redis": hot, "postgres": warm,
                "tiered": f"TieredCacheStore({hot}, {warm})"}[self.kind]

    def redis_entries(self) -> list[bytes]:
        """The keys of the entries in Redis (`<prefix>:e:<key>`, see RedisCacheStore)."""
        with redis.Redis(port=REDIS_PORT) as client:
            return list(client.scan_iter(match=self.prefix + ":e:*"))

    def clean(self) -> None:
        with redis.Redis(port=REDIS_PORT) as client:
            for key in client.scan_iter(match=self.prefix + "*"):
                client.delete(key)
        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            for table in (self.table, self.table + "_schema_version",
                          self.table + "_invalidations"):
                conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(table)))


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    chosen = Backend(request.param)
    yield chosen
    chosen.clean()


@pytest.fixture
def proxies() -> Iterator[Proxies]:
    relays = Proxies()
    yield relays
    relays.close()


StartGateway = Callable[..., ThreadedServer]


@pytest.fixture
def start_gateway(backend: Backend, tmp_path: Path, mock_url: str,
                  monkeypatch: pytest.MonkeyPatch) -> Iterator[StartGateway]:
    """Starts a gateway caching in `backend` (through `proxies` if given) with the given
    CacheMiddleware options (config source); it stops before the backend is cleaned."""
    monkeypatch.setenv("SG_OTHER_KEY", OTHER_KEY)
    monkeypatch.setenv("SG_CACHE_ADMIN", ADMIN_TOKEN)
    servers: list[ThreadedServer] = []

    def start(options: str = "", proxies: Proxies | None = None) -> ThreadedServer:
        imports = ("from middleware.cache import CacheMiddleware\n"
                   "from middleware.cache.stores import PostgresCacheStore, RedisCacheStore, "
                   "TieredCacheStore")
        text = mock_config(mock_url, middleware=stack(backend.store(proxies), options))
        config = write_config(tmp_path, text.replace(
            "from middleware.cache import CacheMiddleware", imports),
            name=f"config{len(servers)}.py")
        server = ThreadedServer(create_app(config)).__enter__()
        servers.append(server)
        return server

    yield start
    for server in reversed(servers):
        server.__exit__(None, None, None)


@pytest.fixture
def gateway(start_gateway: StartGateway) -> ThreadedServer:
    return start_gateway()


def ask(server: ThreadedServer, text: str, *, key: str = TEST_KEY, **extra: Any) -> Any:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
    extra.setdefault("temperature", 0)
    return client.chat.completions.with_raw_response.create(
        model="gpt-mock", messages=[{"role": "user", "content": text}], **extra)


def ask_claude(server: ThreadedServer, text: str, *, key: str = TEST_KEY) -> Any:
    claude = anthropic.Anthropic(base_url=server.url, api_key=key, max_retries=0)
    return claude.messages.with_raw_response.create(
        model="claude-mock", max_tokens=50, extra_headers=OPT_IN,
        messages=[{"role": "user", "content": text}])


def cache_status(response: Any) -> str:
    return str(response.headers["x-sluicegate-cache"])


def wait_for(condition: Callable[[], bool], timeout_s: float = 3.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)


ONLY_IF_CACHED = {"cache-control": "only-if-cached"}


def probe(server: ThreadedServer, text: str, *, key: str = TEST_KEY) -> str:
    """The cache status of `text` without reaching upstream: "hit", or "none" (the 504 that
    only-if-cached gets when nothing is stored)."""
    try:
        return cache_status(ask(server, text, key=key, extra_headers=ONLY_IF_CACHED))
    except openai.APIStatusError as exc:
        assert exc.status_code == 504, exc
        return "none"


def wait_stored(server: ThreadedServer, text: str, *, key: str = TEST_KEY) -> None:
    """Waits until the answer to `text` is stored (writes follow the answer, in the
    background), asking only the cache: the upstream calls a test counts stay its own."""
    wait_for(lambda: probe(server, text, key=key) == "hit", timeout_s=10)
    assert probe(server, text, key=key) == "hit"


def upstream_calls(mock: MockProviderServer, text: str) -> int:
    return len([r for r in mock.requests if text in str(r)])


def test_a_repeat_is_a_hit_with_the_original_usage(gateway: ThreadedServer,
                                                  mock: MockProviderServer) -> None:
    text = "cache me " + uuid.uuid4().hex
    first = ask(gateway, text)
    assert first.headers["x-sluicegate-cache"] == "miss"
    wait_stored(gateway, text)
    second = ask(gateway, text)
    assert second.headers["x-sluicegate-cache"] == "hit"
    assert len([r for r in mock.requests if text in str(r)]) == 1
    a, b = first.parse(), second.parse()
    assert b.choices[0].message.content == a.choices[0].message.content
    assert b.usage is not None and a.usage is not None
    assert b.usage.prompt_tokens == a.usage.prompt_tokens
    assert b.usage.model_extra == {"x_sluicegate_cached": True}
    # The whole answer as first served, marked (stored unmarked, marked when a hit is sent).
    assert orjson.loads(second.content) == mark_cached(orjson.loads(first.content))


def test_a_stored_answer_replays_as_a_stream_and_a_stream_answers_json(
        gateway: ThreadedServer, mock: MockProviderServer) -> None:
    text = "replay me " + uuid.uuid4().hex
    ask(gateway, text)
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=TEST_KEY, max_retries=0)
    wait_stored(gateway, text)
    stream = client.chat.completions.create(
        model="gpt-mock", temperature=0, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": text}])
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        f"Mock reply to: {text}"
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    # The other way round: a completed stream answers a later non-stream request.
    streamed = "streamed first " + uuid.uuid4().hex
    list(client.chat.completions.create(model="gpt-mock", temperature=0, stream=True,
                                        messages=[{"role": "user", "content": streamed}]))
    wait_stored(gateway, streamed)
    assert ask(gateway, streamed).parse().choices[0].message.content == \
        f"Mock reply to: {streamed}"
    assert len([r for r in mock.requests if streamed in str(r)]) == 1


def cache_layer(server: ThreadedServer) -> CacheMiddleware:
    return next(layer for layer in stack_components(server.app.app)
                if isinstance(layer, CacheMiddleware))


def stored(backend: Backend, server: ThreadedServer) -> dict[str, CachedResponse]:
    """The entries `server`'s store holds, by their key in the store (the memory store's
    from the layer itself; the others' from their server: Redis for a tiered store)."""
    if backend.kind == "memory":
        store = cache_layer(server).store
        assert isinstance(store, MemoryCacheStore)
        return dict(store._entries)
    if backend.kind == "postgres":
        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            rows = conn.execute(sql.SQL("SELECT key, entry FROM {}").format(
                sql.Identifier(backend.table))).fetchall()
        return {key: CachedResponse.decode(entry) for key, entry in rows}
    with redis.Redis(port=REDIS_PORT) as client:
        return {key.decode(): CachedResponse.decode(client.get(key))
                for key in backend.redis_entries()}


def change_stored(backend: Backend, server: ThreadedServer,
                  change: Callable[[CachedResponse], CachedResponse]) -> None:
    """Replaces each stored entry with `change(entry)` (in both tiers of a tiered store)."""
    if backend.kind == "memory":
        store = cache_layer(server).store
        assert isinstance(store, MemoryCacheStore)
        for key, entry in list(store._entries.items()):
            store._entries[key] = change(entry)
        return
    if backend.kind in ("redis", "tiered"):
        with redis.Redis(port=REDIS_PORT) as client:
            for key in backend.redis_entries():
                client.set(key, change(CachedResponse.decode(client.get(key))).encode(),
                           keepttl=True)
    if backend.kind in ("postgres", "tiered"):
        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            table = sql.Identifier(backend.table)
            for key, entry in conn.execute(sql.SQL("SELECT key, entry FROM {}").format(table)):
                conn.execute(sql.SQL("UPDATE {} SET entry = %s WHERE key = %s").format(table),
                             (change(CachedResponse.decode(entry)).encode(), key))


def stream_raw(server: ThreadedServer, text: str) -> bytes:
    """The bytes of a streamed answer to `text`, as the client received them."""
    body = {"model": "gpt-mock", "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": text}]}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, headers=AUTH,
                      timeout=10) as response:
        assert response.status_code == 200
        assert response.headers["x-sluicegate-cache"] == "miss"
        return b"".join(response.iter_bytes())


def test_a_stream_is_kept_as_sent_and_read_into_its_answer_when_asked_again(
        backend: Backend, gateway: ThreadedServer, mock: MockProviderServer) -> None:
    """A streamed miss is stored as the bytes that went out, compressed (not read event by
    event on every miss); the first hit makes its JSON answer, with the stream's usage. The memory
    store then holds the answer in the stream's place; a shared store is not written from a
    hit (each process keeps the answer it made)."""
    text = "keep the stream " + uuid.uuid4().hex
    sent = stream_raw(gateway, text)
    wait_for(lambda: len(stored(backend, gateway)) == 1, timeout_s=10)
    [(key, entry)] = stored(backend, gateway).items()
    assert entry.stream_operation == "openai.chat" and lz4.block.decompress(entry.body) == sent
    assert entry.usage is None
    usage = orjson.loads(sent.split(b"\n\n")[-3][len(b"data: "):])["usage"]
    for _ in range(2):
        answer = ask(gateway, text)
        assert cache_status(answer) == "hit"
        parsed = answer.parse()
        assert parsed.choices[0].message.content == f"Mock reply to: {text}"
        assert parsed.choices[0].finish_reason == "stop"
        assert parsed.usage.prompt_tokens == usage["prompt_tokens"]
        assert parsed.usage.completion_tokens == usage["completion_tokens"]
        assert parsed.usage.model_extra == {"x_sluicegate_cached": True}
    assert upstream_calls(mock, text) == 1
    [(after_key, after)] = stored(backend, gateway).items()
    assert after_key == key
    if backend.kind == "memory":
        assert after.stream_operation is None and after.usage == usage
        assert orjson.loads(after.body)["choices"][0]["message"]["content"] == \
            f"Mock reply to: {text}"
        assert after.expires_at == pytest.approx(entry.expires_at, abs=1)
    else:
        assert after.body == entry.body and after.stream_operation == "openai.chat"


def test_a_stream_is_measured_against_max_entry_bytes_as_stored_not_as_sent(
        backend: Backend, start_gateway: StartGateway, mock: MockProviderServer) -> None:
    """Every token's event repeats the envelope: a stream is 20-50 times its answer as sent,
    about its answer LZ4-compressed. It is kept if it fits max_entry_bytes as stored, and its
    copy in flight is bounded at 16 times that."""
    limit = 4096
    gateway = start_gateway(f"max_entry_bytes={limit}")
    rng = random.Random(7)  # (CJK at random: 8 characters an event, which LZ4 barely shrinks)
    texts = {"fits stored": " ".join(f"w{i}" for i in range(200)),
             "too large stored": "".join(chr(rng.randrange(0x4E00, 0x9FA5)) for _ in range(1500)),
             "too long a copy": " ".join(f"w{i}" for i in range(450))}
    texts = {case: f"{case} {uuid.uuid4().hex} {text}" for case, text in texts.items()}
    sent = {case: stream_raw(gateway, text)
            for case, text in reversed(texts.items())}  # (the kept one last: see below)
    stored_size = {case: len(lz4.block.compress(raw, store_size=True))
                   for case, raw in sent.items()}
    assert len(sent["fits stored"]) > limit >= stored_size["fits stored"]
    assert len(sent["too large stored"]) <= 16 * limit < 16 * stored_size["too large stored"]
    assert len(sent["too long a copy"]) > 16 * limit and stored_size["too long a copy"] <= limit
    wait_stored(gateway, texts["fits stored"])  # (the others' fate was decided before it)
    replayed = ask(gateway, texts["fits stored"], stream=True)
    assert cache_status(replayed) == "hit"
    assert "".join(chunk.choices[0].delta.content or "" for chunk in replayed.parse()
                   if chunk.choices) == f"Mock reply to: {texts['fits stored']}"
    assert_answered(ask(gateway, texts["fits stored"]), texts["fits stored"], "hit")
    assert probe(gateway, texts["too large stored"]) == "none"
    assert probe(gateway, texts["too long a copy"]) == "none"
    assert [upstream_calls(mock, text) for text in texts.values()] == [1, 1, 1]


@pytest.mark.parametrize("backend", ["memory", "redis"], indirect=True)
def test_what_hits_reuse_is_bounded_by_max_bytes_and_goes_with_an_invalidation(
        backend: Backend, start_gateway: StartGateway, mock: MockProviderServer) -> None:
    """Each memo of what hits send (marked answers, stream forms, kept streams' answers: the
    memory store keeps those in place) holds at most a quarter of max_bytes; an invalidation
    empties them, so an answer dropped from the store is not kept in memory by them."""
    max_bytes = 256 * 1024
    gateway = start_gateway(f"max_bytes={max_bytes}")
    layer = cache_layer(gateway)
    words = " ".join(f"w{i}" for i in range(2500))  # (answers of ~15 KB)
    texts = [f"memo {i} {uuid.uuid4().hex} {words}" for i in range(2)]
    for text in texts:
        ask(gateway, text, stream=True)  # (kept as a stream: read into its answer once asked)
        wait_stored(gateway, text)
        assert_answered(ask(gateway, text), text, "hit")
        assert cache_status(ask(gateway, text, stream=True)) == "hit"
    memos = {"marked": (layer._marked, layer._marked_bytes),
             "replays": (layer._replays, layer._replays_bytes),
             "streams": (layer._streams, layer._streams_bytes)}
    for name, (memo, held) in memos.items():
        kept = name != "streams" or backend.kind != "memory"
        assert bool(memo) == kept and held <= max_bytes // 4, name
    many = [f"memo more {i} {uuid.uuid4().hex} {words}" for i in range(12)]
    for text in many:
        ask(gateway, text)
        wait_stored(gateway, text)
        ask(gateway, text, stream=True)
    assert 0 < layer._marked_bytes <= max_bytes // 4
    assert 0 < layer._replays_bytes <= max_bytes // 4
    assert [upstream_calls(mock, text) for text in [*texts, *many]] == [1] * 14
    invalidated = httpx.post(gateway.url + "/admin/cache/invalidate", json={"project": "tests"},
                             headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
    assert invalidated.status_code == 200
    assert (layer._marked, layer._replays, layer._streams) == ({}, {}, {})
    assert (layer._marked_bytes, layer._replays_bytes, layer._streams_bytes) == (0, 0, 0)


@pytest.mark.parametrize("damage", ["cut short", "not compressed", "too large",
                                    "nested too deep"])
def test_a_kept_stream_that_makes_no_answer_is_a_miss_whose_answer_replaces_it(
        damage: str, backend: Backend, gateway: ThreadedServer,
        mock: MockProviderServer) -> None:
    text = "cut later " + uuid.uuid4().hex
    sent = stream_raw(gateway, text)
    wait_for(lambda: len(stored(backend, gateway)) == 1, timeout_s=10)
    cut = {"cut short": lz4.block.compress(
        sent[:sent.index(b'"finish_reason":"stop"')].rpartition(b"\n\n")[0] + b"\n\n"),
        "not compressed": len(sent).to_bytes(4, "little") + sent,
        "too large": (2**31 - 1).to_bytes(4, "little") + lz4.block.compress(sent)[4:],
        # (orjson reads 1,024 levels but writes 255: the answer cannot be written)
        "nested too deep": lz4.block.compress(sent.replace(
            b'"object":', b'"x":' + b"[" * 300 + b"]" * 300 + b',"object":', 1)),
    }[damage]

    def cut_short(entry: CachedResponse) -> CachedResponse:
        return CachedResponse(cut, entry.api_format, entry.status, entry.created_at, None,
                              entry.model, entry.cost_micros, entry.tags, None,
                              entry.stream_operation)

    change_stored(backend, gateway, cut_short)
    assert [entry.body for entry in stored(backend, gateway).values()] == [cut]
    # A miss that may not store leaves it stored; that it makes no answer is remembered
    # (every store), so it is not read again on every request.
    assert cache_status(ask(gateway, text, extra_headers={"cache-control": "no-store"})) == \
        "miss"
    assert [entry.body for entry in stored(backend, gateway).values()] == [cut]
    assert cache_layer(gateway)._streams == {cut: None}
    assert cache_status(ask(gateway, text)) == "miss"
    assert upstream_calls(mock, text) == 3
    wait_for(lambda: [e.stream_operation for e in stored(backend, gateway).values()] == [None],
             timeout_s=10)
    assert_answered(ask(gateway, text), text, "hit")
    assert upstream_calls(mock, text) == 3


def test_a_stream_that_broke_is_not_kept_in_place_of_a_good_answer(
        gateway: ThreadedServer, mock: MockProviderServer) -> None:
    """A stream that broke upstream ends with an error event, a complete 200 to the tee:
    it is not stored (not even by a request that may not use the stored answer)."""
    from tests.mock_providers import Fault
    text = "break later " + uuid.uuid4().hex
    stream_raw(gateway, text)
    wait_stored(gateway, text)
    mock.push_fault(Fault("error_event", provider="openai", after_chunks=1))
    body = {"model": "gpt-mock", "temperature": 0, "stream": True,
            "messages": [{"role": "user", "content": text}]}
    with httpx.stream("POST", gateway.url + "/v1/chat/completions", json=body,
                      headers={**AUTH, "cache-control": "no-cache"}, timeout=10) as response:
        broken = b"".join(response.iter_bytes())
    assert response.status_code == 200 and b'"error"' in broken
    assert upstream_calls(mock, text) == 2
    time.sleep(0.5)  # (what a store would take: the tests above wait for less)
    assert_answered(ask(gateway, text), text, "hit")
    assert upstream_calls(mock, text) == 2


@pytest.mark.parametrize("model,provider", [("gemini-mock", "gemini"), ("gpt-mock", "openai"),
                                            ("claude-mock", "anthropic")])
def test_a_stream_cut_short_upstream_is_not_kept(gateway: ThreadedServer,
                                                 mock: MockProviderServer, model: str,
                                                 provider: str) -> None:
    """The provider's stream ends cleanly but without its final events: its part of an
    answer ends with an error event, and is not served to the next caller as a whole one."""
    from tests.mock_providers import Fault
    text = "cut short " + uuid.uuid4().hex
    mock.push_fault(Fault("truncate", provider=provider, after_chunks=1))
    body = {"model": model, "max_tokens": 50, "temperature": 0, "stream": True,
            "messages": [{"role": "user", "content": text}]}
    headers = {**AUTH, "anthropic-version": "2023-06-01"}
    cut = httpx.post(gateway.url + "/v1/messages", json=body, headers=headers, timeout=10)
    assert cut.status_code == 200 and "event: error" in cut.text
    time.sleep(0.5)  # (what a store would take)
    again = httpx.post(gateway.url + "/v1/messages", json=body, headers=headers, timeout=10)
    assert again.headers["x-sluicegate-cache"] != "hit"
    assert "event: message_stop" in again.text and upstream_calls(mock, text) == 2


def test_one_stream_kept_twice_is_read_once_and_each_entry_keeps_its_own_figures() -> None:
    """Away from the memory store, the answer a kept stream makes is kept in process per
    stream: another entry with the same bytes gets the same answer and its own model,
    cost and tags."""
    layer = CacheMiddleware(lambda *_: None, store=f"redis://127.0.0.1:{REDIS_PORT}/0")
    sent = (b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m",'
            b'"choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":"stop"}]}\n\n'
            b"data: [DONE]\n\n")
    body = lz4.block.compress(sent)
    first, second = (CachedResponse(body, "openai", 200, time.time(), None, model, cost, tags,
                                    time.time() + 60, "openai.chat")
                     for model, cost, tags in (("a", 1000, ("t:a",)), ("b", 4000, ("t:b",))))
    one, other = layer._collected("k1", first), layer._collected("k2", second)
    assert one is not None and other is not None
    assert orjson.loads(one.body)["choices"][0]["message"]["content"] == "Hi"
    assert other.body is one.body  # (read once)
    assert (one.model, one.cost_micros, one.tags) == ("a", 1000, ("t:a",))
    assert (other.model, other.cost_micros, other.tags) == ("b", 4000, ("t:b",))
    assert other.stream_operation is None and other.expires_at == second.expires_at


def test_anthropic_callers_get_their_own_shape(gateway: ThreadedServer) -> None:
    text = "claude cache " + uuid.uuid4().hex
    claude = anthropic.Anthropic(base_url=gateway.url, api_key=TEST_KEY, max_retries=0)

    def once() -> Any:
        return claude.messages.with_raw_response.create(
            model="claude-mock", max_tokens=50, extra_headers=OPT_IN,
            messages=[{"role": "user", "content": text}])
    first = once()
    wait_for(lambda: once().headers["x-sluicegate-cache"] == "hit")
    with claude.messages.stream(model="claude-mock", max_tokens=50, extra_headers=OPT_IN,
                                messages=[{"role": "user", "content": text}]) as stream:
        replayed = stream.get_final_message()
    assert replayed.content[0].text == first.parse().content[0].text  # type: ignore[union-attr]
    assert replayed.stop_reason == "end_turn"


def test_projects_never_share_answers(gateway: ThreadedServer,
                                      mock: MockProviderServer) -> None:
    text = "tenant " + uuid.uuid4().hex
    ask(gateway, text)
    wait_stored(gateway, text)
    other = ask(gateway, text, key=OTHER_KEY)
    assert other.headers["x-sluicegate-cache"] == "miss"
    assert len([r for r in mock.requests if text in str(r)]) == 2


def test_controls_bypass_no_cache_and_no_store(gateway: ThreadedServer,
                                               mock: MockProviderServer) -> None:
    text = "controls " + uuid.uuid4().hex
    warm = ask(gateway, text, temperature=0.7)
    assert warm.headers["x-sluicegate-cache"] == "bypass"
    stored = ask(gateway, text, extra_headers={"cache-control": "no-store"})
    assert stored.headers["x-sluicegate-cache"] == "miss"
    assert ask(gateway, text).headers["x-sluicegate-cache"] == "miss"  # no-store kept it out
    wait_stored(gateway, text)
    fresh = ask(gateway, text, extra_headers={"cache-control": "no-cache"})
    assert fresh.headers["x-sluicegate-cache"] == "miss"
    # Neither read nor written: a bypass (counted as a miss, it skewed the hit ratio).
    for off in ({"x-sluicegate-cache": "off"}, {"cache-control": "no-cache, no-store"}):
        assert ask(gateway, text, extra_headers=off).headers["x-sluicegate-cache"] == "bypass"
    spaced = ask(gateway, text, extra_headers={"x-sluicegate-cache-namespace": "eval"})
    assert spaced.headers["x-sluicegate-cache"] == "miss"
    bad = httpx.post(gateway.url + "/v1/chat/completions",
                     headers={**AUTH, "x-sluicegate-cache-namespace": "x" * 300},
                     json={"model": "gpt-mock", "temperature": 0,
                           "messages": [{"role": "user", "content": text}]})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_cache_header"


def test_only_if_cached_answers_from_the_cache_or_with_a_504(gateway: ThreadedServer,
                                                             mock: MockProviderServer) -> None:
    text = "only if cached " + uuid.uuid4().hex
    with pytest.raises(openai.APIStatusError) as refused:
        ask(gateway, text, extra_headers=ONLY_IF_CACHED)
    assert refused.value.status_code == 504
    assert refused.value.response.headers["x-should-retry"] == "false"  # the SDKs give up
    assert refused.value.response.headers["x-sluicegate-cache"] == "miss"  # (as any miss's)
    assert refused.value.body["code"] == "not_cached"  # type: ignore[index]
    assert refused.value.body["type"] == "invalid_request_error"  # type: ignore[index]
    with pytest.raises(anthropic.APIStatusError) as claude_refused:
        anthropic.Anthropic(base_url=gateway.url, api_key=TEST_KEY).messages.create(
            model="claude-mock", max_tokens=50, messages=[{"role": "user", "content": text}],
            extra_headers={**OPT_IN, **ONLY_IF_CACHED})
    assert claude_refused.value.status_code == 504
    assert claude_refused.value.body["type"] == "error"  # type: ignore[index]
    assert claude_refused.value.body["error"]["type"] == \
        "invalid_request_error"  # type: ignore[index]
    assert "only-if-cached" in claude_refused.value.body["error"]["message"]  # type: ignore[index]
    with pytest.raises(openai.APIStatusError) as uncacheable:  # bypass: never stored either
        ask(gateway, text, temperature=0.7, extra_headers=ONLY_IF_CACHED)
    assert uncacheable.value.status_code == 504
    assert uncacheable.value.response.headers["x-sluicegate-cache"] == "bypass"
    assert upstream_calls(mock, text) == 0
    ask(gateway, text)
    wait_stored(gateway, text)
    answered = ask(gateway, text, extra_headers=ONLY_IF_CACHED)
    assert_answered(answered, text, "hit")
    with pytest.raises(openai.APIStatusError):  # no-cache: the stored answer may not be used
        ask(gateway, text, extra_headers={"cache-control": "only-if-cached, no-cache"})
    assert upstream_calls(mock, text) == 1


def test_a_failed_upstream_answer_is_not_stored(gateway: ThreadedServer,
                                                mock: MockProviderServer) -> None:
    from tests.mock_providers import Fault
    text = "fails " + uuid.uuid4().hex
    mock.push_fault(Fault("status", provider="openai", status=500))
    with pytest.raises(openai.InternalServerError):
        ask(gateway, text)
    assert ask(gateway, text).headers["x-sluicegate-cache"] == "miss"


def test_an_admin_call_invalidates_a_project(gateway: ThreadedServer,
                                             mock: MockProviderServer) -> None:
    text = "invalidate " + uuid.uuid4().hex
    ask(gateway, text)
    wait_stored(gateway, text)
    url = gateway.url + "/admin/cache/invalidate"
    assert httpx.post(url, json={"project": "tests"}).status_code == 401
    assert httpx.post(url, json={"project": "tests"},
                      headers={"authorization": f"Bearer {TEST_KEY}"}).status_code == 401
    admin = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    assert httpx.post(url, json={}, headers=admin).status_code == 400
    assert httpx.post(url, json={"project": "tests", "colour": "red"},
                      headers=admin).status_code == 400
    done = httpx.post(url, json={"project": "tests", "model": "gpt-mock"}, headers=admin)
    assert done.status_code == 200 and done.json()["dropped"] >= 1
    assert ask(gateway, text).headers["x-sluicegate-cache"] == "miss"
    assert len([r for r in mock.requests if text in str(r)]) == 2


def test_entries_expire_after_the_ttl_of_their_model_project_or_default(
        start_gateway: StartGateway, mock: MockProviderServer) -> None:
    # The TTL is the model's, else the project's, else the default.
    gateway = start_gateway("ttl_s=1, project_ttl_s={'other': 3600}, "
                            "model_ttl_s={'claude-mock': 1}")
    text = "ttl " + uuid.uuid4().hex
    short: dict[str, Callable[[], Any]] = {  # default TTL: 1 s
        "tests gpt-mock": lambda: ask(gateway, text),
        # the model's TTL (1 s) over the project's
        "other claude-mock": lambda: ask_claude(gateway, text, key=OTHER_KEY)}
    kept: dict[str, Callable[[], Any]] = {  # the project's TTL: 1 h
        "other gpt-mock": lambda: ask(gateway, text, key=OTHER_KEY)}
    for name, once in {**short, **kept}.items():
        assert cache_status(once()) == "miss", name
        wait_for(lambda: cache_status(once()) == "hit")  # noqa: B023 (called right here)
        assert cache_status(once()) == "hit", name
    calls = upstream_calls(mock, text)

    time.sleep(1.5)  # the last of the writes landed before its first hit

    for name, once in short.items():
        assert cache_status(once()) == "miss", name
    for name, once in kept.items():
        assert cache_status(once()) == "hit", name
    assert upstream_calls(mock, text) == calls + len(short)
    answer = short["tests gpt-mock"]  # and the fresh answer is stored again
    wait_for(lambda: cache_status(answer()) == "hit")
    assert cache_status(answer()) == "hit"


def assert_answered(response: Any, text: str, status: str) -> None:
    assert response.status_code == 200
    assert cache_status(response) == status
    assert response.parse().choices[0].message.content == f"Mock reply to: {text}"


def readiness(gateway: ThreadedServer) -> dict[str, str]:
    checks: dict[str, str] = httpx.get(gateway.url + "/readyz").json()["checks"]
    return checks


@pytest.mark.parametrize("backend", OUTAGE_BACKENDS, indirect=True)
def test_a_store_outage_is_a_miss_not_an_error(proxies: Proxies, start_gateway: StartGateway,
                                               mock: MockProviderServer) -> None:
    gateway = start_gateway(proxies=proxies)
    kept = "kept " + uuid.uuid4().hex
    ask(gateway, kept)
    wait_for(lambda: cache_status(ask(gateway, kept)) == "hit")
    assert cache_status(ask(gateway, kept)) == "hit"

    kept_calls = upstream_calls(mock, kept)
    proxies.stop()  # every server of the store is gone (both tiers of a tiered one)
    during = "during " + uuid.uuid4().hex
    for text in (kept, during, during):
        assert_answered(ask(gateway, text), text, "miss")
    streamed = ask(gateway, during, stream=True)
    assert streamed.status_code == 200 and cache_status(streamed) == "miss"
    assert "".join(chunk.choices[0].delta.content or "" for chunk in streamed.parse()
                   if chunk.choices) == f"Mock reply to: {during}"
    claude = ask_claude(gateway, during)
    assert claude.status_code == 200 and cache_status(claude) == "miss"
    assert upstream_calls(mock, during) == 4
    assert upstream_calls(mock, kept) == kept_calls + 1
    ready = httpx.get(gateway.url + "/readyz")
    assert ready.status_code == 200, ready.text  # still ready: the cache is degraded
    assert any(value.startswith("degraded") for value in readiness(gateway).values())
    proxies.start()  # misses until the store tries its servers again
    wait_for(lambda: all(value == "ok" for value in readiness(gateway).values()), timeout_s=15)
    assert all(value == "ok" for value in readiness(gateway).values())
    wait_for(lambda: cache_status(ask(gateway, kept)) == "hit")
    calls = upstream_calls(mock, kept)
    assert_answered(ask(gateway, kept), kept, "hit")  # what was stored before survived
    after = "after " + uuid.uuid4().hex  # and new answers are stored again
    assert cache_status(ask(gateway, after)) == "miss"
    wait_for(lambda: cache_status(ask(gateway, after)) == "hit")
    after_calls = upstream_calls(mock, after)
    assert_answered(ask(gateway, after), after, "hit")
    assert upstream_calls(mock, after) == after_calls
    assert upstream_calls(mock, kept) == calls


@pytest.mark.parametrize("backend", ["tiered"], indirect=True)
def test_a_tiered_store_answers_from_the_tier_that_is_up(
        proxies: Proxies, start_gateway: StartGateway, mock: MockProviderServer) -> None:
    gateway = start_gateway(proxies=proxies)
    both = "both tiers " + uuid.uuid4().hex
    ask(gateway, both)
    wait_for(lambda: cache_status(ask(gateway, both)) == "hit")

    both_calls = upstream_calls(mock, both)

    proxies.stop(proxies.redis)  # hot down: warm answers, and takes new answers alone
    assert_answered(ask(gateway, both), both, "hit")
    warm_only = "warm only " + uuid.uuid4().hex
    assert cache_status(ask(gateway, warm_only)) == "miss"
    wait_for(lambda: cache_status(ask(gateway, warm_only)) == "hit")
    assert_answered(ask(gateway, warm_only), warm_only, "hit")
    warm_only_calls = upstream_calls(mock, warm_only)

    proxies.start(proxies.redis)
    wait_for(lambda: readiness(gateway).get("cache_redis") == "ok")  # Redis was tried again
    assert readiness(gateway).get("cache_redis") == "ok"
    proxies.stop(proxies.postgres)  # warm down: hot answers what it holds
    assert_answered(ask(gateway, both), both, "hit")
    # The hot write failed while Redis was down, and nothing was promoted since: a miss.
    assert_answered(ask(gateway, warm_only), warm_only, "miss")
    hot_only = "hot only " + uuid.uuid4().hex
    assert cache_status(ask(gateway, hot_only)) == "miss"
    wait_for(lambda: cache_status(ask(gateway, hot_only)) == "hit")
    hot_only_calls = upstream_calls(mock, hot_only)
    assert_answered(ask(gateway, hot_only), hot_only, "hit")
    assert upstream_calls(mock, both) == both_calls
    assert upstream_calls(mock, warm_only) == warm_only_calls + 1
    assert upstream_calls(mock, hot_only) == hot_only_calls
    proxies.start(proxies.postgres)


@pytest.mark.parametrize("backend", ["tiered"], indirect=True)
def test_a_warm_hit_is_promoted_to_hot(backend: Backend, gateway: ThreadedServer,
                                       mock: MockProviderServer) -> None:
    text = "promote " + uuid.uuid4().hex
    ask(gateway, text)
    wait_for(lambda: cache_status(ask(gateway, text)) == "hit")
    calls = upstream_calls(mock, text)
    [hot_key] = backend.redis_entries()
    with redis.Redis(port=REDIS_PORT) as client:
        stored = CachedResponse.decode(client.get(hot_key))
        assert client.delete(hot_key) == 1  # only PostgreSQL holds it now

        assert_answered(ask(gateway, text), text, "hit")  # from warm
        wait_for(lambda: bool(client.exists(hot_key)))  # promoted after the answer
        promoted = CachedResponse.decode(client.get(hot_key))
        assert 0 < client.pttl(hot_key) <= 3600 * 1000
    assert promoted.body == stored.body and promoted.tags == stored.tags
    assert promoted.expires_at is not None and stored.expires_at is not None
    # the same expiry (the remaining TTL; test_cache_stores shows it is not renewed)
    assert abs(promoted.expires_at - stored.expires_at) < 1
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        deleted = conn.execute(sql.SQL("DELETE FROM {}").format(sql.Identifier(backend.table)))
        assert deleted.rowcount == 1
    assert_answered(ask(gateway, text), text, "hit")  # now only Redis holds it
    assert upstream_calls(mock, text) == calls
    # promoted with its tags: an invalidation drops it
    admin = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    done = httpx.post(gateway.url + "/admin/cache/invalidate", json={"project": "tests"},
                      headers=admin)
    assert done.status_code == 200 and done.json()["dropped"] == 1
    assert backend.redis_entries() == []
    assert cache_status(ask(gateway, text)) == "miss"


@pytest.mark.parametrize("options", [{"ttl_s": float("inf")}, {"model_ttl_s": {"m": 0}},
                                     {"project_ttl_s": {"p": -5}},
                                     {"model_ttl_s": {"m": float("nan")}}])
def test_bad_ttls_refuse_to_start(options: dict[str, Any]) -> None:
    from gateway.config import ConfigError

    async def app(scope: Any, receive: Any, send: Any) -> None:
        return None
    with pytest.raises(ConfigError):
        CacheMiddleware(app, **options)


EDITING_LAYER = '''
import orjson

class Editor:
    """A custom layer under the cache that rewrites the answer's text."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        async def edit(message):
            if message["type"] == "http.response.start":
                message["headers"] = [(k, v) for k, v in message["headers"]
                                      if k != b"content-length"]
            elif message["type"] == "http.response.body" and message.get("body"):
                answer = orjson.loads(message["body"])
                answer["choices"][0]["message"]["content"] += " [edited]"
                message["body"] = orjson.dumps(answer)
            await send(message)
        await self.app(scope, receive, edit)

middleware = [
    Middleware(AuthMiddleware, keys=[StaticKey('tests', key_env='SG_TEST_KEY')]),
    Middleware(CacheMiddleware),
    Middleware(Editor),
]
'''


def _edited_miss_then_hit(tmp_path: Path, mock_url: str, layers: str) -> tuple[str, str]:
    """The answer's text on a miss through `layers` (an editing layer under the cache; the
    client sees it edited) and on the hit that follows."""
    config = write_config(tmp_path, mock_config(mock_url, middleware="[]", extra=layers))
    text = "edit me " + uuid.uuid4().hex
    with ThreadedServer(create_app(config)) as server:
        first = ask(server, text)
        assert cache_status(first) == "miss"
        assert first.parse().choices[0].message.content.endswith(" [edited]")
        wait_for(lambda: cache_status(ask(server, text)) == "hit")
        second = ask(server, text)
        assert cache_status(second) == "hit"
    return first.parse().choices[0].message.content, second.parse().choices[0].message.content


def test_the_cache_keeps_what_passed_through_it_not_what_the_passthrough_sent(
        tmp_path: Path, mock_url: str) -> None:
    """The passthrough hands the cache its parse of what it sent, which saves parsing it
    again; when a layer below the cache changed those bytes, the cache parses what it saw."""
    first, second = _edited_miss_then_hit(tmp_path, mock_url, EDITING_LAYER)
    assert second == first


def test_a_layer_that_says_it_passes_json_through_is_taken_at_its_word(
        tmp_path: Path, mock_url: str) -> None:
    """When every layer below says `passes_json_through`, the cache keeps the passthrough's
    record of what it sent and does not copy the answer on its way out: a layer that says so
    and edits anyway (as this one does) is not noticed. The test above is the other side."""
    lying = EDITING_LAYER.replace('''    def __init__(self, app):''', '''    passes_json_through = True

    def __init__(self, app):''')
    first, second = _edited_miss_then_hit(tmp_path, mock_url, lying)
    assert second + " [edited]" == first


def test_which_stacks_pass_json_through(tmp_path: Path) -> None:
    def cache_layer(config_source: str) -> CacheMiddleware:
        config = load_config(write_config(tmp_path, config_source))
        return next(layer for layer in stack_components(build_stack(config))
                    if isinstance(layer, CacheMiddleware))

    default = cache_layer(mock_config("http://127.0.0.1:9"))  # failover, then the passthrough
    assert json_passes_through(default.app) and default._json_passes_below
    editing = cache_layer(mock_config("http://127.0.0.1:9", middleware="[]",
                                      extra=EDITING_LAYER))
    assert not json_passes_through(editing.app) and not editing._json_passes_below


# -- what the review found ------------------------------------------------------------------------

def test_an_invalidation_reaches_every_worker(tmp_path: Path, mock_url: str,
                                              mock: MockProviderServer) -> None:
    """`serve --workers 2` with the memory store: each worker keeps its own entries; an
    invalidation answered 200 by one holds on both for every request after it."""
    from tests.harness import start_cli_gateway, stop_process
    layers = ("[Middleware(AuthMiddleware, keys=[StaticKey('tests', key_env='SG_TEST_KEY')]), "
              "Middleware(CacheMiddleware, admin_token_env='SG_CACHE_ADMIN')]")
    config = write_config(tmp_path, mock_config(mock_url, middleware=layers))
    process, url = start_cli_gateway(config, workers=2, env={"SG_CACHE_ADMIN": ADMIN_TOKEN})
    try:
        text = "workers " + uuid.uuid4().hex
        body = {"model": "gpt-mock", "temperature": 0,
                "messages": [{"role": "user", "content": text}]}

        def status() -> str:  # (a new connection each time: either worker may take it)
            return str(httpx.post(url + "/v1/chat/completions", json=body,
                                  headers={**AUTH, "connection": "close"}
                                  ).headers["x-sluicegate-cache"])
        for _ in range(30):  # until each worker has stored its own copy
            status()
            time.sleep(0.02)
        assert upstream_calls(mock, text) == 2, "each worker should have missed once"
        done = httpx.post(url + "/admin/cache/invalidate", json={"project": "tests"},
                          headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
        assert done.status_code == 200, done.text
        statuses = [status() for _ in range(20)]
        # each worker's first answer after the invalidation came from the model again
        assert upstream_calls(mock, text) == 4, statuses
    finally:
        stop_process(process)


@pytest.mark.parametrize("backend", ["memory"], indirect=True)
def test_an_anthropic_beta_is_part_of_the_key(gateway: ThreadedServer,
                                              mock: MockProviderServer) -> None:
    """The Anthropic adapter sends `anthropic-beta` and `anthropic-version` on to the
    provider: they change its answer, so a request with a beta is not answered with the
    answer to one without it."""
    text = "beta " + uuid.uuid4().hex
    claude = anthropic.Anthropic(base_url=gateway.url, api_key=TEST_KEY, max_retries=0)

    def once(beta: str | None = None) -> Any:
        return claude.messages.with_raw_response.create(
            model="claude-mock", max_tokens=50,
            extra_headers={**OPT_IN, **({"anthropic-beta": beta} if beta else {})},
            messages=[{"role": "user", "content": text}])
    assert cache_status(once()) == "miss"
    wait_for(lambda: cache_status(once()) == "hit", timeout_s=10)
    calls = upstream_calls(mock, text)
    assert cache_status(once("interleaved-thinking-2025-05-14")) == "miss"
    assert upstream_calls(mock, text) == calls + 1
    wait_for(lambda: cache_status(once("interleaved-thinking-2025-05-14")) == "hit",
             timeout_s=10)
    assert cache_status(once()) == "hit"  # each has its own answer


@pytest.mark.parametrize("backend", ["memory", "redis"], indirect=True)
def test_a_stream_kept_without_its_usage_chunk_keeps_the_calls_usage(
        gateway: ThreadedServer, mock: MockProviderServer) -> None:
    """A client that did not ask for include_usage gets no usage chunk (the gateway asked
    for it, and drops it on the way out): the stream it saw has none, yet its answer, as
    JSON or replayed with include_usage, carries the call's usage."""
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=TEST_KEY, max_retries=0)
    for then_stream in (False, True):
        text = f"no usage chunk {then_stream} " + uuid.uuid4().hex
        streamed = list(client.chat.completions.create(
            model="gpt-mock", temperature=0, stream=True,
            messages=[{"role": "user", "content": text}]))
        assert all(chunk.usage is None for chunk in streamed)
        wait_stored(gateway, text)
        if then_stream:
            chunks = list(client.chat.completions.create(
                model="gpt-mock", temperature=0, stream=True,
                stream_options={"include_usage": True},
                messages=[{"role": "user", "content": text}]))
            usage = chunks[-1].usage
            assert chunks[-1].choices == []
        else:
            answer = ask(gateway, text)
            assert cache_status(answer) == "hit"
            usage = answer.parse().usage
        assert upstream_calls(mock, text) == 1
        assert usage is not None and usage.prompt_tokens > 0 and usage.completion_tokens > 0
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
        assert usage.model_extra == {"x_sluicegate_cached": True}


@pytest.mark.parametrize("backend", ["memory", "redis", "tiered"], indirect=True)
def test_an_invalidation_during_a_miss_in_flight_keeps_its_answer_out(
        gateway: ThreadedServer, mock: MockProviderServer) -> None:
    """A miss whose provider call began before an invalidation answers after it: its answer
    may be from before the invalidation, and is not stored."""
    from tests.mock_providers import Fault
    text = "race " + uuid.uuid4().hex
    mock.push_fault(Fault("slow_first_byte", provider="openai", delay_s=1.0))
    result: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: result.setdefault("r", ask(gateway, text)))
    thread.start()
    time.sleep(0.4)  # the miss is waiting for the provider
    done = httpx.post(gateway.url + "/admin/cache/invalidate", json={"project": "tests"},
                      headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
    assert done.status_code == 200
    thread.join(10)
    assert cache_status(result["r"]) == "miss"
    time.sleep(0.5)  # (what its write would take)
    assert probe(gateway, text) == "none"
    assert cache_status(ask(gateway, text)) == "miss"  # a request after it is stored
    wait_stored(gateway, text)
    assert upstream_calls(mock, text) == 2


@pytest.mark.parametrize("backend", ["memory", "redis"], indirect=True)
def test_an_error_answered_with_a_200_is_not_stored(gateway: ThreadedServer,
                                                    mock: MockProviderServer) -> None:
    """OpenRouter and some OpenAI-compatible proxies answer certain failures with HTTP 200
    and an `{"error": ...}` body: it goes to the caller as the error it is, and is not
    kept."""
    from tests.mock_providers import Fault
    text = "error body " + uuid.uuid4().hex
    mock.push_fault(Fault("status", provider="openai", status=502, sent_status=200))
    body = {"model": "gpt-mock", "temperature": 0,
            "messages": [{"role": "user", "content": text}]}
    first = httpx.post(gateway.url + "/v1/chat/completions", json=body, headers=AUTH)
    assert first.status_code == 502 and "error" in first.json()
    time.sleep(0.5)  # (what its write would take)
    assert probe(gateway, text) == "none"
    assert_answered(ask(gateway, text), text, "miss")
    assert upstream_calls(mock, text) == 2


@pytest.mark.parametrize("backend", ["memory", "redis"], indirect=True)
def test_a_stream_asked_of_an_answer_without_a_stream_form_is_a_miss(
        backend: Backend, gateway: ThreadedServer, mock: MockProviderServer) -> None:
    """A stored answer the replay cannot stream (here one without `object`, as some
    OpenAI-compatible servers answer) still answers JSON; a stream asked of it goes to the
    provider rather than failing."""
    text = "no object " + uuid.uuid4().hex
    ask(gateway, text)
    wait_stored(gateway, text)

    def without_object(entry: CachedResponse) -> CachedResponse:
        answer = orjson.loads(entry.body)
        del answer["object"]
        return CachedResponse(orjson.dumps(answer), entry.api_format, entry.status,
                              entry.created_at, entry.usage, entry.model, entry.cost_micros,
                              entry.tags, None, entry.stream_operation)
    change_stored(backend, gateway, without_object)
    assert_answered(ask(gateway, text), text, "hit")
    streamed = ask(gateway, text, stream=True)
    assert streamed.status_code == 200 and cache_status(streamed) == "miss"
    assert "".join(chunk.choices[0].delta.content or "" for chunk in streamed.parse()
                   if chunk.choices) == f"Mock reply to: {text}"
    assert upstream_calls(mock, text) == 2


@pytest.mark.parametrize("backend", ["memory"], indirect=True)
def test_only_if_cached_never_reaches_the_model_on_an_operation_not_cached(
        gateway: ThreadedServer, mock: MockProviderServer) -> None:
    text = "responses " + uuid.uuid4().hex
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=TEST_KEY, max_retries=0)
    with pytest.raises(openai.APIStatusError) as refused:
        client.responses.create(model="gpt-mock", input=text, temperature=0,
                                extra_headers=ONLY_IF_CACHED)
    assert refused.value.status_code == 504
    assert refused.value.body["code"] == "not_cached"  # type: ignore[index]
    assert upstream_calls(mock, text) == 0
    client.responses.create(model="gpt-mock", input=text, temperature=0)  # (not refused)
    assert upstream_calls(mock, text) == 1


@pytest.mark.parametrize("backend", ["memory"], indirect=True)
@pytest.mark.parametrize("fields", [{"project": "tests", "model": 123},
                                    {"project": "tests", "namespace": ""},
                                    {"project": "tests", "model": ["gpt-mock"]},
                                    {"project": 7}])
def test_an_invalidation_with_a_field_that_is_not_a_name_is_refused(
        gateway: ThreadedServer, fields: dict[str, Any]) -> None:
    """Leaving out a field it cannot read would widen the call: `{"project": "tests",
    "model": 123}` would drop every answer of the project."""
    text = "narrow " + uuid.uuid4().hex
    ask(gateway, text)
    wait_stored(gateway, text)
    refused = httpx.post(gateway.url + "/admin/cache/invalidate", json=fields,
                         headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
    assert refused.status_code == 400 and refused.json()["error"]["type"] == \
        "invalid_request_error"
    assert probe(gateway, text) == "hit"


def test_the_usage_kept_for_a_stream_reads_back_as_the_calls_usage() -> None:
    # (kept when the client's stream carried none: see the layer's _entry_of)
    from middleware.cache import _openai_usage

    for usage in (Usage(10, 5), Usage(10, 5, cached_input_tokens=4, reasoning_tokens=2),
                  Usage(3_000, 7, cached_input_tokens=1_000, cache_write_tokens=1_500,
                        cache_write_1h_tokens=500)):
        assert Usage.from_openai(_openai_usage(usage)) == usage


def test_an_answer_is_told_from_an_error_by_its_members_not_its_object() -> None:
    from gateway import context as c
    from gateway.context import is_answer as _is_answer

    # Together's completions say "text.completion"; an answer that says nothing is one too
    together = {"id": "8f3317dd3c3a39ef-YYZ", "object": "text.completion",
                "choices": [{"text": " Paris", "finish_reason": "eos", "index": 0}],
                "usage": {"prompt_tokens": 8, "completion_tokens": 2, "total_tokens": 10}}
    assert _is_answer(together, c.OPENAI_COMPLETIONS)
    assert _is_answer({"choices": []}, c.OPENAI_CHAT)
    assert _is_answer({"type": "message", "content": []}, c.ANTHROPIC_MESSAGES)
    assert _is_answer({"object": "list", "data": [{"embedding": [0.1]}]}, c.OPENAI_EMBEDDINGS)
    for error in ({"error": {"message": "upstream failed", "code": 502}},
                  {"object": "chat.completion", "error": "x", "choices": []},
                  {"type": "error", "error": {"type": "overloaded_error"}}, [], "text",
                  {"object": "chat.completion"}):
        operation = c.ANTHROPIC_MESSAGES if isinstance(error, dict) and \
            error.get("type") == "error" else c.OPENAI_CHAT
        assert not _is_answer(error, operation), error


def test_an_answer_is_kept_apart_per_deployment_tags_asked_for(tmp_path: Path,
                                                              mock_url: str,
                                                              mock: MockProviderServer) -> None:
    # `x-sluicegate-tags` chooses the deployments that may answer (a region, a tier): an
    # answer from the untagged one must not answer a request pinned to "eu" (it did, from
    # the cache above the failover layer), nor one no deployment has the tags of (a 400).
    layers = ("[Middleware(AuthMiddleware, keys=[StaticKey('tests', key_env='SG_TEST_KEY')]), "
              "Middleware(CacheMiddleware), Middleware(FailoverMiddleware, "
              "retry=RetryPolicy(max_attempts=1), breaker=NEVER_OPENS)]")
    extra = ('models["smart"] = Model([Deployment("openai", "gpt-4o-mini", price=MOCK_PRICE), '
             'Deployment("azure", "gpt-4o-eu", price=MOCK_PRICE, tags=("eu",))])\n')
    text = "tags " + uuid.uuid4().hex
    client = openai.OpenAI(base_url="http://unused/v1", api_key=TEST_KEY, max_retries=0)
    with ThreadedServer(create_app(write_config(
            tmp_path, mock_config(mock_url, middleware=layers, extra=extra)))) as server:
        client = client.with_options(base_url=server.url + "/v1")

        def ask_smart(tags: str | None) -> Any:
            return client.chat.completions.with_raw_response.create(
                model="smart", temperature=0, messages=[{"role": "user", "content": text}],
                extra_headers={"x-sluicegate-tags": tags} if tags else None)
        assert cache_status(ask_smart(None)) == "miss"
        wait_for(lambda: cache_status(ask_smart(None)) == "hit")
        pinned = ask_smart("eu")
        assert cache_status(pinned) == "miss"
        assert pinned.headers["x-sluicegate-deployment"] == "azure/gpt-4o-eu"
        wait_for(lambda: cache_status(ask_smart("eu,eu")) == "hit")  # (the tag set, as read)
        with pytest.raises(openai.BadRequestError) as refused:
            ask_smart("nowhere")
        assert refused.value.body["code"] == "no_deployment_with_tags"  # type: ignore[index]
    assert upstream_calls(mock, text) == 2


def test_the_tags_header_keyed_is_the_one_failover_reads() -> None:
    from middleware.cache.keys import TAGS_HEADER as KEYED
    from middleware.failover.routing import TAGS_HEADER
    assert KEYED == TAGS_HEADER


def test_calls_again_from_a_failover_layer_above_mark_the_answer_once(
        tmp_path: Path, mock_url: str, mock: MockProviderServer) -> None:
    # With the failover layer above the cache, a retry calls the cache again: each call's
    # `x-sluicegate-cache` went out (miss, miss), and a hit after a miss beside the miss.
    layers = ("[Middleware(AuthMiddleware, keys=[StaticKey('tests', key_env='SG_TEST_KEY')]), "
              "Middleware(FailoverMiddleware, retry=RetryPolicy(max_attempts=2, "
              "backoff_base_s=0), breaker=NEVER_OPENS), Middleware(CacheMiddleware)]")
    text = "marked once " + uuid.uuid4().hex
    with ThreadedServer(create_app(write_config(
            tmp_path, mock_config(mock_url, middleware=layers)))) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=TEST_KEY, max_retries=0)

        def ask_retried() -> Any:
            return client.chat.completions.with_raw_response.create(
                model="gpt-mock", temperature=0, messages=[{"role": "user", "content": text}])
        mock.push_fault(Fault("status", status=500))
        first = ask_retried()
        assert first.headers.get_list("x-sluicegate-cache") == ["miss"]
        assert upstream_calls(mock, text) == 2
        wait_for(lambda: ask_retried().headers.get_list("x-sluicegate-cache") == ["hit"])
