"""What a model call costs: the shipped price table and exact cost arithmetic.

Prices are USD per million tokens, held as `Decimal`; costs are integer micro-dollars
(1 USD = 1_000_000), computed exactly and rounded up once at the end. Because the unit
conversions cancel (USD/1M tokens x 1M micros/USD), a cost in micro-dollars is simply the sum
of `tokens x price_per_mtok`.

The shipped table (`gateway/prices.json`) covers the vendors' own APIs. Anything else, such as
an OpenAI-compatible server, a reseller or a self-hosted model, is priced in config with
`Deployment(..., price=Price(...))` or marked `free=True`.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import ROUND_CEILING, Decimal, InvalidOperation, localcontext
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from gateway.context import RequestContext, Usage, add_usage

_PRICE_FIELDS = frozenset({
    "input_per_mtok", "output_per_mtok", "cached_input_per_mtok", "reasoning_per_mtok",
    "cache_write_per_mtok", "cache_write_1h_per_mtok",
})
_ENTRY_FIELDS = _PRICE_FIELDS | {"effective_from", "source", "long_context", "note"}
_TIER_FIELDS = _PRICE_FIELDS | {"above_input_tokens", "note"}
_MODEL_FIELDS = frozenset({"aliases", "source", "prices", "note"})
_VENDOR_FIELDS = frozenset({"source", "as_of", "models", "note"})


def _money(name: str, value: object) -> Decimal:
    # Money is never float: 0.1 has no exact binary form, and a price table is a contract.
    # ValueError, not TypeError, for every bad amount: callers catch one error for bad data.
    wanted = f"{name} must be a decimal string, int or Decimal"
    if isinstance(value, float):
        raise ValueError(f"{wanted}, not a float ({value!r})")  # noqa: TRY004
    if isinstance(value, bool) or not isinstance(value, (int, str, Decimal)):
        raise ValueError(f"{wanted}, got {value!r}")  # noqa: TRY004
    try:
        amount = Decimal(value)
    except InvalidOperation:
        raise ValueError(f"{name} is not a decimal number: {value!r}") from None
    if not amount.is_finite() or amount < 0:
        raise ValueError(f"{name} must be a finite, non-negative amount, got {value!r}")
    return amount


_OPTIONAL_RATES = ("cached_input_per_mtok", "reasoning_per_mtok", "cache_write_per_mtok",
                   "cache_write_1h_per_mtok")


@dataclass(frozen=True, slots=True)
class Price:
    """What one model costs, in USD per million tokens.

    `cached_input_per_mtok` None bills cache reads like fresh input; `reasoning_per_mtok` None
    bills reasoning like output. `cache_write_per_mtok` is what input written to a
    provider-side prompt cache costs (Anthropic: 1.25x input for its 5-minute cache), None
    billing it like fresh input; `cache_write_1h_per_mtok` the same for Anthropic's 1-hour
    cache (2x input), None billing it at `cache_write_per_mtok`. When a request's input
    exceeds `long_context_threshold` tokens, the whole request is billed at `long_context`
    instead (Gemini Pro above 200k, OpenAI above 272k, ...).
    """

    input_per_mtok: Decimal
    output_per_mtok: Decimal
    cached_input_per_mtok: Decimal | None = None
    reasoning_per_mtok: Decimal | None = None
    cache_write_per_mtok: Decimal | None = None
    cache_write_1h_per_mtok: Decimal | None = None
    effective_from: date | None = None
    source: str = ""
    long_context_threshold: int | None = None
    long_context: Price | None = None
    # The table's next price for the same model (set by PriceTable), and when it starts:
    # `in_force` moves a deployment's price on at midnight UTC of its effective date, in a
    # gateway that was started before it.
    # (init=False: a Price made from this one, by dataclasses.replace, does not follow it)
    successor: Price | None = field(default=None, init=False, compare=False, repr=False)
    # When it comes into force: midnight UTC of `effective_from` (epoch seconds; -inf).
    starts_at_s: float = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        start = self.effective_from
        object.__setattr__(self, "starts_at_s", -math.inf if start is None else datetime(
            start.year, start.month, start.day, tzinfo=UTC).timestamp())
        for name in ("input_per_mtok", "output_per_mtok"):
            object.__setattr__(self, name, _money(name, getattr(self, name)))
        for name in _OPTIONAL_RATES:
            if getattr(self, name) is not None:
                object.__setattr__(self, name, _money(name, getattr(self, name)))
        self._check_tier()

    def _check_tier(self) -> None:
        threshold, long_context = self.long_context_threshold, self.long_context
        if (threshold is None) != (long_context is None):
            raise ValueError("long_context_threshold and long_context must be given together")
        if threshold is not None and (type(threshold) is not int or threshold < 0):
            raise ValueError(f"long_context_threshold must be an int >= 0, not {threshold!r}")
        if long_context is not None and not isinstance(long_context, Price):
            raise ValueError("long_context must be a Price")


FREE = Price(input_per_mtok=Decimal(0), output_per_mtok=Decimal(0), source="free")


def _tier(price: Price, input_tokens: int) -> Price:
    threshold, long_context = price.long_context_threshold, price.long_context
    if threshold is not None and long_context is not None and input_tokens > threshold:
        return long_context
    return price


_NANO = 10**9
Rates = tuple[int, int, int, int, int, int]
# id(price) -> (price, its six rates in nano-micro-dollars per token) or (price, None) when a
# rate is finer than that; the price is kept so its id cannot be reused while cached.
_SCALED: dict[int, tuple[Price, Rates | None]] = {}


def _rates(tier: Price) -> tuple[Decimal, Decimal, Decimal, Decimal, Decimal, Decimal]:
    """Per token kind, what a million cost: fresh input, cache reads, 5-minute and 1-hour
    cache writes, plain output and reasoning (each rate left out falls back)."""
    fresh = tier.input_per_mtok
    write = fresh if tier.cache_write_per_mtok is None else tier.cache_write_per_mtok
    return (fresh,
            fresh if tier.cached_input_per_mtok is None else tier.cached_input_per_mtok,
            write,
            write if tier.cache_write_1h_per_mtok is None else tier.cache_write_1h_per_mtok,
            tier.output_per_mtok,
            tier.output_per_mtok if tier.reasoning_per_mtok is None else tier.reasoning_per_mtok)


def _scaled_rates(tier: Price) -> Rates | None:
    cached = _SCALED.get(id(tier))
    if cached is not None and cached[0] is tier:
        return cached[1]
    scaled = [rate * _NANO for rate in _rates(tier)]
    exact = all(value == value.to_integral_value() for value in scaled)
    result = (int(scaled[0]), int(scaled[1]), int(scaled[2]), int(scaled[3]), int(scaled[4]),
              int(scaled[5])) if exact else None
    if len(_SCALED) > 10_000:
        _SCALED.clear()
    _SCALED[id(tier)] = (tier, result)
    return result


def _counts(usage: Usage) -> tuple[int, int, int, int, int, int]:
    """`usage` as tokens of each kind `_rates` prices, none negative: providers occasionally
    report a part (cached, written, reasoning) above its whole, which would otherwise bill
    a negative amount. (Comparisons, not min() and max(): those parse keyword arguments on
    every call.)"""
    input_tokens, output_tokens = usage.input_tokens, usage.output_tokens
    cached, reasoning = usage.cached_input_tokens, usage.reasoning_tokens
    written, written_1h = usage.cache_write_tokens, usage.cache_write_1h_tokens
    if input_tokens < 0:  # noqa: PLR1730 (see above)
        input_tokens = 0
    if output_tokens < 0:  # noqa: PLR1730
        output_tokens = 0
    if cached < 0:
        cached = 0
    elif cached > input_tokens:
        cached = input_tokens
    if written < 0:
        written = 0
    elif written > input_tokens - cached:
        written = input_tokens - cached
    if written_1h < 0:
        written_1h = 0
    elif written_1h > written:
        written_1h = written
    if reasoning < 0:
        reasoning = 0
    elif reasoning > output_tokens:
        reasoning = output_tokens
    return (input_tokens - cached - written, cached, written - written_1h, written_1h,
            output_tokens - reasoning, reasoning)


def cost_micros(price: Price, usage: Usage) -> int:
    """The exact cost of `usage` in integer micro-dollars, rounded up once at the end."""
    tier = _tier(price, usage.input_tokens)
    counts = _counts(usage)
    scaled = _scaled_rates(tier)
    if scaled is not None:  # integer arithmetic: exact, and far cheaper than a Decimal context
        nanos = (counts[0] * scaled[0] + counts[1] * scaled[1] + counts[2] * scaled[2]
                 + counts[3] * scaled[3] + counts[4] * scaled[4] + counts[5] * scaled[5])
        return -(-nanos // _NANO)
    with localcontext() as ctx:
        ctx.prec = 60  # far beyond any token count x price, so the sum is exact
        total = sum((count * rate for count, rate in zip(counts, _rates(tier), strict=True)),
                    Decimal(0))
        return int(total.to_integral_value(rounding=ROUND_CEILING))


def estimate_micros(price: Price, input_tokens: int, output_tokens: int,
                    cache_writes: bool = False) -> int:
    """A cost bound, rounded like `cost_micros`: input at the fresh rate or, for a request
    that asks the provider to write its prompt cache (`cache_writes`: Anthropic's
    `cache_control`), at the dearest of that and the 5-minute and 1-hour write rates (a
    write costs 1.25 to 2 times fresh input); output at the dearer of the plain and reasoning
    rates (the output bound covers reasoning). Integer arithmetic where the rates allow: this
    runs on every admission."""
    if input_tokens >= 0 and output_tokens >= 0:
        scaled = _scaled_rates(_tier(price, input_tokens))
        if scaled is not None:
            input_rate = scaled[0]
            if cache_writes:  # (comparisons, not max(): see `_counts`)
                if scaled[2] > input_rate:  # noqa: PLR1730
                    input_rate = scaled[2]
                if scaled[3] > input_rate:  # noqa: PLR1730
                    input_rate = scaled[3]
            output_rate = scaled[4] if scaled[4] >= scaled[5] else scaled[5]  # noqa: FURB136
            return -(-(input_tokens * input_rate + output_tokens * output_rate) // _NANO)
    # (rates below a nano-dollar per token: the dearest reading of the same tokens)
    written = (0, input_tokens) if cache_writes else (0,)
    return max(cost_micros(price, Usage(input_tokens=input_tokens, output_tokens=output_tokens,
                                        cache_write_tokens=write, cache_write_1h_tokens=write_1h,
                                        reasoning_tokens=reasoning))
               for write in written for write_1h in (0, write)
               for reasoning in (0, output_tokens))


def writes_cost_more(price: Price, input_tokens: int) -> bool:
    """Whether a request of `input_tokens` that asks for prompt-cache writes is estimated
    dearer at `price` than one that does not (`estimate_micros`' `cache_writes`): its tier
    prices a write above fresh input. Only then need a request's body be searched for
    `cache_control` (on every admission, through the whole body)."""
    tier = _tier(price, input_tokens)
    scaled = _scaled_rates(tier)
    if scaled is None:  # (rates finer than a nano-dollar: the body decides, as before)
        return True
    return scaled[2] > scaled[0] or scaled[3] > scaled[0]


class PriceTable:
    """Prices by vendor and model id, with aliases and effective dates.

    Load one with `PriceTable.default()` (the shipped `gateway/prices.json`) or
    `PriceTable.from_file(path)` (same format); a bad file raises `ValueError` with one
    sentence naming the file and the offending key.
    """

    def __init__(
        self,
        prices: dict[str, dict[str, list[Price]]],
        aliases: dict[str, dict[str, str]] | None = None,
    ) -> None:
        # Oldest first, so lookup walks back from the newest entry. Each table keeps copies,
        # linked to their successors: a Price given to two tables or two models follows
        # neither's (the caller's objects are not changed).
        self._prices = {
            vendor: {model: [dataclasses.replace(entry)
                             for entry in sorted(entries, key=_effective_key)]
                     for model, entries in models.items()}
            for vendor, models in prices.items()
        }
        for models in self._prices.values():
            for entries in models.values():
                for entry, later in itertools.pairwise(entries):
                    object.__setattr__(entry, "successor", later)
        self._aliases = {vendor: dict(names) for vendor, names in (aliases or {}).items()}

    @classmethod
    def default(cls) -> PriceTable:
        """The table shipped in `gateway/prices.json`, loaded once per process."""
        return _default_table()

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> PriceTable:
        """Loads a price file in the shipped format; `ValueError` explains a bad one."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"{path}: cannot read the price file ({exc.strerror})") from None
        return _parse_table(text, str(path))

    def lookup(self, vendor: str, model: str, at: datetime | None = None) -> Price | None:
        """The price of `model` in force at `at` (default: now, UTC); None when unknown."""
        models = self._prices.get(vendor, {})
        entries = models.get(model) or models.get(self._aliases.get(vendor, {}).get(model, ""))
        if not entries:
            return None
        day = _utc_day(at)
        for entry in reversed(entries):
            if entry.effective_from is None or entry.effective_from <= day:
                return entry
        return None

    def vendors(self) -> list[str]:
        return sorted(self._prices)

    def models(self, vendor: str) -> list[str]:
        """The canonical model ids of `vendor` (aliases not included)."""
        return sorted(self._prices.get(vendor, {}))


def _effective_key(price: Price) -> date:
    return price.effective_from or date.min


def _utc_day(at: datetime | None) -> date:
    if at is None:
        return datetime.now(UTC).date()
    if at.tzinfo is None:  # naive datetimes are taken to be UTC
        return at.date()
    return at.astimezone(UTC).date()


@cache
def _default_table() -> PriceTable:
    text = resources.files("gateway").joinpath("prices.json").read_text(encoding="utf-8")
    return _parse_table(text, "gateway/prices.json")


# Provider adapters whose upstream is the vendor's own API, so the vendor's list price applies.
_VENDOR_BY_PROVIDER_TYPE = {
    "openai": "openai",
    "azure": "openai",
    "anthropic": "anthropic",
    "gemini": "gemini",
    "mistral": "mistral",
    "deepseek": "deepseek",
    "xai": "xai",
    "groq": "groq",
}


def vendor_for_provider_type(provider_type: str) -> str | None:
    """The price-table vendor of a provider type; None for anything that must be priced
    explicitly (OpenAI-compatible servers, resellers, routers, self-hosted runtimes)."""
    return _VENDOR_BY_PROVIDER_TYPE.get(provider_type)


def resolve_price(
    provider_type: str,
    model: str,
    *,
    explicit: Price | None = None,
    free: bool = False,
    table: PriceTable | None = None,
) -> Price | None:
    """The price of a deployment: `explicit` wins, then `free`, then the table; None if unknown."""
    if explicit is not None:
        return explicit
    if free:
        return FREE
    vendor = vendor_for_provider_type(provider_type)
    if vendor is None:
        return None
    return (table or PriceTable.default()).lookup(vendor, model)


# --- reading the JSON format -------------------------------------------------------------


class _BadFile(ValueError):
    """A problem at one key of the file; `_parse_table` adds the file name."""


def _parse_table(text: str, origin: str) -> PriceTable:
    try:
        data = json.loads(text)
        return _read_document(data)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{origin}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    except ValueError as bad:  # (named apart: compiled, one name holds one type)
        raise ValueError(f"{origin}: {bad}") from None


def _read_document(data: object) -> PriceTable:
    document = _object(data, "the document")
    _only(document, frozenset({"vendors"}), "the document")
    vendors = _object(document.get("vendors"), "vendors")
    prices: dict[str, dict[str, list[Price]]] = {}
    aliases: dict[str, dict[str, str]] = {}
    for vendor, body in vendors.items():
        prices[vendor], aliases[vendor] = _read_vendor(body, f"vendors.{vendor}")
    return PriceTable(prices, aliases)


def _read_vendor(body: object, where: str) -> tuple[dict[str, list[Price]], dict[str, str]]:
    vendor = _object(body, where)
    _only(vendor, _VENDOR_FIELDS, where)
    if "as_of" in vendor:
        _date(vendor["as_of"], f"{where}.as_of")
    source = _text(vendor.get("source", ""), f"{where}.source")
    models: dict[str, list[Price]] = {}
    aliases: dict[str, str] = {}
    for model, spec in _object(vendor.get("models"), f"{where}.models").items():
        models[model], names = _read_model(spec, f"{where}.models.{model}", source)
        for name in names:
            if name in models or name in aliases:
                raise _BadFile(f"{where}: alias {name!r} names two models")
            aliases[name] = model
    clash = set(aliases) & set(models)
    if clash:
        raise _BadFile(f"{where}: {min(clash)!r} is both a model id and an alias")
    return models, aliases


def _read_model(spec: object, where: str, source: str) -> tuple[list[Price], list[str]]:
    model = _object(spec, where)
    _only(model, _MODEL_FIELDS, where)
    source = _text(model.get("source", source), f"{where}.source")
    names = model.get("aliases", [])
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise _BadFile(f"{where}.aliases must be a list of model ids")
    entries = model.get("prices")
    if not isinstance(entries, list) or not entries:
        raise _BadFile(f"{where}.prices must be a non-empty list")
    prices = [_read_price(entry, f"{where}.prices[{i}]", source) for i, entry in enumerate(entries)]
    dates = [price.effective_from for price in prices]
    if len(set(dates)) != len(dates):
        raise _BadFile(f"{where}.prices has two entries with the same effective_from")
    return prices, names


def _read_price(entry: object, where: str, source: str) -> Price:
    fields = _object(entry, where)
    _only(fields, _ENTRY_FIELDS, where)
    threshold, long_context = None, None
    if "long_context" in fields:
        threshold, long_context = _read_tier(fields["long_context"], f"{where}.long_context")
    raw_day = fields.get("effective_from")
    day = None if raw_day is None else _date(raw_day, f"{where}.effective_from")
    return _price(fields, where, effective_from=day,
                  source=_text(fields.get("source", source), f"{where}.source"),
                  long_context_threshold=threshold, long_context=long_context)


def _read_tier(tier: object, where: str) -> tuple[int, Price]:
    fields = _object(tier, where)
    _only(fields, _TIER_FIELDS, where)
    threshold = fields.get("above_input_tokens")
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 0:
        raise _BadFile(f"{where}.above_input_tokens must be a non-negative integer")
    return threshold, _price(fields, where)


def _price(fields: dict[str, Any], where: str, **extra: Any) -> Price:
    for name in ("input_per_mtok", "output_per_mtok"):
        if name not in fields:
            raise _BadFile(f"{where}.{name} is missing")
    try:
        return Price(**{name: fields[name] for name in _PRICE_FIELDS if name in fields}, **extra)
    except ValueError as exc:
        raise _BadFile(f"{where}: {exc}") from None


def _object(value: object, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _BadFile(f"{where} must be a JSON object")
    return value


def _only(fields: dict[str, Any], allowed: frozenset[str], where: str) -> None:
    # Keys starting with "_" are comments; anything else unknown is most likely a typo.
    unknown = sorted(key for key in fields if key not in allowed and not key.startswith("_"))
    if unknown:
        raise _BadFile(f"{where} has an unknown key {unknown[0]!r}")


def _text(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise _BadFile(f"{where} must be a string")
    return value


def _date(value: object, where: str) -> date:
    try:
        return date.fromisoformat(_text(value, where))
    except ValueError:
        raise _BadFile(f"{where} must be a date written YYYY-MM-DD, got {value!r}") from None


def in_force(price: Price, at_s: float) -> Price:
    """`price`, or the later price of the table it came from in force at `at_s` (epoch
    seconds): a deployment keeps the price it had when the gateway started, and this moves
    it on when the table says the price changes."""
    later = price.successor
    while later is not None and at_s >= later.starts_at_s:
        price, later = later, later.successor
    return price


def served_price(ctx: RequestContext) -> Price | None:
    """The price of the deployment that served the request (the model's first deployment
    when no layer recorded one), in force when the request started."""
    deployment = ctx.served_deployment
    if deployment is None:
        model = (ctx.models or {}).get(ctx.model)
        deployment = model.deployments[0] if model is not None and model.deployments else None
    price = getattr(deployment, "price", None)
    if price is not None and price.successor is not None:
        return in_force(price, ctx.started_at)
    return price


def call_cost_micros(ctx: RequestContext, usage: Usage | None) -> int:
    """What `usage` cost at the served deployment's price (0 unpriced or unused).

    Several layers price the same request (quota, metering, the metrics, the cache): the
    last answer is kept on the request, keyed by the price and every count it used. When
    the usage includes an earlier attempt's, priced at its own deployment (a stream broken
    and continued elsewhere: `EARLIER_ATTEMPT`), that part costs what it cost there."""
    state = ctx.state
    earlier: tuple[Usage, int] | None = state.get(EARLIER_ATTEMPT)
    before_cost = 0
    if earlier is not None and usage is not None:
        before, before_cost = earlier
        usage = Usage(max(usage.input_tokens - before.input_tokens, 0),
                      max(usage.output_tokens - before.output_tokens, 0),
                      max(usage.cached_input_tokens - before.cached_input_tokens, 0),
                      max(usage.reasoning_tokens - before.reasoning_tokens, 0),
                      max(usage.cache_write_tokens - before.cache_write_tokens, 0),
                      max(usage.cache_write_1h_tokens - before.cache_write_1h_tokens, 0))
    if usage is None:
        return before_cost
    deployment = ctx.served_deployment
    if deployment is None:
        price = served_price(ctx)
    else:  # (`served_price`, inline: several layers price every request)
        price = getattr(deployment, "price", None)
        if price is not None and price.successor is not None:
            price = in_force(price, ctx.started_at)
    if price is None or price is FREE:
        return before_cost
    counts = (usage.input_tokens, usage.output_tokens, usage.cached_input_tokens,
              usage.reasoning_tokens, usage.cache_write_tokens, usage.cache_write_1h_tokens)
    memo: tuple[Price, tuple[int, ...], int] | None = state.get(_COST_MEMO)
    if memo is not None and memo[0] is price and memo[1] == counts:
        return before_cost + memo[2]
    if counts[0] == 0 and counts[1] == 0:
        return before_cost
    cost = cost_micros(price, usage)
    state[_COST_MEMO] = (price, counts, cost)
    return before_cost + cost


CACHE_HITS = ("hit", "semantic-hit")  # the `cache_status` of an answer no call was made for


def billed_usage(ctx: RequestContext) -> Usage | None:
    """The usage a finished request is billed for: what the layers below recorded in
    `ctx.usage` (the provider's report; for a stream cut short, or one that finished without
    a report, what it delivered: `gateway.tokens.delivered_usage`); none for a cache hit.
    The usage ledger (metering) bills it and the quota layer settles budgets to it, so a
    budget is charged what the bill says."""
    return None if ctx.cache_status in CACHE_HITS else ctx.usage


def billed_micros(ctx: RequestContext) -> int:
    """What a finished request is billed (`billed_usage` at the served deployment's price)."""
    # (`billed_usage`, inline: a call frame on every record)
    return 0 if ctx.cache_status in CACHE_HITS else call_cost_micros(ctx, ctx.usage)


# The usage of a request's earlier attempts that cost something, and their cost at their own
# deployments: of a stream that broke after it had streamed (set by the failover layer
# before it continues the stream elsewhere), or of non-stream calls that failed after their
# provider answered some of their parts (`bill_failed_call`).
EARLIER_ATTEMPT = "pricing.earlier_attempt"


def bill_failed_call(ctx: RequestContext, usage: Usage) -> Usage:
    """The request's usage once `usage`, what a non-stream call that failed still cost (the
    parts of it its provider answered), is billed at the served deployment's price: added
    to its earlier attempts' (`EARLIER_ATTEMPT`), which a later call of the request that
    answers adds to its own (`with_earlier_calls`). Each call is billed once, at its own
    deployment's price, however many the failover layer makes."""
    earlier: tuple[Usage, int] | None = ctx.state.get(EARLIER_ATTEMPT)
    total = usage if earlier is None else add_usage(earlier[0], usage)
    # (priced before the total becomes the earlier part: the cost of `usage` alone, here)
    ctx.state[EARLIER_ATTEMPT] = (total, call_cost_micros(ctx, total))
    return total


def with_earlier_calls(ctx: RequestContext, usage: Usage | None) -> Usage | None:
    """A non-stream call's own `usage` with what the request's earlier calls that failed
    cost (`bill_failed_call`), as the request is billed for it."""
    earlier: tuple[Usage, int] | None = ctx.state.get(EARLIER_ATTEMPT)
    if earlier is None:
        return usage
    return earlier[0] if usage is None else add_usage(earlier[0], usage)


_COST_MEMO = "pricing.cost"
