"""Input-token counts of requests, used where no provider counts for us (admission, the
count_tokens endpoint for providers without one, a stream cut short before its usage, an
answer without one: Gemini's embeddings).

Exact where the deployment has a local tokenizer (gateway/tokenizers.py, resolved when the
config loads): text is encoded, and chat messages are counted as OpenAI's cookbook counts
them (3 per message, its role's tokens, a name's tokens plus 1, and 3 priming the reply).
Otherwise, and for the parts a tokenizer cannot see as the provider does (tool definitions,
tool calls, images), a heuristic cheap enough for the hot path: about four bytes of UTF-8
text per token. Admission (the quota layer) reconciles with the provider's usage after
the call.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from gateway import context as c
from gateway.context import RequestContext, Usage
from gateway.tokenizers import LoadedTokenizer

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
    """The input tokens of a request's body (its operation says where they are): counted
    with its deployment's tokenizer where it has one, else estimated."""
    tokenizer = tokenizer_of(ctx)
    if tokenizer is not None:
        return count_input_tokens(ctx, tokenizer)[0]
    body = ctx.body
    if ctx.operation in _MESSAGES_OPERATIONS:
        return estimate_messages(body.get("messages") or [], body.get("system"),
                                 body.get("tools"))
    if ctx.operation == c.OPENAI_RESPONSES:
        return _responses_input(body, None)[0]
    value = body.get(_INPUT_FIELDS.get(ctx.operation, "input"))
    return estimate_input(value) if isinstance(value, (str, list)) else 0


def tokenizer_of(ctx: RequestContext) -> LoadedTokenizer | None:
    """The tokenizer of the deployment that serves (or, before one is chosen, would first
    serve) the request; None where it has none."""
    deployment = ctx.deployment or ctx.served_deployment
    if deployment is None:
        model = ctx.models.get(ctx.model) if ctx.models is not None else None
        if model is None:
            return None
        deployment = model.deployments[0]
    tokenizer: LoadedTokenizer | None = deployment.tokenizer
    return tokenizer


def count_input_tokens(ctx: RequestContext, tokenizer: LoadedTokenizer) -> tuple[int, bool]:
    """(input tokens, whether every part was counted exactly) of a request's body, with a
    tokenizer."""
    body = ctx.body
    if ctx.operation in _MESSAGES_OPERATIONS:
        return count_messages(body.get("messages") or [], tokenizer, body.get("system"),
                              body.get("tools"))
    if ctx.operation == c.OPENAI_RESPONSES:
        return _responses_input(body, tokenizer)
    value = body.get(_INPUT_FIELDS.get(ctx.operation, "input"))
    return (count_input(value, tokenizer) if isinstance(value, (str, list)) else 0), True


# Members of a Responses input item that are no text the model reads: ids, kinds, states,
# files and images (counted apart), signed or encrypted reasoning.
_NOT_INPUT_TEXT = frozenset({"id", "call_id", "type", "role", "status", "detail", "image_url",
                             "file_id", "file_data", "file_url", "filename", "signature",
                             "encrypted_content"})
_IMAGE_PARTS = frozenset({"input_image", "image_url", "image", "computer_screenshot"})


def _responses_input(body: dict[str, Any], tokenizer: LoadedTokenizer | None
                     ) -> tuple[int, bool]:
    """(input tokens, exact) of a Responses request: its `instructions`, `tools` and
    `input`, a string (one user message) or a list of items. Messages count as chat
    messages do; the other items (function calls and their outputs, reasoning summaries,
    ...) by the text they hold, and their images at `_PER_IMAGE`; a `previous_response_id`
    this process answered, the conversation it ends (`remember_conversation`)."""
    value = body.get("input")
    items: list[Any] = [{"role": "user", "content": value}] if isinstance(value, str) else \
        value if isinstance(value, list) else []
    messages, others = [], []
    for item in items:
        if isinstance(item, dict) and "role" in item and item.get("type", "message") == "message":
            messages.append(item)
        else:
            others.append(item)
    instructions, tools = body.get("instructions"), body.get("tools")
    if tokenizer is None:
        total, exact = estimate_messages(messages, instructions, tools), False
    else:
        total, exact = count_messages(messages, tokenizer, instructions, tools)
    previous = body.get("previous_response_id")
    if type(previous) is str and previous in _CONVERSATIONS:
        total += _CONVERSATIONS[previous]
        exact = False
    if others:
        texts, images = _input_texts(others)
        text = "".join(texts)
        total += (estimate_text(text) if tokenizer is None else tokenizer.count(text)) + \
            _PER_IMAGE * images + _PER_MESSAGE * len(others)
        exact = False
    return total, exact


# Response id -> the tokens of the conversation it ends (its input and its output, less the
# reasoning, which OpenAI leaves out of a follow-up's context), for the follow-ups that
# name it in `previous_response_id`: OpenAI bills them that conversation as input, which
# their own body does not show (50k tokens of history behind a 5-token question). In this
# process, bounded; a follow-up served by another instance is estimated by its body alone.
_CONVERSATIONS: OrderedDict[str, int] = OrderedDict()
_CONVERSATIONS_MAX = 100_000


def remember_conversation(ctx: RequestContext) -> None:
    """Notes the conversation a Responses request ended with (`_CONVERSATIONS`), once it is
    answered: its id, from the JSON answer or the stream's `response.created`, and its
    size, from the usage it was billed."""
    usage = ctx.usage
    if usage is None or ctx.status != 200 or ctx.cache_status in ("hit", "semantic-hit"):
        return
    answer = ctx.sent_json[1] if ctx.sent_json is not None else \
        (ctx.first_event or {}).get("response")
    response_id = answer.get("id") if isinstance(answer, dict) else None
    if type(response_id) is not str:
        return
    _CONVERSATIONS[response_id] = max(
        usage.input_tokens + usage.output_tokens - usage.reasoning_tokens, 0)
    if len(_CONVERSATIONS) > _CONVERSATIONS_MAX:
        _CONVERSATIONS.popitem(last=False)


def _input_texts(value: Any) -> tuple[list[str], int]:
    """(the strings, the number of images) in Responses input items, but for the members
    `_NOT_INPUT_TEXT` names."""
    return _strings(value, _NOT_INPUT_TEXT, _IMAGE_PARTS)


_TEXT_PARTS = frozenset({"text", "input_text", "output_text"})
_COUNTED_FIELDS = frozenset({"role", "content", "name", "tool_calls", "type"})


def count_messages(messages: list[Any], tokenizer: LoadedTokenizer, system: Any = None,
                   tools: Any = None) -> tuple[int, bool]:
    """(input tokens, exact) of chat messages in OpenAI's format, as OpenAI's cookbook counts
    them (https://cookbook.openai.com/examples/how_to_count_tokens_with_tiktoken); a system
    prompt or `instructions` is one more message. Tool definitions and calls, images and
    parts other than text keep the heuristic, and make the count inexact."""
    count = tokenizer.count
    total, exact = 0, True
    if system:
        tokens, exact = _count_content(system, count)
        total += _PER_MESSAGE + count("system") + tokens
    for message in messages:
        if not isinstance(message, dict):
            continue
        role, name = message.get("role"), message.get("name")
        tokens, exact_content = _count_content(message.get("content"), count)
        total += _PER_MESSAGE + tokens + (count(role) if isinstance(role, str) else 0)
        if isinstance(name, str):
            total += count(name) + 1
        calls = message.get("tool_calls")
        if type(calls) is list and calls:
            total += sum(estimate_text(str(call)) for call in calls)
            exact_content = False
        # (the cookbook encodes every field; other fields, a tool reply's tool_call_id, are
        # not counted here)
        exact = exact and exact_content and isinstance(role, str) and \
            message.keys() <= _COUNTED_FIELDS
    if tools:
        total += estimate_text(str(tools))
        exact = False
    return total + _PER_MESSAGE, exact


def _count_content(content: Any, count: Callable[[str], int]) -> tuple[int, bool]:
    if isinstance(content, str):
        return count(content), True
    if not isinstance(content, list):
        return (0, True) if content is None else (count(str(content)), False)
    total, exact = 0, True
    for part in content:
        text = part.get("text") if isinstance(part, dict) else part
        if isinstance(part, dict) and part.get("type") in _TEXT_PARTS and isinstance(text, str):
            total += count(text)
        elif isinstance(part, str):
            total += count(part)
        else:  # images, tool_use, tool_result (its own message once translated), ...
            total += _estimate_content([part])
            exact = False
    return total, exact


def count_input(texts: str | list[Any], tokenizer: LoadedTokenizer) -> int:
    """Input tokens of an embeddings/completions `input` or `prompt`, with a tokenizer:
    texts encoded, token ids one each."""
    count = tokenizer.count
    if isinstance(texts, str):
        return count(texts)
    return sum(count(t) if isinstance(t, str) else len(t) if isinstance(t, list)
               else 1 if type(t) is int else 0 for t in texts)


def input_tokens(texts: str | list[Any], tokenizer: LoadedTokenizer | None) -> int:
    """Input tokens of an embeddings/completions `input` or `prompt` as the gateway counts
    them for a deployment: with its `tokenizer` where it has one, else estimated."""
    return estimate_input(texts) if tokenizer is None else count_input(texts, tokenizer)


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


# The members of an answer's generated part (`ANSWER_MEMBERS`) that are not generated text.
_NOT_GENERATED = frozenset({"id", "call_id", "type", "role", "object", "index", "status",
                            "finish_reason", "stop_reason", "logprobs", "annotations",
                            # base64 audio and images, signed and encrypted reasoning
                            "data", "result", "signature", "encrypted_content"})


def answered_usage(ctx: RequestContext, answer: Any) -> Usage | None:
    """What a non-stream answer its provider sent without a `usage` is billed (never
    nothing, as a stream that ended without its usage report is not): the request's input
    and the text it answered (every string it generated: contents, tool calls' names and
    arguments, reasoning), counted with the deployment's tokenizer where it has one, else
    estimated; embeddings, the input alone. None for a body that is not the operation's
    answer (`answer`: the caller's JSON)."""
    member = c.ANSWER_MEMBERS.get(ctx.operation)
    if member is None or not c.is_answer(answer, ctx.operation):
        return None
    output = 0
    if ctx.operation != c.OPENAI_EMBEDDINGS:
        text = "".join(_generated_texts(answer[member]))
        tokenizer = tokenizer_of(ctx)
        output = estimate_text(text) if tokenizer is None else tokenizer.count(text)
    return Usage(input_tokens=estimate_input_tokens(ctx), output_tokens=output)


def _generated_texts(value: Any) -> list[str]:
    """The strings of an answer's generated part, but for `_NOT_GENERATED` members."""
    return _strings(value, _NOT_GENERATED)[0]


def _strings(value: Any, skipped: frozenset[str], images: frozenset[str] = frozenset()
             ) -> tuple[list[str], int]:
    """(the strings in `value`, but under the members `skipped` names; the number of objects
    whose `type` is one of `images`), iterative: a body may nest as deep as its JSON parser
    allowed."""
    texts: list[str] = []
    counted = 0
    pending: list[Any] = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            texts.append(item)
        elif isinstance(item, list):
            pending.extend(reversed(item))
        elif isinstance(item, dict):
            kind = item.get("type")
            if images and type(kind) is str and kind in images:  # (a list is unhashable)
                counted += 1
            pending.extend(reversed([v for k, v in item.items() if k not in skipped]))
    return texts, counted
