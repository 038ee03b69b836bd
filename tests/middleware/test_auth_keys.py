"""Virtual keys: generation, hashing, the key record and config-module keys (no I/O)."""
from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta, timezone

import orjson
import pytest

from gateway.errors import GatewayError
from gateway.policy import Budget, Limits
from middleware.auth import _clean_customer
from middleware.auth.keys import (
    StaticKey,
    VirtualKey,
    check_key_fields,
    check_project,
    check_storable_key_fields,
    check_subject_id,
    generate_key,
    hash_key,
    is_customer,
    is_key_hash,
    is_key_id,
    key_hint,
    new_key_id,
)

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def make_key(**overrides: object) -> VirtualKey:
    fields: dict[str, object] = {"id": "key_0123456789abcdef", "key_hash": hash_key("sk-sg-x"),
                                 "hint": "sk-sg-…abcd", "project": "acme", "created_at": NOW}
    fields.update(overrides)
    return VirtualKey(**fields)  # type: ignore[arg-type]


def test_generated_keys_are_prefixed_long_and_distinct() -> None:
    keys = {generate_key() for _ in range(200)}
    assert len(keys) == 200
    for key in keys:
        assert key.startswith("sk-sg-")
        # token_urlsafe(32): 32 random bytes are 43 base64url characters
        assert len(key) == len("sk-sg-") + 43
        assert set(key[6:]) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                                   "0123456789-_")


def test_hash_is_sha256_hex_of_the_key() -> None:
    assert hash_key("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    key = generate_key()
    assert hash_key(key) == hashlib.sha256(key.encode()).hexdigest()
    assert is_key_hash(hash_key(key))
    assert not is_key_hash(key)
    assert not is_key_hash(hash_key(key).upper())


def test_hint_shows_only_the_last_four_characters() -> None:
    assert key_hint("sk-sg-abcdefghijklmnopWXYZ") == "sk-sg-…WXYZ"
    key = generate_key()
    assert key[6:-4] not in key_hint(key)


def test_key_ids_are_public_and_distinct() -> None:
    ids = {new_key_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(i.startswith("key_") and len(i) == 20 for i in ids)


@pytest.mark.parametrize(("allowed", "model", "expected"), [
    ((), "anything", True),
    (("gpt-4o",), "gpt-4o", True),
    (("gpt-4o",), "gpt-4o-mini", False),
    (("gpt-4o*",), "gpt-4o-mini", True),
    (("claude-*", "gemini-?.0"), "gemini-2.0", True),
    (("claude-*", "gemini-?.0"), "gemini-2.5", False),
    (("GPT-4o",), "gpt-4o", False),  # case matters, on every platform
    (("[gc]*",), "claude", True),
])
def test_allows_model(allowed: tuple[str, ...], model: str, expected: bool) -> None:
    assert make_key(allowed_models=allowed).allows_model(model) is expected


def test_usable_gives_the_first_reason() -> None:
    assert make_key().usable(NOW) is None
    assert make_key(expires_at=NOW + timedelta(seconds=1)).usable(NOW) is None
    assert make_key(expires_at=NOW).usable(NOW) == "expired"
    assert make_key(disabled=True).usable(NOW) == "disabled"
    assert make_key(revoked_at=NOW, disabled=True, expires_at=NOW).usable(NOW) == "revoked"
    assert make_key(disabled=True, expires_at=NOW).usable(NOW) == "disabled"


def test_usable_without_a_time_reads_the_clock_for_a_key_that_expires() -> None:
    now = datetime.now(UTC)
    assert make_key().usable() is None
    assert make_key(expires_at=now - timedelta(seconds=1)).usable() == "expired"
    assert make_key(expires_at=now + timedelta(hours=1)).usable() is None
    assert make_key(revoked_at=now).usable() == "revoked"


def test_public_json_never_holds_the_hash() -> None:
    key = make_key(allowed_models=("gpt-*",), metadata={"team": "ml"},
                   limits=Limits(rpm=60, budgets=(Budget("10"),)), expires_at=NOW)
    public = key.to_public_json(NOW - timedelta(days=1))
    assert "key_hash" not in public
    assert key.key_hash not in orjson.dumps(public).decode()
    assert public == {
        "id": "key_0123456789abcdef", "object": "virtual_key", "account": "key_0123456789abcdef",
        "hint": "sk-sg-…abcd",
        "project": "acme", "status": "active", "allowed_models": ["gpt-*"],
        "expires_at": "2026-03-01T12:00:00+00:00", "disabled": False,
        "require_customer": False, "metadata": {"team": "ml"},
        "limits": Limits(rpm=60, budgets=(Budget("10"),)).to_json(),
        "created_at": "2026-03-01T12:00:00+00:00", "revoked_at": None,
    }
    assert key.to_public_json(NOW)["status"] == "expired"


def test_static_key_by_hash() -> None:
    key_hash = hash_key("sk-sg-operator-made-this-one")
    static = StaticKey("acme", key_hash=key_hash, allowed_models=["gpt-*"],  # type: ignore[arg-type]
                       limits=Limits(rpm=5), metadata={"a": 1})
    key = static.to_virtual_key()
    assert key.key_hash == key_hash
    assert key.project == "acme"
    assert key.allowed_models == ("gpt-*",)
    assert key.limits == Limits(rpm=5)
    assert key.metadata == {"a": 1}
    assert key.usable(NOW) is None
    # the id is derived from the hash, the same in every process, and does not reveal it
    assert key.id == StaticKey("acme", key_hash=key_hash).to_virtual_key().id
    assert key.id.startswith("key_") and key.id[4:] not in key_hash
    assert StaticKey("acme", key_hash=key_hash, id="ops").to_virtual_key().id == "ops"


def test_static_key_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ACME_KEY", "sk-sg-from-the-environment-1234")
    static = StaticKey("acme", key_env="ACME_KEY")
    key = static.to_virtual_key()
    assert key.key_hash == hash_key("sk-sg-from-the-environment-1234")
    assert key.hint == "sk-sg-…1234"
    assert "from-the-environment" not in repr(static)


def test_static_key_missing_env_var_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    with pytest.raises(ValueError, match="NO_SUCH_KEY_VAR"):
        StaticKey("acme", key_env="NO_SUCH_KEY_VAR")


def test_static_key_short_env_key_is_refused_without_echo(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHORT_KEY", "sk-sg-tiny")
    with pytest.raises(ValueError, match="SHORT_KEY") as info:
        StaticKey("acme", key_env="SHORT_KEY")
    assert "sk-sg-tiny" not in str(info.value)


@pytest.mark.parametrize("plaintext", ["shared-secret-0123456789abcdef",
                                       "sk-proj-an-openai-key-0123456789", "SK-SG-0123456789abcdef"])
def test_static_key_from_env_must_be_a_virtual_key(monkeypatch: pytest.MonkeyPatch,
                                                   plaintext: str) -> None:
    """Else the admin token (which may not start with sk-sg-) could be a key as well."""
    monkeypatch.setenv("REVIEW_ADMIN_TOKEN", plaintext)
    with pytest.raises(ValueError, match="REVIEW_ADMIN_TOKEN.*sk-sg-") as info:
        StaticKey("acme", key_env="REVIEW_ADMIN_TOKEN")
    assert plaintext not in str(info.value)


def test_static_key_needs_exactly_one_source(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("K", "sk-sg-0123456789abcdef")
    with pytest.raises(ValueError, match="exactly one"):
        StaticKey("acme")
    with pytest.raises(ValueError, match="exactly one"):
        StaticKey("acme", key_hash=hash_key("x"), key_env="K")


def test_static_key_refuses_a_plaintext_as_hash_without_echoing_it() -> None:
    with pytest.raises(ValueError, match="64") as info:
        StaticKey("acme", key_hash="sk-sg-plaintext-pasted-here")
    assert "plaintext-pasted" not in str(info.value)


def test_static_key_checks_its_settings() -> None:
    key_hash = hash_key("k")
    with pytest.raises(ValueError, match="project"):
        StaticKey("a/b", key_hash=key_hash)
    with pytest.raises(ValueError, match="timezone"):
        StaticKey("acme", key_hash=key_hash, expires_at=datetime(2030, 1, 1))
    with pytest.raises(TypeError, match="allowed_models"):
        StaticKey("acme", key_hash=key_hash, allowed_models="gpt-4o")  # type: ignore[arg-type]


def test_a_static_key_may_expire_on_the_last_day_of_the_calendar() -> None:
    # 9999-12-31 is a common "never expires"; only PostgreSQL needs a bound (it reads the
    # value back in its session's time zone), and a static key never goes there.
    never = datetime(9999, 12, 31, tzinfo=UTC)
    key = StaticKey("acme", key_hash=hash_key("k"), expires_at=never).to_virtual_key()
    assert key.expires_at == never and key.usable() is None
    assert key.to_public_json()["expires_at"] == "9999-12-31T00:00:00+00:00"


def test_check_key_fields_normalises() -> None:
    later = datetime(2030, 1, 1, 9, tzinfo=timezone(timedelta(hours=9)))
    fields = check_key_fields(allowed_models=["a", "b*"], expires_at=later, disabled=True,
                              metadata={"k": [1, 2]}, limits=Limits(tpm=10))
    assert fields == {"allowed_models": ("a", "b*"), "expires_at": datetime(2030, 1, 1, tzinfo=UTC),
                      "disabled": True, "metadata": {"k": [1, 2]}, "limits": Limits(tpm=10)}
    assert fields["expires_at"].tzinfo is UTC
    assert check_key_fields(expires_at=None) == {"expires_at": None}


@pytest.mark.parametrize(("fields", "error"), [
    ({"colour": "red"}, ValueError),
    ({"allowed_models": "gpt-4o"}, TypeError),
    ({"allowed_models": [""]}, ValueError),
    ({"allowed_models": [3]}, ValueError),
    ({"expires_at": "2030-01-01"}, ValueError),
    ({"expires_at": datetime(2030, 1, 1)}, ValueError),
    ({"disabled": "yes"}, TypeError),
    ({"require_customer": 1}, TypeError),
    ({"metadata": ["x"]}, ValueError),
    ({"metadata": {"when": datetime(2030, 1, 1)}}, ValueError),
    ({"metadata": {"big": "x" * 20_000}}, ValueError),
    ({"metadata": {"nan": float("nan")}}, ValueError),
    ({"metadata": {"note": "x\u0000y"}}, ValueError),
    ({"metadata": {"n\u0000te": "x"}}, ValueError),
    ({"metadata": {"deep": [{"note": "\u0000"}]}}, ValueError),
    ({"allowed_models": ["gpt\u0000"]}, ValueError),
    ({"allowed_models": ["gpt\n4o"]}, ValueError),
    ({"expires_at": datetime(9999, 12, 31, 23, 59, tzinfo=timezone(-timedelta(hours=5)))},
     ValueError),
    ({"expires_at": datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=1)))}, ValueError),
    ({"limits": {"rpm": 1}}, TypeError),
])
def test_check_key_fields_refuses(fields: dict[str, object], error: type[Exception]) -> None:
    with pytest.raises(error):
        check_key_fields(**fields)


@pytest.mark.parametrize("when", [datetime(9999, 1, 1, tzinfo=UTC),
                                  datetime(9999, 12, 31, tzinfo=UTC),
                                  datetime(1969, 12, 31, 23, 59, tzinfo=UTC)])
def test_only_a_stored_key_is_bound_to_the_years_postgresql_reads_back(when: datetime) -> None:
    assert check_key_fields(expires_at=when) == {"expires_at": when}
    with pytest.raises(ValueError, match="expires_at must fall in the years 1970 to 9998"):
        check_storable_key_fields(expires_at=when)
    later = datetime(9998, 12, 31, tzinfo=UTC)
    assert check_storable_key_fields(expires_at=later) == {"expires_at": later}


def test_names_and_subject_ids() -> None:
    assert check_project("acme-prod.eu") == "acme-prod.eu"
    for bad in ("", "a b", "a/b", "x" * 129, "tab\t", 7):
        with pytest.raises(ValueError):
            check_project(bad)
    assert check_subject_id("customer", "acme/alice") == "acme/alice"
    assert check_subject_id("customer", "acme/org/alice") == "acme/org/alice"
    assert check_subject_id("project", "acme") == "acme"
    for customer in ("acme/Jane Doe", "acme/" + "u" * 256, "acme/a//b/", "acme/café€"):
        assert check_subject_id("customer", customer) == customer
    for kind, bad in (("customer", "alice"), ("customer", "/alice"), ("customer", "acme/"),
                      ("customer", "acme/ alice"), ("customer", "acme/" + "u" * 257),
                      ("customer", "acme/a\u0000"), ("customer", "a b/alice"),
                      ("project", "acme/alice"), ("model", "gpt-4o"), ("key", "key_1")):
        with pytest.raises(ValueError):
            check_subject_id(kind, bad)


CUSTOMER_SAMPLES = [
    "alice", "Jane Doe", "  padded  ", "u" * 256, "u" * 257, " " + "u" * 256 + " ", "a/b",
    "a//b/", "/x", "café€", "emoji 😀", "", "   ", "tab\there", "nul\u0000", "line\nbreak",
    "\u00a0nbsp", "in\u00a0side", "\u3000ideographic", "zero\u200bwidth", "c1\u0085", "%2F",
]


@pytest.mark.parametrize("sample", CUSTOMER_SAMPLES)
def test_customer_ids_are_what_the_auth_layer_accepts(sample: str) -> None:
    """The admin API takes limits for exactly the customers the auth layer serves: its rule
    lives in middleware/auth/__init__.py (`_clean_customer`), and this one must agree."""
    try:
        served: str | None = _clean_customer(sample)
    except GatewayError:
        served = None
    assert is_customer(sample.strip()) == (served is not None)
    if served is not None:
        assert check_subject_id("customer", f"acme/{served}") == f"acme/{served}"
    if is_customer(sample):
        assert served == sample


def test_key_ids() -> None:
    assert is_key_id(new_key_id()) and is_key_id("static-acme")
    for bad in ("", "key_\u0000", "key_\x01", "a b", "a/b", "k" * 129, None, 7):
        assert not is_key_id(bad), bad
