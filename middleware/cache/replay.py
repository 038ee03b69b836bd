"""Stored answers replayed as streams (middleware/cache/collect.py does the reverse).

The cache keeps every answer as the non-stream response body in the caller's format, so one
entry serves both kinds of request (issue 4, "Streams"). Pure: no I/O, no clock.

Wire formats rebuilt here:
- OpenAI chat (https://platform.openai.com/docs/api-reference/chat-streaming): a
  `chat.completion.chunk` per delta; the first delta of a choice carries `role`; a tool call's
  first delta carries `index`, `id`, `type` and the function name, later ones argument text;
  `finish_reason` comes in a last chunk per choice; with `stream_options.include_usage` every
  chunk has `"usage": null` and a final chunk has `choices: []` and the usage; then
  `data: [DONE]`.
- OpenAI completions (https://platform.openai.com/docs/api-reference/completions): the same
  framing, with `object: text_completion` and choices carrying `text`.
- Anthropic (https://docs.anthropic.com/en/api/messages-streaming): `message_start` (the
  Message with empty content and the input usage), per block a `content_block_start`, its
  deltas (`text_delta`, `input_json_delta`, `thinking_delta`, `signature_delta`,
  `citations_delta`) and `content_block_stop`, a `ping`, `message_delta` (stop_reason,
  stop_sequence, cumulative usage) and `message_stop`.

Cached usage: the usage a cache hit returns is the original call's, unchanged, with
`"x_sluicegate_cached": true` added inside the `usage` object (`mark_cached`). Not
`prompt_tokens_details.cached_tokens = prompt_tokens`: that count already means provider
prompt-cache reads billed at a discount (gateway.context.Usage reads it, as do cost trackers),
and Anthropic has no such field without changing `input_tokens`, which excludes cache reads.
Both official SDKs keep unknown fields (their models allow extras): `usage.model_extra`.

Normalisation (what `collect_stream(replay_stream(x))` may not give back as x): a stored body
never carries the cached flag (collecting drops it); an OpenAI answer stored without `usage`
replays without the usage chunk, and one replayed without `include_usage` collects without
usage; message fields a stream never carries, such as OpenAI's `annotations: []`, are only
kept when the stream had them.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from itertools import zip_longest
from typing import Any

import orjson

from gateway.sse import OPENAI_DONE, named_event, openai_event

JSON = dict[str, Any]

CACHED_USAGE_FLAG = "x_sluicegate_cached"
# A replay cuts each text into about MAX_PIECES deltas of at least PIECE_MIN_CHARS: enough
# for clients to exercise their delta accumulation, few enough that a long answer replays
# in tens of events, within issue 4's ~1 ms budget for a hit.
PIECE_MIN_CHARS = 20
MAX_PIECES = 16

CHUNK_ONLY = ("object", "choices", "usage")  # envelope keys a chunk sets for itself
_CHOICE_STREAMED = ("index", "message", "delta", "text", "logprobs", "finish_reason")
_MESSAGE_STREAMED = ("role", "content", "refusal", "tool_calls", "function_call")
# Sent in message_delta; stop_details only by API versions that have it.
_STOP_FIELDS = ("stop_reason", "stop_sequence", "stop_details")
_PING = named_event("ping", {"type": "ping"})
_MESSAGE_STOP = named_event("message_stop", {"type": "message_stop"})


def mark_cached(body: JSON) -> JSON:
    """A copy of a stored response whose `usage` says it came from the cache."""
    usage = body.get("usage")
    if not isinstance(usage, dict):
        return body
    return {**body, "usage": {**usage, CACHED_USAGE_FLAG: True}}


def pieces(text: str) -> list[str]:
    """`text` cut into deltas of about equal size, after a space where one is near."""
    size = max(PIECE_MIN_CHARS, math.ceil(len(text) / MAX_PIECES))
    out: list[str] = []
    start = 0
    while len(text) - start > size:
        end = text.rfind(" ", start + 1, start + size) + 1 or start + size
        out.append(text[start:end])
        start = end
    if start < len(text):
        out.append(text[start:])
    return out


_USAGE_KEY = b'"usage"'
_FLAG_KEY = b'"' + CACHED_USAGE_FLAG.encode() + b'"'
_FLAG_MEMBER = _FLAG_KEY + b":true"


def marked_json(raw: bytes) -> bytes:
    """A stored JSON answer as a hit sends it: `mark_cached` of it, as JSON text.

    The flag is written into raw's `usage` object, so the answer keeps the bytes it was
    first served with and is not parsed. That holds when `"usage"` occurs in raw exactly once
    (a quote inside a JSON string is escaped, so those seven bytes can only be a key or the
    string "usage", and an answer with usage has the top-level key) and the flag does not;
    anything else is parsed, marked and written anew.
    """
    if _FLAG_KEY not in raw:
        found = raw.count(_USAGE_KEY)
        if found == 0:
            return raw  # no usage to mark
        if found == 1:
            after_key = raw.index(_USAGE_KEY) + len(_USAGE_KEY)
            opening = raw.find(b"{", after_key)
            if opening > 0 and raw[after_key:opening].strip() == b":":
                empty = raw[opening + 1:].lstrip()[:1] == b"}"
                member = _FLAG_MEMBER if empty else _FLAG_MEMBER + b","
                return b"".join((raw[:opening + 1], member, raw[opening + 1:]))
    body = orjson.loads(raw)
    return orjson.dumps(mark_cached(body)) if isinstance(body, dict) else raw


# -- replay: stored body -> SSE chunks ---------------------------------------------------------

def replay_stream(body: JSON, api_format: str, *, include_usage: bool,
                  cached: bool = True) -> list[bytes]:
    """The stream a stored non-stream response would have been, in the ingress format.

    Each item is one complete SSE event. `include_usage` is the OpenAI client's
    `stream_options.include_usage` (Anthropic streams always carry usage); `cached` marks the
    usage as the module docstring says. Raises ValueError for a body with no stream form
    (an embedding, a Responses API object).
    """
    if cached:
        body = mark_cached(body)
    if api_format == "anthropic" and body.get("type") == "message":
        return _replay_message(body)
    if api_format == "openai" and body.get("object") == "chat.completion":
        return _replay_openai(body, include_usage, "chat.completion.chunk", _chat_choice_chunks,
                              {"delta": {}})
    if api_format == "openai" and body.get("object") == "text_completion":
        return _replay_openai(body, include_usage, "text_completion", _text_choice_chunks,
                              {"text": ""})
    kind = body.get("object") or body.get("type")
    raise ValueError(f"a {api_format} {kind!r} response has no stream form")


def _replay_openai(body: JSON, include_usage: bool, chunk_object: str,
                   choice_chunks: Callable[[JSON], list[JSON]], finish: JSON) -> list[bytes]:
    envelope: JSON = {"id": body.get("id"), "object": chunk_object}
    envelope.update((key, value) for key, value in body.items() if key not in CHUNK_ONLY)
    no_usage_yet: JSON = {"usage": None} if include_usage else {}
    choices = [choice for choice in body.get("choices") or () if isinstance(choice, dict)]
    # Choices interleave, as OpenAI sends them for n > 1; each ends with its finish_reason.
    rounds = zip_longest(*(choice_chunks(choice) for choice in choices))
    chunks = [chunk for group in rounds for chunk in group if chunk is not None]
    chunks += [_finish_chunk(choice, finish) for choice in choices]
    out = [openai_event({**envelope, "choices": [chunk], **no_usage_yet}) for chunk in chunks]
    if include_usage and isinstance(body.get("usage"), dict):
        out.append(openai_event({**envelope, "choices": [], "usage": body["usage"]}))
    out.append(OPENAI_DONE)
    return out


def _chat_choice_chunks(choice: JSON) -> list[JSON]:
    message = choice.get("message") or {}
    opening: JSON = {"role": message.get("role") or "assistant"}
    if "content" in message:  # (a list of parts, as Mistral's reasoning models send: whole)
        content = message["content"]
        opening["content"] = "" if isinstance(content, str) else content
    if "refusal" in message:
        opening["refusal"] = None
    opening.update((k, v) for k, v in message.items() if k not in _MESSAGE_STREAMED)
    deltas = [opening]
    deltas += [{"content": piece} for piece in pieces(_text(message.get("content")))]
    deltas += [{"refusal": piece} for piece in pieces(_text(message.get("refusal")))]
    for position, call in enumerate(message.get("tool_calls") or ()):
        deltas += [{"tool_calls": [delta]} for delta in _tool_call_deltas(position, call)]
    if isinstance(message.get("function_call"), dict):
        deltas += [{"function_call": delta}
                   for delta in _function_deltas(message["function_call"])]
    return _choice_chunks(choice, [{"delta": delta} for delta in deltas])


def _tool_call_deltas(position: int, call: JSON) -> list[JSON]:
    function = call.get("function")
    if not isinstance(function, dict):  # a custom tool call: sent whole
        return [{"index": position, **call}]
    head, *rest = _function_deltas(function)
    return [{"index": position, **call, "function": head},
            *({"index": position, "function": delta} for delta in rest)]


def _function_deltas(function: JSON) -> list[JSON]:
    arguments = _text(function.get("arguments"))
    return [{**function, "arguments": ""}, *({"arguments": p} for p in pieces(arguments))]


def _text_choice_chunks(choice: JSON) -> list[JSON]:
    texts = pieces(_text(choice.get("text"))) or [""]
    return _choice_chunks(choice, [{"text": text} for text in texts])


def _choice_chunks(choice: JSON, bodies: list[JSON]) -> list[JSON]:
    """Chunk choices for one stored choice; its logprobs ride whole on the first."""
    index = choice.get("index", 0)
    chunks = [{"index": index, **body, "logprobs": None, "finish_reason": None}
              for body in bodies]
    chunks[0]["logprobs"] = choice.get("logprobs")
    return chunks


def _finish_chunk(choice: JSON, empty: JSON) -> JSON:
    extras = {k: v for k, v in choice.items() if k not in _CHOICE_STREAMED}  # Azure filters
    return {"index": choice.get("index", 0), **empty, "logprobs": None,
            "finish_reason": choice.get("finish_reason"), **extras}


def _replay_message(body: JSON) -> list[bytes]:
    usage: JSON = body["usage"] if isinstance(body.get("usage"), dict) else {}
    # Output so far is nothing: clients that add message_start's count to message_delta's
    # final one still get the right total.
    start: JSON = {**body, "content": [], "usage": {**usage, "output_tokens": 0}}
    delta = {key: body.get(key) for key in _STOP_FIELDS if key in body or key != "stop_details"}
    start.update(dict.fromkeys(delta))  # known only at the end of a real stream
    out = [named_event("message_start", {"type": "message_start", "message": start})]
    for index, block in enumerate(body.get("content") or ()):
        out += _block_events(index, block)
    out.insert(min(2, len(out)), _PING)  # after the first content_block_start, as Anthropic
    out.append(named_event("message_delta",
                           {"type": "message_delta", "delta": delta, "usage": usage}))
    out.append(_MESSAGE_STOP)
    return out


def _block_events(index: int, block: JSON) -> list[bytes]:
    start, deltas = _block_start_and_deltas(block)
    return [named_event("content_block_start",
                        {"type": "content_block_start", "index": index, "content_block": start}),
            *(named_event("content_block_delta",
                          {"type": "content_block_delta", "index": index, "delta": delta})
              for delta in deltas),
            named_event("content_block_stop", {"type": "content_block_stop", "index": index})]


def _block_start_and_deltas(block: JSON) -> tuple[JSON, list[JSON]]:
    kind = block.get("type")
    if kind == "text":
        start = {**block, "text": ""}
        deltas = [{"type": "text_delta", "text": p} for p in pieces(_text(block.get("text")))]
        citations = block.get("citations")
        if isinstance(citations, list) and citations:
            start["citations"] = []
            deltas = [{"type": "citations_delta", "citation": c} for c in citations] + deltas
        return start, deltas
    if kind == "thinking":
        deltas = [{"type": "thinking_delta", "thinking": p}
                  for p in pieces(_text(block.get("thinking")))]
        if block.get("signature"):
            deltas.append({"type": "signature_delta", "signature": block["signature"]})
        return {**block, "thinking": "", "signature": ""}, deltas
    if isinstance(block.get("input"), dict):  # tool_use, server_tool_use, mcp_tool_use
        partial = orjson.dumps(block["input"]).decode()
        return {**block, "input": {}}, [{"type": "input_json_delta", "partial_json": p}
                                        for p in pieces(partial)]
    return block, []  # redacted thinking, server tool results: whole in their start event


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""
