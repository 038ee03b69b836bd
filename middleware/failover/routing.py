"""Picking a deployment: per-deployment state and the load-balancing strategies.

Pure and clock-driven (no I/O). A `Group` holds one public model's deployments; `pick` returns
the next one to try among those that are healthy (breaker allows), not excluded by the request
(failed in it already, or out for all of it: `Tried.ineligible`, which holds those whose
provider cannot serve its operation and those whose adapter refused to translate it), not
cooling down after a 429, and within their rpm/tpm capacity. A request that is not
`rate_limited` (token counting, limited apart from messages: policy.NO_VERDICT_OPERATIONS)
needs only a healthy breaker, and takes no rpm token and no cool-down probe.

After a 429's cool-down (`DeploymentState.cool_down`) a deployment takes `half_open_probes`
calls at a time, as a breaker does after its own: the others wait (the layer's
`_reopening_wait`) for a probe to answer, which ends the cool-down, to be refused with
another 429, which starts a new one, or to end otherwise, which gives its slot to the next.
Like the breaker's, the count is per process and any call's outcome counts for it, but token
counting's (the layer records none: policy.NO_VERDICT_OPERATIONS). (It is not the breaker
itself: a cool-down is no failure, and with shared health a breaker opened by one process
alone is closed again by the others' view.)

Strategies (`Route.strategy`):
- "weighted": weighted random (the default);
- "least-busy": fewest calls in flight (ties broken at random);
- "latency": power of two choices over a peak-EWMA of time to first byte, weighted by the
  calls in flight (Finagle's peak EWMA: a slow observation is taken at once, a fast one
  decays in over `EWMA_TAU_S`);
- "lowest-cost": cheapest list price (input + output per million tokens) first;
- "priority": in the order the deployments are declared.
"""
from __future__ import annotations

import asyncio
import math
import operator
import random
import time
from collections.abc import Callable, Iterable, Sequence
from collections.abc import Set as AbstractSet
from decimal import Decimal
from typing import Any

from gateway.context import RequestContext, Usage
from gateway.errors import GatewayError, UntranslatableRequest, UpstreamError
from gateway.upstream import Deployment, ProviderKey
from middleware.failover.health import BreakerSettings, CircuitBreaker

__all__ = ["NO_STATES", "NO_TAGS", "STRATEGIES", "DeploymentState", "Group", "KeyState", "Tried",
           "paced_in_s", "ready_in_s", "requested_tags", "retry_after", "route_headers"]

STRATEGIES = ("weighted", "least-busy", "latency", "lowest-cost", "priority")
EWMA_TAU_S = 10.0
_H_DEPLOYMENT, _H_ATTEMPTS, _H_FALLBACK = (b"x-sluicegate-deployment", b"x-sluicegate-attempts",
                                           b"x-sluicegate-fallback")


class KeyState:
    """One provider key of a deployment: its breaker and what it has done."""

    __slots__ = ("breaker", "failures", "key", "last_error")

    def __init__(self, key: ProviderKey, breaker: CircuitBreaker) -> None:
        self.key = key
        self.breaker = breaker
        self.failures = 0
        self.last_error: str | None = None

    def describe(self) -> dict[str, Any]:
        return {"key": self.key.env, "breaker": self.breaker.state, "failures": self.failures,
                "last_error": self.last_error}


class DeploymentState:
    """A deployment's health, load and latency as this process sees them."""

    __slots__ = ("_ewma_at", "_rpm_tokens", "_settled", "_tpm_tokens", "_updated", "breaker",
                 "clock", "cool_probes", "cool_until", "cost", "deployment", "ewma_ttft_s",
                 "failures", "first_headers", "header", "in_flight", "keys", "requests",
                 "shared_ttft_s", "tags", "tracks_ttft")

    def __init__(self, deployment: Deployment, breaker: BreakerSettings,
                 clock: Callable[[], float]) -> None:
        self.deployment = deployment
        self.clock = clock
        self.header = deployment.name.encode("latin-1", "replace")
        self.tags = frozenset(deployment.tags)
        # The route headers of a first attempt (shared by every such request: never mutated).
        self.first_headers = [(_H_DEPLOYMENT, self.header), (_H_ATTEMPTS, b"1")]
        self.breaker = CircuitBreaker(breaker, clock=clock)
        self.keys = [KeyState(key, CircuitBreaker(breaker, clock=clock))
                     for key in deployment.keys]
        self.in_flight = 0
        self.requests = 0
        self.failures = 0
        self.ewma_ttft_s = 0.0
        self.shared_ttft_s: float | None = None  # other instances' view (shared health)
        # Kept for the latency strategy and for shared health (both set it); the EWMA costs
        # an exp() per call, which other strategies need not pay.
        self.tracks_ttft = False
        self._ewma_at = 0.0
        # After a 429 with Retry-After: when its cool-down ends, kept (then in the past) until
        # a call after it answered; 0.0 otherwise. `cool_probes`: the calls let through since
        # it ended, awaited by `_settled` (made when a request waits on them).
        self.cool_until = 0.0
        self.cool_probes = 0
        self._settled: asyncio.Future[None] | None = None
        price = deployment.price
        self.cost = (price.input_per_mtok + price.output_per_mtok) if price is not None \
            else Decimal("Infinity")
        self._rpm_tokens = float(deployment.rpm or 0)
        self._tpm_tokens = float(deployment.tpm or 0)
        self._updated = clock()

    @property
    def name(self) -> str:
        return self.deployment.name

    def available(self, now: float, rate_limited: bool = True) -> bool:
        """Healthy and within capacity; a half-open breaker counts its probe here, and so does
        a 429's cool-down that ended (`_may_probe`). Not `rate_limited`: healthy."""
        if not rate_limited:
            return self.breaker.allows()
        if (self.deployment.rpm is not None or self.deployment.tpm is not None) and \
                self.refills_in_s(now) is not None:
            return False
        if self.cool_until:  # (one test, as the comparison it replaced, when not cooling)
            return self._may_probe(now)
        return self.breaker.allows()

    def _may_probe(self, now: float) -> bool:
        """Nothing until the cool-down ends, then `half_open_probes` calls at a time (each
        counted here) until one answers: the requests that waited for it do not all go at
        once into the provider's rate limit."""
        if now < self.cool_until or self.cool_probes >= self.breaker.settings.half_open_probes:
            return False
        if not self.breaker.allows():
            return False
        self.cool_probes += 1
        return True

    def cool_down(self, until: float) -> None:
        """A 429 asked for a pause until `until` (this clock): no call until then, then a
        probe. A probe out now is over (this may be its answer); its waiters look again."""
        self.cool_until, self.cool_probes = until, 0
        self._wake()

    def cooling_s(self, now: float) -> float | None:
        """How long a cool-down holds calls back: the seconds until it ends, 0.0 when it ended
        but its probes are out (until one of them ends: `probe_settled`); None when it does
        not (no cool-down, or a probe may go now)."""
        if not self.cool_until:
            return None
        if now < self.cool_until:
            return self.cool_until - now
        return 0.0 if self.cool_probes >= self.breaker.settings.half_open_probes else None

    def probe_settled(self) -> asyncio.Future[None]:
        """Done when a probe after the cool-down ends, or a new cool-down starts."""
        if self._settled is None:
            self._settled = asyncio.get_running_loop().create_future()
        return self._settled

    def probe_ended(self, answered: bool, now: float | None = None) -> None:
        """A call `available` let through ended. Answered (the provider took it) after the
        cool-down: the cool-down is over and everyone may go. Otherwise (refused, failed,
        cancelled): its probe slot is given back, for the next waiter to take."""
        if not self.cool_until:
            return
        if answered:
            if (self.clock() if now is None else now) < self.cool_until:
                return  # a call made before the 429 says nothing of the pause it asked for
            self.cool_until, self.cool_probes = 0.0, 0
        elif self.cool_probes:
            self.cool_probes -= 1
        else:
            return
        self._wake()

    def record(self, failed: bool, now: float | None = None) -> None:
        """The outcome of a call `available` let through, for the breaker and the cool-down."""
        self.breaker.record(failed, now)
        if self.cool_until:
            self.probe_ended(not failed, now)

    def release(self, rate_limited: bool = True) -> None:
        """A call `available` let through ended without a verdict (cancelled, or refused
        before it reached the deployment): the breaker's and the cool-down's slots go back
        (a call that is not `rate_limited` took none of the cool-down's)."""
        self.breaker.release()
        if self.cool_until and rate_limited:
            self.probe_ended(False)

    def _wake(self) -> None:
        settled, self._settled = self._settled, None
        if settled is not None and not settled.done():
            settled.set_result(None)

    def _refill(self, now: float) -> None:
        elapsed, self._updated = now - self._updated, now
        if self.deployment.rpm is not None:
            rpm = self.deployment.rpm
            self._rpm_tokens = min(rpm, self._rpm_tokens + elapsed * rpm / 60)
        if self.deployment.tpm is not None:
            tpm = self.deployment.tpm
            self._tpm_tokens = min(tpm, self._tpm_tokens + elapsed * tpm / 60)

    def refills_in_s(self, now: float) -> float | None:
        """How long until its own rpm/tpm capacity takes a call again (inf: never, a limit of
        0); None when it has some, or no such limit."""
        rpm, tpm = self.deployment.rpm, self.deployment.tpm
        if rpm is None and tpm is None:
            return None
        self._refill(now)
        wait = None
        if rpm is not None and self._rpm_tokens < 1 - 1e-9:
            wait = (1 - self._rpm_tokens) * 60 / rpm if rpm > 0 else math.inf
        if tpm is not None and self._tpm_tokens <= 0:
            wait = max(wait or 0.0, -self._tpm_tokens * 60 / tpm if tpm > 0 else math.inf)
        return wait

    def started(self, rate_limited: bool = True) -> None:
        """A call goes out; it takes an rpm token when it is `rate_limited`."""
        self.in_flight += 1
        self.requests += 1
        if rate_limited and self.deployment.rpm is not None:
            self._refill(self.clock())
            self._rpm_tokens -= 1

    def refused(self, rate_limited: bool = True) -> None:
        """The call `started` counted never went out (its adapter refused the request): its
        rpm token goes back. (`finished` still ends the call, `release` its slots.)"""
        rpm = self.deployment.rpm
        if rate_limited and rpm is not None:
            self._refill(self.clock())
            self._rpm_tokens = min(rpm, self._rpm_tokens + 1)

    def finished(self, usage: Usage | None) -> None:
        """A call ended; what it used (None: nothing known) counts against the tpm capacity."""
        self.in_flight -= 1
        if self.deployment.tpm is not None and usage is not None:
            self._refill(self.clock())  # the call's own time refills first, then it pays
            self._tpm_tokens -= usage.input_tokens + usage.output_tokens

    def observe_ttft(self, ttft_s: float, now: float | None = None) -> None:
        """Peak EWMA: a slower sample is taken at once, a faster one decays in."""
        if now is None:
            now = self.clock()
        if ttft_s >= self.ewma_ttft_s:
            self.ewma_ttft_s = ttft_s
        else:
            weight = math.exp(-(now - self._ewma_at) / EWMA_TAU_S)
            self.ewma_ttft_s = self.ewma_ttft_s * weight + ttft_s * (1 - weight)
        self._ewma_at = now

    def latency_score(self) -> float:
        ttft = self.ewma_ttft_s
        if self.shared_ttft_s is not None:
            ttft = max(ttft, self.shared_ttft_s)
        return ttft * (self.in_flight + 1)

    def pick_key(self, bad: AbstractSet[str]) -> KeyState | None:
        """A key, at random, among those whose breaker allows a call and that have not failed
        in this request (keys share the deployment's load evenly)."""
        if not self.keys:
            return None
        usable = [state for state in self.keys if state.key.env not in bad]
        random.shuffle(usable)  # an unusable key's share spreads over all the others
        return next((state for state in usable if state.breaker.allows()), None)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name, "provider": self.deployment.provider,
            "model": self.deployment.model, "weight": self.deployment.weight,
            "tags": list(self.deployment.tags), "breaker": self.breaker.state,
            "in_flight": self.in_flight, "requests": self.requests, "failures": self.failures,
            "ewma_ttft_ms": round(self.ewma_ttft_s * 1000, 3),
            "shared_ttft_ms": None if self.shared_ttft_s is None
            else round(self.shared_ttft_s * 1000, 3),
            "cooling_s": round(max(0.0, self.cool_until - self.clock()), 3),
            "cool_down_probes": self.cool_probes,
            "rpm": self.deployment.rpm, "tpm": self.deployment.tpm,
            "keys": [key.describe() for key in self.keys],
        }


class Group:
    """One public model's deployments and the strategy that picks among them."""

    __slots__ = ("_cumulative", "_total_weight", "clock", "deployments", "model", "only",
                 "strategy")

    def __init__(self, model: str, deployments: Sequence[Deployment], *, strategy: str,
                 breaker: BreakerSettings, clock: Callable[[], float] = time.monotonic) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r} (known: {', '.join(STRATEGIES)})")
        self.model = model
        self.strategy = strategy
        self.clock = clock
        self.deployments = [DeploymentState(d, breaker, clock) for d in deployments]
        for state in self.deployments:
            state.tracks_ttft = strategy == "latency"
        if strategy == "lowest-cost":
            self.deployments.sort(key=lambda state: state.cost)
        self.only = self.deployments[0] if len(self.deployments) == 1 else None
        weights = [max(0.0, float(state.deployment.weight)) for state in self.deployments]
        self._total_weight = sum(weights)
        running, self._cumulative = 0.0, []
        for weight in weights:
            running += weight
            self._cumulative.append(running)

    def pick(self, excluded: AbstractSet[DeploymentState],
             rate_limited: bool = True) -> DeploymentState | None:
        """The next deployment to try, or None when none is available (`rate_limited`: see
        the module docstring)."""
        now = self.clock()
        only = self.only
        if only is not None:  # the common single-deployment group
            return None if only in excluded or not only.available(now, rate_limited) else only
        if self.strategy == "weighted":
            return self._weighted(excluded, now, rate_limited)
        candidates = [s for s in self.deployments if s not in excluded]
        if self.strategy in ("priority", "lowest-cost"):
            return next((s for s in candidates if s.available(now, rate_limited)), None)
        if self.strategy == "least-busy":
            random.shuffle(candidates)
            candidates.sort(key=lambda state: state.in_flight)
            return next((s for s in candidates if s.available(now, rate_limited)), None)
        return self._two_choices(candidates, now, rate_limited)

    def _weighted(self, excluded: AbstractSet[DeploymentState], now: float,
                  rate_limited: bool) -> DeploymentState | None:
        if not excluded and self._total_weight > 0:
            first = self.deployments[_bisect(self._cumulative,
                                             random.random() * self._total_weight)]
            if first.available(now, rate_limited):
                return first
            excluded = {*excluded, first}
        rest = [s for s in self.deployments if s not in excluded]
        while rest:
            total = sum(max(0.0, float(s.deployment.weight)) for s in rest)
            if total > 0:
                point, chosen = random.random() * total, rest[-1]
                for state in rest:
                    point -= max(0.0, float(state.deployment.weight))
                    if point < 0:
                        chosen = state
                        break
            else:
                chosen = random.choice(rest)
            if chosen.available(now, rate_limited):
                return chosen
            rest.remove(chosen)
        return None

    def _two_choices(self, candidates: list[DeploymentState], now: float,
                     rate_limited: bool) -> DeploymentState | None:
        # Score first, then ask `available` only of the one chosen (it may count a probe).
        random.shuffle(candidates)
        while candidates:
            if len(candidates) == 1:
                return candidates[0] if candidates[0].available(now, rate_limited) else None
            a, b = candidates[0], candidates[1]
            best, other = (a, b) if a.latency_score() <= b.latency_score() else (b, a)
            if best.available(now, rate_limited):
                return best
            candidates.remove(best)
            del other
        return None

    def state(self, name: str) -> DeploymentState | None:
        return next((s for s in self.deployments if s.name == name), None)


def _bisect(cumulative: list[float], point: float) -> int:
    for index, bound in enumerate(cumulative):
        if point < bound:
            return index
    return len(cumulative) - 1


def ready_in_s(states: Iterable[DeploymentState], bad_keys: AbstractSet[str], now: float,
               rate_limited: bool) -> float:
    """How long until one of `states` may take a call: for each, the longest of its
    breaker's time to half-open, its 429 cool-down and its rpm/tpm refill (for a
    `rate_limited` request) and the soonest of its usable keys' breakers; the shortest of
    those. 0.0 when nothing says (a probe out)."""
    soonest = math.inf
    for state in states:
        waits = [state.breaker.reopens_in_s() or 0.0]
        if rate_limited:
            waits.append(state.cooling_s(now) or 0.0)
            waits.append(state.refills_in_s(now) or 0.0)
        if state.keys:
            keys = [key.breaker.reopens_in_s() or 0.0 for key in state.keys
                    if key.key.env not in bad_keys]
            if not keys:
                continue  # none of its keys may go in this request
            waits.append(min(keys))
        soonest = min(soonest, max(waits))
    return 0.0 if soonest == math.inf else soonest


def paced_in_s(states: Iterable[DeploymentState], bad_keys: AbstractSet[str],
               now: float) -> float | None:
    """When only their own rpm/tpm capacity keeps every one of `states` from a call (the
    breakers of each, and of a key of it, would let one through): the seconds until the
    first refills. None otherwise: something else holds one back, or one is not paced."""
    soonest = math.inf
    for state in states:
        refill = state.refills_in_s(now)
        if refill is None or state.breaker.reopens_in_s() is not None:
            return None
        if state.keys and all(key.key.env in bad_keys or key.breaker.reopens_in_s() is not None
                              for key in state.keys):
            return None
        soonest = min(soonest, refill)
    return soonest if soonest < math.inf else None


def retry_after(wait_s: float) -> tuple[bytes, bytes]:
    """The Retry-After header for a wait: whole seconds, rounded up (a client that waits as
    told finds the deployment ready), at least 1."""
    return b"retry-after", b"%d" % max(1, math.ceil(wait_s))


TAGS_HEADER = b"x-sluicegate-tags"
_NAME = operator.itemgetter(0)  # a header's name


def requested_tags(headers: list[tuple[bytes, bytes]]) -> frozenset[str]:
    """The deployment tags a request asks for: `x-sluicegate-tags: eu, premium` (all must
    be on the deployment). Read whatever the model's own deployments carry: a pin must hold
    on its fallbacks too, and tags no deployment has are the caller's error."""
    if TAGS_HEADER not in map(_NAME, headers):  # (C's loop: every request pays this scan)
        return NO_TAGS
    for name, value in headers:
        if name == TAGS_HEADER:
            return frozenset(tag.strip() for tag in value.decode("latin-1").split(",")
                             if tag.strip())
    return frozenset()


def route_headers(state: DeploymentState, attempts: int,
                  fallback_model: str | None) -> list[tuple[bytes, bytes]]:
    if attempts == 1 and fallback_model is None:
        return state.first_headers
    headers = [(_H_DEPLOYMENT, state.header), (_H_ATTEMPTS, b"%d" % attempts)]
    if fallback_model is not None:
        headers.append((_H_FALLBACK, fallback_model.encode()))
    return headers


class Tried:
    """Per-request bookkeeping of the attempts made so far (the sets are made on the first
    failure: the common request never needs them)."""

    __slots__ = ("attempts", "bad_keys", "excluded", "gate_notes", "gate_refusal", "headers",
                 "ineligible", "last_error", "paused", "pinned", "rate_limited", "refusal",
                 "started", "unable", "wanted_tags")

    def __init__(self) -> None:
        self.attempts = 0
        # Whether the request counts against the deployments' rpm/tpm and is held back by
        # their 429 cool-downs: all but policy.NO_VERDICT_OPERATIONS (limited apart).
        self.rate_limited = True
        self.ineligible: frozenset[DeploymentState] = NO_STATES  # out for every round
        # Of those, the ones whose provider cannot serve the request's operation.
        self.unable: frozenset[DeploymentState] = NO_STATES
        self.wanted_tags: frozenset[str] = NO_TAGS
        self.started = False  # a hedged call started the response: nothing may be retried
        self.excluded: set[DeploymentState] | frozenset[DeploymentState] = NO_STATES
        self.bad_keys: set[str] | frozenset[str] = _NO_KEYS
        self.headers: list[tuple[bytes, bytes]] = []  # this layer's, in ctx.response_headers
        self.last_error: UpstreamError | None = None
        self.refusal: UntranslatableRequest | None = None  # the first adapter's refusal
        # The first refusal of a fallback model by a gate (FailoverMiddleware.add_gate).
        self.gate_refusal: GatewayError | None = None
        self.gate_notes: dict[str, Any] = {}  # what that gate noted in ctx.state
        # Deployment -> until when (this layer's clock) its 429's Retry-After asked this
        # request to leave it alone: one deployment's pause is no reason to stop trying others.
        self.paused: dict[DeploymentState, float] | None = None
        # A Responses API follow-up: (its previous_response_id, the affinity.Pin of where
        # that response was made); only the deployments that see it are eligible.
        self.pinned: tuple[str, Any] | None = None

    def exclude(self, state: DeploymentState) -> None:
        self.excluded = {*self.excluded, state}

    def refuse(self, state: DeploymentState, refusal: UntranslatableRequest) -> None:
        """`state`'s adapter cannot express this request: out for every round of it (and of
        it only: no call was made, so nothing is learnt of the deployment's health)."""
        self.ineligible = self.ineligible | {state}
        self.exclude(state)
        if self.refusal is None:
            self.refusal = refusal

    def gate_refused(self, refusal: GatewayError, states: Iterable[DeploymentState],
                     notes: dict[str, Any]) -> None:
        """A gate refused the request a fallback model, whose deployments are `states`: out
        for every round of it. `notes`: what the gate noted in ctx.state as it refused."""
        self.ineligible = self.ineligible | frozenset(states)
        self.excluded = {*self.excluded, *states}
        if self.gate_refusal is None:
            self.gate_refusal, self.gate_notes = refusal, notes

    def pause(self, state: DeploymentState, until: float) -> None:
        if self.paused is None:
            self.paused = {}
        self.paused[state] = until

    def pause_s(self, states: Iterable[DeploymentState], now: float) -> float | None:
        """When every one of `states` is paused (`pause`): the seconds until the first may be
        called again; None when one may go after an ordinary backoff."""
        paused = self.paused
        if paused is None:
            return None
        soonest = min((paused.get(state, now) - now for state in states), default=0.0)
        return soonest if soonest > 0 else None

    def exclude_key(self, env: str) -> None:
        self.bad_keys = {*self.bad_keys, env}

    def set_headers(self, ctx: RequestContext, headers: list[tuple[bytes, bytes]]) -> None:
        """Puts this attempt's route headers on the response (replacing an earlier attempt's)."""
        if self.headers:
            ctx.response_headers[:] = [h for h in ctx.response_headers if h not in self.headers]
        ctx.response_headers.extend(headers)
        self.headers = headers


NO_STATES: frozenset[DeploymentState] = frozenset()
NO_TAGS: frozenset[str] = frozenset()
_NO_KEYS: frozenset[str] = frozenset()
