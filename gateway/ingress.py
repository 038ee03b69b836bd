"""Ingress detection and request validation: which API the caller spoke, and is it usable.

Pure functions over the path, headers and parsed body; the kernel calls them once per request.
"""
from __future__ import annotations

from typing import Any

import orjson

from gateway import context as c
from gateway.errors import GatewayError

# Route path -> ingress operation. Paths are accepted with and without the `/v1` prefix,
# as the OpenAI and Anthropic SDKs can be pointed at either form of base URL.
_OPERATIONS = {
    "/chat/completions": c.OPENAI_CHAT,
    "/completions": c.OPENAI_COMPLETIONS,
    "/embeddings": c.OPENAI_EMBEDDINGS,
    "/responses": c.OPENAI_RESPONSES,
    "/messages": c.ANTHROPIC_MESSAGES,
    "/messages/count_tokens": c.ANTHROPIC_COUNT_TOKENS,
}
OPERATIONS_BY_PATH = {**_OPERATIONS, **{"/v1" + path: op for path, op in _OPERATIONS.items()}}

# Which body field must be a list for each operation (the rest is left to the provider).
_REQUIRED_FIELDS: dict[str, tuple[str, type | tuple[type, ...]]] = {
    c.OPENAI_CHAT: ("messages", list),
    c.ANTHROPIC_MESSAGES: ("messages", list),
    c.ANTHROPIC_COUNT_TOKENS: ("messages", list),
    c.OPENAI_COMPLETIONS: ("prompt", (str, list)),
    c.OPENAI_EMBEDDINGS: ("input", (str, list)),
    c.OPENAI_RESPONSES: ("input", (str, list)),
}


def _deepest_written() -> int:
    """How many levels of arrays orjson writes (254 in orjson 3): found once, not assumed."""
    value: list[Any] = []
    for depth in range(1, 4096):
        try:
            orjson.dumps(value)
        except orjson.JSONEncodeError:
            return depth - 1
        value = [value]
    return 4096


# orjson reads arrays and objects nested up to 1024 levels deep but writes only 254 ("Recursion
# limit reached"): a body nested between the two would be read, then fail wherever a layer or
# a translator writes it again (the cache key, a translated request, the admin API's answer).
# 128 leaves room for the levels a translation adds around a tool's schema.
MAX_NESTING = 128
_WRITTEN = _deepest_written()


def nesting_exceeds(raw: bytes, value: Any, limit: int = MAX_NESTING) -> bool:
    """Whether `value`, parsed from `raw`, nests arrays and objects more than `limit` levels
    deep. No body with at most `limit` brackets can, so most are never looked at."""
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False
    # Wrapped in `_WRITTEN - limit` arrays, `value` is written only if it nests at most `limit`
    # deep: orjson measures it in C (a walk in Python costs five times as much: 58 us for a
    # body of 50 messages).
    for _ in range(_WRITTEN - limit):
        value = [value]
    try:
        orjson.dumps(value)
    except orjson.JSONEncodeError:
        return True
    return False


def too_deep(code: str | None = None) -> GatewayError:
    return GatewayError(400, f"The request body nests arrays and objects more than "
                             f"{MAX_NESTING} levels deep.", code=code)


def api_format_of(operation: str) -> str:
    return "anthropic" if operation.startswith("anthropic") else "openai"


# How a Gemini API path looks: `/v1beta/models/{model}:generateContent`, `.../{model}:embedContent`
_GEMINI_METHODS = (":generateContent", ":streamGenerateContent", ":countTokens", ":embedContent",
                   ":batchEmbedContents")
_MODEL_PREFIXES = ("/v1/models/", "/models/")  # (below MODELS_PATHS: one model's paths)


def model_of_path(path: str) -> str | None:
    """The model a `GET /v1/models/{model}` (OpenAI's and Anthropic's retrieve) names, None
    for another path; a Gemini method's (`/v1/models/{model}:generateContent`) is not one."""
    for prefix in _MODEL_PREFIXES:
        if path.startswith(prefix) and len(path) > len(prefix) and \
                not path.endswith(_GEMINI_METHODS):
            return path[len(prefix):]
    return None


def is_models_path(path: str) -> bool:
    """The model list's path (`c.MODELS_PATHS`), or one model's (`model_of_path`)."""
    return path in c.MODELS_PATHS or model_of_path(path) is not None


def unknown_model(model: str) -> GatewayError:
    """The 404 for a model the config lacks, in OpenAI's words (its `model_not_found`)."""
    return GatewayError(
        404, f"The model '{_echoed(model)}' does not exist or you do not have access to it.",
        param="model", code="model_not_found",
    )


def guess_api_format(path: str, headers: list[tuple[bytes, bytes]]) -> str:
    """The error shape for requests that matched no route: Anthropic's or Gemini's if it
    looks like one of theirs (the gateway serves neither Gemini's paths nor its shape
    otherwise; its SDK reads this one)."""
    if "/messages" in path:
        return "anthropic"
    if path.startswith("/v1beta/") or path.endswith(_GEMINI_METHODS):
        return "gemini"
    for name, _ in headers:
        if name == b"anthropic-version":
            return "anthropic"
    return "openai"


def check_body(operation: str, body: Any, models: dict[str, Any]) -> tuple[str, bool]:
    """Returns (model, stream) or raises the 4xx the caller should see."""
    if not isinstance(body, dict):
        raise GatewayError(400, "The request body must be a JSON object.")
    model = body.get("model")
    if model is None or model == "":
        raise GatewayError(400, "You must provide a model parameter.", param="model",
                           code="missing_model")
    if not isinstance(model, str):
        raise GatewayError(400, "The model parameter must be a string.", param="model")
    if model not in models:
        raise unknown_model(model)
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise GatewayError(400, "The stream parameter must be a boolean.", param="stream")
    field_name, kind = _REQUIRED_FIELDS[operation]
    value = body.get(field_name)
    if operation == c.OPENAI_RESPONSES:
        _check_responses(body)
        if value is None:  # (optional: a stored `prompt`, a `conversation` can stand for it)
            return model, stream
    if not isinstance(value, kind) or (isinstance(value, (list, str)) and not value):
        raise GatewayError(
            400, f"'{field_name}' is required and must be a non-empty "
                 f"{'array' if kind is list else 'string or array'}.",
            param=field_name,
        )
    if operation in (c.OPENAI_EMBEDDINGS, c.ANTHROPIC_COUNT_TOKENS) and stream:
        raise GatewayError(400, "This endpoint does not stream.", param="stream")
    return model, stream


def _echoed(name: str, limit: int = 256) -> str:
    # A caller's name goes back in an error message only so long: the body it came in may
    # hold megabytes of it.
    return name if len(name) <= limit else name[:limit] + "..."


def _check_responses(body: dict[str, Any]) -> None:
    if body.get("background") not in (None, False):
        # The provider answers "queued" without usage and bills the run later, and its result
        # is fetched with GET /v1/responses/{id}, which the gateway does not serve.
        raise GatewayError(400, "Background responses are not supported through the gateway: "
                                "it can neither meter them nor fetch their result. Leave out "
                                "'background'.", param="background", code="unsupported_parameter")
