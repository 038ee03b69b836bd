"""The pure part of the quota layer: which limits apply, what a request reserves, what it
actually used, and how refusals and headers read. No I/O here; tested without ASGI.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, TypeVar

from mypy_extensions import mypyc_attr

from gateway import context as c
from gateway.context import RequestContext
from gateway.errors import GatewayError
from gateway.policy import (
    AMOUNT_MAX,
    BUDGET,
    CONCURRENT,
    LIFETIME_END,
    LIMIT_MAX,
    MICROS_PER_USD,
    REQUESTS,
    TOKENS,
    Budget,
    Check,
    Decision,
    Limits,
    Principal,
    period_bounds,
    period_label,
)
from gateway.pricing import Price, estimate_micros, in_force, writes_cost_more
from gateway.tokens import estimate_input_tokens

_Item = TypeVar("_Item")


@dataclass(slots=True)  # made per request: not frozen (a frozen __init__ costs 5x)
class Planned:
    """A check with what it came from: the subject, its limits and (for budgets) the budget."""

    check: Check
    subject_kind: str
    subject_id: str
    limits: Limits
    budget: Budget | None = None
    period_start: datetime | None = None
    period_end: datetime | None = None


class Estimate:
    """What a request reserves before the call. (Not a dataclass: compiled, a dataclass
    keeps the __init__ `dataclasses` writes, which runs interpreted, once a request.)"""

    __slots__ = ("cost_micros", "input_tokens", "output_tokens", "price")

    def __init__(self, input_tokens: int, output_tokens: int, cost_micros: int,
                 price: Price | None = None) -> None:
        self.input_tokens = input_tokens
        self.output_tokens = output_tokens
        self.cost_micros = cost_micros
        self.price = price  # what it was priced at (`reservation_price`)

    def __repr__(self) -> str:
        return (f"Estimate(input_tokens={self.input_tokens}, output_tokens="
                f"{self.output_tokens}, cost_micros={self.cost_micros}, price={self.price!r})")

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens


# -- estimates -----------------------------------------------------------------------------

_NO_OUTPUT_OPERATIONS = frozenset({c.OPENAI_EMBEDDINGS, c.ANTHROPIC_COUNT_TOKENS})
# What a legacy completion without max_tokens may generate: OpenAI's Completions API
# defaults max_tokens to 16 (API reference, "Create completion"; the OpenAPI spec's
# CreateCompletionRequest, github.com/openai/openai-openapi: `default: 16`). Only
# OpenAI-compatible adapters serve the operation, and they send the body as it came.
LEGACY_COMPLETION_MAX_TOKENS = 16


# The output caps each operation's API defines: the ones its adapters send on (translated
# or as they came). Another API's cap in the body is not read by anyone downstream (the
# translators read their own API's; a provider ignores a field it does not know), so it
# bounds nothing: a chat request with `max_output_tokens: 1` is sent without a cap.
_OUTPUT_CAPS = {
    # Both: the translators read max_completion_tokens first, an OpenAI-compatible server
    # may read max_tokens; the larger is what either can generate.
    c.OPENAI_CHAT: ("max_completion_tokens", "max_tokens"),
    c.OPENAI_COMPLETIONS: ("max_tokens",),
    c.OPENAI_RESPONSES: ("max_output_tokens",),
    c.ANTHROPIC_MESSAGES: ("max_tokens",),
}


def output_bound(ctx: RequestContext, default_max_output_tokens: int) -> int:
    """The most output tokens the request can produce: its own cap (the largest of those its
    API defines, `_OUTPUT_CAPS`), else the default (in a legacy completion, the API's own
    default of 16), for each choice (`n`) and, in a legacy completion, for each prompt of a
    batch and each of `best_of` candidates (all generated and billed). A number written as
    a float (`100.0`) counts as the integer it is: an OpenAI-compatible server that takes
    the body as it came may read it so."""
    if ctx.operation in _NO_OUTPUT_OPERATIONS:
        return 0
    body = ctx.body
    if "max_tokens" not in body and "max_completion_tokens" not in body \
            and "max_output_tokens" not in body and "n" not in body \
            and ctx.operation != c.OPENAI_COMPLETIONS:
        return default_max_output_tokens  # (four lookups, not the loop below)
    cap = 0
    for name in _OUTPUT_CAPS.get(ctx.operation, ()):
        value = _positive(body.get(name))
        if value is not None and value > cap:
            cap = value
    n = _positive(body.get("n")) or 1
    if ctx.operation == c.OPENAI_COMPLETIONS:
        n = max(n, _positive(body.get("best_of")) or 1) * _prompts(body.get("prompt"))
        return (cap or LEGACY_COMPLETION_MAX_TOKENS) * n
    return (cap or default_max_output_tokens) * n


def _positive(value: Any) -> int | None:
    if type(value) is int:
        return value if value > 0 else None
    if type(value) is float and value.is_integer() and value > 0:
        return int(min(value, 2 ** 53))  # (1e20 is a cap of that much, not none)
    return None


def _prompts(prompt: Any) -> int:
    """How many prompts a legacy completion's `prompt` holds: a list of strings or of token
    lists is a batch (one completion each); a string or one token list is one."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        return len(prompt)
    return 1


_DEAREST: dict[int, tuple[Any, Price | None, float]] = {}


def reservation_price(ctx: RequestContext, fallbacks: tuple[str, ...] = ()) -> Price | None:
    """A price no cheaper, for any request, than any deployment that may serve it (the
    failover layer may pick any of them), so the reservation is never too small: of those
    of the model asked for and of each model in `fallbacks` (the others its failover route
    may go to) that the caller's key may use, as the failover layer uses them. Each rate is
    the dearest of theirs (`dearest_of`): a fallback with cheaper output and dearer input
    is not reserved at the output's price for a request that is mostly input. Cached per
    Model (config objects live as long as the gateway; the entry keeps its Model alive)
    and, with fallbacks, per caller and model."""
    if fallbacks:
        return _dearest_served(ctx, fallbacks)
    model = (ctx.models or {}).get(ctx.model)  # (the common case: no call until a miss)
    found = _DEAREST.get(id(model))
    if found is not None and found[0] is model and ctx.started_at < found[2]:
        return found[1]
    return _dearest(ctx.models, ctx.model, ctx.started_at)[0]


def _dearest(models: Mapping[str, Any] | None, name: str, at_s: float
             ) -> tuple[Price | None, float]:
    """The dearest price of model `name`'s deployments at `at_s`, and until when it holds."""
    model = (models or {}).get(name)
    found = _DEAREST.get(id(model))
    if found is not None and found[0] is model and at_s < found[2]:
        return found[1], found[2]
    prices = [in_force(d.price, at_s)
              for d in (model.deployments if model is not None else ()) if d.price is not None]
    dearest = dearest_of(prices)
    # (until the first of these prices is followed by another)
    until = min([p.successor.starts_at_s for p in prices if p.successor is not None],
                default=math.inf)
    _DEAREST[id(model)] = (model, dearest, until)
    return dearest, until


Rates = tuple[Decimal, Decimal, Decimal, Decimal, Decimal, Decimal]


def _rates(price: Price) -> Rates:
    """Each rate a Price bills at, the ones it leaves out as it bills them: input, output,
    cache reads (as input), reasoning (as output), cache writes (as input) and 1-hour cache
    writes (as cache writes)."""
    write = price.input_per_mtok if price.cache_write_per_mtok is None \
        else price.cache_write_per_mtok
    return (price.input_per_mtok, price.output_per_mtok,
            price.input_per_mtok if price.cached_input_per_mtok is None
            else price.cached_input_per_mtok,
            price.output_per_mtok if price.reasoning_per_mtok is None
            else price.reasoning_per_mtok,
            write, write if price.cache_write_1h_per_mtok is None
            else price.cache_write_1h_per_mtok)


def _highest(rates: Iterable[Rates]) -> Rates:
    input_rate, output, cached, reasoning, write, write_1h = zip(*rates, strict=True)
    return (max(input_rate), max(output), max(cached), max(reasoning), max(write),
            max(write_1h))


def dearest_of(prices: Sequence[Price]) -> Price | None:
    """A price at least as dear as each of `prices` for any usage: every rate the highest
    of theirs; with a long-context tier from the lowest of their thresholds, above which
    every rate is the highest of all their rates, short and long (a price without a tier,
    or with a higher threshold, bills its own there). One of `prices` when it is that
    already (the usual case: one price, or the same for all)."""
    if not prices:
        return None
    first = prices[0]
    if all(price is first for price in prices):
        return first
    short = _highest(_rates(price) for price in prices)
    thresholds = [p.long_context_threshold for p in prices if p.long_context_threshold is not None]
    threshold = min(thresholds) if thresholds else None
    long = None if threshold is None else _highest(
        [_rates(p) for p in prices] + [_rates(p.long_context) for p in prices
                                       if p.long_context is not None])
    for price in prices:  # (one of them may be the dearest in every part)
        if _rates(price) == short and price.long_context_threshold == threshold and (
                long is None or (price.long_context is not None
                                 and _rates(price.long_context) == long)):
            return price
    return Price(*short[:2], cached_input_per_mtok=short[2], reasoning_per_mtok=short[3],
                 cache_write_per_mtok=short[4], cache_write_1h_per_mtok=short[5],
                 source="the dearest rates of the deployments that may serve the request",
                 long_context_threshold=threshold,
                 long_context=None if long is None else Price(
                     *long[:2], cached_input_per_mtok=long[2], reasoning_per_mtok=long[3],
                     cache_write_per_mtok=long[4], cache_write_1h_per_mtok=long[5]))


# (id(principal), model, id(fallbacks)) -> (principal, fallbacks, models, price, until)
_SERVED: dict[tuple[int, str, int], tuple[Any, tuple[str, ...], Any, Price | None,
                                          float]] = {}


def _dearest_served(ctx: RequestContext, fallbacks: tuple[str, ...]) -> Price | None:
    """`reservation_price` of a model with fallbacks, remembered per caller (the models its
    key may use), model and set of models (the entry keeps them alive)."""
    principal, models, at_s = ctx.principal, ctx.models, ctx.started_at
    key = (id(principal), ctx.model, id(fallbacks))
    found = _SERVED.get(key)
    if found is not None and found[0] is principal and found[1] is fallbacks \
            and found[2] is models and at_s < found[4]:
        return found[3]
    dearest, until = _dearest(models, ctx.model, at_s)
    prices = [] if dearest is None else [dearest]
    for name in fallbacks:
        if principal is not None and not principal.allows_model(name):
            continue  # (the failover layer does not send this caller there)
        price, holds = _dearest(models, name, at_s)
        until = min(until, holds)
        if price is not None:
            prices.append(price)
    dearest = dearest_of(prices)
    if len(_SERVED) > 50_000:
        _SERVED.clear()
    _SERVED[key] = (principal, fallbacks, models, dearest, until)
    return dearest


CACHE_CONTROL = b'"cache_control"'


def estimate(ctx: RequestContext, default_max_output_tokens: int,
             fallbacks: tuple[str, ...] = ()) -> Estimate:
    """What the request reserves, priced at `reservation_price(ctx, fallbacks)`."""
    input_tokens = estimate_input_tokens(ctx)
    # (max_tokens is the caller's: 10**30 asks more than any limit, and is kept below 2**53,
    # where Redis's Lua counts exactly, as more than any limit still: see AMOUNT_MAX)
    # (conditional expressions, not min(): the builtin parses keyword arguments per call)
    output_tokens = output_bound(ctx, default_max_output_tokens)
    output_tokens = output_tokens if output_tokens < LIMIT_MAX else LIMIT_MAX  # noqa: FURB136
    price = reservation_price(ctx, fallbacks)
    # (a prompt-cache write, dearer than fresh input, is asked for with `cache_control`;
    # the body is searched only at a price where that makes a difference)
    cost = estimate_micros(price, input_tokens, output_tokens, cache_writes(
        ctx, price, input_tokens)) if price is not None else 0
    return Estimate(input_tokens, output_tokens,
                    cost if cost < AMOUNT_MAX else AMOUNT_MAX, price)  # noqa: FURB136


def estimate_at(ctx: RequestContext, model: str, base: Estimate) -> Estimate:
    """`base` (the request's estimate) priced at the dearest deployment of `model` alone:
    what the request reserves against that model's own limits when the failover layer
    sends it there (a fallback)."""
    price = _dearest(ctx.models, model, ctx.started_at)[0]
    cost = estimate_micros(price, base.input_tokens, base.output_tokens, cache_writes(
        ctx, price, base.input_tokens)) if price is not None else 0
    return Estimate(base.input_tokens, base.output_tokens, min(cost, AMOUNT_MAX), price)


def cache_writes(ctx: RequestContext, price: Price, input_tokens: int) -> bool:
    """Whether the request is estimated as one that writes the provider's prompt cache
    (`estimate_micros`' `cache_writes`): it asks for it, at a price where a write costs
    more than fresh input (elsewhere the body is not searched: the answer changes nothing)."""
    return writes_cost_more(price, input_tokens) and CACHE_CONTROL in ctx.raw_body


# -- which limits apply --------------------------------------------------------------------

def subjects(principal: Principal, model: str, model_limits: Mapping[str, Limits],
             global_limits: Limits | None) -> list[tuple[str, str, Limits]]:
    """(kind, subject id, limits) for every subject with limits, narrowest first."""
    found: list[tuple[str, str, Limits]] = []
    ids = {"key": principal.key_id, "project": principal.project,
           "customer": (f"{principal.project}/{principal.customer}"
                        if principal.customer else None)}
    for kind in ("key", "customer", "project"):
        limits = principal.limits.get(kind)
        subject = ids[kind]
        if limits is not None and subject is not None and not limits.empty:
            found.append((kind, subject, limits))
    if model in model_limits and not model_limits[model].empty:
        found.append(("model", model, model_limits[model]))
    if global_limits is not None and not global_limits.empty:
        found.append(("global", "all", global_limits))
    return found


@mypyc_attr(native_class=False)  # mypyc: a native class cannot subclass list
class Templated(list[_Item]):
    """A list made from one limit template (same subjects, limits, periods and order; only
    the amounts differ from request to request), with the template's `memo`: a dict shared by
    every such list, where a store may keep what it derives from the checks but their amounts
    (the Redis store encodes its script arguments there once). `planned_from` answers one of
    Planned (the template's own) and one of Check (the request's). A plain list works the
    same, slower.
    Made with `templated(items, memo)` (list's own constructor, then the memo: a Python
    __init__ calling list's through super() cost 3.5k instructions a list)."""

    __slots__ = ("memo",)
    memo: dict[Any, Any] | None


def templated(items: Iterable[_Item], memo: dict[Any, Any] | None) -> Templated[_Item]:
    made: Templated[_Item] = Templated(items)
    made.memo = memo
    return made


def planned_from(compiled: tuple[_Template, dict[Any, Any]],
                 est: Estimate) -> tuple[Templated[Planned], Templated[Check]]:
    """The checks of a template (`template`) with this request's amounts, and the template's
    Planned list (what each check came from: made once, the same for every request; each
    one's `check` has the amount 0), in the same order. Everything but the amounts is
    compiled once per set of limits and day (keys, labels, periods)."""
    template, memo = compiled
    planned: Templated[Planned] | None = memo.get(_PLANNED)
    if planned is None:
        planned = memo[_PLANNED] = templated(
            [Planned(Check(kind, key, limit, 0, window, lease, expires, on_error, label),
                     subject_kind, subject_id, limits, budget, period_start, period_end)
             for (kind, key, limit, window, lease, expires, on_error, label, subject_kind,
                  subject_id, limits, budget, period_start, period_end) in template], memo)
        # A check whose amount is always 1 (a request, a lease) is made once and shared by
        # every request of the template (nobody changes a Check).
        memo[_ROWS] = [(kind, key, limit, window, lease, expires, on_error, label,
                        1 if kind == TOKENS else 2 if kind == BUDGET else 0,
                        Check(kind, key, limit, 1, window, lease, expires, on_error, label)
                        if kind in (REQUESTS, CONCURRENT) else None)
                       for (kind, key, limit, window, lease, expires, on_error, label,
                            *_rest) in template]
    amounts = (1, est.input_tokens + est.output_tokens, est.cost_micros)
    checks: Templated[Check] = Templated()
    checks.memo = memo
    append = checks.append
    # Unpacked by name, not with *rest: a starred target and a starred call cost more than
    # the objects they make.
    for kind, key, limit, window, lease, expires, on_error, label, which, made in memo[_ROWS]:
        append(made if made is not None else
               Check(kind, key, limit, amounts[which], window, lease, expires, on_error, label))
    return planned, checks


_PLANNED, _ROWS = "planned", "rows"  # the template memo's entries made here


_Template = list[tuple[Any, ...]]
_TEMPLATES: dict[tuple[Any, ...], tuple[Sequence[tuple[str, str, Limits]], _Template,
                                        dict[Any, Any]]] = {}


def template(applicable: Sequence[tuple[str, str, Limits]], now: datetime,
             lease_s: float) -> tuple[_Template, dict[Any, Any]]:
    """The compiled checks for these subjects on `now`'s UTC day, and the template's memo."""
    # Keyed by the identity of the Limits objects (kept alive by the entry itself).
    cache_key = (now.toordinal(), lease_s,
                 *((kind, subject, id(limits)) for kind, subject, limits in applicable))
    found = _TEMPLATES.get(cache_key)
    if found is not None:
        return found[1], found[2]
    template = _compile(applicable, now, lease_s)
    if len(_TEMPLATES) > 50_000:
        _TEMPLATES.clear()
    memo: dict[Any, Any] = {}
    _TEMPLATES[cache_key] = (list(applicable), template, memo)
    return template, memo


def _compile(applicable: Sequence[tuple[str, str, Limits]], now: datetime,
             lease_s: float) -> _Template:
    """(kind, key, limit, window_s, lease_s, expires_at, on_store_error, label,
    subject_kind, subject_id, limits, budget, period_start, period_end) per check."""
    rows: _Template = []
    for kind, subject, limits in applicable:
        base = f"{kind}:{subject}"
        who, on_error = _who(kind, subject), limits.on_store_error
        for check_kind, suffix, limit in ((REQUESTS, "rpm", limits.rpm),
                                          (TOKENS, "tpm", limits.tpm),
                                          (CONCURRENT, "concurrent", limits.max_concurrent)):
            if limit is not None:
                rows.append((check_kind, f"{base}:{suffix}", limit, 60.0, lease_s, 0.0,
                             on_error, who, kind, subject, limits, None, None, None))
        for budget in limits.budgets:
            start, end, expires, label_of_period = _period(budget.period, now)
            owner = "gateway-wide" if kind == "global" else who
            rows.append((BUDGET, f"{base}:budget:{budget.period}:{label_of_period}",
                         budget.limit_micros, 60.0, lease_s, expires, budget.on_store_error,
                         f"{owner} {budget.period} budget", kind, subject, limits, budget,
                         start, end))
    return rows


_PERIODS: dict[tuple[str, int], tuple[datetime, datetime, float, str]] = {}


def _period(period: str, now: datetime) -> tuple[datetime, datetime, float, str]:
    """(start, end, end as epoch seconds or 0 for lifetime, storage label), cached per day."""
    day = now.toordinal()
    found = _PERIODS.get((period, day))
    if found is None:
        start, end = period_bounds(period, now)
        expires = 0.0 if end >= LIFETIME_END else end.timestamp()
        found = (start, end, expires, period_label(period, start))
        if len(_PERIODS) > 64:
            _PERIODS.clear()
        _PERIODS[(period, day)] = found
    return found


def actual_amounts(checks: Sequence[Check], tokens: int, cost: int) -> list[int]:
    out = []
    for check in checks:
        kind = check.kind
        out.append(tokens if kind == TOKENS else cost if kind == BUDGET else check.amount)
    return out


def served_elsewhere(planned: Sequence[Planned], amounts: list[int]) -> None:
    """`amounts` (`actual_amounts`) of a request a fallback model answered: the model asked
    for is charged none of its tokens or cost (its requests and concurrency count)."""
    for index, item in enumerate(planned):
        if item.subject_kind == "model" and item.check.kind in (TOKENS, BUDGET):
            amounts[index] = 0


def _who(kind: str, subject: str) -> str:
    if kind == "global":
        return "all callers together"
    if kind == "key":
        return f"key {subject}"
    return f"{kind} '{subject}'"


# -- refusals and headers ------------------------------------------------------------------

def overflow_target(item: Planned) -> str | None:
    """The cheaper model to route to when this check overflows, if it says so."""
    if item.budget is not None:
        return item.budget.downgrade_to if item.budget.on_overflow == "downgrade" else None
    return item.limits.downgrade_to if item.limits.on_overflow == "downgrade" else None


def overflow_reason(item: Planned) -> str:
    """Why a request was sent to a cheaper model, for the x-sluicegate-downgraded header."""
    check = item.check
    if check.kind == BUDGET:
        return check.label
    unit = {REQUESTS: "requests per minute", TOKENS: "tokens per minute",
            CONCURRENT: "concurrent requests"}[check.kind]
    return f"{check.label} {unit}"


def overflow_reset_s(check: Check, decision: Decision) -> float:
    """When the bucket of a rate limit that refused (`decision`) is full again: its wait for
    the request, then the rest of its limit; a window when it may never pass (`None`). (The
    wait is the longest of every limit that refused, so rarely an overestimate.)"""
    if decision.retry_after_s is None or check.limit <= 0:
        return check.window_s
    return decision.retry_after_s + (check.limit - check.amount) * check.window_s / check.limit


def refusal(item: Planned, decision: Decision) -> GatewayError:
    check = item.check
    if check.kind == BUDGET:
        return _budget_refusal(item)
    headers: list[tuple[bytes, bytes]] = []
    if decision.retry_after_s is not None:  # (when every limit that refused lets one through)
        headers.append((b"retry-after", str(max(1, math.ceil(decision.retry_after_s))).encode()))
    who = check.label[0].upper() + check.label[1:]
    if check.limit == 0:  # (no waiting lets one through: no Retry-After)
        unit = {REQUESTS: "requests per minute", TOKENS: "tokens per minute",
                CONCURRENT: "concurrent requests"}[check.kind]
        message = (f"Not permitted: {check.label} may make no requests ({unit} is 0).")
    elif check.kind == CONCURRENT:
        message = (f"Too many concurrent requests: {check.label} may have {check.limit} "
                   "requests in flight.")
    elif decision.retry_after_s is None and check.amount > check.limit:
        message = (f"Request too large: it needs about {check.amount} tokens, and {check.label}"
                   f" may use {check.limit} tokens per minute.")
    else:
        unit = "tokens" if check.kind == TOKENS else "requests"
        message = (f"Rate limit exceeded: {who} may use {check.limit} {unit} per minute"
                   + ("; retry after the number of seconds in the Retry-After header."
                      if headers else "."))
    return GatewayError(429, message, code="rate_limit_exceeded", headers=headers)


def _budget_refusal(item: Planned) -> GatewayError:
    budget, end = item.budget, item.period_end
    assert budget is not None and end is not None
    if end >= LIFETIME_END:
        resets = "it does not reset"
        headers: list[tuple[bytes, bytes]] = []
    else:
        stamp = end.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        resets = f"it resets at {stamp}"
        headers = [(b"x-sluicegate-budget-reset", stamp.encode())]
        if budget.status == 429:
            seconds = max(1, math.ceil(end.timestamp() - datetime.now(UTC).timestamp()))
            headers.append((b"retry-after", str(seconds).encode()))
    message = (f"Budget exceeded: the {item.check.label} of ${budget.limit_usd} USD does not "
               f"leave enough for this request; {resets}.")
    return GatewayError(budget.status, message, code="budget_exceeded", headers=headers)


_RATE_HEADERS = ((REQUESTS, b"x-ratelimit-limit-requests", b"x-ratelimit-remaining-requests",
                  b"x-ratelimit-reset-requests"),
                 (TOKENS, b"x-ratelimit-limit-tokens", b"x-ratelimit-remaining-tokens",
                  b"x-ratelimit-reset-tokens"))


def rate_limit_headers(planned: Sequence[Planned],
                       decision: Decision) -> list[tuple[bytes, bytes]]:
    """OpenAI's x-ratelimit-* headers for the tightest request and token limits, and the
    budget left (x-sluicegate-budget-remaining, USD) when a budget applies."""
    remaining = decision.remaining
    reset_s = decision.reset_s
    memo: dict[Any, Any] | None = getattr(planned, "memo", None)
    if memo is not None:  # one template, one layout: (check count, its maker)
        maker = memo.get(_MAKERS)
        if maker is None or maker[0] != len(remaining):
            maker = memo[_MAKERS] = (len(remaining),
                                     _header_maker(planned, _indexes_by_kind(planned,
                                                                             len(remaining))))
        made: list[tuple[bytes, bytes]] = maker[1](remaining, reset_s)
        return made
    headers: list[tuple[bytes, bytes]] = []
    kinds = _indexes_by_kind(planned, len(remaining))
    for kind, limit_name, remaining_name, reset_name in _RATE_HEADERS:
        indexes = kinds.get(kind)
        if indexes is not None:
            index = indexes[0] if len(indexes) == 1 else \
                min(indexes, key=remaining.__getitem__)
            headers += (
                (limit_name, b"%d" % planned[index].check.limit),
                (remaining_name, b"%d" % remaining[index]),
                (reset_name, _duration(reset_s[index])),
            )
    indexes = kinds.get(BUDGET)
    if indexes is not None:
        headers.append((b"x-sluicegate-budget-remaining",
                        _usd_text(min([remaining[index] for index in indexes]))))
    return headers


def downgraded_headers(planned: Sequence[Planned], decision: Decision,
                       overflowed: Sequence[tuple[Planned, float]]) -> list[tuple[bytes, bytes]]:
    """`rate_limit_headers` of a request a rate limit sent to a cheaper model: the limits it
    was admitted against and those that overflowed ((limit, reset_s): none left), the
    caller's limits on the model it asked for, the tightest of which is the one that sent it
    elsewhere."""
    return rate_limit_headers(
        [item for item, _ in overflowed] + list(planned),
        Decision(True, remaining=(0,) * len(overflowed) + decision.remaining,
                 reset_s=tuple([reset_s for _, reset_s in overflowed]) + decision.reset_s))


_MAKERS = "header maker"  # template memo entry: (check count, its maker)


def reply_header_maker(planned: Sequence[Planned]
                       ) -> Callable[[list[Any]], list[tuple[bytes, bytes]]]:
    """`rate_limit_headers` for the template `planned` (a whole one, from `planned_from`)
    read straight from an admitted reply of the Redis admit script (its JSON array: 1, then
    each check's remaining count and reset seconds), as `_header_maker` makes it."""
    return _header_maker(planned, _indexes_by_kind(planned, len(planned)), reply=True)


def _header_maker(planned: Sequence[Planned], kinds: dict[str, list[int]], *,
                  reply: bool = False) -> Callable[..., list[tuple[bytes, bytes]]]:
    """`rate_limit_headers` for one template as straight-line code made once (as
    dataclasses makes its __init__): the limit headers are ready pairs, and only the
    remaining counts and resets are formatted per request (callgrind, auth + quota bench
    config in process: 20.5k instructions a request through the loop, 11.5k this way). Where
    a kind has several limits, the code picks the one with the least remaining, the first of
    equals, as the loop does. `reply`: the code reads the Redis admit script's reply (1, then
    each check's remaining count and reset) instead of a Decision's two tuples."""
    names: dict[str, Any] = {"_reset": _duration, "_usd": _usd_text}
    lines, items = [], []
    # (Only integers and names made here go into the source.)
    for kind, limit_name, remaining_name, reset_name in _RATE_HEADERS:
        indexes = kinds.get(kind)
        if indexes is None:
            continue
        at = len(names)
        names[f"R{at}"], names[f"S{at}"] = remaining_name, reset_name
        for number, index in enumerate(indexes):
            names[f"L{at}_{number}"] = (limit_name, b"%d" % planned[index].check.limit)
        first = indexes[0]
        lines.append(f"    l{at}, r{at}, s{at} = L{at}_0, {_left(first, reply)}, "
                     f"{_reset_at(first, reply)}")
        for number, index in enumerate(indexes[1:], start=1):
            lines.append(f"    if {_left(index, reply)} < r{at}: l{at}, r{at}, s{at} = "
                         f"L{at}_{number}, {_left(index, reply)}, {_reset_at(index, reply)}")
        items += [f"l{at}", f"(R{at}, b'%d' % r{at})", f"(S{at}, _reset(s{at}))"]
    budgets = kinds.get(BUDGET)
    if budgets is not None:
        names["B"] = b"x-sluicegate-budget-remaining"
        left = ", ".join([_left(index, reply) for index in budgets])
        items.append(f"(B, _usd({left if len(budgets) == 1 else f'min({left})'}))")
    arguments = "values" if reply else "remaining, reset_s"
    source = "\n".join([f"def maker({arguments}):", *lines, f"    return [{', '.join(items)}]"])
    exec(source, names)  # noqa: S102 (integers and the names above only)
    maker: Callable[..., list[tuple[bytes, bytes]]] = names["maker"]
    return maker


def _left(index: int, reply: bool) -> str:
    """Where a maker's source reads check `index`'s remaining count (see _header_maker)."""
    return f"values[{1 + 2 * int(index)}]" if reply else f"remaining[{int(index)}]"


def _reset_at(index: int, reply: bool) -> str:
    return f"values[{2 + 2 * int(index)}]" if reply else f"reset_s[{int(index)}]"


def _usd_text(left: int) -> bytes:
    """A budget's remaining micro-dollars as USD text (an overdrawn one shows 0)."""
    # (A comparison, not max(): that parses keyword arguments on every call. An f-string,
    # not bytes' % formatting: compiled, // and str() of an int run as C. The cents: str()
    # of 1 and the six digits after the point, less the 1, so they keep their zeros.)
    micros = left if left > 0 else 0  # noqa: FURB136
    return f"{micros // MICROS_PER_USD}.{str(MICROS_PER_USD + micros % MICROS_PER_USD)[1:]}" \
        .encode()


def budget_indexes(planned: Sequence[Planned], *, cutoff: bool = False) -> tuple[int, ...]:
    """The indexes of the budget checks in `planned` (with `cutoff`: of those with
    stream_cutoff), kept in the template's memo when `planned` is a whole template's."""
    memo: dict[Any, Any] | None = getattr(planned, "memo", None)
    name = _CUTOFF_BUDGETS if cutoff else _BUDGETS
    if memo is not None:
        found: tuple[int, ...] | None = memo.get(name)
        if found is not None:
            return found
    found = tuple([index for index, item in enumerate(planned) if item.budget is not None
                   and (item.budget.stream_cutoff or not cutoff)])
    if memo is not None:
        memo[name] = found
    return found


_BUDGETS, _CUTOFF_BUDGETS = "budgets", "cutoff budgets"  # template memo entries


def _indexes_by_kind(planned: Sequence[Planned], count: int) -> dict[str, list[int]]:
    """{check kind: the indexes of its checks} among the first `count`; kept in the
    template's memo (the same for every request planned from it)."""
    memo: dict[Any, Any] | None = getattr(planned, "memo", None)
    if memo is not None:
        found: dict[str, list[int]] | None = memo.get(("kinds", count))
        if found is not None:
            return found
    kinds: dict[str, list[int]] = {}
    for index, item in enumerate(planned[:count]):
        kinds.setdefault(item.check.kind, []).append(index)
    if memo is not None:
        memo[("kinds", count)] = kinds
    return kinds


_MILLIS = tuple(b"%dms" % millis for millis in range(1000))
_WHOLE: dict[int, bytes] = {}  # whole seconds -> text


def _duration(seconds: float) -> bytes:
    """OpenAI's reset format: "1s", "6m0s", "1h2m3s", "250ms" (a text per whole second is
    remembered: a bucket that refills at a steady pace resets after the same few values)."""
    if seconds < 1:
        return _MILLIS[int(seconds * 1000)] if seconds > 0 else b"0ms"
    whole = math.ceil(seconds)
    text = _WHOLE.get(whole)
    if text is None:
        hours, rest = divmod(whole, 3600)
        minutes, secs = divmod(rest, 60)
        text = b"%dh%dm%ds" % (hours, minutes, secs) if hours else \
            b"%dm%ds" % (minutes, secs) if minutes else b"%ds" % secs
        if len(_WHOLE) >= 4096:
            _WHOLE.clear()
        _WHOLE[whole] = text
    return text
