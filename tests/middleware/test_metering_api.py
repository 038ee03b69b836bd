"""Reading usage back: `GET /v1/usage/self` (a key's own totals), `sluicegate usage` against a
gateway's admin API, and `sluicegate usage --journal` on the journals of a gateway without
PostgreSQL. Real gateways on real sockets, keys in PostgreSQL created through the admin API,
usage made with the official openai SDK."""
from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import psycopg
import pytest
from psycopg import sql

from gateway.app import create_app
from middleware.metering import journal_usage
from middleware.metering.journal import Journal, JournalError
from middleware.metering.record import UsageRecord
from middleware.metering.store import PostgresUsageStore
from tests.harness import REPO, ThreadedServer, free_port, mock_config, write_config
from tests.middleware.test_metering import PG_DSN, drop_tables, wait_for_rows

ADMIN_ENV = "SG_USAGE_ADMIN"
ADMIN_TOKEN = "usage-admin-" + uuid.uuid4().hex
SELF = "/v1/usage/self"
QUESTION = [{"role": "user", "content": "how much have I spent?"}]
COLUMNS = ["REQUESTS", "INPUT TOKENS", "OUTPUT TOKENS", "COST USD", "SAVED USD"]


@dataclass(slots=True)
class Caller:
    """A key and what its requests used, as the openai SDK reported it."""

    key_id: str
    key: str
    project: str
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    request_ids: list[str] = field(default_factory=list)

    @property
    def cost(self) -> Decimal:  # the mock models' price: $1 in, $2 out per million tokens
        return (Decimal(self.input_tokens) + 2 * Decimal(self.output_tokens)) / 10**6

    def ask(self, url: str, count: int, *, stream_one: bool = False) -> None:
        client = openai.OpenAI(base_url=url + "/v1", api_key=self.key, max_retries=0)
        for i in range(count):
            if stream_one and i == 0:
                with client.chat.completions.with_streaming_response.create(
                        model="gpt-mock", messages=QUESTION, stream=True,
                        stream_options={"include_usage": True}) as response:
                    usage = list(response.parse())[-1].usage
                    request_id = response.headers["x-request-id"]
            else:
                raw = client.chat.completions.with_raw_response.create(
                    model="gpt-mock", messages=[{"role": "user", "content": f"q{i} {self.key_id}"}])
                usage, request_id = raw.parse().usage, raw.headers["x-request-id"]
            assert usage is not None
            self.requests += 1
            self.input_tokens += usage.prompt_tokens
            self.output_tokens += usage.completion_tokens
            self.request_ids.append(request_id)


def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def serve(directory: Path, mock_url: str, layers: str) -> ThreadedServer:
    """A gateway whose `middleware` is `layers` (the config module's own text)."""
    imports = ("from middleware.auth import PostgresKeyStore\n"
               "from middleware.metering import PostgresUsageStore\n")
    directory.mkdir(parents=True, exist_ok=True)
    config = write_config(directory, mock_config(mock_url, extra=imports + layers))
    return ThreadedServer(create_app(config))


def sluicegate(*args: str, env: dict[str, str] | None = None
               ) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SLUICEGATE_")}
    result = subprocess.run([sys.executable, "-m", "gateway.cli", "usage", *args], check=False,
                            cwd=REPO, env={**environ, ADMIN_ENV: ADMIN_TOKEN, **(env or {})},
                            capture_output=True, text=True, timeout=60)
    assert ADMIN_TOKEN not in result.stdout + result.stderr
    return result


def table(output: str) -> tuple[str, list[list[str]]]:
    """(the line above the table, its rows under the header) from `sluicegate usage`."""
    title, header, *lines = output.splitlines()
    assert re.split(r" {2,}", header.strip())[1:] == COLUMNS
    return title, [re.split(r" {2,}", line.strip()) for line in lines]


def row_of(caller: Caller, subject: str) -> list[str]:
    return [subject, str(caller.requests), str(caller.input_tokens), str(caller.output_tokens),
            f"{caller.cost:.6f}", "0.000000"]


# -- a gateway with PostgreSQL: keys and usage -------------------------------------------------

@dataclass(frozen=True, slots=True)
class Ledger:
    url: str
    alice: Caller
    bob: Caller

    def new_caller(self) -> Caller:
        return create_caller(self.url)


def create_caller(url: str) -> Caller:
    """A new key in a project of its own, made with the admin API."""
    project = "p-" + uuid.uuid4().hex[:8]
    created = httpx.post(url + "/admin/keys", json={"project": project},
                         headers=auth(ADMIN_TOKEN))
    assert created.status_code == 201, created.text
    return Caller(created.json()["id"], created.json()["key"], project)


@pytest.fixture(scope="module")
def ledger(tmp_path_factory: pytest.TempPathFactory, mock_url: str) -> Iterator[Ledger]:
    """Keys in PostgreSQL (the auth layer's admin API), usage in PostgreSQL; alice made three
    requests, bob two (one streamed)."""
    name = "sg_usage_api_" + uuid.uuid4().hex[:10]
    directory = tmp_path_factory.mktemp("usage_api")
    layers = f"""
middleware = [
    Middleware(AuthMiddleware, store=PostgresKeyStore({PG_DSN!r}, schema={name!r},
               channel={name!r}), admin_token_env={ADMIN_ENV!r}),
    Middleware(MeteringMiddleware, store=PostgresUsageStore({PG_DSN!r}, prefix={name!r},
               timeout_s=2), journal_dir={str(directory / "journal")!r}, flush_interval_s=0.05,
               admin_token_env={ADMIN_ENV!r}),
    Middleware(FailoverMiddleware),
]
"""
    try:
        with pytest.MonkeyPatch.context() as env:
            env.setenv(ADMIN_ENV, ADMIN_TOKEN)
            with serve(directory, mock_url, layers) as server:
                alice, bob = create_caller(server.url), create_caller(server.url)
                alice.ask(server.url, 3)
                bob.ask(server.url, 2, stream_one=True)
                assert set(wait_for_rows(name, 5)) == {*alice.request_ids, *bob.request_ids}
                yield Ledger(server.url, alice, bob)
    finally:
        drop_tables(name)
        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(
                sql.Identifier(name)))


def test_each_key_sees_its_own_usage_and_nothing_else(ledger: Ledger) -> None:
    for caller, headers in ((ledger.alice, auth(ledger.alice.key)),
                            (ledger.bob, {"x-api-key": ledger.bob.key})):
        response = httpx.get(ledger.url + SELF, headers=headers)
        assert response.status_code == 200, response.text
        usage = response.json()
        assert (usage["object"], usage["key_id"], usage["grain"]) == \
            ("usage", caller.key_id, "day")
        since, until = (datetime.fromisoformat(usage[name]) for name in ("since", "until"))
        assert until - since > timedelta(days=30)  # the default window: the last 30 days
        [totals] = usage["data"]
        assert {name: totals[name] for name in ("requests", "input_tokens", "output_tokens",
                                                "errors", "cached_input_tokens")} == {
            "requests": caller.requests, "input_tokens": caller.input_tokens,
            "output_tokens": caller.output_tokens, "errors": 0, "cached_input_tokens": 0}
        assert Decimal(totals["cost_usd"]) == caller.cost > 0
        assert Decimal(totals["cost_saved_usd"]) == 0 and totals["reasoning_tokens"] == 0
    assert ledger.alice.requests == 3 and ledger.bob.requests == 2


def test_the_window_and_grain_come_from_the_query(ledger: Ledger) -> None:
    now = datetime.now(UTC)
    window = {"since": (now - timedelta(hours=1)).isoformat(),
              "until": (now + timedelta(hours=1)).isoformat(), "grain": "minute"}
    usage = httpx.get(ledger.url + SELF, params=window, headers=auth(ledger.bob.key)).json()
    assert usage["grain"] == "minute" and usage["data"][0]["requests"] == ledger.bob.requests
    # (the minutes summed: since down to its minute, until up)
    assert datetime.fromisoformat(usage["since"]) == \
        datetime.fromisoformat(window["since"]).replace(second=0, microsecond=0)
    assert datetime.fromisoformat(usage["until"]) == \
        datetime.fromisoformat(window["until"]).replace(second=0, microsecond=0) + \
        timedelta(minutes=1)
    past = {"since": "2020-01-01", "until": "2020-02-01"}  # no offset: UTC
    usage = httpx.get(ledger.url + SELF, params=past, headers=auth(ledger.bob.key)).json()
    assert usage["data"] == [] and usage["since"] == "2020-01-01T00:00:00+00:00"


def test_a_key_without_usage_gets_an_empty_list(ledger: Ledger) -> None:
    fresh = ledger.new_caller()
    response = httpx.get(ledger.url + SELF, headers=auth(fresh.key))
    assert response.status_code == 200 and response.json()["data"] == []
    assert response.json()["key_id"] == fresh.key_id


def test_missing_unknown_and_revoked_keys_are_401(ledger: Ledger) -> None:
    missing = error_of(httpx.get(ledger.url + SELF), 401)
    assert (missing["type"], missing["code"]) == ("authentication_error", "missing_api_key")
    attempted = "sk-sg-attempted-" + uuid.uuid4().hex
    for headers in (auth(attempted), {"x-api-key": attempted}):
        response = httpx.get(ledger.url + SELF, headers=headers)
        assert error_of(response, 401)["code"] == "invalid_api_key"
        assert attempted not in response.text
    with pytest.raises(openai.AuthenticationError):  # the SDK's view of the same refusal
        openai.OpenAI(base_url=ledger.url + "/v1", api_key=attempted, max_retries=0).get(
            "/usage/self", cast_to=object)
    revoked = ledger.new_caller()
    assert httpx.get(ledger.url + SELF, headers=auth(revoked.key)).status_code == 200
    response = httpx.post(ledger.url + f"/admin/keys/{revoked.key_id}/revoke",
                          headers=auth(ADMIN_TOKEN))
    assert response.status_code == 200, response.text
    deadline = time.monotonic() + 5  # the key cache hears of it through PostgreSQL NOTIFY
    while (response := httpx.get(ledger.url + SELF, headers=auth(revoked.key))).status_code \
            == 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert error_of(response, 401)["code"] == "key_revoked"
    assert revoked.key not in response.text


def test_only_get_is_allowed(ledger: Ledger) -> None:
    response = httpx.post(ledger.url + SELF, headers=auth(ledger.alice.key), json={})
    error = error_of(response, 405)
    assert error["type"] == "invalid_request_error" and response.headers["allow"] == "GET, HEAD"


@pytest.mark.parametrize(("query", "param"), [
    ({"since": "last tuesday"}, "since"),
    ({"until": "2025-13-01"}, "until"),
    ({"since": ""}, "since"),
    ({"grain": "hour"}, "grain"),
    ({"since": "2025-02-01", "until": "2025-01-01"}, "since"),
    # (the calendar's ends: an OverflowError, a 500 and a traceback any key holder could cause)
    ({"until": "9999-12-31T23:59:59Z"}, "until"),
    ({"until": "9999-12-31T00:00:01Z"}, "until"),
    ({"until": "0001-01-01T00:00:00Z"}, "until"),
    ({"since": "0001-01-01T00:00:00+00:01"}, "since"),
    ({"grian": "minute"}, "grian"),  # (a parameter it does not take: not ignored)
])
def test_bad_query_values_are_400(ledger: Ledger, query: dict[str, str], param: str) -> None:
    error = error_of(httpx.get(ledger.url + SELF, params=query,
                               headers=auth(ledger.alice.key)), 400)
    assert (error["type"], error["param"]) == ("invalid_request_error", param)


@pytest.mark.parametrize("group_by", ["project", "key"])
def test_a_nul_in_the_admin_usage_subject_is_400_not_an_outage(ledger: Ledger,
                                                                group_by: str) -> None:
    # PostgreSQL refuses NUL in text: that read as the store being down (503).
    error = error_of(httpx.get(ledger.url + "/admin/usage", headers=auth(ADMIN_TOKEN),
                               params={"subject": "a\0b", "group_by": group_by}), 400)
    assert (error["type"], error["param"]) == ("invalid_request_error", "subject")


def test_the_admin_usage_api_agrees_with_each_key(ledger: Ledger) -> None:
    response = httpx.get(ledger.url + "/admin/usage", params={"group_by": "key"},
                         headers=auth(ADMIN_TOKEN))
    by_key = {row["subject"]: row for row in response.json()["data"]}
    for caller in (ledger.alice, ledger.bob):
        own = httpx.get(ledger.url + SELF, headers=auth(caller.key)).json()["data"][0]
        assert by_key[caller.key_id] == {"subject": caller.key_id, **own}


# -- the usage API where it cannot answer ------------------------------------------------------

def test_without_a_usage_database_it_is_404(tmp_path: Path, mock_url: str,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SG_SOLO_KEY", "sk-sg-solo-" + uuid.uuid4().hex)
    layers = f"""
middleware = [
    Middleware(AuthMiddleware, keys=[StaticKey("solo", key_env="SG_SOLO_KEY")]),
    Middleware(MeteringMiddleware, journal_dir={str(tmp_path / "journal")!r}),
]
"""
    with serve(tmp_path, mock_url, layers) as server:
        response = httpx.get(server.url + SELF, headers=auth(os.environ["SG_SOLO_KEY"]))
        unknown = httpx.get(server.url + SELF, headers=auth("sk-sg-not-a-key-0123456789"))
    error = error_of(response, 404)
    assert error["code"] == "usage_unavailable" and "no PostgreSQL store" in error["message"]
    assert error_of(unknown, 401)["code"] == "invalid_api_key"  # the key is checked first


def test_a_failing_usage_database_is_503(tmp_path: Path, mock_url: str,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SG_SOLO_KEY", "sk-sg-solo-" + uuid.uuid4().hex)
    dead = f"host=127.0.0.1 port={free_port()} user=root dbname=test"
    layers = f"""
middleware = [
    Middleware(AuthMiddleware, keys=[StaticKey("solo", key_env="SG_SOLO_KEY")]),
    Middleware(MeteringMiddleware, store=PostgresUsageStore({dead!r}, timeout_s=2),
               journal_dir={str(tmp_path / "journal")!r}),
]
"""
    with serve(tmp_path, mock_url, layers) as server:
        response = httpx.get(server.url + SELF, headers=auth(os.environ["SG_SOLO_KEY"]))
    error = error_of(response, 503)
    assert (error["type"], error["code"]) == ("service_unavailable", "usage_store_unavailable")


def test_usage_is_never_served_without_the_auth_layer_above(
        tmp_path: Path, mock_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Auth below metering (or absent): no key was verified when metering sees the request."""
    key = "sk-sg-solo-" + uuid.uuid4().hex
    monkeypatch.setenv("SG_SOLO_KEY", key)
    layers = f"""
middleware = [
    Middleware(MeteringMiddleware, store=PostgresUsageStore({PG_DSN!r}, timeout_s=2),
               journal_dir={str(tmp_path / "journal")!r}),
    Middleware(AuthMiddleware, keys=[StaticKey("solo", key_env="SG_SOLO_KEY")]),
]
"""
    with serve(tmp_path, mock_url, layers) as server:
        response = httpx.get(server.url + SELF, headers=auth(key))
    error = error_of(response, 401)
    assert error["type"] == "authentication_error" and "AuthMiddleware" in error["message"]


def test_without_a_metering_layer_the_path_is_404(tmp_path: Path, mock_url: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    key = "sk-sg-solo-" + uuid.uuid4().hex
    monkeypatch.setenv("SG_SOLO_KEY", key)
    layers = 'middleware = [Middleware(AuthMiddleware, keys=[StaticKey("solo", ' \
             'key_env="SG_SOLO_KEY")])]\n'
    with serve(tmp_path, mock_url, layers) as server:
        assert error_of(httpx.get(server.url + SELF, headers=auth(key)), 404)["code"] == \
            "unknown_url"
        assert httpx.get(server.url + SELF).status_code == 401  # still never unauthenticated


# -- sluicegate usage: a gateway's admin API ---------------------------------------------------

def test_the_cli_prints_usage_per_key_and_per_project(ledger: Ledger) -> None:
    result = sluicegate("--url", ledger.url, "--admin-token-env", ADMIN_ENV, "--group-by", "key")
    assert result.returncode == 0, result.stderr
    title, rows = table(result.stdout)
    assert title.startswith("Usage by key from ") and title.endswith("(day rollups):")
    assert row_of(ledger.alice, ledger.alice.key_id) in rows
    assert row_of(ledger.bob, ledger.bob.key_id) in rows
    result = sluicegate("--url", ledger.url, "--token-env", ADMIN_ENV, "--since",
                        (datetime.now(UTC) - timedelta(hours=1)).isoformat(), "--grain", "minute")
    _, rows = table(result.stdout)
    assert sorted(rows) == sorted([row_of(ledger.alice, ledger.alice.project),
                                   row_of(ledger.bob, ledger.bob.project)])


def test_the_cli_prints_the_apis_json(ledger: Ledger) -> None:
    result = sluicegate("--url", ledger.url, "--admin-token-env", ADMIN_ENV, "--group-by",
                        "project", "--since", "2020-01-01", "--json")
    assert result.returncode == 0, result.stderr
    printed = orjson.loads(result.stdout)
    assert (printed["object"], printed["group_by"], printed["since"]) == \
        ("usage", "project", "2020-01-01T00:00:00+00:00")
    by_project = {row["subject"]: row for row in printed["data"]}
    for caller in (ledger.alice, ledger.bob):
        assert by_project[caller.project]["requests"] == caller.requests
        assert Decimal(by_project[caller.project]["cost_usd"]) == caller.cost


def test_the_cli_reports_the_apis_refusals(ledger: Ledger) -> None:
    wrong = sluicegate("--url", ledger.url, "--token-env", "SG_NOT_SET_" + uuid.uuid4().hex[:6])
    assert wrong.returncode == 2 and "is empty or not set" in wrong.stderr
    result = sluicegate("--url", ledger.url, "--admin-token-env", ADMIN_ENV, "--since",
                        "2025-02-01", "--until", "2025-01-01")
    assert result.returncode == 1
    assert result.stderr == "sluicegate: HTTP 400: since must be before until\n"


def test_the_cli_prints_a_keys_own_usage_with_the_key_from_the_environment(
        ledger: Ledger) -> None:
    """`usage --self` asks /v1/usage/self with the virtual key in the variable --key-env
    names (the README said `sluicegate usage` printed it; the CLI could not, and refused a
    virtual key as the admin token)."""
    alice = ledger.alice
    key_env = {"SG_MY_KEY": alice.key}
    result = sluicegate("--url", ledger.url, "--self", "--key-env", "SG_MY_KEY", env=key_env)
    assert result.returncode == 0, result.stderr
    title, rows = table(result.stdout)
    assert title.startswith("Usage by key from ") and title.endswith("(day rollups):")
    assert rows == [row_of(alice, alice.key_id)]
    result = sluicegate("--url", ledger.url, "--self", "--key-env", "SG_MY_KEY", "--json",
                        "--grain", "minute", env=key_env)
    printed = orjson.loads(result.stdout)
    assert (printed["object"], printed["key_id"], printed["grain"]) == \
        ("usage", alice.key_id, "minute")
    assert [row["requests"] for row in printed["data"]] == [alice.requests]
    # Never from argv (nor echoed), and never with the admin token in its place.
    typed = sluicegate("--url", ledger.url, "--self", alice.key)
    assert typed.returncode == 2 and "unrecognized arguments (not shown" in typed.stderr
    unset = sluicegate("--url", ledger.url, "--self", env={"SLUICEGATE_API_KEY": ""})
    assert unset.returncode == 2
    assert unset.stderr == ("sluicegate: The virtual key is read from $SLUICEGATE_API_KEY, "
                            "which is empty or not set; export it or name another variable "
                            "with --key-env.\n")
    as_admin = sluicegate("--url", ledger.url, "--self", "--key-env", ADMIN_ENV)
    assert as_admin.returncode == 1 and as_admin.stderr.startswith("sluicegate: HTTP 401: ")
    for result in (typed, unset, as_admin):
        assert alice.key not in result.stdout + result.stderr


def test_the_cli_window_is_the_days_it_sums(tmp_path: Path, mock_url: str,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """--since defaults to 30 days before --until (it was 30 days before now, so an --until
    older than that was refused, "since must be before until"), and the report is of the
    whole days summed, from the start of the first: a record 29 days 18 hours before --until
    was missing from its day-grain report, whose header said it was in."""
    name = "sg_usage_window_" + uuid.uuid4().hex[:10]
    until = datetime.now(UTC).replace(hour=12, minute=0, second=0, microsecond=0) - \
        timedelta(days=5)
    first_day = (until - timedelta(days=30)).replace(hour=0)
    started = (until - timedelta(days=30, hours=-6)).timestamp()  # 18:00 on the first day
    record = UsageRecord(request_id=uuid.uuid4().hex, started_at=started, ended_at=started + 1,
                         key_id="key_window", project="p-window", model="gpt-mock",
                         input_tokens=10, output_tokens=10, cost_micros=1_234_567, status=200)
    store = PostgresUsageStore(PG_DSN, prefix=name)

    async def write() -> int:
        await store.startup()
        try:
            return await store.write([record])
        finally:
            await store.shutdown()
    monkeypatch.setenv(ADMIN_ENV, ADMIN_TOKEN)
    layers = (f"middleware = [Middleware(MeteringMiddleware, store=PostgresUsageStore("
              f"{PG_DSN!r}, prefix={name!r}), journal_dir={str(tmp_path / 'journal')!r}, "
              f"admin_token_env={ADMIN_ENV!r})]\n")
    try:
        assert asyncio.run(write()) == 1
        with serve(tmp_path, mock_url, layers) as server:
            result = sluicegate("--url", server.url, "--token-env", ADMIN_ENV, "--until",
                                until.isoformat())
            assert result.returncode == 0, result.stderr
            title, rows = table(result.stdout)
            assert title == (f"Usage by project from {first_day.isoformat()} to "
                             f"{(until + timedelta(hours=12)).isoformat()} (day rollups):")
            assert rows == [["p-window", "1", "10", "10", "1.234567", "0.000000"]]
            older = (until - timedelta(days=40)).replace(hour=0)
            result = sluicegate("--url", server.url, "--token-env", ADMIN_ENV, "--until",
                                older.date().isoformat(), "--json")
            assert result.returncode == 0, result.stderr
            printed = orjson.loads(result.stdout)
            assert (printed["since"], printed["until"], printed["data"]) == \
                ((older - timedelta(days=30)).isoformat(), older.isoformat(), [])
    finally:
        drop_tables(name)


# -- sluicegate usage --journal: the ledger of a gateway without PostgreSQL --------------------

def test_the_cli_reads_the_journals_of_a_running_gateway(
        tmp_path: Path, mock_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    journal = tmp_path / "journal"
    callers = {name: Caller(f"key_{name}", f"sk-sg-{name}-" + uuid.uuid4().hex, f"proj-{name}")
               for name in ("alpha", "beta")}
    for name, caller in callers.items():
        monkeypatch.setenv(f"SG_{name.upper()}_KEY", caller.key)
    monkeypatch.setenv(ADMIN_ENV, ADMIN_TOKEN)
    layers = f"""
middleware = [
    Middleware(AuthMiddleware, keys=[
        StaticKey("proj-alpha", key_env="SG_ALPHA_KEY", id="key_alpha"),
        StaticKey("proj-beta", key_env="SG_BETA_KEY", id="key_beta")]),
    Middleware(MeteringMiddleware, journal_dir={str(journal)!r}, flush_interval_s=0.05,
               admin_token_env={ADMIN_ENV!r}),
]
"""
    alpha, beta = callers["alpha"], callers["beta"]
    with serve(tmp_path, mock_url, layers) as server:
        alpha.ask(server.url, 3)
        beta.ask(server.url, 2, stream_one=True)
        deadline = time.monotonic() + 10
        while sum(row["requests"] for row in journal_usage(journal)) < 5 \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        before = {path: path.read_bytes() for path in sorted(journal.rglob("*"))
                  if path.is_file()}

        printed = sluicegate("--journal", str(journal))
        as_json = sluicegate("--journal", str(journal), "--group-by", "key", "--json")
        admin = sluicegate("--url", server.url, "--admin-token-env", ADMIN_ENV)

        after = {path: path.read_bytes() for path in sorted(journal.rglob("*")) if path.is_file()}
        assert after == before  # the reader wrote, cut and deleted nothing
        with pytest.raises(JournalError, match="in use"):  # and the gateway still holds its slot
            Journal(journal / "slot-000").open()

    assert printed.returncode == 0, printed.stderr
    title, rows = table(printed.stdout)
    assert title.startswith(f"Usage by project in the journals under {journal} ")
    assert sorted(rows) == sorted([row_of(alpha, alpha.project), row_of(beta, beta.project)])
    assert as_json.returncode == 0, as_json.stderr
    data = {row["subject"]: row for row in orjson.loads(as_json.stdout)["data"]}
    assert set(data) == {"key_alpha", "key_beta"}
    assert (data["key_beta"]["requests"], data["key_beta"]["output_tokens"]) == \
        (beta.requests, beta.output_tokens)
    assert Decimal(data["key_alpha"]["cost_usd"]) == alpha.cost
    assert admin.returncode == 1 and "sluicegate usage --journal DIR" in admin.stderr


def test_journal_usage_groups_filters_and_skips_a_torn_tail(tmp_path: Path) -> None:
    start = datetime(2025, 3, 1, tzinfo=UTC).timestamp()
    records = [UsageRecord(request_id=f"r{i}", started_at=start + i * 3600, ended_at=start,
                           key_id=f"k{i % 2}", project="acme" if i % 3 else None,
                           customer="c1" if i % 2 else None, model="m", input_tokens=10,
                           output_tokens=i, cost_micros=1_500_000 * i, saved_micros=i,
                           status=500 if i == 4 else 200) for i in range(6)]
    writer = Journal(tmp_path / "slot-000")
    writer.open()
    end = writer.append([record.encode() for record in records])
    writer.close()
    os.truncate(tmp_path / "slot-000" / f"{end.segment:08d}.sgj", end.offset - 3)  # torn tail

    by_project = journal_usage(tmp_path)
    assert [(row["subject"], row["requests"], row["errors"], row["output_tokens"],
             row["cost_usd"]) for row in by_project] == [
        ("acme", 3, 1, 1 + 2 + 4, "10.500000"),  # records 0-4: 5 is torn; 0 and 3 no project
        ("-", 2, 0, 0 + 3, "4.500000")]
    by_customer = journal_usage(tmp_path, group_by="customer",
                                since=datetime.fromtimestamp(start + 3600, UTC),
                                until=datetime.fromtimestamp(start + 4 * 3600, UTC))
    assert [(row["subject"], row["requests"]) for row in by_customer] == [
        ("-", 2), ("acme/c1", 1)]  # records 1-3; only 1 has both a project and a customer
    assert (tmp_path / "slot-000" / f"{end.segment:08d}.sgj").stat().st_size == end.offset - 3
    with pytest.raises(JournalError, match="no usage journal"):
        journal_usage(tmp_path / "nowhere")


def test_a_record_journaled_twice_counts_once(tmp_path: Path) -> None:
    # A batch whose append failed part way is queued again and journaled again; the journal
    # as the ledger counts each (request id, start) once, as PostgreSQL does.
    record = UsageRecord(request_id="twice", started_at=1_700_000_000.0, ended_at=1.7e9,
                         project="acme", model="m", input_tokens=10, cost_micros=7)
    other = UsageRecord(request_id="twice", started_at=1_700_000_001.0, ended_at=1.7e9,
                        project="acme", model="m", input_tokens=10, cost_micros=7)
    writer = Journal(tmp_path / "slot-000")
    writer.open()
    writer.append([record.encode(), other.encode()])
    writer.append([record.encode()])
    writer.close()
    [row] = journal_usage(tmp_path)
    assert (row["requests"], row["input_tokens"], row["cost_usd"]) == (2, 20, "0.000014")
