"""Fast input-token estimates for requests, used where no provider counts for us.

A heuristic (about four bytes of UTF-8 text per token, plus a per-message overhead as in
OpenAI's chat format), cheap enough for the hot path. Exact counts come from the provider's
usage after the call; admission (the quota layer) reconciles with those.
"""
from __future__ import annotations

from typing import Any

from gateway import context as c
from gateway.context import RequestContext, Usage

_PER_MESSAGE = 3
_PER_IMAGE = 85  # OpenAI's low-detail image cost; images are otherwise not counted by size


def estimate_text(text: str) -> int:
    # An ASCII str knows it is one (a flag, no scan): its length is its UTF-8 length.
    return ((len(text) if text.isascii() else len(text.encode("utf-8"))) + 3) // 4


def _estimate_content(content: Any) -> int:
    if isinstance(content, str):
        return estimate_text(content)
    if isinstance(content, list):
        total = 0
        for part in content:
            if isinstance(part, dict):
                kind = part.get("type")
                if kind in ("image_url", "image", "input_image"):
                    total += _PER_IMAGE
                elif kind == "tool_use":
                    total += estimate_text(str(part.get("input", "")))
                elif kind == "tool_result":
                    total += _estimate_content(part.get("content"))
                else:
                    total += estimate_text(str(part.get("text", "")))
            else:
                total += estimate_text(str(part))
        return total
    return 0 if content is None else estimate_text(str(content))


def estimate_messages(messages: list[Any], system: Any = None, tools: Any = None) -> int:
    """Input tokens of a chat/messages request (messages, system prompt, tool definitions)."""
    total = _estimate_content(system) if system else 0
    for message in messages:
        if isinstance(message, dict):
            content = message.get("content")
            total += _PER_MESSAGE + (estimate_text(content) if type(content) is str
                                     else _estimate_content(content))
            calls = message.get("tool_calls")
            if type(calls) is list:  # (anything else is the provider's to refuse)
                for call in calls:
                    total += estimate_text(str(call))
    if tools:
        total += estimate_text(str(tools))
    return total + _PER_MESSAGE


def estimate_input(texts: str | list[Any]) -> int:
    """Input tokens of an embeddings/completions `input` or `prompt`: text, a list of texts,
    token ids (one each), or a list of token-id lists."""
    if isinstance(texts, str):
        return estimate_text(texts)
    return sum(estimate_text(t) if isinstance(t, str) else len(t) if isinstance(t, list)
               else 1 if type(t) is int else 0 for t in texts)


_MESSAGES_OPERATIONS = frozenset({c.OPENAI_CHAT, c.ANTHROPIC_MESSAGES, c.ANTHROPIC_COUNT_TOKENS})
_INPUT_FIELDS = {c.OPENAI_COMPLETIONS: "prompt", c.OPENAI_EMBEDDINGS: "input",
                 c.OPENAI_RESPONSES: "input"}


def estimate_input_tokens(ctx: RequestContext) -> int:
    """The input tokens of a request's body, estimated (its operation says where they are)."""
    body = ctx.body
    if ctx.operation in _MESSAGES_OPERATIONS:
        return estimate_messages(body.get("messages") or [], body.get("system"),
                                 body.get("tools"))
    field = _INPUT_FIELDS.get(ctx.operation, "input")
    value = body.get(field)
    if isinstance(value, list) and value and isinstance(value[0], dict):  # responses messages
        return estimate_messages(value, body.get("instructions"), body.get("tools"))
    return estimate_input(value) if isinstance(value, (str, list)) else 0


def delivered_usage(ctx: RequestContext, usage: Usage | None, deltas: int) -> Usage:
    """What a stream cut short (the client left, the provider broke) is billed at least:
    the input the provider reported (else the request's estimate), and one output token per
    content delta delivered, or the provider's output count where higher (a stream may end
    before its usage report, or carry only an early one: Anthropic's message_start says
    output_tokens=1)."""
    if usage is None:
        return Usage(input_tokens=estimate_input_tokens(ctx), output_tokens=deltas)
    return Usage(input_tokens=usage.input_tokens or estimate_input_tokens(ctx),
                 output_tokens=max(usage.output_tokens, deltas),
                 cached_input_tokens=usage.cached_input_tokens,
                 reasoning_tokens=usage.reasoning_tokens,
                 cache_write_tokens=usage.cache_write_tokens,
                 cache_write_1h_tokens=usage.cache_write_1h_tokens)
