"""The gateway's Redis client against real deployments: TLS, Sentinel (with a failover) and a
three-node Redis Cluster (slot routing, MOVED, ASK), plus the URL forms that pick them."""
from __future__ import annotations

import asyncio
import ssl
import time
import uuid
from typing import Self

import pytest
import redis

from gateway.resp import RespClient, RespError, command_key, key_slot, parse_redis_url
from tests.redis_topologies import ClusterRedis, SentinelRedis, TlsRedis

# -- URLs -----------------------------------------------------------------------------------------


def test_url_forms() -> None:
    direct = parse_redis_url("redis://u:p%40ss@cache.internal:6380/2")
    assert (direct.mode, direct.addresses, direct.db) == ("direct", (("cache.internal", 6380),), 2)
    assert (direct.username, direct.password, direct.tls) == ("u", "p@ss", None)
    tls = parse_redis_url("rediss://:secret@h/0?ssl_cert_reqs=none")
    assert tls.tls is not None and tls.tls.verify_mode == ssl.CERT_NONE
    assert not tls.tls.check_hostname
    strict = parse_redis_url("rediss://h")
    assert strict.tls is not None and strict.tls.verify_mode == ssl.CERT_REQUIRED
    assert strict.tls.check_hostname and strict.addresses == (("h", 6379),)
    sentinel = parse_redis_url("redis+sentinel://:pw@s1:26379,s2,[::1]:26380/mymaster/3"
                               "?sentinel_password=sp")
    assert sentinel.mode == "sentinel" and sentinel.service == "mymaster" and sentinel.db == 3
    assert sentinel.addresses == (("s1", 26379), ("s2", 26379), ("::1", 26380))
    assert (sentinel.password, sentinel.sentinel_password) == ("pw", "sp")
    cluster = parse_redis_url("rediss+cluster://n1:7000,n2:7001?ssl_cert_reqs=optional")
    assert cluster.mode == "cluster" and cluster.tls is not None
    assert cluster.addresses == (("n1", 7000), ("n2", 7001))
    unix = parse_redis_url("unix:///run/redis.sock?db=4")
    assert (unix.mode, unix.unix_path, unix.db) == ("unix", "/run/redis.sock", 4)


@pytest.mark.parametrize(("url", "reason"), [
    ("memcached://h", "unsupported Redis URL scheme"),
    ("redis://a:1,b:2", "names one server"),
    ("redis+sentinel://s1:26379", "service name"),
    ("redis+cluster://n1:7000/1", "only database 0"),
    ("redis://h/x", "must be a number"),
    ("redis://h?ssl_ca_certs=/x", "need a rediss:// URL"),
    ("redis://h?timeout=3", "unknown Redis URL option"),
    ("rediss://h?ssl_cert_reqs=maybe", "ssl_cert_reqs"),
    ("redis://h:port", "bad port"),
    ("redis://h:99999/0", "not 1 to 65535"),  # (it started, degraded, for ever)
    ("redis://h:0", "not 1 to 65535"),
    ("redis+sentinel://s1:70000/mymaster", "not 1 to 65535"),
    ("rediss://h?ssl_ca_certs=/nonexistent/ca.pem", "TLS files cannot be used"),
])
def test_bad_urls_say_why(url: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_redis_url(url)


# Passwords as `openssl rand -base64` makes them hold "/" (and "?" and "#" happen), pasted
# unencoded: the host is after the last "@" (the port was the password's first part, and the
# error quoted it), and an "@" in a sentinel_password is still the query's.
@pytest.mark.parametrize("password", ["SECRETpw4Ax9/kQ2", "SECRETpw4Ax9?kQ2", "SECRETpw4Ax9#kQ2",
                                      "SE/CR?ET#pw@4Ax9"])
def test_a_password_with_an_unencoded_slash_query_or_hash_mark_connects(password: str) -> None:
    user = f"sg-test-{uuid.uuid4().hex[:8]}"
    admin = redis.Redis()
    admin.acl_setuser(user, enabled=True, passwords=[f"+{password}"], commands=["+ping"])
    try:
        endpoint = parse_redis_url(f"redis://{user}:{password}@127.0.0.1:6379/0")
        assert (endpoint.username, endpoint.password) == (user, password)
        assert (endpoint.addresses, endpoint.db) == ((("127.0.0.1", 6379),), 0)

        async def ping() -> object:
            client = RespClient(f"redis://{user}:{password}@127.0.0.1:6379/0")
            try:
                return await client.call("PING")
            finally:
                await client.close()
        assert asyncio.run(ping()) in ("PONG", b"PONG")
    finally:
        admin.acl_deluser(user)
    sentinel = parse_redis_url(f"redis+sentinel://:{password}@s1:26379/m/1"
                               "?sentinel_password=a@b/c")
    assert (sentinel.password, sentinel.sentinel_password) == (password, "a@b/c")
    assert sentinel.addresses == (("s1", 26379),) and sentinel.service == "m"


@pytest.mark.parametrize("url", ["redis://:SECRETpw4Ax9/kQ2", "redis://:SECRETpw4Ax9?kQ2",
                                 "redis://:1234/SECRETpw4Ax9/kQ2", "redis://h/SECRETpw4Ax9",
                                 "redis://h/0?SECRETpw4Ax9", ":SECRETpw4Ax9@h:6379"])
def test_errors_never_quote_what_may_be_a_password(url: str) -> None:
    # (a password's "/", "?" or "#" and no "@" after it: the URL cannot be read)
    with pytest.raises(ValueError) as caught:
        parse_redis_url(url)
    assert "SECRETpw4Ax9" not in str(caught.value)


def test_the_password_never_shows() -> None:
    client = RespClient("redis+sentinel://:hunter2@s1:26379/m?sentinel_password=swordfish")
    assert "hunter2" not in repr(client) and "swordfish" not in repr(client)
    assert "hunter2" not in repr(client.endpoint)


def test_command_keys() -> None:
    assert command_key(("EVALSHA", "abc", "2", "{t}:a", "{t}:b", "argv")) == "{t}:a"
    assert command_key(("EVAL", "return 1", "0")) is None
    assert command_key(("GET", "k")) == "k"
    assert command_key(("PING",)) is None and command_key((b"ping",)) is None


# -- TLS ------------------------------------------------------------------------------------------


async def test_tls(tls_redis: TlsRedis) -> None:
    client = RespClient(tls_redis.url)
    key = f"sgtest-tls-{uuid.uuid4().hex}"
    assert await client.call("SET", key, "over tls", "EX", "60") == "OK"
    assert await client.call("GET", key) == b"over tls"
    await client.close()


async def test_tls_refuses_an_unknown_certificate(tls_redis: TlsRedis) -> None:
    client = RespClient(f"rediss://127.0.0.1:{tls_redis.port}/0")  # system CAs only
    with pytest.raises(ssl.SSLError):  # an OSError: callers treat it as Redis unreachable
        await client.call("PING")
    await client.close()


async def test_plain_connection_to_a_tls_port_fails_cleanly(tls_redis: TlsRedis) -> None:
    client = RespClient(f"redis://127.0.0.1:{tls_redis.port}/0", timeout_s=1.0)
    with pytest.raises(OSError):
        await client.call("PING")
    await client.close()


# -- Sentinel -------------------------------------------------------------------------------------


async def test_sentinel_finds_the_primary(sentinel_redis: SentinelRedis) -> None:
    client = RespClient(sentinel_redis.url)
    key = f"sgtest-sentinel-{uuid.uuid4().hex}"
    assert await client.call("SET", key, "1") == "OK"
    assert client.primary == ("127.0.0.1", sentinel_redis.primary_port())
    await client.close()


async def test_sentinel_unknown_service(sentinel_redis: SentinelRedis) -> None:
    client = RespClient(f"redis+sentinel://127.0.0.1:{sentinel_redis.sentinel_port}/nosuch")
    with pytest.raises(ConnectionError, match="does not know 'nosuch'"):
        await client.call("PING")
    await client.close()


async def test_sentinel_announcement_moves_new_calls_at_once(
        sentinel_redis: SentinelRedis) -> None:
    """The client listens for +switch-master: after a failover its next call goes straight
    to the new primary, without first writing to (or being refused by) the old one."""
    client = RespClient(sentinel_redis.url, timeout_s=2.0)
    key = f"sgtest-switch-{uuid.uuid4().hex}"
    assert await client.call("INCR", key) == 1
    assert await client.call("WAIT", "1", "1500") == 1  # on the replica before the failover
    old = client._connection
    assert old is not None
    new_port = await asyncio.to_thread(sentinel_redis.fail_over)
    deadline = time.monotonic() + 10
    while client.switches_seen == 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert client.switches_seen >= 1
    assert client._connection is None  # retired: the next call asks the Sentinel
    assert await client.call("INCR", key) == 2
    assert client.primary == ("127.0.0.1", new_port)
    assert client._connection is not old
    await client.close()
    assert client._sentinel_watch is None


async def test_sentinel_follows_a_failover(sentinel_redis: SentinelRedis) -> None:
    """After the primary is demoted, the client's open connection reaches a replica: the
    next write there is refused (READONLY) and the client asks the Sentinel again, so the
    caller sees the write land on the new primary without an error."""
    client = RespClient(sentinel_redis.url, timeout_s=2.0)
    key = f"sgtest-failover-{uuid.uuid4().hex}"
    assert await client.call("INCR", key) == 1
    assert await client.call("WAIT", "1", "1500") == 1  # on the replica before the failover
    before = client.primary
    assert client._sentinel_watch is not None  # this test is about the client without it:
    client._sentinel_watch.cancel()  # a missed announcement (say, a Sentinel restarting)
    new_port = await asyncio.to_thread(sentinel_redis.fail_over)
    deadline = time.monotonic() + 20
    while True:  # the demoted server may drop connections while it resyncs
        try:
            value = await client.call("INCR", key)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)
    assert value == 2  # the replica had the first write; nothing was lost or doubled
    assert client.primary == ("127.0.0.1", new_port) != before
    assert client.switches_seen == 0  # READONLY sent it back to the Sentinel
    with redis.Redis(port=new_port) as direct:
        assert direct.get(key) == b"2"
    await client.close()


# -- Cluster --------------------------------------------------------------------------------------


def test_key_slot_matches_redis(cluster_redis: ClusterRedis) -> None:
    keys = ["", "foo", "123456789", "{user1000}.following", "{}x", "a{b}c", "{sgcache}:e:9f",
            "ключ", *(uuid.uuid4().hex for _ in range(30))]
    with cluster_redis.node(cluster_redis.ports[0]) as client:
        for key in keys:
            assert key_slot(key) == client.execute_command("CLUSTER KEYSLOT", key), key


async def test_cluster_routes_each_key_to_its_node(cluster_redis: ClusterRedis) -> None:
    client = RespClient(cluster_redis.url)  # one seed: the client learns the other nodes
    keys = [f"sgtest-{uuid.uuid4().hex}" for _ in range(30)]
    replies = await client.call_many([("SET", key, key) for key in keys])
    assert replies == ["OK"] * len(keys)
    owners = {cluster_redis.owner(key_slot(key)) for key in keys}
    assert len(owners) == 3  # thirty random keys land on every node
    for key in keys:
        with cluster_redis.node(cluster_redis.owner(key_slot(key))) as node:
            assert node.get(key) == key.encode()
    assert [await client.call("GET", key) for key in keys[:5]] == [k.encode() for k in keys[:5]]
    tag = "{sgtest-script}"  # a script's keys share a hash tag: one slot, one node
    assert await client.call("EVAL", "return redis.call('INCRBY', KEYS[1], ARGV[1]) + "
                             "redis.call('INCRBY', KEYS[2], ARGV[1])", "2", f"{tag}:a",
                             f"{tag}:b", "5") == 10
    assert await client.call("PING") == "PONG"
    await client.close()


async def test_cluster_follows_moved_and_ask(cluster_redis: ClusterRedis) -> None:
    """A slot moved after the client read the map answers MOVED (the client goes to the new
    owner and refreshes its map); a slot being migrated answers ASK for a key not on the
    source (the client sends ASKING and the command to the importing node)."""
    client = RespClient(cluster_redis.url)
    await client.call("PING")  # reads the slot map
    moved_key = _key_on(cluster_redis, cluster_redis.ports[0])
    slot = key_slot(moved_key)
    source, target = cluster_redis.ports[0], cluster_redis.ports[1]
    target_id = cluster_redis.node_id(target)
    for port in cluster_redis.ports:  # an empty slot can be reassigned outright
        with cluster_redis.node(port) as node:
            node.execute_command("CLUSTER SETSLOT", slot, "NODE", target_id)
    sent = client.commands_sent
    assert await client.call("SET", moved_key, "moved") == "OK"
    assert client.commands_sent >= sent + 2  # the refused try, then the new owner
    with cluster_redis.node(target) as node:
        assert node.get(moved_key) == b"moved"
    assert client._cluster is not None
    await client._cluster.refresh()
    assert client._cluster.slots[slot] == ("127.0.0.1", target)

    asked_key = _key_on(cluster_redis, source)
    slot = key_slot(asked_key)
    with cluster_redis.node(target) as node:
        node.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", cluster_redis.node_id(source))
    with cluster_redis.node(source) as node:
        node.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", target_id)
    try:
        assert await client.call("SET", asked_key, "asked") == "OK"
        with cluster_redis.node(target) as node:  # answered by the importing node
            assert node.execute_command("CLUSTER COUNTKEYSINSLOT", slot) == 1
        with cluster_redis.node(source) as node:
            assert node.execute_command("CLUSTER COUNTKEYSINSLOT", slot) == 0
    finally:
        with cluster_redis.node(target) as node:
            node.execute_command("ASKING")
            node.execute_command("DEL", asked_key)
        source_id = cluster_redis.node_id(source)
        for port in cluster_redis.ports:  # the slot back to its source, migration over
            with cluster_redis.node(port) as node:
                node.execute_command("CLUSTER SETSLOT", slot, "NODE", source_id)
    await client.close()


async def test_cluster_error_replies_pass_through(cluster_redis: ClusterRedis) -> None:
    client = RespClient(cluster_redis.url)
    with pytest.raises(RespError, match="CROSSSLOT"):
        await client.call("MGET", "sgtest-a", "sgtest-b-not-same-slot-xyz")
    await client.close()


def _key_on(cluster: ClusterRedis, port: int) -> str:
    """A fresh key (in an empty slot) that the node on `port` owns."""
    while True:
        key = f"sgtest-{uuid.uuid4().hex}"
        if cluster.owner(key_slot(key)) == port:
            with cluster.node(port) as node:
                if node.execute_command("CLUSTER COUNTKEYSINSLOT", key_slot(key)) == 0:
                    return key


def test_cluster_stores_need_a_hash_tag_prefix() -> None:
    from middleware.cache.stores import RedisCacheStore
    from middleware.quota.store_redis import RedisQuotaStore
    url = "redis+cluster://127.0.0.1:7000"
    with pytest.raises(ValueError, match="must be a hash tag"):
        RedisQuotaStore(url, prefix="sluicegate")
    with pytest.raises(ValueError, match="must be a hash tag"):
        RedisCacheStore(url, prefix="sgcache")
    RedisQuotaStore(url, prefix="{sluicegate}")  # the defaults are tags
    RedisCacheStore(url)
    RedisQuotaStore("redis://127.0.0.1:6379/0", prefix="plain")  # one server: any prefix


# -- timeouts (one watchdog per connection) -------------------------------------------------------


class _ScriptedRedis:
    """A RESP server on 127.0.0.1 that answers +OK to each command after `delay_s`, and
    stops answering after `answers` commands (None: never stops)."""

    def __init__(self, delay_s: float = 0.0, answers: int | None = None) -> None:
        self.delay_s, self.answers, self.port = delay_s, answers, 0
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> Self:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        answered = 0
        try:
            while True:
                header = await reader.readline()  # *N
                if not header:
                    break
                for _ in range(int(header[1:]) * 2):  # $len, then the argument
                    await reader.readline()
                if self.answers is not None and answered >= self.answers:
                    continue
                answered += 1
                await asyncio.sleep(self.delay_s)
                writer.write(b"+OK\r\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        writer.close()


async def test_a_slow_answer_within_the_timeout_arrives() -> None:
    """The watchdog first wakes at the first call's deadline, finds a later call still in
    time, and sleeps on until that one's deadline: the later call is not cut short."""
    # (Seconds, not tenths: a loop that stalls for a tenth on a loaded host must not turn
    # an answer in time into a late one. The timeout stays under twice the delay, so the
    # second call is still pending when the watchdog first wakes.)
    async with _ScriptedRedis(delay_s=1.0) as server:
        client = RespClient(f"redis://127.0.0.1:{server.port}/0", timeout_s=1.6)
        assert await client.call("PING") == "OK"  # deadline t+1.6; answered at t+1.0
        assert await client.call("PING") == "OK"  # sent at t+1.0, answered at t+2.0
        await client.close()


async def test_a_silent_server_times_out_and_the_next_call_reconnects() -> None:
    async with _ScriptedRedis(answers=2) as server:
        client = RespClient(f"redis://127.0.0.1:{server.port}/0", timeout_s=0.3)
        assert await client.call_many([("PING",), ("PING",)]) == ["OK", "OK"]
        results = await asyncio.gather(client.call("PING"), client.call("PING"),
                                       return_exceptions=True)
        assert all(isinstance(result, TimeoutError) for result in results)
        assert await client.call("PING") == "OK"  # a new connection, answered again
        await client.close()


async def test_an_abandoned_call_still_closes_a_stuck_connection() -> None:
    """A caller that gave up (cancelled) leaves its reply owed; if it never comes, the
    connection is stuck and is closed, so the next call does not queue behind it."""
    async with _ScriptedRedis(answers=1) as server:
        client = RespClient(f"redis://127.0.0.1:{server.port}/0", timeout_s=0.3)
        assert await client.call("PING") == "OK"
        connection = client._connection
        assert connection is not None
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(client.call("PING"), 0.05)
        deadline = time.monotonic() + 5
        while not connection.closed and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert connection.closed
        await client.close()


def test_layers_take_every_redis_url_form_as_a_store_string() -> None:
    from gateway.config import ConfigError
    from middleware.cache import CacheMiddleware
    from middleware.cache.stores import RedisCacheStore
    from middleware.quota import QuotaMiddleware, RedisQuotaStore

    async def app(scope: object, receive: object, send: object) -> None:
        raise AssertionError("not called")

    for url in ("redis+sentinel://127.0.0.1:26379/mymaster/0", "rediss+cluster://n1:7000",
                "rediss://127.0.0.1:6380/0?ssl_cert_reqs=none"):
        assert isinstance(QuotaMiddleware(app, store=url).store, RedisQuotaStore)
        assert isinstance(CacheMiddleware(app, store=url).store, RedisCacheStore)
    with pytest.raises(ConfigError) as refused:
        QuotaMiddleware(app, store="memcached://:hunter2@cache:11211")
    assert "hunter2" not in str(refused.value) and "'memcached'" in str(refused.value)
    with pytest.raises(ConfigError) as refused:
        CacheMiddleware(app, store="memcached://:hunter2@cache:11211")
    assert "hunter2" not in str(refused.value)


async def test_cluster_readiness_asks_every_node(cluster_redis: ClusterRedis) -> None:
    """A PING to one node proves little on a Cluster: readiness maps the slots again, asks
    every node that serves some, and wants cluster_state:ok from each."""
    from middleware.quota.store_redis import RedisQuotaStore
    store = RedisQuotaStore(cluster_redis.url)
    await store.startup()
    try:
        assert await store.ping() is True
        assert store._client is not None and store._client._cluster is not None
        assert {port for _, port in store._client._cluster.nodes} == set(cluster_redis.ports)
    finally:
        await store.shutdown()
    client = RespClient(f"redis+cluster://127.0.0.1:9,127.0.0.1:{cluster_redis.ports[0]}",
                        timeout_s=1.0)
    await client.ping()  # a dead seed is skipped while a live one answers
    await client.close()
