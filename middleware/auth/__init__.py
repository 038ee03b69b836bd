"""The auth layer: virtual keys to principals, model permissions, and the admin API.

It resolves the caller's key (`Authorization: Bearer`, `x-api-key` or `x-goog-api-key`) to a
`gateway.policy.Principal` in `RequestContext.principal`: the key's public id, project,
customer (the `X-Sluicegate-Customer` header, else the OpenAI `user` field or Anthropic's
`metadata.user_id`), allowed models and the limits stored for the key, its project and its
customer. Unknown, revoked, disabled and expired keys get 401; a model the key may not use
gets 403; both in the caller's API shape. The key itself is never logged or echoed, and
client credentials are stripped from the request before any layer below sees it.

Keys come from the config module (`keys=[StaticKey(...)]`), from PostgreSQL
(`store=PostgresKeyStore(dsn)`), or both (static keys are looked up first). Store lookups are
cached in process; a change made on any instance reaches every instance's cache through
PostgreSQL NOTIFY within about a second. With `admin_token_env`, the layer also serves the
admin API under `/admin/keys` and `/admin/limits`.

A key's own usage (`GET /v1/usage/self`) has no `RequestContext`: the layer checks the key
there too (same headers, same 401s), strips it, and puts `{"key_id", "project"}` in the scope
under `gateway.context.PRINCIPAL_KEY` for the metering layer, which answers.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from gateway.config import (
    ConfigError,
    GatewayConfig,
    env_name,
    env_name_shown,
    is_header_name,
    is_postgres_dsn,
)
from gateway.context import (
    CONTEXT_KEY,
    PRINCIPAL_KEY,
    SELF_USAGE_PATH,
    RequestContext,
    ScopePrincipal,
)
from gateway.errors import GatewayError
from gateway.ingress import is_models_path
from gateway.kernel import ASGIApp, Receive, Scope, Send, degraded, route_path
from gateway.policy import Limits, Principal, downgrade_targets
from middleware.auth.admin import AdminAPI
from middleware.auth.keys import StaticKey, VirtualKey, check_subject_id, hash_key
from middleware.auth.store import (
    UNKNOWN,
    CachedKeys,
    KeyStore,
    KeyStoreUnavailable,
    PostgresKeyStore,
    StaticKeyStore,
    UnreadableLimits,
)

__all__ = ["AuthMiddleware", "PostgresKeyStore", "StaticKey"]

logger = logging.getLogger("sluicegate.auth")

_CREDENTIAL_HEADERS = frozenset({b"authorization", b"x-api-key", b"x-goog-api-key"})
_DEGRADED_LOG_EVERY_S = 60.0
_PRINCIPALS_MAX = 10_000  # remembered (key, customer) principals; the memo starts over when full
_REASONS = {
    "revoked": "This API key has been revoked.",
    "disabled": "This API key is disabled.",
    "expired": "This API key has expired.",
}


class AuthMiddleware:
    """Authenticates every API request with a virtual key (see the module docstring)."""

    # (ClassVar: compiled, a native class's plain attribute is its instances', and the
    # kernel reads these on the class)
    passes_json_through: ClassVar[bool] = True  # a JSON answer from below goes on as is
    identifies_caller: ClassVar[bool] = True  # quota and cache go under it (app.check_order)
    # it parses the body once the key is checked (gateway.kernel.body_after_auth)
    loads_body: ClassVar[bool] = True

    def __init__(
        self,
        app: ASGIApp,
        *,
        # (object items, checked below: compiled, a StaticKey item type refuses a str with
        # mypyc's own words)
        keys: Sequence[object] = (),
        # (object, checked below: a DSN string becomes a PostgresKeyStore; see also
        # cache_max_keys)
        store: object = None,
        limits: Mapping[tuple[str, str], Limits] | None = None,
        admin_token_env: str | None = None,
        customer_header: object = "x-sluicegate-customer",
        cache_ttl_s: float = 30.0,
        stale_max_s: float = 3600.0,
        # (object, checked below: compiled, an `int` parameter refuses a float with a
        # TypeError that names no option)
        cache_max_keys: object = 100_000,
        cache_max_unknown_keys: object = 10_000,
        cache_max_customers_without_limits: object = 100_000,
        lookup_timeout_s: float = 1.0,
    ) -> None:
        self.app = app
        for name, value in (("cache_ttl_s", cache_ttl_s), ("stale_max_s", stale_max_s),
                            ("lookup_timeout_s", lookup_timeout_s)):
            if isinstance(value, bool) or not isinstance(value, int | float) \
                    or not 0 < value < float("inf"):
                raise ConfigError(f"AuthMiddleware {name} must be a positive number of "
                                  f"seconds, not {value!r}.")
        max_keys = _whole_count("cache_max_keys", cache_max_keys)
        max_unknown_keys = _whole_count("cache_max_unknown_keys", cache_max_unknown_keys)
        max_without_limits = _whole_count("cache_max_customers_without_limits",
                                          cache_max_customers_without_limits)
        store = _key_store(store)
        customer_header = _header_name(customer_header)
        _check_limits_subjects(limits)
        if not keys and store is None:
            raise ConfigError("AuthMiddleware needs keys=[StaticKey(...)] or "
                              "store=PostgresKeyStore(dsn) (remove the layer to serve "
                              "without authentication).")
        static_keys: list[StaticKey] = []
        for key in keys:
            if not isinstance(key, StaticKey):
                # (its type, never its value: keys=[os.environ["SLUICEGATE_API_KEY"]] is
                # the key itself)
                raise ConfigError("AuthMiddleware keys must be StaticKey(...) objects, such "
                                  "as StaticKey('team', key_env='TEAM_KEY'), not "
                                  f"{type(key).__name__} (a key is never written in the "
                                  "config).")
            static_keys.append(key)
        # (limits without keys too: a PostgreSQL store's keys under the config's limits)
        self.static = StaticKeyStore(static_keys, limits=dict(limits or {})) \
            if keys or limits else None
        # (the static store's own dictionaries, read on every request: see StaticKeyStore)
        self._static_keys: dict[str, VirtualKey] = self.static.by_hash if self.static else {}
        self._static_limits: dict[tuple[str, str], Limits] = \
            self.static.limits if self.static else {}
        self.store = store
        # `stale_max_s`: how long a known key keeps working from the cache while the store
        # cannot be asked (an outage, or a partition from PostgreSQL, during which a revoke
        # made through another instance cannot reach this one): availability against how
        # long a revoked key may go on working there. Down to `cache_ttl_s` at the least.
        # `cache_max_keys` bounds the keys (and limits) kept, `cache_max_unknown_keys` the
        # keys the store does not have, apart: made-up keys never push a known one out;
        # `cache_max_customers_without_limits` the customers known to have none, apart too
        # (a caller may name any number of them).
        # `lookup_timeout_s`: how long a request waits on the store before it is answered
        # as in an outage (a hung PostgreSQL: see CachedKeys).
        self.cache = CachedKeys(store, ttl_s=cache_ttl_s,
                                stale_max_s=max(stale_max_s, cache_ttl_s),
                                max_entries=max_keys, max_unknown_keys=max_unknown_keys,
                                max_customers_without_limits=max_without_limits,
                                lookup_timeout_s=lookup_timeout_s) \
            if store is not None else None
        self.customer_header = customer_header.lower().encode()
        self._degraded_logged_at = -_DEGRADED_LOG_EVERY_S  # (a warning a minute at most)
        # (id(key), customer) -> (key, project limits, customer limits, Principal)
        self._principals: dict[tuple[int, str | None],
                               tuple[VirtualKey, Limits | None, Limits | None, Principal]] = {}
        self.admin: AdminAPI | None = None
        if admin_token_env is not None:
            # (stripped: a secret mounted from a file often ends in a newline, which no
            # HTTP header can carry, so the token could never be matched)
            name = env_name(admin_token_env, "AuthMiddleware admin_token_env")
            shown = f"admin_token_env={name!r}" if env_name_shown(name) else "admin_token_env"
            token = os.environ.get(name, "").strip()
            if not token:
                raise ConfigError(f"AuthMiddleware {shown} names an environment variable that "
                                  "is not set.")
            if token.startswith("sk-sg-") or (
                    self.static is not None and self.static.find_now(hash_key(token))):
                raise ConfigError(f"AuthMiddleware {shown} holds a virtual key: the admin token "
                                  "must be a secret of its own.")
            self.admin = AdminAPI(store or self.static, token=token,  # type: ignore[arg-type]
                                  config=self.static if store is not None else None)

    def check_config(self, config: GatewayConfig) -> None:
        """The config's keys and limits downgrade only to models the config has (a typo
        would leave the overflow a refusal, silently); the admin API then refuses to store
        limits that downgrade to another."""
        if self.admin is not None:
            self.admin.models = frozenset(config.models)
        if self.static is None:
            return
        declared = [(f"key {key.id}", key.limits) for key in self.static.by_hash.values()]
        declared += [(f"{kind} {subject!r}", limits)
                     for (kind, subject), limits in self.static.limits.items()]
        for where, limits in declared:
            for target in downgrade_targets(limits):
                if target not in config.models:
                    raise ConfigError(f"{config.path}: AuthMiddleware: the limits of {where} "
                                      f"downgrade to {target!r}, not a model in `models`.")

    # -- lifecycle (called by the kernel) ----------------------------------------------------

    async def startup(self) -> None:
        if self.store is not None:
            await self.store.startup()

    async def shutdown(self) -> None:
        if self.store is not None:
            await self.store.shutdown()

    async def check_ready(self) -> dict[str, str]:
        if self.store is None:
            return {}
        report = await self.store.check_ready()
        return degraded(report, "serving known keys from the cache")

    # -- requests ----------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ctx: RequestContext | None = scope.get(CONTEXT_KEY)  # (`find_request_context`)
        if ctx is None:
            path = route_path(scope)
            if path == SELF_USAGE_PATH or is_models_path(path):
                key = await self._find(_take_credential(scope))
                scope[PRINCIPAL_KEY] = ScopePrincipal(key_id=key.account_id, project=key.project,
                                                      allowed_models=key.allowed_models)
                await self.app(scope, receive, send)
            elif self.admin is not None and self.admin.handles(path):
                await self.admin(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        credential = _take_credential(scope)
        ctx.headers = scope["headers"]
        key = await self._find(credential)
        if ctx.body_parser is not None:  # left unparsed for us (gateway.kernel.body_after_auth)
            try:
                ctx.parse_body()
            except GatewayError:  # a bad body of a known caller: its record names the key
                ctx.principal = Principal(key_id=key.account_id, project=key.project,
                                          allowed_models=key.allowed_models,
                                          metadata=key.metadata)
                raise
        ctx.principal = await self._principal(key, ctx)
        await self.app(scope, receive, send)

    async def _find(self, credential: str | None) -> VirtualKey:
        if not credential:
            raise GatewayError(401, "Missing API key: send it as 'Authorization: Bearer <key>' "
                                    "or in the 'x-api-key' header.", code="missing_api_key")
        key_hash = hash_key(credential)
        # Any: it may hold the UNKNOWN sentinel (compiled, a typed local would refuse it)
        key: Any = self._static_keys.get(key_hash)  # (StaticKeyStore.find_now, inline)
        if key is None and self.cache is not None:
            # From memory while the cache holds it fresh; the store is awaited otherwise.
            key = self.cache.find_now(key_hash)
            if key is UNKNOWN:
                try:
                    key = await self.cache.find(key_hash)
                except KeyStoreUnavailable:
                    raise _store_unavailable() from None
        if key is None:
            raise GatewayError(401, "Invalid API key.", code="invalid_api_key")
        found: VirtualKey = key
        reason = found.usable()  # (reads the clock only for a key that expires)
        if reason is not None:
            raise GatewayError(401, _REASONS.get(reason, "This API key cannot be used."),
                               code=f"key_{reason}")
        return found

    async def _principal(self, key: VirtualKey, ctx: RequestContext) -> Principal:
        if not key.allows_model(ctx.model):
            raise GatewayError(403, f"This API key may not use the model '{ctx.model}'.",
                               param="model", code="model_not_allowed")
        customer = self._customer(ctx)
        if customer is None and key.require_customer:
            raise _customer_required(ctx.api_format)
        ctx.customer = customer
        if key.limits_error is not None:
            logger.error("auth: the limits stored for key %s cannot be read (%s); its requests "
                         "are refused until they are replaced", key.id, key.limits_error)
            raise _limits_unreadable()
        # Static limits first, without a coroutine each (the store's are awaited only when
        # there is a store and the config has none).
        static = self._static_limits  # (StaticKeyStore.subject_limits_now, inline)
        project_limits = static.get(("project", key.project))
        if project_limits is None and self.cache is not None:
            project_limits = await self._stored_limits("project", key.project)
        customer_limits = None
        if customer:
            subject = f"{key.project}/{customer}"
            customer_limits = static.get(("customer", subject))
            if customer_limits is None and self.cache is not None:
                customer_limits = await self._stored_customer_limits(key.project, subject, ctx)
                # (learnt from requests naming customers only: the others need not pay)
                if self.cache.has_customer_limits_now(key.project) is UNKNOWN:
                    await self._learn_whether_customers_have_limits(key.project)
        # One Principal per key, customer and limits while none of them changes: making one
        # (a frozen dataclass) cost more than the rest of this method, and the quota layer
        # keys its compiled limits by it. A key or limit changed by the admin API is a new
        # object, so it misses here.
        memo_key = (id(key), customer)
        found = self._principals.get(memo_key)
        if found is not None and found[0] is key and found[1] is project_limits \
                and found[2] is customer_limits:
            return found[3]
        limits: dict[str, Limits] = {}
        if not key.limits.empty:
            limits["key"] = key.limits
        for kind, subject_limits in (("project", project_limits),
                                     ("customer", customer_limits)):
            if subject_limits is not None and not subject_limits.empty:
                limits[kind] = subject_limits
        principal = Principal(key_id=key.account_id, project=key.project, customer=customer,
                              allowed_models=key.allowed_models, metadata=key.metadata,
                              limits=limits)
        if len(self._principals) >= _PRINCIPALS_MAX:
            self._principals.clear()
        self._principals[memo_key] = (key, project_limits, customer_limits, principal)
        return principal

    async def _stored_limits(self, kind: str, subject: str) -> Limits | None:
        assert self.cache is not None
        limits: Any = self.cache.subject_limits_now(kind, subject)  # (while fresh; or UNKNOWN)
        if limits is not UNKNOWN:
            fresh: Limits | None = limits
            return fresh
        try:
            return await self.cache.subject_limits(kind, subject)
        except KeyStoreUnavailable:
            raise _store_unavailable() from None
        except UnreadableLimits as exc:
            logger.error("auth: %s; the requests they govern are refused until they are "
                         "replaced", exc)
            raise _limits_unreadable() from None

    async def _stored_customer_limits(self, project: str, subject: str,
                                      ctx: RequestContext) -> Limits | None:
        """A customer's stored limits; while the store is down, for a customer not looked up
        recently, none, if no customer of the project had limits when last asked.

        Most customers are new ids (an app's end users) without limits of their own: the
        key's and the project's limits, known from the cache, still bound them, so refusing
        every new end user for as long as PostgreSQL is away would turn the outage into
        theirs. But once a project stores limits for some of its customers, this one may be
        among them, and serving it without its budget could overspend it: that request is
        refused (503), as it is when nothing is known of the project.
        """
        try:
            return await self._stored_limits("customer", subject)
        except GatewayError as exc:
            if exc.code != "key_store_unavailable" or not await self._no_customer_limits(project):
                raise
        ctx.response_headers.append((b"x-sluicegate-degraded", b"customer-limits-unknown"))
        now = time.monotonic()
        if now - self._degraded_logged_at >= _DEGRADED_LOG_EVERY_S:
            self._degraded_logged_at = now
            logger.warning("auth: the key store is unavailable; customers not seen recently "
                           "(of project %s, ...) are served under their key's and project's "
                           "limits, as no customer of their project had limits when last "
                           "asked", project)
        return None

    async def _no_customer_limits(self, project: str) -> bool:
        assert self.cache is not None
        try:
            return not await self.cache.has_customer_limits(project)
        except KeyStoreUnavailable:  # not known either: maybe some
            return False

    async def _learn_whether_customers_have_limits(self, project: str) -> None:
        # Looked up while the store answers, so that it is known when it no longer does.
        assert self.cache is not None
        try:
            await self.cache.has_customer_limits(project)
        except KeyStoreUnavailable:
            pass  # only a request naming a customer needs it (_stored_customer_limits)

    def _customer(self, ctx: RequestContext) -> str | None:
        for name, value in ctx.headers:
            if name == self.customer_header and value:
                return _clean_customer(_header_text(value))
        body = ctx.body
        user, field = body.get("user"), "user"
        if user is None and isinstance(body.get("metadata"), dict):
            user, field = body["metadata"].get("user_id"), "metadata.user_id"
        if user is None or user == "":
            return None
        if not isinstance(user, str):  # (a number or an object named nobody: served without
            # the customer's limits; OpenAI and Anthropic refuse it too)
            raise GatewayError(400, f"'{field}' must be a string: the end user's id.",
                               param=field, code="invalid_customer")
        return _clean_customer(user)


def _store_unavailable() -> GatewayError:
    return GatewayError(503, "The key store is unavailable; try again shortly.",
                        code="key_store_unavailable")


def _key_store(store: object) -> KeyStore | None:
    """The `store` option: a KeyStore, or a PostgreSQL DSN (as MeteringMiddleware's store)
    for a PostgresKeyStore on it; anything else is a ConfigError naming the option (its
    value never shown: a DSN holds a password)."""
    if isinstance(store, str):
        if not is_postgres_dsn(store):
            raise ConfigError("AuthMiddleware store must be a PostgreSQL DSN or a key store "
                              "such as PostgresKeyStore(dsn).")
        return PostgresKeyStore(store)
    if store is not None and not callable(getattr(store, "find", None)):
        raise ConfigError(f"AuthMiddleware store must be a key store such as "
                          f"PostgresKeyStore(dsn) or a PostgreSQL DSN, not a "
                          f"{type(store).__name__}.")
    found: KeyStore | None = store  # type: ignore[assignment]
    return found


def _header_name(value: object) -> str:
    """The `customer_header` option: an HTTP header name (RFC 9110 token), lower-cased."""
    if not is_header_name(value):
        raise ConfigError("AuthMiddleware customer_header must be an HTTP header name such as "
                          "'x-sluicegate-customer'.")
    return value


def _check_limits_subjects(limits: object) -> None:
    """The `limits` option: {(kind, subject): Limits(...)}, kind "project" or "customer"."""
    if limits is None:
        return
    if not isinstance(limits, Mapping):
        raise ConfigError(f"AuthMiddleware limits must be a dict such as {{('project', "
                          f"'acme'): Limits(rpm=60)}}, not a {type(limits).__name__}.")
    for subject, value in limits.items():
        if not (isinstance(subject, tuple) and len(subject) == 2
                and all(isinstance(part, str) for part in subject)):
            raise ConfigError("AuthMiddleware limits are keyed by (kind, subject) pairs such "
                              "as ('project', 'acme') or ('customer', 'acme/alice'), not "
                              f"{subject!r}.")
        try:
            check_subject_id(subject[0], subject[1])
        except ValueError as exc:
            raise ConfigError(f"AuthMiddleware limits {subject!r}: {exc}.") from None
        if not isinstance(value, Limits):
            raise ConfigError(f"AuthMiddleware limits of {subject!r} must be Limits(...), "
                              f"not a {type(value).__name__}.")


def _whole_count(name: str, value: object) -> int:
    """An AuthMiddleware count option, 1 or more (ConfigError otherwise, naming it)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"AuthMiddleware {name} must be a whole number, 1 or more, "
                          f"not {value!r}.")
    return value


def _customer_required(api_format: str) -> GatewayError:
    # The body's field that names the end user in the caller's API (Anthropic has no `user`).
    field = "metadata.user_id" if api_format == "anthropic" else "user"
    return GatewayError(400, "This API key requires the end user to be named: send the "
                             f"'X-Sluicegate-Customer' header or the '{field}' field.",
                        param=field, code="customer_required")


def _limits_unreadable() -> GatewayError:
    # Serving the request without its budget or rate limits could overspend; the operator
    # sees the row flagged in the admin API and replaces it (PUT /admin/limits/...).
    return GatewayError(503, "The limits that apply to this request cannot be read; the "
                             "operator has been told (see the gateway log).",
                        code="limits_unreadable")


def _header_text(value: bytes) -> str:
    # UTF-8, as in the body's `user`: one end user, one id, whichever way it came. Else
    # Latin-1 (RFC 9110's obs-text), which Python's http.client, requests and Node's fetch
    # send for a str header: "café" arrives as b"caf\xe9", and is "café" here too.
    try:
        return value.decode()
    except UnicodeDecodeError:
        return value.decode("latin-1")


def _clean_customer(value: str) -> str | None:
    value = value.strip()
    if not value or len(value) > 256 or not value.isprintable():
        raise _bad_customer()
    return value


def _bad_customer() -> GatewayError:
    return GatewayError(400, "The customer id must be 1 to 256 printable characters.",
                        param="user", code="invalid_customer")


def _take_credential(scope: Scope) -> str | None:
    """Takes the client's key out of the request, so no layer or provider ever sees it."""
    credential: str | None = None
    kept = []
    for pair in scope["headers"]:
        name = pair[0]
        if name in _CREDENTIAL_HEADERS:
            if credential is None:
                value = pair[1]
                # (typed, compiled: decode, partition and lower run as C, not method calls)
                raw: bytes = value if type(value) is bytes else bytes(value)
                text = raw.decode("latin-1").strip()
                if name == b"authorization":
                    scheme, _, text = text.partition(" ")
                    text = text.strip() if scheme.lower() == "bearer" else ""
                credential = text or None
            continue
        kept.append(pair)  # (the pair itself: no new tuple for each header kept)
    scope["headers"] = kept
    return credential
