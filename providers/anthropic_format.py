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
- `thinking` (not OpenAI's, but the extension LiteLLM's callers send: Anthropic's own
  `{"type": "enabled", "budget_tokens": N}`) is sent as it is. An assistant message's
  `thinking_blocks` (the response translation's, below) open its content again: with
  thinking on, Anthropic refuses a tool-use continuation whose assistant turn does not
  start with its thinking. A thinking block without a signature is left out (Anthropic
  checks the signature; another provider's reasoning has none).
- `reasoning_effort` (without `thinking`) turns thinking on: adaptive thinking at that
  `output_config.effort` on Claude 4.6 and later, a `budget_tokens` of 1024/2048/4096/16384
  (minimal and low/medium/high/xhigh) below `max_tokens` on Claude 3.7 to 4.5; the sampling
  settings thinking refuses go (see `_think_with_effort`). With thinking on (from either),
  so do a temperature other than 1, top_k and a top_p below 0.95, which Anthropic refuses
  with thinking.
- Tool call ids Anthropic refuses (it takes ^[a-zA-Z0-9_-]+$; other providers' ids may
  hold `.` or `:`) become `toolu_` and a hash of the id, alike in the tool_use and the
  tool_result, and in responses translated for Anthropic clients, so those clients only
  ever hold ids Anthropic takes.
- `temperature` is clamped to Anthropic's 0..1 (OpenAI allows up to 2). With `top_p` as
  well, only one goes (Claude 4.5 models refuse both): the temperature, unless it is 1 (the
  default of both APIs), in which case the top_p.
- A history with tool calls but no `tools` declares the tools it called, with
  `tool_choice` none: Anthropic refuses tool blocks in a request without tools.
- Text that is empty or only whitespace (a message's, a content part's) is left out:
  Anthropic refuses such text blocks, and with no other content the message goes too
  (consecutive messages of one role are merged, as the API wants them to alternate). A
  request with no message left is refused.
- A final assistant message (a prefill) goes without the whitespace its last text ends with
  (the text, if that is all it holds): Anthropic refuses a prefill ending in whitespace.
- Dropped (no Anthropic equivalent, the answer stays usable): seed, frequency_penalty,
  presence_penalty, logit_bias, stream_options (Anthropic streams always report usage),
  service_tier, store, metadata, prediction, verbosity, web_search_options,
  prompt_cache_key, message `name`, image `detail`.
- Refused with TranslationError: n > 1, logprobs, audio, legacy functions/function_call,
  non-function tools, content parts Anthropic cannot take, unparsable tool arguments, a
  `stop` entry that is only whitespace (`"\\n"`) or empty, which Anthropic refuses.

Anthropic -> OpenAI (our /v1/messages ingress on an OpenAI-format model):
- Thinking blocks and the `thinking`/`output_config.effort` settings, cache_control,
  service_tier and container are dropped. `top_k` goes as the chat request's `top_k`, which
  the Gemini translation sends as `topK`; the OpenAI adapter drops it (OpenAI's and Azure's
  chat APIs have none).
- A tool_result's `is_error` has no OpenAI field; the result text, which states the
  error, is kept unchanged. Images in a tool_result (OpenAI tool messages hold text only)
  follow the tool messages in a user message, labelled with the tool call id.
- Server tools, server-tool blocks, MCP servers and file/URL documents are refused, and
  more than 4 `stop_sequences` for OpenAI and Azure (their `stop` takes 4).
- In a response, the upstream's reasoning (`reasoning_content` or `reasoning`, in the
  message and in stream deltas) becomes a thinking block before the text, with an empty
  signature: it has none (sent back, the translation to OpenAI drops thinking blocks).
  Reasoning tokens are `usage.output_tokens_details.thinking_tokens`.
- In a response, tool-call arguments that are not a JSON object become `input: {}`: a
  tool_use block must hold an object, and the Anthropic API rejects unknown block fields
  when a client echoes the message back, so the raw text cannot travel with it.
"""
from __future__ import annotations

import re
import uuid
from typing import Any

import orjson

from providers.anthropic_stream import (
    ChatStreamToMessages,
    MessagesStreamToChat,
    anthropic_usage,
    chat_reasoning,
    chat_thinking_block,
    chat_usage,
    completion_id,
    created_now,
    finish_reason,
    message_id,
    stop_reason,
    tool_use_id,
)
from providers.streams import StreamError as UpstreamStreamError
from providers.translation import (
    TranslationError,
    a_flag,
    a_number,
    a_reasoning_effort,
    a_string,
    a_string_or_none,
    allowed_tools,
    an_array,
    an_integer,
    an_object,
    bad_tool_choice,
    chosen_function,
    content_parts,
    function_tool,
    image_url,
    part_text,
    part_type,
    response_format_type,
    strings,
    tool_arguments,
    tool_call,
)

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
    format_type = _refuse_inexpressible(body)
    system, messages = _anthropic_messages(an_array(body.get("messages"), "messages"))
    if not messages:
        raise TranslationError("Anthropic models need at least one user or assistant message "
                               "with content that is not only whitespace.", param="messages")
    if format_type == "json_object":
        system.append({"type": "text", "text": _JSON_INSTRUCTION})
    max_tokens = an_integer(body, "max_completion_tokens")
    if max_tokens is None:
        max_tokens = an_integer(body, "max_tokens")
    request: JSON = {"model": upstream_model, "messages": messages,
                     "max_tokens": default_max_tokens if max_tokens is None else max_tokens}
    if system:
        plain = len(system) == 1 and set(system[0]) == {"type", "text"}
        request["system"] = system[0]["text"] if plain else system
    request.update(_sampling(body))
    tools = an_array(body.get("tools"), "tools")
    if tools:
        request.update(_anthropic_tools(tools, body.get("tool_choice"), a_flag(
            body.get("parallel_tool_calls"), "parallel_tool_calls")))
    else:
        request.update(_tools_of_history(messages))
    if format_type == "json_schema":
        json_schema = body["response_format"].get("json_schema")
        schema = None if json_schema is None else an_object(
            json_schema, "response_format.json_schema").get("schema")
        if schema is None:
            raise TranslationError("response_format json_schema needs a `schema` object.",
                                   param="response_format")
        request["output_config"] = {"format": {
            "type": "json_schema", "schema": an_object(schema,
                                                       "response_format.json_schema.schema")}}
    user = a_string_or_none(body.get("user"), "user") or \
        a_string_or_none(body.get("safety_identifier"), "safety_identifier")
    if user:
        request["metadata"] = {"user_id": user}
    if body.get("thinking") is not None:
        request["thinking"] = an_object(body["thinking"], "thinking")
        budget = request["thinking"].get("budget_tokens")
        if max_tokens is None and type(budget) is int and budget >= request["max_tokens"]:
            request["max_tokens"] = default_max_tokens + budget  # (room for the answer)
    elif (effort := a_reasoning_effort(body)) is not None:
        _think_with_effort(request, effort, given_max=max_tokens is not None)
    if request.get("thinking", {}).get("type") in ("enabled", "adaptive"):
        _sample_as_thinking_allows(request)
    if body.get("stream") is not None:
        request["stream"] = bool(body["stream"])
    return request


def _refuse_inexpressible(body: JSON) -> str | None:
    """Refuses what Anthropic cannot express; returns the `response_format` type."""
    if (an_integer(body, "n") or 1) > 1:
        raise TranslationError("Anthropic models return one choice per request; `n` must be 1.",
                               param="n")
    if a_flag(body.get("logprobs"), "logprobs"):
        raise TranslationError("Anthropic models do not return log probabilities (`logprobs`).",
                               param="logprobs")
    if body.get("functions") or body.get("function_call"):
        raise TranslationError("legacy `functions`/`function_call` are not supported for "
                               "Anthropic models; send `tools` and `tool_choice` instead.")
    if body.get("moderation") is not None:  # (OpenAI's own check of input and output)
        raise TranslationError("`moderation` is run by OpenAI and has no Anthropic equivalent: "
                               "its policy would not be applied, nor its result returned. "
                               "Send it to an OpenAI deployment, or leave it out.",
                               param="moderation")
    if "audio" in strings(body.get("modalities"), "modalities", "an array of strings") or \
            body.get("audio"):
        raise TranslationError("audio output is not available from Anthropic models.")
    format_type = response_format_type(body)
    if format_type not in (None, "text", "json_object", "json_schema"):
        raise TranslationError(f"response_format {format_type!r} has no Anthropic equivalent.",
                               param="response_format")
    return format_type


# OpenAI's reasoning efforts, as Anthropic's adaptive thinking's `output_config.effort` (Claude
# 4.6 and later) and as a thinking budget for the models before (LiteLLM's budgets: 1024 is
# Anthropic's least). "max" is Opus's alone: other models' xhigh is their high.
_EFFORTS = {"minimal": "low", "low": "low", "medium": "medium", "high": "high",
            "xhigh": "max"}
_BUDGETS = {"minimal": 1024, "low": 1024, "medium": 2048, "high": 4096, "xhigh": 16384}
_LEAST_BUDGET = 1024
# Claude's version in a model name: "claude-opus-4-6", "claude-sonnet-4-20250514" (4.0),
# "claude-3-7-sonnet-20250219", "anthropic.claude-haiku-4-5-20251001-v1:0".
_CLAUDE_VERSION = re.compile(r"claude-(?:[a-z]+-)?(\d+)(?:-(\d)(?!\d))?")


def _think_with_effort(request: JSON, effort: str, *, given_max: bool = True) -> None:
    """OpenAI's `reasoning_effort` as Anthropic's thinking (a caller's own `thinking` goes
    as it is). On Claude 4.6 and later, and on models whose name gives no version (the
    newest take adaptive thinking only): adaptive thinking at that effort. On Claude 3.7
    to 4.5: a thinking budget, below `max_tokens` as Anthropic demands (without room for
    Anthropic's least budget, no thinking); when the caller set no maximum (`given_max`),
    `max_tokens` grows by the budget, as OpenAI caps no reasoning by a default: the default's
    4,096 tokens less a 4,095-token budget left the answer one. Claude 3.5 and older do not
    think: nothing.
    "none" is no thinking.

    Anthropic refuses thinking with a tool_choice that forces a tool and with a prefill
    (extended thinking docs, "important considerations"): those requests go as asked,
    without thinking. (The sampling settings it refuses with thinking go instead:
    `_sample_as_thinking_allows`.)"""
    if effort == "none":
        return
    if request.get("tool_choice", {}).get("type") in ("any", "tool") or \
            request["messages"][-1]["role"] == "assistant":
        return
    model = request["model"]
    found = _CLAUDE_VERSION.search(model)
    version = (int(found[1]), int(found[2] or 0)) if found else None
    if version is not None and version < (3, 7):
        return
    if version is None or version >= (4, 6):
        level = _EFFORTS[effort]
        if level == "max" and "opus" not in model:
            level = "high"
        request["thinking"] = {"type": "adaptive"}
        request.setdefault("output_config", {})["effort"] = level
    else:
        if not given_max:
            request["max_tokens"] += _BUDGETS[effort]
        budget = min(_BUDGETS[effort], request["max_tokens"] - 1)
        if budget < _LEAST_BUDGET:
            return
        request["thinking"] = {"type": "enabled", "budget_tokens": budget}


def _sample_as_thinking_allows(request: JSON) -> None:
    """With thinking on, Anthropic refuses a temperature other than 1, any top_k and a top_p
    below 0.95 (extended thinking docs, "important considerations"; its 400: "`temperature`
    may only be set to 1 when thinking is enabled"). The thinking asked for wins: those
    settings go, as OpenAI's reasoning models take none of them either."""
    if request.get("temperature", 1.0) != 1.0:
        del request["temperature"]
    request.pop("top_k", None)
    if request.get("top_p", 1.0) < 0.95:
        del request["top_p"]


def _sampling(body: JSON) -> JSON:
    out: JSON = {}
    temperature, top_p = a_number(body, "temperature"), a_number(body, "top_p")
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
    stop = strings(body.get("stop"), "stop")
    for sequence in stop:
        if not sequence.strip():  # Anthropic: "each stop sequence must contain non-whitespace"
            raise TranslationError(f"Anthropic models take no stop sequence that is only "
                                   f"whitespace or empty, such as {sequence!r}.", param="stop")
    if stop:
        out["stop_sequences"] = list(stop)
    return out


def _anthropic_messages(messages: list[Any]) -> tuple[list[JSON], list[JSON]]:
    """(system text blocks, alternating messages whose content is always a block list)."""
    system: list[JSON] = []
    turns: list[JSON] = []
    for index, item in enumerate(messages):
        at = f"messages[{index}]"
        message = an_object(item, at)
        role = a_string(message.get("role"), at + ".role")
        if role in ("system", "developer"):
            system += _text_blocks(message.get("content"), role, at + ".content")
            continue
        if role == "user":
            kind, blocks = "user", _user_blocks(message.get("content"), at + ".content")
        elif role == "assistant":
            kind, blocks = "assistant", _assistant_blocks(message, at)
        elif role == "tool":
            kind, blocks = "user", [_tool_result(message, at)]
        else:
            raise TranslationError(f"message role {role!r} is not supported for Anthropic "
                                   "models.", param=at + ".role")
        if not blocks:
            continue  # Anthropic rejects empty content
        if turns and turns[-1]["role"] == kind:  # the API wants user/assistant to alternate
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": kind, "content": blocks})
    for turn in turns:  # tool_result blocks must open their user message
        if turn["role"] == "user":
            turn["content"].sort(key=lambda block: block["type"] != "tool_result")
    _strip_prefill(turns)
    return system, turns


def _strip_prefill(turns: list[JSON]) -> None:
    """A final assistant turn (a prefill) without the whitespace its last text ends with:
    OpenAI takes it, Anthropic answers 400 "final assistant content cannot end with trailing
    whitespace"."""
    if not turns or turns[-1]["role"] != "assistant":
        return
    content = turns[-1]["content"]
    for position in range(len(content) - 1, -1, -1):
        if content[position]["type"] == "text":
            text = content[position]["text"].rstrip()
            if text:
                content[position] = {**content[position], "text": text}
            else:
                del content[position]
            break
    if not content:  # (Anthropic rejects empty content)
        turns.pop()


def _text_blocks(content: Any, role: str, param: str) -> list[JSON]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content.strip() else []
    blocks = []
    for index, item in enumerate(content_parts(content, param)):
        at = f"{param}[{index}]"
        part, kind = part_type(item, at)
        if kind not in ("text", "refusal"):
            raise TranslationError(f"{role} messages can only hold text for Anthropic models, "
                                   f"not {kind!r} parts.", param=at + ".type")
        text = part_text(part, kind, at)
        if text.strip():  # (see the module docstring)
            blocks.append(_with_cache_control({"type": "text", "text": text}, part))
    return blocks


def _with_cache_control(block: JSON, part: JSON) -> JSON:
    # OpenAI has no cache_control, but clients written for Anthropic-via-OpenAI routers
    # put it on content parts; Anthropic honours it on the block.
    if isinstance(part.get("cache_control"), dict):
        block["cache_control"] = part["cache_control"]
    return block


def _user_blocks(content: Any, param: str) -> list[JSON]:
    if content is None or isinstance(content, str):
        return _text_blocks(content, "user", param)
    blocks = []
    for index, item in enumerate(content_parts(content, param)):
        at = f"{param}[{index}]"
        part, kind = part_type(item, at)
        if kind == "text":
            text = a_string(part.get("text"), at + ".text")
            if text.strip():  # (see the module docstring)
                blocks.append(_with_cache_control({"type": "text", "text": text}, part))
        elif kind == "image_url":
            url = image_url(part, at)
            blocks.append(_with_cache_control(_image_block(url, at + ".image_url"), part))
        elif kind == "file":
            file = an_object(part.get("file"), at + ".file")
            blocks.append(_with_cache_control(_document_block(file, at + ".file"), part))
        else:
            raise TranslationError(f"content parts of type {kind!r} cannot be sent to "
                                   "Anthropic models.", param=at + ".type")
    return blocks


def _image_block(url: str, param: str) -> JSON:
    if url.startswith(("https://", "http://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    if not url.startswith("data:"):
        raise TranslationError("image URLs must be http(s) or base64 data: URLs.",
                               param=param + ".url")
    media_type, data = _data_url(url, param + ".url")
    if media_type not in _IMAGE_TYPES:
        raise TranslationError(f"Anthropic models take JPEG, PNG, GIF or WebP images, "
                               f"not {media_type!r}.", param=param + ".url")
    return {"type": "image", "source": {"type": "base64", "media_type": media_type,
                                        "data": data}}


def _data_url(url: str, param: str) -> tuple[str, str]:
    header, comma, data = url[len("data:"):].partition(",")
    if not comma or not header.endswith(";base64"):
        raise TranslationError("data: URLs must be base64-encoded.", param=param)
    return header.split(";")[0], data


def _document_block(file: JSON, param: str) -> JSON:
    data = a_string_or_none(file.get("file_data"), param + ".file_data")
    if not data:
        raise TranslationError(f"'{param}.file_data' is required: files must be sent inline "
                               "to Anthropic models; uploaded `file_id`s are not available "
                               "there.", param=param + ".file_data")
    name = (a_string_or_none(file.get("filename"), param + ".filename") or "").lower()
    if data.startswith("data:"):
        media_type, data = _data_url(data, param + ".file_data")
    else:
        media_type = "application/pdf" if name.endswith(".pdf") else "unknown"
    if media_type != "application/pdf":
        raise TranslationError("Anthropic models take files as PDF documents only.",
                               param=param + ".file_data")
    return {"type": "document", "source": {"type": "base64", "media_type": media_type,
                                           "data": data}}


def _assistant_blocks(message: JSON, param: str) -> list[JSON]:
    blocks = _thinking_blocks(message.get("thinking_blocks"), param + ".thinking_blocks")
    blocks += _text_blocks(message.get("content"), "assistant", param + ".content")
    for index, call in enumerate(an_array(message.get("tool_calls"), param + ".tool_calls")):
        at = f"{param}.tool_calls[{index}]"
        call_id, name, arguments = tool_call(call, at)
        blocks.append({"type": "tool_use", "id": tool_use_id(call_id), "name": name,
                       "input": tool_arguments(arguments, at + ".function.arguments")})
    return blocks


def _thinking_blocks(blocks: Any, param: str) -> list[JSON]:
    """An assistant message's `thinking_blocks` -> the blocks Anthropic takes back: only
    the fields each type has (see the module docstring for the unsigned ones)."""
    out: list[JSON] = []
    for index, item in enumerate(an_array(blocks, param)):
        at = f"{param}[{index}]"
        block, kind = part_type(item, at)
        if kind == "redacted_thinking":
            out.append({"type": kind, "data": a_string(block.get("data"), at + ".data")})
        elif kind != "thinking":
            raise TranslationError(f"thinking_blocks of type {kind!r} cannot be sent to "
                                   "Anthropic models.", param=at + ".type")
        elif a_string_or_none(block.get("signature"), at + ".signature"):
            out.append({"type": kind, "thinking": a_string(block.get("thinking"),
                                                           at + ".thinking"),
                        "signature": block["signature"]})
    return out


def _tool_result(message: JSON, param: str) -> JSON:
    block: JSON = {"type": "tool_result", "tool_use_id": tool_use_id(
        a_string(message.get("tool_call_id"), param + ".tool_call_id"))}
    content = message.get("content")
    if isinstance(content, str):
        if content:
            block["content"] = content
    elif content:
        blocks = _text_blocks(content, "tool", param + ".content")
        if blocks:
            block["content"] = blocks
    return block


def _anthropic_tools(tools: list[Any], choice: Any, parallel: bool | None) -> JSON:
    anthropic_choice, allowed = _anthropic_tool_choice(choice)
    declared = [_anthropic_tool(tool, f"tools[{index}]") for index, tool in enumerate(tools)]
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


def _anthropic_tool(tool: Any, param: str) -> JSON:
    found = function_tool(tool, param)
    if found is None:
        raise TranslationError(f"tools of type {tool.get('type')!r} have no Anthropic "
                               "equivalent.", param="tools")
    function, name = found
    declared: JSON = {"name": name}
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
        return {"type": "tool", "name": chosen_function(choice)}, None
    if isinstance(choice, dict) and choice.get("type") == "allowed_tools":
        names, required = allowed_tools(choice)
        return {"type": "any" if required else "auto"}, names
    raise bad_tool_choice(choice, "Anthropic")


# -- Anthropic Message -> OpenAI chat.completion ---------------------------------------------

def messages_response_to_chat(resp: JSON, public_model: str) -> JSON:
    """Anthropic Message -> OpenAI `chat.completion` (server-tool blocks dropped).

    Thinking becomes the message's `reasoning_content` (the text of its thinking blocks)
    and `thinking_blocks` (them and the redacted ones, signatures included, for the
    client to send back), as LiteLLM answers.
    """
    texts: list[str] = []
    calls: list[JSON] = []
    thinking: list[JSON] = []
    for block in resp.get("content") or ():
        if block.get("type") == "text":
            texts.append(block.get("text") or "")
        elif block.get("type") == "tool_use":
            calls.append({"id": block.get("id"), "type": "function", "function": {
                "name": block.get("name"),
                "arguments": orjson.dumps(block.get("input") or {}).decode()}})
        elif block.get("type") in ("thinking", "redacted_thinking"):
            thinking.append(chat_thinking_block(block))
    content = "".join(texts) if texts or not calls else None
    message: JSON = {"role": "assistant", "content": content, "refusal": None}
    if thinking:
        message["reasoning_content"] = "".join(block.get("thinking") or ""
                                               for block in thinking)
        message["thinking_blocks"] = thinking
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
        raise TranslationError("MCP servers are only available on Anthropic models.",
                               param="mcp_servers")
    messages = _system_messages(body.get("system"))
    for index, item in enumerate(an_array(body.get("messages"), "messages")):
        at = f"messages[{index}]"
        message = an_object(item, at)
        role = a_string(message.get("role"), at + ".role")
        if role == "assistant":
            messages.append(_chat_assistant(message.get("content"), at + ".content"))
        elif role == "user":
            messages += _chat_user(message.get("content"), at + ".content")
        else:
            raise TranslationError(f"message role {role!r} is not supported.",
                                   param=at + ".role")
    chat: JSON = {"model": body.get("model"), "messages": messages}
    max_tokens = an_integer(body, "max_tokens")
    if max_tokens is not None:
        chat[max_tokens_field] = max_tokens
    for key in ("temperature", "top_p"):
        value = a_number(body, key)
        if value is not None:
            chat[key] = value
    top_k = an_integer(body, "top_k")
    if top_k is not None:
        chat["top_k"] = top_k
    stop = an_array(body.get("stop_sequences"), "stop_sequences", "an array of strings")
    if stop:
        chat["stop"] = [a_string(item, f"stop_sequences[{index}]")
                        for index, item in enumerate(stop)]
        if max_stop_sequences is not None and len(chat["stop"]) > max_stop_sequences:
            raise TranslationError(f"OpenAI models take at most {max_stop_sequences} stop "
                                   f"sequences; this request has {len(chat['stop'])}.",
                                   param="stop_sequences")
    metadata = body.get("metadata")
    user_id = None if metadata is None else a_string_or_none(
        an_object(metadata, "metadata").get("user_id"), "metadata.user_id")
    if user_id:
        chat["user"] = user_id
    tools = an_array(body.get("tools"), "tools")
    if tools:
        chat.update(_chat_tools(tools, body.get("tool_choice")))
    chat.update(_chat_response_format(body))
    if body.get("stream") is not None:
        chat["stream"] = bool(body["stream"])
        if chat["stream"]:
            chat["stream_options"] = {"include_usage": True}
    return chat


def _system_messages(system: Any) -> list[JSON]:
    if isinstance(system, str):
        return [{"role": "system", "content": system}] if system else []
    texts = []
    for index, item in enumerate(an_array(system, "system",
                                          "a string or an array of text blocks")):
        block, kind = part_type(item, f"system[{index}]")
        if kind == "text":
            texts.append(_block_text(block, f"system[{index}]"))
    text = "\n".join(t for t in texts if t)
    return [{"role": "system", "content": text}] if text else []


def _blocks(content: Any, param: str) -> list[Any]:
    return content_parts(content, param, "content blocks")


def _block_text(block: JSON, param: str) -> str:
    return a_string(block.get("text"), param + ".text")


def _chat_assistant(content: Any, param: str) -> JSON:
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    texts: list[str] = []
    calls: list[JSON] = []
    for index, item in enumerate(_blocks(content, param)):
        at = f"{param}[{index}]"
        block, kind = part_type(item, at)
        if kind == "text":
            texts.append(_block_text(block, at))
        elif kind == "tool_use":
            tool_input = block.get("input")
            calls.append({"id": a_string(block.get("id"), at + ".id"), "type": "function",
                          "function": {
                              "name": a_string(block.get("name"), at + ".name"),
                              "arguments": orjson.dumps(
                                  {} if tool_input is None else an_object(tool_input,
                                                                          at + ".input")
                              ).decode()}})
        elif kind not in ("thinking", "redacted_thinking"):
            raise TranslationError(f"assistant content blocks of type {kind!r} only work "
                                   "with Anthropic models.", param=at + ".type")
    message: JSON = {"role": "assistant", "content": "".join(texts) if texts or not calls
                     else None}
    if calls:
        message["tool_calls"] = calls
    return message


def _chat_user(content: Any, param: str) -> list[JSON]:
    """A user turn -> tool messages (for its tool_results) then one user message."""
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    tool_messages: list[JSON] = []
    tool_media: list[JSON] = []
    parts: list[JSON] = []
    for index, item in enumerate(_blocks(content, param)):
        at = f"{param}[{index}]"
        block, kind = part_type(item, at)
        if kind == "tool_result":
            message, media = _chat_tool_result(block, at)
            tool_messages.append(message)
            tool_media += media
        else:
            parts += _chat_parts(block, kind, at)
    parts = tool_media + parts
    if not parts:
        return tool_messages
    if len(parts) == 1 and parts[0]["type"] == "text":  # text-only servers take a string
        return [*tool_messages, {"role": "user", "content": parts[0]["text"]}]
    return [*tool_messages, {"role": "user", "content": parts}]


def _chat_tool_result(block: JSON, param: str) -> tuple[JSON, list[JSON]]:
    """(the tool message, image/document parts it returned, labelled for a user message)."""
    tool_id = a_string(block.get("tool_use_id"), param + ".tool_use_id")
    content = block.get("content")
    texts: list[str] = []
    media: list[JSON] = []
    if isinstance(content, str):
        texts.append(content)
    elif content is not None:
        for index, item in enumerate(_blocks(content, param + ".content")):
            at = f"{param}.content[{index}]"
            for part in _chat_parts(*part_type(item, at), at):
                if part["type"] == "text":
                    texts.append(part["text"])
                else:
                    media.append(part)
    if media:
        media.insert(0, {"type": "text", "text": f"Attachments returned by tool call {tool_id}:"})
    return {"role": "tool", "tool_call_id": tool_id, "content": "\n".join(texts)}, media


def _chat_parts(block: JSON, kind: str, param: str) -> list[JSON]:
    if kind == "text":
        return [{"type": "text", "text": _block_text(block, param)}]
    if kind == "image":
        return [{"type": "image_url", "image_url": {"url": _source_url(block, "image",
                                                                       param)}}]
    if kind == "document":
        return _chat_document(block, param)
    raise TranslationError(f"content blocks of type {kind!r} only work with Anthropic models.",
                           param=param + ".type")


def _source(block: JSON, param: str) -> tuple[JSON, str]:
    """(a block's `source`, its `type`)."""
    source = an_object(block.get("source"), param + ".source")
    return source, a_string(source.get("type"), param + ".source.type")


def _source_url(block: JSON, kind: str, param: str) -> str:
    source, source_type = _source(block, param)
    if source_type == "base64":
        media_type = a_string(source.get("media_type"), param + ".source.media_type")
        return f"data:{media_type};base64,{a_string(source.get('data'), param + '.source.data')}"
    if source_type == "url" and kind == "image":
        return a_string(source.get("url"), param + ".source.url")
    raise TranslationError(f"{kind} sources of type {source_type!r} only work with "
                           "Anthropic models.", param=param + ".source.type")


def _chat_document(block: JSON, param: str) -> list[JSON]:
    """A document block as chat content parts. Its `title` and `context` are passed to the
    model (Anthropic's citations docs: "title and context are optional fields that will be
    passed to the model"): a text part before the document says them (a file's title is its
    filename). Citations cannot be made by another API's model: `citations.enabled` is
    refused."""
    citations = block.get("citations")
    if citations is not None and a_flag(an_object(citations, param + ".citations").get(
            "enabled"), param + ".citations.enabled"):
        raise TranslationError("citations are made by Anthropic models only; this model "
                               "cannot cite a document.", param=param + ".citations")
    title = a_string_or_none(block.get("title"), param + ".title")
    context = a_string_or_none(block.get("context"), param + ".context")
    source, source_type = _source(block, param)
    # (a file's title is its filename, which the model sees with it)
    said = [f"Document title: {title}"] if title and source_type in ("text", "content") else []
    said += [f"Document context: {context}"] if context else []
    parts: list[JSON] = [{"type": "text", "text": "\n".join(said)}] if said else []
    if source_type == "text":
        return [*parts, {"type": "text",
                         "text": a_string(source.get("data"), param + ".source.data")}]
    if source_type == "content":
        at = param + ".source.content"
        for index, item in enumerate(_blocks(source.get("content"), at)):
            parts += _chat_parts(*part_type(item, f"{at}[{index}]"), f"{at}[{index}]")
        return parts
    return [*parts, {"type": "file", "file": {
        "filename": title or "document.pdf",
        "file_data": _source_url(block, "document", param)}}]


def _chat_tools(tools: list[Any], choice: Any) -> JSON:
    out: JSON = {"tools": [_chat_tool(tool, f"tools[{index}]")
                           for index, tool in enumerate(tools)]}
    if choice is None:
        return out
    kind = a_string(an_object(choice, "tool_choice").get("type"), "tool_choice.type")
    if kind == "tool":
        out["tool_choice"] = {"type": "function", "function": {
            "name": a_string(choice.get("name"), "tool_choice.name")}}
    elif kind in _CHAT_CHOICES:
        out["tool_choice"] = _CHAT_CHOICES[kind]
    else:
        raise TranslationError(f"tool_choice type {kind!r} is not supported.",
                               param="tool_choice.type")
    if a_flag(choice.get("disable_parallel_tool_use"),
              "tool_choice.disable_parallel_tool_use") and kind != "none":
        out["parallel_tool_calls"] = False
    return out


def _chat_tool(tool: Any, param: str) -> JSON:
    tool = an_object(tool, param)
    kind = a_string_or_none(tool.get("type"), param + ".type")
    if kind not in (None, "custom"):
        raise TranslationError(f"the Anthropic server tool {kind!r} only works "
                               "with Anthropic models.", param=param + ".type")
    function: JSON = {"name": a_string(tool.get("name"), param + ".name")}
    if a_string_or_none(tool.get("description"), param + ".description"):
        function["description"] = tool["description"]
    schema = tool.get("input_schema")
    if schema is not None:
        an_object(schema, param + ".input_schema")
    function["parameters"] = schema or {"type": "object", "properties": {}}
    if a_flag(tool.get("strict"), param + ".strict"):
        function["strict"] = True
    return {"type": "function", "function": function}


def _chat_response_format(body: JSON) -> JSON:
    # Not `strict`: OpenAI's strict mode demands every property be required, which an
    # Anthropic schema need not do; the schema still guides the model.
    config = body.get("output_config")
    param = "output_config.format"
    output_format = None if config is None else an_object(config, "output_config").get("format")
    if output_format is None:
        output_format, param = body.get("output_format"), "output_format"
    if output_format is None:
        return {}
    kind = a_string(an_object(output_format, param).get("type"), param + ".type")
    if kind != "json_schema":
        raise TranslationError(f"output format {kind!r} is not supported.", param=param + ".type")
    schema = output_format.get("schema")
    return {"response_format": {"type": "json_schema", "json_schema": {
        "name": "response", "schema": {} if schema is None else an_object(schema,
                                                                          param + ".schema")}}}


# -- OpenAI chat.completion -> Anthropic Message ---------------------------------------------

def chat_response_to_messages(resp: JSON, public_model: str) -> JSON:
    """OpenAI `chat.completion` (choice 0) -> Anthropic Message."""
    choice = (resp.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    text = _message_text(message.get("content"))
    refusal = message.get("refusal") if isinstance(message.get("refusal"), str) else ""
    reasoning = chat_reasoning(message)
    blocks: list[JSON] = [{"type": "thinking", "thinking": reasoning, "signature": ""}] \
        if reasoning else []
    if text or refusal:
        blocks.append({"type": "text", "text": text or refusal})
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
