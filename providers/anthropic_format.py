"""Anthropic Messages <-> OpenAI Chat Completions: pure functions, dicts in and dicts out.

Wire formats: https://docs.anthropic.com/en/api/messages (request, Message, content blocks,
tool use, images, stop reasons, usage with cache tokens), .../api/errors, and OpenAI's
https://platform.openai.com/docs/api-reference/chat. The stream translators live in
providers.anthropic_stream and are re-exported here.

OpenAI -> Anthropic (an OpenAI client on an Anthropic model):
- `response_format` json_schema becomes `output_config.format` ({"type": "json_schema",
  "schema"}), Anthropic's structured outputs (generally available on Claude 4.5 and later
  models; the older beta `output_format` is deprecated). json_object has no Anthropic mode
  without a schema, so it adds one sentence to the system prompt asking for a JSON object.
- `user` (or `safety_identifier`) becomes `metadata.user_id`.
- Tool call ids Anthropic refuses (it takes ^[a-zA-Z0-9_-]+$; other providers' ids may
  hold `.` or `:`) become `toolu_` and a hash of the id, alike in the tool_use and the
  tool_result, and in responses translated for Anthropic clients, so those clients only
  ever hold ids Anthropic takes.
- `temperature` is clamped to Anthropic's 0..1 (OpenAI allows up to 2). With `top_p` as
  well, only one goes (Claude 4.5 models refuse both): the temperature, unless it is 1 (the
  default of both APIs), in which case the top_p.
- A history with tool calls but no `tools` declares the tools it called, with
  `tool_choice` none: Anthropic refuses tool blocks in a request without tools.
- Dropped (no Anthropic equivalent, the answer stays usable): seed, frequency_penalty,
  presence_penalty, logit_bias, stream_options (Anthropic streams always report usage),
  service_tier, store, metadata, prediction, reasoning_effort, verbosity,
  web_search_options, prompt_cache_key, message `name`, image `detail`.
- Refused with TranslationError: n > 1, logprobs, audio, legacy functions/function_call,
  non-function tools, content parts Anthropic cannot take, unparsable tool arguments.

Anthropic -> OpenAI (our /v1/messages ingress on an OpenAI-format model):
- Thinking blocks and the `thinking`/`output_config.effort` settings, top_k,
  cache_control, service_tier and container are dropped.
- A tool_result's `is_error` has no OpenAI field; the result text, which states the
  error, is kept unchanged. Images in a tool_result (OpenAI tool messages hold text only)
  follow the tool messages in a user message, labelled with the tool call id.
- Server tools, server-tool blocks, MCP servers and file/URL documents are refused, and
  more than 4 `stop_sequences` for OpenAI and Azure (their `stop` takes 4).
- In a response, tool-call arguments that are not a JSON object become `input: {}`: a
  tool_use block must hold an object, and the Anthropic API rejects unknown block fields
  when a client echoes the message back, so the raw text cannot travel with it.
"""
from __future__ import annotations

import uuid
from typing import Any

import orjson

from providers.anthropic_stream import (
    ChatStreamToMessages,
    MessagesStreamToChat,
    anthropic_usage,
    chat_usage,
    completion_id,
    created_now,
    finish_reason,
    message_id,
    stop_reason,
    tool_use_id,
)
from providers.streams import StreamError as UpstreamStreamError
from providers.translation import TranslationError, tool_arguments

JSON = dict[str, Any]

_IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})
_JSON_INSTRUCTION = "Respond with a single valid JSON object and nothing else."
_ANTHROPIC_CHOICES = {"auto": {"type": "auto"}, "none": {"type": "none"},
                      "required": {"type": "any"}}
_CHAT_CHOICES = {"auto": "auto", "none": "none", "any": "required"}
# Error types by status, from the errors page, for bodies that carry none.
_ERROR_BY_STATUS = {
    400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
    403: "permission_error", 404: "not_found_error", 413: "request_too_large",
    429: "rate_limit_error", 500: "api_error", 504: "timeout_error", 529: "overloaded_error",
}

__all__ = [
    "ChatStreamToMessages", "MessagesStreamToChat", "TranslationError", "UpstreamStreamError",
    "chat_request_to_messages", "chat_response_to_messages", "messages_request_to_chat",
    "messages_response_to_chat", "parse_anthropic_error",
]


# -- OpenAI chat request -> Anthropic Messages request ---------------------------------------

def chat_request_to_messages(body: JSON, upstream_model: str, *,
                             default_max_tokens: int = 4096) -> JSON:
    """OpenAI chat request -> Anthropic Messages request (see the module docstring)."""
    _refuse_inexpressible(body)
    system, messages = _anthropic_messages(body.get("messages") or [])
    if not messages:
        raise TranslationError("Anthropic models need at least one user or assistant message.")
    format_type = (body.get("response_format") or {}).get("type")
    if format_type == "json_object":
        system.append({"type": "text", "text": _JSON_INSTRUCTION})
    max_tokens = body.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_tokens")
    request: JSON = {"model": upstream_model, "messages": messages,
                     "max_tokens": default_max_tokens if max_tokens is None else max_tokens}
    if system:
        plain = len(system) == 1 and set(system[0]) == {"type", "text"}
        request["system"] = system[0]["text"] if plain else system
    request.update(_sampling(body))
    if body.get("tools"):
        request.update(_anthropic_tools(body["tools"], body.get("tool_choice"),
                                        body.get("parallel_tool_calls")))
    else:
        request.update(_tools_of_history(messages))
    if format_type == "json_schema":
        schema = (body["response_format"].get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise TranslationError("response_format json_schema needs a `schema` object.",
                                   param="response_format")
        request["output_config"] = {"format": {"type": "json_schema", "schema": schema}}
    user = body.get("user") or body.get("safety_identifier")
    if isinstance(user, str) and user:
        request["metadata"] = {"user_id": user}
    if body.get("stream") is not None:
        request["stream"] = bool(body["stream"])
    return request


def _refuse_inexpressible(body: JSON) -> None:
    if (body.get("n") or 1) > 1:
        raise TranslationError("Anthropic models return one choice per request; `n` must be 1.",
                               param="n")
    if body.get("logprobs"):
        raise TranslationError("Anthropic models do not return log probabilities (`logprobs`).",
                               param="logprobs")
    if body.get("functions") or body.get("function_call"):
        raise TranslationError("legacy `functions`/`function_call` are not supported for "
                               "Anthropic models; send `tools` and `tool_choice` instead.")
    if "audio" in (body.get("modalities") or ()) or body.get("audio"):
        raise TranslationError("audio output is not available from Anthropic models.")
    format_type = (body.get("response_format") or {}).get("type")
    if format_type not in (None, "text", "json_object", "json_schema"):
        raise TranslationError(f"response_format {format_type!r} has no Anthropic equivalent.",
                               param="response_format")


def _sampling(body: JSON) -> JSON:
    out: JSON = {}
    temperature, top_p = body.get("temperature"), body.get("top_p")
    if temperature is not None and top_p is not None:
        # Claude 4.5 models and Opus 4.1 refuse the pair (the 4.5 migration guide: "Use only
        # temperature OR top_p, not both"). A temperature of 1 is both APIs' default, so
        # then the top_p is what the caller chose.
        if float(temperature) == 1.0:
            temperature = None
        else:
            top_p = None
    if temperature is not None:
        out["temperature"] = min(float(temperature), 1.0)
    if top_p is not None:
        out["top_p"] = top_p
    if isinstance(body.get("top_k"), int):  # a common extension; Anthropic takes it natively
        out["top_k"] = body["top_k"]
    stop = body.get("stop")
    if stop:
        out["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    return out


def _anthropic_messages(messages: list[JSON]) -> tuple[list[JSON], list[JSON]]:
    """(system text blocks, alternating messages whose content is always a block list)."""
    system: list[JSON] = []
    turns: list[JSON] = []
    for message in messages:
        role = message.get("role")
        if role in ("system", "developer"):
            system += _text_blocks(message.get("content"), str(role))
            continue
        if role == "user":
            kind, blocks = "user", _user_blocks(message.get("content"))
        elif role == "assistant":
            kind, blocks = "assistant", _assistant_blocks(message)
        elif role == "tool":
            kind, blocks = "user", [_tool_result(message)]
        else:
            raise TranslationError(f"message role {role!r} is not supported for Anthropic models.")
        if not blocks:
            continue  # Anthropic rejects empty content
        if turns and turns[-1]["role"] == kind:  # the API wants user/assistant to alternate
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": kind, "content": blocks})
    for turn in turns:  # tool_result blocks must open their user message
        if turn["role"] == "user":
            turn["content"].sort(key=lambda block: block["type"] != "tool_result")
    return system, turns


def _text_blocks(content: Any, role: str) -> list[JSON]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    blocks = []
    for part in content:
        if part.get("type") not in ("text", "refusal"):
            raise TranslationError(f"{role} messages can only hold text for Anthropic models, "
                                   f"not {part.get('type')!r} parts.")
        text = part.get("text", part.get("refusal"))
        if text:
            blocks.append(_with_cache_control({"type": "text", "text": text}, part))
    return blocks


def _with_cache_control(block: JSON, part: JSON) -> JSON:
    # OpenAI has no cache_control, but clients written for Anthropic-via-OpenAI routers
    # put it on content parts; Anthropic honours it on the block.
    if isinstance(part.get("cache_control"), dict):
        block["cache_control"] = part["cache_control"]
    return block


def _user_blocks(content: Any) -> list[JSON]:
    if content is None or isinstance(content, str):
        return _text_blocks(content, "user")
    blocks = []
    for part in content:
        kind = part.get("type")
        if kind == "text":
            blocks += _text_blocks([part], "user")
        elif kind == "image_url":
            image = part["image_url"]
            url = image.get("url") if isinstance(image, dict) else image
            blocks.append(_with_cache_control(_image_block(str(url)), part))
        elif kind == "file":
            blocks.append(_with_cache_control(_document_block(part.get("file") or {}), part))
        else:
            raise TranslationError(f"content parts of type {kind!r} cannot be sent to "
                                   "Anthropic models.")
    return blocks


def _image_block(url: str) -> JSON:
    if url.startswith(("https://", "http://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    if not url.startswith("data:"):
        raise TranslationError("image URLs must be http(s) or base64 data: URLs.")
    media_type, data = _data_url(url)
    if media_type not in _IMAGE_TYPES:
        raise TranslationError(f"Anthropic models take JPEG, PNG, GIF or WebP images, "
                               f"not {media_type!r}.")
    return {"type": "image", "source": {"type": "base64", "media_type": media_type,
                                        "data": data}}


def _data_url(url: str) -> tuple[str, str]:
    header, comma, data = url[len("data:"):].partition(",")
    if not comma or not header.endswith(";base64"):
        raise TranslationError("data: URLs must be base64-encoded.")
    return header.split(";")[0], data


def _document_block(file: JSON) -> JSON:
    data = file.get("file_data")
    if not isinstance(data, str) or not data:
        raise TranslationError("files must be sent inline (`file_data`) to Anthropic models; "
                               "uploaded `file_id`s are not available there.")
    if data.startswith("data:"):
        media_type, data = _data_url(data)
    else:
        name = str(file.get("filename") or "").lower()
        media_type = "application/pdf" if name.endswith(".pdf") else "unknown"
    if media_type != "application/pdf":
        raise TranslationError("Anthropic models take files as PDF documents only.")
    return {"type": "document", "source": {"type": "base64", "media_type": media_type,
                                           "data": data}}


def _assistant_blocks(message: JSON) -> list[JSON]:
    blocks = _text_blocks(message.get("content"), "assistant")
    for call in message.get("tool_calls") or ():
        if call.get("type", "function") != "function":
            raise TranslationError(f"tool calls of type {call.get('type')!r} cannot be sent "
                                   "to Anthropic models.")
        function = call.get("function") or {}
        blocks.append({"type": "tool_use", "id": tool_use_id(call.get("id")),
                       "name": function.get("name"),
                       "input": tool_arguments(function.get("arguments"))})
    return blocks


def _tool_result(message: JSON) -> JSON:
    block: JSON = {"type": "tool_result",
                   "tool_use_id": tool_use_id(message.get("tool_call_id"))}
    content = message.get("content")
    if isinstance(content, str):
        if content:
            block["content"] = content
    elif content:
        block["content"] = _text_blocks(content, "tool")
    return block


def _anthropic_tools(tools: list[JSON], choice: Any, parallel: Any) -> JSON:
    anthropic_choice, allowed = _anthropic_tool_choice(choice)
    declared = [_anthropic_tool(tool) for tool in tools]
    if allowed is not None:
        declared = [tool for tool in declared if tool["name"] in allowed]
    if parallel is False and anthropic_choice.get("type") != "none":
        anthropic_choice = {"type": "auto", **anthropic_choice, "disable_parallel_tool_use": True}
    out: JSON = {"tools": declared}
    if anthropic_choice:
        out["tool_choice"] = anthropic_choice
    return out


def _tools_of_history(messages: list[JSON]) -> JSON:
    """For a history with tool calls but no `tools`: the tools it called, declared with
    `tool_choice` none. Anthropic refuses tool blocks in a request that defines no tools
    (BerriAI/litellm#4689 quotes the error); OpenAI takes them, and without `tools` its model
    cannot call one, which `none` keeps true."""
    names = {block["name"]: None for message in messages for block in message["content"]
             if block["type"] == "tool_use"}
    if not names:
        return {}
    return {"tools": [{"name": name, "input_schema": {"type": "object", "properties": {}}}
                      for name in names],
            "tool_choice": {"type": "none"}}


def _anthropic_tool(tool: JSON) -> JSON:
    if tool.get("type") != "function":
        raise TranslationError(f"tools of type {tool.get('type')!r} have no Anthropic "
                               "equivalent.", param="tools")
    function = tool["function"]
    declared: JSON = {"name": function["name"]}
    if function.get("description"):
        declared["description"] = function["description"]
    # input_schema is required and must describe an object.
    declared["input_schema"] = function.get("parameters") or {"type": "object",
                                                              "properties": {}}
    if function.get("strict"):
        declared["strict"] = True
    return declared


def _anthropic_tool_choice(choice: Any) -> tuple[JSON, set[str] | None]:
    """(Anthropic tool_choice or {} for the default, the tool names to keep or None)."""
    if choice is None:
        return {}, None
    if isinstance(choice, str) and choice in _ANTHROPIC_CHOICES:
        return dict(_ANTHROPIC_CHOICES[choice]), None
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "tool", "name": choice["function"]["name"]}, None
    if isinstance(choice, dict) and choice.get("type") == "allowed_tools":
        allowed = choice.get("allowed_tools") or {}
        names = {tool["function"]["name"] for tool in allowed.get("tools") or ()}
        return {"type": "any" if allowed.get("mode") == "required" else "auto"}, names
    raise TranslationError(f"tool_choice {choice!r} has no Anthropic equivalent.",
                           param="tool_choice")


# -- Anthropic Message -> OpenAI chat.completion ---------------------------------------------

def messages_response_to_chat(resp: JSON, public_model: str) -> JSON:
    """Anthropic Message -> OpenAI `chat.completion` (thinking and server-tool blocks dropped)."""
    texts: list[str] = []
    calls: list[JSON] = []
    for block in resp.get("content") or ():
        if block.get("type") == "text":
            texts.append(block.get("text") or "")
        elif block.get("type") == "tool_use":
            calls.append({"id": block.get("id"), "type": "function", "function": {
                "name": block.get("name"),
                "arguments": orjson.dumps(block.get("input") or {}).decode()}})
    content = "".join(texts) if texts or not calls else None
    message: JSON = {"role": "assistant", "content": content, "refusal": None}
    if calls:
        message["tool_calls"] = calls
    completion: JSON = {
        "id": completion_id(resp.get("id")), "object": "chat.completion",
        "created": created_now(), "model": public_model,
        "choices": [{"index": 0, "message": message, "logprobs": None,
                     "finish_reason": finish_reason(resp.get("stop_reason"), bool(calls))}],
    }
    usage = chat_usage(resp.get("usage"))
    if usage is not None:
        completion["usage"] = usage
    return completion


# -- Anthropic Messages request -> OpenAI chat request ---------------------------------------

def messages_request_to_chat(body: JSON, *, max_tokens_field: str = "max_tokens",
                             max_stop_sequences: int | None = None) -> JSON:
    """Anthropic Messages request -> OpenAI chat request; `model` is kept for the caller.

    `max_tokens_field` names the limit: OpenAI's own API has deprecated `max_tokens` for
    `max_completion_tokens` (which its o-series and gpt-5 models require); the
    OpenAI-compatible servers read `max_tokens`. More `stop_sequences` than
    `max_stop_sequences` (OpenAI's `stop` takes 4) are refused: dropping some would let the
    model write past where the caller wanted it to stop.
    """
    if body.get("mcp_servers"):
        raise TranslationError("MCP servers are only available on Anthropic models.")
    messages = _system_messages(body.get("system"))
    for message in body.get("messages") or ():
        if message.get("role") == "assistant":
            messages.append(_chat_assistant(message.get("content")))
        elif message.get("role") == "user":
            messages += _chat_user(message.get("content"))
        else:
            raise TranslationError(f"message role {message.get('role')!r} is not supported.")
    chat: JSON = {"model": body.get("model"), "messages": messages}
    if body.get("max_tokens") is not None:
        chat[max_tokens_field] = body["max_tokens"]
    for key in ("temperature", "top_p"):
        if body.get(key) is not None:
            chat[key] = body[key]
    if body.get("stop_sequences"):
        chat["stop"] = list(body["stop_sequences"])
        if max_stop_sequences is not None and len(chat["stop"]) > max_stop_sequences:
            raise TranslationError(f"OpenAI models take at most {max_stop_sequences} stop "
                                   f"sequences; this request has {len(chat['stop'])}.",
                                   param="stop_sequences")
    user_id = (body.get("metadata") or {}).get("user_id")
    if isinstance(user_id, str) and user_id:
        chat["user"] = user_id
    if body.get("tools"):
        chat.update(_chat_tools(body["tools"], body.get("tool_choice")))
    chat.update(_chat_response_format(body))
    if body.get("stream") is not None:
        chat["stream"] = bool(body["stream"])
        if chat["stream"]:
            chat["stream_options"] = {"include_usage": True}
    return chat


def _system_messages(system: Any) -> list[JSON]:
    if isinstance(system, str):
        return [{"role": "system", "content": system}] if system else []
    texts = [block.get("text") or "" for block in system or () if block.get("type") == "text"]
    text = "\n".join(t for t in texts if t)
    return [{"role": "system", "content": text}] if text else []


def _chat_assistant(content: Any) -> JSON:
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    texts: list[str] = []
    calls: list[JSON] = []
    for block in content or ():
        kind = block.get("type")
        if kind == "text":
            texts.append(block.get("text") or "")
        elif kind == "tool_use":
            calls.append({"id": block.get("id"), "type": "function", "function": {
                "name": block.get("name"),
                "arguments": orjson.dumps(block.get("input") or {}).decode()}})
        elif kind not in ("thinking", "redacted_thinking"):
            raise TranslationError(f"assistant content blocks of type {kind!r} only work "
                                   "with Anthropic models.")
    message: JSON = {"role": "assistant", "content": "".join(texts) if texts or not calls
                     else None}
    if calls:
        message["tool_calls"] = calls
    return message


def _chat_user(content: Any) -> list[JSON]:
    """A user turn -> tool messages (for its tool_results) then one user message."""
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    tool_messages: list[JSON] = []
    tool_media: list[JSON] = []
    parts: list[JSON] = []
    for block in content or ():
        if block.get("type") == "tool_result":
            message, media = _chat_tool_result(block)
            tool_messages.append(message)
            tool_media += media
        else:
            parts += _chat_parts(block)
    parts = tool_media + parts
    if not parts:
        return tool_messages
    if len(parts) == 1 and parts[0]["type"] == "text":  # text-only servers take a string
        return [*tool_messages, {"role": "user", "content": parts[0]["text"]}]
    return [*tool_messages, {"role": "user", "content": parts}]


def _chat_tool_result(block: JSON) -> tuple[JSON, list[JSON]]:
    """(the tool message, image/document parts it returned, labelled for a user message)."""
    tool_id = block.get("tool_use_id")
    content = block.get("content")
    texts: list[str] = []
    media: list[JSON] = []
    if isinstance(content, str):
        texts.append(content)
    for item in content if isinstance(content, list) else ():
        for part in _chat_parts(item):
            if part["type"] == "text":
                texts.append(part["text"])
            else:
                media.append(part)
    if media:
        media.insert(0, {"type": "text", "text": f"Attachments returned by tool call {tool_id}:"})
    return {"role": "tool", "tool_call_id": tool_id, "content": "\n".join(texts)}, media


def _chat_parts(block: JSON) -> list[JSON]:
    kind = block.get("type")
    if kind == "text":
        return [{"type": "text", "text": block.get("text") or ""}]
    if kind == "image":
        return [{"type": "image_url", "image_url": {"url": _source_url(block, "image")}}]
    if kind == "document":
        return _chat_document(block)
    raise TranslationError(f"content blocks of type {kind!r} only work with Anthropic models.")


def _source_url(block: JSON, kind: str) -> str:
    source = block.get("source") or {}
    if source.get("type") == "base64":
        return f"data:{source.get('media_type')};base64,{source.get('data')}"
    if source.get("type") == "url" and kind == "image":
        return str(source.get("url"))
    raise TranslationError(f"{kind} sources of type {source.get('type')!r} only work with "
                           "Anthropic models.")


def _chat_document(block: JSON) -> list[JSON]:
    source = block.get("source") or {}
    if source.get("type") == "text":
        return [{"type": "text", "text": source.get("data") or ""}]
    if source.get("type") == "content":
        return [part for item in source.get("content") or () for part in _chat_parts(item)]
    filename = str(block.get("title") or "document.pdf")
    return [{"type": "file", "file": {"filename": filename,
                                      "file_data": _source_url(block, "document")}}]


def _chat_tools(tools: list[JSON], choice: Any) -> JSON:
    out: JSON = {"tools": [_chat_tool(tool) for tool in tools]}
    if not isinstance(choice, dict):
        return out
    kind = choice.get("type")
    if kind == "tool":
        out["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}}
    elif kind in _CHAT_CHOICES:
        out["tool_choice"] = _CHAT_CHOICES[kind]
    else:
        raise TranslationError(f"tool_choice type {kind!r} is not supported.")
    if choice.get("disable_parallel_tool_use") and kind != "none":
        out["parallel_tool_calls"] = False
    return out


def _chat_tool(tool: JSON) -> JSON:
    if tool.get("type") not in (None, "custom"):
        raise TranslationError(f"the Anthropic server tool {tool.get('type')!r} only works "
                               "with Anthropic models.")
    function: JSON = {"name": tool["name"]}
    if tool.get("description"):
        function["description"] = tool["description"]
    function["parameters"] = tool.get("input_schema") or {"type": "object", "properties": {}}
    if tool.get("strict"):
        function["strict"] = True
    return {"type": "function", "function": function}


def _chat_response_format(body: JSON) -> JSON:
    # Not `strict`: OpenAI's strict mode demands every property be required, which an
    # Anthropic schema need not do; the schema still guides the model.
    config = body.get("output_config")
    output_format = (config.get("format") if isinstance(config, dict) else None) or body.get(
        "output_format")
    if not isinstance(output_format, dict):
        return {}
    if output_format.get("type") != "json_schema":
        raise TranslationError(f"output format {output_format.get('type')!r} is not supported.")
    return {"response_format": {"type": "json_schema", "json_schema": {
        "name": "response", "schema": output_format.get("schema") or {}}}}


# -- OpenAI chat.completion -> Anthropic Message ---------------------------------------------

def chat_response_to_messages(resp: JSON, public_model: str) -> JSON:
    """OpenAI `chat.completion` (choice 0) -> Anthropic Message."""
    choice = (resp.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    text = _message_text(message.get("content"))
    refusal = message.get("refusal") if isinstance(message.get("refusal"), str) else ""
    blocks = [{"type": "text", "text": text or refusal}] if text or refusal else []
    calls = [_tool_use_block(call) for call in message.get("tool_calls") or ()]
    reason = stop_reason(choice.get("finish_reason"), bool(calls), bool(refusal) and not text)
    return {"id": message_id(resp.get("id")), "type": "message", "role": "assistant",
            "model": public_model, "content": blocks + calls, "stop_reason": reason,
            "stop_sequence": None, "usage": anthropic_usage(resp.get("usage"))}


def _tool_use_block(call: JSON) -> JSON:
    function = call.get("function") or {}
    return {"type": "tool_use",
            "id": tool_use_id(call.get("id")) or "toolu_" + uuid.uuid4().hex[:24],
            "name": function.get("name"), "input": _parsed_or_empty(function.get("arguments"))}


def _message_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # a few compatible servers answer with content parts
        return "".join(p.get("text") or "" for p in content if p.get("type") == "text")
    return ""


def _parsed_or_empty(arguments: Any) -> JSON:
    try:
        return tool_arguments(arguments)
    except TranslationError:
        return {}  # see the module docstring


# -- errors ----------------------------------------------------------------------------------

def parse_anthropic_error(status: int, body: bytes) -> tuple[str, str]:
    """(error type such as overloaded_error, message) from any Anthropic error body."""
    fallback = _ERROR_BY_STATUS.get(status) or (
        "invalid_request_error" if 400 <= status < 500 else "api_error")
    text = body.decode("utf-8", "replace").strip()[:500] or f"HTTP {status}"
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return fallback, text
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, str) and error:
        return fallback, error
    if not isinstance(error, dict):
        return fallback, text
    return str(error.get("type") or fallback), str(error.get("message") or text)
