"""Virtual keys: generation, hashing and the record a key store keeps (pure logic, no I/O).

A virtual key is shown to its owner once; the gateway keeps only its SHA-256 and finds a key
by that hash. The key's `id` is public (safe in logs, URLs and metering records).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from mypy_extensions import mypyc_attr

from gateway.config import ConfigError, env_name, env_name_shown
from gateway.policy import Limits, given, model_allowed

KEY_PREFIX = "sk-sg-"
KEY_ID_PREFIX = "key_"
MIN_ENV_KEY_CHARS = 16
MAX_NAME_CHARS = 128
MAX_CUSTOMER_CHARS = 256
MAX_METADATA_BYTES = 16_384
EXPIRY_MIN = datetime(1970, 1, 1, tzinfo=UTC)
EXPIRY_MAX = datetime(9999, 1, 1, tzinfo=UTC)

# The fields an operator may change on an existing key (`KeyStore.update`).
UPDATABLE_FIELDS = frozenset(
    {"allowed_models", "expires_at", "disabled", "require_customer", "metadata", "limits"})

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def generate_key() -> str:
    """A new plaintext virtual key: "sk-sg-" and 32 random bytes, URL-safe base64."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    """The SHA-256 hex digest of a key: the only form in which keys are stored or looked up."""
    return hashlib.sha256(key.encode()).hexdigest()


def key_hint(key: str) -> str:
    """What listings show instead of the key: "sk-sg-…" and its last 4 characters."""
    return KEY_PREFIX + "…" + key[-4:]


def new_key_id() -> str:
    return KEY_ID_PREFIX + secrets.token_hex(8)


def is_key_hash(value: object) -> bool:
    return isinstance(value, str) and _SHA256_HEX.fullmatch(value) is not None


@dataclass(frozen=True, slots=True)
class VirtualKey:
    """One virtual key as a key store holds it (never the plaintext)."""

    id: str
    key_hash: str = field(repr=False)  # not a credential, but no reason to spread it
    hint: str
    project: str
    allowed_models: tuple[str, ...] = ()  # names or fnmatch globs; empty means every model
    expires_at: datetime | None = None
    disabled: bool = False
    require_customer: bool = False
    metadata: dict[str, Any] = field(default_factory=dict)
    limits: Limits = field(default_factory=Limits)
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    revoked_at: datetime | None = None
    # Why the stored limits cannot be read (then `limits` is empty and must not be applied:
    # the auth layer refuses the key's requests until the operator replaces them).
    limits_error: str | None = None
    # The id its limits, spend and usage are kept under (None: its own): a key made by a
    # rotation keeps the account of the key it replaced, so a rotation grants no budget or
    # rate limit afresh (the first key of the line's id).
    account: str | None = None

    @property
    def account_id(self) -> str:
        return self.account if self.account is not None else self.id

    def allows_model(self, name: str) -> bool:
        return model_allowed(self.allowed_models, name)

    def usable(self, now: datetime | None = None) -> str | None:
        """None when the key may be used at `now` (default: the current time, read only for a
        key that expires), else why not: revoked, disabled, expired."""
        if self.revoked_at is not None:
            return "revoked"
        if self.disabled:
            return "disabled"
        if self.expires_at is not None and (now or datetime.now(UTC)) >= self.expires_at:
            return "expired"
        return None

    def to_public_json(self, now: datetime | None = None) -> dict[str, Any]:
        """The key for the admin API and logs: everything but the hash. Limits that cannot
        be read are null, and `limits_error` says why."""
        public: dict[str, Any] = {
            "id": self.id,
            "object": "virtual_key",
            "account": self.account_id,
            "hint": self.hint,
            "project": self.project,
            "status": self.usable(now or datetime.now(UTC)) or "active",
            "allowed_models": list(self.allowed_models),
            "expires_at": _iso(self.expires_at),
            "disabled": self.disabled,
            "require_customer": self.require_customer,
            "metadata": self.metadata,
            "limits": self.limits.to_json(),
            "created_at": _iso(self.created_at),
            "revoked_at": _iso(self.revoked_at),
        }
        if self.limits_error is not None:
            public.update(limits=None, limits_error=self.limits_error)
        return public


@mypyc_attr(native_class=False)  # config-time, as gateway.policy.Budget
@dataclass(frozen=True, slots=True)
class StaticKey:
    """A key declared in the config module, by hash or by the env var holding it.

    Give exactly one of `key_hash` (the SHA-256 hex of the key, e.g. from
    `python -c "from middleware.auth.keys import hash_key; print(hash_key('sk-sg-...'))"`)
    or `key_env` (the name of an environment variable holding the plaintext, which starts
    with "sk-sg-", hashed here).
    A plaintext key is never written in a config module. Without `id`, a stable one is
    derived from the hash, so every gateway process reports the same id.
    """

    project: str
    key_hash: str | None = field(default=None, kw_only=True)
    key_env: str | None = field(default=None, kw_only=True, repr=False)
    allowed_models: tuple[str, ...] = field(default=(), kw_only=True)
    expires_at: datetime | None = field(default=None, kw_only=True)
    require_customer: bool = field(default=False, kw_only=True)
    metadata: Mapping[str, Any] | None = field(default=None, kw_only=True)
    limits: Limits | None = field(default=None, kw_only=True)
    id: str | None = field(default=None, kw_only=True)
    hint: str = field(default=KEY_PREFIX + "…", init=False)

    def __post_init__(self) -> None:
        if (self.key_hash is None) == (self.key_env is None):
            raise ValueError(f"StaticKey for project {self.project!r} needs exactly one of "
                             "key_hash= (the key's SHA-256 hex) or key_env= (an env var name)")
        if self.key_env is not None:
            try:
                name = env_name(self.key_env, f"StaticKey for project {self.project!r}: key_env")
            except ConfigError as exc:
                raise ValueError(str(exc).rstrip(".")) from None
            shown = name if env_name_shown(name) else f"named by the key_env of {self.project!r}"
            plaintext = (os.environ.get(name) or "").strip()  # (a trailing newline)
            if not plaintext:
                raise ValueError(f"environment variable {shown} (a virtual key for "
                                 f"project {self.project!r}) is not set")
            if len(plaintext) < MIN_ENV_KEY_CHARS:
                raise ValueError(f"the key in environment variable {shown} is shorter "
                                 f"than {MIN_ENV_KEY_CHARS} characters")
            # Only a virtual key: the admin token (never "sk-sg-...") must not open the API too.
            if not plaintext.startswith(KEY_PREFIX):
                raise ValueError(f"the key in environment variable {shown} must start "
                                 f"with {KEY_PREFIX!r} (a virtual key, not a token or a "
                                 "provider's key)")
            object.__setattr__(self, "key_hash", hash_key(plaintext))
            object.__setattr__(self, "hint", key_hint(plaintext))
        elif not is_key_hash(self.key_hash):
            # The value is not echoed: it may be a plaintext key pasted in the wrong place.
            raise ValueError(f"StaticKey for project {self.project!r}: key_hash must be 64 "
                             "lowercase hex characters (the SHA-256 of the key)")
        fields = check_key_fields(
            allowed_models=given(self, "allowed_models"), expires_at=given(self, "expires_at"),
            require_customer=given(self, "require_customer"),
            metadata=given(self, "metadata") or {}, limits=given(self, "limits") or Limits())
        check_project(given(self, "project"))
        for name, value in fields.items():
            object.__setattr__(self, name, value)
        key_id = given(self, "id")
        if key_id is not None and not (isinstance(key_id, str) and _is_name(key_id)):
            raise ValueError(f"StaticKey id {key_id!r} must be 1-{MAX_NAME_CHARS} printable "
                             "characters without spaces or '/'")

    def to_virtual_key(self) -> VirtualKey:
        assert self.key_hash is not None  # set or checked in __post_init__
        key_id = self.id or KEY_ID_PREFIX + hashlib.sha256(
            b"sluicegate static key id:" + self.key_hash.encode()).hexdigest()[:16]
        return VirtualKey(
            id=key_id, key_hash=self.key_hash, hint=self.hint, project=self.project,
            allowed_models=self.allowed_models, expires_at=self.expires_at,
            require_customer=self.require_customer, metadata=dict(self.metadata or {}),
            limits=self.limits or Limits(), created_at=datetime(1970, 1, 1, tzinfo=UTC))


# -- checks shared by the stores and the admin API --------------------------------------------

def check_project(project: object) -> str:
    """A project name: 1-128 printable characters, no spaces and no '/' (customer ids are
    "<project>/<customer>")."""
    if not isinstance(project, str) or not _is_name(project):
        raise ValueError(f"project must be 1-{MAX_NAME_CHARS} printable characters without "
                         "spaces or '/'")
    return project


def is_customer(value: object) -> bool:
    """Whether `value` is a customer as the auth layer names one (its `_clean_customer`: the
    header or `user` field, stripped, of 1-256 printable characters; spaces and '/' are
    allowed), so that every customer it serves can be given limits."""
    return (isinstance(value, str) and 0 < len(value) <= MAX_CUSTOMER_CHARS
            and value.isprintable() and value == value.strip())


def check_subject_id(kind: str, subject_id: object) -> str:
    """A subject id for per-subject limits: a project name, or "<project>/<customer>"."""
    if kind == "project":
        return check_project(subject_id)
    if kind == "customer":
        if isinstance(subject_id, str) and "/" in subject_id:
            project, customer = subject_id.split("/", 1)
            if _is_name(project) and is_customer(customer):
                return subject_id
        raise ValueError("a customer id is \"<project>/<customer>\": a project name, then the "
                         f"customer as requests name it, 1-{MAX_CUSTOMER_CHARS} printable "
                         "characters without leading or trailing spaces")
    raise ValueError(f"limits are stored per project or customer, not per {kind!r}")


def is_key_id(value: object) -> bool:
    """Whether `value` could be a key's id (generated, or a StaticKey's `id=`): an id that
    is not is no key, whatever a store would answer."""
    return isinstance(value, str) and _is_name(value)


def check_key_fields(**fields: Any) -> dict[str, Any]:
    """Checks and normalises key settings (the `UPDATABLE_FIELDS`); raises ValueError or
    TypeError."""
    unknown = set(fields) - UPDATABLE_FIELDS
    if unknown:
        raise ValueError(f"unknown key field(s): {', '.join(sorted(unknown))}")
    out: dict[str, Any] = {}
    for name, value in fields.items():
        out[name] = _CHECKS[name](value)
    return out


def check_storable_key_fields(**fields: Any) -> dict[str, Any]:
    """`check_key_fields`, and what PostgreSQL can hold: an `expires_at` from 1970 to the end
    of 9998 (UTC). The key stores and the admin API check this; a static key, kept only in
    memory, may expire at any time UTC can express (9999-12-31 is a common "never")."""
    out = check_key_fields(**fields)
    expires_at = out.get("expires_at")
    # Bounded so that it converts back to any session time zone PostgreSQL may read it in
    # (a year-9999 expiry read at +01:00 is year 10000, which psycopg refuses).
    if expires_at is not None and not EXPIRY_MIN <= expires_at < EXPIRY_MAX:
        raise ValueError(f"expires_at must fall in the years {EXPIRY_MIN.year} to "
                         f"{EXPIRY_MAX.year - 1} (UTC)")
    return out


def _check_models(value: object) -> tuple[str, ...]:
    # (not any iterable: an object's keys, a set's arbitrary order, are not a list)
    if isinstance(value, str | Mapping) or not isinstance(value, Iterable):
        raise TypeError("allowed_models must be a list of model names or globs")
    models = tuple(value)
    if any(not isinstance(m, str) or not m or len(m) > 256 or not m.isprintable()
           for m in models):
        raise ValueError("allowed_models must hold names of 1-256 printable characters")
    return models


def _check_expiry(value: object) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, datetime) or value.utcoffset() is None:
        raise ValueError("expires_at must be a date and time with a timezone, or null")
    try:
        return value.astimezone(UTC)
    except OverflowError:  # 9999-12-31T23:00-05:00 is in year 10000 in UTC
        raise ValueError("expires_at must fall in the years 1 to 9999 in UTC") from None


def _check_bool(name: str) -> Any:
    def check(value: object) -> bool:
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be true or false")
        return value
    return check


def _check_metadata(value: object) -> dict[str, Any]:
    if not isinstance(value, Mapping) or any(not isinstance(k, str) for k in value):
        raise ValueError("metadata must be an object with string keys")
    try:  # what the stores will write: plain JSON, no NaN (PostgreSQL's jsonb refuses it)
        size = len(json.dumps(dict(value), allow_nan=False).encode())
    except (TypeError, ValueError, RecursionError):
        raise ValueError("metadata must hold only JSON values") from None
    if _holds_nul(value):  # jsonb refuses \u0000 too
        raise ValueError("metadata must not hold NUL characters")
    if _holds_wide_number(value):
        # No 64-bit JSON writer (the admin API's answers, orjson) can write it back.
        raise ValueError("metadata integers must lie between -2**63 and 2**63")
    if size > MAX_METADATA_BYTES:
        raise ValueError(f"metadata must be at most {MAX_METADATA_BYTES} bytes as JSON")
    return dict(value)


def _check_limits(value: object) -> Limits:
    if not isinstance(value, Limits):
        raise TypeError("limits must be a Limits(...) value")
    return value


_CHECKS: dict[str, Any] = {
    "allowed_models": _check_models, "expires_at": _check_expiry,
    "disabled": _check_bool("disabled"), "require_customer": _check_bool("require_customer"),
    "metadata": _check_metadata, "limits": _check_limits,
}


def _holds_nul(value: object) -> bool:
    if isinstance(value, str):
        return "\0" in value
    if isinstance(value, Mapping):
        return any(_holds_nul(k) or _holds_nul(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(_holds_nul(item) for item in value)
    return False


def fits_64_bits(value: int) -> bool:
    """Whether a JSON writer of 64-bit integers (orjson, the admin API's answers) can write
    `value`."""
    return -2 ** 63 <= value < 2 ** 63


def _holds_wide_number(value: object) -> bool:
    # (only integers: a float such as 1e20, which jsonb keeps as an integer too, is read back
    # as the float it was: PostgresKeyStore's `_narrowed`)
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return not fits_64_bits(value)
    if isinstance(value, Mapping):
        return any(_holds_wide_number(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_holds_wide_number(item) for item in value)
    return False


def _is_name(value: str) -> bool:
    return (0 < len(value) <= MAX_NAME_CHARS and value.isprintable()
            and "/" not in value and not any(c.isspace() for c in value))


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None
