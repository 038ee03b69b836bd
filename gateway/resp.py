"""A lean, pipelined Redis (RESP2) client for the hot paths (quota admission, cache lookups).

Admission runs one Lua script per request, so the client's own cost is part of every
request. redis-py spends more on a call than the rest of auth and quota together (argument
encoding in Python, a pool checkout, a timeout context and several reads per reply), so the
quota store speaks RESP itself: one connection, requests written as they come, replies
matched to callers in order (Redis answers a connection's commands in order), one watchdog
timer per connection (not one per call). A call that times out closes the connection,
failing what was in flight with it, since a late reply could no longer be matched; the next
call reconnects.

Where Redis lives is the URL's business (`parse_redis_url`): one server (`redis://`, TLS with
`rediss://`, or a `unix://` socket), a primary found through Sentinel (`redis+sentinel://`:
asked on every connect, checked with ROLE, and looked up again when the old primary answers
READONLY), or a Redis Cluster (`redis+cluster://`: commands go to the node that owns their
key's slot, MOVED and ASK redirections are followed and the slot map is refreshed).
"""
from __future__ import annotations

import asyncio
import re
import ssl
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote

__all__ = ["RedisEndpoint", "RespClient", "RespError", "has_hash_tag", "is_redis_url",
           "key_slot", "parse_redis_url", "require_hash_tag", "split_userinfo"]


class RespError(Exception):
    """An error reply from Redis (e.g. NOSCRIPT, WRONGTYPE)."""


class _Incomplete:
    """The buffer ends inside a reply: `needed`, how long the buffer must be for it to end
    there (a bulk string's, known from its header), or 0 when that is not known yet."""

    __slots__ = ("needed",)

    def __init__(self, needed: int = 0) -> None:
        self.needed = needed


_INCOMPLETE = _Incomplete()


def encode_command(args: Sequence[str | bytes]) -> bytes:
    texts = [arg for arg in args if isinstance(arg, str)]
    if len(texts) == len(args):  # the usual case: one encode at the end
        text = "".join([f"${len(arg) if arg.isascii() else len(arg.encode())}\r\n{arg}\r\n"
                        for arg in texts])
        return f"*{len(args)}\r\n{text}".encode()
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg.encode() if isinstance(arg, str) else arg
        parts.append(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(parts)


def parse_reply(buffer: bytes, pos: int) -> tuple[Any, int] | _Incomplete:
    """One reply from `pos`: (value, position after it), or an _Incomplete."""
    end = buffer.find(b"\r\n", pos)
    if end < 0:
        return _INCOMPLETE
    kind, after = buffer[pos], end + 2
    if kind == 0x24:  # '$' bulk string (the scripts' replies, GET)
        size = _number(buffer, pos + 1, end)
        if size < 0:
            return None, after
        stop = after + size
        if len(buffer) < stop + 2:
            return _Incomplete(stop + 2)
        return buffer[after:stop], stop + 2
    if kind == 0x3A:  # ':' integer
        return _number(buffer, pos + 1, end), after
    if kind == 0x2A:  # '*' array
        count = _number(buffer, pos + 1, end)
        if count < 0:
            return None, after
        items = []
        for _ in range(count):
            parsed = parse_reply(buffer, after)
            if isinstance(parsed, _Incomplete):
                return _INCOMPLETE
            item, after = parsed
            items.append(item)
        return items, after
    if kind == 0x2B:  # '+' simple string
        return buffer[pos + 1:end].decode(), after
    if kind == 0x2D:  # '-' error
        return RespError(buffer[pos + 1:end].decode(errors="replace")), after
    raise ConnectionError(f"Redis sent an unknown reply type {chr(kind)!r}")


def _number(buffer: bytes, start: int, end: int) -> int:
    """The decimal integer `buffer[start:end]` (a RESP length or integer), read in place:
    compiled, a loop over the digits costs less than `int()` of a slice."""
    negative = start < end and buffer[start] == 0x2D  # '-'
    first = start + 1 if negative else start
    if first >= end or end - first > 20:
        raise ValueError(f"not a RESP integer: {buffer[start:end]!r}")
    value = 0
    for index in range(first, end):
        digit = buffer[index] - 0x30
        if digit < 0 or digit > 9:
            raise ValueError(f"not a RESP integer: {buffer[start:end]!r}")
        value = value * 10 + digit
    return -value if negative else value


class _Unawaited:
    """A waiter slot for a reply nobody awaits: an error reply, or the connection failing
    before the reply came, goes to `on_error(error, context)`; a good reply is dropped.
    Cheaper than a future with a done-callback (no future, no callback through the loop)."""

    __slots__ = ("context", "on_error")

    def __init__(self, on_error: Callable[[Exception, Any], None], context: Any) -> None:
        self.on_error = on_error
        self.context = context


class _Connection(asyncio.Protocol):
    """Commands issued in one event-loop step go out in one write (one system call), and
    replies that arrive together are handed out in one `data_received`.

    Timeouts: Redis answers a connection's commands in order, so the oldest unanswered
    command is always the first to be late. One watchdog timer per connection looks at it
    (and sleeps until its deadline) instead of a timer per command; a late reply closes the
    connection, failing what was in flight with it."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.waiters: deque[asyncio.Future[Any] | _Unawaited] = deque()
        self.deadlines: deque[float] = deque()  # the waiters' deadlines, same order
        self.buffer = bytearray()  # what is left of a reply not yet whole (see data_received)
        self.needed = 0  # how long `buffer` must grow before it is parsed again (0: any)
        self.outgoing: list[bytes] = []
        self.closed = False
        self.loop = asyncio.get_running_loop()
        self._watchdog: asyncio.TimerHandle | None = None
        self.on_push: Callable[[Any], None] | None = None  # a subscriber's messages
        self.on_lost: asyncio.Future[None] | None = None  # a subscriber's end

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def request(self, payload: bytes, timeout_s: float) -> asyncio.Future[Any]:
        loop = self.loop
        future: asyncio.Future[Any] = loop.create_future()
        deadline = loop.time() + timeout_s
        self.waiters.append(future)
        self.deadlines.append(deadline)
        if self._watchdog is None and not self.closed:
            self._watchdog = loop.call_at(deadline, self._watch)
        if not self.outgoing:
            loop.call_soon(self._flush)
        self.outgoing.append(payload)
        return future

    def send_unawaited(self, payload: bytes, waiters: list[_Unawaited],
                       timeout_s: float) -> None:
        """Queues `payload` (one command per waiter) whose replies nobody awaits. They are
        timed like any other: a late one closes the connection (and reports to its waiter)."""
        loop = self.loop
        deadline = loop.time() + timeout_s
        self.waiters.extend(waiters)
        self.deadlines.extend([deadline] * len(waiters))
        if self._watchdog is None and not self.closed:
            self._watchdog = loop.call_at(deadline, self._watch)
        if not self.outgoing:
            loop.call_soon(self._flush)
        self.outgoing.append(payload)

    def _watch(self) -> None:
        self._watchdog = None
        if self.closed or not self.deadlines:
            return
        oldest = self.deadlines[0]
        if oldest <= self.loop.time():
            self.abort(TimeoutError("Redis did not answer in time"))
        else:
            self._watchdog = self.loop.call_at(oldest, self._watch)

    def _flush(self) -> None:
        outgoing, self.outgoing = self.outgoing, []
        if self.transport is not None and not self.closed:
            self.transport.write(outgoing[0] if len(outgoing) == 1 else b"".join(outgoing))

    def data_received(self, data: bytes) -> None:
        # Parsed from bytes: the data itself when nothing was left over (nearly always), else
        # the leftover with it. A reply known to need more bytes than have come is not parsed
        # again until they have (a large bulk string arriving in many reads is copied once).
        pending = self.buffer
        if pending:
            pending += data
            if len(pending) < self.needed:
                return
            buffer = bytes(pending)
        else:
            buffer = data
        pos = 0
        waiters, deadlines = self.waiters, self.deadlines
        incomplete: _Incomplete | None = None
        try:
            while waiters:
                parsed = parse_reply(buffer, pos)
                if isinstance(parsed, _Incomplete):
                    incomplete = parsed
                    break
                value, pos = parsed
                future = waiters.popleft()
                deadlines.popleft()
                if isinstance(future, _Unawaited):
                    if isinstance(value, RespError):
                        future.on_error(value, future.context)
                    continue
                if future.done():  # its caller went away (cancelled)
                    continue
                if isinstance(value, RespError):
                    future.set_exception(value)
                else:
                    future.set_result(value)
            while self.on_push is not None and not waiters:  # pub/sub messages
                parsed = parse_reply(buffer, pos)
                if isinstance(parsed, _Incomplete):
                    incomplete = parsed
                    break
                value, pos = parsed
                self.on_push(value)
        except (ValueError, ConnectionError) as exc:
            self.abort(ConnectionError(f"unreadable reply from Redis: {exc}"))
            return
        if pos == len(buffer):
            if pending:
                pending.clear()
            self.needed = 0
            return
        if pending:
            del pending[:pos]
        else:
            self.buffer = bytearray(buffer[pos:])
        self.needed = incomplete.needed - pos if incomplete is not None and incomplete.needed \
            else 0

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionError("the connection to Redis was lost"))
        if self.on_lost is not None and not self.on_lost.done():
            self.on_lost.set_result(None)

    def abort(self, error: Exception) -> None:
        self._fail(error)
        if self.transport is not None:
            self.transport.abort()

    def _fail(self, error: Exception) -> None:
        self.closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        self.deadlines.clear()
        while self.waiters:
            future = self.waiters.popleft()
            if isinstance(future, _Unawaited):
                future.on_error(error, future.context)
            elif not future.done():
                future.set_exception(error)


# -- where Redis is ------------------------------------------------------------------------------

_SCHEMES = {"redis": ("direct", False), "rediss": ("direct", True), "unix": ("unix", False),
            "redis+sentinel": ("sentinel", False), "rediss+sentinel": ("sentinel", True),
            "redis+cluster": ("cluster", False), "rediss+cluster": ("cluster", True)}
_DEFAULT_PORTS = {"direct": 6379, "unix": 0, "sentinel": 26379, "cluster": 6379}
_TLS_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs",
                "ssl_check_hostname")
_OPTIONS = (*_TLS_OPTIONS, "db", "sentinel_username", "sentinel_password")
_QUERY_START = re.compile(rf"\?(?:{'|'.join(_OPTIONS)})=")
_OPTION_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


@dataclass(frozen=True, slots=True)
class RedisEndpoint:
    """A parsed Redis URL. `mode`: direct, unix, sentinel or cluster; `addresses`: the server
    (direct), the Sentinels (sentinel) or the seed nodes (cluster)."""

    mode: str
    addresses: tuple[tuple[str, int], ...]
    unix_path: str | None = None
    service: str | None = None  # the Sentinel's name for the primary
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = None
    tls: ssl.SSLContext | None = None

    def __repr__(self) -> str:  # never the passwords
        where = self.unix_path or ",".join(f"{host}:{port}" for host, port in self.addresses)
        service = f", service={self.service!r}" if self.service else ""
        return f"RedisEndpoint({self.mode} {where}{service}, db={self.db}, tls={bool(self.tls)})"


def is_redis_url(text: str) -> bool:
    """True when `text` starts with a scheme `parse_redis_url` takes."""
    scheme, sep, _ = text.partition("://")
    return bool(sep) and scheme.lower() in _SCHEMES


def parse_redis_url(url: str) -> RedisEndpoint:
    """Parses the URLs the gateway accepts (raises ValueError with the reason):

    - `redis://[[user]:password@]host[:port][/db]`, `rediss://...` for TLS;
    - `unix:///path/to/redis.sock[?db=N]`;
    - `redis+sentinel://[[user]:password@]host:port[,host:port...]/service[/db]` (the
      password is the primary's; `sentinel_password=` in the query is the Sentinels');
    - `redis+cluster://[[user]:password@]host:port[,host:port...]` (seed nodes; db 0 only).

    TLS options in the query, as redis-py names them: `ssl_ca_certs`, `ssl_certfile`,
    `ssl_keyfile`, `ssl_cert_reqs` (required, optional, none), `ssl_check_hostname`.
    A password may hold an unencoded "/", "?" or "#" (`split_userinfo`). No error quotes
    the URL's text (a password's part may be anywhere in a URL that cannot be read).
    """
    scheme, sep, rest = url.partition("://")
    if not sep:  # (the text is not quoted: it may be a password, or hold one)
        raise ValueError("the Redis URL has no scheme (redis://, rediss://, unix://, "
                         "redis+sentinel://, redis+cluster://, or rediss+...)")
    if scheme.lower() not in _SCHEMES:
        raise ValueError(f"unsupported Redis URL scheme {scheme!r} (redis://, rediss://, "
                         "unix://, redis+sentinel://, redis+cluster://, or rediss+...)")
    mode, tls = _SCHEMES[scheme.lower()]
    userinfo, at, rest = split_userinfo(rest)
    rest = rest.partition("#")[0]
    rest, _, query = rest.partition("?")
    options = dict(parse_qsl(query, keep_blank_values=True))
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        # (named only as name=value: what else is there may be a password's end)
        given = {pair.partition("=")[0] for pair in query.split("&") if "=" in pair}
        shown = [name for name in unknown if name in given and _OPTION_NAME.fullmatch(name)]
        raise ValueError(f"unknown Redis URL option(s) {', '.join(shown) or '(not shown)'} "
                         f"(known: {', '.join(_OPTIONS)})")
    hosts, slash, path = rest.partition("/")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None  # user-only is rare but valid
    if mode == "unix":
        _check_no_tls(options)
        return RedisEndpoint("unix", (), unix_path="/" + path, db=_db(options.get("db", "0")),
                             username=username, password=password)
    addresses = tuple(_address(item, _DEFAULT_PORTS[mode]) for item in hosts.split(",") if item)
    if not addresses:
        addresses = (("127.0.0.1", _DEFAULT_PORTS[mode]),)
    if mode == "direct" and len(addresses) > 1:
        raise ValueError("a redis:// URL names one server; for several use redis+sentinel:// "
                         "or redis+cluster://")
    segments = [unquote(part) for part in path.split("/") if part] if slash else []
    service = None
    if mode == "sentinel":
        if not segments:
            raise ValueError("a redis+sentinel:// URL needs the primary's service name: "
                             "redis+sentinel://host:26379/mymaster[/db]")
        service, segments = segments[0], segments[1:]
    if len(segments) > 1:
        raise ValueError("unexpected path in the Redis URL: it names a database (/0), and "
                         "for Sentinel the service before it (/mymaster/0)")
    db = _db(segments[0] if segments else options.get("db", "0"))
    if mode == "cluster" and db:
        raise ValueError("Redis Cluster has only database 0")
    if not tls:
        _check_no_tls(options)
    return RedisEndpoint(mode, addresses, service=service, db=db, username=username,
                         password=password,
                         sentinel_username=options.get("sentinel_username") or None,
                         sentinel_password=options.get("sentinel_password") or None,
                         tls=_tls_context(options) if tls else None)


def split_userinfo(rest: str) -> tuple[str, str, str]:
    """(userinfo, "@" or "", the rest) of a Redis URL after its scheme. RFC 3986 wants a "/",
    "?" or "#" in a password percent-encoded, and redis-py (urllib) ends the host at the
    first of them; but passwords made by `openssl rand -base64` hold "/", and pasted as they
    are their first part became the port. So when the host part so split has no "@", the
    userinfo ends at the last "@" before the query (a "?" that starts a known option: an "@"
    may be in an option's value, a sentinel_password's)."""
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    if "@" not in authority:
        query = _QUERY_START.search(rest)
        authority = rest[:query.start() if query else len(rest)]
    userinfo, at, _ = authority.rpartition("@")
    return (userinfo, at, rest[len(userinfo) + 1:]) if at else ("", "", rest)


def _db(text: str) -> int:
    if not text.isdigit():  # (not quoted: a password with an unencoded "/" may be there)
        raise ValueError("the Redis database must be a number")
    return int(text)


def _address(text: str, default_port: int) -> tuple[str, int]:
    if text.startswith("["):  # [v6]:port
        host, _, port = text[1:].partition("]")
        port = port.removeprefix(":")
    else:
        host, _, port = text.rpartition(":") if ":" in text else (text, "", "")
    if port and not (port.isascii() and port.isdigit()):  # (not quoted: maybe a password's)
        raise ValueError("bad port in Redis address (not a number)")
    if port and not 0 < int(port) < 65536:
        raise ValueError("bad port in Redis address (not 1 to 65535)")
    return unquote(host) or "127.0.0.1", int(port) if port else default_port


def _check_no_tls(options: dict[str, str]) -> None:
    given = [name for name in _TLS_OPTIONS if name in options]
    if given:
        raise ValueError(f"TLS options ({', '.join(given)}) need a rediss:// URL")


def _tls_context(options: dict[str, str]) -> ssl.SSLContext:
    try:
        return _load_tls(options)
    except (OSError, ssl.SSLError) as exc:  # read at config load: a config error
        raise ValueError(f"the Redis URL's TLS files cannot be used: {exc}") from None


def _load_tls(options: dict[str, str]) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=options.get("ssl_ca_certs") or None)
    reqs = options.get("ssl_cert_reqs", "required").lower()
    if reqs not in ("required", "optional", "none"):
        raise ValueError(f"ssl_cert_reqs must be required, optional or none, not {reqs!r}")
    check = options.get("ssl_check_hostname", "true" if reqs == "required" else "false")
    context.check_hostname = check.lower() in ("1", "true", "yes")
    context.verify_mode = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL,
                           "none": ssl.CERT_NONE}[reqs]
    if options.get("ssl_certfile"):
        context.load_cert_chain(options["ssl_certfile"], options.get("ssl_keyfile") or None)
    return context


def _crc16_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
        table.append(crc & 0xFFFF)
    return table


_CRC16 = _crc16_table()


def key_slot(key: str | bytes) -> int:
    """The Redis Cluster slot of a key: CRC16 (XMODEM) of its hash tag (the part between the
    first `{` and the next `}`, when not empty) or of the whole key, modulo 16384."""
    data = key.encode() if isinstance(key, str) else key
    start = data.find(b"{")
    if start >= 0:
        end = data.find(b"}", start + 1)
        if end > start + 1:
            data = data[start + 1:end]
    crc = 0
    for byte in data:
        crc = ((crc << 8) & 0xFF00) ^ _CRC16[((crc >> 8) ^ byte) & 0xFF]
    return crc % 16384


def has_hash_tag(prefix: str) -> bool:
    """True when keys starting with `prefix` all hash to one Cluster slot (a `{tag}`)."""
    start = prefix.find("{")
    return start >= 0 and prefix.find("}", start + 1) > start + 1


def require_hash_tag(endpoint: RedisEndpoint, prefix: str, what: str) -> None:
    """A Cluster needs the keys one script touches in one slot: refuses a prefix without a
    hash tag there (ValueError, a config error)."""
    if endpoint.mode == "cluster" and not has_hash_tag(prefix):
        raise ValueError(f"{what}: on a Redis Cluster the key prefix must be a hash tag such as "
                         f"'{{{prefix or 'sluicegate'}}}', not {prefix!r} (the keys one script "
                         "touches must share a slot)")


_KEYLESS = frozenset({"PING", "SCRIPT", "INFO", "ECHO", "TIME", "DBSIZE", "ROLE", "CLUSTER"})


def command_key(args: Sequence[str | bytes]) -> str | bytes | None:
    """The key a command's slot is decided by (its first key), or None for keyless ones."""
    name = args[0].upper() if isinstance(args[0], str) else args[0].decode().upper()
    if name in ("EVAL", "EVALSHA"):
        return args[3] if len(args) > 3 and int(args[2]) > 0 else None
    if name in _KEYLESS or len(args) < 2:
        return None
    return args[1]


# -- the client ----------------------------------------------------------------------------------

class RespClient:
    """`await client.call("EVALSHA", sha, "1", key, ...)`; raises RespError for error
    replies, and OSError (ConnectionError, TimeoutError) when Redis cannot be reached."""

    def __init__(self, url: str, *, timeout_s: float = 0.5) -> None:
        self.endpoint = parse_redis_url(url)
        self.timeout_s = timeout_s
        self.commands_sent = 0  # for tests that count round trips
        self._connection: _Connection | None = None
        self._connecting: asyncio.Lock | None = None
        self._cluster = _Cluster(self) if self.endpoint.mode == "cluster" else None
        self._sentinel = self.endpoint.mode == "sentinel"
        self.primary: tuple[str, int] | None = None  # Sentinel: the primary last found
        self.switches_seen = 0  # Sentinel: +switch-master announcements acted on
        self._sentinel_watch: asyncio.Task[None] | None = None

    def __repr__(self) -> str:  # never the password
        return f"RespClient({self.endpoint!r})"

    @property
    def routed(self) -> bool:
        """True on a Cluster: commands go by key, so `call_encoded` cannot take them."""
        return self._cluster is not None

    async def call(self, *args: str | bytes) -> Any:
        if self._cluster is not None:
            return await self._cluster.call(args)
        return await self.call_encoded(encode_command(args))

    async def call_encoded(self, payload: bytes) -> Any:
        """`call` for one command already encoded (`encode_command`, or bytes a caller keeps
        ready); not on a Cluster (`routed`)."""
        if self._cluster is not None:
            raise ValueError("a Redis Cluster routes commands by key: use call()")
        connection = self._connection
        if connection is None or connection.closed:
            connection = await self._connect()
        self.commands_sent += 1
        try:  # (the request inline, not through _send: one coroutine less per call)
            return await connection.request(payload, self.timeout_s)
        except RespError as exc:
            if not (self._sentinel and str(exc).startswith("READONLY")):
                raise
        # The primary failed over and this one is a replica now: ask the Sentinels again.
        # Nothing was written (a replica refuses the first write), so the retry is safe.
        connection.abort(ConnectionError("the Redis primary moved"))
        return await self._send(await self._connect(), payload)

    async def call_many(self, commands: Sequence[Sequence[str | bytes]]) -> list[Any]:
        """Sends every command in one write and waits for all replies; an error reply is
        returned in place (as a RespError), a lost connection raises."""
        if self._cluster is not None:
            return await asyncio.gather(*(self._cluster.call(command) for command in commands),
                                        return_exceptions=True)
        connection = self._connection
        if connection is None or connection.closed:
            connection = await self._connect()
        timeout_s = self.timeout_s
        futures = [connection.request(encode_command(command), timeout_s)
                   for command in commands]
        self.commands_sent += len(futures)
        replies = await asyncio.gather(*futures, return_exceptions=True)
        if self._sentinel and any(isinstance(reply, RespError)
                                  and str(reply).startswith("READONLY") for reply in replies):
            connection.abort(ConnectionError("the Redis primary moved"))  # next call: Sentinel
        return replies

    def send_unawaited(self, payloads: Sequence[bytes], on_error: Callable[[Exception, Any],
                                                                           None],
                       contexts: Sequence[Any]) -> bool:
        """Queues already-encoded commands on the open connection; nobody awaits their
        replies. An error reply (or losing the connection first) calls
        `on_error(error, context)` with the command's context. False, sending nothing, when
        no connection is open or commands need routing (a Cluster): use `call_many` then.
        Not for a Sentinel deployment's writes either (a READONLY reply must move the
        client): False there too."""
        connection = self._connection
        if connection is None or connection.closed or self._cluster is not None \
                or self._sentinel:
            return False
        connection.send_unawaited(
            payloads[0] if len(payloads) == 1 else b"".join(payloads),
            [_Unawaited(on_error, context) for context in contexts], self.timeout_s)
        self.commands_sent += len(payloads)
        return True

    async def _send(self, connection: _Connection, payload: bytes) -> Any:
        self.commands_sent += 1
        return await connection.request(payload, self.timeout_s)

    async def _connect(self) -> _Connection:
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:  # concurrent callers share one new connection
            if self._connection is not None and not self._connection.closed:
                return self._connection
            endpoint = self.endpoint
            if self._sentinel:
                connection = await self._connect_primary()
            else:  # one server, over TCP or a unix socket
                connection = await self._open(endpoint.addresses[0] if endpoint.addresses
                                              else None, endpoint.unix_path)
                await self._handshake(connection, endpoint.username, endpoint.password,
                                      endpoint.db)
            self._connection = connection
            return connection

    async def _open(self, address: tuple[str, int] | None,
                    unix_path: str | None = None) -> _Connection:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self.timeout_s):
            if unix_path is not None:
                _, connection = await loop.create_unix_connection(_Connection, unix_path)
                return connection
            assert address is not None
            host, port = address
            tls = self.endpoint.tls
            _, connection = await loop.create_connection(
                _Connection, host, port, ssl=tls, server_hostname=host if tls else None)
            return connection

    async def _handshake(self, connection: _Connection, username: str | None,
                         password: str | None, db: int) -> None:
        try:
            if password is not None:
                auth = ("AUTH", username, password) if username else ("AUTH", password)
                await self._send(connection, encode_command(auth))
            if db:
                await self._send(connection, encode_command(("SELECT", str(db))))
        except BaseException:
            _close(connection)
            raise

    async def _connect_primary(self) -> _Connection:
        """Asks each Sentinel in turn where the primary is, connects, and checks with ROLE
        that it is one (a Sentinel can be behind a failover for a moment)."""
        endpoint = self.endpoint
        reasons = []
        for sentinel in endpoint.addresses:
            try:
                probe = await self._open(sentinel)
                try:
                    await self._handshake(probe, endpoint.sentinel_username,
                                          endpoint.sentinel_password, 0)
                    reply = await self._send(probe, encode_command(
                        ("SENTINEL", "get-master-addr-by-name", endpoint.service or "")))
                finally:
                    _close(probe)
            except (OSError, RespError) as exc:
                reasons.append(f"{sentinel[0]}:{sentinel[1]}: {type(exc).__name__}")
                continue
            if not reply:
                reasons.append(f"{sentinel[0]}:{sentinel[1]}: does not know "
                               f"{endpoint.service!r}")
                continue
            primary = (reply[0].decode(), int(reply[1]))
            try:
                connection = await self._open(primary)
                await self._handshake(connection, endpoint.username, endpoint.password,
                                      endpoint.db)
                role = await self._send(connection, encode_command(("ROLE",)))
            except (OSError, RespError) as exc:
                reasons.append(f"primary {primary[0]}:{primary[1]}: {type(exc).__name__}")
                continue
            if not role or role[0] != b"master":
                _close(connection)
                reasons.append(f"{primary[0]}:{primary[1]} is not a primary (yet)")
                continue
            self.primary = primary
            if self._sentinel_watch is None or self._sentinel_watch.done():
                self._sentinel_watch = asyncio.create_task(
                    self._watch_sentinels(), name="sluicegate-redis-sentinel-watch")
            return connection
        raise ConnectionError(f"no Redis primary for {endpoint.service!r} through Sentinel "
                              f"({'; '.join(reasons)})")

    async def drain(self) -> None:
        """Waits until every command already sent on the open connection is answered (a
        PING queued behind them: Redis answers in order). Nothing to do with none open."""
        connection = self._connection
        if connection is not None and not connection.closed and connection.waiters:
            await self._send(connection, encode_command(("PING",)))

    async def ping(self) -> None:
        """Raises unless Redis answers; on a Cluster, unless every node serving slots answers
        and the cluster says its state is ok (a PING to one node proves little there)."""
        if self._cluster is None:
            await self.call("PING")
            return
        await self._cluster.check()

    async def _watch_sentinels(self) -> None:
        """Listens for the Sentinels' `+switch-master` announcement: when the primary moves,
        new calls go to the new one at once (the old connection is retired once its
        in-flight replies are in) instead of writing to the old primary until it is demoted.
        Runs while the client is open; moves to the next Sentinel when one goes away."""
        endpoint = self.endpoint
        while True:
            for sentinel in endpoint.addresses:
                try:
                    subscriber = await self._open(sentinel)
                except OSError:
                    continue
                try:
                    await self._handshake(subscriber, endpoint.sentinel_username,
                                          endpoint.sentinel_password, 0)
                    lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                    subscriber.on_push = self._on_sentinel_message
                    subscriber.on_lost = lost
                    await self._send(subscriber, encode_command(("SUBSCRIBE",
                                                                 "+switch-master")))
                    await lost  # until the Sentinel goes away
                except (OSError, RespError):
                    pass
                finally:
                    _close(subscriber)
            await asyncio.sleep(1.0)

    def _on_sentinel_message(self, message: Any) -> None:
        # ["message", "+switch-master", "<name> <old ip> <old port> <new ip> <new port>"]
        if not (isinstance(message, list) and len(message) == 3 and message[0] == b"message"):
            return
        name, _, _, host, port = (message[2].decode(errors="replace").split() + [""] * 5)[:5]
        if name != self.endpoint.service or not port.isdigit():
            return
        self.switches_seen += 1
        if self.primary == (host, int(port)):
            return
        connection, self._connection = self._connection, None
        if connection is not None:  # in-flight replies still arrive; then it goes
            asyncio.get_running_loop().call_later(self.timeout_s, _close, connection)

    async def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            _close(connection)
        if self._cluster is not None:
            self._cluster.close()
        watch, self._sentinel_watch = self._sentinel_watch, None
        if watch is not None:
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)


def _close(connection: _Connection) -> None:
    connection.closed = True
    if connection.transport is not None:
        connection.transport.close()


def _retrieved(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # marks it retrieved: no "never retrieved" warning


_MAX_REDIRECTS = 5


class _Cluster:
    """Redis Cluster routing for one RespClient: a connection per node, the slot map from
    CLUSTER SLOTS (fetched on first use and again after a redirection or a lost node), MOVED
    followed to the new owner, ASK answered with ASKING on the importing node."""

    def __init__(self, client: RespClient) -> None:
        self.client = client
        self.slots: list[tuple[str, int] | None] = [None] * 16384
        self.nodes: dict[tuple[str, int], _Connection] = {}
        self.stale = True
        self._refreshing: asyncio.Lock | None = None
        self._connecting: dict[tuple[str, int], asyncio.Lock] = {}

    async def call(self, args: Sequence[str | bytes]) -> Any:
        if self.stale:
            await self.refresh()
        key = command_key(args)
        address = self.slots[key_slot(key)] if key is not None else None
        if address is None:
            address = next(iter(self.nodes), None) or self.client.endpoint.addresses[0]
        payload = encode_command(args)
        asking = False
        for _ in range(_MAX_REDIRECTS):
            try:
                connection = await self._node(address)
                if asking:  # its +OK is not awaited; an error reply is dropped here
                    connection.request(encode_command(("ASKING",)),
                                       self.client.timeout_s).add_done_callback(_retrieved)
                return await self.client._send(connection, payload)
            except RespError as exc:
                kind, _, rest = str(exc).partition(" ")
                if kind not in ("MOVED", "ASK"):
                    raise
                slot, _, where = rest.partition(" ")
                address = _address(where, 6379)
                if kind == "MOVED":
                    self.slots[int(slot)] = address
                    self.stale = True  # the rest of the map has likely moved too
                asking = kind == "ASK"
            except OSError:
                self.stale = True  # a node went away: its slots have new owners soon
                raise
        raise ConnectionError(f"Redis Cluster redirected a command {_MAX_REDIRECTS} times")

    async def refresh(self) -> None:
        if self._refreshing is None:
            self._refreshing = asyncio.Lock()
        async with self._refreshing:
            if not self.stale:
                return
            reasons = []
            seeds = list(dict.fromkeys([*self.nodes, *self.client.endpoint.addresses]))
            for address in seeds:
                try:
                    reply = await self.client._send(await self._node(address),
                                                    encode_command(("CLUSTER", "SLOTS")))
                except (OSError, RespError) as exc:
                    reasons.append(f"{address[0]}:{address[1]}: {type(exc).__name__}")
                    continue
                slots: list[tuple[str, int] | None] = [None] * 16384
                for start, end, primary, *_replicas in reply:
                    host = primary[0].decode() if primary[0] else ""
                    owner = (host if host and host != "?" else address[0], int(primary[1]))
                    slots[int(start):int(end) + 1] = [owner] * (int(end) - int(start) + 1)
                self.slots = slots
                self.stale = False
                owners = set(slots)
                for gone in [a for a in self.nodes if a not in owners and a not in seeds]:
                    _close(self.nodes.pop(gone))
                return
            raise ConnectionError(f"no Redis Cluster node answered CLUSTER SLOTS "
                                  f"({'; '.join(reasons)})")

    async def check(self) -> None:
        self.stale = True  # a fresh map: the owners as they are now
        await self.refresh()
        owners = {address for address in self.slots if address is not None}
        if len(owners) == 0 or None in self.slots:
            raise ConnectionError("the Redis Cluster does not serve every slot")
        for address in sorted(owners):
            info = await self.client._send(await self._node(address),
                                           encode_command(("CLUSTER", "INFO")))
            if b"cluster_state:ok" not in info:
                raise ConnectionError(f"Redis Cluster node {address[0]}:{address[1]} reports "
                                      "cluster_state other than ok")

    async def _node(self, address: tuple[str, int]) -> _Connection:
        connection = self.nodes.get(address)
        if connection is not None and not connection.closed:
            return connection
        lock = self._connecting.setdefault(address, asyncio.Lock())
        async with lock:
            connection = self.nodes.get(address)
            if connection is not None and not connection.closed:
                return connection
            endpoint = self.client.endpoint
            connection = await self.client._open(address)
            await self.client._handshake(connection, endpoint.username, endpoint.password, 0)
            self.nodes[address] = connection
            return connection

    def close(self) -> None:
        for connection in self.nodes.values():
            _close(connection)
        self.nodes.clear()
        self.stale = True
