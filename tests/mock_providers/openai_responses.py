"""`POST /v1/responses`: the OpenAI Responses API, JSON and its typed SSE event sequence.

Events (https://platform.openai.com/docs/api-reference/responses-streaming), each with an
`event:` line and a `sequence_number`: response.created, response.in_progress,
response.output_item.added, response.content_part.added, response.output_text.delta...,
response.output_text.done, response.content_part.done, response.output_item.done and
response.completed (response.incomplete when `max_output_tokens` cut the text). A function
call streams response.function_call_arguments.delta/.done instead of the text events.
"""
from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from tests.mock_providers.behaviour import (
    Conversation,
    Reply,
    ToolSpec,
    count_input,
    reply_for,
    split_chunks,
)
from tests.mock_providers.openai_wire import CALLER_FAULT_CODES, content_images, content_text
from tests.mock_providers.wire import (
    JSON,
    BadRequest,
    Call,
    StreamItem,
    body_dict,
    check_openai_types,
    cut_index,
    random_id,
    respond_json,
    respond_stream,
    sse,
)

_MAX_STORED = 100_000  # ids per key: a long test run keeps no more


async def responses(call: Call) -> web.StreamResponse:
    body = body_dict(call)
    check_openai_types(body)
    if not body.get("model"):
        raise BadRequest("Missing required parameter: 'model'.", param="model",
                         code="missing_required_parameter")
    if "input" not in body:
        raise BadRequest("Missing required parameter: 'input'.", param="input",
                         code="missing_required_parameter")
    stored = _stored_responses(call)
    previous = body.get("previous_response_id")
    if previous is not None and previous not in stored:
        raise BadRequest(f"Previous response with id '{previous}' not found.",
                         param="previous_response_id", code="previous_response_not_found")
    conv = responses_conversation(body)
    if previous is not None:  # (billed as input: the stored conversation the reply follows)
        conv.input_tokens += stored[previous]
    reply = reply_for(call.bounded(conv))
    final = response_object(body, reply, random_id("resp_", 48), _item_id(reply))
    if body.get("store", True) is not False and len(stored) < _MAX_STORED:
        stored[final["id"]] = reply.input_tokens + reply.output_tokens
    if body.get("stream") is not True:
        return await respond_json(call, final)
    items = response_events(final, reply, call.config.chunk_chars)
    return await respond_stream(call, items, _error_event(call, items, final))


def _stored_responses(call: Call) -> dict[str, int]:
    """The responses stored for the call's API key: id -> the tokens of the conversation it
    ends (its input and output), which a follow-up naming it is billed as input, as OpenAI
    bills the stored context (the reply is not made from it). OpenAI keeps a response
    (`store`, true by default) for its own organization and project only: a
    `previous_response_id` it does not hold is refused with 400 `previous_response_not_found`,
    "Previous response with id '...' not found." (as clients quote it: bigduu/Bamboo-agent#513,
    maximhq/bifrost#2441)."""
    header = call.request.headers.get("authorization", "")
    return call.state.stored_responses.setdefault(header[7:].strip(), {})


def responses_conversation(body: JSON) -> Conversation:
    raw = body["input"]
    items: list[Any] = [{"role": "user", "content": raw}] if isinstance(raw, str) else list(raw)
    if not items:
        raise BadRequest("Invalid 'input': empty array.", param="input", code="empty_array")
    messages = [item for item in items if isinstance(item, dict) and "role" in item]
    texts = [content_text(m.get("content")) for m in messages]
    texts += [_output_text(item.get("output")) for item in items
              if isinstance(item, dict) and item.get("type") == "function_call_output"]
    instructions = body.get("instructions")
    if isinstance(instructions, str):
        texts.append(instructions)
    last = items[-1] if isinstance(items[-1], dict) else {}
    conv = Conversation(
        input_tokens=count_input(texts, len(messages) + (1 if instructions else 0)),
        max_tokens=body.get("max_output_tokens"), user_last=last.get("role") == "user")
    if last.get("type") == "function_call_output":
        conv.tool_result = _output_text(last.get("output"))
    user = next((m for m in reversed(messages) if m.get("role") == "user"), None)
    if user is not None:
        conv.last_user_text = content_text(user.get("content"))
        conv.images = content_images(user.get("content"))
    conv.tools = [ToolSpec(str(tool.get("name")), tool.get("parameters"))
                  for tool in body.get("tools") or ()
                  if isinstance(tool, dict) and tool.get("type") == "function"]
    choice = body.get("tool_choice")
    conv.tools_enabled = choice != "none"
    if isinstance(choice, dict) and choice.get("type") == "function":
        conv.forced_tool = choice.get("name")
    return conv


def _output_text(output: Any) -> str:
    return output if isinstance(output, str) else content_text(output)


def _item_id(reply: Reply) -> str:
    return random_id("fc_" if reply.tool_call is not None else "msg_", 48)


def output_item(reply: Reply, item_id: str, status: str = "completed") -> JSON:
    call = reply.tool_call
    if call is not None:
        return {"id": item_id, "type": "function_call", "status": status,
                "arguments": call.arguments if status == "completed" else "",
                "call_id": call.id, "name": call.name}
    content = [_text_part(reply.text or "")] if status == "completed" else []
    return {"id": item_id, "type": "message", "status": status, "role": "assistant",
            "content": content}


def _text_part(text: str) -> JSON:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def response_object(body: JSON, reply: Reply, response_id: str, item_id: str) -> JSON:
    incomplete = reply.finish == "length"
    return {
        "id": response_id, "object": "response", "created_at": int(time.time()),
        "status": "incomplete" if incomplete else "completed",
        "background": False, "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"), "model": body.get("model"),
        "output": [output_item(reply, item_id)], "parallel_tool_calls": True,
        "previous_response_id": body.get("previous_response_id"),
        "reasoning": {"effort": None, "summary": None}, "service_tier": "default",
        "store": body.get("store", True), "temperature": body.get("temperature", 1.0),
        "text": body.get("text") or {"format": {"type": "text"}},
        "tool_choice": body.get("tool_choice", "auto"), "tools": body.get("tools") or [],
        "top_p": body.get("top_p", 1.0), "truncation": "disabled",
        "usage": {"input_tokens": reply.input_tokens,
                  "input_tokens_details": {"cached_tokens": 0},
                  "output_tokens": reply.output_tokens,
                  "output_tokens_details": {"reasoning_tokens": 0},
                  "total_tokens": reply.input_tokens + reply.output_tokens},
        "user": None, "metadata": body.get("metadata") or {},
    }


def response_events(final: JSON, reply: Reply, chunk_chars: int) -> list[StreamItem]:
    """The whole event sequence for `final`; content events are the deltas."""
    started = {**final, "status": "in_progress", "incomplete_details": None, "output": [],
               "usage": None}
    item = final["output"][0]
    events: list[tuple[str, JSON, bool]] = [
        ("response.created", {"response": started}, False),
        ("response.in_progress", {"response": started}, False),
        ("response.output_item.added",
         {"output_index": 0, "item": output_item(reply, item["id"], "in_progress")}, False)]
    if reply.tool_call is not None:
        events += _arguments_events(item, chunk_chars)
    else:
        events += _text_events(item, reply.text or "", chunk_chars)
    events.append(("response.output_item.done", {"output_index": 0, "item": item}, False))
    closing = "response.incomplete" if final["status"] == "incomplete" else "response.completed"
    events.append((closing, {"response": final}, False))
    return [(sse({"type": kind, "sequence_number": number, **fields}, kind), is_content)
            for number, (kind, fields, is_content) in enumerate(events)]


def _text_events(item: JSON, text: str, chunk_chars: int) -> list[tuple[str, JSON, bool]]:
    where = {"item_id": item["id"], "output_index": 0, "content_index": 0}
    events = [("response.content_part.added", {**where, "part": _text_part("")}, False)]
    events += [("response.output_text.delta", {**where, "delta": piece, "logprobs": []}, True)
               for piece in split_chunks(text, chunk_chars)]
    events += [("response.output_text.done", {**where, "text": text, "logprobs": []}, False),
               ("response.content_part.done", {**where, "part": _text_part(text)}, False)]
    return events


def _arguments_events(item: JSON, chunk_chars: int) -> list[tuple[str, JSON, bool]]:
    where = {"item_id": item["id"], "output_index": 0}
    events = [("response.function_call_arguments.delta", {**where, "delta": piece}, True)
              for piece in split_chunks(item["arguments"], chunk_chars)]
    events.append(("response.function_call_arguments.done",
                   {**where, "name": item["name"], "arguments": item["arguments"]}, False))
    return events


def _error_event(call: Call, items: list[StreamItem], final: JSON) -> bytes:
    """The Responses API's in-band failure, numbered after the events before the cut.

    "error": the `error` event as OpenAI's streaming reference documents it
    (ResponseErrorEvent: `code`, `message`, `param`, `sequence_number` at the top level).
    "error.nested": as the live API sends it, `code`, `message` and `param` (and a `type`)
    in an `error` object (openai/openai-dotnet#881, Effect-TS/effect#7262); the `type` of a
    request the caller must fix is `invalid_request_error` (openai/openai-dotnet#849:
    `context_length_exceeded`), else the code (#881: `too_many_requests`).
    Either is followed, as on the live API, by `response.failed` with the same error
    (vercel/ai#6534's trace: `error` then `response.failed`, the next sequence number).
    "response.failed" alone: the terminal event of a failed response (ResponseFailedEvent),
    the response with `status: "failed"` and `error: {code, message}` (ResponseError).
    A fault with `stall_s` sends the `error` event alone: the provider hung after it.
    """
    fault = call.fault_of("error_event")
    number = cut_index(items, fault.after_chunks) if fault is not None else len(items)
    code = (fault.code if fault else None) or "server_error"
    message = (fault.message if fault else None) or \
        "The server had an error while processing your request. Sorry about that!"
    kind = fault.event if fault is not None else "error"
    failed = {**final, "status": "failed", "incomplete_details": None, "output": [],
              "usage": None, "error": {"code": code, "message": message}}
    if kind == "response.failed":
        return sse({"type": kind, "sequence_number": number, "response": failed}, kind)
    if kind == "error.nested":
        kind_of = "invalid_request_error" if code in CALLER_FAULT_CODES else code
        nested = {"type": kind_of, "code": code, "message": message, "param": None}
        error = sse({"type": "error", "sequence_number": number, "error": nested}, "error")
    else:
        error = sse({"type": "error", "code": code, "param": None, "sequence_number": number,
                     "message": message}, "error")
    if fault is not None and fault.stall_s > 0:
        return error
    return error + sse({"type": "response.failed", "sequence_number": number + 1,
                        "response": failed}, "response.failed")
