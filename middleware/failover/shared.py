"""Breaker state and latency shared by every gateway instance through Redis.

`RedisHealth(url)` runs one background task per process that, every `sync_interval_s`:
- writes this process's breaker openings (with their end, wall-clock) and closings into the
  hash `{<prefix>-health}:open`, and its latency averages into `{<prefix>-health}:ttft`;
- reads both back: a breaker another instance opened is opened here until the same moment, a
  breaker another instance closed (its half-open probe succeeded) is closed here, and the
  latency strategy sees the slowest recent view of each deployment.

It also shares Responses API affinity (failover/affinity.py): each response id this process
makes, with where, is written as its own key `<prefix>-response:<id>` with a TTL
(`response_ttl_s`, a day by default; the keys spread over a Cluster's slots) before the
answer's body goes out (one SET), so a follow-up may reach any instance at once; and a
follow-up whose `previous_response_id` this process has not seen asks Redis for it (one
GET). Those two calls are the only ones on a request path here, each held to
`lookup_timeout_s`: a SET that fails is left to the next sync (the answer goes out without
waiting longer), a GET that fails routes the request as one with an unknown id. After a
failure (theirs or the sync's) requests leave Redis alone, as if it failed at once, until a
sync reaches it again: while Redis hangs, no request waits for it more than once a sync.

Nothing else is on the request path: a breaker change only marks the breaker for the next
sync. So instances agree within two `sync_interval_s` (the change is written at its process's
next sync and read at each other's) plus one Redis round trip. When Redis
is unreachable each instance keeps its own breakers (the per-process behaviour) and the task
retries; the hash tag keeps both keys in one Redis Cluster slot. The URL takes every form the
gateway's Redis client does (TLS, Sentinel, Cluster: see gateway.resp).
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from typing import Any

from gateway.resp import RespClient, RespError, parse_redis_url
from middleware.failover.affinity import Pin
from middleware.failover.health import CLOSED, OPEN, CircuitBreaker
from middleware.failover.routing import Group

__all__ = ["RedisHealth"]

logger = logging.getLogger("sluicegate.failover")
_TTFT_FRESH_S = 30.0
_MAX_PENDING_PINS = 100_000


class RedisHealth:
    """Shares breaker state and latency stats between instances (see the module docstring)."""

    def __init__(self, url: str | None = None, *, url_env: str | None = None,
                 prefix: str = "sluicegate", sync_interval_s: float = 0.5,
                 instance_id: str | None = None, response_ttl_s: int = 86_400,
                 lookup_timeout_s: float = 0.2) -> None:
        if url is None and url_env is not None:
            url = os.environ.get(url_env)
        if not url:
            raise ValueError("RedisHealth needs a Redis URL (url= or url_env=)")
        if not sync_interval_s > 0:
            raise ValueError("RedisHealth.sync_interval_s must be positive")
        parse_redis_url(url)  # a bad URL is a config error now, not a sync failure later
        self.url = url
        self.sync_interval_s = sync_interval_s
        self.instance_id = instance_id or f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tag = "{" + prefix + "-health}"
        self.open_key, self.ttft_key = f"{tag}:open", f"{tag}:ttft"
        if response_ttl_s < 1 or not lookup_timeout_s > 0:
            raise ValueError("RedisHealth.response_ttl_s must be >= 1 and lookup_timeout_s "
                             "positive")
        self.response_prefix = f"{prefix}-response:"
        self.response_ttl_s = response_ttl_s
        self.lookup_timeout_s = lookup_timeout_s
        self._pins: dict[str, str] = {}  # response id -> encoded Pin, for the next sync
        self._lookups: RespClient | None = None
        self._breakers: dict[str, CircuitBreaker] = {}
        self._groups: list[Group] = []
        self._changed: dict[str, CircuitBreaker] = {}
        self._client: RespClient | None = None
        self._task: asyncio.Task[None] | None = None
        self.last_sync: float | None = None
        self.errors = 0
        self.lookup_errors = 0  # affinity's calls on the request path that failed
        self._redis_down = False  # since a call failed, until a sync reaches Redis

    # -- wiring ------------------------------------------------------------------------------

    def watch(self, group: Group) -> None:
        """Shares a model group's breakers (deployment and provider-key breakers)."""
        self._groups.append(group)
        for state in group.deployments:
            state.tracks_ttft = True  # its latency is shared
            self._share(f"{group.model}|{state.name}", state.breaker)
            for key in state.keys:
                self._share(f"{group.model}|{state.name}|{key.key.env}", key.breaker)

    def _share(self, name: str, breaker: CircuitBreaker) -> None:
        self._breakers[name] = breaker
        breaker.on_change = lambda _: self._changed.__setitem__(name, breaker)

    async def startup(self) -> None:
        self._client = RespClient(self.url, timeout_s=2.0)
        self._lookups = RespClient(self.url, timeout_s=self.lookup_timeout_s)
        self._task = asyncio.create_task(self._run(), name="sluicegate-failover-health")

    async def shutdown(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._client is not None:
            try:
                await self.sync()  # the last openings still reach the others
            except (RespError, OSError):
                pass
            await self._client.close()
            self._client = None
        if self._lookups is not None:
            await self._lookups.close()
            self._lookups = None

    async def check_ready(self) -> dict[str, str]:
        assert self._client is not None
        try:
            await self._client.ping()
        except (RespError, OSError) as exc:
            # Still ready: breakers and cool-downs go on per process meanwhile (a NotReady for
            # this alone would take every instance out of service at once).
            return {"failover-redis": f"degraded: unreachable ({type(exc).__name__}); "
                                      "breakers per process"}
        return {"failover-redis": "ok"}

    def describe(self) -> dict[str, Any]:
        return {"instance": self.instance_id, "sync_interval_s": self.sync_interval_s,
                "last_sync_age_s": None if self.last_sync is None
                else round(time.monotonic() - self.last_sync, 3), "errors": self.errors,
                "lookup_errors": self.lookup_errors}

    # -- Responses API affinity --------------------------------------------------------------

    def share_pin(self, response_id: str, pin: Pin) -> None:
        """Where a response was made, for the other instances (written at the next sync; at
        most `_MAX_PENDING_PINS` wait, the oldest dropped)."""
        pins = self._pins
        pins[response_id] = pin.encode()
        if len(pins) > _MAX_PENDING_PINS:
            del pins[next(iter(pins))]

    async def publish_pin(self, response_id: str, pin: Pin) -> None:
        """Where a response was made, for the other instances, now (one SET, held to
        `lookup_timeout_s`); when Redis fails, at the next sync that reaches it."""
        if self._lookups is None or self._redis_down:
            self.share_pin(response_id, pin)
            return
        try:
            await self._lookups.call("SET", self.response_prefix + response_id, pin.encode(),
                                     "EX", str(self.response_ttl_s))
        except (RespError, OSError) as exc:
            self._request_path_failed(exc)
            self.share_pin(response_id, pin)

    async def pin_of(self, response_id: str) -> Pin | None:
        """Where another instance saw a response made; None when unknown or Redis fails."""
        if self._lookups is None or self._redis_down:
            return None
        try:
            raw = await self._lookups.call("GET", self.response_prefix + response_id)
        except (RespError, OSError) as exc:
            self._request_path_failed(exc)
            return None
        return Pin.decode(raw) if isinstance(raw, bytes) else None

    def _request_path_failed(self, exc: Exception) -> None:
        self.lookup_errors += 1
        if not self._redis_down:  # (one warning an outage: calls in flight fail together)
            self._redis_down = True
            logger.warning("failover affinity call to Redis failed (%s); until a sync reaches "
                           "it, new pins wait for the sync and follow-ups whose "
                           "previous_response_id is not known here route as unknown ones",
                           type(exc).__name__)

    # -- the sync --------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            try:
                await self.sync()
            except (RespError, OSError) as exc:
                self.errors += 1
                self._redis_down = True
                if self.errors == 1 or self.errors % 100 == 0:
                    logger.warning("failover health sync with Redis failed (%s); breakers stay "
                                   "per process until it is back", type(exc).__name__)
            await asyncio.sleep(self.sync_interval_s)

    async def sync(self) -> None:
        """One exchange with Redis: write what changed here, read what changed elsewhere."""
        assert self._client is not None
        changed, self._changed = self._changed, {}
        pins, self._pins = self._pins, {}
        wall, mono = time.time(), time.monotonic()
        opened: dict[Any, Any] = {name: f"{wall + b.opened_at + b.settings.cooldown_s - mono:.3f}"
                  for name, b in changed.items() if b.state == OPEN}
        closed = [name for name, b in changed.items() if b.state == CLOSED]
        ttft: dict[Any, Any] = {f"{g.model}|{s.name}|{self.instance_id}": f"{s.ewma_ttft_s:.6f}:{wall:.3f}"
                for g in self._groups for s in g.deployments if s.requests}
        commands: list[list[str]] = []
        if opened:
            commands.append(["HSET", self.open_key, *_flat(opened)])
        if closed:
            commands.append(["HDEL", self.open_key, *closed])
        if ttft:
            commands.append(["HSET", self.ttft_key, *_flat(ttft)])
        ttl = str(self.response_ttl_s)
        commands += [["SET", self.response_prefix + response_id, pin, "EX", ttl]
                     for response_id, pin in pins.items()]
        commands += [["HGETALL", self.open_key], ["HGETALL", self.ttft_key]]
        try:
            replies = await self._client.call_many(commands)
            failed = next((reply for reply in replies if isinstance(reply, BaseException)), None)
            if failed is not None:
                raise failed
        except BaseException:
            for name, breaker in changed.items():  # tell the others next time
                self._changed.setdefault(name, breaker)
            for response_id, pin in pins.items():
                self._pins.setdefault(response_id, pin)
            raise
        self._apply_open(_pairs(replies[-2]), time.time(), time.monotonic())
        self._apply_ttft(_pairs(replies[-1]), time.time())
        self.last_sync = time.monotonic()
        self._redis_down = False

    def _apply_open(self, raw: dict[bytes, bytes], wall: float, mono: float) -> None:
        remote: dict[str, float] = {}
        for field, value in raw.items():
            try:
                remote[field.decode()] = float(value)
            except ValueError:
                continue
        for name, breaker in self._breakers.items():
            if name in self._changed:
                continue  # changed here since the write: ours is newer
            until = remote.get(name)
            if until is not None and until > wall:
                breaker.open_until(mono + (until - wall))
            elif until is None and breaker.state != CLOSED:
                breaker.close_shared()  # another instance's probe succeeded

    def _apply_ttft(self, raw: dict[bytes, bytes], wall: float) -> None:
        views: dict[str, float] = {}
        for field, value in raw.items():
            name, _, instance = field.decode().rpartition("|")
            if instance == self.instance_id:
                continue
            ewma, _, at = value.decode().partition(":")
            try:
                if wall - float(at) > _TTFT_FRESH_S:
                    continue
                views[name] = max(views.get(name, 0.0), float(ewma))
            except ValueError:
                continue
        for group in self._groups:
            for state in group.deployments:
                state.shared_ttft_s = views.get(f"{group.model}|{state.name}")


def _flat(mapping: dict[str, str]) -> list[str]:
    return [item for pair in mapping.items() for item in pair]


def _pairs(reply: list[bytes]) -> dict[bytes, bytes]:
    """HGETALL's flat field, value, field, value... reply as a dict."""
    return dict(zip(reply[0::2], reply[1::2], strict=True))
