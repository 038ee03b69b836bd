"""Reading usage back: the usage API over the PostgreSQL rollups, and totals from journals.

`GET /admin/usage` (an operator, with the admin token) totals every key, project, customer or
model; `GET /v1/usage/self` totals the calling key alone, which the auth layer verified and
put in the scope (`gateway.context.PRINCIPAL_KEY`). Both take `since` and `until` (ISO 8601;
UTC when no offset is given; default: until now, since 30 days before until) and `grain`
(`day`, the default, or `minute`: which rollups are summed). The window is widened to whole
grains, `since` down and `until` up (UTC), and the answer gives it so: it is exactly what
the rollups summed (a record 29 days 23 hours old is in the default report).

`journal_usage` sums the records in the journals on disk, read-only, for `sluicegate usage
--journal DIR`: with no PostgreSQL store the journal is the ledger; with one, those are the
records PostgreSQL has not taken yet.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from gateway.admin import (
    admin_error,
    admitted,
    query_refusal,
    send_error,
    send_json,
    without_body_for_head,
)
from gateway.context import PRINCIPAL_KEY
from gateway.errors import GatewayError
from gateway.kernel import Scope, Send
from gateway.policy import micros_to_usd
from middleware.metering.journal import Journal, JournalError
from middleware.metering.record import UsageRecord
from middleware.metering.store import GRAINS, GROUPS, PostgresUsageStore, UsageStoreError

__all__ = ["journal_usage", "serve_admin_usage", "serve_own_usage"]

logger = logging.getLogger("sluicegate.metering")

DEFAULT_WINDOW = timedelta(days=30)
NO_SUBJECT = "-"  # a journal record's missing project (no auth layer), customer or key
_MAX_ECHOED_CHARS = 64


class _BadParameter(ValueError):
    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


# -- the API -----------------------------------------------------------------------------------

async def serve_admin_usage(store: PostgresUsageStore | None, admin_token: bytes, scope: Scope,
                            send: Send) -> None:
    """`GET /admin/usage?group_by=key|project|customer|model&since=&until=&grain=[&subject=]`"""
    if not await admitted(scope, send, admin_token, "GET", _ADMIN_PARAMS):
        return
    send = without_body_for_head(scope, send)
    if store is None:
        await send_error(send, admin_error(
            404, "No PostgreSQL usage store is configured; use `sluicegate usage --journal "
                 "DIR`.", "usage_unavailable"))
        return
    query = _query(scope)  # (`admitted` refused any other parameter, and any twice)
    try:
        group_by = query.get("group_by", "project")
        if group_by not in GROUPS:
            raise _BadParameter("group_by", f"group_by must be one of {', '.join(GROUPS)}")
        since, until, grain = _window(query)
        subject = query.get("subject")
        if subject is not None and "\0" in subject:  # (PostgreSQL refuses NUL in text)
            raise _BadParameter("subject", "subject must not hold a NUL character")
        rows = await store.usage(group_by=group_by, grain=grain, since=since, until=until,
                                 subject=subject)
    except _BadParameter as exc:
        await send_error(send, admin_error(400, str(exc), "invalid_parameter", param=exc.param))
        return
    except ValueError as exc:  # (a value the store refused)
        await send_error(send, admin_error(400, str(exc), "invalid_parameter"))
        return
    except UsageStoreError as exc:
        await send_error(send, admin_error(503, str(exc), "usage_store_unavailable"))
        return
    await send_json(send, 200, {"object": "usage", "group_by": group_by, "grain": grain,
                                "since": since.isoformat(), "until": until.isoformat(),
                                "data": rows})


async def serve_own_usage(store: PostgresUsageStore | None, scope: Scope, send: Send) -> None:
    """`GET /v1/usage/self?since=&until=&grain=`: the calling key's totals. Refusals are
    GatewayErrors, which the kernel renders in the OpenAI error shape."""
    principal = scope.get(PRINCIPAL_KEY)
    if not isinstance(principal, dict) or not isinstance(principal.get("key_id"), str):
        # Never answered unauthenticated: the auth layer, which verifies the key, is not above.
        raise GatewayError(401, "This gateway cannot verify API keys for /v1/usage/self (no "
                                "AuthMiddleware before MeteringMiddleware).",
                           code="authentication_unavailable")
    if scope["method"] not in ("GET", "HEAD"):
        raise GatewayError(405, f"Method {scope['method']} is not allowed here; use GET or "
                                "HEAD.", code="method_not_allowed",
                           headers=[(b"allow", b"GET, HEAD")])
    send = without_body_for_head(scope, send)
    if store is None:
        raise GatewayError(404, "This gateway keeps no usage database (its MeteringMiddleware "
                                "has no PostgreSQL store), so it cannot report usage.",
                           code="usage_unavailable")
    refusal = query_refusal(scope, _OWN_PARAMS)
    if refusal is not None:
        raise refusal
    try:
        since, until, grain = _window(_query(scope))
    except _BadParameter as exc:
        raise GatewayError(400, str(exc), param=exc.param, code="invalid_parameter") from None
    key_id: str = principal["key_id"]
    try:
        rows = await store.usage(group_by="key", subject=key_id, grain=grain, since=since,
                                 until=until)
    except UsageStoreError:
        raise GatewayError(503, "Usage cannot be read right now; try again shortly.",
                           code="usage_store_unavailable") from None
    data = [{name: value for name, value in row.items() if name != "subject"} for row in rows]
    await send_json(send, 200, {"object": "usage", "key_id": key_id, "grain": grain,
                                "since": since.isoformat(), "until": until.isoformat(),
                                "data": data})


_ADMIN_PARAMS = ("group_by", "since", "until", "grain", "subject")
_OWN_PARAMS = ("since", "until", "grain")


def _query(scope: Scope) -> dict[str, str]:
    """The query's parameters (`query_refusal` checked them: each a known one, once)."""
    raw = scope.get("query_string", b"").decode("latin-1")
    return dict(parse_qsl(raw, keep_blank_values=True))


def _window(query: dict[str, str]) -> tuple[datetime, datetime, str]:
    """(since, until, grain) from the query, with the defaults of the module docstring."""
    grain = query.get("grain", "day")
    if grain not in GRAINS:
        raise _BadParameter("grain", f"grain must be one of {', '.join(GRAINS)}, not "
                                     f"{_echo(grain)}")
    until = _time("until", query.get("until")) or datetime.now(UTC)
    try:
        since = _time("since", query.get("since")) or until - DEFAULT_WINDOW
    except OverflowError:  # (the default window before year 1)
        raise _BadParameter("until", "until is too early for the default window; give "
                                     "since too") from None
    if since >= until:
        raise _BadParameter("since", "since must be before until")
    # (a time at the calendar's ends, in UTC or a bucket on, is past what datetime holds)
    try:
        start = _grain_start(since, grain)
    except OverflowError:
        raise _BadParameter("since", _OUT_OF_RANGE.format("since")) from None
    try:
        end = _grain_end(until, grain)
    except OverflowError:
        raise _BadParameter("until", _OUT_OF_RANGE.format("until")) from None
    return start, end, grain


_OUT_OF_RANGE = "{} must be a time from year 1 to 9999 in UTC, a bucket short of either end"


def _grain_start(moment: datetime, grain: str) -> datetime:
    """The start of the UTC minute or day holding `moment` (the rollups' bucket)."""
    moment = moment.astimezone(UTC)
    if grain == "day":
        return moment.replace(hour=0, minute=0, second=0, microsecond=0)
    return moment.replace(second=0, microsecond=0)


def _grain_end(moment: datetime, grain: str) -> datetime:
    """`moment` if a bucket starts there, else the start of the next one."""
    start = _grain_start(moment, grain)
    if start == moment:
        return start
    return start + (timedelta(days=1) if grain == "day" else timedelta(minutes=1))


def _time(param: str, value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise _BadParameter(param, f"{param} must be an ISO 8601 time such as "
                                   f"2025-01-31T00:00:00Z, not {_echo(value)}") from None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _echo(value: str) -> str:
    """The caller's own value, quoted and bounded, for an error message."""
    return repr(value if len(value) <= _MAX_ECHOED_CHARS else value[:_MAX_ECHOED_CHARS] + "…")


# -- journals on disk --------------------------------------------------------------------------

_SUBJECT_OF: dict[str, Callable[[UsageRecord], str | None]] = {
    "key": lambda record: record.key_id,
    "project": lambda record: record.project,
    "customer": lambda record: (f"{record.project}/{record.customer}"
                                if record.project and record.customer else None),
    "model": lambda record: record.model or None,
}
_COUNTERS = ("requests", "errors", "input_tokens", "output_tokens", "cached_input_tokens",
             "reasoning_tokens", "cache_write_tokens", "cache_write_1h_tokens", "cost_micros",
             "saved_micros")


def journal_usage(directory: str | Path, *, group_by: str = "project",
                  since: datetime | None = None,
                  until: datetime | None = None) -> list[dict[str, Any]]:
    """Totals per `group_by` of the records in the journals under `directory` (every
    `slot-NNN` in it, or `directory` itself if it is one journal) that started in
    [since, until), as rows of the usage API, most costly first. A record without the
    subject counts under "-". Read-only: nothing on disk changes, and a running gateway may
    hold the journals. JournalError when `directory` holds no journal."""
    if group_by not in GROUPS:
        raise ValueError(f"group_by must be one of {', '.join(GROUPS)}")
    subject_of = _SUBJECT_OF[group_by]
    start = since.timestamp() if since is not None else float("-inf")
    end = until.timestamp() if until is not None else float("inf")
    totals: dict[str, dict[str, int]] = {}
    seen: set[tuple[str, float]] = set()
    for record in _journal_records(Path(directory)):
        if not start <= record.started_at < end:
            continue
        # (a record journaled twice, by a batch retried after a failed append, counts once:
        # the same key as PostgreSQL's ON CONFLICT)
        identity = (record.request_id, record.started_at)
        if identity in seen:
            continue
        seen.add(identity)
        row = totals.setdefault(subject_of(record) or NO_SUBJECT, dict.fromkeys(_COUNTERS, 0))
        row["requests"] += 1
        row["errors"] += record.status >= 400
        row["input_tokens"] += record.input_tokens
        row["output_tokens"] += record.output_tokens
        row["cached_input_tokens"] += record.cached_input_tokens
        row["reasoning_tokens"] += record.reasoning_tokens
        row["cache_write_tokens"] += record.cache_write_tokens
        row["cache_write_1h_tokens"] += record.cache_write_1h_tokens
        row["cost_micros"] += record.cost_micros
        row["saved_micros"] += record.saved_micros
    ordered = sorted(totals.items(), key=lambda item: (-item[1]["cost_micros"], item[0]))
    return [_row(subject, counts) for subject, counts in ordered]


def _journal_records(root: Path) -> Iterator[UsageRecord]:
    directories = sorted(path for path in root.glob("slot-*") if path.is_dir())
    if not directories and any(root.glob("*.sgj")):
        directories = [root]
    if not directories:
        raise JournalError(f"there is no usage journal in {root} (no slot-NNN directories)")
    for directory in directories:
        journal = Journal(directory, read_only=True)
        journal.open()
        try:
            pending = journal.pending()
        finally:
            journal.close()
        for _, payload in pending:
            try:
                yield UsageRecord.decode(payload)
            except ValueError:
                logger.error("metering: an unreadable record in %s was skipped", directory)


def _row(subject: str, counts: dict[str, int]) -> dict[str, Any]:
    """A row as the usage API gives it: money in dollars, to the micro-dollar, as a string."""
    return {"subject": subject, "requests": counts["requests"], "errors": counts["errors"],
            "input_tokens": counts["input_tokens"], "output_tokens": counts["output_tokens"],
            "cached_input_tokens": counts["cached_input_tokens"],
            "reasoning_tokens": counts["reasoning_tokens"],
            "cache_write_tokens": counts["cache_write_tokens"],
            "cache_write_1h_tokens": counts["cache_write_1h_tokens"],
            "cost_usd": f"{micros_to_usd(counts['cost_micros']):.6f}",
            "cost_saved_usd": f"{micros_to_usd(counts['saved_micros']):.6f}"}
