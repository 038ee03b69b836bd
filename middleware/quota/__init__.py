"""The quota layer: rate limits and budgets that hold exactly, across gateway processes.

Before the call it reserves, for every limit that applies (the caller's key, customer and
project from the auth layer's `Principal`, the model's, and the gateway-wide ones): one
request against RPM, the estimated tokens (input estimate plus the output bound) against
TPM, a concurrency lease, and the estimated cost against each budget, at the price of the
dearest model that may serve the request (with a failover layer: the fallbacks its route may
go to that the caller's key may use, `learn_routes`). All of them are checked
and reserved in one atomic store call (one Lua script in Redis). Once the request has ended
(`RequestContext.on_end`), the reservation is replaced with the actual usage: the requests
that finished in one event-loop step are settled together, in one store call (one script
call in Redis, which settles each request on its own).

A request is admitted and settled once, however often a layer above calls the layers under
this one for it. With a failover layer listed above this one, each of its attempts (a retry,
a fallback, a broken stream's continuation) passes through here, but the caller sent one
request: it counts once against RPM and concurrency (a caller's limits count its requests,
not the gateway's attempts at them), holds its one reservation until it has ended, and is
settled to what the usage ledger bills for it, every attempt in it. A request this layer
downgrades under a failover layer goes back up to it (`Rerouted`), admitted at the cheaper
model's price (and its route's fallbacks'), and the failover layer routes every attempt for
the cheaper model.

A fallback model's own limits (`model_limits`) hold too, in either order of the two layers:
before the failover layer first calls a fallback model for a request, it asks this layer
(`admit_fallback`, a gate of the failover layer's), which reserves the request against that
model's limits, at its price; when they refuse, the failover layer goes on without that
model. A model's tokens and cost count against the model that answered: the model asked for
is charged none of them when a fallback answered (its requests and concurrency count as
asked), and the spend ledger records the cost against the model that answered.

Refusals: 429 with Retry-After for rate limits; 402 (or 429) naming the budget and when it
resets. With `on_overflow="downgrade"` the request goes to a cheaper model instead and the
response says so in `x-sluicegate-downgraded`. A budget with `stream_cutoff=True` ends a
stream whose cost crosses what is left of it with an in-band error event: a stream past its
reservation takes more of the budget from the store as it goes, in steps of its reservation,
and is ended when the store has none left for it.

When the store (Redis) cannot be reached, each limit follows its `on_store_error`: "open"
limits fall back to an in-process store, "closed" ones refuse with 503. The store is asked
again every `store_retry_s`; once it answers, what the fallback's budget counters took in the
outage is added to its counters (one store call), and admissions go back to it. After a
Redis flush or restart, budget counters are rebuilt from the spend ledger before they are
used.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from functools import partial
from typing import Any, ClassVar

import orjson

from gateway.admin import (
    admin_error,
    admin_token_from_env,
    admitted,
    route_path,
    send_error,
    send_json,
    without_body_for_head,
)
from gateway.config import ConfigError, GatewayConfig, is_postgres_dsn
from gateway.context import (
    ANTHROPIC_COUNT_TOKENS,
    CONTEXT_KEY,
    OPENAI_CHAT,
    OPENAI_RESPONSES,
    RequestContext,
    Rerouted,
    route_to,
)
from gateway.errors import GatewayError, stream_error_ending
from gateway.kernel import (
    ASGIApp,
    Message,
    Receive,
    Scope,
    Send,
    degraded,
    stack_components,
    stop_after_failed_start,
)
from gateway.policy import (
    AMOUNT_MAX,
    ANONYMOUS,
    BUDGET,
    CONCURRENT,
    PERIODS,
    Check,
    Decision,
    Limits,
    Principal,
    QuotaStore,
    QuotaStoreError,
    SpendLedger,
    downgrade_targets,
    micros_to_usd,
    period_bounds,
    period_label,
)
from gateway.pricing import (
    CACHE_HITS,
    EARLIER_ATTEMPT,
    Price,
    billed_usage,
    call_cost_micros,
    estimate_micros,
    in_force,
)
from gateway.resp import RespError, is_redis_url
from gateway.sse import content_counters, count_content, count_events
from gateway.tokens import estimate_input_tokens
from middleware.quota import plan
from middleware.quota.lane import Lane, lane_for
from middleware.quota.ledger import PostgresSpendLedger
from middleware.quota.plan import Estimate, Planned
from middleware.quota.store_memory import MemoryQuotaStore
from middleware.quota.store_redis import RedisQuotaStore

__all__ = ["MemoryQuotaStore", "PostgresSpendLedger", "QuotaMiddleware", "RedisQuotaStore"]

logger = logging.getLogger("sluicegate.quota")
alerts_logger = logging.getLogger("sluicegate.alerts")

_MAX_DOWNGRADES = 2
_TEMPLATES_MAX = 10_000  # remembered (principal, model) templates; starts over when full
_SERVED = object()  # what QuotaMiddleware._admit_in_lane gives for a request it served
# ctx.state[_admitted_key] while a call's admission awaits the store (`_mark_admitted`)
_ADMITTING = object()
_USAGE_KINDS = ("key", "project", "customer", "model", "global")  # whose spend (plan.subjects)
_SEED_ATTEMPTS = 3  # (see `_seed_and_admit`)
_NOTHING_RESERVED = Estimate(0, 0, 0)  # (with no store there is no settle; `again` overwrites it)
# ctx.state's count of the calls the failover layer made to fallback models (its own key)
_FALLBACKS_CALLED = "failover.fallbacks"


class _StreamCutOff(Exception):
    """A stream crossed its budget and was ended in-band (the quota layer catches it)."""


class QuotaMiddleware:
    """Rate limits and budgets (see the module docstring).

    `store`: "memory" (one process), a `redis://` URL, or a QuotaStore. `limits`: the
    gateway-wide Limits; `model_limits`: per public model. `default_max_output_tokens` is the
    output reserved for requests that set no max_tokens (a legacy completion reserves its
    API's own default, 16). `ledger`: a SpendLedger (e.g.
    `PostgresSpendLedger(dsn)`, or its PostgreSQL DSN) that records spend and rebuilds budget
    counters after a Redis flush. `alert_webhook_url`: where 50/80/100% budget alerts are POSTed.
    `admin_token_env`: serves `GET /admin/usage/{kind}/{subject}` (current spend).
    `lease_s`: how long a request holds its concurrency lease and its budget reservations
    when their release never comes (its gateway died mid-request): longer than any call.
    """

    # (ClassVar: compiled, a native class's plain attribute is its instances', and the
    # kernel reads these on the class)
    passes_json_through: ClassVar[bool] = True  # a JSON answer from below goes on as is
    acts_per_caller: ClassVar[bool] = True  # admits by the caller before calling below

    def __init__(
        self,
        app: ASGIApp,
        *,
        store: QuotaStore | str = "memory",
        limits: Limits | None = None,
        model_limits: Mapping[str, Limits] | None = None,
        default_max_output_tokens: int = 4096,
        ledger: SpendLedger | str | None = None,
        alert_webhook_url: str | None = None,
        admin_token_env: str | None = None,
        store_retry_s: float = 1.0,
        lease_s: float = 900.0,
    ) -> None:
        self.app = app
        self.store = _make_store(store)
        self.fallback = MemoryQuotaStore()
        self.limits = limits
        self.model_limits = dict(model_limits or {})
        for name, value in [("limits", limits), *self.model_limits.items()]:
            if value is not None and not isinstance(value, Limits):
                raise ConfigError(f"QuotaMiddleware {name} must be Limits(...), not {value!r}.")
        if default_max_output_tokens <= 0:
            raise ConfigError("QuotaMiddleware default_max_output_tokens must be positive.")
        self.default_max_output_tokens = default_max_output_tokens
        self.ledger = _make_ledger(ledger)
        self.alert_webhook_url = alert_webhook_url
        if alert_webhook_url is not None and not alert_webhook_url.startswith(("http://",
                                                                             "https://")):
            raise ConfigError("QuotaMiddleware alert_webhook_url must be an http(s) URL.")
        self.admin_token = (admin_token_from_env(admin_token_env, "QuotaMiddleware")
                            if admin_token_env is not None else None)
        if not 0 < store_retry_s < math.inf or not 0 < lease_s < math.inf:
            raise ConfigError("QuotaMiddleware store_retry_s and lease_s must be positive, "
                              "finite numbers of seconds.")
        self.store_retry_s = store_retry_s
        self.lease_s = lease_s
        self._store_down_until = 0.0
        # Through an outage of the store: hands the fallback's budget spend to the store once
        # it answers again, then lets admissions go back to it (`_hand_over_when_back`).
        self._recovering: asyncio.Task[None] | None = None
        self._alerted: set[str] = set()
        # budget key -> (its store, the budget, the highest alert threshold a settle's
        # estimate reached that its spend had not yet, when (monotonic)): judged again at
        # the settle of a request here that was running then, and at each lease renewal
        # (`_send_alerts`)
        self._pending_alerts: dict[str, tuple[QuotaStore, Planned, int, float]] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._settles: dict[QuotaStore, list[tuple[str, list[Check], list[int]]]] = {}
        # Admissions through a Lane (middleware/quota/lane.py): with the Redis store only.
        self._redis = self.store if type(self.store) is RedisQuotaStore else None
        self._lane_settles: list[tuple[Lane, str, Estimate, int, int]] = []
        # The requests admitted in Redis against budgets and not settled yet: id -> (the
        # budget counters, the amount reserved in each). A counter Redis lost, seeded again
        # here, holds them again (`_seed_and_admit`): their settles replace them exactly.
        self._in_flight: dict[str, tuple[tuple[str, ...], int]] = {}
        # ctx.state[self._admitted_key]: this layer admitted the request (`_call_again`); its
        # _Responder, or None when `send` is not wrapped. A key of this instance's own: two
        # quota layers in one stack each admit the request.
        self._admitted_key = f"quota.admitted.{id(self)}"
        # ctx.state[self._waiting_key]: the future a concurrent call for a request whose
        # admission is under way waits on (`_call_again`).
        self._waiting_key = f"quota.waiting.{id(self)}"
        # ctx.state[self._lease_key]: the id the stores know this request's reservation by,
        # once an admit to the store failed (`_lease`). Not `ctx.unique_id`, which the ledger
        # and the response know the request by.
        self._lease_key = f"quota.lease.{id(self)}"
        # ctx.state[f"{self._lease_key}>{model}"]: the id of the request's reservation
        # against fallback `model`'s own limits (`admit_fallback`), and in
        # ctx.state[self._gated_key], model -> (its store, its checks).
        self._gated_key = f"quota.gated.{id(self)}"
        self._settle_scheduled = False
        # Concurrency leases an admit may have taken though its reply never came (a timeout:
        # the script may have run), released once the store answers again (`_unsure_admit`).
        self._unsure: list[tuple[str, list[Check], list[int], float]] = []
        self._releasing: asyncio.Task[None] | None = None
        # The concurrency leases and budget reservations of this process's requests still
        # running, renewed every lease_s / 3 while they run (`_renew_leases`): lease id ->
        # (its store, its checks),
        # admitted since the last renewal, and before it (renewed at the next one).
        self._leases_new: dict[str, tuple[QuotaStore, Sequence[Check]]] = {}
        self._leases_old: dict[str, tuple[QuotaStore, Sequence[Check]]] = {}
        self._renewing: asyncio.Task[None] | None = None
        self._http: Any = None
        # (id(principal), model) -> (principal, UTC day, its template or None)
        self._templates: dict[tuple[int, str], tuple[
            Principal, int, tuple[list[tuple[Any, ...]], dict[Any, Any]] | None]] = {}
        # model -> the other models a failover layer's route may send a request for it to
        # (only models with some; learnt by `learn_routes`): a request reserves at the
        # dearest of them that the caller's key may use.
        self._fallbacks: dict[str, tuple[str, ...]] = {}
        # model -> the output bound of its requests without a cap, where one of its
        # deployments (or its fallbacks') sends a larger cap of its own (`_learn_defaults`)
        self._output_defaults: dict[str, int] = {}
        # model -> (chat_output_cap, upstream model) of its deployments (and its fallbacks')
        # whose adapter sends a cap that depends on the request (`_output_default`)
        self._chat_caps: dict[str, tuple[tuple[Any, str], ...]] = {}

    def check_config(self, config: GatewayConfig) -> None:
        """Learns the routes of a failover layer listed below this one (found by walking
        `.app`, as the kernel does). One listed above learns it of this layer in its own
        `check_config`, which the kernel calls first (outermost first)."""
        for component in stack_components(self.app):
            if callable(getattr(component, "models_serving", None)):
                self.learn_routes(component, config)
        self._learn_defaults(config)
        unknown = [name for name in self.model_limits if name not in config.models]
        if unknown:
            raise ConfigError(f"{config.path}: QuotaMiddleware model_limits names "
                              f"{', '.join(map(repr, unknown))}, not a model in `models`.")
        for name, limits in [("limits", self.limits),
                             *((f"model_limits[{m!r}]", v) for m, v in self.model_limits.items())]:
            for target in downgrade_targets(limits) if limits is not None else ():
                if target not in config.models:
                    raise ConfigError(f"{config.path}: QuotaMiddleware {name} downgrades to "
                                      f"{target!r}, not a model in `models`.")

    def _learn_defaults(self, config: GatewayConfig) -> None:
        """Where a deployment that may serve a model sends a cap of its own to a request
        without one, larger than `default_max_output_tokens` (the Anthropic adapter's
        `default_max_tokens`: Anthropic requires a cap), that cap is the bound of the model's
        requests without one: it is what the call may generate."""
        sent: dict[str, int] = {}
        chat_caps: dict[str, list[tuple[Any, str]]] = {}
        for name, model in config.models.items():
            adapters = [(config.providers.get(deployment.provider), deployment.model)
                        for deployment in model.deployments]
            caps = [getattr(adapter, "default_max_tokens", None) for adapter, _ in adapters]
            sent[name] = max((cap for cap in caps if type(cap) is int), default=0)
            offered = [(getattr(adapter, "chat_output_cap", None), upstream)
                       for adapter, upstream in adapters]
            chat_caps[name] = [(cap_of, upstream) for cap_of, upstream in offered
                               if callable(cap_of)]
        self._output_defaults = {}
        self._chat_caps = {}
        for name in config.models:
            widest = max(sent.get(other, 0) for other in (name, *self._fallbacks.get(name, ())))
            if widest > self.default_max_output_tokens:
                self._output_defaults[name] = widest
            found = [cap for other in (name, *self._fallbacks.get(name, ()))
                     for cap in chat_caps.get(other, ())]
            if found:
                self._chat_caps[name] = tuple(found)

    def _output_default(self, ctx: RequestContext) -> int:
        """The output bound of a request that sets no cap of its own (`plan.output_bound`):
        `_output_defaults`', or, for a chat request that asks for thinking
        (`reasoning_effort`, `thinking`), the largest cap a deployment that may serve it
        sends with it (`chat_output_cap`: the Anthropic adapter makes room for a thinking
        budget on top of its default, up to 16k tokens more: reserved at the default alone,
        a budget was overspent several times by concurrent thinking requests)."""
        default = self._output_defaults.get(ctx.model, self.default_max_output_tokens)
        caps = self._chat_caps.get(ctx.model)
        if caps is not None and ctx.operation == OPENAI_CHAT:
            body = ctx.body
            if "reasoning_effort" in body or "thinking" in body:
                for cap_of, upstream_model in caps:
                    cap = cap_of(body, upstream_model)
                    if type(cap) is int and cap > default:
                        default = cap
        return default

    def learn_routes(self, router: Any, config: GatewayConfig) -> None:
        """Notes the models `router` (a layer with `models_serving(model)`: the failover
        layer) may serve a request for each configured model with, so that the request is
        reserved, and a stream cut off, at the dearest of them, not at the price of the
        model asked for only: a fallback to a pricier model is billed at its price, and
        concurrent requests near a cap would each overshoot it by the difference."""
        for model in config.models:
            known = self._fallbacks.get(model, ())
            others = tuple(name for name in router.models_serving(model)
                           if name != model and name not in known)
            if others:
                self._fallbacks[model] = (*known, *others)
        self._learn_defaults(config)
        add_gate = getattr(router, "add_gate", None)
        if callable(add_gate) and any(name in self.model_limits
                                      for names in self._fallbacks.values() for name in names):
            add_gate(self.admit_fallback)  # (a fallback with limits of its own: checked)

    def check_workers(self, workers: int) -> None:
        """Refuses to serve with several worker processes (`sluicegate serve --workers N`)
        on the in-process store: each worker would keep its own counters, and admit a whole
        budget and every rate limit, N times the limits in all."""
        if workers > 1 and isinstance(self.store, MemoryQuotaStore):
            raise ConfigError(
                f"QuotaMiddleware store='memory' keeps limits and budgets in one process: with "
                f"--workers {workers}, each worker would admit a whole budget and rate limit "
                f"({workers} times the limits in all). Share them through Redis (store="
                f"'redis://...'; in the default config, set SLUICEGATE_REDIS_URL), or serve "
                f"with --workers 1.")

    # -- lifecycle ---------------------------------------------------------------------------

    async def startup(self) -> None:
        try:
            await self.fallback.startup()
            await self.store.startup()
            if isinstance(self.store, RedisQuotaStore):
                self.store.on_unsettled = self._unsure_settles
            if isinstance(self.ledger, PostgresSpendLedger):
                await self.ledger.startup()
            self._renewing = asyncio.ensure_future(self._renew_leases())
            self._renewing.add_done_callback(_log_failure)
            if self.alert_webhook_url is not None:
                import aiohttp  # only when alerts go to a webhook
                self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        except BaseException:  # (what started is closed: the kernel stops started layers only)
            await stop_after_failed_start(self)
            raise

    async def shutdown(self) -> None:
        if self._settles or self._lane_settles:
            self._flush_settles()
        if self._releasing is not None:  # (its leases lapse after lease_s by themselves)
            self._releasing.cancel()
        if self._renewing is not None:
            self._renewing.cancel()
        if self._recovering is not None:  # (the ledger has what the fallback spent)
            self._recovering.cancel()
        if self._background:
            await asyncio.wait(list(self._background), timeout=10)
        if self._http is not None:
            await self._http.close()
        if isinstance(self.ledger, PostgresSpendLedger):
            await self.ledger.shutdown()
        await self.store.shutdown()
        await self.fallback.shutdown()

    async def check_ready(self) -> dict[str, str]:
        checks: dict[str, str] = {}
        ping = getattr(self.store, "ping", None)
        if ping is not None:
            checks["quota_store"] = ("ok" if await ping() else
                                     "degraded: unavailable; limits follow on_store_error")
        if isinstance(self.ledger, PostgresSpendLedger):
            checks.update(degraded(await self.ledger.check_ready(), "rebuilds wait for it"))
        return checks

    # -- requests ----------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ctx: RequestContext | None = scope.get(CONTEXT_KEY)  # (`find_request_context`)
        if ctx is None:
            if self.admin_token is not None and route_path(scope).startswith("/admin/usage/"):
                await self._serve_usage(scope, send)
            else:
                await self.app(scope, receive, send)
            return
        if ctx.operation == ANTHROPIC_COUNT_TOKENS:
            # A token count generates nothing and costs nothing (Anthropic limits it apart
            # from messages): no limit of the caller's counts it.
            await self.app(scope, receive, send)
            return
        state = ctx.state
        if self._admitted_key in state:  # the same request again: see `_call_again`
            await self._call_again(scope, receive, send, ctx)
            return
        state[self._admitted_key] = _ADMITTING
        try:
            await self._admit_and_call(scope, receive, send, ctx)
        except BaseException as exc:
            if state.get(self._admitted_key) is _ADMITTING:  # (it ended before admitted)
                self._not_admitted(ctx, exc)
            raise

    async def _admit_and_call(self, scope: Scope, receive: Receive, send: Send,
                              ctx: RequestContext) -> None:
        asked = ctx.model
        handed: bytes | QuotaStoreError | None = None
        lane = self._lane(ctx, self._redis) if self._redis is not None else None
        if lane is not None:
            # The general path's admission, as one command made for the template (see
            # middleware/quota/lane.py); what is not an admission is handed to it.
            got = await self._admit_in_lane(scope, receive, send, ctx, lane)
            if got is _SERVED:
                return
            handed = got  # (compiled, an assignment to `handed` checks its type: not _SERVED)
        try:
            store, planned, checks, decision, est, headers = await self._admit(ctx, handed, lane)
        except GatewayError:
            if self._gated_key in ctx.state:  # (asked first: below the failover layer)
                await self._give_back_fallbacks(ctx)
            raise
        if headers:  # the kernel puts them on the response start, or on the error it renders
            ctx.response_headers += headers
        responder = None  # (`send` is not wrapped when nothing is to be cut off)
        if store is not None:  # (None: nothing applies, no reservation, nothing to settle)
            ctx.at_end(partial(self._settle, store, planned, checks, decision))
            lease = self._lease(ctx)
            self._leases_new[lease] = (store, checks)
            if store is self._redis:
                budget_keys = tuple([checks[i].key for i in plan.budget_indexes(planned)])
                if budget_keys:
                    self._in_flight[lease] = (budget_keys, est.cost_micros)
            cutoff = plan.budget_indexes(planned, cutoff=True) if ctx.stream else ()
            if cutoff:
                responder = _Responder(ctx, send, est, partial(
                    self._top_up, store, lease, [checks[i] for i in cutoff],
                    est.cost_micros))
        if ctx.model != asked and ctx.reroutable:
            # Downgraded under a layer that routes every call (a failover layer): it routes
            # this one, and every later one, for the cheaper model. Admitted, nothing sent.
            rerouted = Rerouted(ctx.model)
            self._mark_admitted(ctx, responder, rerouted)
            if self._gated_key in ctx.state:  # (asked first: below the failover layer)
                await self._give_back_fallbacks(ctx)
            raise rerouted
        self._mark_admitted(ctx, responder)
        if responder is None:
            await self.app(scope, receive, send)
            return
        try:
            await self.app(scope, receive, responder.send)
        except _StreamCutOff:
            await responder.end_in_band()

    async def _call_again(self, scope: Scope, receive: Receive, send: Send,
                          ctx: RequestContext) -> None:
        """Calls the layers below again for a request this layer has admitted: a layer above
        it makes another attempt (a failover layer listed above this one: a retry, a
        fallback, a broken stream's continuation). The caller sent one request, so nothing
        is admitted again (a caller's RPM counts its requests, not the gateway's attempts)
        and nothing is settled here: the one admission holds until the request has ended,
        then settles to what the request is billed, every attempt in it. A stream_cutoff
        budget goes on counting the stream's events, and ends a continuation that has no room
        left in it without calling below (`_Responder.no_room_to_continue`)."""
        earlier: Any = ctx.state[self._admitted_key]
        if earlier is _ADMITTING:  # (a call made while the first one's admission is under way)
            waiter = ctx.state.get(self._waiting_key)
            if waiter is None:
                waiter = ctx.state[self._waiting_key] = \
                    asyncio.get_running_loop().create_future()
                waiter.add_done_callback(_retrieved)  # (its waiter may have gone: cancelled)
            await asyncio.shield(waiter)  # (raises what refused or rerouted the first call)
            if self._admitted_key not in ctx.state:  # the first call ended before admitted
                await self(scope, receive, send)
                return
            earlier = ctx.state[self._admitted_key]
        if earlier is None:
            await self.app(scope, receive, send)
            return
        responder = ctx.state[self._admitted_key] = earlier.again(send, ctx)
        if await responder.no_room_to_continue():
            await responder.end_in_band()
            return
        try:
            await self.app(scope, receive, responder.send)
        except _StreamCutOff:
            await responder.end_in_band()

    async def _admit_in_lane(self, scope: Scope, receive: Receive, send: Send,
                             ctx: RequestContext, lane: Lane) -> Any:
        """Admits through `lane` and serves the request (then `_SERVED`), or gives what the
        general path has to take over with: the store's reply, its failure, or None (ask
        again: Redis lost the script, or is not connected)."""
        redis = self._redis
        client = redis.direct_client() if redis is not None else None
        if redis is None or client is None:
            return None
        est = plan.estimate(ctx, self._output_default(ctx), self._fallbacks.get(ctx.model, ()))
        lease = self._lease(ctx)
        try:
            reply = await client.call_encoded(lane.admit_payload(
                redis.argv_prefix(lease), est.input_tokens + est.output_tokens,
                est.cost_micros))
        except RespError as exc:  # NOSCRIPT: nothing ran; the general path sends it whole
            return None if str(exc).startswith("NOSCRIPT") else \
                QuotaStoreError(f"Redis quota store: {exc}")
        except (OSError, ValueError) as failed:  # never re-sent: it may have run
            # (named apart from `exc`: compiled, one name holds one type)
            return QuotaStoreError(f"Redis quota store: {failed}")
        values = _admitted(reply, lane, ctx)
        if values is None:
            return reply
        if lane.budget_keys:
            self._in_flight[lease] = (lane.budget_keys, est.cost_micros)
        if lane.leases:
            self._leases_new[lease] = (redis, lane.leases)
        settle = partial(self._settle_in_lane, lane, est, values)
        if ctx.on_end is None:  # (RequestContext.at_end, inline: an interpreted call)
            ctx.on_end = [settle]
        else:
            ctx.on_end.append(settle)
        if not ctx.stream or not lane.cutoff:  # nothing to cut off: `send` is not wrapped
            self._mark_admitted(ctx, None)
            await self.app(scope, receive, send)
            return _SERVED
        responder = _Responder(ctx, send, est, partial(self._top_up_in_lane, lane, est, lease))
        self._mark_admitted(ctx, responder)
        try:
            await self.app(scope, receive, responder.send)
        except _StreamCutOff:
            await responder.end_in_band()
        return _SERVED

    def _mark_admitted(self, ctx: RequestContext, responder: _Responder | None,
                       rerouted: Rerouted | None = None) -> None:
        """Marks the request admitted: `responder` wraps its `send` (None: not wrapped). A
        layer above that calls below concurrently (a failover layer's hedge) may have sent
        another call for it meanwhile, which waits (`_call_again`) and goes on now, as a
        call again of an admitted request (or goes where `rerouted` sends the request)."""
        state = ctx.state
        state[self._admitted_key] = responder
        if self._waiting_key in state:
            waiter: asyncio.Future[None] = state.pop(self._waiting_key)
            if not waiter.done():
                if rerouted is not None:
                    waiter.set_exception(rerouted)
                else:
                    waiter.set_result(None)

    def _not_admitted(self, ctx: RequestContext, error: BaseException) -> None:
        """The call admitting the request ended before it was admitted: a call waiting for
        that admission gets the same refusal, or (the call was cancelled, or failed below this
        layer's refusals) admits the request itself."""
        state = ctx.state
        del state[self._admitted_key]
        waiter: asyncio.Future[None] | None = state.pop(self._waiting_key, None)
        if waiter is not None and not waiter.done():
            if isinstance(error, GatewayError):
                waiter.set_exception(error)
            else:
                waiter.set_result(None)

    def _lane(self, ctx: RequestContext, redis: RedisQuotaStore) -> Lane | None:
        """The Lane for this caller and model in the Redis store, when one may admit now."""
        if time.monotonic() < self._store_down_until:
            return None
        template = self._template(ctx.principal or ANONYMOUS, ctx.model)
        return lane_for(redis, template) if template is not None else None

    # -- admission ---------------------------------------------------------------------------

    async def _admit(self, ctx: RequestContext,
                     handed: bytes | QuotaStoreError | None = None,
                     lane: Lane | None = None) -> tuple[
            QuotaStore | None, list[Planned], list[Check], Decision, Estimate,
            list[tuple[bytes, bytes]]]:
        """Reserves against every limit that applies; routes to a cheaper model where a limit
        says so. A rate limit that sent a request elsewhere does not count that request
        (`downgrade` means "beyond this limit, use the cheaper model"); a budget still has
        to fit the cheaper model's cost. `handed`: what `lane`'s admission got instead of an
        admission (the store's reply, or its failure), taken as the first answer when the
        template is still the Lane's (a new UTC day makes a new one: then ask again)."""
        principal = ctx.principal or ANONYMOUS
        downgraded: list[str] = []
        overflowed: dict[str, tuple[Planned, float]] = {}  # key -> (its limit, its reset_s)
        visited = {ctx.model}
        for _ in range(_MAX_DOWNGRADES + 1):
            template = self._template(principal, ctx.model)
            if template is None and not downgraded:  # no limit applies: nothing to estimate
                return None, [], [], Decision(allowed=True), _NOTHING_RESERVED, []
            est = plan.estimate(ctx, self._output_default(ctx),
                                self._fallbacks.get(ctx.model, ()))
            planned: list[Planned]
            checks: list[Check]
            planned, checks = ([], []) if template is None else plan.planned_from(template, est)
            if overflowed:  # (then no longer a whole template: plain lists, no memo)
                kept = [i for i, check in enumerate(checks) if check.key not in overflowed]
                planned, checks = [planned[i] for i in kept], [checks[i] for i in kept]
            notice = ([(b"x-sluicegate-downgraded", "; ".join(downgraded).encode())]
                      if downgraded else [])
            if not planned:  # (every limit left overflowed: nothing to reserve)
                headers = plan.downgraded_headers([], Decision(allowed=True),
                                                  list(overflowed.values())) if overflowed else []
                return None, [], [], Decision(allowed=True), est, headers + notice
            if isinstance(handed, bytes) and (lane is None or planned is not lane.planned):
                handed = None  # (a reply that admitted nothing: nothing to undo)
            store, decision = await self._reserve(ctx, planned, checks, handed)
            handed = None
            if decision.allowed:
                headers = plan.rate_limit_headers(planned, decision) if not overflowed else \
                    plan.downgraded_headers(planned, decision, list(overflowed.values()))
                return store, planned, checks, decision, est, headers + notice
            assert decision.failed is not None
            item = replace(planned[decision.failed], check=checks[decision.failed])
            target = plan.overflow_target(item)
            # (a target already tried is a cycle, A -> B -> A: back on A with its overflowed
            # limits left out, it would be admitted with nothing checked)
            if target is None or target == ctx.model or ctx.models is None \
                    or target not in ctx.models or not principal.allows_model(target) \
                    or target in visited:
                if item.check.kind == BUDGET:
                    self._alert_refusing(store, item)
                raise refused(ctx, item, decision)  # (no way round the limit for this caller)
            downgraded.append(f"{ctx.model} -> {target} ({plan.overflow_reason(item)})")
            if item.check.kind != BUDGET:
                overflowed[item.check.key] = (item, plan.overflow_reset_s(item.check, decision))
            visited.add(target)
            if self._gated_key in ctx.state:  # (asked first: below the failover layer)
                await self._give_back_fallbacks(ctx)
            route_to(ctx, target)
        raise refused(ctx, item, decision)

    def _template(self, principal: Principal, model: str
                  ) -> tuple[list[tuple[Any, ...]], dict[Any, Any]] | None:
        """The compiled limits that apply to this caller and model today (None: none do).
        Remembered per Principal object (the auth layer makes one per key, customer and
        limits) and model: finding the subjects and their template cost more than using it."""
        day = int(time.time() // 86_400)  # the UTC day: templates hold the day's periods
        found = self._templates.get((id(principal), model))
        if found is not None and found[0] is principal and found[1] == day:
            return found[2]
        applicable = plan.subjects(principal, model, self.model_limits, self.limits)
        template = plan.template(applicable, datetime.now(UTC), self.lease_s) \
            if applicable else None
        if len(self._templates) >= _TEMPLATES_MAX:
            self._templates.clear()
        self._templates[(id(principal), model)] = (principal, day, template)
        return template

    async def admit_fallback(self, ctx: RequestContext, model: str) -> None:
        """The failover layer's gate (`FailoverMiddleware.add_gate`), before it calls
        fallback `model` for a request: reserves the request against that model's own limits
        (`model_limits`), at its price, once per request and model, settled when the request
        ends (to what it cost when that model answered it, else to nothing but the request).
        The caller's limits and the gateway-wide ones hold the request's one admission
        already, priced at the dearest model that may serve it. Raises the refusal when the
        model's limits do not admit the request: the failover layer goes on without the
        model (a downgrade they ask for is a refusal here: the route is the way round).
        Listed below the failover layer, this layer may be asked before it admitted the
        request itself (its first call goes to a fallback): what is reserved here is given
        back if that admission then refuses the request or sends it to another model
        (`_give_back_fallbacks`)."""
        limits = self.model_limits.get(model)
        if limits is None or limits.empty or ctx.operation == ANTHROPIC_COUNT_TOKENS \
                or model == ctx.model:  # (the request's own model: its admission holds it)
            return
        slot = f"{self._lease_key}>{model}"
        state = ctx.state
        if slot in state:
            return  # admitted for this request already
        state[slot] = f"{self._lease(ctx)}>{model}"
        template = plan.template([("model", model, limits)], datetime.now(UTC), self.lease_s)
        est = plan.estimate_at(ctx, model, plan.estimate(
            ctx, self._output_default(ctx), self._fallbacks.get(ctx.model, ())))
        planned, checks = plan.planned_from(template, est)
        try:
            store, decision = await self._reserve(ctx, planned, checks, model=model)
        except BaseException:
            del state[slot]
            raise
        if not decision.allowed:
            del state[slot]
            assert decision.failed is not None
            item = replace(planned[decision.failed], check=checks[decision.failed])
            if item.check.kind == BUDGET:
                self._alert_refusing(store, item)
            # (noted as the request's refusal: the failover layer keeps the note only if
            # this refusal is its answer)
            raise refused(ctx, item, decision)
        lease = self._lease(ctx, model)
        self._leases_new[lease] = (store, checks)
        budget_keys = tuple([checks[i].key for i in plan.budget_indexes(planned)])
        if budget_keys and store is self._redis:
            self._in_flight[lease] = (budget_keys, est.cost_micros)
        gated: dict[str, tuple[QuotaStore, list[Check]]] | None = state.get(self._gated_key)
        if gated is None:
            gated = state[self._gated_key] = {}
        gated[model] = (store, checks)
        ctx.at_end(partial(self._settle_fallback, model, store, planned, checks, decision))

    async def _give_back_fallbacks(self, ctx: RequestContext) -> None:
        """Gives back in full what `admit_fallback` reserved for a request this layer then
        refuses or sends to another model (it was asked first, below the failover layer): no
        call went to those models. Awaited, before a downgrade's admission, which may need
        the very room given back. Their settles at the request's end find nothing left."""
        for model, (store, checks) in ctx.state.pop(self._gated_key).items():
            lease = ctx.state.pop(f"{self._lease_key}>{model}")
            self._in_flight.pop(lease, None)
            if self._leases_new.pop(lease, None) is None:
                self._leases_old.pop(lease, None)
            try:
                await store.settle(lease, checks, [0] * len(checks))
            except QuotaStoreError as exc:
                logger.warning("could not give back a fallback's reservation (%s)", exc)
                self._unsure_admit(lease, checks)

    def _settle_fallback(self, model: str, store: QuotaStore, planned: list[Planned],
                         checks: list[Check], decision: Decision, ctx: RequestContext) -> None:
        """`_settle` of a request's reservation against fallback `model`'s limits; its
        spend, when that model answered, goes to the spend ledger under the reservation's
        id (`_charge` leaves it out)."""
        lease: str | None = ctx.state.get(f"{self._lease_key}>{model}")
        if lease is None:
            return  # given back (`_give_back_fallbacks`)
        tokens, cost, served = self._charge(ctx, lease, record=False)
        if served != model:
            tokens = cost = 0
        elif cost and isinstance(self.ledger, PostgresSpendLedger):
            self.ledger.record(lease, [("model", model, cost)], ctx.started_at)
        self._queue_settle(store, lease, planned, checks, decision,
                           plan.actual_amounts(checks, tokens, cost), cost,
                           ctx.started_monotonic)

    def _served_model(self, ctx: RequestContext) -> str:
        """The public model whose deployment answered a request the failover layer called a
        fallback for (`failover.fallbacks`, its count: `_charge` asks only then): the one
        asked for, or the fallback that answered."""
        deployment, models = ctx.served_deployment, ctx.models or {}
        for name in (ctx.model, *self._fallbacks.get(ctx.model, ())):
            declared = models.get(name)
            if declared is not None and any(d is deployment for d in declared.deployments):
                return name
        return ctx.model

    def _lease(self, ctx: RequestContext, model: str | None = None) -> str:
        """What the stores know a request's reservation by (its leases, its settle): an id no
        other request shares, not the caller's request id, which one caller may send with any
        number of requests at once (each would replace the other's concurrency lease). Its
        own key in `ctx.state` once an admit failed (`_reserve`), shared by the copies of a
        hedged call as the admission is; else the request's unique id. With `model`: the
        reservation against that fallback's own limits (`admit_fallback`)."""
        if model is not None:
            found: str = ctx.state[f"{self._lease_key}>{model}"]
            return found
        lease: str | None = ctx.state.get(self._lease_key)
        if lease is not None:
            return lease
        return ctx.unique_id or ctx.request_id  # (contexts made outside the kernel: theirs)

    async def _reserve(self, ctx: RequestContext, planned: list[Planned],
                       checks: list[Check], handed: bytes | QuotaStoreError | None = None,
                       model: str | None = None) -> tuple[QuotaStore, Decision]:
        """Admits `checks` in the store, or (it is unavailable) as each one's on_store_error
        says. `model`: the reservation against that fallback's limits (`admit_fallback`)."""
        if time.monotonic() >= self._store_down_until or handed is not None:
            store = self.store
            try:
                # store.admit awaited here, not through _admit_seeded: every await below is
                # resumed through each frame above it, so the common path keeps to one.
                if handed is None:
                    decision = await store.admit(self._lease(ctx, model), checks)
                elif isinstance(handed, QuotaStoreError):
                    raise handed
                else:  # a Lane's reply for these checks (the same template, in order)
                    decision = RedisQuotaStore.decision(handed)
                if decision.unseeded:
                    decision = await self._seed_and_admit(store, ctx, planned, checks, decision,
                                                          model)
                return store, decision
            except QuotaStoreError as exc:
                if self._recovering is None or self._recovering.done():
                    # An outage begins (the store answered since the last one, and took
                    # what the fallback spent then): what the fallback counted of the
                    # budgets is stale by what went through the store since, so the next
                    # admission that needs them seeds them again from the ledger.
                    if self.ledger is not None:
                        self.fallback.forget_budgets()
                    self._recovering = self._spawn(self._hand_over_when_back())
                # Not asked again until the fallback's spend is handed over to it: an
                # admission there before that would not count it.
                self._store_down_until = math.inf
                logger.warning("quota store unavailable (%s); following each limit's "
                               "on_store_error policy", exc)
                lease = self._lease(ctx, model)
                self._unsure_admit(lease, checks)
                # (admitted again later, by Redis, under an id its release cannot remove)
                ctx.state[self._lease_key if model is None
                          else f"{self._lease_key}>{model}"] = lease + ".r"
        closed = [c for c in checks if c.on_store_error == "closed"]
        if closed:
            ctx.state["quota.refused"] = "store_unavailable"
            raise GatewayError(503, f"Limits cannot be checked right now (the quota store is "
                                    f"unavailable), and the {closed[0].label} fails closed.",
                               code="quota_store_unavailable",
                               headers=[(b"retry-after", b"1")])
        try:
            return self.fallback, await self._admit_seeded(self.fallback, ctx, planned, checks,
                                                           model)
        except QuotaStoreError:  # (the ledger is unavailable too: what was spent is unknown)
            ctx.state["quota.refused"] = "store_unavailable"
            raise GatewayError(503, "Limits cannot be checked right now (the quota store and "
                                    "the spend ledger are unavailable).",
                               code="quota_store_unavailable",
                               headers=[(b"retry-after", b"1")]) from None

    async def _hand_over_when_back(self) -> None:
        """Asks the store every `store_retry_s`, through an outage, until it takes what the
        fallback's budget counters took meanwhile (`_hand_over`); then admissions go back to
        the store. Without this, a budget the fallback spent in would be counted in Redis
        without that spend, and admit past its cap."""
        while True:
            await asyncio.sleep(self.store_retry_s)
            if await self._hand_over():
                break
        self._store_down_until = 0.0
        logger.info("quota store available again")

    async def _hand_over(self) -> bool:
        """Adds to the store's budget counters what the fallback's took since they were
        seeded or last handed over (its requests' spend, and the reservations of those still
        running, whose settles there are handed over after them): one store call. A counter
        the store does not have is seeded from the ledger, which has that spend: only the
        reservations are kept for it. True when the store answered."""
        spent = self.fallback.take_spend_to_hand_over()
        add = getattr(self.store, "add_committed", None)
        try:
            if spent and add is not None:
                added = await add([check for check, _ in spent])
            else:  # (nothing to hand over: a ping says whether the store answers)
                ping = getattr(self.store, "ping", None)
                return ping is None or bool(await ping())
        except QuotaStoreError:
            for check, held in spent:
                self.fallback.owe(check.key, check.expires_at, check.amount, held)
            return False
        for (check, held), counted in zip(spent, added, strict=True):
            if not counted:
                self.fallback.owe(check.key, check.expires_at, held, held)
        if spent:
            logger.info("quota: handed %d budget counter(s) of the in-process fallback over "
                        "to the store", len(spent))
        return True

    def _unsure_settles(self, batch: Sequence[tuple[str, Sequence[Check], Sequence[int]]]
                        ) -> None:
        """Settles that failed, perhaps after they ran (Redis went away, or answered late,
        as the request ended): sent again once the store answers (`_release_unsure`), as
        settles of what is still held only (`RedisQuotaStore.resettle`): a budget
        reservation still in its counter becomes what the request cost, so the counter is
        exact again within seconds of the store's return, not when the reservation lapses
        (`lease_s`, then missing the cost until a rebuild); a concurrency lease is released.
        What a settle that did run changed is not changed twice. A rate limit keeps what
        the request reserved (its bucket refills)."""
        for lease, checks, actual in batch:
            self._unsure_admit(lease, checks, actual)

    def _unsure_admit(self, lease: str, checks: Sequence[Check],
                      actual: Sequence[int] | None = None) -> None:
        """An admit to the store failed, perhaps after it ran (its reply timed out): the
        request is served by the fallback or refused, and never settled in the store. Its
        concurrency leases would stand for `lease_s` (15 minutes by default) and shut out a
        small max_concurrent meanwhile, and its budget reservations would hold room no
        request spends until they lapse, so both are settled once the store answers again,
        as `_unsure_settles` does (what the request spends, the fallback's counters hand to
        the store: here it is 0). A store without `resettle` gets the release of the leases
        alone (removing a lease that is not there changes nothing). (`actual`: a failed
        settle's amounts; None for an admit.)"""
        kinds = (CONCURRENT, BUDGET) if hasattr(self.store, "resettle") else (CONCURRENT,)
        kept = [i for i, check in enumerate(checks) if check.kind in kinds]
        if not kept:
            return
        if len(self._unsure) >= _UNSURE_MAX:  # (an outage long enough: drop the oldest)
            del self._unsure[:len(self._unsure) - _UNSURE_MAX + 1]
        self._unsure.append((
            lease, [checks[i] for i in kept],
            [checks[i].amount if checks[i].kind == CONCURRENT
             else (0 if actual is None else actual[i]) for i in kept],
            time.monotonic() + self.lease_s))
        if self._releasing is None or self._releasing.done():
            self._releasing = self._spawn(self._release_unsure())

    async def _release_unsure(self) -> None:
        """Sends the settles `_unsure_admit` keeps, every `store_retry_s` until the store
        takes them (one past its `lease_s` is not sent: a lease is gone by itself then, and
        a budget reservation may have been taken back)."""
        while self._unsure:
            await asyncio.sleep(self.store_retry_s)
            now = time.monotonic()
            batch = [(lease, checks, amounts)
                     for lease, checks, amounts, until in self._unsure if until > now]
            taken = len(self._unsure)
            resettle = getattr(self.store, "resettle", None)
            settle_many = getattr(self.store, "settle_many", None)
            try:
                if resettle is not None:
                    await resettle(batch)
                elif settle_many is not None:
                    await settle_many(batch)
                else:
                    for lease, checks, amounts in batch:
                        await self.store.settle(lease, checks, amounts)
            except Exception:  # noqa: BLE001 (down, or refusing us: again later)
                self._unsure = [item for item in self._unsure if item[3] > now]
                continue
            del self._unsure[:taken]  # (what came while this was sent waits for the next)
            logger.info("quota: settled again %d request(s) whose admit or settle replies "
                        "never came", len(batch))

    async def _renew_leases(self) -> None:
        """Every lease_s / 3, extends the concurrency leases and budget reservations of this
        process's requests that were running at the previous renewal too: each is held for
        lease_s from admission and lapses then, though its request (a long stream, a long
        reasoning call) still runs: more than max_concurrent would run at once, and a budget
        short of room would take the reservation back while its request spends it. One
        store call per store (batched); a request that ends within lease_s / 3 of its
        admission is never renewed. (A lease is renewed when between a third and two thirds
        of lease_s old.)"""
        while True:
            await asyncio.sleep(self.lease_s / 3)
            by_store: dict[QuotaStore, list[tuple[str, Sequence[Check]]]] = {}
            for lease, (store, checks) in self._leases_old.items():
                by_store.setdefault(store, []).append((lease, checks))
            self._leases_old.update(self._leases_new)
            self._leases_new = {}
            for store, leases in by_store.items():
                renew = getattr(store, "renew", None)
                if renew is None:
                    continue  # (a custom store without renewals: its leases lapse)
                try:
                    await renew(leases)
                except QuotaStoreError as exc:
                    logger.warning("could not renew what %d request(s) hold (%s); it lapses "
                                   "after lease_s unless the next renewal takes", len(leases),
                                   exc)
            if self._pending_alerts:
                self._judge_pending_alerts()

    async def _admit_seeded(self, store: QuotaStore, ctx: RequestContext,
                            planned: list[Planned], checks: list[Check],
                            model: str | None = None) -> Decision:
        decision = await store.admit(self._lease(ctx, model), checks)
        if not decision.unseeded:
            return decision
        return await self._seed_and_admit(store, ctx, planned, checks, decision, model)

    async def _seed_and_admit(self, store: QuotaStore, ctx: RequestContext,
                              planned: list[Planned], checks: list[Check],
                              decision: Decision, model: str | None = None) -> Decision:
        """Seeds the budget counters the store did not have, then asks again. A counter
        Redis lost (a flush, a restart) is seeded with what the ledger has, this process's
        requests in flight against it, whose reservations went with it, and the settles
        that found it lost (any gateway's) that the ledger does not have yet. When more of
        those came while the ledger was asked (it may have them too), it is not seeded, and
        they are read again (the last time, added unchecked: a few may count twice, none
        not at all)."""
        for attempt in range(_SEED_ATTEMPTS):
            checked = attempt < _SEED_ATTEMPTS - 1
            for index in decision.unseeded:  # a new period, or Redis lost its data
                check = checks[index]
                settles = list(await store.unseeded_settles(check))
                spent, counted = await self._spent(planned[index], settles)
                # (read as the seed is sent: the settle of a request it holds comes after it)
                held = self._held(check.key) if store is self._redis else None
                await store.seed(check, spent, held, settles if checked else None, counted)
            decision = await store.admit(self._lease(ctx, model), checks)
            if not decision.unseeded:
                return decision
        raise QuotaStoreError("budget counters vanished while being seeded")

    def _held(self, key: str) -> dict[str, int]:
        """The reservations of this process's requests in flight in the budget counter
        `key` (request id -> amount)."""
        return {lease: amount for lease, (keys, amount) in self._in_flight.items()
                if key in keys}

    async def _spent(self, item: Planned, request_ids: list[str]) -> tuple[int, set[str]]:
        """What the ledger has of the budget's subject this period, and which of
        `request_ids` it counts (with a ledger that cannot tell, none)."""
        if self.ledger is None or item.period_start is None:
            return 0, set()
        try:
            if isinstance(self.ledger, PostgresSpendLedger):
                return await self.ledger.spent_counting(item.subject_kind, item.subject_id,
                                                        item.period_start, request_ids)
            return await self.ledger.spent_micros(item.subject_kind, item.subject_id,
                                                  item.period_start), set()
        except Exception as exc:  # noqa: BLE001 (the ledger is PostgreSQL: any failure)
            raise QuotaStoreError(f"the spend ledger is unavailable: {type(exc).__name__}") \
                from None

    async def _top_up(self, store: QuotaStore, lease: str, cutoff: list[Check],
                      step: int) -> int:
        """More of the stream_cutoff budgets `cutoff` for a stream past what it holds of them
        (`_Responder`): its reservation again (at least a micro-dollar), or what is left, if
        less, added to what it holds in the store (its settle replaces it all with what it
        cost). What the store added; 0 when none is left, or the store cannot say (the
        stream ends: closed, as the money's default is)."""
        more = getattr(store, "top_up", None)
        if more is None:
            return 0
        try:
            added: int = await more(lease, [replace(check, amount=max(step, 1))
                                            for check in cutoff])
        except QuotaStoreError as exc:
            logger.warning("quota store unavailable (%s): a stream past its budget "
                           "reservation is ended", exc)
            return 0
        return added

    async def _top_up_in_lane(self, lane: Lane, est: Estimate, lease: str) -> int:
        """`_top_up` for a stream its Lane admitted."""
        checks = lane.checks(est)
        return await self._top_up(self.store, lease, [checks[i] for i in lane.cutoff],
                                  est.cost_micros)

    # -- after the response ------------------------------------------------------------------

    def _settle(self, store: QuotaStore, planned: list[Planned], checks: list[Check],
                decision: Decision, ctx: RequestContext) -> None:
        """Queues the replacement of the reservation by the actual usage, once the request
        has ended (`RequestContext.on_end`: after every call a layer above made below this
        one for it). Settles queued in one event-loop step go to the store together, after
        the responses went out."""
        lease = self._lease(ctx)
        tokens, cost, served = self._charge(ctx, lease)
        amounts = plan.actual_amounts(checks, tokens, cost)
        if served != ctx.model:
            plan.served_elsewhere(planned, amounts)
        self._queue_settle(store, lease, planned, checks, decision, amounts, cost,
                           ctx.started_monotonic)

    def _queue_settle(self, store: QuotaStore, lease: str, planned: list[Planned],
                      checks: list[Check], decision: Decision, amounts: list[int],
                      cost: int, started: float) -> None:
        """Queues the settle of reservation `lease` to `amounts` (sent by `_flush_settles`),
        forgets it among those in flight and those renewed, and alerts on the budget
        thresholds `cost` crossed."""
        if store is self._redis:
            self._in_flight.pop(lease, None)
        if self._leases_new.pop(lease, None) is None:
            self._leases_old.pop(lease, None)
        self._settles.setdefault(store, []).append((lease, checks, amounts))
        crossed = self._crossed_thresholds(planned, checks, decision, cost, started)
        if crossed:
            self._spawn(self._send_alerts(store, crossed))

    def _charge(self, ctx: RequestContext, lease: str, record: bool = True
                ) -> tuple[int, int, str]:
        """What the request actually used, (tokens, cost, the model that answered it:
        `_served_model`): what the usage ledger bills for it (`billed_usage`: cache hits and
        calls that never reached a model cost nothing, a stream cut short what it
        delivered), recorded in the spend ledger unless not `record` (the model's part
        against the model that answered), and a flush of the queued settles scheduled for
        the end of this event-loop step (the caller queues the request's)."""
        usage = billed_usage(ctx)
        cost = call_cost_micros(ctx, usage)
        if not self._settle_scheduled:
            self._settle_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_settles)
        served = ctx.model if not ctx.state.get(_FALLBACKS_CALLED) else self._served_model(ctx)
        if cost and record and isinstance(self.ledger, PostgresSpendLedger):
            # (by the id the stores know its settle by: see `_seed_and_admit`)
            self.ledger.record(lease, _spend_rows(ctx, cost, served == ctx.model),
                               ctx.started_at)
            if served != ctx.model and f"{self._lease_key}>{served}" not in ctx.state:
                # (a fallback without a reservation of its own: with one, its settle says it)
                self.ledger.record(f"{lease}>{served}", [("model", served, cost)],
                                   ctx.started_at)
        # (an upstream's usage is not checked: past AMOUNT_MAX, the stores would differ)
        # (Usage.total_tokens, inline: a property is an interpreted call)
        tokens = usage.input_tokens + usage.output_tokens if usage is not None else 0
        return (tokens if tokens < AMOUNT_MAX else AMOUNT_MAX,  # noqa: FURB136 (min is slower)
                cost if cost < AMOUNT_MAX else AMOUNT_MAX, served)  # noqa: FURB136

    def _settle_in_lane(self, lane: Lane, est: Estimate, values: list[Any],
                        ctx: RequestContext) -> None:
        """`_settle` for a request its Lane admitted."""
        lease = self._lease(ctx)
        tokens, cost, served = self._charge(ctx, lease)
        if lane.budget_keys:
            self._in_flight.pop(lease, None)
        if lane.leases and self._leases_new.pop(lease, None) is None:
            self._leases_old.pop(lease, None)
        if served != ctx.model:  # (the model asked for is charged nothing: the general path)
            _, checks, amounts = _general_settle((lane, lease, est, tokens, cost))
            plan.served_elsewhere(lane.planned, amounts)
            assert self._redis is not None  # (only a Redis store has Lanes)
            self._settles.setdefault(self._redis, []).append((lease, checks, amounts))
        else:
            self._lane_settles.append((lane, lease, est, tokens, cost))
        if lane.budgets:
            crossed: list[tuple[Planned, int, int]] = []
            for index, item in lane.budgets:
                used = item.check.limit - values[1 + 2 * index] - est.cost_micros + cost
                self._crossed(item, used, crossed, ctx.started_monotonic)
            if crossed:
                self._spawn(self._send_alerts(self.store, crossed))

    def _flush_lane_settles(self) -> None:
        """Sends the settles of Lane admissions in calls of the settle script, up to
        SETTLE_BATCH_MAX settles each, in one write, unawaited (as `settle_soon` does the
        general path's)."""
        settles, self._lane_settles = self._lane_settles, []
        store = self._redis
        assert store is not None  # (only a Redis store has Lanes)
        client = store.direct_client()
        if client is not None:
            clock = store.clock_text()  # one reading for the batch: they settle together
            keys, counts, argvs = [], [], []
            for lane, request_id, est, tokens, cost in settles:
                keys.append(lane.settle_keys)
                counts.append(lane.key_count)
                argvs.append(lane.settle_argv(store.argv_prefix(request_id, clock),
                                              est.input_tokens + est.output_tokens,
                                              est.cost_micros, tokens, cost))
            if store.send_settles(client, keys, counts, argvs, settles,
                                  self._lane_settles_failed):
                return
        # Not connected (or a Sentinel's writes): the general path's settle, in a task.
        general = [_general_settle(settle) for settle in settles]
        try:
            store.settle_soon(general)
        except QuotaStoreError as exc:
            logger.warning("could not settle %d request(s) (%s)", len(settles), exc)
            self._unsure_settles(general)

    def _lane_settles_failed(self, error: Exception,
                             settles: list[tuple[Lane, str, Estimate, int, int]]) -> None:
        assert self._redis is not None
        self._redis.settle_batch_failed(error, [_general_settle(settle) for settle in settles])

    def _flush_settles(self) -> None:
        self._settle_scheduled = False
        if self._lane_settles:
            self._flush_lane_settles()
        batches, self._settles = self._settles, {}
        for store, batch in batches.items():
            settle_soon = getattr(store, "settle_soon", None)
            if settle_soon is not None:  # no task per batch: the store writes and moves on
                try:
                    settle_soon(batch)
                except QuotaStoreError as exc:
                    logger.warning("could not settle %d request(s) (%s)", len(batch), exc)
                    self._unsure_settles(batch)
            else:
                self._spawn(self._settle_batch(store, batch))
        if self.fallback in batches and self._store_down_until < math.inf:
            # (requests the fallback admitted before the store answered again: what they
            # spent in the end goes to the store as their reservations did)
            self._spawn(self._hand_over())

    async def _settle_batch(self, store: QuotaStore,
                            batch: list[tuple[str, list[Check], list[int]]]) -> None:
        try:
            settle_many = getattr(store, "settle_many", None)
            if settle_many is not None:
                await settle_many(batch)
            else:
                for request_id, checks, actual in batch:
                    await store.settle(request_id, checks, actual)
        except QuotaStoreError as exc:
            logger.warning("could not settle %d request(s) (%s); their reservations stand "
                           "until the limits refill", len(batch), exc)
            self._unsure_settles(batch)

    def _crossed_thresholds(self, planned: list[Planned], checks: list[Check],
                            decision: Decision, cost: int,
                            started: float) -> list[tuple[Planned, int, int]]:
        """(budget, threshold, used) for alert thresholds this request reached that this
        process has not alerted on yet in the period."""
        crossed: list[tuple[Planned, int, int]] = []
        for index in plan.budget_indexes(planned):
            item = planned[index]
            used = item.check.limit - decision.remaining[index] - checks[index].amount + cost
            self._crossed(item, used, crossed, started)
        return crossed

    def _crossed(self, item: Planned, used: int, crossed: list[tuple[Planned, int, int]],
                 started: float = math.inf) -> None:
        """Adds (budget, threshold, used) for each threshold of `item`'s budget that `used`
        reaches and this process has not alerted on yet in the period."""
        budget = item.budget
        if budget is None or item.check.limit <= 0:
            return
        before = len(crossed)
        percent = used * 100 // item.check.limit
        for threshold in budget.alert_at_percent:
            if percent >= threshold and \
                    f"{item.check.key}:alert:{threshold}" not in self._alerted:
                crossed.append((item, threshold, used))
        pending = self._pending_alerts.get(item.check.key)
        if pending is not None and len(crossed) == before and started < pending[3]:
            # (a request running when a threshold waited: one whose reservation counted in
            # the estimate that reached it. A later one's own estimate says when it is.)
            crossed.append((item, pending[2], used))

    def _alert_refusing(self, store: QuotaStore, item: Planned) -> None:
        """A budget that refuses a request (no way round it) is at its end: alerted at the
        thresholds what it has committed reached, and at 100% (once per period, as any): an
        admission keeps what is committed and reserved within the cap, and a call costs
        less than it reserved, so settles alone rarely bring a budget to 100%, and its
        alert never came while every request was refused."""
        budget = item.budget
        if budget is None or all(f"{item.check.key}:alert:{threshold}" in self._alerted
                                 for threshold in budget.alert_at_percent):
            return
        self._spawn(self._alert_refused(store, item))

    async def _alert_refused(self, store: QuotaStore, item: Planned) -> None:
        try:
            committed = (await store.committed([item.check]))[0]
        except QuotaStoreError:
            return  # (the next refusal tries again)
        if committed is None:
            return
        crossed: list[tuple[Planned, int, int]] = []
        self._crossed(item, committed, crossed)
        assert item.budget is not None
        if 100 in item.budget.alert_at_percent and \
                f"{item.check.key}:alert:100" not in self._alerted and \
                all(reached != 100 for _, reached, _ in crossed):
            crossed.append((item, 100, committed))
        for _, threshold, used in crossed:
            await self._alert_once(store, item, threshold, used)

    async def _send_alerts(self, store: QuotaStore,
                           crossed: list[tuple[Planned, int, int]]) -> None:
        """Alerts at the thresholds a settle's budgets reached by what they have spent. The
        settle judged them by the admission's reply, which counts the requests still running
        at their reservations (12 running requests that reserve 7 times what they cost make
        a budget look half spent at 12%): so they are judged again here, on what the store
        counts once the settle is in (sent before this asks: one connection, in order), at
        every threshold the spend reached. One the spend has not reached yet waits in
        `_pending_alerts` (the requests it counted settle later, maybe elsewhere)."""
        spent_in = getattr(store, "spent", None)
        if spent_in is None:
            for item, threshold, used in crossed:
                await self._alert_once(store, item, threshold, used)
            return
        claimed: dict[str, tuple[Planned, int]] = {}  # key -> (budget, highest threshold)
        for item, threshold, _ in crossed:
            known = claimed.get(item.check.key)
            if known is None or threshold > known[1]:
                claimed[item.check.key] = (item, threshold)
        items = [item for item, _ in claimed.values()]
        try:
            values = await spent_in([item.check for item in items])
        except QuotaStoreError:
            values = [None] * len(items)
        # Every threshold the spend has reached is alerted, not only those the estimate
        # named (a stream's top-ups spend past them). One the estimate reached but the
        # spend has not (requests admitted before this one settle after it) waits: judged
        # again at the budget's next settle, or the next lease renewal (another process's
        # settle brings it there).
        for (item, highest), reached in zip(claimed.values(), values, strict=True):
            key = item.check.key
            assert item.budget is not None
            if reached is None:  # (unreadable now: judged again later)
                self._pending_alerts[key] = (store, item, highest, time.monotonic())
                continue
            percent = reached * 100 // item.check.limit
            for threshold in item.budget.alert_at_percent:
                if percent >= threshold:
                    await self._alert_once(store, item, threshold, reached)
            if percent < highest and f"{key}:alert:{highest}" not in self._alerted:
                self._pending_alerts[key] = (store, item, highest, time.monotonic())
            else:
                self._pending_alerts.pop(key, None)

    def _judge_pending_alerts(self) -> None:
        """Judges again the thresholds that wait (`_pending_alerts`) on what their budgets
        have spent; forgets those whose period is over."""
        now = time.time()
        by_store: dict[QuotaStore, list[tuple[Planned, int, int]]] = {}
        for key, (store, item, highest, _) in list(self._pending_alerts.items()):
            if item.check.expires_at and item.check.expires_at <= now:
                del self._pending_alerts[key]
            else:
                by_store.setdefault(store, []).append((item, highest, 0))
        for store, crossed in by_store.items():
            self._spawn(self._send_alerts(store, crossed))

    async def _alert_once(self, store: QuotaStore, item: Planned, threshold: int,
                          used: int) -> None:
        marker = f"{item.check.key}:alert:{threshold}"
        if marker in self._alerted:
            return
        self._alerted.add(marker)
        check = Check(BUDGET, marker, 1, 0, expires_at=item.check.expires_at)
        try:
            first = await store.seed(check, 1)
        except QuotaStoreError:
            first = True  # better twice than never
        if not first:
            return
        event = {
            "event": "budget_threshold", "threshold_percent": threshold,
            "subject_kind": item.subject_kind, "subject_id": item.subject_id,
            "period": item.budget.period if item.budget else None,
            "period_start": item.period_start.isoformat() if item.period_start else None,
            "limit_usd": str(micros_to_usd(item.check.limit)),
            "used_usd": str(micros_to_usd(used)),
        }
        alerts_logger.warning("%s", orjson.dumps(event).decode())
        if self._http is not None:
            await self._deliver(event)

    async def _deliver(self, event: dict[str, Any]) -> None:
        """POSTs an alert to the webhook, and again after each of `_ALERT_RETRIES_S` while it
        fails in a way that may pass (no answer, a 5xx, 408 or 429): the marker in the store
        made this process the one that sends it, so no other gateway will."""
        for wait_s in (*_ALERT_RETRIES_S, None):
            try:
                async with self._http.post(self.alert_webhook_url, json=event) as response:
                    if response.status < 300:
                        return
                    failure = f"answered {response.status}"
                    if response.status < 500 and response.status not in (408, 429):
                        wait_s = None  # (the same alert will not be taken later either)
            except Exception as exc:  # noqa: BLE001 (a webhook failure must not fail anything)
                failure = f"failed: {type(exc).__name__}"
            if wait_s is None:
                logger.warning("budget alert webhook %s; the alert is not sent", failure)
                return
            logger.warning("budget alert webhook %s; trying again in %g s", failure, wait_s)
            await asyncio.sleep(wait_s)

    def _spawn(self, work: Any) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(_log_failure)
        return task

    # -- admin: current spend ----------------------------------------------------------------

    async def _serve_usage(self, scope: Scope, send: Send) -> None:
        assert self.admin_token is not None
        if not await admitted(scope, send, self.admin_token, "GET"):
            return
        send = without_body_for_head(scope, send)
        parts = route_path(scope)[len("/admin/usage/"):].split("/", 1)
        if len(parts) != 2 or not all(parts):
            await send_error(send, admin_error(404, "Use /admin/usage/{kind}/{subject}.",
                                               "unknown_url"))
            return
        kind, subject = parts
        if kind not in _USAGE_KINDS:
            await send_error(send, admin_error(
                404, f"Unknown kind; use one of {', '.join(_USAGE_KINDS)}: "
                     "/admin/usage/{kind}/{subject}.", "unknown_kind", param="kind"))
            return
        now = datetime.now(UTC)
        checks, starts = [], []
        for period in PERIODS:
            start, _end = period_bounds(period, now)
            checks.append(Check(BUDGET, f"{kind}:{subject}:budget:{period}:"
                                        f"{period_label(period, start)}", 0, 0))
            starts.append(start)
        try:
            values = await self.store.committed(checks)
        except QuotaStoreError:
            await send_error(send, admin_error(503, "The quota store is unavailable.",
                                               "quota_store_unavailable"))
            return
        periods = {period: {"period_start": start.isoformat(),
                            "committed_usd": None if value is None
                            else str(micros_to_usd(value))}
                   for period, start, value in zip(PERIODS, starts, values, strict=True)}
        await send_json(send, 200, {"kind": kind, "subject": subject, "periods": periods})


class _Responder:
    """Wraps the `send` of a stream a stream_cutoff budget applies to: counts its content
    deltas (`gateway.sse.content_counters`: the events that carry output), an output token
    each, as a stream cut short is billed, and ends the stream in-band before one would
    cross the budget. A stream within the output bound its admission reserved is never cut
    (a provider streams at least a token a delta); one whose provider goes past the
    caller's max_tokens is, once its cost crosses the budget.

    The stream may cost what it holds of the budget in the store (`allowance`): its
    reservation, and what it took on top (`top_up`, the quota layer's `_top_up`) each time
    a delta would take it past that, until the store has no more for it. So streams running
    side by side each spend only what they hold, and together no more than the budget (the
    room left at each one's admission was each one's to spend, twice over).

    Until its response starts, the stream is priced at the reservation's price (the dearest
    deployment that may serve it); from then on at the price of the deployment serving it
    (`ctx.served_deployment`, the passthrough's), in force when the request started, as
    pricing bills it.

    The adapters send whole events, each ending in one blank line, so `events` is the
    number of events sent: in a Responses stream (numbered from 0), the next one's number
    (counted only there).
    SSE comments (`: keepalive`, which providers and proxies send on slow streams) pass on
    to the client but are no events (`count_events`), and no output.

    A stream the failover layer continues elsewhere (continuation.py) is billed its broken
    part's cost and then the continuation's call, whose input (the prompt and the text so
    far) is billed again, at the continuation's deployment's price: once it has begun, the
    stream is counted so (`_count_continuation`), and one with no room left for its first
    content delta is not called (`no_room_to_continue`).
    """

    __slots__ = (
        "_send",
        "allowance",
        "cache_writes",
        "continued",
        "counters",
        "ctx",
        "deltas",
        "deltas_before",
        "events",
        "input_tokens",
        "numbered",
        "price",
        "spent_before",
        "streaming",
        "top_up",
    )

    def __init__(self, ctx: RequestContext, send: Send, est: Estimate,
                 top_up: Callable[[], Awaitable[int]]) -> None:
        self.ctx = ctx
        self._send = send
        self.allowance = est.cost_micros  # (what the admission holds for it)
        self.top_up = top_up
        self.input_tokens = est.input_tokens  # the current call's (estimated)
        self.continued = False
        self.spent_before = self.deltas_before = 0  # what the broken part of it cost, sent
        self.events = self.deltas = 0
        # (events are counted only where they are numbered: the error event that ends a
        # Responses stream takes the next number; no other format reads the count)
        self.numbered = ctx.operation == OPENAI_RESPONSES
        self.counters = content_counters(ctx.operation)
        self.streaming = False
        self.price = est.price  # (the reservation's, until the response starts)
        self.cache_writes = plan.CACHE_CONTROL in ctx.raw_body  # (priced as `plan.estimate`)

    def send(self, message: Message) -> Awaitable[None]:
        # Not a coroutine function: it returns what the caller awaits (the next `send`, or
        # the cut-off), so a stream's every event costs no coroutine of this layer's own.
        if message["type"] == "http.response.start":
            self.streaming = message.get("status") == 200
            if self.streaming and self.ctx.served_deployment is not None:
                self.price = _price_in_force(self.ctx.served_deployment, self.ctx)
        elif self.streaming and message["type"] == "http.response.body":
            body = message.get("body", b"")
            if not self.continued and EARLIER_ATTEMPT in self.ctx.state:
                self._count_continuation()
            deltas = self.deltas + count_content(self.counters, body, self.deltas)
            if self.price is not None and self._over_budget(deltas) and self._costs():
                return self._send_with_more_room(message, deltas)
            self._count(body, deltas)
        return self._send(message)

    def _count(self, body: bytes, deltas: int) -> None:
        self.deltas = deltas
        if self.numbered:
            self.events += count_events(body)

    async def _send_with_more_room(self, message: Message, deltas: int) -> None:
        """Sends `message`, which takes the stream past what it holds of the budget, once
        the store has added room for it; else the stream is cut off (and the message, which
        it replaces, not counted)."""
        if not await self._room_for(deltas):
            await self._cut_off()
        self._count(message.get("body", b""), deltas)
        await self._send(message)

    async def _room_for(self, deltas: int) -> bool:
        """Whether `deltas` fit in what the stream holds, taking more from the store until
        they do (a message may carry more deltas than one step pays for)."""
        while self._over_budget(deltas):
            added = await self.top_up()
            if added <= 0:
                return False
            self.allowance += added
        return True

    def _over_budget(self, deltas: int) -> bool:
        assert self.price is not None
        output = deltas - self.deltas_before
        spent = self.spent_before + estimate_micros(self.price, self.input_tokens, output,
                                                    self.cache_writes)
        return spent > self.allowance

    def _costs(self) -> bool:
        """Whether the stream, which its deltas put past the budget, costs the caller: not
        a cache hit (the cache layer is below this one), which is charged nothing."""
        return self.ctx.cache_status not in CACHE_HITS

    async def no_room_to_continue(self) -> bool:
        """Whether the call about to go below is a continuation (the failover layer has set
        EARLIER_ATTEMPT, and `ctx.body` to the continuation's request) whose input, billed
        again, leaves no room in the budget for its first content delta: the cut-off would
        end it there, and the call would buy the caller nothing but that input (past the
        budget, when the input alone does not fit). Then the stream ends as the cut-off
        ends it, and the call is not made."""
        if self.continued or EARLIER_ATTEMPT not in self.ctx.state:
            return False
        self._count_continuation()
        if self.price is None or await self._room_for(self.deltas + 1):
            return False
        self.ctx.error_type = "budget_exceeded"
        return True

    def _count_continuation(self) -> None:
        """From a continuation call on (the failover layer has set EARLIER_ATTEMPT, `ctx.body`
        to the continuation's request and `ctx.deployment` to where it goes), the stream
        costs what pricing bills its broken part, plus the continuation's input and its own
        deltas at its deployment's price."""
        ctx = self.ctx
        self.continued = True
        self.spent_before = ctx.state[EARLIER_ATTEMPT][1]
        self.input_tokens = estimate_input_tokens(ctx)
        self.deltas_before = self.deltas
        deployment = ctx.deployment or ctx.served_deployment
        if deployment is not None:
            self.price = _price_in_force(deployment, ctx)

    async def _cut_off(self) -> None:
        # Raised, not sent here: the layers below unwind first and report what the stream
        # delivered (`ctx.usage`), which a layer above may record as the last event passes
        # (the metering layer's durability="response" does).
        self.ctx.error_type = "budget_exceeded"
        raise _StreamCutOff()

    def again(self, send: Send, ctx: RequestContext) -> _Responder:
        """This responder for another call below for the same request, with its own `send`
        and context (a failover layer's hedged call has a copy of the request's): what has
        been sent so far still counts."""
        # Field by field, not copy.copy: compiled (mypyc), the class makes its instances
        # only through __init__. Every slot is set here: `numbered` and `counters` follow
        # from the operation, which a later call for the same request keeps.
        responder = _Responder(ctx, send, _NOTHING_RESERVED, self.top_up)
        responder.allowance = self.allowance
        responder.input_tokens, responder.price = self.input_tokens, self.price
        responder.continued, responder.streaming = self.continued, self.streaming
        responder.spent_before, responder.deltas_before = self.spent_before, self.deltas_before
        responder.events, responder.deltas = self.events, self.deltas
        responder.numbered, responder.counters = self.numbered, self.counters
        return responder

    async def end_in_band(self) -> None:
        """Ends a stream `_cut_off` stopped as its API ends a failed stream: its error event
        (a Responses stream's then `response.failed`, for the response it opened)."""
        error = GatewayError(402, "The stream was ended because its cost reached what is left "
                                  "of the budget.", code="budget_exceeded")
        responses = self.numbered
        ending = stream_error_ending(
            self.ctx.api_format, error, operation=self.ctx.operation,
            sequence_number=self.events,
            first_event=self.ctx.first_event if responses else None,
            # ResponseError's codes are a closed set with none for a budget. Not
            # "server_error": nothing failed, and retrying at once will not help. A limit on
            # the caller's spending stopped it, and OpenAI answers its own spend limit
            # (insufficient_quota) with a 429, as it does its rate limits.
            failed_code="rate_limit_exceeded")
        await self._send({"type": "http.response.body", "body": ending, "more_body": False})


def _price_in_force(deployment: Any, ctx: RequestContext) -> Price | None:
    """`deployment`'s price in force when the request started (as pricing bills it)."""
    price: Price | None = getattr(deployment, "price", None)
    if price is not None and price.successor is not None:
        return in_force(price, ctx.started_at)
    return price


def _make_store(store: QuotaStore | str) -> QuotaStore:
    if isinstance(store, str):
        if store == "memory":
            return MemoryQuotaStore()
        if is_redis_url(store):
            return RedisQuotaStore(store)
        raise ConfigError(f"QuotaMiddleware store must be 'memory', a Redis URL (redis://, "
                          f"rediss://, redis+sentinel://, redis+cluster://, unix://) or a "
                          f"QuotaStore, not a {store.partition(':')[0]!r} string.")
    if not callable(getattr(store, "admit", None)):
        raise ConfigError(f"QuotaMiddleware store {store!r} is not a QuotaStore.")
    return store


def _make_ledger(ledger: object) -> SpendLedger | None:
    """The `ledger` option as a SpendLedger: a PostgreSQL DSN is a PostgresSpendLedger; what
    has no `spent_micros` is refused (it was taken, never started, and every budgeted request
    got a 503 while /readyz said ready). The value is never shown: a DSN holds a password."""
    if ledger is None or isinstance(ledger, PostgresSpendLedger):
        return ledger
    if isinstance(ledger, str):  # (as MeteringMiddleware's store)
        if not is_postgres_dsn(ledger):
            raise ConfigError("QuotaMiddleware ledger must be a PostgreSQL DSN or a "
                              "SpendLedger such as PostgresSpendLedger(dsn).")
        return PostgresSpendLedger(ledger)
    if not callable(getattr(ledger, "spent_micros", None)):
        raise ConfigError(f"QuotaMiddleware ledger must be a SpendLedger such as "
                          f"PostgresSpendLedger(dsn) or a PostgreSQL DSN, not a "
                          f"{type(ledger).__name__}.")
    spend_ledger: SpendLedger = ledger  # type: ignore[assignment]
    return spend_ledger


def _admitted(reply: Any, lane: Lane, ctx: RequestContext) -> list[Any] | None:
    """The admit script's reply as its JSON array when it admitted the request and has the
    template's shape, with the request's response headers added from it; None for anything
    else, headers untouched (the general path reads the reply, and refuses nonsense)."""
    try:
        values = orjson.loads(reply)
        if type(values) is not list or len(values) != lane.reply_size or values[0] != 1:
            return None
        headers = lane.headers(values)
    except (TypeError, ValueError):  # (orjson.JSONDecodeError is a ValueError)
        return None
    ctx.response_headers += headers
    return values


def _general_settle(settle: tuple[Lane, str, Estimate, int, int]
                    ) -> tuple[str, list[Check], list[int]]:
    """A Lane's settle as the general path's (request id, checks, actual amounts)."""
    lane, request_id, est, tokens, cost = settle
    checks = lane.checks(est)
    return request_id, checks, plan.actual_amounts(checks, tokens, cost)


_UNSURE_MAX = 10_000  # releases kept for an unreachable store (see `_unsure_admit`)
_ALERT_RETRIES_S = (1.0, 2.0, 4.0)  # waits before a failed alert webhook POST is sent again


def _retrieved(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()



def _spend_rows(ctx: RequestContext, cost: int, model: bool) -> list[tuple[str, str, int]]:
    """The spend ledger's rows of a request (`model`: with the model asked for's)."""
    principal = ctx.principal or ANONYMOUS
    rows = [("key", principal.key_id, cost), ("project", principal.project, cost),
            ("global", "all", cost)]
    if model:
        rows.append(("model", ctx.model, cost))
    if principal.customer:
        rows.append(("customer", f"{principal.project}/{principal.customer}", cost))
    return rows


def _log_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("quota background task failed", exc_info=task.exception())


def refused(ctx: RequestContext, item: Planned, decision: Decision) -> GatewayError:
    """The refusal for the limit that failed; its kind is noted for the metrics
    (`ctx.state["quota.refused"]`: requests, tokens, concurrent or budget)."""
    ctx.state["quota.refused"] = item.check.kind
    return plan.refusal(item, decision)
