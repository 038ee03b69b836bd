"""Helpers for writing layers, built-in or the operator's own.

A layer is a pure ASGI middleware: `__init__(app, **options)` that only stores configuration,
and `async __call__(scope, receive, send)` whose first statement passes non-HTTP scopes
through. (A layer with nothing to do around the call itself may instead be a plain
`__call__` that returns `self.app(scope, receive, send)`, and add a callback to
`RequestContext.on_end` for when the request has ended: the metering layer does so.) It
reads and writes the `RequestContext` (`find_request_context(scope)`; None for
requests the kernel answers itself), refuses with `GatewayError` (rendered in the caller's
API shape by the kernel), and may define `async startup()`, `async shutdown()`,
`async check_ready() -> dict[str, str]` and `check_config(config)` (raises
`gateway.config.ConfigError` when its options name models or providers the config does not
have), which the kernel calls.

A layer that never changes the bytes of a non-stream JSON answer coming up from below says so
with the class attribute `passes_json_through = True` (every built-in layer does). The cache
layer keeps a miss's answer from the passthrough's record of what it sent
(`RequestContext.sent_json`) when every layer under it says so, and otherwise copies the answer
as it passes (which costs every miss a wrapped `send`).

A layer that acts on the caller's identity before it calls the layers under it (admits by
the caller's limits, answers from the caller's cache) says so with `acts_per_caller = True`,
and one that establishes that identity (writes `RequestContext.principal`) with
`identifies_caller = True`; the gateway refuses to start with the first above the second.

The body of an API request is parsed only once the caller's key is checked when the outermost
layers, before one that says `loads_body = True` (auth), all say `reads_request_at_end = True`
(they read the `RequestContext` only once the request has ended: metering). Until then the
context's `body` is {}, `model` "" and `stream` False (`raw_body` is read); the `loads_body`
layer calls `RequestContext.parse_body()` before anything under it reads them (it raises the
4xx of a bad body). So a request without a valid key is refused before its body is parsed,
and its error says nothing of which models exist. Any other layer above auth gets the
request parsed and checked.
"""
from __future__ import annotations

from typing import Any

from gateway.context import RequestContext, find_request_context, request_context
from gateway.errors import GatewayError
from gateway.kernel import ASGIApp, Message, Receive, Scope, Send, stack_components

__all__ = [
    "ASGIApp", "GatewayError", "Message", "Receive", "RequestContext", "Scope", "Send",
    "find_request_context", "json_passes_through", "request_context", "text_of_messages",
]


def json_passes_through(app: Any) -> bool:
    """Whether `app` and everything under it declare `passes_json_through = True`: then a
    non-stream JSON answer reaches `app`'s caller as the passthrough (which declares it too)
    recorded it in `RequestContext.sent_json`."""
    return all(getattr(component, "passes_json_through", False) is True
               for component in stack_components(app))


def text_of_messages(body: dict[str, Any]) -> list[str]:
    """Every prompt text in an OpenAI or Anthropic request body (for guardrail-style layers)."""
    texts: list[str] = []
    for key in ("system", "prompt", "input"):
        texts.extend(_texts(body.get(key)))
    for message in body.get("messages") or ():
        if isinstance(message, dict):
            texts.extend(_texts(message.get("content")))
    return texts


def _texts(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        out: list[str] = []
        for item in value:
            if isinstance(item, str):
                out.append(item)
            elif isinstance(item, dict):
                if isinstance(item.get("text"), str):
                    out.append(item["text"])
                elif "content" in item:
                    out.extend(_texts(item["content"]))
        return out
    return []
