"""Google Gemini (Generative Language API v1beta) <-> OpenAI Chat Completions: pure functions.

Dicts in, dicts out, no I/O. Wire format: https://ai.google.dev/api/generate-content
(GenerateContentRequest/Response, Content, Part, Tool, ToolConfig, GenerationConfig,
UsageMetadata), https://ai.google.dev/api/embeddings (batchEmbedContents) and
https://ai.google.dev/api/tokens (countTokens). The stream translator lives in
providers.gemini_stream and is re-exported here.

Schemas are sent as JSON Schema: tool parameters in `FunctionDeclaration.parametersJsonSchema`
and structured output in `GenerationConfig.responseJsonSchema`. The older `parameters` and
`responseSchema` fields take an OpenAPI subset whose parser rejects the whole request over one
`additionalProperties`, `$ref` or `const`; the JSON Schema fields accept them (unsupported
keywords are ignored, per the field docs). Only a root `$schema` is removed, which real
clients (zod, MCP servers) send and which has no meaning to the model.

Thought signatures: Gemini 3 rejects (4xx) a history whose function calls lack the
`thoughtSignature` it returned (https://ai.google.dev/gemini-api/docs/thought-signatures).
Responses carry it on each tool call as `extra_content.google.thought_signature`, the shape
Gemini's own OpenAI-compatible endpoint uses, so clients that echo the assistant message back
return it; a history without one (another model's, or an SDK that dropped the field) gets the
placeholder those docs give for histories not produced by Gemini, on its first call per turn.

`reasoning_effort` becomes `generationConfig.thinkingConfig`: a `thinkingLevel` on Gemini 3
and later, a `thinkingBudget` on Gemini 2.5 (see `thinking_config`); models that do not
think get none.

Dropped request fields (no Gemini equivalent, and the answer stays usable without them):
`logit_bias`, `parallel_tool_calls`, `verbosity`, `prediction`,
`web_search_options`, `service_tier`, `store`, `metadata`, `user`, `safety_identifier`,
`prompt_cache_key`, `stream`/`stream_options` (the URL decides), image `detail`, message
`name`, tool `strict`, and presence/frequency penalties equal to 0 (some models reject any
penalty). System and developer messages anywhere in the list all go to `systemInstruction`.
Refused with TranslationError (the answer would silently be something else): legacy
`functions`/`function_call`, audio output, tools other than functions, content part types
Gemini cannot take (`file_id` files, unknown types), unparsable tool-call arguments, tool
results for unknown call ids, more than 5 stop sequences, token-array embedding input, and
image URLs (but Files API and YouTube URIs) for the Gemini 2.0 models, which do not fetch
them. Other models get an http(s) image URL as `fileData` and fetch it themselves.
"""
from __future__ import annotations

import math
import re
from typing import Any
from urllib.parse import urlsplit

import orjson

from providers.gemini_stream import (
    GeminiStreamToChat,
    chat_usage,
    completion_id,
    created_now,
    finish_reason,
    logprobs_to_chat,
    response_tool_call,
    walk_parts,
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
    invalid,
    part_text,
    part_type,
    response_format_type,
    strings,
    tool_arguments,
    tool_call,
)

JSON = dict[str, Any]

# From the thought-signatures guide: accepted in place of a signature for function calls
# that Gemini did not produce.
PLACEHOLDER_SIGNATURE = "skip_thought_signature_validator"
_MIME_BY_EXTENSION = {
    "png": "image/png", "jpg": "image/jpeg", "jpeg": "image/jpeg", "webp": "image/webp",
    "gif": "image/gif", "heic": "image/heic", "heif": "image/heif", "pdf": "application/pdf",
}
_TOOL_MODES = {"auto": "AUTO", "none": "NONE", "required": "ANY"}
# URIs every model fetches: the Files API's and YouTube's (the file input methods guide).
_ALWAYS_FETCHED = ("https://generativelanguage.googleapis.com/", "https://www.youtube.com/",
                   "https://youtube.com/", "https://youtu.be/")
# GenerationConfig.stopSequences: "The set of character sequences (up to 5)"; more are
# refused (continuedev/continue#2702), and dropping some would change where the answer ends.
MAX_STOP_SEQUENCES = 5
# google.rpc.Code names for bodies that carry none (an HTML page from a proxy, say).
_STATUS_BY_HTTP = {
    400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
    404: "NOT_FOUND", 409: "ABORTED", 429: "RESOURCE_EXHAUSTED", 499: "CANCELLED",
    500: "INTERNAL", 501: "NOT_IMPLEMENTED", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED",
}

__all__ = [
    "GeminiStreamToChat", "TranslationError", "UpstreamStreamError", "chat_request_to_gemini",
    "embeddings_request_to_gemini", "gemini_count_tokens_result", "gemini_embeddings_to_openai",
    "gemini_response_to_chat", "messages_count_request_to_gemini", "parse_gemini_error",
]


# -- chat request ----------------------------------------------------------------------------

def chat_request_to_gemini(body: JSON, *, fetches_urls: bool = True, model: str = "") -> JSON:
    """OpenAI chat request -> GenerateContentRequest body (the model goes in the URL).

    `fetches_urls`: whether the model fetches image URLs itself (see `fetches_urls`);
    `model`: the upstream model, whose generation decides how `reasoning_effort` is said.
    """
    _refuse_inexpressible(body)
    system, contents = _contents(an_array(body.get("messages"), "messages"), fetches_urls)
    request: JSON = {"contents": contents}
    if system:
        request["systemInstruction"] = {"parts": system}
    tools = an_array(body.get("tools"), "tools")
    if tools:
        calling, allowed = _function_calling_config(body.get("tool_choice"))
        declarations = [_declaration(tool, f"tools[{index}]")
                        for index, tool in enumerate(tools)]
        if allowed is not None:
            declarations = [d for d in declarations if d["name"] in allowed]
        request["tools"] = [{"functionDeclarations": declarations}]
        if calling:
            request["toolConfig"] = {"functionCallingConfig": calling}
    config = _generation_config(body)
    effort = a_reasoning_effort(body)
    if effort is not None and (thinking := thinking_config(effort, model)) is not None:
        config["thinkingConfig"] = thinking
    if config:
        request["generationConfig"] = config
    return request


# Gemini's version in a model name: "gemini-2.5-flash", "models/gemini-3-pro-preview".
_GEMINI_VERSION = re.compile(r"gemini-(\d+)(?:\.(\d+))?")
# Gemini 2.5's thinking budgets per effort, as Gemini's own OpenAI-compatible endpoint sets
# them (low 1024, medium 8192, high 24576); minimal is Flash-Lite's least (512), 2.5 Pro's
# least is 128 (it cannot turn thinking off) and its most 32768.
_GEMINI_BUDGETS = {"minimal": 512, "low": 1024, "medium": 8192, "high": 24576,
                   "xhigh": 24576}


def thinking_config(effort: str, model: str) -> JSON | None:
    """OpenAI's `reasoning_effort` as Gemini's `thinkingConfig` for `model`
    (https://ai.google.dev/gemini-api/docs/thinking): Gemini 3 and later take a
    `thinkingLevel` (Pro models low or high; the others minimal, low, medium or high) and
    cannot turn thinking off, "none" being their least; Gemini 2.5 takes a `thinkingBudget`
    (`_GEMINI_BUDGETS`; "none" is 0, but 2.5 Pro's least, 128). None for models that do
    not think (Gemini 2.0 and older) or whose name says no Gemini version (Gemma, a
    proxy's own names): they refuse a `thinkingConfig`."""
    name = model.removeprefix("models/")
    found = _GEMINI_VERSION.search(name)
    if found is None:
        return None
    version = (int(found[1]), int(found[2] or 0))
    pro = "-pro" in name
    if version >= (3, 0):
        if pro:
            return {"thinkingLevel": "low" if effort in ("none", "minimal", "low") else "high"}
        return {"thinkingLevel": {"none": "minimal", "xhigh": "high"}.get(effort, effort)}
    if version < (2, 5):
        return None
    if pro:
        budget = {"none": 128, "minimal": 128, "xhigh": 32768}.get(effort)
    else:
        budget = 0 if effort == "none" else None
    return {"thinkingBudget": _GEMINI_BUDGETS[effort] if budget is None else budget}


def _refuse_inexpressible(body: JSON) -> None:
    if body.get("functions") or body.get("function_call"):
        raise TranslationError("legacy `functions`/`function_call` are not supported for "
                               "Gemini models; send `tools` and `tool_choice` instead.")
    if body.get("moderation") is not None:  # (OpenAI's own check of input and output)
        raise TranslationError("`moderation` is run by OpenAI and has no Gemini equivalent: "
                               "its policy would not be applied, nor its result returned. "
                               "Send it to an OpenAI deployment, or leave it out.",
                               param="moderation")
    if "audio" in strings(body.get("modalities"), "modalities", "an array of strings") or \
            body.get("audio"):
        raise TranslationError("audio output is not available through this Gemini route.")


def fetches_urls(model: str) -> bool:
    """Whether a Gemini model fetches public http(s) URLs in `fileData.fileUri`.

    Gemini does since January 2026 ("Increased file size limits and expanded inputs support
    in Gemini API", blog.google; the file input methods guide), except the Gemini 2.0
    models, which answer "Invalid or unsupported file uri" (BoundaryML/baml#1548); the
    Vercel AI SDK's google provider draws the same line (`supportsExternalFileUrls`).
    Files API and YouTube URIs work with every model.
    """
    return not model.removeprefix("models/").startswith("gemini-2.0")


def _contents(messages: list[Any], fetches: bool) -> tuple[list[JSON], list[JSON]]:
    system: list[JSON] = []
    contents: list[JSON] = []
    call_names: dict[str, str] = {}  # tool_call id -> function name, for the tool results
    for index, item in enumerate(messages):
        at = f"messages[{index}]"
        message = an_object(item, at)
        role = a_string(message.get("role"), at + ".role")
        if role in ("system", "developer"):
            system.extend(_text_parts(message.get("content"), role, at + ".content"))
            continue
        if role == "user":
            gemini_role, parts = "user", _user_parts(message.get("content"), fetches,
                                                     at + ".content")
        elif role == "assistant":
            gemini_role, parts = "model", _assistant_parts(message, call_names, at)
        elif role in ("tool", "function"):
            gemini_role, parts = "user", [_tool_result_part(message, call_names, at)]
        else:
            raise TranslationError(f"message role {role!r} is not supported.",
                                   param=at + ".role")
        if not parts:
            continue  # Gemini rejects a content without parts
        if contents and contents[-1]["role"] == gemini_role:
            contents[-1]["parts"].extend(parts)  # Gemini wants user/model turns to alternate
        else:
            contents.append({"role": gemini_role, "parts": parts})
    if call_names:  # (the calls' ids in the order they came)
        order = {call_id: position for position, call_id in enumerate(call_names)}
        for content in contents:
            if content["role"] == "user":
                _in_call_order(content["parts"], order)
    return system, contents


def _in_call_order(parts: list[JSON], order: dict[str, int]) -> None:
    """The function responses of a turn in the order of the calls they answer (`order`:
    each call id's place). OpenAI pairs a tool result with its call by `tool_call_id`, so
    the results may come in any order; Gemini pairs them by position (and name), so the
    results of two calls of one function (the weather in Paris, then in London), sent London
    first, answered Paris with London's."""
    slots = [index for index, part in enumerate(parts) if "_call_id" in part]
    if not slots:
        return
    answers = sorted((parts[index] for index in slots),
                     key=lambda part: order.get(part["_call_id"], len(order)))
    for index, answer in zip(slots, answers, strict=True):
        del answer["_call_id"]
        parts[index] = answer


def _text_parts(content: Any, role: str, param: str) -> list[JSON]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"text": content}] if content else []
    parts = []
    for index, item in enumerate(content_parts(content, param)):
        at = f"{param}[{index}]"
        part, kind = part_type(item, at)
        if kind not in ("text", "refusal"):
            raise TranslationError(f"{role} messages can only hold text for Gemini models, "
                                   f"not {kind!r} parts.", param=at + ".type")
        text = part_text(part, kind, at)
        if text:
            parts.append({"text": text})
    return parts


def _user_parts(content: Any, fetches: bool, param: str) -> list[JSON]:
    if content is None or isinstance(content, str):
        return _text_parts(content, "user", param)
    parts: list[JSON] = []
    for index, item in enumerate(content_parts(content, param)):
        at = f"{param}[{index}]"
        part, kind = part_type(item, at)
        if kind == "text":
            text = a_string(part.get("text"), at + ".text")
            if text:
                parts.append({"text": text})
        elif kind == "image_url":
            parts.append(_media_part(image_url(part, at), fetches, at + ".image_url"))
        elif kind == "input_audio":
            audio = an_object(part.get("input_audio"), at + ".input_audio")
            audio_format = a_string(audio.get("format"), at + ".input_audio.format")
            parts.append({"inlineData": {"mimeType": f"audio/{audio_format}", "data": a_string(
                audio.get("data"), at + ".input_audio.data")}})
        elif kind == "file":
            parts.append(_file_part(an_object(part.get("file"), at + ".file"), at + ".file"))
        else:
            raise TranslationError(f"content parts of type {kind!r} cannot be sent to Gemini.",
                                   param=at + ".type")
    return parts


def _media_part(url: str, fetches: bool, param: str) -> JSON:
    if url.startswith("data:"):
        return {"inlineData": _data_url(url, param + ".url")}
    if url.startswith(("https://", "http://")):
        if not fetches and not url.startswith(_ALWAYS_FETCHED):
            raise TranslationError("Gemini 2.0 models do not fetch images from URLs; send the "
                                   "image inline as a base64 data: URL.")
        try:
            extension = urlsplit(url).path.rpartition(".")[2].lower()
        except ValueError:  # ("https://[bad/x.png": an unclosed IPv6 bracket)
            raise TranslationError("the image URL cannot be read as a URL.",
                                   param=param + ".url") from None
        mime = _MIME_BY_EXTENSION.get(extension, "image/jpeg")
        return {"fileData": {"mimeType": mime, "fileUri": url}}
    raise TranslationError("image URLs must be http(s) or base64 data: URLs.",
                           param=param + ".url")


def _data_url(url: str, param: str) -> JSON:
    header, comma, data = url[len("data:"):].partition(",")
    if not comma or not header.endswith(";base64"):
        raise TranslationError("data: URLs must be base64-encoded.", param=param)
    return {"mimeType": header.split(";")[0] or "application/octet-stream", "data": data}


def _file_part(file: JSON, param: str) -> JSON:
    data = a_string_or_none(file.get("file_data"), param + ".file_data")
    if not data:
        raise TranslationError(f"'{param}.file_data' is required: files must be sent inline "
                               "to Gemini models; uploaded `file_id`s are not available there.",
                               param=param + ".file_data")
    filename = a_string_or_none(file.get("filename"), param + ".filename") or ""
    if data.startswith("data:"):
        return {"inlineData": _data_url(data, param + ".file_data")}
    extension = filename.rpartition(".")[2].lower()
    if extension not in _MIME_BY_EXTENSION:
        raise TranslationError("`file_data` needs a data: URL or a filename with a known type.",
                               param=param + ".filename")
    return {"inlineData": {"mimeType": _MIME_BY_EXTENSION[extension], "data": data}}


def _assistant_parts(message: JSON, call_names: dict[str, str], param: str) -> list[JSON]:
    parts = _text_parts(message.get("content"), "assistant", param + ".content")
    for position, call in enumerate(an_array(message.get("tool_calls"),
                                             param + ".tool_calls")):
        at = f"{param}.tool_calls[{position}]"
        call_id, name, arguments = tool_call(call, at)
        call_names.pop(call_id, None)  # (an id used again: its place is its latest call's)
        call_names[call_id] = name
        part: JSON = {"functionCall": {"name": name, "args": tool_arguments(
            arguments, at + ".function.arguments")}}
        signature = _signature(call)
        if signature or position == 0:
            part["thoughtSignature"] = signature or PLACEHOLDER_SIGNATURE
        parts.append(part)
    return parts


def _signature(call: JSON) -> str | None:
    extra = call.get("extra_content")
    google = extra.get("google") if isinstance(extra, dict) else None
    signature = google.get("thought_signature") if isinstance(google, dict) else None
    return signature if isinstance(signature, str) and signature else None


def _tool_result_part(message: JSON, call_names: dict[str, str], param: str) -> JSON:
    call_id: str | None = None
    if message.get("role") == "function":  # the legacy shape names the function itself
        name = a_string(message.get("name"), param + ".name")
    else:
        call_id = a_string(message.get("tool_call_id"), param + ".tool_call_id")
        name = call_names.get(call_id, "")
        if not name:
            raise TranslationError(f"'{param}.tool_call_id' ({call_id!r}) does not answer "
                                   "any earlier assistant tool call.",
                                   param=param + ".tool_call_id")
    content = message.get("content")
    if not isinstance(content, str):
        texts = []
        for index, item in enumerate(an_array(content, param + ".content",
                                              "a string or an array of content parts")):
            part, kind = part_type(item, f"{param}.content[{index}]")
            if kind == "text":
                texts.append(a_string(part.get("text"), f"{param}.content[{index}].text"))
        content = "".join(texts)
    answer: JSON = {"functionResponse": {"name": name, "response": _result_object(content)}}
    if call_id is not None:
        answer["_call_id"] = call_id  # (put in call order, then dropped: `_in_call_order`)
    return answer


def _result_object(content: str) -> JSON:
    # FunctionResponse.response must be a JSON object; anything else is wrapped.
    try:
        parsed = orjson.loads(content)
    except orjson.JSONDecodeError:
        parsed = None
    return parsed if isinstance(parsed, dict) else {"result": content}


def _declaration(tool: Any, param: str) -> JSON:
    found = function_tool(tool, param)
    if found is None:
        raise TranslationError(f"tools of type {tool.get('type')!r} have no Gemini equivalent.",
                               param="tools")
    function, name = found
    declaration: JSON = {"name": name}
    if function.get("description"):
        declaration["description"] = function["description"]
    if function.get("parameters"):
        declaration["parametersJsonSchema"] = _json_schema(function["parameters"])
    return declaration


def _json_schema(schema: JSON) -> JSON:
    return {key: value for key, value in schema.items() if key != "$schema"}


def _function_calling_config(choice: Any) -> tuple[JSON, set[str] | None]:
    """(functionCallingConfig, the tool names to keep or None for all)."""
    if choice is None:
        return {}, None
    if isinstance(choice, str) and choice in _TOOL_MODES:
        return {"mode": _TOOL_MODES[choice]}, None
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"mode": "ANY", "allowedFunctionNames": [chosen_function(choice)]}, None
    if isinstance(choice, dict) and choice.get("type") == "allowed_tools":
        names, required = allowed_tools(choice)
        if required:  # allowedFunctionNames is only valid with ANY
            return {"mode": "ANY", "allowedFunctionNames": sorted(names)}, names
        return {"mode": "AUTO"}, names
    raise bad_tool_choice(choice, "Gemini")


def _generation_config(body: JSON) -> JSON:
    config: JSON = {}
    for ours, theirs in (("temperature", "temperature"), ("top_p", "topP")):
        if (number := a_number(body, ours)) is not None:
            config[theirs] = number
    for ours, theirs in (("top_k", "topK"), ("seed", "seed")):
        if (integer := an_integer(body, ours)) is not None:
            config[theirs] = integer
    for ours, theirs in (("presence_penalty", "presencePenalty"),
                         ("frequency_penalty", "frequencyPenalty")):
        if a_number(body, ours):
            config[theirs] = body[ours]
    max_tokens = an_integer(body, "max_completion_tokens")
    if max_tokens is None:
        max_tokens = an_integer(body, "max_tokens")
    if max_tokens is not None:
        config["maxOutputTokens"] = max_tokens
    if an_integer(body, "n") not in (None, 1):
        config["candidateCount"] = body["n"]
    stop = strings(body.get("stop"), "stop")
    if stop:
        config["stopSequences"] = list(stop)
        if len(stop) > MAX_STOP_SEQUENCES:
            raise TranslationError(f"Gemini models take at most {MAX_STOP_SEQUENCES} stop "
                                   f"sequences; this request has {len(stop)}.", param="stop")
    if a_flag(body.get("logprobs"), "logprobs"):
        config["responseLogprobs"] = True
        if (top_logprobs := an_integer(body, "top_logprobs")) is not None:
            config["logprobs"] = top_logprobs
    config.update(_response_format(body))
    return config


def _response_format(body: JSON) -> JSON:
    kind = response_format_type(body)
    if kind is None or kind == "text":
        return {}
    if kind == "json_object":
        return {"responseMimeType": "application/json"}
    if kind == "json_schema":
        json_schema = an_object(body["response_format"].get("json_schema"),
                                "response_format.json_schema")
        config: JSON = {"responseMimeType": "application/json"}
        schema = json_schema.get("schema")
        if schema is not None:
            config["responseJsonSchema"] = _json_schema(
                an_object(schema, "response_format.json_schema.schema"))
        return config
    raise TranslationError(f"response_format {kind!r} has no Gemini equivalent.",
                           param="response_format")


# -- chat response ---------------------------------------------------------------------------

def gemini_response_to_chat(resp: JSON, public_model: str) -> JSON:
    """GenerateContentResponse -> OpenAI `chat.completion`, one choice per candidate."""
    response_id = resp.get("responseId")
    choices = [_choice(candidate, candidate.get("index", position), response_id)
               for position, candidate in enumerate(resp.get("candidates") or ())]
    if not choices:  # the prompt itself was blocked: no candidates, promptFeedback says why
        blocked = bool((resp.get("promptFeedback") or {}).get("blockReason"))
        choices = [{"index": 0, "message": {"role": "assistant", "content": None,
                                            "refusal": None},
                    "logprobs": None, "finish_reason": "content_filter" if blocked else "stop"}]
    completion: JSON = {"id": completion_id(response_id), "object": "chat.completion",
                        "created": created_now(), "model": public_model, "choices": choices}
    usage = chat_usage(resp.get("usageMetadata"))
    if usage is not None:
        completion["usage"] = usage
    return completion


def _choice(candidate: JSON, index: int, response_id: Any) -> JSON:
    texts: list[str] = []
    calls: list[JSON] = []
    for kind, value in walk_parts(candidate):
        if kind == "text":
            texts.append(value)
        else:
            calls.append(response_tool_call(value, response_id, index, len(calls)))
    message: JSON = {"role": "assistant", "content": "".join(texts) if texts else None,
                     "refusal": None}
    if calls:
        message["tool_calls"] = calls
    return {"index": index, "message": message,
            "logprobs": logprobs_to_chat(candidate.get("logprobsResult")),
            "finish_reason": finish_reason(candidate.get("finishReason"), bool(calls))}


# -- embeddings, token counting, errors ------------------------------------------------------

# batchEmbedContents takes at most 100 requests ("We do have a limit of 100 in a batch", a
# Gemini API maintainer in lancedb/lancedb#3618; more is a 400, "at most 100 requests can be
# in one batch", geldata/gel#9032). OpenAI takes up to 2,048 inputs.
MAX_EMBED_BATCH = 100


def resource_name(model: str) -> str:
    """A deployment's Gemini model as its resource name, `models/{id}`: the part of the
    method's path before the colon (`v1beta/{model=models/*}:batchEmbedContents`) and the
    `model` of a request body. A deployment may name it either way (`text-embedding-004`,
    `models/text-embedding-004`)."""
    return model if model.startswith("models/") else f"models/{model}"


def embeddings_request_to_gemini(body: JSON, upstream_model: str) -> JSON:
    """OpenAI embeddings request -> batchEmbedContents body, one request per input text."""
    texts = embedding_texts(body.get("input"))
    model = resource_name(upstream_model)
    encoding = a_string_or_none(body.get("encoding_format"), "encoding_format")
    if encoding not in (None, "float", "base64"):
        raise TranslationError(f"encoding_format {encoding!r} is not supported; use 'float' "
                               "or 'base64'.", param="encoding_format")
    options: JSON = {}
    dimensions = an_integer(body, "dimensions")
    if dimensions is not None:
        options["outputDimensionality"] = dimensions
    return {"requests": [{"model": model, "content": {"parts": [{"text": text}]}, **options}
                         for text in texts]}


def embeddings_batches(request: JSON) -> list[JSON]:
    """A batchEmbedContents body as the bodies of at most MAX_EMBED_BATCH requests each."""
    requests = request["requests"]
    return [{"requests": requests[at:at + MAX_EMBED_BATCH]}
            for at in range(0, len(requests), MAX_EMBED_BATCH)]


def combine_embeddings(responses: list[JSON]) -> JSON:
    """The batchEmbedContents responses to consecutive batches as the one response to all
    (each lists its embeddings in the order of its requests)."""
    return {"embeddings": [embedding for response in responses
                           for embedding in response["embeddings"]]}


def embedding_texts(value: Any) -> list[str]:
    """An embeddings request's `input` as its list of texts (TranslationError: not text)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(item, str) for item in value):
            return value
        if all(isinstance(item, (int, list)) and not isinstance(item, bool) for item in value):
            raise TranslationError("Gemini embeddings take text input, not token arrays.",
                                   param="input")
        index, item = next((i, item) for i, item in enumerate(value) if not isinstance(item, str))
        raise invalid(f"input[{index}]", "a string", item)
    raise TranslationError("`input` must be a string or a non-empty list of strings.",
                           param="input")


def gemini_embeddings_to_openai(resp: JSON, public_model: str, input_tokens: int) -> JSON:
    """batchEmbedContents response -> OpenAI embeddings list (usage is the caller's estimate)."""
    data = [{"object": "embedding", "index": index, "embedding": embedding["values"]}
            for index, embedding in enumerate(resp["embeddings"])]
    return {"object": "list", "data": data, "model": public_model,
            "usage": {"prompt_tokens": input_tokens, "total_tokens": input_tokens}}


def messages_count_request_to_gemini(contents_body: JSON) -> JSON:
    """GenerateContentRequest (with `model`) -> countTokens body.

    The `generateContentRequest` form is the one that counts the system instruction and the
    tool declarations too; a bare `contents` would undercount.
    """
    if not contents_body.get("model"):
        raise TranslationError("counting tokens needs the request's `model` (models/<id>).")
    # Output settings add no prompt tokens, and some (candidateCount) fail validation here.
    request = {key: value for key, value in contents_body.items() if key != "generationConfig"}
    return {"generateContentRequest": request}


def gemini_count_tokens_result(resp: JSON) -> int:
    """countTokens response -> the prompt's token count (proto JSON omits a zero count)."""
    return int(resp.get("totalTokens") or 0)


def parse_gemini_error(status: int, body: bytes) -> tuple[str, str]:
    """(error type such as RESOURCE_EXHAUSTED, message) from any Gemini error body."""
    fallback = _STATUS_BY_HTTP.get(status, "UNKNOWN")
    error = _error_object(body)
    text = body.decode("utf-8", "replace").strip()[:500] or f"HTTP {status}"
    if not isinstance(error, dict):
        return fallback, text
    return str(error.get("status") or fallback), str(error.get("message") or text)


_RETRY_INFO = "type.googleapis.com/google.rpc.RetryInfo"
# A google.protobuf.Duration in JSON: seconds, with up to 9 fractional digits, and "s".
_DURATION = re.compile(r"\d+(?:\.\d{1,9})?s", re.ASCII)


def gemini_retry_delay(body: bytes) -> str | None:
    """The Retry-After (whole seconds, rounded up) of a Gemini error body's RetryInfo
    detail (`{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "31s"}`,
    https://ai.google.dev/gemini-api/docs/rate-limits), None without one."""
    error = _error_object(body)
    details = error.get("details") if error is not None else None
    for detail in details if isinstance(details, list) else ():
        if isinstance(detail, dict) and detail.get("@type") == _RETRY_INFO:
            delay = detail.get("retryDelay")
            if isinstance(delay, str) and _DURATION.fullmatch(delay):
                seconds = float(delay[:-1])  # (400 digits are a float's inf)
                return str(math.ceil(seconds)) if math.isfinite(seconds) else None
    return None


def _error_object(body: bytes) -> dict[str, Any] | None:
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if isinstance(payload, list) and payload:  # non-SSE streams wrap everything in a list
        payload = payload[0]
    error = payload.get("error") if isinstance(payload, dict) else None
    return error if isinstance(error, dict) else None
