"""Responses API affinity by provider account: the provider kind, its base URL and the key.

Two provider entries (or two key variables) holding the same base URL and the same key call
one account, which holds the response whichever entry made it; the same server with another
key is another account. The mock OpenAI servers hold each response for the key that made it
(tests/mock_providers/openai_responses.py), as OpenAI does.
"""
from __future__ import annotations

import time
from pathlib import Path

import openai
import pytest

from gateway.upstream import Deployment, Model, ProviderKey
from middleware.failover.affinity import Pin, ResponseAffinity, unavailable
from middleware.failover.health import BreakerSettings
from middleware.failover.routing import DeploymentState
from providers import Provider
from tests.harness import openai_client, serve
from tests.middleware.test_failover_affinity import KEYS, affinity_config, keys_called, turn
from tests.mock_providers import Fault, MockProviderServer

SECRET_A, SECRET_B = "provider-secret-123456789-a", "provider-secret-123456789-b"


def same_account_config(a: MockProviderServer, b: MockProviderServer) -> str:
    """`same`, by priority: a's deployment; then, on a's server through another provider
    entry, one on the other key (another account) and b (another server); last, through
    that other entry again, a's key under another variable name (a's account)."""
    text = affinity_config(a, b).replace(KEYS, KEYS + (
        f'os.environ.setdefault("AFFINITY_KEY_A_AGAIN", "{SECRET_A}")\n'))
    text = text.replace('providers = {\n', 'providers = {\n'
                        f'    "a_too": Provider("openai", base_url="{a.base_url("openai")}", '
                        'api_key_env=KEY, timeouts=fast),\n')
    return text.replace('models = {\n', '''models = {
    "same": [Deployment("a", "gpt-4o-mini", **on_a),
             Deployment("a_too", "gpt-4o-mini", label="a-too-on-b-key", **on_b),
             Deployment("b", "gpt-4o-mini", **on_b),
             Deployment("a_too", "gpt-4o-mini", price=PRICE,
                        api_key_envs=("AFFINITY_KEY_A_AGAIN",))],
''').replace('routes={"trio": Route(strategy="priority")}',
             'routes={"trio": Route(strategy="priority"), "same": Route(strategy="priority")}')


def test_a_follow_up_fails_over_to_another_provider_entry_on_the_same_account(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer) -> None:
    with serve(tmp_path, same_account_config(a, b)) as gateway:
        sdk = openai_client(gateway)
        previous, served = turn(sdk, "same", None, False)
        assert served == "a/gpt-4o-mini"
        a.push_fault(Fault("status", provider="openai", status=503))
        raw = sdk.responses.with_raw_response.create(model="same", input="Go on",
                                                     previous_response_id=previous)
        assert raw.parse().output_text.startswith("Mock reply to: ")
        assert raw.headers["x-sluicegate-deployment"] == "a_too/gpt-4o-mini"
        assert raw.headers["x-sluicegate-attempts"] == "2"
    assert len(b.requests) == 0
    assert keys_called(a) == ["a", "a", "a"]  # never a's server on b's key


def test_a_follow_up_never_goes_to_the_same_server_on_another_key(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer) -> None:
    """a's account can take nothing (its deployments fail): the caller gets a's error, not
    the other account's `previous_response_not_found`."""
    with serve(tmp_path, same_account_config(a, b)) as gateway:
        sdk = openai_client(gateway)
        previous, _ = turn(sdk, "same", None, False)
        for _ in range(3):  # (the attempts allowed: two deployments, then one of them again)
            a.push_fault(Fault("status", provider="openai", status=503))
        with pytest.raises(openai.InternalServerError) as failed:
            sdk.responses.create(model="same", input="Go on", previous_response_id=previous)
        assert failed.value.status_code == 503
    assert len(b.requests) == 0
    assert keys_called(a) == ["a"] * 4


def accounts(monkeypatch: pytest.MonkeyPatch, **urls: str) -> ResponseAffinity:
    """An affinity that learnt providers named after `urls` ("<kind>_<name>": base URL),
    each with its own key variable holding SECRET_A, and one deployment per provider with
    the keys A (SECRET_A), A_AGAIN (SECRET_A) and B (SECRET_B)."""
    providers = {}
    for name, url in urls.items():
        monkeypatch.setenv(f"OWN_{name.upper()}", SECRET_A)
        providers[name] = Provider(name.partition("_")[0], base_url=url,
                                   api_key_env=f"OWN_{name.upper()}")

    keys = (ProviderKey("A", SECRET_A), ProviderKey("A_AGAIN", SECRET_A),
            ProviderKey("B", SECRET_B))
    affinity = ResponseAffinity()
    affinity.learn_accounts(providers, {"m": Model([Deployment(name, "m", keys=keys)
                                                    for name in urls])})
    return affinity


def test_an_account_is_the_provider_kind_its_base_url_and_its_key(
        monkeypatch: pytest.MonkeyPatch) -> None:
    affinity = accounts(monkeypatch, openai_one="https://API.example.com/v1/",
                        openai_two="https://api.example.com/v1", openai_other="https://other/v1",
                        groq_one="https://api.example.com/v1",
                        azure_one="https://api.example.com",
                        azure_user1="https://user:pw-1@api.example.com",  # (Azure: the OpenAI
                        azure_user2="https://user:pw-2@api.example.com")  # family refuses it)
    account = affinity.account
    # The same kind, base URL (but for a final slash and the host's case) and key: one.
    assert account("openai_one", "A") == account("openai_two", "A") == \
        account("openai_two", "A_AGAIN") == account("openai_one", None)
    assert account("openai_one", "A") != account("openai_one", "B")  # another key
    assert account("openai_one", "A") != account("openai_other", "A")  # another server
    assert account("openai_one", "A") != account("groq_one", "A")  # another kind
    # A password in the URL is a credential too.
    assert len({account("azure_one", "A"), account("azure_user1", "A"),
                account("azure_user2", "A")}) == 3
    assert "pw-1" not in account("azure_user1", "A")
    # The key is known by a keyed hash only: never in it, and another process hashes it
    # under another key.
    assert SECRET_A not in account("openai_one", "A")
    assert account("openai_one", "A").rsplit(" ", 1)[1] != accounts(
        monkeypatch, openai_one="https://api.example.com/v1").account(
        "openai_one", "A").rsplit(" ", 1)[1]


def test_a_pin_sees_the_deployments_on_its_account_and_names_their_other_keys(
        monkeypatch: pytest.MonkeyPatch) -> None:
    affinity = accounts(monkeypatch, openai_one="https://api.example.com/v1",
                        openai_two="https://api.example.com/v1/")
    pin = Pin("openai_one/m", "openai_one", "A_AGAIN")
    on_b_only = Deployment("openai_two", "m", keys=(ProviderKey("B", SECRET_B),))
    own_key = Deployment("openai_two", "m")
    assert affinity.sees(pin, Deployment("openai_two", "m", keys=(ProviderKey("A", SECRET_A),)))
    assert affinity.sees(pin, own_key)  # the provider's own key is SECRET_A too
    assert not affinity.sees(pin, on_b_only)
    # A pin another instance wrote for an entry this config does not have sees nothing.
    assert not affinity.sees(Pin("gone/m", "gone", "A"), own_key)
    # A pinned request may use A and A_AGAIN (one account), never B.
    every_key = Deployment("openai_two", "m", keys=(ProviderKey("A", SECRET_A),
                                                    ProviderKey("A_AGAIN", SECRET_A),
                                                    ProviderKey("B", SECRET_B)))
    states = [DeploymentState(deployment, BreakerSettings(), time.monotonic)
              for deployment in (every_key, on_b_only, own_key)]
    assert affinity.foreign_keys(pin, states) == {"B"}


def test_a_pin_read_back_from_redis_is_the_three_fields_it_was_written_as() -> None:
    pin = Pin("a/gpt-4o", "a", None)
    assert Pin.decode(pin.encode()) == pin
    # Anything else is no pin (a three-character string or a three-key object unpacks as
    # three strings).
    for raw in (b'"abc"', b'{"d": 1, "p": 2, "k": 3}', b"[1, 2, 3]", b"[]", b"nope", b"7"):
        assert Pin.decode(raw) is None, raw


@pytest.mark.parametrize("wait_s,header", [(0.0, b"1"), (0.2, b"1"), (2.4, b"3"), (59.6, b"60")])
def test_the_retry_after_of_an_unavailable_previous_response_is_rounded_up(
        wait_s: float, header: bytes) -> None:
    error = unavailable("resp_1", Pin("a/gpt-4o", "a", None), wait_s)
    assert error.headers == [(b"retry-after", header)]
