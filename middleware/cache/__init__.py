"""The cache layer: exact caching, and opt-in semantic caching of paraphrases.

A request is looked up by a hash of its tenant scope (project by default), namespace, public
model, operation and every body field that can change the answer (middleware/cache/keys.py).
A hit is answered without calling below, in ~a millisecond: as JSON, or replayed as a stream
in the caller's format (middleware/cache/replay.py), with the original usage marked as
cached; the context says `cache_status = "hit"`, so the quota layer charges nothing. A miss is
teed: once its last byte has gone out, a loop callback stores it as it was served (a
completed stream LZ4-compressed, read into the JSON answer it amounts to when it is first
asked for again, so it can serve non-stream requests too; a store that must be awaited gets
a task). A store that fails is a miss, never an error. Every answer says
`x-sluicegate-cache: hit|miss|bypass`.

Controls: `Cache-Control: no-cache` (do not answer from the cache), `no-store` (do not store),
`max-age=N`; `x-sluicegate-cache-namespace`; `x-sluicegate-cache: on` opts a request in under
the default policy (temperature 0, or embeddings). TTL per model, per project, or the default.

With `semantic=SemanticCache(embedder, index)`, an exact miss is looked up once more by meaning:
the request's recent conversation is embedded and compared within its partition (tenant,
model, system prompt, tools, earlier history; see middleware/cache/semantic.py); a match at or
above the threshold is answered from the exact entry it points to, with
`x-sluicegate-cache: semantic-hit`. Embedding or index failures are misses.
"""
from __future__ import annotations

import asyncio
import logging
import math
import operator
import time
from collections.abc import Awaitable, Mapping
from typing import Any

import lz4.block
import orjson

from gateway import context as c
from gateway.admin import (
    admin_error,
    admin_token_from_env,
    admitted,
    read_json,
    route_path,
    send_error,
    send_json,
)
from gateway.config import ConfigError, GatewayConfig
from gateway.context import CONTEXT_KEY, RequestContext, Usage, is_answer
from gateway.errors import GatewayError
from gateway.kernel import (
    ASGIApp,
    Message,
    Receive,
    Scope,
    Send,
    degraded,
    stop_after_failed_start,
)
from gateway.layers import json_passes_through
from gateway.policy import ANONYMOUS
from gateway.pricing import call_cost_micros
from gateway.resp import is_redis_url
from middleware.cache.collect import collect_sse
from middleware.cache.keys import (
    TAGS_HEADER,
    cache_key,
    cache_tags,
    forwarded_headers,
    is_cacheable,
    model_tag,
    namespace_tag,
    parse_cache_control,
    project_tag,
)
from middleware.cache.replay import marked_json, replay_stream
from middleware.cache.semantic import (
    EmbedderError,
    SemanticCache,
    SemanticQuery,
    TextNotEmbedded,
    VectorIndexError,
)
from middleware.cache.stores import (
    CachedResponse,
    CacheStore,
    CacheStoreError,
    MemoryCacheStore,
    RedisCacheStore,
)

__all__ = ["CacheMiddleware"]

logger = logging.getLogger("sluicegate.cache")

_CACHED_OPERATIONS = frozenset({c.OPENAI_CHAT, c.OPENAI_COMPLETIONS, c.OPENAI_EMBEDDINGS,
                                c.ANTHROPIC_MESSAGES})
_SCOPES = ("project", "key", "global")
_JSON = (b"content-type", b"application/json")
_MISS = (b"x-sluicegate-cache", b"miss")
_NAME = operator.itemgetter(0)  # a header's name
_BYPASS = (b"x-sluicegate-cache", b"bypass")
_SSE = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]


def _mark(ctx: RequestContext, status: str, header: tuple[bytes, bytes]) -> None:
    """Notes the request's cache status and its `x-sluicegate-cache` header, once: a layer
    above that calls below again for the request (a failover layer's retry or fallback)
    calls this layer again, and each call's header went out beside the earlier ones."""
    if ctx.cache_status is not None:
        _drop_marks(ctx)
    ctx.cache_status = status
    ctx.response_headers.append(header)


def _drop_marks(ctx: RequestContext) -> None:
    ctx.response_headers[:] = [header for header in ctx.response_headers
                               if header[0] != b"x-sluicegate-cache"]


class CacheMiddleware:
    """Exact cache (see the module docstring).

    `store`: "memory" (in process, bounded by `max_bytes`), a `redis://` URL, or a CacheStore
    (e.g. `TieredCacheStore(RedisCacheStore(url), PostgresCacheStore(dsn))`). `scope`:
    "project" (default), "key" or "global" — who may share answers. `policy`:
    "deterministic" (temperature 0 or opted in), "always" or "never".
    """

    passes_json_through = True  # a JSON answer from below goes on as it came
    acts_per_caller = True  # answers by the caller before calling the layers under it

    def __init__(
        self,
        app: ASGIApp,
        *,
        store: CacheStore | str = "memory",
        ttl_s: float = 3600.0,
        model_ttl_s: Mapping[str, float] | None = None,
        project_ttl_s: Mapping[str, float] | None = None,
        scope: str = "project",
        policy: str = "deterministic",
        max_bytes: int = 64 * 1024 * 1024,
        max_entry_bytes: int = 1024 * 1024,
        admin_token_env: str | None = None,
        semantic: SemanticCache | None = None,
    ) -> None:
        self.app = app
        if semantic is not None and not isinstance(semantic, SemanticCache):
            raise ConfigError("CacheMiddleware semantic must be SemanticCache(...).")
        self.semantic = semantic
        self.admin_token = (admin_token_from_env(admin_token_env, "CacheMiddleware")
                            if admin_token_env else None)
        if scope not in _SCOPES:
            raise ConfigError(f"CacheMiddleware scope must be one of {', '.join(_SCOPES)}.")
        if policy not in ("deterministic", "always", "never"):
            raise ConfigError("CacheMiddleware policy must be deterministic, always or never.")
        for name, value in (("ttl_s", ttl_s), ("max_entry_bytes", max_entry_bytes)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"CacheMiddleware {name} must be a number, not a "
                                  f"{type(value).__name__}.")
        if not 0 < ttl_s < math.inf or max_entry_bytes <= 0:
            raise ConfigError("CacheMiddleware ttl_s and max_entry_bytes must be positive "
                              "(and the TTL finite).")
        for name, ttls in (("model_ttl_s", model_ttl_s), ("project_ttl_s", project_ttl_s)):
            for subject, value in (ttls or {}).items():
                if not isinstance(value, (int, float)) or not 0 < value < math.inf:
                    raise ConfigError(f"CacheMiddleware {name}[{subject!r}] must be a positive, "
                                      f"finite number of seconds, not {value!r}.")
        self.store = _make_store(store, max_bytes)
        self.ttl_s = ttl_s
        self.model_ttl_s = dict(model_ttl_s or {})
        self.project_ttl_s = dict(project_ttl_s or {})
        self._ttl_varies = bool(self.model_ttl_s or self.project_ttl_s)
        self.scope = scope
        self.policy = policy
        self.max_entry_bytes = max_entry_bytes
        # A stream is measured against max_entry_bytes as stored (LZ4-compressed); as sent it
        # is 20-50 times its answer (each token's event repeats the envelope), so its copy
        # in flight has a bound of its own: a long answer streamed is kept as it is asked
        # without a stream.
        self.max_stream_copy_bytes = STREAM_COPY_FACTOR * max_entry_bytes
        self._writes: set[asyncio.Task[None]] = set()
        # Misses to store, queued by the requests of one event-loop step and written by one
        # callback (`_flush_queue`) once their answers have gone out (hypercorn's writes go
        # at the end of the loop's turn: gateway/hypercorn_writes.py); only writes that must
        # be awaited get a task.
        self._queued: list[tuple[RequestContext, str, _Tee | tuple[bytes, Any],
                                 tuple[str, ...], SemanticQuery | None,
                                 list[float] | None]] = []
        # What hits send, per stored body, and what kept streams made (each memo bounded by
        # a quarter of max_bytes, at most MEMO_BYTES; emptied by an invalidation).
        self._memo_bytes = min(MEMO_BYTES, max_bytes // 4)
        self._replays: dict[tuple[bytes, str, bool], bytes] = {}
        self._replays_bytes = 0
        self._marked: dict[bytes, bytes] = {}
        self._marked_bytes = 0
        self._streams: dict[bytes, tuple[bytes, dict[str, Any] | None] | None] = {}
        self._streams_bytes = 0
        # Stores that answer without I/O (the memory store) are called without a coroutine.
        self._get_now = getattr(self.store, "get_now", None)
        self._set_soon = getattr(self.store, "set_soon", None)
        self._scope_ids: dict[str | None, str] = {}
        # Whether every layer below passes a JSON answer on as it came (see
        # `passes_json_through`): then a non-stream miss is kept from the passthrough's copy.
        self._json_passes_below = json_passes_through(app)
        self._tags: dict[tuple[str, str | None, str | None], tuple[str, ...]] = {}

    def check_config(self, config: GatewayConfig) -> None:
        """`model_ttl_s` names models the config has (a typo would leave that model at the
        default TTL, silently)."""
        unknown = [name for name in self.model_ttl_s if name not in config.models]
        if unknown:
            raise ConfigError(f"{config.path}: CacheMiddleware model_ttl_s names "
                              f"{', '.join(map(repr, unknown))}, not a model in `models`.")

    async def startup(self) -> None:
        try:
            await self.store.startup()
            self._get_now = getattr(self.store, "get_now", None)  # (its startup may set it)
            if self.semantic is not None:
                await self.semantic.startup()
        except BaseException:  # (what started is closed: the kernel stops started layers only)
            await stop_after_failed_start(self)
            raise

    async def shutdown(self) -> None:
        if self._queued:
            self._flush_queue()
        if self._writes:
            await asyncio.wait(list(self._writes), timeout=5)
        if self.semantic is not None:
            await self.semantic.shutdown()
        await self.store.shutdown()

    async def check_ready(self) -> dict[str, str]:
        report = await self.store.check_ready()
        if self.semantic is not None:
            report.update(await self.semantic.index.check_ready())
        return degraded(report, "lookups miss")

    # -- requests ----------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ctx: RequestContext | None = scope.get(CONTEXT_KEY)  # (`find_request_context`)
        if ctx is None and self.admin_token is not None and \
                route_path(scope) == "/admin/cache/invalidate":
            await self._invalidate(scope, receive, send)
            return
        if ctx is None or ctx.operation not in _CACHED_OPERATIONS:
            # only-if-cached promises never a call to the model, on every operation (README):
            # one the cache does not keep has nothing stored to answer with.
            if ctx is not None and _asks_only_if_cached(ctx.headers):
                raise _not_cached()
            await self.app(scope, receive, send)
            return
        try:
            control = parse_cache_control(ctx.headers)
        except ValueError as exc:
            raise GatewayError(400, f"Bad cache header: {exc}", code="invalid_cache_header") \
                from None
        # (the deployment tags asked for; for Anthropic callers, the headers the adapter sends
        # on: each changes the answer)
        if ctx.api_format == "anthropic":
            varies = forwarded_headers(ctx.headers)
        elif TAGS_HEADER in map(_NAME, ctx.headers):  # (C's loop: this runs on every request)
            varies = forwarded_headers(ctx.headers, anthropic=False)
        else:
            varies = None
        if not is_cacheable(ctx.body, policy=self.policy, opt_in=control.opt_in,
                            operation=ctx.operation):
            _mark(ctx, "bypass", _BYPASS)  # the kernel puts it on the answer (or error)
            if control.only_if_cached:
                raise _not_cached()
            await self.app(scope, receive, send)
            return
        principal = ctx.principal or ANONYMOUS
        model = ctx.model
        key = cache_key(self._scope_id(principal), model, ctx.operation, ctx.body,
                        namespace=control.namespace, headers=varies)
        if not control.no_cache:
            get_now = self._get_now
            entry = get_now(key) if get_now is not None else await self._lookup(key)
            if entry is not None and entry.api_format == ctx.api_format and \
                    control.accepts(entry.created_at, time.time()):
                if entry.stream_operation is not None:
                    entry = self._collected(key, entry)
                if entry is not None and await self._answer(ctx, entry, send):
                    return
        query: SemanticQuery | None = None
        vector: list[float] | None = None
        if self.semantic is not None and self.semantic.applies(principal.project, ctx.model):
            query = self.semantic.query(self._scope_id(principal), ctx.model, ctx.operation,
                                        ctx.body, control.namespace, varies)
            if query is not None and not (control.no_cache and control.no_store):
                vector = await self._embed(query)
            if vector is not None and not control.no_cache:
                entry = await self._semantic_lookup(query, vector, ctx, control)  # type: ignore[arg-type]
                if entry is not None and \
                        await self._answer(ctx, entry, send, status="semantic-hit"):
                    return
        if control.no_cache and control.no_store and not control.only_if_cached:
            # (`x-sluicegate-cache: off`, or both directives: neither read nor written)
            _mark(ctx, "bypass", _BYPASS)
            await self.app(scope, receive, send)
            return
        _mark(ctx, "miss", _MISS)  # on the answer, or on the error the kernel renders
        if control.only_if_cached:
            raise _not_cached()
        if control.no_store:
            await self.app(scope, receive, send)
            return
        answer: _Tee | tuple[bytes, Any]
        if ctx.stream or not self._json_passes_below:
            tee = _Tee(send, self.max_entry_bytes, self.max_stream_copy_bytes)
            await self.app(scope, receive, tee.send)
            # (a stream that broke ends with an error event, complete and said so: not kept)
            if not tee.complete or ctx.error_type is not None or \
                    not _answered_as_asked(ctx, model):
                return
            answer = tee
        else:
            # Every layer below passes a JSON answer on as it came: what went out is what the
            # passthrough sent (and parsed), so `send` is not wrapped to copy it.
            await self.app(scope, receive, send)
            sent = ctx.sent_json
            if sent is None or len(sent[0]) > self.max_entry_bytes or \
                    not _answered_as_asked(ctx, model):
                return
            answer = sent
        tags_of = (model, principal.project, control.namespace)
        tags = self._tags.get(tags_of)
        if tags is None:
            if len(self._tags) >= 4096:  # namespaces come from requests: keep it bounded
                self._tags.clear()
            tags = self._tags[tags_of] = cache_tags(
                model=model, project=principal.project, namespace=control.namespace)
        if not self._queued:
            asyncio.get_running_loop().call_soon(self._flush_queue)
        self._queued.append((ctx, key, answer, tags, query, vector))

    def _flush_queue(self) -> None:
        """Stores the misses queued since the last call (the loop runs it once their answers
        have gone out). A store that can write without waiting (`set_soon`: the memory store,
        Redis) takes them here; the rest are awaited in one task."""
        queued, self._queued = self._queued, []
        set_soon = self._set_soon
        later: list[tuple[str, CachedResponse, float, SemanticQuery | None,
                          list[float] | None]] = []
        for ctx, key, answer, tags, query, vector in queued:
            try:
                made = self._entry_of(ctx, answer, tags)
                if made is None:
                    continue
                entry, ttl = made
                if query is None and set_soon is not None and set_soon(key, entry, ttl):
                    continue  # written (no semantic index entry has to follow it)
            except Exception:  # one bad answer must not keep the others out
                logger.exception("cache: storing an answer failed")
                continue
            later.append((key, entry, ttl, query, vector))
        if later:
            self._spawn(self._write_all(later))

    async def _write_all(self, writes: list[tuple[str, CachedResponse, float,
                                                  SemanticQuery | None, list[float] | None]]
                         ) -> None:
        for key, entry, ttl, query, vector in writes:
            try:
                await self._write(key, entry, ttl, query, vector)
            except Exception:
                logger.exception("cache: storing an answer failed")

    async def _embed(self, query: SemanticQuery) -> list[float] | None:
        assert self.semantic is not None
        try:
            return await self.semantic.embed(query.text)
        except TextNotEmbedded as exc:  # (no fault: as often as such texts come)
            logger.debug("semantic cache: %s; exact caching only", exc)
            return None
        except EmbedderError as exc:  # a failing embedder is a miss, never an error
            logger.warning("semantic cache: %s", exc)
            return None
        except Exception:  # an embedder's bug too (a custom one, a library): logged, a miss
            logger.warning("semantic cache: the embedder failed; a miss", exc_info=True)
            return None

    async def _semantic_lookup(self, query: SemanticQuery, vector: list[float],
                               ctx: RequestContext, control: Any) -> CachedResponse | None:
        assert self.semantic is not None
        try:
            candidates = await self.semantic.index.search(query.partition, vector,
                                                          self.semantic.top_k)
        except VectorIndexError as exc:
            logger.warning("semantic cache: %s", exc)
            return None
        except Exception:  # an index's bug too (a custom one, NumPy): logged, a miss
            logger.warning("semantic cache: the vector index failed; a miss", exc_info=True)
            return None
        for candidate in self.semantic.best(query, candidates):
            entry = await self._lookup(candidate.key)
            if entry is not None and entry.api_format == ctx.api_format and \
                    control.accepts(entry.created_at, time.time()):
                if entry.stream_operation is not None:
                    entry = self._collected(candidate.key, entry)
                    if entry is None:
                        continue
                ctx.state["cache.similarity"] = candidate.similarity
                return entry
        return None

    async def _invalidate(self, scope: Scope, receive: Receive, send: Send) -> None:
        """POST /admin/cache/invalidate {"project": .., "model": .., "namespace": ..}: drops
        every entry carrying all the given tags (at least one)."""
        assert self.admin_token is not None
        if not await admitted(scope, send, self.admin_token, "POST"):
            return
        try:
            tags = _invalidation_tags(await read_json(scope, receive))
            try:
                dropped = await self.store.invalidate(*tags)
            finally:
                self._forget_renderings()
        except GatewayError as error:
            await send_error(send, error)
            return
        except CacheStoreError as exc:
            await send_error(send, admin_error(503, f"The cache store is unavailable: {exc}",
                                               "cache_store_unavailable"))
            return
        await send_json(send, 200, {"object": "cache.invalidation", "tags": tags,
                                    "dropped": dropped})

    def _forget_renderings(self) -> None:
        """Empties the memos of what hits send: an invalidated answer is never served from
        them (they are read once the store returned it), but would stay in memory. (All of
        them: invalidations are rare, and the memos hold no tags.)"""
        self._marked.clear()
        self._replays.clear()
        self._streams.clear()
        self._marked_bytes = self._replays_bytes = self._streams_bytes = 0

    def _scope_id(self, principal: Any) -> str:
        if self.scope == "global":
            return "*"
        name = principal.key_id if self.scope == "key" else principal.project
        scope_id = self._scope_ids.get(name)
        if scope_id is None:
            if len(self._scope_ids) >= 4096:
                self._scope_ids.clear()
            scope_id = self._scope_ids[name] = f"{self.scope}:{name}"
        return scope_id

    async def _lookup(self, key: str) -> CachedResponse | None:
        try:
            return await self.store.get(key)
        except CacheStoreError as exc:  # a failing store is a miss, never an error
            logger.debug("cache lookup failed: %s", exc)
            return None

    async def _answer(self, ctx: RequestContext, entry: CachedResponse, send: Send, *,
                      status: str = "hit") -> bool:
        """Sends a stored answer; False, having sent nothing, when it has no form for this
        request (a stream asked of an answer that cannot be replayed): then it is a miss."""
        marker = status.encode()
        if ctx.stream:
            include_usage = ctx.api_format == "anthropic" or _asked_for_usage(ctx.body)
            try:
                payload = self._replayed(entry, ctx.api_format, include_usage)
            except ValueError as exc:
                logger.warning("cache: a stored answer has no stream form (%s); a miss", exc)
                return False
            headers = [*_SSE, (b"x-sluicegate-cache", marker)]
        else:
            payload = self._marked_json(entry.body)
            headers = [_JSON, (b"content-length", b"%d" % len(payload)),
                       (b"x-sluicegate-cache", marker)]
        if ctx.cache_status is not None:  # (an earlier call's mark: see `_mark`)
            _drop_marks(ctx)
        ctx.cache_status = status
        usage = entry.usage if isinstance(entry.usage, dict) else None
        ctx.usage = (Usage.from_anthropic(usage) if ctx.api_format == "anthropic"
                     else Usage.from_openai(usage))
        ctx.served_model = entry.model
        ctx.state["cache.saved_micros"] = entry.cost_micros
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": payload})
        return True

    def _marked_json(self, body: bytes) -> bytes:
        """A stored answer with its usage marked as cached, made once per entry and kept in
        process (bounded), so a miss never pays for marking an answer nobody asks again."""
        marked = self._marked.get(body)
        if marked is None:
            marked = marked_json(body)
            self._marked_bytes = _remember(self._marked, self._marked_bytes, self._memo_bytes,
                                           body, marked)
        return marked

    def _replayed(self, entry: CachedResponse, api_format: str, include_usage: bool) -> bytes:
        """The stream form of a stored answer, rendered once per entry and kept in process
        (bounded), so a stream hit costs about what a JSON hit does."""
        memo_key = (entry.body, api_format, include_usage)
        payload = self._replays.get(memo_key)
        if payload is None:
            payload = b"".join(replay_stream(orjson.loads(entry.body), api_format,
                                             include_usage=include_usage))
            self._replays_bytes = _remember(self._replays, self._replays_bytes,
                                            self._memo_bytes, memo_key, payload)
        return payload

    def _entry_of(self, ctx: RequestContext, answer: _Tee | tuple[bytes, Any],
                  tags: tuple[str, ...]) -> tuple[CachedResponse, float] | None:
        """The entry a complete answer makes (`answer`: the tee that copied it, or the
        passthrough's (bytes, parse) of the JSON it sent), and its TTL; None for an answer
        that is not worth keeping (a body that is not a JSON object).

        A stream is kept as the bytes that went out, LZ4-compressed, and made into its JSON
        answer when it is first asked for again (`_collected`), not here: reading its
        events costs ~10 times the instructions compressing them does (~430k against 42k
        for the bench's 20 events), and most stored answers are never asked for again.
        Compressed, the stream takes about the room its answer would (the bench's: 659
        bytes against 658; 124 chunks with OpenAI's pads: 2,374 against 1,202), where as
        sent it would take 10 to 50 times that. (A stream that broke is not kept: see
        `__call__`.)"""
        stream_operation = None
        if type(answer) is tuple:
            body, parsed = answer
        else:
            assert isinstance(answer, _Tee)
            body = b"".join(answer.chunks)
            if answer.streaming:
                body = lz4.block.compress(body, store_size=True)
                if len(body) > self.max_entry_bytes:
                    return None
                stream_operation = ctx.operation
            else:
                # The passthrough parsed what it sent; other bytes (a custom layer below this
                # one changed them) are parsed here. The body is kept as it was served; a hit
                # marks its usage (`_marked_json`).
                sent = ctx.sent_json
                parsed = sent[1] if sent is not None and sent[0] == body else _parsed(body)
        if stream_operation is not None:
            # (known once the stream is read, on its first hit) Unless the client did not ask
            # for usage: the provider's usage chunk was then dropped on its way out
            # (providers/openai.py), and the call's usage is kept here for the answer.
            usage = None if ctx.api_format == "anthropic" or _asked_for_usage(ctx.body) \
                else _openai_usage(ctx.usage)
        elif is_answer(parsed, ctx.operation):
            usage = parsed.get("usage")
        else:
            return None  # not a JSON object, or not a success (a 200 with an error body)
        # Created when the request began: an invalidation after that point must not keep
        # out an answer that may be older than it (see MemoryCacheStore).
        # (Its cost, what a hit on it saves, is what the call is billed: the quota layer,
        # metering and the metrics priced the same usage; found in the request's memo.)
        entry = CachedResponse(body, ctx.api_format, 200, ctx.started_at,
                               usage if type(usage) is dict else None,
                               ctx.served_model or ctx.model, call_cost_micros(ctx, ctx.usage),
                               tags, None, stream_operation)
        if not self._ttl_varies:
            return entry, self.ttl_s
        project = (ctx.principal or ANONYMOUS).project
        return entry, self.model_ttl_s.get(ctx.model, self.project_ttl_s.get(project,
                                                                             self.ttl_s))

    def _collected(self, key: str, entry: CachedResponse) -> CachedResponse | None:
        """The JSON answer a stored stream makes, with its usage; None for a stream that
        makes none (then it is a miss, whose answer replaces it). Made once: written back in
        the stream's place in a store that reads and writes at once (the memory store:
        nothing can happen between the two), else kept in process per stream (bounded by
        MEMO_BYTES), so a shared store is never written from a hit (a write there could put
        back what an invalidation just dropped). The memo keeps only what the stream's bytes
        make (the answer's body and usage, or that there is none): two entries holding the
        same stream keep their own model, cost and tags."""
        assert entry.stream_operation is not None
        kept = self._set_soon if self._get_now is not None else None
        made = self._streams.get(entry.body, _UNREAD)
        if made is _UNREAD:
            made = _answer_of(entry, self.max_stream_copy_bytes)
            # (a stream that makes no answer is remembered by every store: it stays stored
            # until a miss that may store replaces it, and is not read again meanwhile)
            if kept is None or made is None:
                self._streams_bytes = _remember(self._streams, self._streams_bytes,
                                                self._memo_bytes, entry.body, made,
                                                len(made[0]) if made else 0)
        if made is None:
            return None
        body, usage = made
        collected = CachedResponse(body, entry.api_format, entry.status, entry.created_at,
                                   usage, entry.model, entry.cost_micros, entry.tags,
                                   entry.expires_at)
        if kept is not None and entry.expires_at is not None:
            kept(key, collected, entry.expires_at - time.time())
        return collected

    async def _write(self, key: str, entry: CachedResponse, ttl: float,
                     query: SemanticQuery | None, vector: list[float] | None) -> None:
        try:
            await self.store.set(key, entry, ttl)
        except CacheStoreError as exc:
            logger.debug("cache write failed: %s", exc)
            return
        if self.semantic is not None and query is not None and vector is not None:
            try:
                # (from now, as the store keeps it: created_at is when the request began)
                await self.semantic.index.add(query.partition, vector, key, query.guard,
                                              time.time() + ttl)
            except VectorIndexError as exc:
                logger.warning("semantic cache: could not index an answer (%s)", exc)

    def _spawn(self, work: Any) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(work)
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)


class _Tee:
    """Wraps `send`: keeps a copy of a 200 answer (up to `limit` bytes, or `stream_limit`
    for an event stream) until its last byte went out."""

    __slots__ = ("_send", "chunks", "complete", "limit", "size", "status", "stream_limit",
                 "streaming")

    def __init__(self, send: Send, limit: int, stream_limit: int) -> None:
        self._send = send
        self.limit = limit
        self.stream_limit = stream_limit
        self.chunks: list[bytes] = []
        self.size = 0
        self.status = 0
        self.streaming = False
        self.complete = False

    def send(self, message: Message) -> Awaitable[None]:
        # Not a coroutine: the message goes on with the caller awaiting `send` itself.
        kind = message["type"]
        if kind == "http.response.body":
            if self.status == 200 and self.size <= self.limit:
                body = message.get("body", b"")
                self.size += len(body)
                if self.size > self.limit:  # not kept: its copy goes now, not at its end
                    self.chunks.clear()
                else:
                    self.chunks.append(body)
                    if not message.get("more_body", False):
                        self.complete = True
        elif kind == "http.response.start":
            self.status = message["status"]
            for name, value in message.get("headers", ()):
                if name == b"content-type" and value.startswith(b"text/event-stream"):
                    self.streaming = True
                    self.limit = self.stream_limit
        return self._send(message)


MEMO_BYTES = 32 * 1024 * 1024  # per memo of rendered hits: stored body plus rendering
# A stream's raw copy may take this many times max_entry_bytes (16 MiB by default: some
# 70,000 tokens of OpenAI chunks) before it is compressed and measured as stored.
STREAM_COPY_FACTOR = 16


def _remember(memo: dict[Any, Any], used: int, limit: int, key: Any, value: Any,
              size: int = -1) -> int:
    """Adds to a memo of renderings of stored bodies (the body is the key or its first
    item; `size`: the rendering's, if it is not bytes); empties it first when it would grow
    past `limit` bytes, and leaves out a rendering larger than that (made again on every
    hit). Returns the bytes it holds."""
    size = (len(value) if size < 0 else size) + len(key if isinstance(key, bytes) else key[0])
    if used + size > limit:
        memo.clear()
        if size > limit:
            return 0
        used = 0
    memo[key] = value
    return used + size


_UNREAD: Any = object()  # (`_collected`: a stream not in its memo)


def _answer_of(entry: CachedResponse, max_bytes: int
               ) -> tuple[bytes, dict[str, Any] | None] | None:
    """The JSON answer (unmarked) and usage a kept stream's bytes make; None if they make
    none: cut short, not LZ4, saying it holds more than `max_bytes`, or an answer that
    cannot be read or written (nested too deep), each a miss rather than an error."""
    body = entry.body
    # (the size it says it holds, checked first: a damaged one could ask for gigabytes)
    if len(body) < 4 or int.from_bytes(body[:4], "little") > max_bytes:
        return None
    try:
        operation = entry.stream_operation or ""
        parsed = collect_sse(lz4.block.decompress(body), entry.api_format, operation)
        if parsed is None or not is_answer(parsed, operation):
            return None
        if not isinstance(parsed.get("usage"), dict) and entry.usage is not None:
            parsed["usage"] = entry.usage  # (the call's usage, which its stream did not carry)
        usage = parsed.get("usage")
        return orjson.dumps(parsed), usage if isinstance(usage, dict) else None
    except Exception:  # (a damaged or hostile entry; logged, never raised on a hit)
        logger.warning("cache: a kept stream could not be read into its answer; a miss",
                       exc_info=True)
        return None


def _answered_as_asked(ctx: RequestContext, model: str) -> bool:
    """Whether an answer is one the model its key was made for (`model`) gave, to be kept
    under that key. Not when a layer below sent the request to another public model (the
    quota layer's downgrade, `Rerouted`), failover tried a fallback model (its answer is
    the fallback's, and may be one a key that may not use that model would then be served),
    or a broken stream was continued elsewhere (two calls' answers spliced): kept, any of
    these would answer every later caller of `model` so for the whole TTL. They are misses
    that store nothing (a fallback that failed before the model answered included: rare,
    and a miss is never wrong)."""
    if ctx.model != model:
        return False
    state = ctx.state
    return not state.get("failover.fallbacks") and "failover.continuations" not in state


def _asked_for_usage(body: Mapping[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def _openai_usage(usage: Usage | None) -> dict[str, Any] | None:
    """An OpenAI `usage` object of the call's usage (gateway.context.Usage reads it back)."""
    if usage is None:
        return None
    made: dict[str, Any] = {"prompt_tokens": usage.input_tokens,
                            "completion_tokens": usage.output_tokens,
                            "total_tokens": usage.total_tokens}
    if usage.cached_input_tokens or usage.cache_write_tokens:
        made["prompt_tokens_details"] = {"cached_tokens": usage.cached_input_tokens,
                                         "cache_write_tokens": usage.cache_write_tokens,
                                         "cache_write_1h_tokens": usage.cache_write_1h_tokens}
    if usage.reasoning_tokens:
        made["completion_tokens_details"] = {"reasoning_tokens": usage.reasoning_tokens}
    return made


def _asks_only_if_cached(headers: list[tuple[bytes, bytes]]) -> bool:
    """`Cache-Control: only-if-cached`, read as the cached operations read it."""
    try:
        return parse_cache_control(headers).only_if_cached
    except ValueError:  # (a bad namespace: it matters only to an operation that is cached)
        return False


def _parsed(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None


def _not_cached() -> GatewayError:
    # RFC 9111 §5.2.1.7: without a stored answer, only-if-cached gets a 504. Nothing timed
    # out (the status's default error type would say so): the request asked for what is not
    # there. The SDKs retry a 504 unless told not to, and asking again cannot help.
    return GatewayError(504, "No cached answer for this request (Cache-Control: only-if-cached)",
                        code="not_cached", error_type="invalid_request_error",
                        headers=[(b"x-should-retry", b"false")])


_INVALIDATION_FIELDS = (("project", project_tag), ("model", model_tag),
                        ("namespace", namespace_tag))


def _invalidation_tags(body: Any) -> list[str]:
    """The tags an invalidation's body names (at least one), or the admin 400 naming the
    field at fault; a field of the wrong type is refused, not dropped (which would widen the
    call)."""
    usage = ('Send a JSON object with at least one of "project", "model" and "namespace" '
             "(non-empty strings), and nothing else.")
    if not isinstance(body, dict):
        raise admin_error(400, usage, "invalid_json" if body is not None else
                          "missing_required_parameter")
    known = {name for name, _ in _INVALIDATION_FIELDS}
    unknown = sorted(name for name in body if name not in known)
    if unknown:
        raise admin_error(400, f"Unknown field {unknown[0]!r}. {usage}", "unknown_parameter",
                          param=unknown[0])
    tags = []
    for name, make in _INVALIDATION_FIELDS:
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, str) or not value:
            raise admin_error(400, f"{name!r} must be a non-empty string.", "invalid_type",
                              param=name)
        tags.append(make(value))
    if not tags:
        raise admin_error(400, usage, "missing_required_parameter")
    return tags


def _make_store(store: CacheStore | str, max_bytes: int) -> CacheStore:
    if isinstance(store, str):
        if store == "memory":
            return MemoryCacheStore(max_bytes=max_bytes)
        if is_redis_url(store):
            return RedisCacheStore(store)
        raise ConfigError(f"CacheMiddleware store must be 'memory', a Redis URL (redis://, "
                          f"rediss://, redis+sentinel://, redis+cluster://, unix://) or a "
                          f"CacheStore, not a {store.partition(':')[0]!r} string.")
    if not callable(getattr(store, "get", None)) or not callable(getattr(store, "set", None)):
        raise ConfigError(f"CacheMiddleware store {store!r} is not a CacheStore.")
    return store
