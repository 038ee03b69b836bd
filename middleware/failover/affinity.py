"""Responses API affinity: a follow-up goes to the account that holds its previous response.

OpenAI keeps a response (`store`, true by default) for the organization and project whose key
made it; a request with `previous_response_id` sent anywhere else is refused with 400
`previous_response_not_found` ("Previous response with id '...' not found."). So the layer
notes, for every Responses API answer that passes through, its id and where it was made: the
deployment and the provider key (`Pin`). A later request naming that id goes first to that
deployment and key, and can fail over only to the deployments that call the same account
(`ResponseAffinity.sees`); when none of them can take it, the caller gets
`previous_response_unavailable` rather than another account's 400, with a Retry-After of the
time until one of them can (`routing.ready_in_s`).

An account is the provider kind, its base URL and the credential, known by a keyed hash
(HMAC-SHA256 under a key made at random per process, so the hash is no fingerprint of the
key outside it): two provider entries, or two key variables, holding the same base URL and
key are one account. Pins name the provider entry and the key's variable, never the account,
so instances with the same config read each other's pins (through Redis) without sharing a
hash key.

The id is read where it is already at hand: a JSON answer's `id` from the passthrough's
`RequestContext.sent_json`, a stream's from its first event, `response.created`, which the
passthrough parsed (`RequestContext.first_event`). Ids stay as OpenAI made
them (LiteLLM instead encodes the deployment into the id it returns, BerriAI/litellm#10193,
and clients then see ids that are not OpenAI's: BerriAI/litellm#15918, #17204).

The map is bounded (`ResponseAffinity.max_entries`, least recently used out first) and lives
in this process; with `shared=RedisHealth(...)` each pin is also written to Redis, with a
TTL, and a follow-up whose id this process has not seen asks Redis once (failover/shared.py).
A pin is noted (and written) before the first byte of its answer's body goes out, since that
is where the client learns the id: a follow-up, on any instance, finds it. An id the gateway
never saw (made before, elsewhere, or forgotten) routes as any request does; one that cannot
be an id (`previous_response_id`) is refused before it goes anywhere, a Redis key included.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

import orjson

from gateway.context import RequestContext
from gateway.errors import GatewayError
from gateway.layers import Message, Send
from middleware.failover.routing import DeploymentState, retry_after

__all__ = ["Pin", "PinStore", "ResponseAffinity", "not_found", "owner_of", "pin_of",
           "response_id_of", "unavailable"]

PREVIOUS = "previous_response_id"
# OpenAI's response ids are "resp_" and about 50 hex digits: room for other servers' longer
# ones, not for a body's worth of text used as a Redis key.
MAX_ID_CHARS = 256


@dataclass(frozen=True, slots=True)
class Pin:
    """Where a response was made: the deployment's name, its provider entry and the provider
    key's environment variable (None: the provider's own key); and whose it is, the project
    of the virtual key that made it (None: no auth layer). No secret is kept."""

    deployment: str
    provider: str
    key: str | None
    owner: str | None = None

    def encode(self) -> str:
        return orjson.dumps([self.deployment, self.provider, self.key, self.owner]).decode()

    @classmethod
    def decode(cls, raw: bytes | str) -> Pin | None:
        try:
            fields = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return None
        if not (isinstance(fields, list) and len(fields) in (3, 4)):  # (3: an older writer's)
            return None
        deployment, provider, key, owner = (*fields, None)[:4]
        if not (isinstance(deployment, str) and isinstance(provider, str)
                and (key is None or isinstance(key, str))
                and (owner is None or isinstance(owner, str))):
            return None
        return cls(deployment, provider, key, owner)


class PinStore(Protocol):
    """Pins shared with other instances (failover.shared.RedisHealth)."""

    async def pin_of(self, response_id: str) -> Pin | None: ...

    async def publish_pin(self, response_id: str, pin: Pin) -> None: ...


class ResponseAffinity:
    """Response id -> `Pin`, bounded, least recently used out first; and which account each
    provider entry and key calls (`learn_accounts`)."""

    def __init__(self, max_entries: int = 100_000) -> None:
        if max_entries < 1:
            raise ValueError("ResponseAffinity.max_entries must be >= 1")
        self.max_entries = max_entries
        self._pins: OrderedDict[str, Pin] = OrderedDict()
        # (provider entry, key variable or None) -> account; never shown, never shared
        self._accounts: dict[tuple[str, str | None], str] = {}
        self._hash_key = secrets.token_bytes(32)

    def __len__(self) -> int:
        return len(self._pins)

    def get(self, response_id: str) -> Pin | None:
        pin = self._pins.get(response_id)
        if pin is not None:
            self._pins.move_to_end(response_id)
        return pin

    def remember(self, response_id: str, pin: Pin) -> None:
        self._pins[response_id] = pin
        self._pins.move_to_end(response_id)
        if len(self._pins) > self.max_entries:
            self._pins.popitem(last=False)

    async def find(self, response_id: str, shared: PinStore | None) -> Pin | None:
        """Where `response_id` was made: known here, or (not known here, with a shared store)
        as the store has it, then known here too (a retried follow-up asks no more)."""
        pin = self.get(response_id)
        if pin is None and shared is not None:
            pin = await shared.pin_of(response_id)
            if pin is not None:
                self.remember(response_id, pin)
        return pin

    def noting_pins(self, send: Send, ctx: RequestContext, shared: PinStore | None) -> Send:
        """`send`, noting where the answer was made (here, and in `shared`) before its body's
        first message goes out: the client has the response id only then, so a follow-up it
        sends to any instance finds the pin."""
        noted = False

        async def send_noting_pin(message: Message) -> None:
            nonlocal noted
            if not noted and message["type"] == "http.response.body":
                noted = True
                made = response_id_of(ctx)
                pin = pin_of(ctx) if made is not None else None
                if made is not None and pin is not None:
                    self.remember(made, pin)
                    if shared is not None:
                        await shared.publish_pin(made, pin)
            await send(message)

        return send_noting_pin

    # -- accounts ----------------------------------------------------------------------------

    def learn_accounts(self, providers: Mapping[str, Any], models: Mapping[str, Any]) -> None:
        """The account of each provider entry's own key and of each deployment's keys (from
        the loaded config: `providers` name -> adapter, `models` name -> gateway.upstream.Model).
        Until then (a layer used without a config) an account is its entry and key names."""
        for name, adapter in providers.items():
            own = os.environ.get(adapter.api_key_env, "").strip() if adapter.api_key_env else ""
            self._accounts[name, None] = self._account(adapter, own)
        for model in models.values():
            for deployment in model.deployments:
                adapter = providers[deployment.provider]
                for key in deployment.keys:
                    self._accounts[deployment.provider, key.env] = \
                        self._account(adapter, key.secret)

    def _account(self, adapter: Any, secret: str) -> str:
        url = urlsplit(str(adapter.base_url).rstrip("/"))
        # A user and password in the URL are a credential too: hashed with the key.
        userinfo, _, host = url.netloc.rpartition("@")
        where = url._replace(scheme=url.scheme.lower(), netloc=host.lower()).geturl()
        digest = hmac.new(self._hash_key, f"{userinfo}\0{secret}".encode(),
                          hashlib.sha256).hexdigest()
        return f"{adapter.type_name} {where} {digest}"

    def account(self, provider: str, key: str | None) -> str:
        found = self._accounts.get((provider, key))
        return found if found is not None else f"entry:{provider}|{key}"

    def sees(self, pin: Pin, deployment: Any) -> bool:
        """Whether a deployment (a gateway.upstream.Deployment) calls the account that made
        the pinned response with one of its keys (or, without keys, the provider's own)."""
        account = self.account(pin.provider, pin.key)
        keys = deployment.keys
        if not keys:
            return self.account(deployment.provider, None) == account
        return any(self.account(deployment.provider, key.env) == account for key in keys)

    def foreign_keys(self, pin: Pin, states: Iterable[DeploymentState]) -> set[str]:
        """The keys of `states` (key variables) on another account than the pinned one."""
        account = self.account(pin.provider, pin.key)
        return {key.key.env for state in states for key in state.keys
                if self.account(state.deployment.provider, key.key.env) != account}


def previous_response_id(ctx: RequestContext) -> str | None:
    """The request's `previous_response_id`. One that cannot be an id is refused (400, as
    OpenAI refuses a malformed one) before it is looked up anywhere: longer than
    `MAX_ID_CHARS`, or with characters other than printable ASCII."""
    value = ctx.body.get(PREVIOUS)
    if not isinstance(value, str) or not value:
        return None
    if len(value) > MAX_ID_CHARS:
        raise GatewayError(
            400, f"Invalid '{PREVIOUS}': string too long. Expected a string with maximum "
                 f"length {MAX_ID_CHARS}, but got a string with length {len(value)} instead.",
            code="string_above_max_length", param=PREVIOUS)
    if not (value.isascii() and value.isprintable()):
        raise GatewayError(
            400, f"Invalid '{PREVIOUS}': expected the id of a response (such as "
                 "'resp_...'), but this value contained characters other than printable "
                 "ASCII.", code="invalid_value", param=PREVIOUS)
    return value


def pin_of(ctx: RequestContext) -> Pin | None:
    """Where the request's answer was made (the deployment and key of its last attempt), and
    whose it is (`owner_of`)."""
    deployment = ctx.deployment
    if deployment is None:
        return None
    key = ctx.provider_key or (deployment.keys[0] if deployment.keys else None)
    return Pin(deployment.name, deployment.provider, None if key is None else key.env,
               owner_of(ctx))


def owner_of(ctx: RequestContext) -> str | None:
    """The project of the request's virtual key (None without an auth layer): a response
    it made may be continued by its project's keys only. The provider holds every response
    under the gateway's one account, so its own scoping never tells two projects apart."""
    project = getattr(ctx.principal, "project", None)
    return project if isinstance(project, str) else None


def not_found(response_id: str) -> GatewayError:
    """OpenAI's answer to a `previous_response_id` it does not hold: what a caller gets for
    another project's response (whether it exists is not said)."""
    return GatewayError(400, f"Previous response with id '{response_id}' not found.",
                        code="previous_response_not_found", param=PREVIOUS)


def response_id_of(ctx: RequestContext) -> str | None:
    """The id of the response the request was answered with, when OpenAI stores it (`store`
    not false): from the stream's first event or the JSON answer."""
    if ctx.body.get("store") is False:
        return None
    if ctx.stream:
        return _created_id(ctx.first_event)
    sent = ctx.sent_json
    answer = sent[1] if sent is not None else None
    if isinstance(answer, dict) and answer.get("object") == "response":
        found = answer.get("id")
        return found if isinstance(found, str) and found else None
    return None


def _created_id(event: dict[str, Any] | None) -> str | None:
    if event is None or event.get("type") != "response.created":
        return None
    response = event.get("response")
    found = response.get("id") if isinstance(response, dict) else None
    return found if isinstance(found, str) and found else None


def unavailable(response_id: str, pin: Pin, retry_after_s: float) -> GatewayError:
    """No deployment that sees the previous response can take the request right now (for
    `retry_after_s`, rounded up: a client that waits as told finds one that can)."""
    return GatewayError(
        503, f"The previous response '{response_id}' is held by deployment "
             f"'{pin.deployment}' (and visible only to deployments on its provider key), and "
             "none of them can take requests right now. Retry later, or send the "
             "conversation without previous_response_id.",
        code="previous_response_unavailable", param=PREVIOUS,
        headers=[retry_after(retry_after_s)])
