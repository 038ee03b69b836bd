"""`POST /v1/chat/completions` for OpenAI, Azure and Mistral: JSON and SSE, tools, `n`,
logprobs.

Shapes follow https://platform.openai.com/docs/api-reference/chat: a stream is
`chat.completion.chunk` objects, then `data: [DONE]`; with `stream_options.include_usage`
every chunk carries `"usage": null` and a last chunk has `choices: []` and the usage.
Mistral refuses `stream_options.include_usage` and always puts the usage on the stream's
last chunk, the one with the finish reason (mistralai/client-python#40); Azure refuses
`stream_options` on API versions before it was added.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from tests.mock_providers.behaviour import (
    Conversation,
    Reply,
    ToolSpec,
    count_input,
    reply_for,
    split_chunks,
    word_logprob,
    words,
)
from tests.mock_providers.openai_wire import content_images, content_text
from tests.mock_providers.wire import (
    JSON,
    BadRequest,
    Call,
    StreamItem,
    body_dict,
    check_openai_types,
    dumps,
    random_id,
    respond_json,
    respond_stream,
)

FINGERPRINT = "fp_mock0001"
MAX_STOP_SEQUENCES = 4  # `stop`: "Up to 4 sequences" (the chat API reference)
DONE = b"data: [DONE]\n\n"
TOKEN_PATTERN = re.compile(r"\s*\S+|\s+")
_AZURE_FILTER = {name: {"filtered": False, "severity": "safe"}
                 for name in ("hate", "self_harm", "sexual", "violence")}


@dataclass(slots=True)
class Chat:
    """One chat request's settings that shape every choice and chunk."""

    id: str
    created: int
    model: str
    n: int
    top_logprobs: int | None  # None: no logprobs asked for
    include_usage: bool
    azure: bool
    usage_on_finish: bool = False  # (Mistral's, whatever was asked)
    # `MockConfig.reasoning_field`, and the reasoning that comes before the reply in it.
    reasoning_field: str | None = None
    reasoning: str = ""

    @property
    def reasoning_tokens(self) -> int:
        return words(self.reasoning)


async def chat_completions(call: Call) -> web.StreamResponse:
    body = body_dict(call)
    check_openai_types(body)
    validate_chat(body, need_model=call.provider != "azure",
                  max_stops=None if call.provider == "mistral" else MAX_STOP_SEQUENCES)
    validate_stream_options(call, body)
    conversation = call.bounded(chat_conversation(body))
    reply = reply_for(conversation)
    chat = _chat_settings(call, body)
    if call.config.reasoning_field is not None:
        chat.reasoning_field = call.config.reasoning_field
        chat.reasoning = "Reasoning about: " + conversation.last_user_text
    finish = finish_reason(reply, body.get("tool_choice"))
    if body.get("stream") is True and call.fault_of("ignore_stream") is None:
        items = chat_chunks(chat, reply, finish, call.config.chunk_chars)
        if chat.azure and call.config.azure_prompt_filter_chunk:
            items.insert(0, azure_prompt_filter_chunk())
        if call.config.omit_done:
            items.pop()  # (the DONE line)
        return await respond_stream(call, items, call.stream_error())
    return await respond_json(call, chat_completion(chat, reply, finish))


# Azure API versions without `stream_options`: 2023-05-15 (openai/openai-python#1469) and
# those before mid-2024 ("Unrecognized request argument supplied: stream_options",
# langchain-ai/langchain#23552, June 2024); the 2024-10-21 GA version has it
# (griptape-ai/griptape#1640). The versions between are left accepting it.
_AZURE_STREAM_OPTIONS_SINCE = "2024-07-01"


def validate_stream_options(call: Call, body: JSON) -> None:
    options = body.get("stream_options")
    if call.provider == "mistral" and isinstance(options, dict) and "include_usage" in options:
        raise BadRequest("Extra inputs are not permitted", status=422,
                         param="stream_options.include_usage", code="extra_forbidden")
    version = call.request.query.get("api-version", "")
    if call.provider == "azure" and options is not None and \
            version[:10] < _AZURE_STREAM_OPTIONS_SINCE:
        raise BadRequest("Unrecognized request argument supplied: stream_options")


def validate_chat(body: JSON, *, need_model: bool, max_stops: int | None) -> None:
    if need_model and not body.get("model"):
        raise BadRequest("you must provide a model parameter")
    messages = body.get("messages")
    if messages is None:
        raise BadRequest("Missing required parameter: 'messages'.", param="messages",
                         code="missing_required_parameter")
    if not isinstance(messages, list):
        raise BadRequest("Invalid type for 'messages': expected an array of objects.",
                         param="messages", code="invalid_type")
    if not messages:
        raise BadRequest("Invalid 'messages': empty array. Expected an array with minimum "
                         "length 1, but got an empty array instead.", param="messages",
                         code="empty_array")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise BadRequest(f"Missing required parameter: 'messages[{index}].role'.",
                             param=f"messages[{index}].role", code="missing_required_parameter")
    if max_stops is not None:
        validate_stop(body, max_stops)
    n = body.get("n")
    if n is not None and (not isinstance(n, int) or not 1 <= n <= 128):
        raise BadRequest(f"Invalid 'n': expected an integer between 1 and 128, got {n!r}.",
                         param="n", code="invalid_value")


def validate_stop(body: JSON, max_stops: int) -> None:
    """`stop` with more sequences than the API takes, refused as OpenAI and Azure refuse it
    (continuedev/continue#1572, QwenLM/Qwen-Agent#228)."""
    stop = body.get("stop")
    if isinstance(stop, list) and len(stop) > max_stops:
        raise BadRequest(f"Invalid 'stop': array too long. Expected an array with maximum "
                         f"length {max_stops}, but got an array with length "
                         f"{len(stop)} instead.", param="stop", code="array_above_max_length")


def chat_conversation(body: JSON) -> Conversation:
    messages: list[JSON] = body["messages"]
    last = messages[-1]
    conv = Conversation(
        input_tokens=count_input((content_text(m.get("content")) for m in messages),
                                 len(messages)),
        max_tokens=_first_int(body, "max_completion_tokens", "max_tokens"),
        user_last=last.get("role") == "user")
    if last.get("role") in ("tool", "function"):
        conv.tool_result = content_text(last.get("content"))
    user = next((m for m in reversed(messages) if m.get("role") == "user"), None)
    if user is not None:
        conv.last_user_text = content_text(user.get("content"))
        conv.images = content_images(user.get("content"))
    conv.tools = [ToolSpec(str(tool["function"].get("name")), tool["function"].get("parameters"))
                  for tool in body.get("tools") or ()
                  if isinstance(tool, dict) and isinstance(tool.get("function"), dict)]
    choice = body.get("tool_choice")
    conv.tools_enabled = choice != "none"
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        conv.forced_tool = choice["function"].get("name")
    return conv


def finish_reason(reply: Reply, tool_choice: Any) -> str:
    if reply.tool_call is None:
        return reply.finish
    # A function forced by name finishes with "stop", not "tool_calls", on the real API.
    return "stop" if isinstance(tool_choice, dict) else "tool_calls"


def _first_int(body: JSON, *names: str) -> int | None:
    for name in names:
        value = body.get(name)
        if isinstance(value, int):
            return value
    return None


def _chat_settings(call: Call, body: JSON) -> Chat:
    top: int | None = None
    if body.get("logprobs") is True:
        top = int(body.get("top_logprobs") or 0)
    options = body.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    model = call.answered_model(str(body.get("model")
                                     or call.request.match_info.get("deployment", "")))
    mistral = call.provider == "mistral"
    return Chat(random_id("chatcmpl-", 29), int(time.time()), model, int(body.get("n") or 1),
                top, include_usage and not mistral, call.provider == "azure", mistral)


# -- rendering --------------------------------------------------------------------------------

def usage(prompt: int, completion: int, reasoning: int = 0) -> JSON:
    """`completion` includes the `reasoning` tokens, as OpenAI counts them."""
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": reasoning, "audio_tokens": 0,
                                          "accepted_prediction_tokens": 0,
                                          "rejected_prediction_tokens": 0}}


def _usage(chat: Chat, reply: Reply) -> JSON:
    reasoning = chat.reasoning_tokens * chat.n
    return usage(reply.input_tokens, reply.output_tokens * chat.n + reasoning, reasoning)


def logprobs_content(text: str, top: int) -> list[JSON]:
    entries = []
    for token in TOKEN_PATTERN.findall(text):
        logprob = word_logprob(token)
        alternatives = [{"token": token, "logprob": logprob, "bytes": list(token.encode())}]
        alternatives += [{"token": f"{token}{i}", "logprob": round(logprob - i, 4),
                          "bytes": list(f"{token}{i}".encode())} for i in range(1, top)]
        entries.append({"token": token, "logprob": logprob, "bytes": list(token.encode()),
                        "top_logprobs": alternatives[:top]})
    return entries


def _logprobs(chat: Chat, text: str) -> JSON | None:
    if chat.top_logprobs is None:
        return None
    return {"content": logprobs_content(text, chat.top_logprobs), "refusal": None}


def chat_completion(chat: Chat, reply: Reply, finish: str) -> JSON:
    message: JSON = {"role": "assistant", "content": reply.text, "refusal": None,
                     "annotations": []}
    if chat.reasoning_field is not None:
        message[chat.reasoning_field] = chat.reasoning
    if reply.tool_call is not None:
        call = reply.tool_call
        message["tool_calls"] = [{"id": call.id, "type": "function",
                                  "function": {"name": call.name, "arguments": call.arguments}}]
    choices = []
    for index in range(chat.n):
        choice = {"index": index, "message": message, "logprobs": _logprobs(chat, reply.text or ""),
                  "finish_reason": finish}
        if chat.azure:
            choice["content_filter_results"] = _AZURE_FILTER
        choices.append(choice)
    body: JSON = {"id": chat.id, "object": "chat.completion", "created": chat.created,
                  "model": chat.model, "choices": choices,
                  "usage": _usage(chat, reply), "system_fingerprint": FINGERPRINT}
    if chat.azure:
        body["prompt_filter_results"] = [{"prompt_index": 0,
                                          "content_filter_results": _AZURE_FILTER}]
    else:
        body["service_tier"] = "default"
    return body


def chat_chunks(chat: Chat, reply: Reply, finish: str, chunk_chars: int = 8) -> list[StreamItem]:
    """Every event of the stream; content events are the text and arguments deltas."""
    opening, pieces = _opening_and_pieces(reply, chunk_chars)
    items: list[StreamItem] = []
    call_start: JSON | None = None
    if chat.reasoning_field is not None and "tool_calls" in opening:  # (after the reasoning)
        call_start = {"tool_calls": opening.pop("tool_calls")}
    for index in range(chat.n):
        items.append((_chunk(chat, index, opening), False))
    if chat.reasoning_field is not None:
        for piece in split_chunks(chat.reasoning, chunk_chars):
            for index in range(chat.n):
                items.append((_chunk(chat, index, {chat.reasoning_field: piece}), True))
    for index in range(chat.n if call_start is not None else 0):
        items.append((_chunk(chat, index, call_start or {}), False))
    for piece in pieces:
        for index in range(chat.n):
            items.append((_chunk(chat, index, *_piece_delta(reply, piece, chat)), True))
    usage_now = _usage(chat, reply) if chat.usage_on_finish else None
    for index in range(chat.n):
        items.append((_chunk(chat, index, {}, finish=finish, usage_now=usage_now), False))
    if chat.include_usage:
        final = _envelope(chat, [])
        final["usage"] = _usage(chat, reply)
        items.append((b"data: " + dumps(final) + b"\n\n", False))
    items.append((DONE, False))
    return items


def _opening_and_pieces(reply: Reply, chunk_chars: int) -> tuple[JSON, list[str]]:
    call = reply.tool_call
    if call is None:
        return ({"role": "assistant", "content": "", "refusal": None},
                split_chunks(reply.text or "", chunk_chars))
    opening = {"role": "assistant", "content": None, "refusal": None, "tool_calls": [
        {"index": 0, "id": call.id, "type": "function",
         "function": {"name": call.name, "arguments": ""}}]}
    return opening, split_chunks(call.arguments, chunk_chars)


def _piece_delta(reply: Reply, piece: str, chat: Chat) -> tuple[JSON, str | None, JSON | None]:
    if reply.tool_call is not None:
        return {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}, None, None
    return {"content": piece}, None, _logprobs(chat, piece)


def _envelope(chat: Chat, choices: list[JSON]) -> JSON:
    chunk: JSON = {"id": chat.id, "object": "chat.completion.chunk", "created": chat.created,
                   "model": chat.model, "system_fingerprint": FINGERPRINT, "choices": choices}
    if not chat.azure:
        chunk["service_tier"] = "default"
    if chat.include_usage:
        chunk["usage"] = None
    return chunk


def _chunk(chat: Chat, index: int, delta: JSON, finish: str | None = None,
           logprobs: JSON | None = None, usage_now: JSON | None = None) -> bytes:
    choice: JSON = {"index": index, "delta": delta, "logprobs": logprobs,
                    "finish_reason": finish}
    if chat.azure:
        choice["content_filter_results"] = {} if finish else _AZURE_FILTER
    chunk = _envelope(chat, [choice])
    if usage_now is not None:
        chunk["usage"] = usage_now
    return b"data: " + dumps(chunk) + b"\n\n"


def azure_prompt_filter_chunk() -> StreamItem:
    """Azure's first stream event: no choices, only the prompt's filter results."""
    chunk = {"id": "", "object": "", "created": 0, "model": "", "choices": [],
             "prompt_filter_results": [{"prompt_index": 0,
                                        "content_filter_results": _AZURE_FILTER}]}
    return b"data: " + dumps(chunk) + b"\n\n", False
