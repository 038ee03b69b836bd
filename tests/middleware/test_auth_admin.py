"""The admin API on a real socket (hypercorn) over the real PostgreSQL, with httpx.

The app under test mounts three AdminAPIs: over a PostgresKeyStore at `/`, over a read-only
StaticKeyStore at `/static` (Starlette-style mount: full path, `root_path` set), and over a
store that was never started at `/down`.
"""
from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import orjson
import psycopg
import pytest
from psycopg import sql

from gateway.config import ConfigError
from gateway.policy import Limits
from middleware.auth import AuthMiddleware
from middleware.auth.admin import AdminAPI
from middleware.auth.keys import StaticKey, hash_key
from middleware.auth.store import PostgresKeyStore, StaticKeyStore
from tests.harness import ThreadedServer
from tests.middleware.stored_limits import OLD_DOCS, UNREADABLE

DSN = os.environ.get("SLUICEGATE_TEST_PG_DSN", "host=127.0.0.1 port=5432 dbname=test user=postgres")
TOKEN = "admin-" + uuid.uuid4().hex
STATIC_PLAINTEXT = "sk-sg-static-key-for-the-admin-tests"


class AdminTestApp:
    """/healthz, lifespan that starts the store, and the three mounted admin APIs."""

    def __init__(self, store: PostgresKeyStore) -> None:
        self.store = store
        static = StaticKeyStore([StaticKey("acme", key_hash=hash_key(STATIC_PLAINTEXT),
                                           id="static-acme")],
                                limits={("project", "acme"): Limits(rpm=9)})
        self.main = AdminAPI(store, token=TOKEN)
        self.mounts = {"/static": AdminAPI(static, token=TOKEN),
                       "/down": AdminAPI(PostgresKeyStore(DSN, schema="never_started"),
                                         token=TOKEN)}

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await self.store.startup()
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await self.store.shutdown()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["path"] == "/healthz":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})
            return
        for prefix, api in self.mounts.items():
            if scope["path"].startswith(prefix + "/"):
                await api({**scope, "root_path": prefix}, receive, send)
                return
        await self.main(scope, receive, send)


@pytest.fixture(scope="module")
def server() -> Iterator[ThreadedServer]:
    schema = "sg_admin_test_" + uuid.uuid4().hex[:12]
    store = PostgresKeyStore(DSN, schema=schema, channel=schema)
    try:
        with ThreadedServer(AdminTestApp(store)) as running:
            running.store = store  # type: ignore[attr-defined]
            yield running
    finally:
        with psycopg.connect(DSN, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(
                sql.Identifier(schema)))


@pytest.fixture
def client(server: ThreadedServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=10,
                      headers={"authorization": f"Bearer {TOKEN}"}) as c:
        yield c


@pytest.fixture
def anonymous(server: ThreadedServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=10) as c:
        yield c


def project() -> str:
    return "proj-" + uuid.uuid4().hex[:8]


def create(client: httpx.Client, **body: Any) -> dict[str, Any]:
    response = client.post("/admin/keys", json={"project": project(), **body})
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


def assert_error(response: httpx.Response, status: int, code: str | None = None,
                 error_type: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error: dict[str, Any] = response.json()["error"]
    assert set(error) >= {"message", "type", "code"}
    assert "Traceback" not in response.text
    if code is not None:
        assert error["code"] == code
    if error_type is not None:
        assert error["type"] == error_type
    return error


# -- construction and admin auth ---------------------------------------------------------------

def test_the_admin_token_is_checked_at_construction() -> None:
    store = StaticKeyStore([])
    with pytest.raises(ValueError, match="16"):
        AdminAPI(store, token="short")
    with pytest.raises(ValueError, match="virtual key"):
        AdminAPI(store, token="sk-sg-" + "x" * 40)
    assert TOKEN not in repr(AdminAPI(store, token=TOKEN))


def test_an_admin_token_that_is_also_a_static_key_refuses_to_start(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Declared by hash, a static key need not look like a virtual key: the gateway compares
    # hashes, so the one secret cannot open both the API and the admin API.
    monkeypatch.setenv("SG_SHARED_SECRET", TOKEN)
    with pytest.raises(ConfigError, match="holds a virtual key") as refused:
        AuthMiddleware(None, keys=[StaticKey("p", key_hash=hash_key(TOKEN))],  # type: ignore[arg-type]
                       admin_token_env="SG_SHARED_SECRET")
    assert TOKEN not in str(refused.value)
    AuthMiddleware(None, keys=[StaticKey("p", key_hash=hash_key(TOKEN + "-other"))],  # type: ignore[arg-type]
                   admin_token_env="SG_SHARED_SECRET")


def test_handles_only_its_own_prefixes() -> None:
    api = AdminAPI(StaticKeyStore([]), token=TOKEN)
    assert api.known_prefixes == ("/admin/keys", "/admin/limits")
    for path in ("/admin/keys", "/admin/keys/key_1/rotate", "/admin/limits",
                 "/admin/limits/customer/a/b"):
        assert api.handles(path), path
    for path in ("/admin", "/admin/", "/admin/usage/daily", "/admin/keysmith", "/v1/keys"):
        assert not api.handles(path), path


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/admin/keys"), ("POST", "/admin/keys"), ("GET", "/admin/keys/key_x"),
    ("POST", "/admin/keys/key_x/rotate"), ("PUT", "/admin/limits/project/acme"),
    ("GET", "/admin/limits"), ("GET", "/admin/nowhere"),
])
def test_no_token_no_access(anonymous: httpx.Client, method: str, path: str) -> None:
    response = anonymous.request(method, path, json={"project": "acme"})
    assert_error(response, 401, "missing_admin_token", "authentication_error")
    assert response.headers["www-authenticate"].startswith("Bearer")


def test_wrong_or_malformed_tokens_are_refused(anonymous: httpx.Client) -> None:
    for value in (f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", "Bearer", f"Basic {TOKEN}",
                  TOKEN, "Bearer " + "a" * 1000):
        response = anonymous.get("/admin/keys", headers={"authorization": value})
        assert_error(response, 401, "invalid_admin_token")
    assert anonymous.get("/admin/keys", headers={"authorization": f"bearer {TOKEN}"}
                         ).status_code == 200


def test_a_virtual_key_is_never_an_admin_token(client: httpx.Client,
                                               anonymous: httpx.Client) -> None:
    plaintext = create(client)["key"]
    for value in (plaintext, STATIC_PLAINTEXT):
        response = anonymous.get("/admin/keys", headers={"authorization": f"Bearer {value}"})
        error = assert_error(response, 401, "virtual_key_not_admin")
        assert value not in response.text and value not in error["message"]


# -- keys --------------------------------------------------------------------------------------

def test_create_a_key(client: httpx.Client, server: ThreadedServer) -> None:
    name = project()
    response = client.post("/admin/keys", json={
        "project": name, "allowed_models": ["gpt-4o*"], "expires_at": "2030-01-01T00:00:00Z",
        "require_customer": True, "metadata": {"owner": "ml-team"},
        "limits": {"rpm": 60, "budgets": [{"limit_usd": "25.50", "period": "monthly"}]}})
    assert response.status_code == 201
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    plaintext = body.pop("key")
    assert plaintext.startswith("sk-sg-") and len(plaintext) >= 6 + 43
    assert body["id"].startswith("key_") and body["object"] == "virtual_key"
    assert body["hint"] == "sk-sg-…" + plaintext[-4:]
    assert (body["project"], body["status"], body["allowed_models"]) == (
        name, "active", ["gpt-4o*"])
    assert body["expires_at"] == "2030-01-01T00:00:00+00:00"
    assert body["require_customer"] is True and body["disabled"] is False
    assert body["metadata"] == {"owner": "ml-team"}
    assert body["limits"]["rpm"] == 60
    assert body["limits"]["budgets"][0]["limit_usd"] == "25.50"
    assert body["revoked_at"] is None and "key_hash" not in body
    stored = server.run(server.store.find(hash_key(plaintext)))  # type: ignore[attr-defined]
    assert stored is not None and stored.id == body["id"]


@pytest.mark.parametrize(("body", "param"), [
    ({}, "project"),
    ({"project": ""}, "project"),
    ({"project": "a/b"}, None),
    ({"project": "acme", "colour": "red"}, "colour"),
    ({"project": "acme", "disabled": True}, "disabled"),
    ({"project": "acme", "allowed_models": "gpt-4o"}, "allowed_models"),
    ({"project": "acme", "expires_at": "next tuesday"}, "expires_at"),
    ({"project": "acme", "expires_at": "2030-01-01T00:00:00"}, "expires_at"),  # no timezone
    ({"project": "acme", "expires_at": 1893456000}, "expires_at"),
    ({"project": "acme", "require_customer": "yes"}, "require_customer"),
    ({"project": "acme", "metadata": ["a"]}, "metadata"),
    ({"project": "acme", "limits": {"rpm": -1}}, "limits"),
    ({"project": "acme", "limits": {"rpm": 1, "burst": 2}}, "limits"),
    ({"project": "acme", "limits": {"budgets": [{"limit_usd": 1.5}]}}, "limits"),
    ({"project": "acme", "limits": "fast"}, "limits"),
    # An object is no list (its keys were taken for one).
    ({"project": "acme", "allowed_models": {"gpt-4o": 1}}, "allowed_models"),
    ({"project": "acme", "limits": {"budgets": {}}}, "limits"),
    ({"project": "acme", "limits": {"budgets": {"limit_usd": "1"}}}, "limits"),
])
def test_create_refuses_bad_fields(client: httpx.Client, body: dict[str, Any],
                                   param: str | None) -> None:
    error = assert_error(client.post("/admin/keys", json=body), 400,
                         error_type="invalid_request_error")
    if param is not None:
        assert error["param"] == param


@pytest.mark.parametrize("content", [b"{not json", b"", b"[1, 2]", b'"key"', b"\xff\xfe"])
def test_bad_json_is_400(client: httpx.Client, content: bytes) -> None:
    for method, path in (("POST", "/admin/keys"), ("PATCH", "/admin/keys/key_x"),
                         ("PUT", "/admin/limits/project/acme")):
        response = client.request(method, path, content=content,
                                  headers={"content-type": "application/json"})
        assert_error(response, 400, "invalid_json")


def test_list_and_get_keys(client: httpx.Client) -> None:
    first = create(client)
    name = first["project"]
    second_response = client.post("/admin/keys", json={"project": name})
    second = second_response.json()
    other = create(client)
    listed = client.get("/admin/keys", params={"project": name}).json()
    assert listed["object"] == "list"
    assert [k["id"] for k in listed["data"]] == [first["id"], second["id"]]
    everything = [k["id"] for k in client.get("/admin/keys").json()["data"]]
    assert {first["id"], second["id"], other["id"]} <= set(everything)
    got = client.get(f"/admin/keys/{first['id']}").json()
    assert got == {k: v for k, v in first.items() if k != "key"}
    assert client.get("/admin/keys/", params={"project": name}).json() == listed


def test_unknown_key_is_404_and_a_pasted_key_is_not_echoed(client: httpx.Client) -> None:
    error = assert_error(client.get("/admin/keys/key_0000000000000000"), 404, "key_not_found")
    assert "key_0000000000000000" in error["message"]
    pasted = "sk-sg-" + uuid.uuid4().hex
    response = client.get(f"/admin/keys/{pasted}")
    assert_error(response, 404, "key_not_found")
    assert pasted not in response.text
    for path in (f"/admin/keys/{pasted}/revoke", f"/admin/keys/{pasted}/rotate"):
        response = client.post(path)
        assert_error(response, 404, "key_not_found")
        assert pasted not in response.text


def test_patch_a_key(client: httpx.Client, server: ThreadedServer) -> None:
    key = create(client, expires_at="2030-01-01T00:00:00+02:00")
    assert key["expires_at"] == "2029-12-31T22:00:00+00:00"
    response = client.patch(f"/admin/keys/{key['id']}", json={
        "allowed_models": ["claude-*"], "disabled": True, "expires_at": None,
        "metadata": {"ticket": 42}, "limits": {"tpm": 1000}, "require_customer": True})
    assert response.status_code == 200, response.text
    patched = response.json()
    assert patched["allowed_models"] == ["claude-*"] and patched["disabled"] is True
    assert patched["status"] == "disabled" and patched["expires_at"] is None
    assert patched["metadata"] == {"ticket": 42} and patched["limits"]["tpm"] == 1000
    assert patched["require_customer"] is True and "key" not in patched
    stored = server.run(server.store.find(hash_key(key["key"])))  # type: ignore[attr-defined]
    assert stored.disabled and stored.allowed_models == ("claude-*",)
    assert_error(client.patch(f"/admin/keys/{key['id']}", json={}), 400)
    error = assert_error(client.patch(f"/admin/keys/{key['id']}", json={"project": "x"}), 400)
    assert error["param"] == "project"
    assert_error(client.patch(f"/admin/keys/{key['id']}", json={"disabled": "no"}), 400)
    assert_error(client.patch("/admin/keys/key_missing", json={"disabled": True}), 404,
                 "key_not_found")


def test_revoke_a_key(client: httpx.Client, server: ThreadedServer) -> None:
    key = create(client)
    response = client.post(f"/admin/keys/{key['id']}/revoke")
    assert response.status_code == 200
    revoked = response.json()
    assert revoked["status"] == "revoked" and revoked["revoked_at"] is not None
    assert "key" not in revoked
    stored = server.run(server.store.find(hash_key(key["key"])))  # type: ignore[attr-defined]
    assert stored.revoked_at is not None
    again = client.post(f"/admin/keys/{key['id']}/revoke").json()
    assert again["revoked_at"] == revoked["revoked_at"]
    assert_error(client.post("/admin/keys/key_missing/revoke"), 404, "key_not_found")
    # A revoked key is not changed: a 409, not a 200 for limits that would never apply.
    for change in (client.put(f"/admin/limits/key/{key['id']}", json={"rpm": 5}),
                   client.patch(f"/admin/keys/{key['id']}", json={"disabled": False})):
        error = assert_error(change, 409, "conflict")
        assert "is revoked" in error["message"]
    assert client.get(f"/admin/keys/{key['id']}").json()["limits"]["rpm"] is None


def test_rotate_a_key(client: httpx.Client, server: ThreadedServer) -> None:
    key = create(client, allowed_models=["gpt-*"], metadata={"a": 1}, limits={"rpm": 5})
    response = client.post(f"/admin/keys/{key['id']}/rotate")
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    rotated = response.json()
    assert rotated["key"].startswith("sk-sg-") and rotated["key"] != key["key"]
    assert rotated["id"] != key["id"] and rotated["rotated_from"] == key["id"]
    assert (rotated["project"], rotated["allowed_models"], rotated["metadata"]) == (
        key["project"], ["gpt-*"], {"a": 1})
    assert rotated["limits"]["rpm"] == 5 and rotated["status"] == "active"
    assert client.get(f"/admin/keys/{key['id']}").json()["status"] == "revoked"
    store = server.store  # type: ignore[attr-defined]
    assert server.run(store.find(hash_key(rotated["key"]))).revoked_at is None
    assert_error(client.post(f"/admin/keys/{key['id']}/rotate"), 409, "conflict")
    assert_error(client.post("/admin/keys/key_missing/rotate"), 404, "key_not_found")


def test_the_plaintext_is_shown_only_by_create_and_rotate(client: httpx.Client) -> None:
    created = client.post("/admin/keys", json={"project": project(), "limits": {"rpm": 1}})
    plaintext, key_id = created.json()["key"], created.json()["id"]
    key_hash = hash_key(plaintext)
    assert plaintext in created.text
    later = [
        client.get("/admin/keys"),
        client.get(f"/admin/keys/{key_id}"),
        client.get("/admin/keys", params={"project": created.json()["project"]}),
        client.patch(f"/admin/keys/{key_id}", json={"metadata": {"x": 1}}),
        client.put(f"/admin/limits/key/{key_id}", json={"rpm": 2}),
        client.get(f"/admin/limits/key/{key_id}"),
        client.get("/admin/limits"),
    ]
    rotated = client.post(f"/admin/keys/{key_id}/rotate")
    new_plaintext = rotated.json()["key"]
    later += [client.post(f"/admin/keys/{key_id}/revoke"),
              client.get(f"/admin/keys/{rotated.json()['id']}"), client.get("/admin/keys")]
    for response in later:
        assert response.status_code == 200, response.text
        assert plaintext not in response.text and new_plaintext not in response.text
        assert plaintext[-20:] not in response.text
    for response in [created, rotated, *later]:
        assert key_hash not in response.text and hash_key(new_plaintext) not in response.text


# -- limits ------------------------------------------------------------------------------------

def test_project_and_customer_limits(client: httpx.Client, server: ThreadedServer) -> None:
    name = project()
    limits = {"rpm": 100, "tpm": 50_000,
              "budgets": [{"limit_usd": "100", "period": "monthly", "on_overflow": "block"}]}
    response = client.put(f"/admin/limits/project/{name}", json=limits)
    assert response.status_code == 200, response.text
    assert response.json() == {"object": "limits", "kind": "project", "subject_id": name,
                               "limits": Limits.from_json(limits).to_json()}
    assert client.get(f"/admin/limits/project/{name}").json() == response.json()
    customer = f"{name}/alice@example.com"
    response = client.put(f"/admin/limits/customer/{customer}", json={"rpm": 3})
    assert response.status_code == 200 and response.json()["subject_id"] == customer
    store = server.store  # type: ignore[attr-defined]
    assert server.run(store.subject_limits("customer", customer)) == Limits(rpm=3)
    assert server.run(store.subject_limits("project", name)) == Limits.from_json(limits)
    listed = client.get("/admin/limits", params={"kind": "customer"}).json()
    assert listed["object"] == "list"
    assert {(d["kind"], d["subject_id"]) for d in listed["data"]} >= {("customer", customer)}
    assert all(d["kind"] == "customer" for d in listed["data"])
    everything = client.get("/admin/limits").json()["data"]
    assert {("project", name), ("customer", customer)} <= {
        (d["kind"], d["subject_id"]) for d in everything}
    deleted = client.delete(f"/admin/limits/project/{name}")
    assert deleted.status_code == 200
    assert deleted.json() == {"object": "limits", "kind": "project", "subject_id": name,
                              "deleted": True}
    assert_error(client.get(f"/admin/limits/project/{name}"), 404, "limits_not_found")
    assert_error(client.delete(f"/admin/limits/project/{name}"), 404, "limits_not_found")
    assert server.run(store.subject_limits("project", name)) is None


def test_key_limits(client: httpx.Client) -> None:
    key = create(client)
    response = client.put(f"/admin/limits/key/{key['id']}", json={"rpm": 7})
    assert response.status_code == 200
    assert response.json()["limits"]["rpm"] == 7
    assert client.get(f"/admin/keys/{key['id']}").json()["limits"]["rpm"] == 7
    assert client.get(f"/admin/limits/key/{key['id']}").json()["limits"]["rpm"] == 7
    keyed = client.get("/admin/limits", params={"kind": "key"}).json()["data"]
    assert ("key", key["id"]) in {(d["kind"], d["subject_id"]) for d in keyed}
    assert all(d["kind"] == "key" for d in keyed)
    assert client.delete(f"/admin/limits/key/{key['id']}").json()["deleted"] is True
    assert client.get(f"/admin/keys/{key['id']}").json()["limits"]["rpm"] is None
    assert_error(client.put("/admin/limits/key/key_missing", json={"rpm": 1}), 404,
                 "key_not_found")
    assert_error(client.get("/admin/limits/key/key_missing"), 404, "key_not_found")


def test_a_key_without_limits_has_none_to_show_or_delete(client: httpx.Client) -> None:
    """As for a project or customer without stored limits: 404 `limits_not_found`."""
    key = create(client)
    path = f"/admin/limits/key/{key['id']}"
    error = assert_error(client.get(path), 404, "limits_not_found")
    assert key["id"] in error["message"]
    assert_error(client.delete(path), 404, "limits_not_found")
    assert client.put(path, json={"rpm": 7}).status_code == 200
    assert client.delete(path).json()["deleted"] is True
    assert_error(client.get(path), 404, "limits_not_found")
    assert_error(client.delete(path), 404, "limits_not_found")
    assert client.head(path).status_code == 404
    assert_error(client.delete("/static/admin/limits/key/static-acme"), 409, "read_only")


@pytest.mark.parametrize(("method", "path", "body"), [
    ("PUT", "/admin/limits/model/gpt-4o", {"rpm": 1}),
    ("GET", "/admin/limits/global/all", None),
    ("PUT", "/admin/limits/customer/no-project-part", {"rpm": 1}),
    ("PUT", "/admin/limits/project/acme", {"rpm": "many"}),
    ("PUT", "/admin/limits/project/acme", {"budgets": [{"limit_usd": "1", "period": "hourly"}]}),
    ("PUT", "/admin/limits/project/acme", {"on_overflow": "downgrade"}),
    ("GET", "/admin/limits?kind=model", None),
])
def test_bad_limits_requests_are_400(client: httpx.Client, method: str, path: str,
                                     body: dict[str, Any] | None) -> None:
    assert_error(client.request(method, path, json=body), 400, error_type="invalid_request_error")


def store_limits(server: ThreadedServer, table: str, where: str, document: Any,
                 *params: str) -> None:
    """Writes a limits document straight to PostgreSQL, as an older version did."""
    schema = server.store.schema  # type: ignore[attr-defined]
    with psycopg.connect(DSN, autocommit=True) as conn:
        conn.execute(sql.SQL("UPDATE {} SET limits = %s::jsonb WHERE " + where).format(
            sql.Identifier(schema, table)), (json.dumps(document), *params))


def test_limits_stored_by_the_previous_version_list_and_show(
        client: httpx.Client, server: ThreadedServer) -> None:
    keys = [create(client) for _ in OLD_DOCS]
    for key, document in zip(keys, OLD_DOCS, strict=True):
        store_limits(server, "sluicegate_keys", "id = %s", document, key["id"])
    name = project()
    assert client.put(f"/admin/limits/project/{name}", json={"rpm": 1}).status_code == 200
    store_limits(server, "sluicegate_subject_limits", "subject_id = %s", OLD_DOCS[0], name)
    listing = client.get("/admin/keys")
    assert listing.status_code == 200, listing.text
    shown = {key["id"]: key["limits"] for key in listing.json()["data"]}
    for key, document in zip(keys, OLD_DOCS, strict=True):
        expected = Limits.from_stored(document).to_json()
        assert shown[key["id"]] == expected
        assert client.get(f"/admin/keys/{key['id']}").json()["limits"] == expected
    limits = client.get("/admin/limits")
    assert limits.status_code == 200, limits.text
    assert {"object": "limits", "kind": "project", "subject_id": name,
            "limits": Limits.from_stored(OLD_DOCS[0]).to_json()} in limits.json()["data"]


def test_limits_that_cannot_be_read_are_flagged_and_the_operator_replaces_them(
        client: httpx.Client, server: ThreadedServer) -> None:
    broken, fine = create(client), create(client, limits={"rpm": 5})
    store_limits(server, "sluicegate_keys", "id = %s", UNREADABLE, broken["id"])
    name = project()
    assert client.put(f"/admin/limits/project/{name}", json={"rpm": 1}).status_code == 200
    store_limits(server, "sluicegate_subject_limits", "subject_id = %s", UNREADABLE, name)

    listing = client.get("/admin/keys")
    assert listing.status_code == 200, listing.text
    by_id = {key["id"]: key for key in listing.json()["data"]}
    assert by_id[broken["id"]]["limits"] is None
    assert "stream_cutoff" in by_id[broken["id"]]["limits_error"]
    assert by_id[fine["id"]]["limits"] == Limits(rpm=5).to_json()
    assert "limits_error" not in by_id[fine["id"]]
    shown = client.get(f"/admin/keys/{broken['id']}")
    assert shown.status_code == 200 and shown.json()["limits_error"]
    every = client.get("/admin/limits")
    assert every.status_code == 200, every.text
    flagged = {(d["kind"], d["subject_id"]): d for d in every.json()["data"]
               if d["limits"] is None}
    assert {("key", broken["id"]), ("project", name)} <= set(flagged)
    assert "stream_cutoff" in flagged[("project", name)]["limits_error"]
    one = client.get(f"/admin/limits/project/{name}")
    assert one.status_code == 200 and one.json()["limits"] is None
    assert_error(client.post(f"/admin/keys/{broken['id']}/rotate"), 409, "conflict")

    for path in (f"/admin/limits/key/{broken['id']}", f"/admin/limits/project/{name}"):
        repaired = client.put(path, json={"rpm": 10})
        assert repaired.status_code == 200, repaired.text
        assert client.get(path).json()["limits"] == Limits(rpm=10).to_json()
    assert "limits_error" not in client.get(f"/admin/keys/{broken['id']}").json()


# -- routing, methods, sizes, read-only and unavailable stores ---------------------------------

@pytest.mark.parametrize("path", ["/admin/", "/admin/nothing", "/admin/usage/daily",
                                  "/admin/keys/key_x/explode", "/admin/keys/key_x/revoke/now",
                                  "/admin/limits/project", "/v1/chat/completions"])
def test_unknown_paths_are_404(client: httpx.Client, path: str) -> None:
    assert_error(client.get(path), 404, "unknown_url", "invalid_request_error")


@pytest.mark.parametrize(("method", "path", "allowed"), [
    ("DELETE", "/admin/keys", "GET, HEAD, POST"),
    ("PUT", "/admin/keys/key_x", "GET, HEAD, PATCH"),
    ("GET", "/admin/keys/key_x/revoke", "POST"),
    ("DELETE", "/admin/keys/key_x/rotate", "POST"),
    ("POST", "/admin/limits", "GET, HEAD"),
    ("POST", "/admin/limits/project/acme", "GET, HEAD, PUT, DELETE"),
])
def test_wrong_methods_are_405(client: httpx.Client, method: str, path: str,
                               allowed: str) -> None:
    response = client.request(method, path)
    assert_error(response, 405)
    assert response.headers["allow"] == allowed


def test_bodies_over_one_mebibyte_are_413(client: httpx.Client) -> None:
    big = orjson.dumps({"project": "acme", "metadata": {"pad": "x" * (1 << 20)}})
    assert_error(client.post("/admin/keys", content=big,
                             headers={"content-type": "application/json"}), 413,
                 "request_too_large")

    def chunks() -> Iterator[bytes]:  # no content-length: counted while reading
        for _ in range(17):
            yield b" " * 65536

    assert_error(client.post("/admin/keys", content=chunks()), 413, "request_too_large")
    just_under = b'{"project": "acme"}' + b" " * ((1 << 20) - 19)
    assert client.post("/admin/keys", content=just_under).status_code == 201


def test_a_body_that_is_not_json_by_its_headers_is_415_before_413(client: httpx.Client) -> None:
    name = project()
    big = orjson.dumps({"project": name, "metadata": {"pad": "x" * (2 << 20)}})
    for headers, code in (({"content-type": "text/plain"}, "unsupported_media_type"),
                          ({"content-encoding": "gzip"}, "unsupported_content_encoding")):
        for content in (big, orjson.dumps({"project": name})):  # (big: drained, then answered)
            response = client.post("/admin/keys", content=content, headers=headers)
            assert_error(response, 415, code, "invalid_request_error")
    assert client.get("/admin/keys", params={"project": name}).json()["data"] == []
    assert client.post("/admin/keys", content=orjson.dumps({"project": name}),
                       headers={"content-type": "application/json; charset=utf-8"}
                       ).status_code == 201


def test_a_read_only_store_answers_409_to_changes(client: httpx.Client) -> None:
    listed = client.get("/static/admin/keys")
    assert listed.status_code == 200
    assert [k["id"] for k in listed.json()["data"]] == ["static-acme"]
    assert client.get("/static/admin/keys/static-acme").json()["project"] == "acme"
    assert client.get("/static/admin/limits/project/acme").json()["limits"]["rpm"] == 9
    for method, path, body in (
            ("POST", "/static/admin/keys", {"project": "acme"}),
            ("PATCH", "/static/admin/keys/static-acme", {"disabled": True}),
            ("POST", "/static/admin/keys/static-acme/revoke", None),
            ("POST", "/static/admin/keys/static-acme/rotate", None),
            ("PUT", "/static/admin/limits/project/acme", {"rpm": 1}),
            ("DELETE", "/static/admin/limits/project/acme", None)):
        error = assert_error(client.request(method, path, json=body), 409, "read_only")
        assert "keys declared in the config module are read-only" in error["message"]


def test_an_unreachable_store_is_503(client: httpx.Client) -> None:
    assert_error(client.get("/down/admin/keys"), 503, "store_unavailable")
    assert_error(client.post("/down/admin/keys", json={"project": "acme"}), 503,
                 "store_unavailable")


# -- input the store cannot hold, and subjects the auth layer accepts --------------------------

@pytest.mark.parametrize("limit_usd", ["NaN", "sNaN", "Infinity", "-Infinity", "1E+999999"])
def test_a_budget_that_is_not_a_finite_amount_is_400(client: httpx.Client,
                                                     limit_usd: str) -> None:
    budgets = {"budgets": [{"limit_usd": limit_usd, "period": "monthly"}]}
    for response in (client.put(f"/admin/limits/project/{project()}", json=budgets),
                     client.post("/admin/keys", json={"project": project(), "limits": budgets})):
        error = assert_error(response, 400, error_type="invalid_request_error")
        assert error["param"] == "limits" and "limit_usd" in error["message"]


@pytest.mark.parametrize("limits", [
    {"on_overflow": "downgrade", "downgrade_to": 5},
    {"downgrade_to": ["x"]},
    {"on_overflow": "downgrade", "downgrade_to": ""},
    {"rpm": True},
    {"on_store_error": ["open"]},
    {"budgets": [{"limit_usd": "1", "stream_cutoff": "no"}]},
    {"budgets": [{"limit_usd": "1", "on_overflow": "downgrade", "downgrade_to": {"a": 1}}]},
    {"budgets": [{"limit_usd": "1", "status": "402"}]},
    {"budgets": [{"limit_usd": "1", "status": 402.0}]},
    {"budgets": [{"limit_usd": "1", "alert_at_percent": [True]}]},
    {"budgets": [{"limit_usd": "1", "alert_at_percent": ["50"]}]},
    {"budgets": [{"limit_usd": "1", "alert_at_percent": 50}]},
    {"budgets": [{"limit_usd": "1", "period": ["monthly"]}]},
])
def test_limits_with_wrongly_typed_fields_are_400(client: httpx.Client,
                                                  limits: dict[str, Any]) -> None:
    key = create(client)
    for response in (client.put(f"/admin/limits/project/{project()}", json=limits),
                     client.put(f"/admin/limits/key/{key['id']}", json=limits),
                     client.post("/admin/keys", json={"project": project(), "limits": limits})):
        assert_error(response, 400, error_type="invalid_request_error")
    assert client.get(f"/admin/keys/{key['id']}").json()["limits"] == Limits().to_json()


@pytest.mark.parametrize("when", ["9999-12-31T23:59:59-05:00", "0001-01-01T00:00:00+01:00",
                                  "9999-12-31T00:00:00Z", "1969-12-31T00:00:00Z"])
def test_an_expiry_past_the_edge_of_the_calendar_is_400(client: httpx.Client, when: str) -> None:
    error = assert_error(client.post("/admin/keys", json={"project": project(),
                                                          "expires_at": when}), 400)
    assert error["param"] == "expires_at"
    key = create(client)
    error = assert_error(client.patch(f"/admin/keys/{key['id']}", json={"expires_at": when}), 400)
    assert error["param"] == "expires_at"


def test_a_new_key_cannot_be_expired_already_but_a_key_can_be_expired_now(
        client: httpx.Client) -> None:
    """A key created expired is dead on arrival (its plaintext shown once for nothing);
    a PATCH to a past expiry is how an operator expires a key now."""
    name = project()
    error = assert_error(client.post("/admin/keys", json={
        "project": name, "expires_at": "2020-01-01T00:00:00Z"}), 400, "invalid_parameter")
    assert error["param"] == "expires_at"
    assert client.get("/admin/keys", params={"project": name}).json()["data"] == []
    key = create(client, expires_at="2099-01-01T00:00:00Z")
    expired = client.patch(f"/admin/keys/{key['id']}", json={"expires_at": "2020-01-01T00:00:00Z"})
    assert expired.status_code == 200 and expired.json()["status"] == "expired"


@pytest.mark.parametrize(("field", "value"), [
    ("metadata", {"note": "x\u0000y"}),
    ("metadata", {"n\u0000te": "x"}),
    ("metadata", {"deep": [{"note": "\u0000"}]}),
    ("allowed_models", ["gpt\u0000"]),
    ("allowed_models", ["gpt\n4o"]),
    ("limits", {"on_overflow": "downgrade", "downgrade_to": "gpt\u0000"}),
])
def test_nul_and_control_characters_in_key_settings_are_400(client: httpx.Client, field: str,
                                                            value: Any) -> None:
    error = assert_error(client.post("/admin/keys", json={"project": project(), field: value}),
                         400, error_type="invalid_request_error")
    assert error["param"] == field
    key = create(client)
    error = assert_error(client.patch(f"/admin/keys/{key['id']}", json={field: value}), 400)
    assert error["param"] == field


@pytest.mark.parametrize(("value", "listed_as"), [
    (1e20, 1e20), (-1e19, -1e19), (1.5e300, 1.5e300),
    (2 ** 64, float(2 ** 64)), ([1, {"n": -(2 ** 64)}], [1, {"n": -float(2 ** 64)}])])
def test_a_number_past_64_bits_in_metadata_is_stored_and_listed(
        client: httpx.Client, value: Any, listed_as: Any) -> None:
    # jsonb keeps 1e20 as the integer it equals, which the admin API could not write back:
    # the key was stored (its plaintext never shown) and every listing of its project was a
    # 500. (A JSON body's integers past 64 bits arrive as floats.)
    name = project()
    key = create(client, project=name, metadata={"n": value})
    listed = client.get("/admin/keys", params={"project": name})
    assert listed.status_code == 200, listed.text
    assert listed.json()["data"][0]["metadata"] == {"n": listed_as}
    patched = client.patch(f"/admin/keys/{key['id']}", json={"metadata": {"m": value}})
    assert patched.status_code == 200, patched.text
    assert client.get(f"/admin/keys/{key['id']}").status_code == 200


def test_an_integer_past_64_bits_in_metadata_is_refused() -> None:
    from middleware.auth.keys import check_key_fields
    for value in (2 ** 63, -(2 ** 63) - 1, [1, {"n": 2 ** 70}]):
        with pytest.raises(ValueError, match="metadata integers"):
            check_key_fields(metadata={"n": value})
    assert check_key_fields(metadata={"n": 2 ** 63 - 1, "m": -(2 ** 63), "f": 1e20})


def test_a_row_an_earlier_version_stored_with_a_wide_number_is_listed(
        client: httpx.Client, server: ThreadedServer) -> None:
    key = create(client)
    schema = server.store.schema  # type: ignore[attr-defined]
    with psycopg.connect(DSN, autocommit=True) as conn:
        conn.execute(sql.SQL("UPDATE {}.sluicegate_keys SET metadata = '{{\"n\": 1e20, "
                             "\"m\": [-1e19, 7], \"w\": 1e400}}'::jsonb WHERE id = %s").format(
                                 sql.Identifier(schema)), (key["id"],))
    listed = client.get("/admin/keys", params={"project": key["project"]})
    assert listed.status_code == 200, listed.text
    assert listed.json()["data"][0]["metadata"] == {"n": 1e20, "m": [-1e19, 7], "w": "1" + "0" * 400}
    assert client.get(f"/admin/keys/{key['id']}").json()["metadata"]["n"] == 1e20


@pytest.mark.parametrize(("method", "path", "status"), [
    ("GET", "/admin/keys/key_%00", 404),
    ("PATCH", "/admin/keys/key_%00", 404),
    ("POST", "/admin/keys/key_%00/revoke", 404),
    ("POST", "/admin/keys/key_%00/rotate", 404),
    ("GET", "/admin/keys/key_%01x", 404),
    ("PUT", "/admin/limits/key/key_%00", 404),
    ("GET", "/admin/limits/key/key_%00", 404),
    ("GET", "/admin/keys?project=a%00b", 400),
    ("PUT", "/admin/limits/project/a%00b", 400),
    ("PUT", "/admin/limits/customer/acme/a%00b", 400),
])
def test_a_nul_in_an_id_is_404_or_400_never_500(client: httpx.Client, method: str, path: str,
                                                status: int) -> None:
    body = {"disabled": True} if method == "PATCH" else {"rpm": 1} if method == "PUT" else None
    assert_error(client.request(method, path, json=body), status)


@pytest.mark.parametrize("state", [{"disabled": True}, {"expires_at": "2001-01-01T00:00:00Z"}])
def test_rotating_a_disabled_or_expired_key_is_409(client: httpx.Client,
                                                   state: dict[str, Any]) -> None:
    """The new key would inherit the state and be refused like the old one: say so instead
    of handing out a plaintext that cannot be used."""
    key = create(client)
    assert client.patch(f"/admin/keys/{key['id']}", json=state).status_code == 200
    error = assert_error(client.post(f"/admin/keys/{key['id']}/rotate"), 409, "conflict")
    assert ("disabled" if "disabled" in state else "expired") in error["message"]
    assert client.get(f"/admin/keys/{key['id']}").json()["revoked_at"] is None
    assert [k["id"] for k in client.get("/admin/keys", params={
        "project": key["project"]}).json()["data"]] == [key["id"]]


@pytest.mark.parametrize("customer", [
    "Jane Doe", "u" * 256, "café€", "a/b", "a//b", "trailing/", "/leading", "100% sure?",
    "a%2Fb",
])
def test_limits_can_be_set_for_every_customer_the_auth_layer_accepts(
        client: httpx.Client, server: ThreadedServer, customer: str) -> None:
    """The customer id is percent-encoded as one path segment (slashes included)."""
    subject = f"{project()}/{customer}"
    path = f"/admin/limits/customer/{subject.split('/')[0]}/{quote(customer, safe='')}"
    response = client.put(path, json={"rpm": 4})
    assert response.status_code == 200, response.text
    assert response.json()["subject_id"] == subject
    assert client.get(path).json()["limits"]["rpm"] == 4
    store = server.store  # type: ignore[attr-defined]
    assert server.run(store.subject_limits("customer", subject)) == Limits(rpm=4)
    assert client.delete(path).json()["deleted"] is True


@pytest.mark.parametrize("customer", [" padded", "padded ", "u" * 257, "tab\there", "nul\u0000"])
def test_customer_ids_the_auth_layer_never_produces_are_400(client: httpx.Client,
                                                            customer: str) -> None:
    path = f"/admin/limits/customer/{project()}/{quote(customer, safe='')}"
    error = assert_error(client.put(path, json={"rpm": 1}), 400)
    assert "customer" in error["message"]


# -- logging -----------------------------------------------------------------------------------

class _FailingStore(StaticKeyStore):
    """A store with a bug: every read or change raises."""

    async def get(self, key_id: str) -> Any:
        raise RuntimeError("a bug in the store")

    async def update(self, key_id: str, **fields: Any) -> Any:
        raise RuntimeError("a bug in the store")


async def _call_asgi(app: Any, method: str, path: str, body: bytes = b"") -> int:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    raw = quote(path, safe="/").encode()
    await app({"type": "http", "method": method, "path": path, "raw_path": raw,
               "query_string": b"", "root_path": "",
               "headers": [(b"authorization", f"Bearer {TOKEN}".encode())]}, receive, send)
    status: int = sent[0]["status"]
    return status


async def test_a_key_pasted_into_an_admin_url_never_reaches_the_log(
        caplog: pytest.LogCaptureFixture) -> None:
    pasted = "sk-sg-" + uuid.uuid4().hex + "PastedPlaintext"
    api = AdminAPI(_FailingStore([]), token=TOKEN)
    caplog.set_level(logging.DEBUG)
    for method, path, body in (("GET", f"/admin/keys/{pasted}", b""),
                               ("PUT", f"/admin/limits/key/{pasted}", b'{"rpm": 1}'),
                               ("GET", f"/admin/keys/Bearer:{pasted}", b"")):
        assert await _call_asgi(api, method, path, body) == 500
    assert caplog.records and "unhandled error" in caplog.text
    leaked = pasted[6:] in caplog.text
    assert not leaked  # (not `pasted not in caplog.text`: pytest would print the key)
    assert "'/admin/keys/sk-sg-…'" in caplog.text and "Bearer:sk-sg-…'" in caplog.text


def test_a_secret_read_from_a_file_with_its_newline_still_works(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch, mock_url: str) -> None:
    # (a Kubernetes secret or an EnvironmentFile often ends in a newline, which no header
    # can carry: the admin token, and a static key's hash, could never be matched)
    from gateway import create_app
    from tests.harness import mock_config, write_config
    key = "sk-sg-newline-" + uuid.uuid4().hex
    monkeypatch.setenv("SG_NL_KEY", key + "\n")
    monkeypatch.setenv("SG_NL_ADMIN", "newline-admin-token-0123456789\n")
    layers = ("[Middleware(AuthMiddleware, keys=[StaticKey('nl', key_env='SG_NL_KEY')], "
              "admin_token_env='SG_NL_ADMIN')]")
    app = create_app(write_config(tmp_path, mock_config(mock_url, middleware=layers)))
    with ThreadedServer(app) as server:
        listed = httpx.get(server.url + "/admin/keys", headers={
            "authorization": "Bearer newline-admin-token-0123456789"})
        assert listed.status_code == 200, listed.text
        answered = httpx.post(server.url + "/v1/chat/completions", headers={
            "authorization": f"Bearer {key}"}, json={
            "model": "gpt-mock", "messages": [{"role": "user", "content": "hi"}]})
        assert answered.status_code == 200, answered.text


def test_keys_are_listed_a_page_at_a_time_and_by_status(client: httpx.Client,
                                                        server: ThreadedServer) -> None:
    # (every key ever made, revoked ones too, came in one response, however many)
    name = project()
    made = [create(client, project=name)["id"] for _ in range(5)]
    client.post(f"/admin/keys/{made[1]}/revoke")
    first = client.get("/admin/keys", params={"project": name, "limit": 2}).json()
    assert [key["id"] for key in first["data"]] == made[:2]
    assert first["has_more"] is True and first["last_id"] == made[1]
    rest = client.get("/admin/keys", params={"project": name, "limit": 3,
                                             "after": first["last_id"]}).json()
    assert [key["id"] for key in rest["data"]] == made[2:] and rest["has_more"] is False
    revoked = client.get("/admin/keys", params={"project": name, "status": "revoked"}).json()
    assert [key["id"] for key in revoked["data"]] == [made[1]]
    active = client.get("/admin/keys", params={"project": name, "status": "active"}).json()
    assert [key["id"] for key in active["data"]] == [made[0], *made[2:]]
    # ("²" and "٣" are digits to str.isdigit, not to int: they were a 400 invalid_request
    # quoting int()'s "invalid literal", without the param)
    for params in ({"limit": 0}, {"limit": 1001}, {"limit": "ten"}, {"limit": "\u00b2"},
                   {"limit": "\u0663"}, {"limit": " 5"}, {"status": "gone"}, {"after": ""}):
        error = assert_error(client.get("/admin/keys", params=params), 400, "invalid_parameter")
        assert error["param"] == next(iter(params))
    # The CLI's client reads every page.
    from gateway.admin_client import AdminClient
    every = AdminClient(server.url, TOKEN).list_keys(name, page_size=2)
    assert [key["id"] for key in every] == made
