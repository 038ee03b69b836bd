"""Every admin route with bad input, and HEAD on every GET route.

One gateway for the module with every layer's admin API: keys and limits (auth, on
PostgreSQL), usage totals (metering, on PostgreSQL), current spend (quota, on Redis), cache
invalidation and the deployments' state (failover). Every refusal has the auth admin API's
shape: OpenAI's `{"error": {"message", "type", "param", "code"}}`, always with a `code`, with
`param` where one parameter is at fault. A route that answers GET answers HEAD alike (RFC 9110
9.3.2: the same status and headers, no body); other methods get a 405 whose `Allow` lists the
methods the route takes. A route that reads a body refuses one whose headers say it is not
JSON (415), once the admin token is checked and before the body is read or acted on.
"""
from __future__ import annotations

import gzip
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from tests.harness import TEST_KEY, mock_config, pg_names, serve

PG_DSN = "host=127.0.0.1 port=5432 user=root dbname=test"
ADMIN_TOKEN = "admin-sweep-token-0123456789"
ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def prefix() -> Iterator[str]:
    """This module's PostgreSQL tables (usage) and schema (keys), dropped afterwards."""
    yield from pg_names("adminsweep_")


@pytest.fixture(scope="module")
def http(tmp_path_factory: pytest.TempPathFactory, mock_url: str,
         prefix: str) -> Iterator[httpx.Client]:
    admin = "admin_token_env='SG_ADMIN_SWEEP'"
    layers = (
        "[Middleware(AuthMiddleware, keys=[StaticKey('tests', key_env='SG_TEST_KEY')], "
        f"store=PostgresKeyStore({PG_DSN!r}, schema={prefix!r}), {admin}), "
        f"Middleware(MeteringMiddleware, store=PostgresUsageStore({PG_DSN!r}, prefix={prefix!r}), "
        f"flush_interval_s=0.05, {admin}), "
        f"Middleware(QuotaMiddleware, store='redis://127.0.0.1:6379/0', {admin}), "
        f"Middleware(CacheMiddleware, {admin}), "
        "Middleware(FailoverMiddleware, retry=RetryPolicy(max_attempts=1), breaker=NEVER_OPENS, "
        f"{admin})]")
    text = mock_config(mock_url, middleware=layers).replace(
        "from providers import Provider",
        "from providers import Provider\n"
        "from middleware.auth import PostgresKeyStore\n"
        "from middleware.metering import PostgresUsageStore\n"
        f"os.environ.setdefault('SG_ADMIN_SWEEP', {ADMIN_TOKEN!r})")
    with serve(tmp_path_factory.mktemp("admin-sweep"), text) as server, \
            httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


def assert_admin_error(response: httpx.Response, status: int, code: str,
                       param: str | None = None) -> dict[str, Any]:
    """A refusal in the one admin shape, with `code` and `param`."""
    assert response.status_code == status, (status, response.status_code, response.text)
    assert response.headers["content-type"] == "application/json"
    assert "Traceback" not in response.text and ADMIN_TOKEN not in response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    error: dict[str, Any] = body["error"]
    assert (error["code"], error["param"]) == (code, param), error
    assert isinstance(error["type"], str) and error["message"]
    return error


# -- bad input, route by route -------------------------------------------------------------------

UNKNOWN_KEY = "key_" + "0" * 24
CASES: list[tuple[str, str, bytes, int, str, str | None]] = [
    # (method, path, body, status, code, param)
    # auth: keys
    ("POST", "/admin/keys", b"{nope", 400, "invalid_json", None),
    ("POST", "/admin/keys", b"[1]", 400, "invalid_json", None),
    ("POST", "/admin/keys", b"", 400, "invalid_json", None),
    ("POST", "/admin/keys", b'{"project": 5}', 400, "missing_required_parameter", "project"),
    ("POST", "/admin/keys", b'{"project": "p", "colour": "red"}', 400, "unknown_parameter",
     "colour"),
    ("POST", "/admin/keys", b'{"project": "p", "limits": 5}', 400, "invalid_parameter",
     "limits"),
    ("POST", "/admin/keys", b'{"project": "p", "limits": {"rpm": "many"}}', 400,
     "invalid_parameter", "limits"),
    ("POST", "/admin/keys", b'{"project": "p", "expires_at": "soon"}', 400,
     "invalid_parameter", "expires_at"),
    ("POST", "/admin/keys", b'{"project": "p", "allowed_models": 5}', 400, "invalid_parameter",
     "allowed_models"),
    ("POST", "/admin/keys", b'{"project": "p", "metadata": ' + b"[" * 300 + b"]" * 300 + b"}",
     400, "invalid_json", None),
    ("POST", "/admin/keys", b'{"project": "' + b"p" * (1 << 20) + b'"}', 413,
     "request_too_large", None),
    ("GET", "/admin/keys?project=%FF%00", b"", 400, "invalid_parameter", "project"),
    ("GET", f"/admin/keys/{UNKNOWN_KEY}", b"", 404, "key_not_found", None),
    ("GET", "/admin/keys/%00", b"", 404, "key_not_found", None),
    ("PATCH", f"/admin/keys/{UNKNOWN_KEY}", b"{}", 400, "missing_required_parameter", None),
    ("PATCH", f"/admin/keys/{UNKNOWN_KEY}", b'{"disabled": "yes"}', 400, "invalid_parameter",
     "disabled"),
    ("PATCH", f"/admin/keys/{UNKNOWN_KEY}", b'{"disabled": true}', 404, "key_not_found", None),
    ("POST", f"/admin/keys/{UNKNOWN_KEY}/revoke", b"", 404, "key_not_found", None),
    ("POST", f"/admin/keys/{UNKNOWN_KEY}/rotate", b"", 404, "key_not_found", None),
    ("DELETE", "/admin/keys", b"", 405, "method_not_allowed", None),
    # auth: limits
    ("GET", "/admin/limits?kind=planet", b"", 400, "invalid_parameter", "kind"),
    ("PUT", "/admin/limits/planet/x", b'{"rpm": 5}', 400, "invalid_parameter", "kind"),
    ("PUT", "/admin/limits/project/p", b'{"rpm": -1}', 400, "invalid_parameter", "limits"),
    ("PUT", "/admin/limits/project/p", b"[]", 400, "invalid_json", None),
    ("PUT", "/admin/limits/customer/nocustomer", b'{"rpm": 5}', 400, "invalid_parameter",
     "subject_id"),
    ("GET", "/admin/limits/project/never-set", b"", 404, "limits_not_found", None),
    ("DELETE", "/admin/limits/project/never-set", b"", 404, "limits_not_found", None),
    ("GET", f"/admin/limits/key/{UNKNOWN_KEY}", b"", 404, "key_not_found", None),
    ("POST", "/admin/limits", b"{}", 405, "method_not_allowed", None),
    # metering: usage totals
    ("GET", "/admin/usage?group_by=planet", b"", 400, "invalid_parameter", "group_by"),
    ("GET", "/admin/usage?grain=hour", b"", 400, "invalid_parameter", "grain"),
    ("GET", "/admin/usage?since=last%20tuesday", b"", 400, "invalid_parameter", "since"),
    ("GET", "/admin/usage?until=2025-13-01", b"", 400, "invalid_parameter", "until"),
    ("GET", "/admin/usage?since=2025-02-01&until=2025-01-01", b"", 400, "invalid_parameter",
     "since"),
    ("POST", "/admin/usage", b"{}", 405, "method_not_allowed", None),
    # a query parameter a route does not take, or one given twice, on every layer's routes
    # (they were ignored: a revoke with ?bogus=1 revoked)
    ("GET", "/admin/usage?bogus=1", b"", 400, "unknown_parameter", "bogus"),
    ("GET", "/admin/usage?group_by=project&group_by=key", b"", 400, "invalid_parameter",
     "group_by"),
    ("GET", "/admin/usage/key/x?bogus=1", b"", 400, "unknown_parameter", "bogus"),
    ("GET", "/admin/deployments?bogus=1", b"", 400, "unknown_parameter", "bogus"),
    ("POST", "/admin/cache/invalidate?bogus=1", b'{"project": "p"}', 400,
     "unknown_parameter", "bogus"),
    ("GET", f"/admin/keys/{UNKNOWN_KEY}?bogus=1", b"", 400, "unknown_parameter", "bogus"),
    ("POST", f"/admin/keys/{UNKNOWN_KEY}/revoke?bogus=1", b"", 400, "unknown_parameter",
     "bogus"),
    ("GET", "/admin/keys?project=a&project=b", b"", 400, "invalid_parameter", "project"),
    ("GET", "/admin/limits/project/p?bogus=1", b"", 400, "unknown_parameter", "bogus"),
    # quota: current spend
    ("GET", "/admin/usage/planet/x", b"", 404, "unknown_kind", "kind"),
    ("GET", "/admin/usage/key", b"", 404, "unknown_url", None),
    ("DELETE", "/admin/usage/key/x", b"", 405, "method_not_allowed", None),
    # cache: invalidation
    ("POST", "/admin/cache/invalidate", b"{nope", 400, "invalid_json", None),
    ("POST", "/admin/cache/invalidate", b'["project"]', 400, "invalid_json", None),
    ("POST", "/admin/cache/invalidate", b"", 400, "missing_required_parameter", None),
    ("POST", "/admin/cache/invalidate", b"{}", 400, "missing_required_parameter", None),
    ("POST", "/admin/cache/invalidate", b'{"project": 5}', 400, "invalid_type", "project"),
    ("POST", "/admin/cache/invalidate", b'{"model": ""}', 400, "invalid_type", "model"),
    ("POST", "/admin/cache/invalidate", b'{"namespace": ["a"]}', 400, "invalid_type",
     "namespace"),
    ("POST", "/admin/cache/invalidate", b'{"project": "p", "everything": true}', 400,
     "unknown_parameter", "everything"),
    ("POST", "/admin/cache/invalidate", b'{"project": "' + b"p" * 70_000 + b'"}', 413,
     "request_too_large", None),
    ("GET", "/admin/cache/invalidate", b"", 405, "method_not_allowed", None),
    # failover: deployments
    ("POST", "/admin/deployments", b"{}", 405, "method_not_allowed", None),
    # nobody's
    ("GET", "/admin/nothing", b"", 404, "unknown_url", None),
    ("POST", "/admin/cache", b"{}", 404, "unknown_url", None),
]


@pytest.mark.parametrize(("method", "path", "content", "status", "code", "param"), CASES,
                         ids=[f"{c[0]} {c[1][:40]} {c[2][:24]!r}" for c in CASES])
def test_bad_admin_input_is_refused_in_one_shape(
        http: httpx.Client, method: str, path: str, content: bytes, status: int, code: str,
        param: str | None) -> None:
    response = http.request(method, path, content=content, headers={**ADMIN, **JSON})
    assert_admin_error(response, status, code, param)
    assert http.get("/healthz").status_code == 200  # (and the gateway still serves)


ROUTES = [("GET", "/admin/keys"), ("GET", f"/admin/keys/{UNKNOWN_KEY}"),
          ("POST", f"/admin/keys/{UNKNOWN_KEY}/rotate"), ("GET", "/admin/limits"),
          ("PUT", "/admin/limits/project/p"), ("GET", "/admin/usage"),
          ("GET", "/admin/usage/key/x"), ("POST", "/admin/cache/invalidate"),
          ("GET", "/admin/deployments")]


@pytest.mark.parametrize(("method", "path"), ROUTES, ids=[f"{m} {p}" for m, p in ROUTES])
def test_without_the_admin_token_every_route_is_a_401_with_a_code(
        http: httpx.Client, method: str, path: str) -> None:
    for headers in ({}, {"authorization": "Bearer wrong-token-0123456789"},
                    {"authorization": f"Bearer {TEST_KEY}"}):
        response = http.request(method, path, headers={**headers, **JSON}, content=b"{}")
        error = assert_admin_error(response, 401, response.json()["error"]["code"])
        assert error["code"] in ("missing_admin_token", "invalid_admin_token",
                                 "virtual_key_not_admin"), error
        assert error["type"] == "authentication_error"
        assert response.headers["www-authenticate"].startswith("Bearer")


def test_rotating_a_revoked_key_is_a_409(http: httpx.Client) -> None:
    created = http.post("/admin/keys", json={"project": "sweep-409"}, headers=ADMIN)
    assert created.status_code == 201, created.text
    key_id = created.json()["id"]
    assert http.post(f"/admin/keys/{key_id}/revoke", headers=ADMIN).status_code == 200
    response = http.post(f"/admin/keys/{key_id}/rotate", headers=ADMIN)
    assert_admin_error(response, 409, "conflict")


# -- HEAD where GET; 405 with Allow elsewhere ----------------------------------------------------

GET_ROUTES: list[tuple[str, dict[str, str]]] = [
    ("/admin/keys", ADMIN), ("/admin/keys?project=sweep-409", ADMIN),
    (f"/admin/keys/{UNKNOWN_KEY}", ADMIN), ("/admin/limits", ADMIN),
    ("/admin/limits/project/never-set", ADMIN), ("/admin/usage?group_by=key", ADMIN),
    ("/admin/usage?grain=hour", ADMIN), ("/admin/usage/key/x", ADMIN),
    ("/admin/deployments", ADMIN), ("/admin/keys", {}), ("/admin/usage/key/x", {}),
    ("/v1/usage/self", {"authorization": f"Bearer {TEST_KEY}"}), ("/v1/models", {}),
    ("/v1/models/gpt-mock", {"authorization": f"Bearer {TEST_KEY}"}), ("/healthz", {}), ("/readyz", {}), ("/metrics", {}),
]
VARYING = {"date", "x-request-id", "server"}


@pytest.mark.parametrize(("path", "headers"), GET_ROUTES,
                         ids=[f"{p}{' unauthenticated' if not h else ''}" for p, h in GET_ROUTES])
def test_head_answers_as_get_without_the_body(http: httpx.Client, path: str,
                                              headers: dict[str, str]) -> None:
    get = http.get(path, headers=headers)
    head = http.head(path, headers=headers)
    assert head.status_code == get.status_code, (get.text, head.status_code)
    assert head.content == b""
    if path in ("/metrics", "/readyz"):  # (their numbers move between two requests)
        assert head.headers["content-type"] == get.headers["content-type"]
        return
    assert {k: v for k, v in head.headers.items() if k not in VARYING} == \
        {k: v for k, v in get.headers.items() if k not in VARYING}
    assert int(head.headers["content-length"]) == len(get.content) > 0


ALLOWED = [("/admin/keys", "GET, HEAD, POST"), (f"/admin/keys/{UNKNOWN_KEY}", "GET, HEAD, PATCH"),
           ("/admin/limits", "GET, HEAD"), ("/admin/limits/project/p", "GET, HEAD, PUT, DELETE"),
           ("/admin/usage", "GET, HEAD"), ("/admin/usage/key/x", "GET, HEAD"),
           ("/admin/deployments", "GET, HEAD"), ("/admin/cache/invalidate", "POST"),
           ("/v1/usage/self", "GET, HEAD"), ("/healthz", "GET, HEAD"), ("/readyz", "GET, HEAD"),
           ("/metrics", "GET, HEAD"), ("/v1/models", "GET, HEAD"),
           ("/v1/models/gpt-mock", "GET, HEAD")]


METHOD_CASES = [(path, allowed, method) for path, allowed in ALLOWED
                for method in ("OPTIONS", "TRACE", "PATCH") if method not in allowed]


@pytest.mark.parametrize(("path", "allowed", "method"), METHOD_CASES,
                         ids=[f"{m} {p}" for p, _, m in METHOD_CASES])
def test_other_methods_are_a_405_listing_the_allowed_ones(
        http: httpx.Client, path: str, allowed: str, method: str) -> None:
    headers = ADMIN if path.startswith("/admin/") else {
        "authorization": f"Bearer {TEST_KEY}"}
    response = http.request(method, path, headers=headers)
    assert_admin_error(response, 405, "method_not_allowed")
    assert response.headers["allow"] == allowed


# -- the body's media type and coding, on every route that reads a body ---------------------------

# (method, path, body, the GET showing what the request would change, or None)
REFUSED_ROUTES: list[tuple[str, str, dict[str, Any], str | None]] = [
    ("POST", "/admin/keys", {"project": "sweep-refused"}, "/admin/keys?project=sweep-refused"),
    ("PATCH", "/admin/keys/{key}", {"metadata": {"refused": True}}, "/admin/keys/{key}"),
    ("PUT", "/admin/limits/project/sweep-refused", {"rpm": 5},
     "/admin/limits/project/sweep-refused"),
    ("POST", "/admin/cache/invalidate", {"project": "sweep-refused"}, None),
]
NOT_JSON: list[tuple[dict[str, str], str]] = [
    ({"content-type": "text/plain"}, "unsupported_media_type"),
    ({"content-type": "application/x-www-form-urlencoded"}, "unsupported_media_type"),  # curl -d
    ({"content-type": "multipart/form-data; boundary=sweep"}, "unsupported_media_type"),
    ({"content-type": "application/jsonp"}, "unsupported_media_type"),
    ({"content-type": "application/json", "content-encoding": "gzip"},
     "unsupported_content_encoding"),
    ({"content-encoding": "br"}, "unsupported_content_encoding"),
]
REFUSED_CASES = [(method, path, body, probe, headers, code)
                 for method, path, body, probe in REFUSED_ROUTES for headers, code in NOT_JSON]


@pytest.fixture(scope="module")
def key_id(http: httpx.Client) -> str:
    """A key for the PATCH route to change (or not)."""
    created = http.post("/admin/keys", json={"project": "sweep-media"}, headers=ADMIN)
    assert created.status_code == 201, created.text
    return str(created.json()["id"])


def encoded(body: dict[str, Any], headers: dict[str, str]) -> bytes:
    content = orjson.dumps(body)
    return gzip.compress(content) if "content-encoding" in headers else content


@pytest.mark.parametrize(("method", "path", "body", "probe", "headers", "code"), REFUSED_CASES,
                         ids=[f"{c[0]} {c[1]} {c[4]}" for c in REFUSED_CASES])
def test_a_body_that_is_not_json_by_its_headers_is_a_415_and_changes_nothing(
        http: httpx.Client, key_id: str, method: str, path: str, body: dict[str, Any],
        probe: str | None, headers: dict[str, str], code: str) -> None:
    before = http.get(probe.format(key=key_id), headers=ADMIN) if probe else None
    response = http.request(method, path.format(key=key_id), content=encoded(body, headers),
                            headers={**ADMIN, **headers})
    error = assert_admin_error(response, 415, code)
    if code == "unsupported_content_encoding":  # RFC 9110 15.5.16
        assert response.headers["accept-encoding"] == "identity"
        assert repr(headers["content-encoding"]) in error["message"]
    else:
        assert "accept-encoding" not in response.headers
        assert repr(headers["content-type"].split(";")[0]) in error["message"]
    if probe is not None and before is not None:  # (not read, so not acted on)
        after = http.get(probe.format(key=key_id), headers=ADMIN)
        assert (after.status_code, after.json()) == (before.status_code, before.json())
    assert http.get("/healthz").status_code == 200  # (and the connection was usable)


ACCEPTED_ROUTES: list[tuple[str, str, dict[str, Any], int]] = [
    ("POST", "/admin/keys", {"project": "sweep-accepted"}, 201),
    ("PATCH", "/admin/keys/{key}", {"metadata": {"accepted": True}}, 200),
    ("PUT", "/admin/limits/project/sweep-accepted", {"rpm": 5}, 200),
    ("POST", "/admin/cache/invalidate", {"project": "sweep-accepted"}, 200),
]
JSON_HEADERS: list[dict[str, str]] = [
    {},  # no Content-Type: taken as JSON (README)
    {"content-type": "application/json; charset=utf-8"},
    {"content-type": "Application/JSON"},
    {"content-type": "application/merge-patch+json"},
    {"content-type": "application/json", "content-encoding": "identity"},
]
ACCEPTED_CASES = [(method, path, body, status, headers)
                  for method, path, body, status in ACCEPTED_ROUTES for headers in JSON_HEADERS]


@pytest.mark.parametrize(("method", "path", "body", "status", "headers"), ACCEPTED_CASES,
                         ids=[f"{c[0]} {c[1]} {c[4]}" for c in ACCEPTED_CASES])
def test_a_json_body_is_taken_without_a_content_type_and_with_parameters(
        http: httpx.Client, key_id: str, method: str, path: str, body: dict[str, Any],
        status: int, headers: dict[str, str]) -> None:
    response = http.request(method, path.format(key=key_id), content=orjson.dumps(body),
                            headers={**ADMIN, **headers})
    assert response.request.headers.get("content-type") == headers.get("content-type")
    assert response.status_code == status, response.text
    if method == "PATCH":
        assert response.json()["metadata"] == {"accepted": True}


@pytest.mark.parametrize(("method", "path", "body", "probe"), REFUSED_ROUTES,
                         ids=[f"{r[0]} {r[1]}" for r in REFUSED_ROUTES])
def test_the_admin_token_is_checked_before_the_content_type(
        http: httpx.Client, key_id: str, method: str, path: str, body: dict[str, Any],
        probe: str | None) -> None:
    for headers in ({"content-type": "text/plain"}, {"content-encoding": "gzip"}):
        response = http.request(method, path.format(key=key_id), content=b"not json",
                                headers=headers)
        error = assert_admin_error(response, 401, response.json()["error"]["code"])
        assert error["code"] in ("missing_admin_token", "invalid_admin_token"), error


BODILESS: list[tuple[str, str]] = [
    ("GET", "/admin/keys"), ("HEAD", "/admin/keys"), ("GET", "/admin/keys/{key}"),
    ("GET", "/admin/limits"), ("GET", "/admin/limits/project/never-set"),
    ("DELETE", "/admin/limits/project/never-set"), ("POST", f"/admin/keys/{UNKNOWN_KEY}/revoke"),
    ("POST", f"/admin/keys/{UNKNOWN_KEY}/rotate"), ("GET", "/admin/usage?group_by=key"),
    ("GET", "/admin/usage/key/x"), ("GET", "/admin/deployments"),
    ("GET", "/admin/cache/invalidate"),
]


@pytest.mark.parametrize(("method", "path"), BODILESS, ids=[f"{m} {p}" for m, p in BODILESS])
def test_a_route_that_reads_no_body_ignores_its_content_headers(
        http: httpx.Client, key_id: str, method: str, path: str) -> None:
    plain = http.request(method, path.format(key=key_id), headers=ADMIN)
    for headers in ({"content-type": "text/plain"},
                    {"content-type": "application/x-www-form-urlencoded"},
                    {"content-encoding": "gzip"}):
        response = http.request(method, path.format(key=key_id), headers={**ADMIN, **headers})
        assert response.status_code == plain.status_code != 415, response.text
        if plain.status_code >= 400:
            assert response.json()["error"]["code"] == plain.json()["error"]["code"]
