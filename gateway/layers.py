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

from collections.abc import Callable
from typing import Any

from gateway.context import RequestContext, find_request_context, request_context
from gateway.errors import GatewayError
from gateway.kernel import ASGIApp, Message, Receive, Scope, Send, stack_components

__all__ = [
    "ASGIApp", "GatewayError", "Message", "Receive", "RequestContext", "Scope", "Send",
    "find_request_context", "json_passes_through", "map_prompt_texts", "request_context",
    "text_of_messages",
]


def json_passes_through(app: Any) -> bool:
    """Whether `app` and everything under it declare `passes_json_through = True`: then a
    non-stream JSON answer reaches `app`'s caller as the passthrough (which declares it too)
    recorded it in `RequestContext.sent_json`."""
    return all(getattr(component, "passes_json_through", False) is True
               for component in stack_components(app))


# Where a request body holds prompt text: in the body, Anthropic's `system`, the Responses
# API's `instructions`, Completions' `prompt` (and a Responses prompt template's `variables`),
# Embeddings' and Responses' `input`, and `messages`. In the messages and items under them: a
# part's `text`, a message's `content`, a tool result's `output` (Responses'
# `function_call_output`, and the custom and MCP tools'), a tool call's `arguments` (Chat's in
# `tool_calls`) or `input` (Responses' custom tools, Anthropic's `tool_use`). The model's own
# reasoning (Anthropic's signed thinking, a Responses reasoning item with its encrypted
# content) is left out: it goes back as the model wrote it.
_BODY_FIELDS = frozenset({"system", "instructions", "prompt", "input", "messages"})
_ITEM_FIELDS = frozenset({"text", "content", "output", "arguments", "input", "tool_calls",
                          "function", "variables"})


def text_of_messages(body: dict[str, Any]) -> list[str]:
    """Every prompt text in an OpenAI or Anthropic request body (for guardrail-style layers):
    the system text and instructions, messages and input items, tool calls and tool results."""
    texts: list[str] = []

    def kept(text: str) -> str:
        texts.append(text)
        return text

    _rewritten(body, _BODY_FIELDS, kept)  # (one walk of the fields for both: read, rewrite)
    return texts


def map_prompt_texts(body: dict[str, Any], rewrite: Callable[[str], str]) -> dict[str, Any]:
    """A copy of `body` where each text `text_of_messages` reads is `rewrite(text)` (e.g. a
    secret redacted); everything else is left as it is."""
    rewritten: dict[str, Any] = _rewritten(body, _BODY_FIELDS, rewrite)
    return rewritten


def _fields_under(key: str, fields: frozenset[str] | None) -> frozenset[str] | None:
    """The fields holding prompt text in a mapping found under `key` in a mapping where
    `fields` hold it; None: every field, all the way down (a tool call's `input`, its fields
    named by the tool)."""
    if fields is None or (key == "input" and fields is _ITEM_FIELDS):
        return None
    return _ITEM_FIELDS


def _rewritten(value: Any, fields: frozenset[str] | None,
               rewrite: Callable[[str], str]) -> Any:
    if isinstance(value, str):
        return rewrite(value)
    if isinstance(value, list):
        return [_rewritten(item, _ITEM_FIELDS if fields is not None else None, rewrite)
                for item in value]
    if not isinstance(value, dict):
        return value
    out = {}
    for key, item in value.items():
        if fields is not None and key == "variables" and isinstance(item, dict):
            out[key] = {name: _rewritten(text, _ITEM_FIELDS, rewrite)
                        for name, text in item.items()}
        elif fields is None or key in fields:
            out[key] = _rewritten(item, _fields_under(key, fields), rewrite)
        else:
            out[key] = item
    return out
