"""Google Gemini API (v1beta): generateContent, streamGenerateContent, countTokens, embeddings.

Shapes from https://ai.google.dev/api/generate-content: camelCase proto JSON, candidates with
`content.parts` (text or `functionCall`), `finishReason` STOP/MAX_TOKENS, `usageMetadata`,
`modelVersion`, `responseId`. `streamGenerateContent?alt=sse` sends `data:` lines only (no
event names), and without `alt=sse` a JSON array of the same chunks. Errors are
`{"error": {"code", "message", "status"}}`; the key comes as `x-goog-api-key` or `?key=`.
"""
from __future__ import annotations

import json
from typing import Any

import orjson
from aiohttp import web

from tests.mock_providers.behaviour import (
    Conversation,
    Reply,
    ToolSpec,
    count_input,
    embed,
    reply_for,
    split_chunks,
)
from tests.mock_providers.faults import MockConfig
from tests.mock_providers.wire import (
    JSON,
    BadRequest,
    Call,
    ProviderWire,
    body_dict,
    dumps,
    error_response,
    random_id,
    respond_json,
    respond_stream,
    retry_after_value,
)

JSON_TYPE = "application/json; charset=UTF-8"
# GenerationConfig.stopSequences: "The set of character sequences (up to 5)"
# (ai.google.dev/api/generate-content); more is refused with the message quoted in
# continuedev/continue#2702.
MAX_STOP_SEQUENCES = 5
# batchEmbedContents takes at most 100 requests: "We do have a limit of 100 in a batch" (a
# Gemini API maintainer, lancedb/lancedb#3618); more is a 400 INVALID_ARGUMENT with the
# message quoted in geldata/gel#9032 and StarTrail-org/LEANN#214.
MAX_EMBED_BATCH = 100
SSE_TYPE = "text/event-stream"
FINISH = {"stop": "STOP", "length": "MAX_TOKENS", "tool": "STOP"}
_STATUS: dict[int, tuple[str, str]] = {
    400: ("INVALID_ARGUMENT", "Request contains an invalid argument."),
    401: ("UNAUTHENTICATED", "Request had invalid authentication credentials."),
    403: ("PERMISSION_DENIED", "The caller does not have permission"),
    404: ("NOT_FOUND", "Requested entity was not found."),
    429: ("RESOURCE_EXHAUSTED", "Resource has been exhausted (e.g. check quota)."),
    500: ("INTERNAL", ("An internal error has occurred. Please retry or report in "
                      "https://developers.generativeai.google/guide/troubleshooting")),
    503: ("UNAVAILABLE", "The model is overloaded. Please try again later."),
    504: ("DEADLINE_EXCEEDED", "Deadline expired before operation could complete."),
}
_NO_KEY = ("Method doesn't allow unregistered callers (callers without established identity). "
           "Please use API Key or other form of API consumer identity to call this API.")
MODELS = (("gemini-2.0-flash", "Gemini 2.0 Flash", ["generateContent", "countTokens"]),
          ("gemini-2.5-flash", "Gemini 2.5 Flash", ["generateContent", "countTokens"]),
          ("gemini-2.5-pro", "Gemini 2.5 Pro", ["generateContent", "countTokens"]),
          ("text-embedding-004", "Text Embedding 004", ["embedContent"]),
          ("gemini-embedding-001", "Gemini Embedding 001", ["embedContent", "countTokens"]))


# (FAILED_PRECONDITION too is a 400: e.g. the free tier where it is not offered, the
# Gemini API's troubleshooting page)
_CODE_OF_STATUS = {**{status: code for code, (status, _) in _STATUS.items()},
                   "FAILED_PRECONDITION": 400}


def _status(code: int) -> tuple[str, str]:
    return _STATUS.get(code, ("INTERNAL" if code >= 500 else "FAILED_PRECONDITION",
                              f"HTTP {code}"))


def error_object(code: int, message: str | None, details: list[JSON] | None = None) -> JSON:
    status, default = _status(code)
    error: JSON = {"code": code, "message": message or default, "status": status}
    if details:
        error["details"] = details
    return {"error": error}


def stream_error_object(message: str | None, status: str | None) -> JSON:
    """The error a stream ends with: UNAVAILABLE, or the status a fault's code names
    (INVALID_ARGUMENT for a request the caller must fix), with its HTTP code."""
    return error_object(_CODE_OF_STATUS[status] if status else 503, message)


class GeminiWire(ProviderWire):
    name = "gemini"

    def response_headers(self, config: MockConfig) -> dict[str, str]:
        return {"vary": "Origin, X-Origin, Referer",
                "server-timing": f"gfet4t7; dur={int(config.ttft_s * 1000) + 1}",
                "x-content-type-options": "nosniff"}

    def auth_refusal(self, request: web.Request, expected: str | None) -> web.Response | None:
        key = request.headers.get("x-goog-api-key", "").strip() or request.query.get("key", "")
        if not key:  # Google answers a missing key with 403, and a wrong one with 400
            return self.error(403, _NO_KEY, {})
        if expected is not None and key != expected:
            details = [{"@type": "type.googleapis.com/google.rpc.ErrorInfo",
                        "reason": "API_KEY_INVALID", "domain": "googleapis.com",
                        "metadata": {"service": "generativelanguage.googleapis.com"}}]
            body = orjson.dumps(error_object(400, "API key not valid. Please pass a valid API "
                                                  "key.", details))
            return error_response(400, body, content_type=JSON_TYPE)
        return None

    def error(self, status: int, message: str | None, headers: dict[str, str], *,
              param: str | None = None, code: str | None = None,
              retry_after_s: float | None = None) -> web.Response:
        details = None
        if retry_after_s is not None:
            headers = {**headers, "retry-after": retry_after_value(retry_after_s)}
            details = [{"@type": "type.googleapis.com/google.rpc.RetryInfo",
                        "retryDelay": f"{retry_after_value(retry_after_s)}s"}]
        body = orjson.dumps(error_object(status, message, details))
        return error_response(status, body, headers, JSON_TYPE)

    def stream_error_event(self, message: str | None, code: str | None = None) -> bytes:
        return b"data: " + orjson.dumps(stream_error_object(message, code)) + b"\n\n"


# -- reading a request ------------------------------------------------------------------------

def _field(body: Any, camel: str, snake: str) -> Any:
    """Proto JSON accepts both spellings of a field name."""
    if not isinstance(body, dict):
        return None
    return body[camel] if camel in body else body.get(snake)


def _parts(content: Any) -> list[JSON]:
    parts = _field(content, "parts", "parts")
    return [p for p in parts if isinstance(p, dict)] if isinstance(parts, list) else []


def _function_result(part: JSON) -> str | None:
    response = _field(part, "functionResponse", "function_response")
    if not isinstance(response, dict):
        return None
    value = response.get("response")
    if isinstance(value, dict) and len(value) == 1:
        value = next(iter(value.values()))  # {"result": "..."} or {"output": "..."}
    return value if isinstance(value, str) else json.dumps(value)


def _texts(content: Any) -> list[str]:
    texts = []
    for part in _parts(content):
        if isinstance(part.get("text"), str):
            texts.append(part["text"])
        result = _function_result(part)
        if result is not None:
            texts.append(result)
    return texts


def validate_contents(body: JSON) -> list[JSON]:
    contents = body.get("contents")
    if not isinstance(contents, list) or not contents:
        raise BadRequest("* GenerateContentRequest.contents: contents is not specified\n")
    if not all(isinstance(c, dict) for c in contents):
        raise BadRequest("Invalid JSON payload received. Unknown name \"contents\": "
                         "each content must be an object.")
    return contents


def generate_conversation(body: JSON) -> Conversation:
    contents = validate_contents(body)
    texts = [" ".join(_texts(c)) for c in contents]
    texts += _texts(_field(body, "systemInstruction", "system_instruction"))
    last = contents[-1]
    config = _field(body, "generationConfig", "generation_config")
    stops = _field(config, "stopSequences", "stop_sequences")
    if isinstance(stops, list) and len(stops) > MAX_STOP_SEQUENCES:
        raise BadRequest("the number of stop_sequences must not exceed 5")
    limit = _field(config, "maxOutputTokens", "max_output_tokens")
    conv = Conversation(input_tokens=count_input(texts, len(contents)),
                        max_tokens=limit if isinstance(limit, int) else None,
                        user_last=last.get("role", "user") == "user")
    results = [r for r in map(_function_result, _parts(last)) if r is not None]
    if results:
        conv.tool_result = " ".join(results)
    user = next((c for c in reversed(contents) if c.get("role", "user") == "user"
                 and any("text" in p for p in _parts(c))), None)
    if user is not None:
        conv.last_user_text = " ".join(p["text"] for p in _parts(user) if "text" in p)
        conv.images = sum(1 for p in _parts(user) if any(
            key in p for key in ("inlineData", "inline_data", "fileData", "file_data")))
    _read_tools(body, conv)
    return conv


def _read_tools(body: JSON, conv: Conversation) -> None:
    for tool in _field(body, "tools", "tools") or ():
        for decl in _field(tool, "functionDeclarations", "function_declarations") or ():
            schema = _field(decl, "parametersJsonSchema", "parameters_json_schema")
            conv.tools.append(ToolSpec(str(decl.get("name")),
                                       schema if schema is not None else decl.get("parameters")))
    calling = _field(_field(body, "toolConfig", "tool_config"), "functionCallingConfig",
                     "function_calling_config")
    mode = str(_field(calling, "mode", "mode") or "AUTO").upper()
    conv.tools_enabled = mode != "NONE"
    allowed = _field(calling, "allowedFunctionNames", "allowed_function_names")
    if mode == "ANY" and isinstance(allowed, list) and allowed:
        conv.forced_tool = str(allowed[0])


# -- endpoints --------------------------------------------------------------------------------

async def model_method(call: Call) -> web.StreamResponse:
    """`models/{model}:{method}`: one route, as the method follows a colon in the path."""
    model, _, method = call.request.match_info["target"].rpartition(":")
    handler = _METHODS.get(method)
    if not model or handler is None:
        raise BadRequest(f"Method {method!r} is not found for models/{model}.", status=404)
    return await handler(call, model)


# The URIs every model fetches: the Files API's and YouTube's (ai.google.dev/gemini-api/docs/
# file-input-methods). Other public URLs are fetched since January 2026 ("Increased file
# size limits and expanded inputs support in Gemini API", blog.google), but not by the
# Gemini 2.0 models, which refuse them as quoted in BoundaryML/baml#1548 (the Vercel AI SDK's
# google provider leaves them out alike: `supportsExternalFileUrls`).
_ALWAYS_FETCHED = ("https://generativelanguage.googleapis.com/", "https://www.youtube.com/",
                   "https://youtube.com/", "https://youtu.be/")


def validate_file_uris(body: JSON, model: str) -> None:
    if not model.startswith("gemini-2.0"):
        return
    for content in _field(body, "contents", "contents") or ():
        for part in _parts(content):
            uri = _field(_field(part, "fileData", "file_data"), "fileUri", "file_uri")
            if isinstance(uri, str) and not uri.startswith(_ALWAYS_FETCHED):
                raise BadRequest(f"Invalid or unsupported file uri: {uri}")


async def generate(call: Call, model: str) -> web.StreamResponse:
    validate_file_uris(body_dict(call), model)
    reply = reply_for(generate_conversation(body_dict(call)))
    return await respond_json(call, generate_response(model, reply, random_id("", 22)),
                              JSON_TYPE)


async def stream_generate(call: Call, model: str) -> web.StreamResponse:
    validate_file_uris(body_dict(call), model)
    reply = reply_for(call.bounded(generate_conversation(body_dict(call))))
    chunks = stream_chunks(model, reply, random_id("", 22), call.config.chunk_chars)
    if call.request.query.get("alt") == "sse":
        items = [(b"data: " + dumps(chunk) + b"\r\n\r\n", is_content)
                 for chunk, is_content in chunks]
        return await respond_stream(call, items, call.stream_error(), SSE_TYPE)
    # Without alt=sse the stream is one JSON array, written element by element.
    items = [((b"[" if i == 0 else b",\r\n") + dumps(chunk), is_content)
             for i, (chunk, is_content) in enumerate(chunks)]
    items.append((b"]", False))
    fault = call.fault
    error = stream_error_object(fault.message if fault else None, fault.code if fault else None)
    return await respond_stream(call, items, b",\r\n" + orjson.dumps(error) + b"]", JSON_TYPE)


async def count_tokens(call: Call, model: str) -> web.StreamResponse:
    body = body_dict(call)
    inner = _field(body, "generateContentRequest", "generate_content_request")
    conv = generate_conversation(inner if isinstance(inner, dict) else body)
    total = conv.input_tokens
    return await respond_json(call, {"totalTokens": total, "promptTokensDetails": [
        {"modality": "TEXT", "tokenCount": total}]}, JSON_TYPE)


async def embed_content(call: Call, model: str) -> web.StreamResponse:
    return await respond_json(call, {"embedding": _embedding(body_dict(call), "")}, JSON_TYPE)


async def batch_embed_contents(call: Call, model: str) -> web.StreamResponse:
    requests = body_dict(call).get("requests")
    if not isinstance(requests, list) or not requests:
        raise BadRequest("* BatchEmbedContentsRequest.requests: requests is not specified\n")
    if len(requests) > MAX_EMBED_BATCH:
        raise BadRequest("* BatchEmbedContentsRequest.requests: at most 100 requests can be in "
                         "one batch\n")
    for index, request in enumerate(requests):
        named = _field(request, "model", "model")
        if named != f"models/{model}":
            raise BadRequest(f"Model name in request ({named}) does not match the model in the "
                             f"URL (models/{model}) for requests[{index}].")
    embeddings = [_embedding(request, f"requests[{i}].") for i, request in enumerate(requests)]
    return await respond_json(call, {"embeddings": embeddings}, JSON_TYPE)


def _embedding(request: Any, where: str) -> JSON:
    texts = _texts(_field(request, "content", "content"))
    if not texts:
        raise BadRequest(f"* EmbedContentRequest.{where}content: contents is not specified\n")
    dims = _field(request, "outputDimensionality", "output_dimensionality")
    return {"values": embed(" ".join(texts), dims if isinstance(dims, int) and dims > 0 else 8)}


_METHODS = {"generateContent": generate, "streamGenerateContent": stream_generate,
            "countTokens": count_tokens, "embedContent": embed_content,
            "batchEmbedContents": batch_embed_contents}


def _model_info(model_id: str, name: str, methods: list[str]) -> JSON:
    return {"name": f"models/{model_id}", "version": "001", "displayName": name,
            "description": f"{name} (mock)", "inputTokenLimit": 1048576,
            "outputTokenLimit": 8192, "supportedGenerationMethods": methods,
            "temperature": 1, "topP": 0.95, "topK": 40, "maxTemperature": 2}


_MODELS = {model_id: _model_info(model_id, name, methods) for model_id, name, methods in MODELS}
_MODEL_LIST = dumps({"models": list(_MODELS.values())})


async def list_models(call: Call) -> web.StreamResponse:
    return await respond_json(call, _MODEL_LIST, JSON_TYPE)


async def get_model(call: Call) -> web.StreamResponse:
    model = call.request.match_info["target"]
    if model not in _MODELS:
        raise BadRequest(f"models/{model} is not found for API version v1beta, or is not "
                         "supported for generateContent.", status=404)
    return await respond_json(call, _MODELS[model], JSON_TYPE)


# -- rendering --------------------------------------------------------------------------------

def usage_metadata(reply: Reply, final: bool = True) -> JSON:
    usage: JSON = {"promptTokenCount": reply.input_tokens}
    if final:
        usage["candidatesTokenCount"] = reply.output_tokens
    usage["totalTokenCount"] = reply.input_tokens + (reply.output_tokens if final else 0)
    usage["promptTokensDetails"] = [{"modality": "TEXT", "tokenCount": reply.input_tokens}]
    return usage


def _parts_for(reply: Reply, model: str) -> list[JSON]:
    call = reply.tool_call
    if call is None:
        return [{"text": reply.text or ""}]
    part: JSON = {"functionCall": {"name": call.name, "args": call.args}}
    if "2.5" in model or "gemini-3" in model:  # thinking models sign their function calls
        part["thoughtSignature"] = "CiQBjz1rX" + call.id[-16:]
    return [part]


def generate_response(model: str, reply: Reply, response_id: str) -> JSON:
    candidate = {"content": {"parts": _parts_for(reply, model), "role": "model"},
                 "finishReason": FINISH[reply.finish], "index": 0}
    return {"candidates": [candidate], "usageMetadata": usage_metadata(reply),
            "modelVersion": model, "responseId": response_id}


def stream_chunks(model: str, reply: Reply, response_id: str,
                  chunk_chars: int) -> list[tuple[JSON, bool]]:
    """The chunks of a stream; the last carries finishReason and the full usage."""
    if reply.tool_call is not None:  # Gemini sends a function call whole, in one chunk
        return [(generate_response(model, reply, response_id), True)]
    pieces = split_chunks(reply.text or "", chunk_chars)
    chunks: list[tuple[JSON, bool]] = []
    for number, piece in enumerate(pieces):
        final = number == len(pieces) - 1
        candidate: JSON = {"content": {"parts": [{"text": piece}], "role": "model"}, "index": 0}
        if final:
            candidate["finishReason"] = FINISH[reply.finish]
        chunks.append(({"candidates": [candidate], "usageMetadata": usage_metadata(reply, final),
                        "modelVersion": model, "responseId": response_id}, True))
    return chunks
