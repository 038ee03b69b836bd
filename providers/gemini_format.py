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

Dropped request fields (no Gemini equivalent, and the answer stays usable without them):
`logit_bias`, `parallel_tool_calls`, `reasoning_effort`, `verbosity`, `prediction`,
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
from providers.translation import TranslationError, tool_arguments

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

def chat_request_to_gemini(body: JSON, *, fetches_urls: bool = True) -> JSON:
    """OpenAI chat request -> GenerateContentRequest body (the model goes in the URL).

    `fetches_urls`: whether the model fetches image URLs itself (see `fetches_urls`).
    """
    _refuse_inexpressible(body)
    system, contents = _contents(body.get("messages") or [], fetches_urls)
    request: JSON = {"contents": contents}
    if system:
        request["systemInstruction"] = {"parts": system}
    if body.get("tools"):
        calling, allowed = _function_calling_config(body.get("tool_choice"))
        declarations = [_declaration(tool) for tool in body["tools"]]
        if allowed is not None:
            declarations = [d for d in declarations if d["name"] in allowed]
        request["tools"] = [{"functionDeclarations": declarations}]
        if calling:
            request["toolConfig"] = {"functionCallingConfig": calling}
    config = _generation_config(body)
    if config:
        request["generationConfig"] = config
    return request


def _refuse_inexpressible(body: JSON) -> None:
    if body.get("functions") or body.get("function_call"):
        raise TranslationError("legacy `functions`/`function_call` are not supported for "
                               "Gemini models; send `tools` and `tool_choice` instead.")
    if "audio" in (body.get("modalities") or ()) or body.get("audio"):
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


def _contents(messages: list[JSON], fetches: bool) -> tuple[list[JSON], list[JSON]]:
    system: list[JSON] = []
    contents: list[JSON] = []
    call_names: dict[str, str] = {}  # tool_call id -> function name, for the tool results
    for message in messages:
        role = message.get("role")
        if role in ("system", "developer"):
            system.extend(_text_parts(message.get("content"), str(role)))
            continue
        if role == "user":
            gemini_role, parts = "user", _user_parts(message.get("content"), fetches)
        elif role == "assistant":
            gemini_role, parts = "model", _assistant_parts(message, call_names)
        elif role in ("tool", "function"):
            gemini_role, parts = "user", [_tool_result_part(message, call_names)]
        else:
            raise TranslationError(f"message role {role!r} is not supported.")
        if not parts:
            continue  # Gemini rejects a content without parts
        if contents and contents[-1]["role"] == gemini_role:
            contents[-1]["parts"].extend(parts)  # Gemini wants user/model turns to alternate
        else:
            contents.append({"role": gemini_role, "parts": parts})
    return system, contents


def _text_parts(content: Any, role: str) -> list[JSON]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"text": content}] if content else []
    parts = []
    for part in content:
        if part.get("type") not in ("text", "refusal"):
            raise TranslationError(f"{role} messages can only hold text for Gemini models, "
                                   f"not {part.get('type')!r} parts.")
        text = part.get("text", part.get("refusal"))
        if text:
            parts.append({"text": text})
    return parts


def _user_parts(content: Any, fetches: bool) -> list[JSON]:
    if content is None or isinstance(content, str):
        return _text_parts(content, "user")
    parts = []
    for part in content:
        kind = part.get("type")
        if kind == "text":
            if part.get("text"):
                parts.append({"text": part["text"]})
        elif kind == "image_url":
            image = part["image_url"]
            parts.append(_media_part(image["url"] if isinstance(image, dict) else image,
                                     fetches))
        elif kind == "input_audio":
            audio = part["input_audio"]
            parts.append({"inlineData": {"mimeType": f"audio/{audio['format']}",
                                         "data": audio["data"]}})
        elif kind == "file":
            parts.append(_file_part(part["file"]))
        else:
            raise TranslationError(f"content parts of type {kind!r} cannot be sent to Gemini.")
    return parts


def _media_part(url: str, fetches: bool) -> JSON:
    if url.startswith("data:"):
        return {"inlineData": _data_url(url)}
    if url.startswith(("https://", "http://")):
        if not fetches and not url.startswith(_ALWAYS_FETCHED):
            raise TranslationError("Gemini 2.0 models do not fetch images from URLs; send the "
                                   "image inline as a base64 data: URL.")
        extension = urlsplit(url).path.rpartition(".")[2].lower()
        mime = _MIME_BY_EXTENSION.get(extension, "image/jpeg")
        return {"fileData": {"mimeType": mime, "fileUri": url}}
    raise TranslationError("image URLs must be http(s) or base64 data: URLs.")


def _data_url(url: str) -> JSON:
    header, comma, data = url[len("data:"):].partition(",")
    if not comma or not header.endswith(";base64"):
        raise TranslationError("data: URLs must be base64-encoded.")
    return {"mimeType": header.split(";")[0] or "application/octet-stream", "data": data}


def _file_part(file: JSON) -> JSON:
    data = file.get("file_data")
    if not data:
        raise TranslationError("files must be sent inline (`file_data`) to Gemini models; "
                               "uploaded `file_id`s are not available there.")
    if data.startswith("data:"):
        return {"inlineData": _data_url(data)}
    extension = str(file.get("filename") or "").rpartition(".")[2].lower()
    if extension not in _MIME_BY_EXTENSION:
        raise TranslationError("`file_data` needs a data: URL or a filename with a known type.")
    return {"inlineData": {"mimeType": _MIME_BY_EXTENSION[extension], "data": data}}


def _assistant_parts(message: JSON, call_names: dict[str, str]) -> list[JSON]:
    parts = _text_parts(message.get("content"), "assistant")
    for position, call in enumerate(message.get("tool_calls") or ()):
        if call.get("type", "function") != "function":
            raise TranslationError(f"tool calls of type {call.get('type')!r} cannot be sent "
                                   "to Gemini.")
        function = call["function"]
        call_names[call.get("id", "")] = function["name"]
        part: JSON = {"functionCall": {"name": function["name"],
                                       "args": tool_arguments(function.get("arguments"))}}
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


def _tool_result_part(message: JSON, call_names: dict[str, str]) -> JSON:
    if message.get("role") == "function":  # the legacy shape names the function itself
        name = message.get("name")
    else:
        name = call_names.get(message.get("tool_call_id") or "")
    if not name:
        raise TranslationError(f"the tool result for call {message.get('tool_call_id')!r} "
                               "does not answer any earlier assistant tool call.")
    content = message.get("content")
    if not isinstance(content, str):
        content = "".join(p.get("text", "") for p in content or () if p.get("type") == "text")
    return {"functionResponse": {"name": name, "response": _result_object(content)}}


def _result_object(content: str) -> JSON:
    # FunctionResponse.response must be a JSON object; anything else is wrapped.
    try:
        parsed = orjson.loads(content)
    except orjson.JSONDecodeError:
        parsed = None
    return parsed if isinstance(parsed, dict) else {"result": content}


def _declaration(tool: JSON) -> JSON:
    if tool.get("type") != "function":
        raise TranslationError(f"tools of type {tool.get('type')!r} have no Gemini equivalent.",
                               param="tools")
    function = tool["function"]
    declaration: JSON = {"name": function["name"]}
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
        return {"mode": "ANY", "allowedFunctionNames": [choice["function"]["name"]]}, None
    if isinstance(choice, dict) and choice.get("type") == "allowed_tools":
        allowed = choice["allowed_tools"]
        names = {tool["function"]["name"] for tool in allowed.get("tools") or ()}
        if allowed.get("mode") == "required":  # allowedFunctionNames is only valid with ANY
            return {"mode": "ANY", "allowedFunctionNames": sorted(names)}, names
        return {"mode": "AUTO"}, names
    raise TranslationError(f"tool_choice {choice!r} has no Gemini equivalent.",
                           param="tool_choice")


def _generation_config(body: JSON) -> JSON:
    config: JSON = {}
    for ours, theirs in (("temperature", "temperature"), ("top_p", "topP"), ("top_k", "topK"),
                         ("seed", "seed")):
        if body.get(ours) is not None:
            config[theirs] = body[ours]
    for ours, theirs in (("presence_penalty", "presencePenalty"),
                         ("frequency_penalty", "frequencyPenalty")):
        if body.get(ours):
            config[theirs] = body[ours]
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        config["maxOutputTokens"] = max_tokens
    if body.get("n") not in (None, 1):
        config["candidateCount"] = body["n"]
    stop = body.get("stop")
    if stop:
        config["stopSequences"] = [stop] if isinstance(stop, str) else list(stop)
        if len(config["stopSequences"]) > MAX_STOP_SEQUENCES:
            raise TranslationError(f"Gemini models take at most {MAX_STOP_SEQUENCES} stop "
                                   f"sequences; this request has "
                                   f"{len(config['stopSequences'])}.", param="stop")
    if body.get("logprobs"):
        config["responseLogprobs"] = True
        if body.get("top_logprobs") is not None:
            config["logprobs"] = body["top_logprobs"]
    config.update(_response_format(body.get("response_format")))
    return config


def _response_format(response_format: Any) -> JSON:
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if response_format is None or kind == "text":
        return {}
    if kind == "json_object":
        return {"responseMimeType": "application/json"}
    if kind == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema")
        config: JSON = {"responseMimeType": "application/json"}
        if schema:
            config["responseJsonSchema"] = _json_schema(schema)
        return config
    raise TranslationError(f"response_format {response_format!r} has no Gemini equivalent.",
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


def embeddings_request_to_gemini(body: JSON, upstream_model: str) -> JSON:
    """OpenAI embeddings request -> batchEmbedContents body, one request per input text."""
    texts = _embedding_texts(body.get("input"))
    model = upstream_model if upstream_model.startswith("models/") else f"models/{upstream_model}"
    options: JSON = {}
    if body.get("dimensions") is not None:
        options["outputDimensionality"] = body["dimensions"]
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


def _embedding_texts(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(item, str) for item in value):
        return value
    if isinstance(value, list) and value:
        raise TranslationError("Gemini embeddings take text input, not token arrays.",
                               param="input")
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
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        payload = None
    if isinstance(payload, list) and payload:  # non-SSE streams wrap everything in a list
        payload = payload[0]
    error = payload.get("error") if isinstance(payload, dict) else None
    text = body.decode("utf-8", "replace").strip()[:500] or f"HTTP {status}"
    if not isinstance(error, dict):
        return fallback, text
    return str(error.get("status") or fallback), str(error.get("message") or text)
