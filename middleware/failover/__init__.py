"""The failover layer: routing, retries, fallbacks, circuit breakers and hedging.

    Middleware(FailoverMiddleware,
               routes={"gpt-4o": Route(strategy="latency", fallbacks=("claude-sonnet",),
                                       ttft_timeout_s=8, hedge_after_s=2.5,
                                       continuation=True)},
               retry=RetryPolicy(max_attempts=3, deadline_s=60, budget_ratio=0.2),
               breaker=BreakerSettings(consecutive_failures=5, cooldown_s=10),
               shared=RedisHealth("redis://127.0.0.1:6379/0"),
               admin_token_env="SLUICEGATE_ADMIN_TOKEN")

Per request it picks a deployment of the model (`Route.strategy`, healthy ones only, and only
among those whose provider serves the request's operation: `check_config` notes the others
once), puts it and one of its provider keys in the context, and calls the app below. A
deployment whose adapter refuses to translate the request (`UntranslatableRequest`, raised
before any upstream call) is out for that request only, with no verdict on its health, and
what its pick took (an rpm token, a retry or hedge from the budget) is given back. An
upstream failure before the response started (the provider adapter holds the start back until
the first event, so this covers error statuses, connection errors, an error event inside a
200 and a missing first byte) is classified (policy.classify) and leads to, in order: another
key of the same deployment (401/402/403), another deployment of the model, the model's
fallbacks, then — after a backoff within the deadline, or a 429's Retry-After when every
deployment left asked for one — another round. A 429 with Retry-After also cools its
deployment down: requests with nowhere else to go wait for the cool-down's end and then for
the probe that goes first (routing.DeploymentState), never past their deadline. Token
counting, rate-limited apart from messages (policy.NO_VERDICT_OPERATIONS), neither waits for
those cool-downs nor takes rpm tokens, and its outcomes change no deployment's health. Every attempt after the first needs
the retry budget. After the response started, a failure ends the stream with an in-band error
event (the adapter's job) and is recorded as it would be before (a request the caller must
fix is no failure of the deployment), unless the route asks for continuation
(continuation.py): then, after a failure of the provider's, the next deployment goes on
from the text the client already has.

A Responses API request with a `previous_response_id` this gateway saw made goes to the
deployment and provider key that made it, and fails over only to those that see it
(affinity.py).

A layer below that sends the request to another model (the quota layer's downgrade, listed
below this one) raises `Rerouted` instead of calling below (`ctx.reroutable`, set here): the
pick that met it is given back as a refused one (no attempt, no verdict on health), and from
then on the request is routed as one for that model, every attempt of it (a retry, a hedge, a
continuation: its deployments and their health, its fallbacks), so each call is recorded
against the deployment it went to.

A layer that must pass a request before it goes to a fallback model registers a gate
(`add_gate`: the quota layer, which admits the request against that model's own limits). A
gate that refuses (a GatewayError) takes the model out for the rest of the request, as if
none of its deployments could serve it; the refusal is the answer when nothing else is.

Headers: `x-sluicegate-deployment`, `x-sluicegate-attempts`, and `x-sluicegate-fallback` (the
public model that served) when a fallback model answered. The number of fallbacks reaches
metering as `ctx.state["failover.fallbacks"]`; every attempt is in `ctx.attempts`.

Breakers, latency and in-flight counts live in this process; with `shared=RedisHealth(...)`
breaker openings and closings and the latency averages are exchanged through Redis in the
background (never on the request path), so every instance agrees within about a second.
`GET /admin/deployments` (admin token) shows every deployment's state.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

from gateway.admin import (
    admin_token_from_env,
    admitted,
    route_path,
    send_json,
    without_body_for_head,
)
from gateway.config import ConfigError, GatewayConfig
from gateway.context import (
    CONTEXT_KEY,
    OPENAI_RESPONSES,
    RequestContext,
    Rerouted,
    Usage,
    route_to,
)
from gateway.disconnect import run_until_disconnect
from gateway.errors import (
    GatewayError,
    StreamInterrupted,
    UntranslatableRequest,
    UpstreamError,
    stream_error_ending,
)
from gateway.kernel import stack_components
from gateway.layers import ASGIApp, Message, Receive, Scope, Send
from gateway.metrics import Sample
from gateway.pricing import EARLIER_ATTEMPT, call_cost_micros
from gateway.upstream import OPERATION_PATHS, serving_deployments
from middleware.failover.affinity import (
    Pin,
    ResponseAffinity,
    not_found,
    owner_of,
    previous_response_id,
    unavailable,
)
from middleware.failover.continuation import (
    CONTINUABLE,
    BothParts,
    ContinuationRelay,
    Transcript,
    continuation_body,
    estimated_usage,
    transcript_tee,
)
from middleware.failover.health import BreakerSettings, RetryBudget, backoff_s
from middleware.failover.hedge import Hedge, HedgeFailed
from middleware.failover.policy import (
    AUTH,
    CONTENT_POLICY,
    CONTEXT_WINDOW,
    FATAL,
    NO_VERDICT_OPERATIONS,
    RETRYABLE,
    RetryPolicy,
    Route,
    classify,
    parse_retry_after,
)
from middleware.failover.routing import (
    NO_STATES,
    NO_TAGS,
    DeploymentState,
    Group,
    KeyState,
    Tried,
    paced_in_s,
    ready_in_s,
    requested_tags,
    retry_after,
    route_headers,
)
from middleware.failover.shared import RedisHealth

__all__ = ["BreakerSettings", "FailoverMiddleware", "RedisHealth", "RetryPolicy", "Route"]

logger = logging.getLogger("sluicegate.failover")
_BREAKER_LEVELS = {"closed": 0, "half_open": 1, "open": 2}
# The last event of an Anthropic stream, after its message_delta: what a stream that broke
# after its answer ended lacks (an OpenAI stream's is `data: [DONE]`).
_ANTHROPIC_STOP = b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
ADMIN_PATH = "/admin/deployments"


class FailoverMiddleware:
    """Routing, retries, fallbacks and circuit breakers (see the module docstring)."""

    passes_json_through = True  # a JSON answer from below goes on as it came

    def __init__(
        self,
        app: ASGIApp,
        *,
        routes: dict[str, Route] | None = None,
        default: Route | None = None,
        retry: RetryPolicy | None = None,
        breaker: BreakerSettings | None = None,
        shared: RedisHealth | None = None,
        admin_token_env: str | None = None,
        response_affinity_entries: int = 100_000,
    ) -> None:
        self.app = app
        self.routes = dict(routes or {})
        for name, route in self.routes.items():
            if not isinstance(route, Route):
                raise TypeError(f"FailoverMiddleware routes[{name!r}] must be a Route(...)")
        self.default = default or Route()
        self.retry = retry or RetryPolicy()
        self.breaker = breaker or BreakerSettings()
        self.shared = shared
        self.admin_token = (admin_token_from_env(admin_token_env, "FailoverMiddleware")
                            if admin_token_env else None)
        # Health state: built per public model on its first request (the models arrive with
        # the request context), then shared by every request of this process.
        self.groups: dict[str, Group] = {}
        self._chains: dict[str, list[str]] = {}  # model -> [model, *fallbacks] (never mutated)
        # operation -> model -> the names of its deployments whose provider cannot serve that
        # operation (only models with some; made by `check_config`), and the states of those
        # of a model and all its fallbacks (made on the first such request).
        self.unable: dict[str, dict[str, frozenset[str]]] = {}
        self._unable_states: dict[tuple[str, str], frozenset[DeploymentState]] = {}
        self.budget = RetryBudget(ratio=self.retry.budget_ratio,
                                  window_s=self.retry.budget_window_s,
                                  min_per_s=self.retry.budget_min_per_s)
        # Responses API: where each response this process saw was made (affinity.py).
        self.affinity = ResponseAffinity(max_entries=response_affinity_entries)
        self.counters = {"requests": 0, "retries": 0, "fallbacks": 0, "hedges": 0,
                         "budget_refusals": 0}
        self.gates: list[Callable[[RequestContext, str], Awaitable[None]]] = []

    def check_config(self, config: GatewayConfig) -> None:
        """Every model a route names (and its fallbacks) must be a configured model. Notes
        which deployments cannot serve which operation (an Azure one /v1/responses, an
        Anthropic one /v1/embeddings), so that requests never go to them. Tells the layers
        below that price a request by the models that may serve it (`learn_routes`: the
        quota layer) of this layer's routes (`models_serving`)."""
        self.affinity.learn_accounts(config.providers, config.models)
        for operation in OPERATION_PATHS:
            unable: dict[str, frozenset[str]] = {}
            for name, declared in config.models.items():
                serving = {d.name for d in
                           serving_deployments(declared, config.providers, operation)}
                if len(serving) < len(declared.deployments):
                    unable[name] = frozenset(d.name for d in declared.deployments) - serving
            if unable:
                self.unable[operation] = unable
        for model, route in [*self.routes.items(), (None, self.default)]:
            named = [*([model] if model is not None else []), *route.fallbacks,
                     *route.context_window_fallbacks, *route.content_policy_fallbacks]
            unknown = [name for name in named if name not in config.models]
            if unknown:
                where = "default" if model is None else f"routes[{model!r}]"
                raise ConfigError(f"{config.path}: FailoverMiddleware {where} names "
                                  f"{', '.join(map(repr, unknown))}, which "
                                  f"{'is not a model' if len(unknown) == 1 else 'are not models'}"
                                  " in `models`.")
        for component in stack_components(self.app):  # layers below that price by route
            learn = getattr(component, "learn_routes", None)
            if callable(learn):
                learn(self, config)

    def models_serving(self, model: str) -> tuple[str, ...]:
        """The public models a request for `model` may be served by: the model, then every
        fallback its route may go to (the chain, and the context-window and content-policy
        fallbacks), before the caller's key rules any out (`_may_use`). For a layer that
        must know before the call: the quota layer reserves at the dearest of them."""
        route = self.routes.get(model, self.default)
        return tuple(dict.fromkeys((model, *route.fallbacks, *route.context_window_fallbacks,
                                    *route.content_policy_fallbacks)))

    def add_gate(self, gate: Callable[[RequestContext, str], Awaitable[None]]) -> None:
        """Has `gate(ctx, model)` awaited before a request's calls to a fallback `model`
        (each call: a gate answers a request it has passed at once). A GatewayError it
        raises takes the model out for the rest of the request (`_passes_gates`)."""
        if gate not in self.gates:
            self.gates.append(gate)

    async def _passes_gates(self, ctx: RequestContext, model: str, tried: Tried) -> bool:
        """Whether every gate lets the request go to fallback `model`; a refusal takes
        every deployment of the model out for the rest of the request, and is the answer
        when no call can be made and none failed (`_final_error`). What a refusing gate
        noted in `ctx.state` (the quota layer: the kind of limit, for the metrics) is taken
        back, and noted again only if its refusal is the answer."""
        for gate in self.gates:
            state = ctx.state
            before = dict(state)
            try:
                await gate(ctx, model)
            except GatewayError as refusal:
                notes = {name: value for name, value in state.items()
                         if name not in before or before[name] is not value}
                state.clear()
                state.update(before)
                group = self.groups.get(model)
                tried.gate_refused(refusal, group.deployments if group is not None else (),
                                   notes)
                return False
        return True

    async def startup(self) -> None:
        if self.shared is not None:
            await self.shared.startup()

    async def shutdown(self) -> None:
        if self.shared is not None:
            await self.shared.shutdown()

    async def check_ready(self) -> dict[str, str]:
        return await self.shared.check_ready() if self.shared is not None else {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ctx: RequestContext | None = scope.get(CONTEXT_KEY)
        if ctx is None:
            if self.admin_token is not None and route_path(scope) == ADMIN_PATH:
                if await admitted(scope, send, self.admin_token, "GET"):
                    await send_json(without_body_for_head(scope, send), 200, self.describe())
                return
            await self.app(scope, receive, send)
            return
        group = self.groups.get(ctx.model) or self.group(ctx, ctx.model)
        if group is None:  # not a configured model: the passthrough answers
            await self.app(scope, receive, send)
            return
        self.counters["requests"] += 1
        ctx.reroutable = True  # (a layer below may send it to another model: `_rerouted`)
        began = time.monotonic()  # this layer's clock, like the groups' (time.monotonic)
        self.budget.request(began)
        route = self.routes.get(ctx.model, self.default)
        wanted = requested_tags(ctx.headers)
        if ctx.operation == OPENAI_RESPONSES:  # (the one test any other request pays)
            await self._serve_responses(scope, receive, send, ctx, route, wanted)
            return
        unable = self.unable.get(ctx.operation)  # (None for most operations)
        if wanted or (unable is not None and ctx.model in unable) or \
                ctx.operation in NO_VERDICT_OPERATIONS:  # (picked apart: `Tried.rate_limited`)
            await self._serve(scope, receive, send, ctx, route,
                              self._tried(ctx, route, wanted), None)
            return
        state = None
        if route.plain:
            state = group.only
            if state is None:
                state = group.pick(NO_STATES)
            elif not state.available(began):
                state = None
        if state is None or state.keys:
            if state is not None:  # picked (a half-open breaker or a cool-down counted its
                state.breaker.release()  # probe): `_serve` picks again, so the slots go back
                if state.cool_probes:
                    state.probe_ended(False)
            await self._serve(scope, receive, send, ctx, route,
                              self._tried(ctx, route, NO_TAGS), None)
            return
        # The common request's first attempt, inline: every await below this frame is resumed
        # through each frame above it, so the success path keeps to one.
        ctx.deployment = state.deployment
        ctx.response_headers.extend(state.first_headers)
        state.started()
        failure: UpstreamError | UntranslatableRequest | Rerouted | None = None
        answered = False
        try:
            await self.app(scope, receive, send)
            answered = True
        except (UpstreamError, UntranslatableRequest, Rerouted) as error:
            failure = error
        finally:
            state.finished(ctx.usage if answered else None)
            if not answered and not isinstance(failure, UpstreamError):
                state.release()  # client gone, or a refusal from below: no verdict
        if failure is None:
            self.succeeded(ctx, state, None, began)
            return
        if ctx.status:
            raise failure  # the response started: never a second one
        tried = Tried() if unable is None else self._tried(ctx, route, NO_TAGS)
        tried.headers = state.first_headers
        next_chain = None
        if isinstance(failure, UntranslatableRequest):
            state.refused()  # no call went out: not an attempt, and no rpm token spent
            tried.refuse(state, failure)
        elif isinstance(failure, Rerouted):
            state.refused()  # (as above)
            route, tried = self._rerouted(ctx, failure, tried)
        else:
            tried.attempts = 1
            next_chain = self.after_failure(failure, state, None, tried, ctx)
        await self._serve(scope, receive, send, ctx, route, tried, next_chain)

    # -- Responses API affinity (affinity.py) ------------------------------------------------

    async def _serve_responses(self, scope: Scope, receive: Receive, send: Send,
                               ctx: RequestContext, route: Route,
                               wanted: frozenset[str]) -> None:
        """A Responses API request: one with a `previous_response_id` this gateway saw made
        goes where that response is; every answer's id is noted for the next turn."""
        tried = self._tried(ctx, route, wanted)
        previous = previous_response_id(ctx)
        pin = None if previous is None else await self.affinity.find(previous, self.shared)
        if pin is not None and previous is not None and pin.owner is not None \
                and pin.owner != owner_of(ctx):
            # (another project's response: the provider would serve it, under the gateway's
            # one account, to any caller that knows its id)
            raise not_found(previous)
        send = self.affinity.noting_pins(send, ctx, self.shared)
        if pin is None or previous is None:
            await self._serve(scope, receive, send, ctx, route, tried, None)
        else:
            await self._serve_pinned(scope, receive, send, ctx, route, tried, previous, pin)

    async def _serve_pinned(self, scope: Scope, receive: Receive, send: Send,
                            ctx: RequestContext, route: Route, tried: Tried, previous: str,
                            pin: Pin) -> None:
        """Calls the deployment and key that made the previous response first; the others
        that see it (on the same account: `ResponseAffinity.sees`) are the only ways round. When the model and
        its fallbacks have none, the request routes as any other (the provider will say)."""
        seeing, first_model, first = [], ctx.model, None
        for model in self._every_model(ctx.model, route):
            group = self.group(ctx, model) if model == ctx.model or _may_use(ctx, model) \
                else None
            for state in group.deployments if group is not None else ():
                if state in tried.ineligible or not self.affinity.sees(pin, state.deployment):
                    continue
                seeing.append(state)
                if first is None and state.name == pin.deployment:
                    first_model, first = model, state
        if not seeing:
            await self._serve(scope, receive, send, ctx, route, tried, None)
            return
        blind = frozenset(state for model in self._every_model(ctx.model, route)
                          if (group := self.groups.get(model)) is not None
                          for state in group.deployments if state not in seeing)
        tried.ineligible = tried.ineligible | blind
        tried.excluded = set(tried.ineligible)
        tried.bad_keys = self.affinity.foreign_keys(pin, seeing)
        tried.pinned = (previous, pin)
        next_chain = None
        if first is not None and first.available(time.monotonic(), tried.rate_limited):
            key = first.pick_key(tried.bad_keys)
            if first.keys and key is None:  # its key's breaker is open: no call
                first.release(tried.rate_limited)
            elif first_model != ctx.model and self.gates and \
                    not await self._passes_gates(ctx, first_model, tried):
                first.release(tried.rate_limited)
                if key is not None:
                    key.breaker.release()
            else:
                try:
                    await self._attempt(scope, receive, send, ctx, route, first, key, tried,
                                        None if first_model == ctx.model else first_model)
                    return
                except UntranslatableRequest as refusal:  # (no call went out: `_attempt`)
                    tried.refuse(first, refusal)
                except Rerouted as rerouted:  # (nor here): pinned among the new model's
                    route, tried = self._rerouted(ctx, rerouted, tried)
                    await self._serve_pinned(scope, receive, send, ctx, route, tried, previous,
                                             pin)
                    return
                except UpstreamError as error:
                    if ctx.status:
                        raise  # never a second response start
                    next_chain = self.after_failure(error, first, key, tried, ctx)
        await self._serve(scope, receive, send, ctx, route, tried, next_chain)

    # -- the attempt loop ------------------------------------------------------------------

    def group(self, ctx: RequestContext, model: str) -> Group | None:
        """The health state of a public model's deployments (made on its first request)."""
        group = self.groups.get(model)
        if group is None:
            declared = (ctx.models or {}).get(model)
            if declared is None:
                return None
            route = self.routes.get(model, self.default)
            group = Group(model, declared.deployments, strategy=route.strategy,
                          breaker=self.breaker)
            if self.shared is not None:
                self.shared.watch(group)
            self.groups[model] = group
        return group

    async def _serve(self, scope: Scope, receive: Receive, send: Send, ctx: RequestContext,
                     route: Route, tried: Tried, chain: list[str] | None) -> None:
        """The attempt loop: picks, calls, and on failure moves along the chain, then waits
        and goes round again, until an answer, the attempt limit, the deadline or the retry
        budget stops it."""
        requested = ctx.model
        deadline = ctx.started_monotonic + self.retry.deadline_s
        if chain is None:
            chain = self._chains.get(requested) or self._chain(requested, route)
        rounds = 0
        while True:
            position, attempts_before = 0, tried.attempts
            while position < len(chain):
                model = chain[position]
                group = self.group(ctx, model) if model == requested or _may_use(ctx, model) \
                    else None  # (a fallback the caller's key may not use is no way round)
                state = group.pick(tried.excluded, tried.rate_limited) \
                    if group is not None else None
                if state is None:
                    position += 1
                    continue
                key = state.pick_key(tried.bad_keys)
                if state.keys and key is None:  # every key failed or is broken
                    state.release(tried.rate_limited)
                    tried.exclude(state)
                    continue
                if tried.attempts and not self._may_retry(tried, time.monotonic(), deadline):
                    state.release(tried.rate_limited)
                    if key is not None:
                        key.breaker.release()
                    raise self._final_error(ctx, tried, chain)
                fallback_model = model if model != requested else None
                if fallback_model is not None and self.gates and \
                        not await self._passes_gates(ctx, model, tried):
                    state.release(tried.rate_limited)
                    if key is not None:
                        key.breaker.release()
                    if tried.attempts:  # the pick was a retry, and `_may_retry` counted it
                        self.retry_not_made()
                    position += 1
                    continue
                partner = None
                if route.hedge_after_s is not None and not tried.attempts:
                    partner = self._hedge_partner(ctx, model, state, tried)
                try:
                    if partner is not None:
                        await Hedge(self, scope, receive, send, ctx, route, tried,
                                    fallback_model).run((state, key), partner)
                    else:
                        await self._attempt(scope, receive, send, ctx, route, state, key, tried,
                                            fallback_model)
                    return
                except HedgeFailed as failed:  # both calls' failures are recorded
                    next_chain = failed.next_chain
                except UntranslatableRequest as refusal:  # (no call went out: `_attempt`)
                    tried.refuse(state, refusal)
                    if tried.attempts:  # the pick was a retry, and `_may_retry` counted it
                        self.retry_not_made()
                    continue
                except Rerouted as rerouted:  # (nor here)
                    if tried.attempts:
                        self.retry_not_made()
                    pinned = tried.pinned
                    route, tried = self._rerouted(ctx, rerouted, tried)
                    if pinned is not None:  # a Responses follow-up: where its response is
                        await self._serve_pinned(scope, receive, send, ctx, route, tried,
                                                 *pinned)
                        return
                    requested, position = ctx.model, 0
                    chain = self._chains.get(requested) or self._chain(requested, route)
                    continue
                except UpstreamError as error:
                    if tried.started or ctx.status or partner is not None:
                        raise  # never a second response start
                    next_chain = self.after_failure(error, state, key, tried, ctx)
                if next_chain is not None:
                    chain, position = next_chain, 0
            rounds += 1
            # A round that found nothing to call (cool-downs, their probes out, breakers open,
            # every key refused) would find nothing after a backoff either: it waits for one
            # of those to end, when that comes in the deadline (for an open breaker only after
            # a first round: the first answers "not now" at once). After failures, a backoff,
            # or the Retry-After of a 429 when every deployment left asked for a pause.
            now, usable = time.monotonic(), _usable(ctx, chain)
            if tried.attempts == attempts_before and (rounds > 1 or tried.last_error is None):
                wait, probes = self._reopening_wait(tried, usable, now, deadline,
                                                    breakers=rounds > 1)
            else:
                wait, probes = self._next_round_wait(tried, usable, rounds, now, deadline), []
            if wait is None:
                raise self._final_error(ctx, tried, chain)
            # A client that leaves while the request waits ends it there (ClientDisconnected:
            # the layers above settle it as they would a call cut short), not after the wait
            # with another call it would never read, its quota slot held meanwhile.
            await run_until_disconnect(_round_wait(wait, probes), receive, ctx)
            tried.excluded = set(tried.ineligible)

    def _rerouted(self, ctx: RequestContext, rerouted: Rerouted,
                  tried: Tried) -> tuple[Route, Tried]:
        """A layer below sent the request to another model before any call went out (a quota
        downgrade): from now on it is a request for that model, and is routed as one (its
        route, its deployments, their health, its fallbacks). The pick that met it was
        never called: its route headers go."""
        route_to(ctx, rerouted.model)  # (a hedged call met it in a copy of the context)
        tried.set_headers(ctx, [])
        route = self.routes.get(ctx.model, self.default)
        renewed = self._tried(ctx, route, tried.wanted_tags)
        renewed.attempts = tried.attempts
        return route, renewed

    def may_hedge(self, tried: Tried) -> bool:
        """A hedged second call is a retry: it needs an attempt and the retry budget."""
        if tried.attempts >= self.retry.max_attempts or not self.budget.try_retry():
            return False
        self.counters["hedges"] += 1
        return True

    def hedge_not_made(self) -> None:
        """A hedged call `may_hedge` allowed was refused by its adapter: it never went out."""
        self.budget.give_back()
        self.counters["hedges"] -= 1

    def retry_not_made(self) -> None:
        """A retry `_may_retry` allowed was refused by its adapter: it never went out."""
        self.budget.give_back()
        self.counters["retries"] -= 1

    def _tried(self, ctx: RequestContext, route: Route, wanted: frozenset[str]) -> Tried:
        """Bookkeeping for a request, with the deployments of its model and of every fallback
        it may go to that it can never use out for every round: those whose provider cannot
        serve its operation, and those without every tag it asks for (`x-sluicegate-tags`:
        a region pin must hold on the fallbacks too)."""
        tried = Tried()
        tried.rate_limited = ctx.operation not in NO_VERDICT_OPERATIONS
        unable = self._unable_for(ctx, route)
        untagged = NO_STATES if not wanted else frozenset(
            state for model in self._every_model(ctx.model, route)
            if (group := self.group(ctx, model)) is not None
            for state in group.deployments if not wanted <= state.tags)
        if unable or untagged:
            tried.unable, tried.ineligible = unable, unable | untagged
            tried.excluded = set(tried.ineligible)
        tried.wanted_tags = wanted
        return tried

    def _unable_for(self, ctx: RequestContext, route: Route) -> frozenset[DeploymentState]:
        """The deployments of the model and its fallbacks that cannot serve the request's
        operation (remembered per operation and model: the groups never change)."""
        by_model = self.unable.get(ctx.operation)
        if by_model is None:
            return NO_STATES
        states = self._unable_states.get((ctx.operation, ctx.model))
        if states is None:
            states = self._unable_states[ctx.operation, ctx.model] = frozenset(
                state for model in self._every_model(ctx.model, route)
                if (names := by_model.get(model)) and (group := self.group(ctx, model)) is not None
                for state in group.deployments if state.name in names)
        return states

    def _every_model(self, model: str, route: Route) -> list[str]:
        """The model and every fallback a request for it may go to."""
        return [*(self._chains.get(model) or self._chain(model, route)),
                *route.context_window_fallbacks, *route.content_policy_fallbacks]

    def _chain(self, model: str, route: Route) -> list[str]:
        chain = self._chains[model] = [model, *route.fallbacks]
        return chain

    def _may_retry(self, tried: Tried, now: float, deadline: float) -> bool:
        if tried.attempts >= self.retry.max_attempts or now >= deadline:
            return False
        if not self.budget.try_retry():
            self.counters["budget_refusals"] += 1
            return False
        self.counters["retries"] += 1
        return True

    def after_failure(self, error: UpstreamError, state: DeploymentState, key: KeyState | None,
                      tried: Tried, ctx: RequestContext) -> list[str] | None:
        """Records a failed attempt (an operation in NO_VERDICT_OPERATIONS records nothing: the
        deployment, or its key, is only out for this request); returns a new fallback chain
        when the error asks for one, None to go on with the current one, and raises when the
        error goes back to the caller as it is."""
        tried.last_error = error
        kind = classify(error, self.retry.retry_on)
        retry_after = parse_retry_after(error.retry_after) if error.status == 429 else None
        if ctx.operation in NO_VERDICT_OPERATIONS:
            _no_verdict(state, key)
        else:
            self._record_failure(error, kind, retry_after, state, key)
        if kind == AUTH and key is not None:
            tried.exclude_key(key.key.env)
            logger.warning("provider key %s of %s failed with %s; trying another",
                           key.key.env, state.name, error.status)
            return None
        if kind in (RETRYABLE, FATAL, AUTH):
            tried.exclude(state)
            if kind == AUTH:  # (its one key: the same call would fail again, every round)
                tried.ineligible = tried.ineligible | {state}
            if retry_after:
                tried.pause(state, time.monotonic() + retry_after)
            if kind == FATAL:
                raise error
            return None
        if kind in (CONTEXT_WINDOW, CONTENT_POLICY):
            route = self.routes.get(ctx.model, self.default)
            fallbacks = route.context_window_fallbacks if kind == CONTEXT_WINDOW \
                else route.content_policy_fallbacks
            # It would refuse this request again: out for every round, and so is a fallback
            # model with nothing else left to ask.
            tried.ineligible = tried.ineligible | {state}
            tried.exclude(state)
            chain = [model for model in fallbacks if (group := self.groups.get(model)) is None
                     or any(s not in tried.ineligible for s in group.deployments)]
            if chain:
                return chain
        raise error

    def _record_failure(self, error: UpstreamError, kind: str, retry_after: float | None,
                        state: DeploymentState, key: KeyState | None) -> None:
        """What a failed call says of its deployment's health and of its key's."""
        if kind == AUTH and key is not None:
            key.failures += 1
            key.last_error = f"{error.status} {error.upstream_error_type or ''}".strip()
            key.breaker.record(True)
            state.breaker.record(False)  # the deployment answered; its key is the problem
            state.probe_ended(False)  # (which says nothing of a 429's pause: no verdict)
        elif kind in (RETRYABLE, FATAL, AUTH):
            # AUTH here: the provider's own key failed; another deployment may have a good one.
            state.failures += 1
            state.record(True)
            if key is not None:
                key.breaker.record(False)
            if retry_after:  # (a huge or bogus one takes it out of rotation only so long)
                state.cool_down(time.monotonic() + min(retry_after,
                                                       self.retry.max_retry_after_s))
        else:
            state.record(False)  # the deployment works; the request was the problem
            if key is not None:
                key.breaker.release()

    def _next_round_wait(self, tried: Tried, models: list[str], rounds: int, now: float,
                         deadline: float) -> float | None:
        """How long to wait after failed attempts before trying the chain again: a backoff
        while any eligible deployment of `models` may be called after one, else until the
        first of their 429 pauses (the provider's Retry-After) ends; None to give up, when
        that does not fit the deadline."""
        if tried.attempts >= self.retry.max_attempts:
            return None
        eligible = self._eligible(models, tried)
        return backoff_s(rounds, base_s=self.retry.backoff_base_s,
                         cap_s=self.retry.backoff_cap_s,
                         retry_after_s=tried.pause_s(eligible, now) if eligible else None,
                         remaining_s=deadline - now)

    def _reopening_wait(self, tried: Tried, models: list[str], now: float, deadline: float, *,
                        breakers: bool) -> tuple[float | None, list[asyncio.Future[None]]]:
        """For a round that found nothing to call: until the soonest cool-down of the eligible
        deployments of `models` (the chain's that the caller's key may use) ends or
        (`breakers`) an open breaker half-opens, when that is before the deadline, and the
        probes out after a cool-down, whose end (their futures) ends the wait early; with only
        probes to wait for, at most until the deadline. None (answer now) when nothing comes
        in time."""
        soonest, probes = math.inf, []
        for model in models:
            group = self.groups.get(model)
            for state in group.deployments if group is not None else ():
                if state in tried.ineligible:
                    continue
                cooling = state.cooling_s(now) if tried.rate_limited else None
                if cooling == 0.0:  # its cool-down ended, its probes are out
                    probes.append(state.probe_settled())
                elif cooling is not None:
                    soonest = min(soonest, cooling)
                if breakers and (reopens := state.breaker.reopens_in_s()) is not None:
                    soonest = min(soonest, reopens)
        left = deadline - now
        if soonest < left:  # (a hair past it: the deployment's own clock decides)
            return min(soonest + 0.001, left), probes
        return (left, probes) if probes and left > 0 else (None, [])

    def _eligible(self, models: list[str], tried: Tried) -> list[DeploymentState]:
        """The deployments of `models` the request may still go to in a later round."""
        return [state for model in models if (group := self.groups.get(model)) is not None
                for state in group.deployments if state not in tried.ineligible]

    def _final_error(self, ctx: RequestContext, tried: Tried, chain: list[str]) -> GatewayError:
        """The answer when no call can be made: the last call's failure, or why none went
        (with a Retry-After of the time until one of the deployments left may take it)."""
        if tried.last_error is not None:
            return tried.last_error
        if tried.gate_refusal is not None:  # a fallback's limits: what the caller can act on
            ctx.state.update(tried.gate_notes)
            return tried.gate_refusal
        requested = ctx.model
        usable_models = _usable(ctx, chain)
        eligible = self._eligible(usable_models, tried)
        now = time.monotonic()
        if tried.pinned is not None:  # nothing that sees the previous response could go
            return unavailable(*tried.pinned, ready_in_s(eligible, tried.bad_keys, now,
                                                         tried.rate_limited))
        cooling = [] if not tried.rate_limited else [
            cooling for state in eligible if (cooling := state.cooling_s(now)) is not None]
        if cooling:
            return GatewayError(
                429, f"Every deployment of model '{requested}' (and its fallbacks) is "
                     "rate-limited by its provider right now.", code="rate_limited",
                headers=[retry_after(min(cooling))])
        usable = [] if not tried.ineligible else [
            state for model in usable_models
            if (group := self.groups.get(model)) is not None for state in group.deployments]
        if usable and all(state in tried.ineligible for state in usable):
            if tried.refusal is not None:  # (those that could serve it could not express it)
                return tried.refusal
            operation = OPERATION_PATHS.get(ctx.operation, ctx.operation)
            if all(state in tried.unable for state in usable):
                return GatewayError(
                    400, f"Model '{requested}' does not support {operation}: no deployment of it"
                         f"{' or of its fallbacks' if len(chain) > 1 else ''} is on a provider "
                         "that serves it.", param="model", code="unsupported_operation")
            serving = f" that serves {operation}" if tried.unable else ""
            return GatewayError(
                400, f"No deployment of model '{requested}' (or its fallbacks){serving} has the "
                     f"tags {', '.join(sorted(tried.wanted_tags))} asked for in "
                     "x-sluicegate-tags.", code="no_deployment_with_tags",
                param="x-sluicegate-tags")
        paced = paced_in_s(eligible, tried.bad_keys, now) if tried.rate_limited else None
        if paced is not None:  # healthy, only paced by their own rpm/tpm: a rate limit
            return GatewayError(
                429, f"Every deployment of model '{requested}' (and its fallbacks) is at its "
                     "requests- or tokens-per-minute limit right now.", code="rate_limited",
                headers=[retry_after(paced)])
        return GatewayError(
            503, f"No deployment of model '{requested}' (or its fallbacks) is healthy right "
                 "now: their circuit breakers are open.", code="no_healthy_deployment",
            headers=[retry_after(ready_in_s(eligible, tried.bad_keys, now,
                                            tried.rate_limited))])

    async def _attempt(self, scope: Scope, receive: Receive, send: Send, ctx: RequestContext,
                       route: Route, state: DeploymentState, key: KeyState | None,
                       tried: Tried, fallback_model: str | None) -> None:
        tried.attempts += 1
        if fallback_model is not None:
            self.count_fallback(ctx, 1)
        ctx.deployment, ctx.provider_key = state.deployment, None if key is None else key.key
        tried.set_headers(ctx, route_headers(state, tried.attempts, fallback_model))
        send, transcript = self.continuable(send, ctx, route)
        state.started(tried.rate_limited)
        began = time.monotonic()
        outcome = "cancelled"
        try:
            await self.call(scope, receive, send, ctx, route, state)
            outcome = "answered"
        except UpstreamError:
            outcome = "failed"  # after_failure records it
            raise
        except (UntranslatableRequest, Rerouted):
            # Refused (or sent to another model) before any call: neither an attempt nor a
            # fallback (and, as "cancelled", no verdict on health).
            tried.attempts -= 1
            state.refused(tried.rate_limited)
            if fallback_model is not None:
                self.count_fallback(ctx, -1)
            raise
        except StreamInterrupted as interrupted:
            outcome = "broken"
            assert transcript is not None
            await self.continue_broken(scope, receive, send, ctx, route, state, key, tried,
                                       transcript, interrupted)
            return
        finally:
            state.finished(ctx.usage if outcome == "answered" else None)
            if outcome == "cancelled":  # client gone, or a refusal from below: no verdict
                state.release(tried.rate_limited)
                if key is not None:
                    key.breaker.release()
        self.succeeded(ctx, state, key, began)

    def count_fallback(self, ctx: RequestContext, step: int) -> None:
        """A call to a fallback model made (1), or found not made (-1): the request's
        count (`failover.fallbacks`: metering, metrics, and the cache, which keeps no
        answer of a fallback under the model asked for) and the layer's. Each call counts,
        `_attempt`'s and each of a hedge's (`Hedge`)."""
        ctx.state["failover.fallbacks"] = ctx.state.get("failover.fallbacks", 0) + step
        self.counters["fallbacks"] += step

    def continuable(self, send: Send, ctx: RequestContext,
                    route: Route) -> tuple[Send, Transcript | None]:
        """For a stream the route continues: `send` noting the text sent, and the adapter
        told to leave a broken stream open. Otherwise `send` as it is."""
        if not (route.continuation and ctx.stream and ctx.operation in CONTINUABLE):
            return send, None
        ctx.continue_streams = True
        transcript = Transcript(ctx.api_format)
        return transcript_tee(send, transcript), transcript

    async def call(self, scope: Scope, receive: Receive, send: Send, ctx: RequestContext,
                   route: Route, state: DeploymentState) -> None:
        """One call to the app below; a stream is held to the route's TTFT timeout when it
        has one (a non-stream answer comes whole when the model is done: the provider's
        `total_s` bounds it, as its `first_byte_s` bounds only streams)."""
        if route.ttft_timeout_s is None or not ctx.stream:
            await self.app(scope, receive, send)
        else:
            await self.call_with_ttft_timeout(scope, receive, send, route.ttft_timeout_s,
                                              state, ctx)

    async def continue_broken(self, scope: Scope, receive: Receive, send: Send,
                              ctx: RequestContext, route: Route, state: DeploymentState,
                              key: KeyState | None, tried: Tried, transcript: Transcript,
                              interrupted: StreamInterrupted) -> None:
        """Records a stream that broke after it started as its error would be before output,
        then continues it elsewhere when its error would be retried before output: not when
        the caller must fix its request (another deployment would refuse it too), nor when
        the operator chose not to retry it (FATAL, outside `RetryPolicy.retry_on`). Then its
        error ends the stream. A stream whose answer had ended (its finish reason or
        stop_reason went out; the break lost only `[DONE]` or `message_stop`) is ended as it
        would have been: continued, it got a second answer after the first, billed."""
        error = interrupted.error
        assert isinstance(error, UpstreamError)  # (the passthrough's, providers/base.py)
        kind = classify(error, self.retry.retry_on)
        self._record_failure(error, kind, None, state, key)
        if transcript.finished:  # (the answer ended: only its last event was lost)
            await send({"type": "http.response.body", "more_body": False,
                        "body": _ANTHROPIC_STOP if ctx.api_format == "anthropic" else
                        b"data: [DONE]\n\n"})
            return
        if kind not in (RETRYABLE, AUTH):
            await self._end_broken_stream(send, ctx, interrupted)
            return
        tried.exclude(state)
        await self._continue(scope, receive, send, ctx, route, tried, transcript, interrupted)

    async def _continue(self, scope: Scope, receive: Receive, send: Send,
                        ctx: RequestContext, route: Route, tried: Tried, transcript: Transcript,
                        interrupted: StreamInterrupted) -> None:
        """Continues a broken stream from the next deployment (see continuation.py), or ends
        it with the in-band error event when that is not possible. A deployment whose adapter
        cannot express the continuation is passed over, as in the attempt loop."""
        ctx.continue_streams = False  # one continuation per request
        if transcript.plain and transcript.text:
            # What the broken call used: its provider's counts, or (when it never said) the
            # passthrough's floor for a stream cut short, raised to the estimate of the text
            # it delivered (one token a delta undercounts deltas of several words).
            estimate = estimated_usage(ctx, transcript.text)
            reported = ctx.usage
            broken_usage = estimate if reported is None else Usage(
                reported.input_tokens or estimate.input_tokens,
                max(reported.output_tokens, estimate.output_tokens),
                reported.cached_input_tokens, reported.reasoning_tokens,
                reported.cache_write_tokens, reported.cache_write_1h_tokens)
            while (target := await self._next_for_continuation(ctx, route, tried)) is not None:
                try:
                    await self._continue_at(scope, receive, send, ctx, tried, transcript,
                                            interrupted, broken_usage, *target)
                    return
                except UntranslatableRequest as refusal:  # (no call went out: `_continue_at`)
                    tried.refuse(target[0], refusal)
                    self.retry_not_made()
        await self._end_broken_stream(send, ctx, interrupted)

    async def _continue_at(self, scope: Scope, receive: Receive, send: Send,
                           ctx: RequestContext, tried: Tried, transcript: Transcript,
                           interrupted: StreamInterrupted, broken_usage: Usage,
                           state: DeploymentState, key: KeyState | None,
                           model: str) -> None:
        """One continuation call, relayed into the open response; its failure ends the
        stream with the in-band error event. A refusal by its adapter leaves the request as
        it found it, and goes to the caller (`_continue`) to try the next deployment. A layer
        below that ends the stream without a call (no Attempt in `ctx.attempts`) leaves no
        verdict on the deployment, and no attempt or retry is counted. A continuation on a
        fallback `model` is a call to a fallback (`count_fallback`): the layers that charge
        the model that answered (the quota layer) and keep no fallback's answer (the cache)
        see it."""
        tried.attempts += 1
        fallback = model != ctx.model
        if fallback:
            self.count_fallback(ctx, 1)
        reported, served = ctx.usage, (ctx.deployment, ctx.provider_key, ctx.served_deployment)
        ctx.state["failover.continuations"] = 1
        # What the broken attempt streamed costs what it cost where it ran (the price is
        # still the served deployment's here), whatever the continuation's price.
        ctx.state[EARLIER_ATTEMPT] = (broken_usage, call_cost_micros(ctx, broken_usage))
        original = ctx.body
        ctx.body = continuation_body(ctx, transcript.text)
        ctx.deployment, ctx.provider_key = state.deployment, None if key is None else key.key
        ctx.usage = None
        calls_before = len(ctx.attempts)  # (the passthrough notes each call it makes there)
        both = BothParts(ctx, broken_usage)
        state.started()
        began = time.monotonic()
        outcome = "cancelled"
        try:
            await self.app(scope, receive,
                           ContinuationRelay(both.tee(send), ctx.api_format, transcript))
            # A layer below may end the stream itself instead of calling (the quota layer's
            # cut-off, with no room left in the budget for the continuation): nothing was
            # learnt of the deployment.
            outcome = "answered" if len(ctx.attempts) > calls_before else "uncalled"
        except UpstreamError as error:
            outcome = "failed"
            self.after_failure_quietly(error, state, key, tried)
            ctx.usage = broken_usage
            await self._end_broken_stream(send, ctx, interrupted)
            return
        except UntranslatableRequest:  # refused before any call: neither an attempt nor a
            tried.attempts -= 1  # continuation (and, as "cancelled", no verdict on health)
            outcome = "refused"
            state.refused()
            ctx.usage, (ctx.deployment, ctx.provider_key, ctx.served_deployment) = reported, served
            del ctx.state["failover.continuations"], ctx.state[EARLIER_ATTEMPT]
            if fallback:
                self.count_fallback(ctx, -1)
            raise
        finally:
            ctx.body = original
            state.finished(both.continuation if outcome == "answered" else None)
            if outcome in ("cancelled", "refused", "uncalled"):  # client gone, a cut-off
                state.release()  # from above, a refusal from below, no call: no verdict
                if key is not None:
                    key.breaker.release()
            if outcome == "cancelled":  # what both parts delivered: the broken one's is
                both.sum()  # priced where it ran
        if outcome == "uncalled":  # neither an attempt nor a retry, and no rpm token spent
            tried.attempts -= 1
            if fallback:
                self.count_fallback(ctx, -1)
            state.refused()
            self.retry_not_made()
        else:
            self.succeeded(ctx, state, key, began)
        both.sum()

    async def _next_for_continuation(self, ctx: RequestContext, route: Route, tried: Tried
                                     ) -> tuple[DeploymentState, KeyState | None, str] | None:
        if tried.attempts >= self.retry.max_attempts:
            return None
        for model in self._chains.get(ctx.model) or self._chain(ctx.model, route):
            group = self.group(ctx, model) if _may_use(ctx, model) else None
            state = group.pick(tried.excluded) if group is not None else None
            if state is None:
                continue
            key = state.pick_key(tried.bad_keys)
            if state.keys and key is None:
                state.release()
                continue
            if not self.budget.try_retry():  # asked only with somewhere to go
                self.counters["budget_refusals"] += 1
                state.release()
                if key is not None:
                    key.breaker.release()
                return None
            self.counters["retries"] += 1
            # (after the retry budget: a gate admits the request where it is sure to go)
            if model != ctx.model and self.gates and \
                    not await self._passes_gates(ctx, model, tried):
                state.release()
                if key is not None:
                    key.breaker.release()
                self.retry_not_made()
                continue
            return state, key, model
        return None

    def after_failure_quietly(self, error: UpstreamError, state: DeploymentState,
                              key: KeyState | None, tried: Tried) -> None:
        """Records a failed call whose error goes nowhere (the response already started), as
        a failure before output is recorded (a request the caller must fix is no failure of
        the deployment), with no cool-down (nothing here says how long)."""
        tried.last_error = error
        self._record_failure(error, classify(error, self.retry.retry_on), None, state, key)

    async def _end_broken_stream(self, send: Send, ctx: RequestContext,
                                 interrupted: StreamInterrupted) -> None:
        # Only a stream `continuable` made so gets here (StreamInterrupted needs
        # ctx.continue_streams): a CONTINUABLE operation, whose error event has no number.
        ctx.error_type = interrupted.error.code
        await send({"type": "http.response.body", "more_body": False,
                    "body": stream_error_ending(ctx.api_format, interrupted.error,
                                                operation=ctx.operation)})

    async def call_with_ttft_timeout(self, scope: Scope, receive: Receive, send: Send,
                                     ttft_s: float, state: DeploymentState,
                                     ctx: RequestContext) -> None:
        """Calls the app below; a stream not started within `ttft_s` is abandoned (the call
        is cancelled, which closes the upstream connection) and fails over."""
        started = False
        try:
            async with asyncio.timeout(ttft_s) as timer:
                def send_ending_timer(message: Message) -> Awaitable[None]:
                    nonlocal started  # (returns `send`'s awaitable: no coroutine per message)
                    if message["type"] == "http.response.start":
                        started = True
                        timer.reschedule(None)
                    return send(message)
                await self.app(scope, receive, send_ending_timer)
        except TimeoutError:
            if started or ctx.client_disconnected:
                raise
            raise UpstreamError(504, f"Deployment '{state.name}' sent no first byte within "
                                     f"{ttft_s:g} s.", provider=state.deployment.provider,
                                error_type="timeout", retryable=True) from None

    def succeeded(self, ctx: RequestContext, state: DeploymentState, key: KeyState | None,
                  began: float) -> None:
        """Records a call that answered. A stream that broke after it started (it ended with
        an in-band error event) is judged as its error would be before output: the provider's
        failure counts against the deployment, a request the caller must fix does not. An
        operation in NO_VERDICT_OPERATIONS records nothing (its breaker and cool-down slots
        go back)."""
        if ctx.operation in NO_VERDICT_OPERATIONS:
            _no_verdict(state, key)
            return
        now = time.monotonic()
        error: UpstreamError | None = ctx.stream_error
        if error is not None:  # (an in-band error has no Retry-After: no cool-down)
            self._record_failure(error, classify(error, self.retry.retry_on), None, state, key)
        else:
            state.breaker.record(False, now)
            if state.cool_until:  # (`state.record`, inline: the success path pays one test)
                state.probe_ended(True, now)
            if key is not None:
                key.breaker.record(False, now)
        if state.tracks_ttft and ctx.first_byte_s is not None:
            state.observe_ttft(max(0.0, ctx.started_monotonic + ctx.first_byte_s - began), now)

    def _hedge_partner(self, ctx: RequestContext, model: str, first: DeploymentState,
                       tried: Tried) -> tuple[DeploymentState, KeyState | None] | None:
        group = self.groups.get(model)
        if group is None or len(group.deployments) < 2:
            return None
        second = group.pick(tried.excluded | {first}, tried.rate_limited)
        if second is None:
            return None
        key = second.pick_key(tried.bad_keys)
        if second.keys and key is None:
            second.release(tried.rate_limited)
            return None
        return second, key

    def metric_samples(self) -> list[Sample]:
        """Gauges for /metrics: each deployment's breaker (0 closed, 1 half-open, 2 open)."""
        help_ = "Circuit breaker of a deployment: 0 closed, 1 half-open, 2 open."
        return [("sluicegate_breaker_state", help_,
                 {"model": group.model, "deployment": state.name},
                 float(_BREAKER_LEVELS[state.breaker.state]))
                for group in self.groups.values() for state in group.deployments]

    # -- admin -----------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        return {
            "counters": dict(self.counters),
            "shared": None if self.shared is None else self.shared.describe(),
            "models": {name: {"strategy": group.strategy,
                              "deployments": [state.describe() for state in group.deployments]}
                       for name, group in sorted(self.groups.items())},
        }


def _no_verdict(state: DeploymentState, key: KeyState | None) -> None:
    """A call of an operation in NO_VERDICT_OPERATIONS ended, with nothing learnt of its
    deployment's health (or its key's): the slots `available` and `pick_key` counted
    (half-open breakers; no cool-down's: such calls are not `Tried.rate_limited`) go back."""
    state.release(rate_limited=False)
    if key is not None:
        key.breaker.release()


def _usable(ctx: RequestContext, chain: list[str]) -> list[str]:
    """The models of `chain` the caller's key may be served by (the one it asked for, and
    the fallbacks `_may_use` allows): only their cool-downs are worth waiting for."""
    return [model for model in chain if model == ctx.model or _may_use(ctx, model)]


async def _round_wait(wait: float, probes: list[asyncio.Future[Any]]) -> None:
    """The wait between rounds: `wait` seconds, or until one of `probes` ends (the futures
    are shared with other requests: never cancelled here; `asyncio.wait` leaves them be)."""
    if probes:
        await asyncio.wait(probes, timeout=wait)
    else:
        await asyncio.sleep(wait)


def _may_use(ctx: RequestContext, model: str) -> bool:
    """Whether the caller's key may be served by `model` (auth checked only the model it
    asked for)."""
    principal = ctx.principal
    return principal is None or principal.allows_model(model)
