"""What the quota layer charges a budget is what the metering layer bills: one request, one
amount, whether it answered, streamed to its end, was cut off at its budget, broke midway or
lost its client; and a budget counter rebuilt from the usage ledger is what it billed.

Each gateway here runs the metering layer (its journal, or PostgreSQL, is the ledger) above
the quota layer, as the default stack does, against the mock providers; the budget's
counter, once the request has settled, must equal the ledger's cost of that request to the
micro-dollar. The arithmetic is test_quota_layer's: $1 per 1M input and $2 per 1M output
tokens; a stream cut off at its budget sets no max_tokens (`streamed(api, None)`), as there,
and is cut after 12 content deltas.
"""
from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import psycopg
import pytest
from psycopg import sql

from gateway.tokens import estimate_messages
from middleware.metering import JournalError, UsageRecord, journal_usage
from middleware.metering.journal import Journal
from tests.harness import TEST_KEY, free_port
from tests.middleware.test_metering import drop_tables
from tests.middleware.test_quota_layer import (
    ANTHROPIC_HEADERS,
    COST,
    CUTOFF_BUDGET,
    CUTOFF_MESSAGE,
    INPUT,
    LIFETIME_BUDGET,
    PG_DSN,
    PROMPT,
    RESERVED_100,
    Gateway,
    Start,
    auth,
    cutoff_quota,
    delete_prefix,
    deltas,
    eventually,
    prefix,
    quota,
    read_events_then_hang_up,
    redis_store,
    settled,
    slow,
    slow_mock,
    start,
    static_key,
    store,
    wait_streams_done,
)
from tests.mock_providers import Fault, MockProviderServer

# (fixtures, used by name; and `deltas`, which other tests import from here)
__all__ = ["deltas", "prefix", "slow", "slow_mock", "start", "store"]

OPENAI_HEADERS = {"authorization": f"Bearer {TEST_KEY}"}
# api -> (path, model, headers, the input the ledger bills a stream cut short before its
# usage report: the provider's count where it sent one early, else the gateway's estimate)
APIS = {
    "openai": ("/v1/chat/completions", "gpt-mock", OPENAI_HEADERS, INPUT),
    "anthropic": ("/v1/messages", "claude-mock", {"x-api-key": TEST_KEY, **ANTHROPIC_HEADERS},
                  INPUT),  # (message_start reports the input)
    "responses": ("/v1/responses", "gpt-mock", OPENAI_HEADERS,  # (a string input: a user
                  estimate_messages(PROMPT)),  # message, counted as chat messages are)
}


def streamed(api: str, max_tokens: int | None) -> dict[str, Any]:
    """A stream request of `api` for PROMPT (with no output bound when `max_tokens` is None)."""
    _, model, _, _ = APIS[api]
    body: dict[str, Any] = {"model": model, "stream": True}
    if api == "responses":
        body["input"] = PROMPT[0]["content"]
    else:
        body["messages"] = PROMPT
    if max_tokens is not None:
        body["max_output_tokens" if api == "responses" else "max_tokens"] = max_tokens
    return body


def post(gateway: Gateway, api: str, body: dict[str, Any]) -> httpx.Response:
    path, _, headers, _ = APIS[api]
    return httpx.post(gateway.url + path, headers=headers, json=body, timeout=10)


def metering(journal: Path, durability: str = "batch") -> str:
    return (f"Middleware(MeteringMiddleware, journal_dir={str(journal)!r}, "
            f"durability={durability!r})")


def billed(journal: Path) -> int:
    """What the ledger (the metering layer's journal) bills for the one request it holds, in
    micro-dollars, once the request is recorded."""
    def rows() -> list[dict[str, Any]]:
        try:
            return journal_usage(journal, group_by="key")
        except JournalError:  # (not opened yet)
            return []
    assert eventually(lambda: [row["requests"] for row in rows()], [1]) == [1]
    return int(Decimal(rows()[0]["cost_usd"]) * 1_000_000)


def recorded_ids(journal: Path) -> list[str]:
    """The request ids of the records in the metering layer's journal (its first slot)."""
    reader = Journal(journal / "slot-000", read_only=True)
    try:
        reader.open()
    except JournalError:  # (not made yet)
        return []
    try:
        return [UsageRecord.decode(payload).request_id for _, payload in reader.pending()]
    finally:
        reader.close()


def test_with_redis_down_a_record_keeps_the_request_id_its_response_carried(
        start: Start, prefix: str, tmp_path: Path) -> None:
    # An admit to a quota store that failed renamed the request's lease, and did so by
    # adding ".r" to the request's unique id, which is also what the ledger keys its record
    # by: with Redis down, no row carried the x-request-id its response had.
    journal = tmp_path / "journal"
    down = redis_store(prefix, f"redis://127.0.0.1:{free_port()}/0")
    gateway = start(auth(static_key("Limits(rpm=1000, max_concurrent=5)")), metering(journal),
                    quota(down, store_retry_s="0.01"))  # (each request asks Redis again)
    sdk = openai.OpenAI(base_url=gateway.url + "/v1", api_key=TEST_KEY, max_retries=0)
    made = sdk.chat.completions.with_raw_response.create(
        model="gpt-mock", messages=[{"role": "user", "content": "redis is down"}])
    sent = sdk.chat.completions.with_raw_response.create(
        model="gpt-mock", messages=[{"role": "user", "content": "with my own id"}],
        extra_headers={"x-request-id": "caller-id-7"})
    assert (made.status_code, sent.status_code) == (200, 200)  # (rpm fails open)
    assert sent.headers["x-request-id"] == "caller-id-7"
    assert eventually(lambda: len(recorded_ids(journal)), 2) == 2
    first, second = recorded_ids(journal)
    assert first == made.headers["x-request-id"]
    assert re.fullmatch(r"caller-id-7\.[0-9a-f]{16}", second)  # (README: 16 digits added)


@pytest.mark.parametrize("api", ["openai", "responses"])
def test_a_stream_cut_off_at_its_budget_is_charged_what_the_ledger_bills(
        start: Start, store: str, slow: MockProviderServer, tmp_path: Path, api: str) -> None:
    # The quota layer charged a cut stream one output token per event, the ledger one per
    # content delta: a Responses stream's lifecycle events (response.created, ...) went on
    # the budget alone. (An Anthropic stream, whose max_tokens bounds the cut-off's count, is
    # cut when a continuation's input takes its room: test_quota_cutoff.)
    journal = tmp_path / "journal"
    gateway = start(auth(static_key(CUTOFF_BUDGET)), metering(journal), cutoff_quota(store),
                    upstream=slow.url)
    wait_streams_done(slow)
    response = post(gateway, api, streamed(api, None))
    assert CUTOFF_MESSAGE in response.text.split("\n\n")[-2]  # (cut off)
    wait_streams_done(slow)
    cost = billed(journal)
    assert cost == APIS[api][3] + 2 * deltas(response.content)
    assert settled(gateway.committed, COST) == cost


def test_a_stream_cut_off_at_its_budget_is_billed_what_it_delivered_when_recorded_at_once(
        start: Start, slow: MockProviderServer, tmp_path: Path) -> None:
    # durability="response" records a request as its last message goes out. The cut-off's
    # error event went out before the layers below had said what the stream used, so the
    # ledger billed it nothing while the budget was charged what it delivered.
    journal = tmp_path / "journal"
    gateway = start(auth(static_key(CUTOFF_BUDGET)), metering(journal, "response"),
                    cutoff_quota("'memory'"), upstream=slow.url)
    wait_streams_done(slow)
    response = post(gateway, "openai", streamed("openai", None))
    assert response.text.count("\n\n") == 14  # the role chunk, 12 deltas, the error event
    wait_streams_done(slow)
    assert billed(journal) == INPUT + 2 * 12
    assert settled(gateway.committed, COST) == INPUT + 2 * 12


@pytest.mark.parametrize("kind", ["error_event", "reset", "truncate"])
@pytest.mark.parametrize("api", sorted(APIS))
def test_a_stream_its_provider_breaks_is_charged_what_the_ledger_bills(
        start: Start, mock: MockProviderServer, tmp_path: Path, api: str, kind: str) -> None:
    # The quota layer counted the error event the gateway ends such a stream with, and every
    # event that carries no content, as output tokens.
    journal = tmp_path / "journal"
    gateway = start(auth(static_key(LIFETIME_BUDGET)), metering(journal), quota("'memory'"))
    mock.push_fault(Fault(kind=kind, after_chunks=3))
    response = post(gateway, api, streamed(api, 100))
    assert response.status_code == 200
    assert settled(gateway.committed, RESERVED_100) == billed(journal)


@pytest.mark.parametrize("api", sorted(APIS))
def test_a_stream_the_client_leaves_is_charged_what_the_ledger_bills(
        start: Start, slow: MockProviderServer, tmp_path: Path, api: str) -> None:
    slow.config.chunk_delay_s = 0.6  # nothing else arrives between our last read and hang-up
    journal = tmp_path / "journal"
    gateway = start(auth(static_key(LIFETIME_BUDGET)), metering(journal), quota("'memory'"),
                    upstream=slow.url)
    wait_streams_done(slow)
    path, _, headers, billed_input = APIS[api]
    received = read_events_then_hang_up(gateway.url, path, streamed(api, 100), headers,
                                        events=6)
    wait_streams_done(slow)
    cost = billed(journal)
    assert cost == billed_input + 2 * deltas(received)
    assert settled(gateway.committed, RESERVED_100) == cost


@pytest.mark.parametrize("api", sorted(APIS))
@pytest.mark.parametrize("stream", [False, True])
def test_an_answered_request_is_charged_what_the_ledger_bills(
        start: Start, mock: MockProviderServer, tmp_path: Path, api: str,
        stream: bool) -> None:
    journal = tmp_path / "journal"
    gateway = start(auth(static_key(LIFETIME_BUDGET)), metering(journal), quota("'memory'"))
    response = post(gateway, api, {**streamed(api, 100), "stream": stream})
    assert response.status_code == 200
    assert settled(gateway.committed, RESERVED_100) == billed(journal)


@pytest.fixture
def usage_tables() -> Iterator[str]:
    """A prefix for the usage ledger's PostgreSQL tables of this test's own."""
    name = "sgqb_" + uuid.uuid4().hex[:10]
    yield name
    drop_tables(name)


def test_a_gateway_wide_budget_is_rebuilt_from_the_usage_ledger(
        start: Start, prefix: str, usage_tables: str, tmp_path: Path) -> None:
    # The usage ledger is a SpendLedger (README: `ledger=PostgresUsageStore(dsn)`), but it
    # answered only for keys, projects, customers and models: a gateway-wide budget's
    # counter could not be seeded, and the budget (closed on store errors) refused all.
    usage = f"PostgresUsageStore({PG_DSN!r}, prefix={usage_tables!r})"
    gateway = start(
        auth(), f"Middleware(MeteringMiddleware, store={usage}, "
                f"journal_dir={str(tmp_path / 'journal')!r})",
        quota(redis_store(prefix), ledger=usage,
              limits="Limits(budgets=(Budget('0.001', period='daily'),))"))
    for remaining in ("0.000970", "0.000940"):
        response = gateway.chat()
        assert response.status_code == 200, response.text
        assert response.headers["x-sluicegate-budget-remaining"] == remaining
    assert eventually(lambda: gateway.committed("daily", "global:all"), 2 * COST) == 2 * COST

    # Once the ledger holds both, a flush loses the counter, and it is rebuilt from the bill.
    assert eventually(lambda: ledger_cost(usage_tables), 2 * COST) == 2 * COST
    delete_prefix(prefix)  # what FLUSHDB does, to this test's keys only
    assert gateway.committed("daily", "global:all") is None
    assert gateway.chat().headers["x-sluicegate-budget-remaining"] == "0.000910"
    assert gateway.committed("daily", "global:all") == 3 * COST


def ledger_cost(tables: str) -> int:
    """Every request's cost in the usage ledger's day rollups, in micro-dollars."""
    query = sql.SQL("SELECT coalesce(sum(cost), 0) FROM {} WHERE grain = 'day' "
                    "AND kind = 'model'").format(sql.Identifier(f"{tables}_rollups"))
    try:
        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            row = conn.execute(query).fetchone()
    except psycopg.errors.UndefinedTable:
        return 0
    return int(Decimal(row[0]) * 1_000_000) if row else 0
