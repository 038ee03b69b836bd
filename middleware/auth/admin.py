"""The admin HTTP API for virtual keys and per-subject limits: a pure ASGI handler.

Mount it where the operator wants it (it routes on the path below `root_path`), behind an
admin token that is never a virtual key. JSON in and out (a body its headers say is not
JSON is a 415: `gateway.admin.check_json_body`); refusals are OpenAI-shaped errors rendered
by the one shared helper. A plaintext key appears in exactly two responses:
the one that creates it and the one that rotates to it.

    POST   /admin/keys                     create a key (201, plaintext shown once)
    GET    /admin/keys[?project=]          list keys
    GET    /admin/keys/{id}                one key
    PATCH  /admin/keys/{id}                change allowed_models, expires_at, disabled, ...
    POST   /admin/keys/{id}/revoke         revoke at once, everywhere
    POST   /admin/keys/{id}/rotate         new key with the same settings; old one revoked
                                           (409 if it is revoked, disabled or expired)
    GET    /admin/limits[?kind=]           every stored limit
    GET|PUT|DELETE /admin/limits/{kind}/{subject_id}   kind: key, project or customer

Stored limits that cannot be read are shown as `"limits": null` with a `limits_error`, in
listings too, so that the operator sees them and can PUT new ones.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, unquote

import orjson

from gateway.admin import admin_refusal, allowed_methods, check_json_body, query_refusal
from gateway.errors import GatewayError
from gateway.ingress import nesting_exceeds, too_deep
from gateway.kernel import Receive, Scope, Send, drain_body, route_path
from gateway.policy import Limits
from middleware.auth.keys import (
    KEY_PREFIX,
    UPDATABLE_FIELDS,
    check_project,
    check_storable_key_fields,
    check_subject_id,
    is_key_id,
)
from middleware.auth.store import (
    KEY_STATUSES,
    KeyConflict,
    KeyStore,
    KeyStoreReadOnly,
    KeyStoreUnavailable,
    StaticKeyStore,
    UnreadableLimits,
)

logger = logging.getLogger("sluicegate")

MAX_BODY_BYTES = 1 << 20
MIN_TOKEN_CHARS = 16
ADMIN_LIMIT_KINDS = ("key", "project", "customer")
CREATE_FIELDS = frozenset({"project", "allowed_models", "expires_at", "require_customer",
                           "metadata", "limits"})

_HEADERS = [(b"content-type", b"application/json"), (b"cache-control", b"no-store")]

Payload = tuple[int, dict[str, Any]]
_PASTED_KEY = re.compile(re.escape(KEY_PREFIX) + "[^/]*")


@dataclass(slots=True)
class _Request:
    """One admin request: what the handlers need, read lazily."""

    params: list[str]
    query: dict[str, str]
    receive: Receive
    headers: list[tuple[bytes, bytes]]
    max_body_bytes: int

    async def json(self) -> dict[str, Any]:
        try:
            check_json_body(self.headers)  # (a 415 before a 413, as in the kernel)
        except GatewayError:
            await drain_body(self.receive, limit_bytes=16 * 1024 * 1024)  # (as for the 413)
            raise
        content_length = _content_length(self.headers)
        if content_length is not None and content_length > self.max_body_bytes:
            await drain_body(self.receive, limit_bytes=16 * 1024 * 1024)  # so the client reads the 413, not a reset
            raise _too_large(self.max_body_bytes)
        chunks, size, more = [], 0, True
        while more:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise GatewayError(400, "The client went away while sending the body.",
                                   code="client_disconnected")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                if message.get("more_body", False):
                    await drain_body(self.receive, limit_bytes=16 * 1024 * 1024)
                raise _too_large(self.max_body_bytes)
            chunks.append(chunk)
            more = message.get("more_body", False)
        raw = b"".join(chunks)
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise GatewayError(400, f"The request body is not valid JSON: {exc}.",
                               code="invalid_json") from None
        if not isinstance(body, dict):
            raise GatewayError(400, "The request body must be a JSON object.",
                               code="invalid_json")
        if nesting_exceeds(raw, body):  # stored, it would fail every listing that holds it
            raise too_deep(code="invalid_json")
        return body


Handler = Callable[[_Request], Awaitable[Payload]]


class AdminAPI:
    """The admin API over a key store, guarded by `token` (`Authorization: Bearer <token>`).

    It answers every path it is given (unknown ones with 404); a host that serves other
    `/admin/` paths itself asks `handles(path)` first. With `models` (the config's public
    model names), limits that downgrade to another model are refused (400); AuthMiddleware
    gives them at startup.
    """

    known_prefixes = ("/admin/keys", "/admin/limits")

    def __init__(self, store: KeyStore, *, token: str,
                 max_body_bytes: int = MAX_BODY_BYTES,
                 config: StaticKeyStore | None = None,
                 models: Collection[str] | None = None) -> None:
        if not isinstance(token, str) or len(token) < MIN_TOKEN_CHARS:
            raise ValueError(f"the admin token must be at least {MIN_TOKEN_CHARS} characters")
        if token.startswith(KEY_PREFIX):
            raise ValueError(f"the admin token must not be a virtual key ({KEY_PREFIX}...)")
        self.store = store
        # The config module's keys and limits beside a store of its own (PostgreSQL): shown,
        # never changed here (a change is refused, 409 `read_only`, naming where they are).
        self.config = config
        self.max_body_bytes = max_body_bytes
        # A downgrade to a model the gateway does not have (a typo) would leave the overflow a
        # refusal, silently: refused when stored, as the config's own limits are at startup.
        self.models = frozenset(models) if models is not None else None
        self._token = token.encode()

    def __repr__(self) -> str:  # never the token
        return f"AdminAPI(store={self.store!r})"

    def handles(self, path: str) -> bool:
        """Whether `path` (below the mount point) is one of this API's routes' prefixes."""
        return any(path == prefix or path.startswith(prefix + "/")
                   for prefix in self.known_prefixes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await _decline_non_http(scope, receive, send)
            return
        try:
            status, payload = await self._respond(scope, receive)
            body = orjson.dumps(payload)
            headers = [*_HEADERS, (b"content-length", str(len(body)).encode())]
        except GatewayError as exc:
            status, headers, body = exc.render("openai")
            headers = [*headers, (b"cache-control", b"no-store")]
        except Exception:
            logger.exception("admin API: unhandled error on %s %r", scope["method"],
                             _loggable_path(route_path(scope)))
            status, headers, body = GatewayError(
                500, "The admin API failed to handle this request; see the gateway log.",
                code="internal_error").render("openai")
        await send({"type": "http.response.start", "status": status, "headers": headers})
        # HEAD: GET's status and headers, Content-Length included, without the body.
        await send({"type": "http.response.body",
                    "body": b"" if scope["method"] == "HEAD" else body})

    async def _respond(self, scope: Scope, receive: Receive) -> Payload:
        self._authenticate(scope["headers"])
        methods, params = self._route(route_path(scope), _path_segments(scope))
        # HEAD wherever GET (RFC 9110 9.3.2), answered as GET (without the body: __call__).
        handler = methods.get("GET" if scope["method"] == "HEAD" else scope["method"])
        if handler is None:
            allowed = ", ".join(method for name in methods for method in allowed_methods(name))
            raise GatewayError(405, f"Method {scope['method']} is not allowed here; use "
                                    f"{allowed}.", code="method_not_allowed",
                               headers=[(b"allow", allowed.encode())])
        refusal = query_refusal(scope, _QUERY_PARAMS.get(handler.__name__, ()))
        if refusal is not None:
            raise refusal
        query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1"),
                               keep_blank_values=True))
        request = _Request(params, query, receive, scope["headers"], self.max_body_bytes)
        try:
            return await handler(request)
        except KeyStoreReadOnly as exc:
            raise GatewayError(409, f"This key store is read-only: {exc}.",
                               code="read_only") from None
        except KeyConflict as exc:
            raise GatewayError(409, f"{exc}.", code="conflict") from None
        except KeyStoreUnavailable as exc:
            raise GatewayError(503, f"The key store is unavailable: {exc}.",
                               code="store_unavailable") from None
        except ValueError as exc:  # a value the store refused
            raise GatewayError(400, f"{exc}.", code="invalid_request") from None

    def _authenticate(self, headers: list[tuple[bytes, bytes]]) -> None:
        refusal = admin_refusal(headers, self._token)
        if refusal is not None:
            raise refusal

    def _route(self, path: str,
               segments: list[str]) -> tuple[Mapping[str, Handler], list[str]]:
        head, rest = segments[:2], segments[2:]
        methods: Mapping[str, Handler] | None = None
        if head == ["admin", "keys"]:
            if not rest:
                methods = {"GET": self._list_keys, "POST": self._create_key}
            elif len(rest) == 1 and rest[0]:
                methods = {"GET": self._get_key, "PATCH": self._update_key}
            elif len(rest) == 2 and rest[0] and rest[1] == "revoke":
                methods = {"POST": self._revoke_key}
            elif len(rest) == 2 and rest[0] and rest[1] == "rotate":
                methods = {"POST": self._rotate_key}
        elif head == ["admin", "limits"]:
            if not rest:
                methods = {"GET": self._list_limits}
            elif len(rest) >= 2 and all(rest):
                # A customer id is "<project>/<customer>", and the customer may hold a '/'
                # too: sent as "<project>/<customer, its '/' as %2F>", or unencoded.
                rest = [rest[0], "/".join(rest[1:])]
                methods = {"GET": self._get_limits, "PUT": self._put_limits,
                           "DELETE": self._delete_limits}
        if methods is None:
            raise GatewayError(404, f"Unknown admin path {path!r}.", code="unknown_url")
        return methods, rest

    # -- keys --------------------------------------------------------------------------------

    async def _create_key(self, request: _Request) -> Payload:
        body = await request.json()
        _refuse_unknown(body, CREATE_FIELDS)
        project = body.pop("project", None)
        if not isinstance(project, str) or not project:
            raise GatewayError(400, "'project' is required: the project the key belongs to.",
                               param="project", code="missing_required_parameter")
        _check_project(project)
        settings = _key_settings(body, self.models)
        # Dead on arrival, its plaintext shown once for nothing (PATCH may set a past expiry:
        # that is how a key is expired now).
        expires_at = settings.get("expires_at")
        if expires_at is not None and expires_at <= datetime.now(UTC):
            raise GatewayError(400, "Invalid expires_at: a new key must expire in the future.",
                               param="expires_at", code="invalid_parameter")
        plaintext, key = await self.store.create(project, **settings)
        return 201, {"key": plaintext, **key.to_public_json()}

    async def _list_keys(self, request: _Request) -> Payload:
        """Oldest first, a page at a time (`limit`, 100 by default, at most 1000; `after`:
        the last id of the page before; `has_more` says whether there is another), as
        OpenAI's lists page. The config's keys come on the first page, beside the store's."""
        project, status = request.query.get("project"), request.query.get("status")
        after = request.query.get("after")
        if project is not None:
            _check_project(project)
        if status is not None and status not in KEY_STATUSES:
            raise GatewayError(400, f"status must be one of {', '.join(KEY_STATUSES)}.",
                               param="status", code="invalid_parameter")
        if after is not None and not after:
            raise GatewayError(400, "after must be a key id.", param="after",
                               code="invalid_parameter")
        text = request.query.get("limit", str(_PAGE))
        # (ASCII: "²" is a digit to isdigit, not to int; "٣" is 3 to int, but no API's limit)
        if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= _PAGE_MAX:
            raise GatewayError(400, f"limit must be a whole number from 1 to {_PAGE_MAX}.",
                               param="limit", code="invalid_parameter")
        limit = int(text)
        keys = await self.store.list(project, status=status, after=after, limit=limit + 1)
        has_more = len(keys) > limit
        data = [key.to_public_json() for key in keys[:limit]]
        last_id = data[-1]["id"] if data else None
        if self.config is not None and after is None:
            data = [_from_config(key.to_public_json())
                    for key in await self.config.list(project, status=status)] + data
        return 200, {"object": "list", "data": data, "has_more": has_more, "last_id": last_id}

    async def _get_key(self, request: _Request) -> Payload:
        key_id = _key_id(request.params[0])
        if self.config is not None:
            declared = await self.config.get(key_id)
            if declared is not None:
                return 200, _from_config(declared.to_public_json())
        key = await self.store.get(key_id)
        if key is None:
            raise _no_key(request.params[0])
        return 200, key.to_public_json()

    async def _refuse_a_declared_key(self, key_id: str) -> None:
        """A key the config module declares is changed there, not here."""
        if self.config is not None and await self.config.get(key_id) is not None:
            raise GatewayError(409, f"Key {key_id} is declared in the config module: change or "
                                    "remove it there (and reload).", code="read_only")

    async def _refuse_configured_limits(self, kind: str, subject_id: str) -> None:
        """Limits the config module sets for a project or customer apply over stored ones:
        storing some would change nothing."""
        if self.config is not None and await self.config.get_limits(kind, subject_id) \
                is not None:
            raise GatewayError(409, f"The limits of {kind} {subject_id!r} are set in the config "
                                    "module (AuthMiddleware limits=), which apply over stored "
                                    "ones: change them there (and reload).", code="read_only")

    async def _update_key(self, request: _Request) -> Payload:
        body = await request.json()
        _refuse_unknown(body, UPDATABLE_FIELDS)
        if not body:
            raise GatewayError(400, "Nothing to update: send one or more of "
                                    f"{', '.join(sorted(UPDATABLE_FIELDS))}.",
                               code="missing_required_parameter")
        await self._refuse_a_declared_key(_key_id(request.params[0]))
        key = await self.store.update(_key_id(request.params[0]),
                                      **_key_settings(body, self.models))
        if key is None:
            raise _no_key(request.params[0])
        return 200, key.to_public_json()

    async def _revoke_key(self, request: _Request) -> Payload:
        await self._refuse_a_declared_key(_key_id(request.params[0]))
        key = await self.store.revoke(_key_id(request.params[0]))
        if key is None:
            raise _no_key(request.params[0])
        return 200, key.to_public_json()

    async def _rotate_key(self, request: _Request) -> Payload:
        await self._refuse_a_declared_key(_key_id(request.params[0]))
        rotated = await self.store.rotate(_key_id(request.params[0]))
        if rotated is None:
            raise _no_key(request.params[0])
        plaintext, key = rotated
        return 200, {"key": plaintext, **key.to_public_json(),
                     "rotated_from": request.params[0]}

    # -- limits ------------------------------------------------------------------------------

    async def _list_limits(self, request: _Request) -> Payload:
        kind = request.query.get("kind")
        if kind is not None:
            _check_kind(kind)
        data = []
        configured = set()
        if self.config is not None:
            if kind != "key":
                for item in await self.config.list_limits(kind):
                    configured.add((item.kind, item.subject_id))
                    data.append(_from_config(_limits_json(item.kind, item.subject_id,
                                                          item.limits)))
            if kind in (None, "key"):
                for key in await self.config.list():
                    if not key.limits.empty:
                        data.append(_from_config(_limits_json("key", key.id, key.limits)))
        if kind != "key":
            for item in await self.store.list_limits(kind):
                if (item.kind, item.subject_id) not in configured:  # (not applied)
                    data.append(_limits_json(item.kind, item.subject_id, item.limits,
                                             item.error))
        if kind in (None, "key"):
            for key in await self.store.list():
                if (not key.limits.empty or key.limits_error) and key.revoked_at is None:
                    data.append(_limits_json("key", key.id, key.limits, key.limits_error))
        return 200, {"object": "list", "data": data}

    async def _get_limits(self, request: _Request) -> Payload:
        kind, subject_id = _subject(request)
        if self.config is not None:
            if kind == "key":
                declared = await self.config.get(subject_id)
                if declared is not None:
                    if declared.limits.empty:
                        raise _no_limits(kind, subject_id)
                    return 200, _from_config(_limits_json(kind, subject_id, declared.limits))
            else:
                configured = await self.config.get_limits(kind, subject_id)
                if configured is not None:
                    return 200, _from_config(_limits_json(kind, subject_id, configured))
        if kind == "key":
            key = await self.store.get(subject_id)
            if key is None:
                raise _no_key(subject_id)
            if key.limits.empty and key.limits_error is None:  # as for a project or customer
                raise _no_limits(kind, subject_id)
            return 200, _limits_json(kind, subject_id, key.limits, key.limits_error)
        try:
            limits = await self.store.get_limits(kind, subject_id)
        except UnreadableLimits as exc:  # shown, so that the operator can replace them
            return 200, _limits_json(kind, subject_id, Limits(), str(exc))
        if limits is None:
            raise _no_limits(kind, subject_id)
        return 200, _limits_json(kind, subject_id, limits)

    async def _put_limits(self, request: _Request) -> Payload:
        kind, subject_id = _subject(request)
        limits = _parse_limits(await request.json(), self.models)
        if kind == "key":
            await self._refuse_a_declared_key(subject_id)
            if await self.store.update(subject_id, limits=limits) is None:
                raise _no_key(subject_id)
        else:
            await self._refuse_configured_limits(kind, subject_id)
            await self.store.set_limits(kind, subject_id, limits)
        return 200, _limits_json(kind, subject_id, limits)

    async def _delete_limits(self, request: _Request) -> Payload:
        kind, subject_id = _subject(request)
        if kind == "key":
            await self._refuse_a_declared_key(subject_id)
            key = await self.store.get(subject_id)
            if (key is not None and key.limits.empty and key.limits_error is None
                    and not isinstance(self.store, StaticKeyStore)):  # (that one: 409 below)
                raise _no_limits(kind, subject_id)  # nothing to delete, as for the others
            if key is None or await self.store.update(subject_id, limits=Limits()) is None:
                raise _no_key(subject_id)
        else:
            await self._refuse_configured_limits(kind, subject_id)
            if not await self.store.set_limits(kind, subject_id, None):
                raise _no_limits(kind, subject_id)
        return 200, {"object": "limits", "kind": kind, "subject_id": subject_id,
                     "deleted": True}


# -- request parsing ---------------------------------------------------------------------------

def _key_settings(body: dict[str, Any], models: frozenset[str] | None) -> dict[str, Any]:
    """JSON key settings to `KeyStore` values, checked; GatewayError(400) names the field."""
    settings: dict[str, Any] = {}
    for name, value in body.items():
        if name == "expires_at" and value is not None:
            value = _parse_datetime(value)
        elif name == "limits":
            value = _parse_limits(value, models, field="limits.")
        try:
            settings.update(check_storable_key_fields(**{name: value}))
        except (ValueError, TypeError) as exc:
            raise GatewayError(400, f"Invalid {name}: {exc}.", param=name,
                               code="invalid_parameter") from None
    return settings


def _parse_datetime(value: Any) -> datetime:
    try:
        return datetime.fromisoformat(value)
    except (ValueError, TypeError):
        raise GatewayError(400, "Invalid expires_at: an ISO 8601 date and time with a "
                                "timezone, e.g. 2030-01-01T00:00:00Z, or null.",
                           param="expires_at", code="invalid_parameter") from None


def _parse_limits(value: Any, models: frozenset[str] | None, *, field: str = "") -> Limits:
    """`value` (limits' JSON, at `field` of the body) as Limits; with `models`, its
    downgrades go to one of them."""
    if not isinstance(value, dict):
        raise GatewayError(400, "Invalid limits: an object like {\"rpm\": 60, \"budgets\": "
                                "[{\"limit_usd\": \"10\", \"period\": \"monthly\"}]}.",
                           param="limits", code="invalid_parameter")
    try:
        limits = Limits.from_json(value)
    except (ValueError, TypeError, ArithmeticError) as exc:  # (decimal's, on odd amounts)
        raise GatewayError(400, f"Invalid limits: {exc}.", param="limits",
                           code="invalid_parameter") from None
    if models is not None:
        _check_downgrades(limits, models, field)
    return limits


def _check_downgrades(limits: Limits, models: frozenset[str], field: str) -> None:
    if limits.downgrade_to is not None and limits.downgrade_to not in models:
        raise _unknown_downgrade(limits.downgrade_to, field + "downgrade_to")
    for index, budget in enumerate(limits.budgets):
        if budget.downgrade_to is not None and budget.downgrade_to not in models:
            raise _unknown_downgrade(budget.downgrade_to,
                                     f"{field}budgets[{index}].downgrade_to")


def _unknown_downgrade(target: str, param: str) -> GatewayError:
    return GatewayError(400, f"Invalid {param}: {target!r} is not a model of this gateway "
                             "(its config's `models`).", param=param,
                        code="invalid_parameter")


def _refuse_unknown(body: Mapping[str, Any], known: frozenset[str]) -> None:
    unknown = sorted(set(body) - known)
    if unknown:
        raise GatewayError(400, f"Unknown field(s): {', '.join(unknown)}; known: "
                                f"{', '.join(sorted(known))}.", param=unknown[0],
                           code="unknown_parameter")


def _subject(request: _Request) -> tuple[str, str]:
    kind, subject_id = request.params
    _check_kind(kind)
    if kind == "key":
        _key_id(subject_id)
    else:
        try:
            check_subject_id(kind, subject_id)
        except ValueError as exc:
            raise GatewayError(400, f"Invalid {kind} id: {exc}.", param="subject_id",
                               code="invalid_parameter") from None
    return kind, subject_id


def _key_id(key_id: str) -> str:
    # An id no key can have (a NUL, say) is no key: 404 without asking the store.
    if not is_key_id(key_id):
        raise _no_key(key_id)
    return key_id


def _check_kind(kind: str) -> None:
    if kind not in ADMIN_LIMIT_KINDS:
        raise GatewayError(400, f"Unknown limit kind {kind!r}; use one of "
                                f"{', '.join(ADMIN_LIMIT_KINDS)}.", param="kind",
                           code="invalid_parameter")


def _path_segments(scope: Scope) -> list[str]:
    """The route's segments after the mount point, each percent-decoded on its own (from
    `raw_path`), so that an encoded '/' stays inside its segment; trailing empty ones
    dropped ("/admin/keys/" is "/admin/keys")."""
    path = route_path(scope)
    segments = path.split("/")[1:]
    raw = scope.get("raw_path")
    if isinstance(raw, bytes):
        root = scope.get("root_path", "")
        mounted = raw.decode("latin-1").split("/")[1 + root.count("/") if root else 1:]
        decoded = [unquote(segment) for segment in mounted]
        if "/" + "/".join(decoded) == path:  # else the path was rewritten: trust `path`
            segments = decoded
    while segments and not segments[-1]:
        segments.pop()
    return segments


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    value = next((v for k, v in headers if k == b"content-length"), None)
    return int(value) if value is not None and value.isdigit() else None


# -- responses ---------------------------------------------------------------------------------

def _limits_json(kind: str, subject_id: str, limits: Limits,
                 error: str | None = None) -> dict[str, Any]:
    """A subject's limits; stored limits that cannot be read are null, and `limits_error`
    says why (PUT replaces them)."""
    if error is not None:
        return {"object": "limits", "kind": kind, "subject_id": subject_id, "limits": None,
                "limits_error": error}
    return {"object": "limits", "kind": kind, "subject_id": subject_id,
            "limits": limits.to_json()}


def _shown(key_id: str) -> str:
    # Someone may paste a plaintext key where an id belongs: never echo it back.
    if key_id.startswith(KEY_PREFIX) or len(key_id) > 128 or not key_id.isprintable():
        return "(not shown)"
    return repr(key_id)


def _loggable_path(path: str) -> str:
    # Someone may paste a plaintext key into the URL: what follows the prefix is not logged.
    return _PASTED_KEY.sub(KEY_PREFIX + "…", path)


def _from_config(public: dict[str, Any]) -> dict[str, Any]:
    """A key or limits the config module declares, as the admin API shows them."""
    return {**public, "source": "config"}


def _check_project(project: str) -> None:
    try:
        check_project(project)
    except ValueError as exc:
        raise GatewayError(400, f"Invalid project: {exc}.", param="project",
                           code="invalid_parameter") from None


_PAGE, _PAGE_MAX = 100, 1000  # keys a listing gives by default, and at most


# The query parameters each handler takes; every other route takes none.
_QUERY_PARAMS = {"_list_keys": ("project", "status", "limit", "after"),
                 "_list_limits": ("kind",)}


def _no_key(key_id: str) -> GatewayError:
    return GatewayError(404, f"No key with id {_shown(key_id)}.", code="key_not_found")


def _no_limits(kind: str, subject_id: str) -> GatewayError:
    return GatewayError(404, f"No limits are stored for {kind} {subject_id!r}.",
                        code="limits_not_found")


def _too_large(max_body_bytes: int) -> GatewayError:
    return GatewayError(413, f"The request body exceeds {max_body_bytes} bytes.",
                        code="request_too_large")


async def _decline_non_http(scope: Scope, receive: Receive, send: Send) -> None:
    """Lifespan is acknowledged (the store's owner starts it); websockets are refused."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    elif scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1003})
