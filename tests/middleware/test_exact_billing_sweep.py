"""The bill is exact: a seeded random mix of requests through the whole stack, each one's row
in the usage ledger compared with what the mock providers answered it, and each budget's
counter with the ledger.

Stack: auth (two static keys: one with a large budget, one with a small budget that cuts
streams off), metering on PostgreSQL (through a TCP relay that goes away for a third of the
run, so part of the ledger arrives by journal replay), quota on Redis, the exact cache, and
failover over two deployments per model (priced differently, so a part billed at the wrong
deployment shows); in the README's order, and with failover above quota. Clients are the
official SDKs: OpenAI chat, Responses and Anthropic messages, JSON and streams. Faults are
queued per request (`Fault.match`): 500s, 429 with Retry-After, first bytes and streams that
stall past the provider's timeouts, streams reset, truncated or ended by an in-band error
after some content; some clients hang up mid-stream; some requests are asked again for a
cache hit.

What a request should cost is worked out from the mock's bills (`MockConfig.record_bills`),
by the README's rules: each call that delivered content costs the usage its provider
reported, at that deployment's price; a call cut short after content costs the input it
reported (else the gateway's estimate of the request) and at least one output token per
content event it sent; a call that failed before any content costs nothing, as does a
cache hit, which records the cost it saved.
"""
from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import openai
import orjson
import psycopg
import pytest

from gateway import create_app
from gateway.kernel import Kernel
from gateway.tokens import estimate_messages, estimate_text
from middleware.metering.journal import Journal
from middleware.quota import QuotaMiddleware
from tests.harness import TEST_KEY, ThreadedServer, free_port, mock_config, write_config
from tests.middleware.test_metering import PG_DSN, drop_tables, started_process_writes
from tests.middleware.test_quota_layer import budget_check, delete_prefix
from tests.mock_providers import Fault, MockConfig, MockProviderServer
from tests.tcp_proxy import TcpProxy

REDIS_URL = "redis://127.0.0.1:6379/0"
CUT_KEY = "sk-sg-" + "cut-off-key-" * 3 + "0123456789"
# (provider, upstream model) -> $ per 1M input, output tokens: micro-dollars per token.
PRICES = {("openai", "gpt-4o-mini"): (1, 2), ("openai", "gpt-4o"): (3, 5),
          ("anthropic", "claude-3-5-haiku-latest"): (2, 4)}
MODELS = '''
providers["openai"] = Provider("openai", base_url=MOCK + "/openai/v1", api_key_env=KEY,
                               timeouts=SHORT)
providers["anthropic"] = Provider("anthropic", base_url=MOCK + "/anthropic", api_key_env=KEY,
                                  timeouts=SHORT)
models = {
    "pair": [Deployment("openai", "gpt-4o-mini", price=Price("1", "2")),
             Deployment("openai", "gpt-4o", price=Price("3", "5"))],
    "mix": [Deployment("anthropic", "claude-3-5-haiku-latest", price=Price("2", "4")),
            Deployment("openai", "gpt-4o-mini", price=Price("1", "2"))],
}
'''
LAYERS = {
    "auth": "Middleware(AuthMiddleware, keys=[StaticKey('tests', key_env='SG_TEST_KEY', "
            "id='k-main', limits=Limits(budgets=(Budget('100', period='lifetime'),))), "
            "StaticKey('tests', key_env='SG_CUT_KEY', id='k-cut', limits=Limits(budgets=("
            "Budget('0.0006', period='lifetime', stream_cutoff=True),)))])",
    "metering": "Middleware(MeteringMiddleware, store=PostgresUsageStore(DSN, prefix=TABLES, "
                "timeout_s=2), journal_dir=JOURNAL, flush_interval_s=0.05, "
                "retry_interval_s=0.2)",
    "quota": "Middleware(QuotaMiddleware, store=RedisQuotaStore(REDIS, prefix=PREFIX))",
    "cache": "Middleware(CacheMiddleware)",
    "failover": "Middleware(FailoverMiddleware, breaker=NEVER_OPENS, retry=RetryPolicy("
                "max_attempts=3, backoff_base_s=0.01, backoff_cap_s=0.05, budget_ratio=1.0, "
                "budget_min_per_s=1000), routes={name: Route(strategy='priority', "
                "continuation=True) for name in models})",
}
ORDERS = {
    "readme": ("auth", "metering", "quota", "cache", "failover"),
    "failover_above_quota": ("auth", "metering", "cache", "failover", "quota"),
}
SEEDS = {"readme": 20261201, "failover_above_quota": 4242}
REQUESTS = 150  # per order (and the cache's second asks on top)
MAX_TOKENS = 40
HUNG = "no answer within the client's timeout"


@pytest.fixture(scope="module")
def billing_mock() -> Iterator[MockProviderServer]:
    with MockProviderServer(MockConfig(record_bills=True, chunk_chars=6)) as server:
        yield server


# -- the plan ------------------------------------------------------------------------------------

@dataclass
class Planned:
    """One request of the run: how it is asked, the faults its calls meet, what came back."""

    marker: str  # a word in its prompt, unique to it: how the mock's bills are told apart
    api: str  # "chat", "responses" or "messages"
    model: str
    stream: bool
    key: str
    cacheable: bool  # temperature 0: the cache keeps it
    faults: list[Fault] = field(default_factory=list)
    hang_up_after: int | None = None  # content events read before the client leaves
    again: str | None = None  # the tag of a second ask (for a cache hit), in `user`
    # Filled in by the client:
    request_id: str | None = None
    status: int | None = None
    deltas: int = 0  # content events the client received
    cut_off: bool = False  # ended in-band (budget cut-off or provider failure)
    cache: str | None = None
    error: str | None = None

    @property
    def text(self) -> str:
        return f"{self.marker} tell me one short thing"


def plan(seed: int, count: int) -> list[Planned]:
    rng = random.Random(seed)
    planned = []
    for index in range(count):
        stream = rng.random() < 0.6
        entry = Planned(marker=f"zq{seed}n{index}x", api=rng.choice(["chat", "responses",
                                                                     "messages"]),
                        model=rng.choice(["pair", "mix"]), stream=stream,
                        key=CUT_KEY if rng.random() < 0.12 else TEST_KEY,
                        cacheable=rng.random() < 0.3)
        entry.faults = faults_for(rng, entry)
        planned.append(entry)
    return planned


def faults_for(rng: random.Random, entry: Planned) -> list[Fault]:
    """The faults the request's calls meet, in order: none for half of them."""
    match = entry.marker
    if entry.stream and rng.random() < 0.1:  # the client leaves while the provider stalls
        entry.hang_up_after = rng.randint(1, 3)
        return [Fault("stall", after_chunks=entry.hang_up_after, delay_s=3.5, match=match)]
    faults = []
    for _ in range(rng.choice([0, 0, 0, 1, 1, 2, 3])):
        kinds = ["status500", "status429", "slow_first_byte"]
        kinds += ["reset", "error_event", "truncate", "stall"] if entry.stream else ["reset"]
        kind = rng.choice(kinds)
        after = rng.randint(0, 3)
        if kind == "status500":
            faults.append(Fault("status", status=500, match=match))
        elif kind == "status429":
            faults.append(Fault("status", status=429, retry_after_s=1, match=match))
        elif kind in ("slow_first_byte", "stall"):  # past the provider's 1 s timeouts
            faults.append(Fault(kind, delay_s=2.5, after_chunks=after, match=match))
        else:
            faults.append(Fault(kind, after_chunks=after, match=match))
    return faults


# -- the clients ---------------------------------------------------------------------------------

def ask(url: str, entry: Planned, again: bool = False) -> None:
    try:
        if entry.api == "messages":
            ask_anthropic(url, entry, again)
        else:
            ask_openai(url, entry, again)
    except (openai.APIStatusError, anthropic.APIStatusError) as exc:
        entry.status = exc.status_code
        entry.request_id = exc.response.headers.get("x-request-id")
        entry.error = type(exc).__name__
    except (openai.APITimeoutError, anthropic.APITimeoutError):
        entry.error = HUNG


def ask_openai(url: str, entry: Planned, again: bool) -> None:
    client = openai.OpenAI(base_url=url + "/v1", api_key=entry.key, max_retries=0, timeout=20)
    extra: dict[str, Any] = {"temperature": 0} if entry.cacheable else {}
    if again:
        extra["user"] = entry.again
    if entry.api == "chat":
        raw: Any = client.chat.completions.with_raw_response.create(
            model=entry.model, messages=[{"role": "user", "content": entry.text}],
            max_tokens=MAX_TOKENS, stream=entry.stream, **extra)
    else:
        raw = client.responses.with_raw_response.create(
            model=entry.model, input=entry.text, max_output_tokens=MAX_TOKENS,
            stream=entry.stream, **extra)
    took(entry, raw.headers, raw.status_code)
    parsed = raw.parse()
    if entry.stream:
        read_stream(entry, parsed, lambda event: content_of_openai(entry.api, event))


def ask_anthropic(url: str, entry: Planned, again: bool) -> None:
    client = anthropic.Anthropic(base_url=url, api_key=entry.key, max_retries=0, timeout=20)
    extra: dict[str, Any] = {"temperature": 0} if entry.cacheable else {}
    if again:
        extra["metadata"] = {"user_id": entry.again}
    raw = client.messages.with_raw_response.create(
        model=entry.model, messages=[{"role": "user", "content": entry.text}],
        max_tokens=MAX_TOKENS, stream=entry.stream, extra_body=extra)
    took(entry, raw.headers, raw.status_code)
    parsed = raw.parse()
    if entry.stream:
        read_stream(entry, parsed, lambda event: event.type == "content_block_delta")


def took(entry: Planned, headers: Any, status: int) -> None:
    entry.request_id = headers["x-request-id"]
    entry.status = status
    entry.cache = headers.get("x-sluicegate-cache")


def content_of_openai(api: str, event: Any) -> bool:
    if api == "responses":
        return bool(event.type == "response.output_text.delta")
    return any(choice.delta.content for choice in event.choices)


def read_stream(entry: Planned, events: Any, is_content: Any) -> None:
    try:
        for event in events:
            if is_content(event):
                entry.deltas += 1
                if entry.hang_up_after is not None and entry.deltas >= entry.hang_up_after:
                    break
            elif getattr(event, "type", "") in ("error", "response.failed"):
                entry.cut_off = True
    except (openai.APIError, anthropic.APIError) as exc:  # an in-band error event
        entry.cut_off = True
        entry.error = str(exc)[:200]
    finally:
        events.close()


# -- what each request should cost ---------------------------------------------------------------

@dataclass
class Cost:
    input_tokens: int = 0
    output_tokens: int = 0
    micros: int = 0

    def add(self, price: tuple[int, int], input_tokens: int, output_tokens: int) -> None:
        self.input_tokens += input_tokens
        self.output_tokens += output_tokens
        self.micros += price[0] * input_tokens + price[1] * output_tokens


def reported(bill: dict[str, Any]) -> tuple[int, int]:
    """The input and output tokens the provider reported in what it sent (0 where none)."""
    sent: bytes = bill["sent"]
    payloads = ([sent] if sent else []) if not bill["stream"] else [
        line[6:] for line in sent.split(b"\n") if line.startswith(b"data: {")]
    input_tokens = output_tokens = 0
    for payload in payloads:
        data = orjson.loads(payload)
        for usage in (data.get("usage"), *(part.get("usage") for part in (
                data.get("message"), data.get("response")) if isinstance(part, dict))):
            if isinstance(usage, dict):
                fresh = usage.get("prompt_tokens", usage.get("input_tokens")) or 0
                if bill["provider"] == "anthropic":
                    fresh += (usage.get("cache_read_input_tokens") or 0) + \
                        (usage.get("cache_creation_input_tokens") or 0)
                input_tokens = max(input_tokens, fresh)
                output_tokens = max(output_tokens, usage.get("completion_tokens",
                                                             usage.get("output_tokens")) or 0)
    return input_tokens, output_tokens


def estimate(entry: Planned, prefill: str | None = None) -> int:
    """The gateway's estimate of the request's input, in its caller's format (what a cut
    stream without a report bills); a continuation's request ends with the text so far."""
    messages = [{"role": "user", "content": entry.text}]  # (a Responses string input too)
    if prefill is not None:
        messages.append({"role": "assistant", "content": prefill})
    return estimate_messages(messages)


def prefill_of(bill: dict[str, Any]) -> str | None:
    """A continuation call's prefill: its last message, the assistant's (else None)."""
    messages = bill["json"].get("messages") or [{}]
    last = messages[-1]
    if last.get("role") != "assistant":
        return None
    content = last.get("content")
    if isinstance(content, list):  # (Anthropic's content blocks)
        return "".join(block.get("text", "") for block in content)
    return str(content)


def text_sent(bill: dict[str, Any]) -> str:
    """The text of a stream's content events as the provider sent them."""
    text = ""
    for line in bill["sent"].split(b"\n"):
        if not line.startswith(b"data: {"):
            continue
        data = orjson.loads(line[6:])
        delta = data.get("delta")
        if isinstance(delta, dict):  # Anthropic's content_block_delta
            text += delta.get("text") or ""
        elif isinstance(delta, str):  # a Responses output_text.delta
            text += delta
        for choice in data.get("choices") or ():
            text += (choice.get("delta") or {}).get("content") or ""
    return text


def expected_cost(entry: Planned, bills: list[dict[str, Any]]) -> Cost:
    cost = Cost()
    for index, bill in enumerate(bills):
        if bill["status"] != 200:
            continue
        price = PRICES[(bill["provider"], bill["json"]["model"])]
        input_tokens, output_tokens = reported(bill)
        if bill["complete"]:
            cost.add(price, input_tokens, output_tokens)
            continue
        if not (bill["stream"] and bill["content_sent"]):
            continue
        asked = estimate(entry, prefill_of(bill))
        # Continued elsewhere (whether or not the continuation answered): continuation.py
        # estimates its output from the text it sent.
        if any(prefill_of(later) is not None for later in bills[index + 1:]):
            cost.add(price, input_tokens or asked,
                     max(output_tokens, estimate_text(text_sent(bill))))
        else:
            # (one output token per content event it sent: README, "at least one output
            # token per content delta"; not its opening role chunk, nor its closing one)
            cost.add(price, input_tokens or asked, max(output_tokens, bill["content_sent"]))
    return cost


def bills_by_tag(bills: list[dict[str, Any]], entries: list[Planned]) -> dict[str, list[Any]]:
    """Each request's bills (a second ask's under its `again` tag), in the order called."""
    found: dict[str, list[Any]] = {}
    tags = [entry.again for entry in entries if entry.again]  # (they hold a marker too)
    tags += [entry.marker for entry in entries if not entry.again]
    for bill in bills:
        text = orjson.dumps(bill["json"]).decode()
        tag = next(tag for tag in tags if tag in text)
        found.setdefault(tag, []).append(bill)
    return found


# -- the ledger and the budgets ------------------------------------------------------------------

def ledger(tables: str) -> dict[str, tuple[Any, ...]]:
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        found = conn.execute(
            f"SELECT request_id, key_id, input_tokens, output_tokens, cost, cost_saved, "
            f"cache_status, status FROM {tables}_events").fetchall()
    return {row[0]: row[1:] for row in found}


def rollup_cost(tables: str, key_id: str) -> Decimal:
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        row = conn.execute(f"SELECT coalesce(sum(cost), 0) FROM {tables}_rollups WHERE "
                           f"grain = 'day' AND kind = 'key' AND subject = %s",
                           (key_id,)).fetchone()
    return Decimal(row[0]) if row else Decimal(0)


def micros(value: Decimal) -> int:
    return int(value * 1_000_000)


def wait_until(condition: Any, timeout_s: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return bool(condition())


@pytest.fixture
def tables() -> Iterator[str]:
    name = "sgx_" + uuid.uuid4().hex[:10]
    yield name
    drop_tables(name)


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    value = f"{{sgx-{uuid.uuid4().hex}}}"
    yield value
    delete_prefix(value)


def config_text(mock_url: str, order: str, dsn: str, tables: str, journal: Path,
                redis_prefix: str) -> str:
    layers = ", ".join(LAYERS[name] for name in ORDERS[order])
    extra = (
        "from gateway.config import Price\n"
        "from middleware.failover import Route\n"
        "from middleware.metering import PostgresUsageStore\n"
        "from middleware.quota import RedisQuotaStore\n"
        f'os.environ.setdefault("SG_CUT_KEY", "{CUT_KEY}")\n'
        'KEY = "MOCK_PROVIDER_KEY"\n'
        "SHORT = Timeouts(connect_s=2, first_byte_s=1, idle_s=1, total_s=10)\n"
        f"DSN, TABLES, JOURNAL = {dsn!r}, {tables!r}, {str(journal)!r}\n"
        f"REDIS, PREFIX = {REDIS_URL!r}, {redis_prefix!r}\n"
        + MODELS + f"middleware = [{layers}]\n")
    return mock_config(mock_url, middleware="none", extra=extra)


@pytest.mark.parametrize("order", sorted(ORDERS))
def test_the_ledger_bills_what_the_providers_reported_and_budgets_equal_it(
        billing_mock: MockProviderServer, tmp_path: Path, tables: str, redis_prefix: str,
        order: str) -> None:
    mock = billing_mock
    mock.clear_faults()
    mock.reset_log()
    entries = plan(SEEDS[order], REQUESTS)
    for entry in entries:
        for fault in entry.faults:
            mock.push_fault(fault)
    proxy = TcpProxy(5432, port=free_port())
    dsn = f"host=127.0.0.1 port={proxy.port} user=root dbname=test"
    app = create_app(write_config(tmp_path, config_text(
        mock.url, order, dsn, tables, tmp_path / "journal", redis_prefix)))
    assert isinstance(app, Kernel)
    with ThreadedServer(app) as server:
        seconds = drive(server, proxy, mock, entries)
        everyone = entries + [second for _, second in seconds]
        ids = {entry.request_id for entry in everyone if entry.request_id}
        assert wait_until(lambda: ids <= set(ledger(tables)), 20), "rows missing"
        rows = ledger(tables)
        billed = {key_id: sum(micros(row[3]) for row in rows.values() if row[0] == key_id)
                  for key_id in ("k-main", "k-cut")}
        budgets = settled_budgets(server, app, billed)
        server.run(proxy.stop())
    replayed, written = replay_whole_journal(tmp_path / "journal", tables)
    assert replayed > 0 and written == 0  # (each of them was in the ledger already)
    assert ledger(tables) == rows
    report = compare(entries, seconds, rows, bills_by_tag(mock.bills, everyone))
    summary = (f"{order}: {len(everyone)} requests, {len(mock.bills)} provider calls, "
               f"{len(report)} discrepancies; {tally(entries, seconds, mock.bills)}")
    print(summary, *report, sep="\n")
    assert len(rows) == len(everyone)  # one row each, however it reached PostgreSQL
    for key_id, cost in billed.items():  # (the replays added to no rollup either)
        assert micros(rollup_cost(tables, key_id)) == cost, key_id
    assert budgets == billed, summary
    assert not report, summary + "\n" + "\n".join(report[:40])


def drive(server: ThreadedServer, proxy: TcpProxy, mock: MockProviderServer,
          entries: list[Planned]) -> list[tuple[Planned, Planned]]:
    """Sends the planned requests, 12 at a time, PostgreSQL away for the middle third; then
    asks the cacheable ones that were answered again, as JSON if they streamed and the other
    way round, for cache hits (with a `user` of their own, which the cache key leaves out
    and the mock's bills show; a broken stream must have been kept out of the cache, and is
    billed as a miss). Returns (first, second) asks."""
    third = len(entries) // 3
    with ThreadPoolExecutor(12) as pool:
        list(pool.map(lambda e: ask(server.url, e), entries[:third]))
        server.run(proxy.stop())  # PostgreSQL away: the journal keeps the records
        list(pool.map(lambda e: ask(server.url, e), entries[third:2 * third]))
        server.run(proxy.start())  # back: the journal is replayed beside new traffic
        list(pool.map(lambda e: ask(server.url, e), entries[2 * third:]))
        assert wait_until(lambda: mock.active_streams == 0)
        seconds = [(entry, Planned(marker=entry.marker, api=entry.api, model=entry.model,
                                   stream=not entry.stream, key=entry.key, cacheable=True,
                                   again=f"zr{entry.marker}again"))
                   for entry in entries if entry.cacheable and entry.status == 200
                   and entry.key == TEST_KEY]
        list(pool.map(lambda pair: ask(server.url, pair[1], again=True), seconds))
    assert wait_until(lambda: mock.active_streams == 0)
    return seconds


def settled_budgets(server: ThreadedServer, app: Kernel,
                    billed: dict[str, int]) -> dict[str, int | None]:
    """Each key's lifetime budget counter, once it is what the ledger billed (or 10 s)."""
    quota = next(c for c in app.components if isinstance(c, QuotaMiddleware))

    def spent() -> dict[str, int | None]:
        checks = [budget_check("lifetime", f"key:{key_id}") for key_id in billed]
        values: list[int | None] = server.run(quota.store.committed(checks))
        return dict(zip(billed, values, strict=True))
    wait_until(lambda: spent() == billed, 10)
    return spent()


def unacknowledged(journal_dir: Path) -> int:
    total = 0
    for slot in journal_dir.glob("slot-*"):
        journal = Journal(slot, read_only=True)
        journal.open()
        try:
            total += journal.pending_count()
        finally:
            journal.close()
    return total


def replay_whole_journal(journal_dir: Path, tables: str) -> tuple[int, int]:
    """Replays every record the journal still holds, as a restart after a crash that lost
    its checkpoint would: (records replayed, rows that added to the ledger)."""
    for checkpoint in journal_dir.glob("slot-*/checkpoint"):
        checkpoint.unlink()
    replayed = unacknowledged(journal_dir)
    written = asyncio.run(started_process_writes(journal_dir, tables, 0, settle_s=0.5))
    assert unacknowledged(journal_dir) == 0  # (the replay ran, and was acknowledged)
    return replayed, written


def tally(entries: list[Planned], seconds: list[tuple[Planned, Planned]],
          bills: list[dict[str, Any]]) -> str:
    """What the run held, for the report."""
    counts: dict[str, int] = {}
    for entry in entries:
        for name in [f"fault:{fault.kind}{fault.status if fault.kind == 'status' else ''}"
                     for fault in entry.faults] + [f"api:{entry.api}", f"status:{entry.status}"]:
            counts[name] = counts.get(name, 0) + 1
    counts["streams"] = sum(entry.stream for entry in entries)
    counts["hung_up"] = sum(entry.hang_up_after is not None for entry in entries)
    counts["cut_in_band"] = sum(entry.cut_off for entry in entries)
    counts["cut_key"] = sum(entry.key == CUT_KEY for entry in entries)
    counts["cache_hits"] = sum(second.cache == "hit" for _, second in seconds)
    counts["second_asks"] = len(seconds)
    counts["continuations"] = sum(prefill_of(bill) is not None for bill in bills)
    return ", ".join(f"{name}={count}" for name, count in sorted(counts.items()))


def compare(entries: list[Planned], seconds: list[tuple[Planned, Planned]],
            rows: dict[str, tuple[Any, ...]], bills: dict[str, list[Any]]) -> list[str]:
    """One line per request whose row differs from what its provider calls cost."""
    problems = []
    for entry in entries:
        if entry.error == HUNG:
            problems.append(f"{entry.marker}: {entry.error} ({entry})")
            continue
        row = rows.get(entry.request_id or "")
        if row is None:
            problems.append(f"{entry.marker}: no row ({entry})")
            continue
        expected = expected_cost(entry, bills.get(entry.marker, []))
        found = (row[1], row[2], micros(row[3]))
        if found != (expected.input_tokens, expected.output_tokens, expected.micros):
            calls = [(b["provider"], b["json"].get("model"), b["status"], b["complete"],
                      b["content_sent"], reported(b)) for b in bills.get(entry.marker, [])]
            problems.append(f"{entry.marker} {entry.api} {entry.model} stream={entry.stream} "
                            f"key={'cut' if entry.key == CUT_KEY else 'main'} "
                            f"faults={[(f.kind, f.status, f.after_chunks) for f in entry.faults]}"
                            f" hang_up={entry.hang_up_after} status={entry.status} "
                            f"deltas={entry.deltas} cut={entry.cut_off}: ledger {found} != "
                            f"expected {(expected.input_tokens, expected.output_tokens, expected.micros)}"
                            f" calls={calls} row={row}")
    for first, second in seconds:
        row = rows.get(second.request_id or "")
        if row is None:
            problems.append(f"{second.again}: no row")
            continue
        if second.cache != "hit":
            expected = expected_cost(second, bills.get(second.again or "", []))
            if (row[1], row[2], micros(row[3])) != (expected.input_tokens,
                                                   expected.output_tokens, expected.micros):
                problems.append(f"{second.again}: a miss billed {row} != {expected}")
            continue
        original = rows[first.request_id or ""]
        if first.cut_off or first.hang_up_after is not None:
            problems.append(f"{second.again}: a hit on a stream that did not end well "
                            f"({first})")
        if micros(row[3]) != 0 or row[4] != original[3] or bills.get(second.again or ""):
            problems.append(f"{second.again} ({second.api}, stream={second.stream}): a hit "
                            f"billed {row[3]} saved {row[4]}, its miss cost {original[3]}")
    return problems



