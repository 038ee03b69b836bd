"""Responses API affinity: a follow-up goes to the account that holds its previous response.

OpenAI keeps a response (`store`, true by default) for the organization and project whose key
made it; a request with `previous_response_id` sent anywhere else is refused with 400
`previous_response_not_found` ("Previous response with id '...' not found."). So the layer
notes, for every Responses API answer that passes through, its id and where it was made: the
deployment and the provider key (`Pin`). A later request naming that id goes first to that
deployment and key, and can fail over only to the deployments that share the account (the
same provider entry and the same provider key: `Pin.sees`); when none of them can take it,
the caller gets `previous_response_unavailable` rather than another account's 400.

The id is read where it is already at hand: a JSON answer's `id` from the passthrough's
`RequestContext.sent_json`, a stream's from its first event, `response.created`, which the
passthrough parsed (`RequestContext.first_event`). Ids stay as OpenAI made
them (LiteLLM instead encodes the deployment into the id it returns, BerriAI/litellm#10193,
and clients then see ids that are not OpenAI's: BerriAI/litellm#15918, #17204).

The map is bounded (`ResponseAffinity.max_entries`, least recently used out first) and lives
in this process; with `shared=RedisHealth(...)` it is also written to Redis in the
background, with a TTL, and a follow-up whose id this process has not seen asks Redis once
(failover/shared.py). An id the gateway never saw (made before, elsewhere, or forgotten)
routes as any request does.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.context import RequestContext
from gateway.errors import GatewayError

__all__ = ["Pin", "ResponseAffinity", "pin_of", "response_id_of", "unavailable"]

PREVIOUS = "previous_response_id"


@dataclass(frozen=True, slots=True)
class Pin:
    """Where a response was made: the deployment's name, its provider entry and the provider
    key's environment variable (None: the provider's own key). No secret is kept."""

    deployment: str
    provider: str
    key: str | None

    def sees(self, deployment: Any) -> bool:
        """Whether a deployment (a gateway.upstream.Deployment) calls the same account, and
        so sees the response: the same provider entry, and the key among its keys (or, for
        the provider's own key, no keys of its own)."""
        if deployment.provider != self.provider:
            return False
        keys = deployment.keys
        return self.key is None if not keys else any(k.env == self.key for k in keys)

    def encode(self) -> str:
        return orjson.dumps([self.deployment, self.provider, self.key]).decode()

    @classmethod
    def decode(cls, raw: bytes | str) -> Pin | None:
        try:
            deployment, provider, key = orjson.loads(raw)
        except (orjson.JSONDecodeError, TypeError, ValueError):
            return None
        if not (isinstance(deployment, str) and isinstance(provider, str)
                and (key is None or isinstance(key, str))):
            return None
        return cls(deployment, provider, key)


class ResponseAffinity:
    """Response id -> `Pin`, bounded, least recently used out first."""

    def __init__(self, max_entries: int = 100_000) -> None:
        if max_entries < 1:
            raise ValueError("ResponseAffinity.max_entries must be >= 1")
        self.max_entries = max_entries
        self._pins: OrderedDict[str, Pin] = OrderedDict()

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


def previous_response_id(ctx: RequestContext) -> str | None:
    value = ctx.body.get(PREVIOUS)
    return value if isinstance(value, str) and value else None


def pin_of(ctx: RequestContext) -> Pin | None:
    """Where the request's answer was made (the deployment and key of its last attempt)."""
    deployment = ctx.deployment
    if deployment is None:
        return None
    key = ctx.provider_key or (deployment.keys[0] if deployment.keys else None)
    return Pin(deployment.name, deployment.provider, None if key is None else key.env)


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
    """No deployment that sees the previous response can take the request right now."""
    return GatewayError(
        503, f"The previous response '{response_id}' is held by deployment "
             f"'{pin.deployment}' (and visible only to deployments on its provider key), and "
             "none of them can take requests right now. Retry later, or send the "
             "conversation without previous_response_id.",
        code="previous_response_unavailable", param=PREVIOUS,
        headers=[(b"retry-after", b"%d" % max(1, round(retry_after_s)))])
