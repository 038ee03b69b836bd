"""One usage record per request: what the bill is made of.

`record_of(ctx)` reads a finished request's context; `encode`/`decode` turn a record into the
compact bytes the journal keeps. Money is integer micro-dollars (1e-6 USD) in the record and
`numeric` in PostgreSQL; no float ever holds money.

The bytes are a JSON array: the format number, then the fields in the order of
`ARRAY_FIELDS`, which only ever grows at its end (a shorter array, from an older gateway,
leaves the newer fields at their defaults). Journals written before the array existed hold
JSON objects keyed by field name; `decode` reads both.
"""
from __future__ import annotations

import dataclasses
import operator
import time
from dataclasses import dataclass, field, fields
from decimal import Decimal
from typing import Any

import orjson

from gateway.context import RequestContext, Usage
from gateway.policy import micros_to_usd
from gateway.pricing import CACHE_HITS, billed_micros

__all__ = ["UsageRecord", "cleaned", "labels_of", "record_of"]

_TAG_PREFIX = b"x-sluicegate-tag-"
_MAX_LABELS = 16
_MAX_LABEL_KEY = 64
_MAX_LABEL_VALUE = 256


@dataclass(slots=True)
class UsageRecord:
    request_id: str
    started_at: float  # epoch seconds (UTC)
    ended_at: float
    key_id: str | None = None
    project: str | None = None
    customer: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    api_format: str = "openai"
    operation: str = ""
    model: str = ""  # the public model the caller asked for
    served_model: str | None = None  # the model id upstream that answered
    provider: str | None = None
    deployment: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    reasoning_tokens: int = 0
    cost_micros: int = 0
    saved_micros: int = 0  # what a cache hit would have cost
    latency_ms: float = 0.0
    ttft_ms: float | None = None
    status: int = 0
    error_type: str | None = None
    cache_status: str | None = None
    attempts: int = 0
    fallbacks: int = 0
    stream: bool = False
    client_disconnected: bool = False
    # Of the input tokens: written to a provider-side prompt cache, and of those for an hour.
    cache_write_tokens: int = 0
    cache_write_1h_tokens: int = 0

    def encode(self) -> bytes:
        # One C call gathers the fields, one writes them: a third of what orjson takes to
        # write a slotted dataclass as an object.
        values = _array_values(self)
        if values[-2:] == _NO_CACHE_WRITES:  # (as `values_of` leaves them out)
            values = values[:-2]
        return orjson.dumps((ARRAY_FORMAT, *values))

    @classmethod
    def decode(cls, data: bytes) -> UsageRecord:
        """The record `encode` wrote (either format); ValueError for anything else."""
        raw = orjson.loads(data)
        if isinstance(raw, list):
            if len(raw) < 2 or raw[0] != ARRAY_FORMAT:
                raise ValueError("not a usage record")
            # (a newer gateway's array is longer: the fields this one knows are its start)
            raw = dict(zip(ARRAY_FIELDS, raw[1:], strict=False))
        if not isinstance(raw, dict) or not isinstance(raw.get("request_id"), str):
            raise ValueError("not a usage record")  # noqa: TRY004 (decode: bad data)
        known = _FIELD_NAMES
        try:
            return cls(**{name: value for name, value in raw.items() if name in known})
        except TypeError as exc:
            raise ValueError(f"not a usage record: {exc}") from None

    @property
    def cost(self) -> Decimal:
        return micros_to_usd(self.cost_micros)

    @property
    def cost_saved(self) -> Decimal:
        return micros_to_usd(self.saved_micros)


ARRAY_FORMAT = 2
# The journal's field order: append new fields at the end, never reorder or remove one. A
# reader takes an array shorter than its fields (the rest at their defaults) or longer (the
# fields it knows). Gateways before the cache-write fields refuse a longer array, so a
# record leaves them out while they are 0: what such a gateway, rolled back to, can replay.
ARRAY_FIELDS = (
    "request_id", "started_at", "ended_at", "key_id", "project", "customer", "labels",
    "api_format", "operation", "model", "served_model", "provider", "deployment",
    "input_tokens", "output_tokens", "cached_input_tokens", "reasoning_tokens", "cost_micros",
    "saved_micros", "latency_ms", "ttft_ms", "status", "error_type", "cache_status",
    "attempts", "fallbacks", "stream", "client_disconnected", "cache_write_tokens",
    "cache_write_1h_tokens",
)
_FIELD_NAMES = frozenset(f.name for f in fields(UsageRecord))
assert _FIELD_NAMES == set(ARRAY_FIELDS), "a UsageRecord field is missing from ARRAY_FIELDS"
_array_values = operator.attrgetter(*ARRAY_FIELDS)


def _text(value: str) -> str:
    """A caller's string as PostgreSQL's text and jsonb take it: they refuse NUL, and one
    record holding it would fail its whole batch, so it becomes U+FFFD."""
    return value.replace("\x00", "\ufffd") if "\x00" in value else value


def cleaned(record: UsageRecord) -> UsageRecord:
    """`record`, with a NUL in any of its strings (its labels too) replaced as `_text` does:
    an upstream's error type, a model it names, a customer id all come from outside, and a
    record journaled by a gateway from before they were cleaned would stop every replay."""
    changes: dict[str, Any] = {
        name: _text(value) for name, value in zip(ARRAY_FIELDS, _array_values(record),
                                                  strict=True)
        if isinstance(value, str) and "\x00" in value}
    labels = record.labels
    if labels and any("\x00" in key or "\x00" in value for key, value in labels.items()):
        changes["labels"] = {_text(key): _text(value) for key, value in labels.items()}
    return dataclasses.replace(record, **changes) if changes else record


def labels_of(ctx: RequestContext) -> dict[str, str]:
    """`X-Sluicegate-Tag-<name>: <value>` headers, then OpenAI's `metadata` strings (headers
    win); at most 16, names up to 64 and values up to 256 characters."""
    labels: dict[str, str] = {}
    for name, value in ctx.headers:
        # Nearly no header is a tag: testing the first byte (120 is "x") before startswith
        # costs the others a third as much.
        if name and name[0] == 120 and name.startswith(_TAG_PREFIX) \
                and len(labels) < _MAX_LABELS:
            key = _text(name[len(_TAG_PREFIX):].decode("latin-1")[:_MAX_LABEL_KEY])
            if key:
                labels[key] = _text(value.decode("latin-1")[:_MAX_LABEL_VALUE])
    metadata = ctx.body.get("metadata") if ctx.api_format == "openai" else None
    if isinstance(metadata, dict):
        for key, value in metadata.items():
            if len(labels) >= _MAX_LABELS:
                break
            if isinstance(key, str) and isinstance(value, str) and key:
                labels.setdefault(_text(key[:_MAX_LABEL_KEY]), _text(value[:_MAX_LABEL_VALUE]))
    return labels


def record_of(ctx: RequestContext, *, ended_at: float | None = None,
              ended_monotonic: float | None = None) -> UsageRecord:
    """The record of a finished request. Cache hits cost 0 and record what they saved;
    calls that never reached a model (refused, failed before upstream) cost 0."""
    return cleaned(UsageRecord(*values_of(ctx, ended_at, ended_monotonic)))


def payload_of(ctx: RequestContext, ended_at: float | None = None,
               ended_monotonic: float | None = None) -> bytes:
    """`record_of(ctx).encode()`, without building the record: what the request path
    queues."""
    payload = orjson.dumps((ARRAY_FORMAT, *values_of(ctx, ended_at, ended_monotonic)))
    # PostgreSQL refuses NUL in text and jsonb, and a record holding one failed its whole
    # batch. Any string here may hold one (an upstream's error type, a customer id), and
    # orjson writes it as this escape: one scan of the bytes costs less than a test of each
    # string (a backslash the caller sent before "u0000" matches too, and is only cleaned).
    if b"\\u0000" in payload:
        return cleaned(UsageRecord.decode(payload)).encode()
    # orjson hands back its whole 4 KiB output buffer with every result, however short; a
    # queued record would hold it until the writer took the batch (~3 MB of scattered 4 KiB
    # blocks at full speed). The join keeps the ~250 bytes only, for ~50 ns.
    return b"".join((payload, b""))


def values_of(ctx: RequestContext, ended_at: float | None = None,
              ended_monotonic: float | None = None) -> tuple[Any, ...]:
    """A finished request's record fields, in `ARRAY_FIELDS` order. Durations are in
    milliseconds to the microsecond; the end time defaults to the start plus the duration."""
    ended_monotonic = time.monotonic() if ended_monotonic is None else ended_monotonic
    elapsed_s = ended_monotonic - ctx.started_monotonic
    if ended_at is None:
        ended_at = ctx.started_at + elapsed_s
    principal = ctx.principal
    hit = ctx.cache_status in CACHE_HITS
    usage = ctx.usage or _NO_USAGE
    if hit:
        served_model = provider = deployment = ttft = None
        cost, attempts = 0, 0
        saved = int(ctx.state.get("cache.saved_micros", 0))
    else:
        served_model, provider = ctx.served_model, ctx.provider
        served = ctx.served_deployment
        deployment = None if served is None else getattr(served, "name", None)
        first_byte = ctx.first_byte_s
        # round(x * 1e6) / 1000, not round(x * 1000, 3): that one formats the float as
        # decimal digits first, and costs a record as much as its labels.
        ttft = None if first_byte is None else round(first_byte * 1e6) / 1000
        # (what the quota layer settles budgets to: the one definition of the bill)
        cost, saved, attempts = billed_micros(ctx), 0, len(ctx.attempts)
    values = (
        # (the caller may send one x-request-id with many requests: a record of such a
        # request carries it with random digits added, `unique_id`, so no two records
        # share one, and one is never taken for the replay of another)
        ctx.unique_id or ctx.request_id, ctx.started_at, ended_at,
        getattr(principal, "key_id", None),
        getattr(principal, "project", None), ctx.customer,
        labels_of(ctx), ctx.api_format, ctx.operation, ctx.model, served_model, provider,
        deployment, usage.input_tokens, usage.output_tokens, usage.cached_input_tokens,
        usage.reasoning_tokens, cost, saved,
        round(elapsed_s * 1e6) / 1000, ttft, ctx.status,
        ctx.error_type, ctx.cache_status, attempts,
        int(ctx.state.get("failover.fallbacks", 0)), ctx.stream, ctx.client_disconnected)
    if usage.cache_write_tokens or usage.cache_write_1h_tokens:  # (see ARRAY_FIELDS)
        return (*values, usage.cache_write_tokens, usage.cache_write_1h_tokens)
    return values


_NO_CACHE_WRITES = (0, 0)


_NO_USAGE = Usage()
