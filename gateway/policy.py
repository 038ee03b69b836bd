"""Who is calling and what they may use: the records the auth layer writes and the quota
layer enforces, and the contract of the quota stores.

They live in the kernel package because two layers share them and a layer never imports
another. Money is integer micro-dollars (1 USD = 1_000_000) or `Decimal`, never float.
"""
from __future__ import annotations

import calendar
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import MAX_EMAX, MAX_PREC, MIN_EMIN, Context, Decimal
from fnmatch import fnmatchcase
from typing import Any, Final, Protocol

from mypy_extensions import mypyc_attr

# (Final: compiled, the constants below are inlined where they are read, not looked up)
MICROS_PER_USD: Final = 1_000_000

PERIODS = ("daily", "weekly", "monthly", "lifetime")
OVERFLOW_ACTIONS = ("block", "downgrade")
STORE_ERROR_POLICIES = ("open", "closed")

# Kinds of check, and the subjects a limit can be set on.
REQUESTS: Final = "requests"
TOKENS: Final = "tokens"
CONCURRENT: Final = "concurrent"
BUDGET: Final = "budget"
# Limits and amounts go to Redis's Lua as doubles, exact only up to 2**53. A limit is at most
# LIMIT_MAX (rpm, tpm or concurrent requests, or a budget of $4.5 billion in micro-dollars),
# and a reservation or a settled amount at most AMOUNT_MAX, above every limit (so an amount
# made smaller is refused as its whole would be): both stores then decide alike.
LIMIT_MAX: Final = 2 ** 52
AMOUNT_MAX: Final = 2 ** 53 - 1
SUBJECT_KINDS = ("key", "project", "customer", "model", "global")


# Exact arithmetic for converting money: every digit kept, nothing flushed to zero. In the
# default context "1e-999999999" * 10**6 underflowed to 0, which passed the micro-dollar
# check below: a budget shown as entered and enforced as $0.
_EXACT = Context(prec=MAX_PREC, Emin=MIN_EMIN, Emax=MAX_EMAX)


def usd_to_micros(value: Decimal | int | str) -> int:
    """Dollars (a Decimal, an int or a decimal string; never a float) to micro-dollars."""
    if isinstance(value, float):
        raise TypeError("money must be a Decimal, an int or a string, not a float")
    micros = _EXACT.multiply(Decimal(value), MICROS_PER_USD)
    if micros != micros.to_integral_value():
        raise ValueError(f"{value} USD is finer than a micro-dollar")
    return int(micros)


def micros_to_usd(micros: int) -> Decimal:
    return Decimal(micros) / MICROS_PER_USD


# Config-time values (made once, not per request) are plain Python classes when compiled
# (mypyc's native_class=False): a wrong-typed field must reach __post_init__'s checks and give
# their ValueError, not a TypeError from a compiled constructor.
@mypyc_attr(native_class=False)
@dataclass(frozen=True, slots=True)
class Budget:
    """A spending cap in USD over a calendar-aligned UTC period (or for ever: "lifetime").

    On overflow, `block` refuses (402 by default, or 429 with `status=429`) and `downgrade`
    routes to `downgrade_to`, a cheaper public model. With `stream_cutoff`, a stream whose
    actual cost crosses what is left of the budget is ended with an in-band error event.
    """

    limit_usd: Decimal | int | str
    period: str = "monthly"
    on_overflow: str = "block"
    downgrade_to: str | None = None
    stream_cutoff: bool = False
    on_store_error: str = "closed"  # Redis unavailable: "closed" refuses, "open" limits locally
    status: int = 402
    alert_at_percent: tuple[int, ...] = (50, 80, 100)

    def __post_init__(self) -> None:
        limit = _money(given(self, "limit_usd"))
        object.__setattr__(self, "limit_usd", limit)
        if limit < 0:
            raise ValueError("a budget's limit_usd cannot be negative")
        # Compared before converting: micro-dollars of "1E+999999" overflow the decimal context.
        if limit > micros_to_usd(LIMIT_MAX):
            raise ValueError(f"a budget's limit_usd can be at most {micros_to_usd(LIMIT_MAX)}")
        usd_to_micros(limit)  # finer than a micro-dollar: ValueError
        _check_choice("period", given(self, "period"), PERIODS)
        _check_overflow(given(self, "on_overflow"), given(self, "downgrade_to"))
        _check_choice("on_store_error", given(self, "on_store_error"), STORE_ERROR_POLICIES)
        if not isinstance(given(self, "stream_cutoff"), bool):
            raise TypeError("a budget's stream_cutoff must be true or false")
        status = given(self, "status")
        if not _is_int(status) or status not in (402, 429):
            raise ValueError("a budget's status must be 402 or 429")
        object.__setattr__(self, "alert_at_percent", _percents(given(self, "alert_at_percent")))

    @property
    def limit_micros(self) -> int:
        return usd_to_micros(self.limit_usd)


@mypyc_attr(native_class=False)  # config-time, as Budget
@dataclass(frozen=True, slots=True)
class Limits:
    """Rate limits and budgets for one subject (a key, project, customer, model, or all).

    `rpm` and `tpm` are token buckets: the capacity is the per-minute figure and it refills
    smoothly at that rate. `max_concurrent` counts requests in flight. On overflow of a rate
    limit, `block` answers 429 with Retry-After; `downgrade` routes to `downgrade_to`.
    """

    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None
    budgets: tuple[Budget, ...] = ()
    on_overflow: str = "block"
    downgrade_to: str | None = None
    on_store_error: str = "open"  # for rpm, tpm and max_concurrent

    def __post_init__(self) -> None:
        for name in ("rpm", "tpm", "max_concurrent"):
            value = given(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or not 0 <= value <= LIMIT_MAX):
                raise ValueError(f"{name} must be a whole number from 0 to {LIMIT_MAX}, or None")
        budgets: Any = given(self, "budgets")
        if isinstance(budgets, Budget):
            budgets = (budgets,)
        budgets = tuple(budgets)
        if any(not isinstance(b, Budget) for b in budgets):
            raise ValueError("budgets must be Budget(...) values")
        periods = [b.period for b in budgets]
        twice = sorted({period for period in periods if periods.count(period) > 1})
        if twice:  # (one counter per subject and period: two caps on it cannot both hold)
            raise ValueError(f"one budget per period: two are {', '.join(twice)}")
        object.__setattr__(self, "budgets", budgets)
        _check_overflow(given(self, "on_overflow"), given(self, "downgrade_to"))
        _check_choice("on_store_error", given(self, "on_store_error"), STORE_ERROR_POLICIES)

    @property
    def empty(self) -> bool:
        return (self.rpm is None and self.tpm is None and self.max_concurrent is None
                and not self.budgets)

    def to_json(self) -> dict[str, Any]:
        return {
            "rpm": self.rpm, "tpm": self.tpm, "max_concurrent": self.max_concurrent,
            "on_overflow": self.on_overflow, "downgrade_to": self.downgrade_to,
            "on_store_error": self.on_store_error,
            "budgets": [{
                "limit_usd": str(b.limit_usd), "period": b.period, "on_overflow": b.on_overflow,
                "downgrade_to": b.downgrade_to, "stream_cutoff": b.stream_cutoff,
                "on_store_error": b.on_store_error, "status": b.status,
                "alert_at_percent": list(b.alert_at_percent),
            } for b in self.budgets],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Limits:
        """The inverse of `to_json`; raises ValueError (or TypeError) on a bad document."""
        known = {"rpm", "tpm", "max_concurrent", "on_overflow", "downgrade_to",
                 "on_store_error", "budgets"}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown limit field(s): {', '.join(sorted(unknown))}")
        budgets = []
        listed = data.get("budgets")
        if listed is None:
            listed = ()
        if not isinstance(listed, list | tuple):  # (an object would give its keys)
            raise TypeError("budgets must be an array of budget objects")
        for item in listed:
            if not isinstance(item, Mapping):
                raise TypeError("each budget must be an object")
            budgets.append(Budget(**item))
        fields = {k: v for k, v in data.items() if k != "budgets" and v is not None}
        return cls(**fields, budgets=tuple(budgets))

    @classmethod
    def from_stored(cls, data: Mapping[str, Any]) -> Limits:
        """`from_json` for a document a key store holds, which an older version may have
        written: what it accepted and the checks now refuse, yet means one thing, is read as
        that thing (see `_upgraded`); anything else raises as `from_json` does."""
        if not isinstance(data, Mapping):
            raise TypeError("stored limits must be an object")
        return cls.from_json(_upgraded(data))


@dataclass(frozen=True, slots=True)
class Principal:
    """The authenticated caller (written by the auth layer into `RequestContext.principal`).

    `limits` holds the limits stored for this caller's key, project and customer, by subject
    kind ("key", "project", "customer"); the quota layer adds per-model and global ones.
    """

    key_id: str  # public id of the virtual key (safe to log), or "anonymous"
    project: str
    customer: str | None = None
    allowed_models: tuple[str, ...] = ()  # names or globs; empty means every model
    metadata: Mapping[str, Any] = field(default_factory=dict)
    limits: Mapping[str, Limits] = field(default_factory=dict)

    def allows_model(self, name: str) -> bool:
        """Whether this caller may be served by the public model `name`: the one it asked
        for, and any a layer would route it to instead (a downgrade, a fallback)."""
        return model_allowed(self.allowed_models, name)


def downgrade_targets(limits: Limits) -> list[str]:
    """The public models `limits` (and its budgets) may downgrade a request to."""
    targets = [limits.downgrade_to] if limits.downgrade_to is not None else []
    return targets + [budget.downgrade_to for budget in limits.budgets
                      if budget.downgrade_to is not None]


def model_allowed(allowed_models: Sequence[str], name: str) -> bool:
    """Whether a key allowed `allowed_models` (names or globs; none: every model) may use
    the public model `name`."""
    return not allowed_models or name in allowed_models or any(
        fnmatchcase(name, pattern) for pattern in allowed_models)


ANONYMOUS = Principal(key_id="anonymous", project="default")


# -- periods -----------------------------------------------------------------------------------

LIFETIME_END = datetime(9999, 1, 1, tzinfo=UTC)


def period_bounds(period: str, now: datetime) -> tuple[datetime, datetime]:
    """[start, end) of the calendar-aligned UTC period holding `now` (weeks start on Monday)."""
    now = now.astimezone(UTC)
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "daily":
        return day, day + timedelta(days=1)
    if period == "weekly":
        start = day - timedelta(days=day.weekday())
        return start, start + timedelta(days=7)
    if period == "monthly":
        start = day.replace(day=1)
        days = calendar.monthrange(start.year, start.month)[1]
        return start, start + timedelta(days=days)
    if period == "lifetime":
        return datetime(1970, 1, 1, tzinfo=UTC), LIFETIME_END
    raise ValueError(f"unknown period {period!r}")


def period_label(period: str, start: datetime) -> str:
    """A short stable name for a period instance, used in storage keys: 2026-11, 2026-11-28."""
    if period == "monthly":
        return start.strftime("%Y-%m")
    if period in ("daily", "weekly"):
        return start.strftime("%Y-%m-%d")
    return "all"


# -- the quota store contract ------------------------------------------------------------------

@dataclass(slots=True)  # not frozen: made per request, and frozen __init__ costs 5x
class Check:
    """One limit that applies to one request, ready for a quota store.

    - requests / tokens: a token bucket of `limit` that refills `limit` per `window_s`;
      `amount` is taken from it (1 request, or the estimated tokens).
    - concurrent: at most `limit` leases in flight; `amount` is 1; a lease is dropped after
      `lease_s` even if never released (a crashed gateway does not hold capacity for ever).
    - budget: a counter of micro-dollars committed (spent + reserved) in the period that
      ends at `expires_at` (epoch seconds); admitted while counter + amount <= limit.
    """

    kind: str
    key: str  # storage key without the store's prefix, e.g. "rpm:key:k_abc"; unique per call
    limit: int
    amount: int
    window_s: float = 60.0
    lease_s: float = 900.0
    expires_at: float = 0.0
    on_store_error: str = "open"
    label: str = ""  # for people: "project 'acme' monthly budget"


@dataclass(slots=True)
class Decision:
    """The answer of `QuotaStore.admit`, with one entry per check in `remaining`/`reset_s`.

    When refused, nothing was reserved; `failed` is the index of the first failing check and
    `retry_after_s` says when every failing check could pass, the longest of their waits (0
    for a full concurrency limit: a request may end at once; None: one never passes by
    waiting, e.g. a full budget or a request larger than a bucket). `unseeded` lists the budget checks whose counter did not
    exist (a new period, or Redis lost its data): the store reserved nothing, and the caller
    should `seed` them from the ledger and ask again.
    """

    allowed: bool
    failed: int | None = None
    retry_after_s: float | None = None
    remaining: tuple[int, ...] = ()
    reset_s: tuple[float, ...] = ()
    unseeded: tuple[int, ...] = ()


class QuotaStore(Protocol):
    """Where buckets, leases and spend counters live: in process, or in Redis (shared)."""

    name: str

    async def startup(self) -> None: ...

    async def shutdown(self) -> None: ...

    async def admit(self, request_id: str, checks: Sequence[Check]) -> Decision:
        """Checks every limit and, if all pass, reserves every amount: all or nothing,
        atomically. Raises `QuotaStoreError` when the store cannot be reached."""

    async def settle(self, request_id: str, checks: Sequence[Check],
                     actual: Sequence[int]) -> None:
        """Replaces each reservation with the actual amount (same order as `checks`):
        buckets and budgets move by actual - amount (a bucket may go below zero),
        and concurrency leases are released. Raises `QuotaStoreError`."""

    async def seed(self, check: Check, committed: int,
                   held: Mapping[str, int] | None = None,
                   settled: Collection[str] | None = None, counted: Collection[str] = ()
                   ) -> bool:
        """Sets a budget counter that does not exist yet (never overwrites); True if it did.
        `held`: reservations in flight (request id -> amount), added to `committed` and held
        as an admit holds its own, so that their settles replace them. The settles that
        found the counter lost (`unseeded_settles`) are added too, but for the request ids
        in `counted` (which `committed` has); `settled`: the request ids of those the
        caller read: when there are others by now, nothing is set (False: read them again;
        None: unchecked). Also serves as a once-per-period marker (e.g. for budget
        alerts)."""

    async def unseeded_settles(self, check: Check) -> dict[str, int]:
        """The settles (request id -> actual amount) that found the budget counter lost
        (Redis flushed or restarted) and not seeded again, which its seed adds."""

    async def committed(self, checks: Sequence[Check]) -> list[int | None]:
        """The current counter of each budget check (None: not seeded)."""


class QuotaStoreError(Exception):
    """The quota store could not be reached or answered nonsense."""


class SpendLedger(Protocol):
    """The durable record of spend, used to rebuild budget counters (see the metering layer)."""

    async def spent_micros(self, subject_kind: str, subject_id: str,
                           since: datetime) -> int: ...


def given(obj: object, name: str) -> object:
    """A field's value as it was given, for a `__post_init__` to check: read as `object`, so
    that compiled (mypyc), a wrong-typed value reaches the check and its ValueError rather
    than failing the declared type's own check (a TypeError naming no field)."""
    value: object = getattr(obj, name)
    return value


# A decimal string as money is written, or one of the non-finite ones (refused below, by name)
_PLAIN_AMOUNT = re.compile(r"[+-]?(?:(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
                           r"|(?i:s?nan|inf|infinity))")


def _money(value: Any) -> Decimal:
    if isinstance(value, float):
        raise TypeError("money must be a Decimal, an int or a string, not a float")
    if not isinstance(value, Decimal | int | str) or isinstance(value, bool):
        raise TypeError(f"{value!r} is not an amount of money")
    if isinstance(value, str) and not _PLAIN_AMOUNT.fullmatch(value):
        # (Decimal also reads "5_0" as 50 and Arabic-Indic digits: shown as typed, not meant)
        raise TypeError(f"{value[:40]!r} is not an amount of money: ASCII digits with an "
                        "optional sign, point and exponent, such as 12.50")
    try:
        amount = Decimal(value)
    except ArithmeticError:
        raise TypeError(f"{value!r} is not an amount of money") from None
    if not amount.is_finite():  # NaN, sNaN and Infinity parse, then break every comparison
        raise ValueError(f"a budget's limit_usd must be a finite amount, not {value!r}")
    return amount


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _percents(value: Any) -> tuple[int, ...]:
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise TypeError("alert_at_percent must be a list of percentages, e.g. [50, 80, 100]")
    if any(not _is_int(p) or not 0 < p <= 100 for p in value):
        raise ValueError("alert_at_percent values must be whole numbers from 1 to 100")
    return tuple(value)


def _check_choice(name: str, value: object, choices: Sequence[str]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, not {value!r}")


def _check_overflow(action: object, downgrade_to: object) -> None:
    _check_choice("on_overflow", action, OVERFLOW_ACTIONS)
    if downgrade_to is not None and not _is_model_name(downgrade_to):
        raise ValueError("downgrade_to must be a model's name (1-256 printable characters) "
                         "or null")
    if action == "downgrade" and not downgrade_to:
        raise ValueError("on_overflow='downgrade' needs downgrade_to, a cheaper model's name")


def _is_model_name(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 256 and value.isprintable()


# -- documents stored by older versions --------------------------------------------------------
# Up to 956f523 the admin API stored what `Budget` and `Limits` accepted then: any number
# for a status or a percentage, any value for stream_cutoff, anything for a downgrade_to that
# on_overflow="block" never used. Rows like these are still in PostgreSQL.

def _upgraded(data: Mapping[str, Any]) -> dict[str, Any]:
    limits = _without_unused_downgrade(data)
    budgets = limits.get("budgets")
    if isinstance(budgets, list):
        limits["budgets"] = [_upgraded_budget(item) if isinstance(item, Mapping) else item
                             for item in budgets]
    return limits


def _upgraded_budget(item: Mapping[str, Any]) -> dict[str, Any]:
    budget = _without_unused_downgrade(item)
    if "status" in budget:  # 429.0
        budget["status"] = _whole(budget["status"])
    if isinstance(budget.get("alert_at_percent"), list):  # [50.0, 80.0, 100.0]
        budget["alert_at_percent"] = [_whole(p) for p in budget["alert_at_percent"]]
    cutoff = budget.get("stream_cutoff", False)
    if cutoff is None or (isinstance(cutoff, int | float) and not isinstance(cutoff, bool)):
        budget["stream_cutoff"] = bool(cutoff)  # 1, 0, null: as the old version read them
    return budget


def _without_unused_downgrade(fields: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(fields)
    if out.get("on_overflow", "block") != "downgrade" and out.get("downgrade_to") is not None \
            and not _is_model_name(out["downgrade_to"]):
        out["downgrade_to"] = None  # "" or 5: never routed to, since nothing downgrades
    return out


def _whole(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value
