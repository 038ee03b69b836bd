"""`sluicegate keys` and `sluicegate budgets` against a real `sluicegate serve` process: keys in
PostgreSQL (a fresh schema per run), the admin APIs of the auth and quota layers, and the
official openai SDK using the keys the CLI printed."""
from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import openai
import orjson
import psycopg
import pytest
from psycopg import sql

from gateway.cli import NEW_KEY_NOTE
from middleware.auth.keys import hash_key
from tests.harness import (
    REPO,
    TEST_KEY,
    free_port,
    mock_config,
    start_cli_gateway,
    stop_process,
    write_config,
)

DSN = os.environ.get("SLUICEGATE_TEST_PG_DSN", "postgresql://root@127.0.0.1:5432/test")
ADMIN_TOKEN = "sg-admin-" + secrets.token_urlsafe(24)
WRONG_TOKEN = "sg-admin-" + secrets.token_urlsafe(24)


@dataclass(frozen=True, slots=True)
class Gateway:
    url: str
    log_path: Path
    schema: str = ""  # its key store's PostgreSQL schema


def serve(directory: Path, mock_url: str, *, middleware: str = "none",
          extra: str = "") -> tuple[subprocess.Popen[bytes], Gateway]:
    config = write_config(directory, mock_config(mock_url, middleware=middleware, extra=extra))
    log_path = directory / "gateway.log"
    process, url = start_cli_gateway(config, env={"SG_ADMIN_TOKEN": ADMIN_TOKEN},
                                     log_path=log_path)
    return process, Gateway(url, log_path)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, mock_url: str) -> Iterator[Gateway]:
    """Keys in PostgreSQL; the auth layer serves /admin/keys and /admin/limits, the quota
    layer /admin/usage, both behind the same admin token."""
    schema = "sg_cli_test_" + uuid.uuid4().hex[:12]
    extra = f"""
from middleware.auth import PostgresKeyStore
middleware = [
    Middleware(AuthMiddleware, keys=[StaticKey("tests", key_env="SG_TEST_KEY")],
               store=PostgresKeyStore({DSN!r}, schema={schema!r}, channel={schema!r}),
               limits={{("project", "configured"): Limits(rpm=7)}},
               admin_token_env="SG_ADMIN_TOKEN"),
    Middleware(QuotaMiddleware, admin_token_env="SG_ADMIN_TOKEN"),
]
"""
    process, server = serve(tmp_path_factory.mktemp("cli_admin"), mock_url, extra=extra)
    try:
        yield Gateway(server.url, server.log_path, schema)
    finally:
        stop_process(process)
        with psycopg.connect(DSN, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(
                sql.Identifier(schema)))


def sluicegate(server: Gateway, *args: str, token: str | None = ADMIN_TOKEN,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The CLI as a user runs it: URL and admin token from the environment."""
    environ = {k: v for k, v in os.environ.items()
               if k not in ("SLUICEGATE_URL", "SLUICEGATE_ADMIN_TOKEN")}
    environ["SLUICEGATE_URL"] = server.url
    if token is not None:
        environ["SLUICEGATE_ADMIN_TOKEN"] = token
    result = subprocess.run([sys.executable, "-m", "gateway.cli", *args], check=False,
                            cwd=REPO, env={**environ, **(env or {})}, capture_output=True,
                            text=True, timeout=30)
    output = result.stdout + result.stderr
    assert ADMIN_TOKEN not in output and WRONG_TOKEN not in output
    return result


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def created(result: subprocess.CompletedProcess[str]) -> tuple[str, str]:
    """(id, plaintext) from the output of `keys create` or `keys rotate`."""
    match = re.fullmatch(r"id:  (key_\w+)\nkey: (sk-sg-[\w-]+)\n", ok(result))
    assert match, result.stdout
    key_id, plaintext = match.groups()
    assert (result.stdout + result.stderr).count(plaintext) == 1
    assert NEW_KEY_NOTE in result.stderr
    return key_id, plaintext


def ask(server: Gateway, key: str) -> str:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
    reply = client.chat.completions.create(model="gpt-mock",
                                           messages=[{"role": "user", "content": "hello"}])
    return str(reply.choices[0].message.content)


def refused_within(server: Gateway, key: str, timeout_s: float = 2.0) -> bool:
    """Whether calls with `key` get 401 within `timeout_s` (the key cache learns of a change
    through PostgreSQL NOTIFY)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            ask(server, key)
        except openai.AuthenticationError:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def admin_get(server: Gateway, path: str) -> Any:
    response = httpx.get(server.url + path,
                         headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
    assert response.status_code == 200, response.text
    return response.json()


def project() -> str:
    return "p-" + uuid.uuid4().hex[:8]


# -- keys --------------------------------------------------------------------------------------

def test_create_prints_a_working_key_once(gateway: Gateway) -> None:
    name = project()
    result = sluicegate(gateway, "keys", "create", "--project", name, "--model", "gpt-*",
                        "--meta", "team=search", "--rpm", "100", "--budget-usd", "12.50",
                        "--period", "daily", "--expires", "2099-01-01T00:00:00Z")
    key_id, plaintext = created(result)
    assert ask(gateway, plaintext) == "Mock reply to: hello"
    stored = admin_get(gateway, f"/admin/keys/{key_id}")
    assert (stored["project"], stored["allowed_models"], stored["metadata"]) == \
        (name, ["gpt-*"], {"team": "search"})
    assert stored["expires_at"] == "2099-01-01T00:00:00+00:00"
    assert stored["limits"]["rpm"] == 100
    assert [(b["limit_usd"], b["period"]) for b in stored["limits"]["budgets"]] == \
        [("12.50", "daily")]


def test_create_refuses_an_expiry_in_the_past(gateway: Gateway) -> None:
    name = project()
    result = sluicegate(gateway, "keys", "create", "--project", name,
                        "--expires", "2020-01-01T00:00:00Z")
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == ("sluicegate: HTTP 400: Invalid expires_at: a new key must expire "
                             "in the future.\n")
    assert admin_get(gateway, f"/admin/keys?project={name}")["data"] == []


def test_create_with_json_output(gateway: Gateway) -> None:
    result = sluicegate(gateway, "keys", "create", "--project", project(), "--json")
    payload = orjson.loads(ok(result))
    assert payload["id"].startswith("key_") and payload["key"].startswith("sk-sg-")
    assert (result.stdout + result.stderr).count(payload["key"]) == 1
    assert ask(gateway, payload["key"]) == "Mock reply to: hello"


def test_list_shows_keys_without_plaintext_or_hash(gateway: Gateway) -> None:
    name = project()
    key_id, plaintext = created(sluicegate(gateway, "keys", "create", "--project", name,
                                           "--model", "gpt-mock"))
    table = ok(sluicegate(gateway, "keys", "list", "--project", name))
    assert [re.split(r"\s{2,}", line) for line in table.splitlines()] == [
        ["ID", "HINT", "PROJECT", "STATUS", "MODELS", "EXPIRES"],
        [key_id, f"sk-sg-…{plaintext[-4:]}", name, "active", "gpt-mock", "never"],
    ]
    as_json = ok(sluicegate(gateway, "keys", "list", "--project", name, "--json"))
    assert [key["id"] for key in orjson.loads(as_json)["data"]] == [key_id]
    everything = ok(sluicegate(gateway, "keys", "list")) + as_json
    assert key_id in everything
    assert plaintext not in everything and hash_key(plaintext) not in everything


def test_revoke_makes_the_key_fail(gateway: Gateway) -> None:
    name = project()
    key_id, plaintext = created(sluicegate(gateway, "keys", "create", "--project", name))
    assert ask(gateway, plaintext) == "Mock reply to: hello"
    assert ok(sluicegate(gateway, "keys", "revoke", key_id)) == \
        f"Revoked key {key_id} of project {name}.\n"
    assert refused_within(gateway, plaintext)
    assert admin_get(gateway, f"/admin/keys/{key_id}")["status"] == "revoked"


def test_rotate_gives_a_new_key_and_the_old_one_fails(gateway: Gateway) -> None:
    old_id, old = created(sluicegate(gateway, "keys", "create", "--project", project()))
    assert ask(gateway, old) == "Mock reply to: hello"
    result = sluicegate(gateway, "keys", "rotate", old_id)
    new_id, new = created(result)
    assert new_id != old_id and new != old
    assert f"The old key {old_id} is revoked." in result.stderr
    assert ask(gateway, new) == "Mock reply to: hello"
    assert refused_within(gateway, old)


def test_an_unknown_key_is_an_api_error(gateway: Gateway) -> None:
    result = sluicegate(gateway, "keys", "revoke", "key_does_not_exist")
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == "sluicegate: HTTP 404: No key with id 'key_does_not_exist'.\n"


# -- budgets -----------------------------------------------------------------------------------

def test_budgets_set_then_show_on_a_project(gateway: Gateway) -> None:
    name = project()
    ok(sluicegate(gateway, "budgets", "set", "--project", name, "--usd", "25",
                  "--period", "monthly", "--rpm", "100"))
    ok(sluicegate(gateway, "budgets", "set", "--project", name, "--tpm", "5000"))  # merges
    stored = admin_get(gateway, f"/admin/limits/project/{name}")["limits"]
    assert (stored["rpm"], stored["tpm"], stored["max_concurrent"]) == (100, 5000, None)
    assert [(b["limit_usd"], b["period"], b["on_overflow"]) for b in stored["budgets"]] == \
        [("25", "monthly", "block")]
    shown = ok(sluicegate(gateway, "budgets", "show", "--project", name))
    assert shown.splitlines()[:6] == [
        f"Limits of project {name}:", "  rpm: 100", "  tpm: 5000", "  max concurrent: no limit",
        "  on overflow: block", "  budget: $25 monthly, block on overflow"]
    assert "  monthly: $0 of $25 (0.0%) since " in shown

    _key_id, plaintext = created(sluicegate(gateway, "keys", "create", "--project", name))
    ask(gateway, plaintext)
    spent = Decimal(0)
    deadline = time.monotonic() + 2
    while spent == 0 and time.monotonic() < deadline:  # settled after the response went out
        usage = orjson.loads(ok(sluicegate(gateway, "budgets", "show", "--project", name,
                                           "--json")))["usage"]
        spent = Decimal(usage["periods"]["monthly"]["committed_usd"] or 0)
    assert spent > 0
    shown = ok(sluicegate(gateway, "budgets", "show", "--project", name))
    assert f"  monthly: ${spent} of $25 (0.0%) since " in shown


def test_budgets_on_a_key_and_on_a_customer(gateway: Gateway) -> None:
    name = project()
    key_id, _ = created(sluicegate(gateway, "keys", "create", "--project", name))
    ok(sluicegate(gateway, "budgets", "set", "--key", key_id, "--max-concurrent", "3",
                  "--usd", "5", "--on-overflow", "downgrade", "--downgrade-to", "gpt-mock",
                  "--stream-cutoff"))
    limits = admin_get(gateway, f"/admin/keys/{key_id}")["limits"]
    assert (limits["max_concurrent"], limits["on_overflow"], limits["downgrade_to"]) == \
        (3, "downgrade", "gpt-mock")
    assert [(b["limit_usd"], b["on_overflow"], b["stream_cutoff"]) for b in limits["budgets"]] \
        == [("5", "downgrade", True)]
    ok(sluicegate(gateway, "budgets", "set", "--key", key_id, "--clear"))
    assert admin_get(gateway, f"/admin/keys/{key_id}")["limits"]["budgets"] == []

    customer = f"{name}/alice"
    ok(sluicegate(gateway, "budgets", "set", "--customer", customer, "--rpm", "7"))
    assert admin_get(gateway, f"/admin/limits/customer/{customer}")["limits"]["rpm"] == 7
    assert "  rpm: 7\n" in ok(sluicegate(gateway, "budgets", "show", "--customer", customer))


def test_budgets_on_every_customer_the_auth_layer_accepts(gateway: Gateway) -> None:
    """Customers as requests name them: spaces, up to 256 characters, '/' anywhere."""
    name = project()
    for customer in ("Jane Doe", "u" * 200, "a//b/", "/lead", "100% sure?"):
        subject = f"{name}/{customer}"
        ok(sluicegate(gateway, "budgets", "set", "--customer", subject, "--rpm", "7"))
        stored = admin_get(gateway, f"/admin/limits/customer/{name}/{quote(customer, safe='')}")
        assert (stored["subject_id"], stored["limits"]["rpm"]) == (subject, 7)
        shown = ok(sluicegate(gateway, "budgets", "show", "--customer", subject))
        assert shown.startswith(f"Limits of customer {subject}:\n  rpm: 7\n"), shown


def test_a_downgrade_to_a_model_the_gateway_does_not_have_is_refused(gateway: Gateway) -> None:
    """A typo in the target would leave the overflow a refusal, silently: the admin API
    refuses it (400, naming the field) as the config check does, and the CLI exits 1."""
    name = project()
    admin = httpx.Client(base_url=gateway.url, timeout=10,
                         headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
    typo = {"rpm": 1, "on_overflow": "downgrade", "downgrade_to": "azure-mokc"}
    response = admin.put(f"/admin/limits/project/{name}", json=typo)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("invalid_parameter", "downgrade_to")
    assert "'azure-mokc'" in error["message"]
    budget = {"limit_usd": "1", "on_overflow": "downgrade", "downgrade_to": "azure-mokc"}
    response = admin.post("/admin/keys", json={"project": name,
                                               "limits": {"budgets": [budget]}})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "limits.budgets[0].downgrade_to"
    assert admin.get(f"/admin/limits/project/{name}").status_code == 404
    assert admin.get("/admin/keys", params={"project": name}).json()["data"] == []

    result = sluicegate(gateway, "budgets", "set", "--project", name, "--rpm", "1",
                        "--on-overflow", "downgrade", "--downgrade-to", "azure-mokc")
    assert result.returncode == 1, result.stdout
    assert result.stderr.startswith("sluicegate: HTTP 400: Invalid downgrade_to: 'azure-mokc' "
                                    "is not a model of this gateway"), result.stderr
    assert admin.get(f"/admin/limits/project/{name}").status_code == 404

    ok(sluicegate(gateway, "budgets", "set", "--project", name, "--rpm", "1",
                  "--on-overflow", "downgrade", "--downgrade-to", "azure-mock"))
    assert admin_get(gateway, f"/admin/limits/project/{name}")["limits"]["downgrade_to"] == \
        "azure-mock"
    admin.close()


def test_limits_set_while_a_key_is_in_use_apply_to_its_next_requests(gateway: Gateway) -> None:
    """The auth layer reuses a caller's Principal and the quota layer its compiled limits;
    limits set with the CLI still reach the key's next requests (through NOTIFY)."""
    name = project()
    _key_id, plaintext = created(sluicegate(gateway, "keys", "create", "--project", name))
    for _ in range(3):  # no limits yet: nothing refuses
        ask(gateway, plaintext)
    ok(sluicegate(gateway, "budgets", "set", "--project", name, "--rpm", "1"))
    deadline = time.monotonic() + 5
    while True:  # one request fits the new bucket; the next is refused
        try:
            ask(gateway, plaintext)
        except openai.RateLimitError:
            break
        assert time.monotonic() < deadline, "the project's new rpm limit never applied"
        time.sleep(0.05)


def test_show_without_the_usage_route_prints_the_limits(tmp_path: Path, mock_url: str) -> None:
    layers = ("[Middleware(AuthMiddleware, keys=[StaticKey('tests', key_env='SG_TEST_KEY')], "
              "limits={('project', 'tests'): Limits(rpm=7)}, admin_token_env='SG_ADMIN_TOKEN')]")
    process, server = serve(tmp_path, mock_url, middleware=layers)
    try:
        result = sluicegate(server, "budgets", "show", "--project", "tests")
        assert ok(result).splitlines()[:2] == ["Limits of project tests:", "  rpm: 7"]
        assert result.stdout.endswith("Current spend: not available; this gateway does not "
                                      "serve /admin/usage (its QuotaMiddleware has no "
                                      "admin_token_env).\n")
        refused = sluicegate(server, "budgets", "set", "--project", "tests", "--rpm", "1")
        assert (refused.returncode, refused.stdout) == (1, "")
        assert refused.stderr.startswith("sluicegate: HTTP 409: This key store is read-only")
        assert refused.stderr.count("\n") == 1
    finally:
        stop_process(process)


# -- usage errors and the admin token ----------------------------------------------------------

def test_limits_the_gateway_cannot_read_are_neither_shown_as_none_nor_merged_into(
        gateway: Gateway) -> None:
    name = project()
    ok(sluicegate(gateway, "budgets", "set", "--project", name, "--usd", "25",
                  "--period", "monthly"))
    unreadable = {"budgets": [{"limit_usd": "10", "period": "monthly", "on_overflow": "block",
                               "stream_cutoff": "no", "status": 402}]}
    with psycopg.connect(DSN, autocommit=True) as conn:  # as an older version might have
        conn.execute(sql.SQL("UPDATE {} SET limits = %s::jsonb WHERE subject_id = %s").format(
            sql.Identifier(gateway.schema, "sluicegate_subject_limits")),
            (orjson.dumps(unreadable).decode(), name))
    for action in (["show"], ["set", "--rpm", "5"]):
        refused = sluicegate(gateway, "budgets", *action, "--project", name)
        assert refused.returncode == 2, refused.stdout
        assert f"The limits stored for project {name} cannot be read" in refused.stderr
    ok(sluicegate(gateway, "budgets", "set", "--project", name, "--rpm", "5", "--clear"))
    assert "  rpm: 5" in ok(sluicegate(gateway, "budgets", "show", "--project", name))


def test_a_missing_token_variable_exits_2_with_one_sentence(gateway: Gateway) -> None:
    result = sluicegate(gateway, "keys", "list", token=None)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == ("sluicegate: The admin token is read from "
                             "$SLUICEGATE_ADMIN_TOKEN, which is empty or not set; export it "
                             "or name another variable with --token-env.\n")
    other = sluicegate(gateway, "budgets", "show", "--project", "x", "--token-env", "SG_NONE")
    assert other.returncode == 2 and "$SG_NONE, which is empty or not set" in other.stderr
    named = sluicegate(gateway, "keys", "list", "--token-env", "SG_MINE", token=None,
                       env={"SG_MINE": ADMIN_TOKEN})
    assert named.returncode == 0, named.stderr


def test_a_url_with_a_password_is_refused_and_no_url_printed_holds_one(gateway: Gateway
                                                                      ) -> None:
    """user:password@ (a proxy's basic auth) cannot go with the admin token: a usage error
    that does not print it (urllib took it for the host name, and the error printed it)."""
    host = gateway.url.removeprefix("http://")
    for url in (f"http://ops:Pr0xyS3cret@{host}", f"http://Pr0xyS3cret@{host}/"):
        for place in (["--url", url], []):
            result = sluicegate(gateway, "keys", "list", *place, env={"SLUICEGATE_URL": url})
            assert (result.returncode, result.stdout) == (2, "")
            assert result.stderr == ("sluicegate: The gateway URL must not hold a user name or "
                                     "password (user:password@): the admin API takes the admin "
                                     "token alone.\n")
    # Where the URL is printed, it is without its query string.
    down = f"http://127.0.0.1:{free_port()}/gw?sig=Pr0xyS3cret"
    result = sluicegate(gateway, "keys", "list", "--url", down)
    assert result.returncode == 1
    assert result.stderr.startswith(f"sluicegate: Cannot reach the gateway at "
                                    f"{down.partition('?')[0]}: "), result.stderr
    assert "Pr0xyS3cret" not in result.stderr


def test_a_wrong_token_exits_1(gateway: Gateway) -> None:
    result = sluicegate(gateway, "keys", "list", token=WRONG_TOKEN)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == "sluicegate: HTTP 401: Invalid admin token.\n"


def test_a_virtual_key_as_the_admin_token_is_refused_before_it_is_sent(gateway: Gateway) -> None:
    virtual_key = "sk-sg-" + secrets.token_urlsafe(32)
    for args, shown in (([], "$SLUICEGATE_ADMIN_TOKEN holds"),
                        (["--token-env", "sg_lower"], "The variable named by --token-env holds")):
        result = sluicegate(gateway, "keys", "list", *args, token=virtual_key,
                            env={"sg_lower": virtual_key})
        assert (result.returncode, result.stdout) == (2, "")
        assert result.stderr.startswith(f"sluicegate: {shown} a virtual key")
        assert virtual_key[6:] not in result.stderr


def test_a_token_on_the_command_line_is_refused_without_echo(gateway: Gateway) -> None:
    for args in (["--token", ADMIN_TOKEN], [f"--token={ADMIN_TOKEN}"],
                 ["--token-env", ADMIN_TOKEN], ["--admin-token", ADMIN_TOKEN],
                 ["--admin-tokn", ADMIN_TOKEN]):
        result = sluicegate(gateway, "keys", "list", *args, token=None)
        assert result.returncode == 2 and result.stdout == ""  # sluicegate() checks the echo
    # (a mistyped option's value, or one put before the command, was echoed in the error)
    misplaced = sluicegate(gateway, "--token", ADMIN_TOKEN, "keys", "list", token=None)
    assert misplaced.returncode == 2


def test_the_admin_token_never_reaches_the_log(gateway: Gateway) -> None:
    _key_id, plaintext = created(sluicegate(gateway, "keys", "create", "--project", project()))
    sluicegate(gateway, "keys", "list", token=WRONG_TOKEN)
    log = gateway.log_path.read_text()
    assert "Running on" in log
    assert ADMIN_TOKEN not in log and WRONG_TOKEN not in log and plaintext not in log


def test_a_rotated_key_keeps_its_budget_and_spend(gateway: Gateway) -> None:
    # Its limits and spend are kept under its account, the first key's id: a rotation
    # granted a key's budget afresh (a lifetime one too), and its spend started from $0.
    old_id, old = created(sluicegate(gateway, "keys", "create", "--project", project()))
    ok(sluicegate(gateway, "budgets", "set", "--key", old_id, "--usd", "5",
                  "--period", "lifetime"))
    ask(gateway, old)

    def spent(key_id: str) -> Decimal:
        usage = orjson.loads(ok(sluicegate(gateway, "budgets", "show", "--key", key_id,
                                           "--json")))["usage"]
        return Decimal(usage["periods"]["lifetime"]["committed_usd"] or 0)
    deadline = time.monotonic() + 2
    while spent(old_id) == 0 and time.monotonic() < deadline:  # (settled after the answer)
        time.sleep(0.05)
    before = spent(old_id)
    assert before > 0
    new_id, new = created(sluicegate(gateway, "keys", "rotate", old_id))
    assert admin_get(gateway, f"/admin/keys/{new_id}")["account"] == old_id
    assert spent(new_id) == before  # carried on, not $0
    ask(gateway, new)
    deadline = time.monotonic() + 2
    while spent(new_id) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert spent(new_id) == 2 * before  # (the same request again)
    # Rotated again: still the first key's account.
    newer_id, _ = created(sluicegate(gateway, "keys", "rotate", new_id))
    assert admin_get(gateway, f"/admin/keys/{newer_id}")["account"] == old_id
    assert spent(newer_id) == 2 * before


# -- the config module's keys and limits beside the store -----------------------------------------

def admin(server: Gateway, method: str, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.request(method, server.url + path, **kwargs,
                         headers={"authorization": f"Bearer {ADMIN_TOKEN}"})


def test_a_config_key_is_shown_and_its_changes_refused(gateway: Gateway) -> None:
    # A config key was a 404 to the admin API beside a store ("No key with id"), and a
    # revoke of a leaked one was told it did not exist, while the key kept working.
    listed = [k for k in admin_get(gateway, "/admin/keys?project=tests")["data"]
              if k.get("source") == "config"]
    assert [k["project"] for k in listed] == ["tests"]
    key_id = listed[0]["id"]
    assert admin_get(gateway, f"/admin/keys/{key_id}")["source"] == "config"
    for method, path, body in [("POST", f"/admin/keys/{key_id}/revoke", None),
                               ("POST", f"/admin/keys/{key_id}/rotate", None),
                               ("PATCH", f"/admin/keys/{key_id}", {"disabled": True}),
                               ("PUT", f"/admin/limits/key/{key_id}", {"rpm": 1})]:
        refused = admin(gateway, method, path, json=body)
        assert refused.status_code == 409, (path, refused.text)
        assert refused.json()["error"]["code"] == "read_only"
        assert "declared in the config module" in refused.json()["error"]["message"]
    assert ask(gateway, TEST_KEY) == "Mock reply to: hello"


def test_limits_the_config_sets_are_shown_and_not_stored_over(gateway: Gateway) -> None:
    # Stored limits for a subject the config sets were accepted (200, and shown by GET) but
    # never applied: the config's apply over stored ones.
    shown = admin_get(gateway, "/admin/limits/project/configured")
    assert (shown["source"], shown["limits"]["rpm"]) == ("config", 7)
    refused = admin(gateway, "PUT", "/admin/limits/project/configured", json={"rpm": 1})
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "read_only"
    assert "set in the config module" in refused.json()["error"]["message"]
    result = sluicegate(gateway, "budgets", "set", "--project", "configured", "--rpm", "1")
    assert result.returncode == 1 and "set in the config module" in result.stderr
    assert admin(gateway, "DELETE", "/admin/limits/project/configured").status_code == 409
    listed = admin_get(gateway, "/admin/limits?kind=project")["data"]
    assert [item["limits"]["rpm"] for item in listed
            if item["subject_id"] == "configured"] == [7]


@pytest.mark.parametrize("query,param,code", [
    ("project=", "project", "invalid_parameter"),  # (it listed every project's keys)
    ("projet=acme", "projet", "unknown_parameter"),  # (so did a misspelled filter)
])
def test_a_key_listing_filter_that_is_empty_or_unknown_is_refused(
        gateway: Gateway, query: str, param: str, code: str) -> None:
    refused = admin(gateway, "GET", f"/admin/keys?{query}")
    assert refused.status_code == 400
    assert (refused.json()["error"]["param"], refused.json()["error"]["code"]) == (param, code)
    assert admin(gateway, "GET", "/admin/limits?kind=").status_code == 400
    result = sluicegate(gateway, "keys", "list", "--project", "")
    assert result.returncode == 1 and result.stdout == ""


def test_a_key_for_an_invalid_project_is_refused_naming_the_project(gateway: Gateway) -> None:
    refused = admin(gateway, "POST", "/admin/keys", json={"project": "a b"})
    assert refused.status_code == 400
    assert (refused.json()["error"]["param"], refused.json()["error"]["code"]) == (
        "project", "invalid_parameter")


def test_config_limits_apply_to_stored_keys_without_config_keys(
        tmp_path: Path, mock_url: str) -> None:
    # `limits=` beside a store and no `keys=` was dropped: nothing held the project's rpm.
    schema = "sg_cli_test_" + uuid.uuid4().hex[:12]
    extra = f"""
from middleware.auth import PostgresKeyStore
middleware = [
    Middleware(AuthMiddleware, store=PostgresKeyStore({DSN!r}, schema={schema!r},
                                                      channel={schema!r}),
               limits={{("project", "limited"): Limits(rpm=1)}},
               admin_token_env="SG_ADMIN_TOKEN"),
    Middleware(QuotaMiddleware),
]
"""
    process, server = serve(tmp_path, mock_url, extra=extra)
    try:
        _, plaintext = created(sluicegate(server, "keys", "create", "--project", "limited"))
        assert ask(server, plaintext) == "Mock reply to: hello"
        with pytest.raises(openai.RateLimitError):
            ask(server, plaintext)
    finally:
        stop_process(process)
        with psycopg.connect(DSN, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(
                sql.Identifier(schema)))
