"""OpenAI, Azure OpenAI and Mistral: authentication, response headers and error bodies.

OpenAI errors are `{"error": {"message", "type", "param", "code"}}`
(https://platform.openai.com/docs/guides/error-codes). Azure's own front door (auth, quota,
routing) answers `{"error": {"code": "<status>", "message"}}`; validation errors from the
model service behind it keep the OpenAI shape.
"""
from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from tests.mock_providers.faults import MockConfig
from tests.mock_providers.wire import ProviderWire, error_response, random_id, retry_after_value

_OPENAI_MESSAGES: dict[int, tuple[str, str, str | None]] = {  # status -> (message, type, code)
    400: ("Invalid request.", "invalid_request_error", None),
    401: (("Incorrect API key provided. You can find your API key at "
          "https://platform.openai.com/account/api-keys."), "invalid_request_error",
          "invalid_api_key"),
    403: ("You are not allowed to sample from this model.", "invalid_request_error", None),
    404: ("The model does not exist or you do not have access to it.",
          "invalid_request_error", "model_not_found"),
    429: (("Rate limit reached for requests per min (RPM): Limit 10000, Used 10000, "
          "Requested 1. Please try again later."), "requests", "rate_limit_exceeded"),
    500: ("The server had an error while processing your request. Sorry about that!",
          "server_error", None),
    503: ("The server is overloaded or not ready yet.", "server_error", None),
}
_MISSING_KEY = ("You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).")
_AZURE_MESSAGES = {
    401: "Access denied due to invalid subscription key or wrong API endpoint. Make sure to "
         "provide a valid key for an active subscription and use a correct regional API "
         "endpoint for your resource.",
    404: "Resource not found",
    429: "Requests to the ChatCompletions_Create Operation under Azure OpenAI API version "
         "2024-10-21 have exceeded call rate limit of your current OpenAI S0 pricing tier. "
         "Please retry after 1 second.",
    500: "The server had an error while processing your request.",
    503: "The service is temporarily unable to process your request. Please try again later.",
}
_STREAM_ERROR = "The server had an error while processing your request. Sorry about that!"


# ResponseError codes (OpenAI's API spec) that say the request must change: the prompt, an
# image in it; and the chat API's code for an input over the context window, which the
# Responses API reports in its `error` event (openai/openai-dotnet#849).
CALLER_FAULT_CODES = frozenset({
    "invalid_prompt", "invalid_image", "invalid_image_format", "invalid_base64_image",
    "invalid_image_url", "image_too_large", "image_too_small", "image_parse_error",
    "image_content_policy_violation", "invalid_image_mode", "image_file_too_large",
    "unsupported_image_media_type", "empty_image_file", "failed_to_download_image",
    "image_file_not_found", "context_length_exceeded"})


def openai_error_body(message: str, kind: str, param: str | None = None,
                      code: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": kind, "param": param,
                                   "code": code}})


def _default_openai(status: int) -> tuple[str, str, str | None]:
    if status in _OPENAI_MESSAGES:
        return _OPENAI_MESSAGES[status]
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return f"HTTP {status}", kind, None


class OpenAIWire(ProviderWire):
    """api.openai.com: `Authorization: Bearer`, `x-ratelimit-*` and `x-request-id` headers."""

    name = "openai"

    def response_headers(self, config: MockConfig) -> dict[str, str]:
        return {
            "x-request-id": random_id("req_", 32),
            "openai-processing-ms": str(int(config.ttft_s * 1000) + 1),
            "openai-version": "2020-10-01",
            "openai-organization": "mock-org",
            "openai-project": "proj_mock",
            "x-ratelimit-limit-requests": "10000",
            "x-ratelimit-limit-tokens": "30000000",
            "x-ratelimit-remaining-requests": "9999",
            "x-ratelimit-remaining-tokens": "29999000",
            "x-ratelimit-reset-requests": "6ms",
            "x-ratelimit-reset-tokens": "2ms",
        }

    def auth_refusal(self, request: web.Request, expected: str | None) -> web.Response | None:
        header = request.headers.get("authorization", "")
        key = header[7:].strip() if header[:7].lower() == "bearer " else ""
        if not key:
            return error_response(401, openai_error_body(_MISSING_KEY, "invalid_request_error"))
        if expected is not None and key != expected:
            message = (f"Incorrect API key provided: {_masked(key)}. You can find your API "
                       "key at https://platform.openai.com/account/api-keys.")
            return error_response(401, openai_error_body(message, "invalid_request_error",
                                                         code="invalid_api_key"))
        return None

    def error(self, status: int, message: str | None, headers: dict[str, str], *,
              param: str | None = None, code: str | None = None,
              retry_after_s: float | None = None) -> web.Response:
        default_message, kind, default_code = _default_openai(status)
        if status == 429:
            headers = {**headers, "x-ratelimit-remaining-requests": "0"}
        if retry_after_s is not None:
            headers = {**headers, "retry-after": retry_after_value(retry_after_s)}
        body = openai_error_body(message or default_message, kind, param, code or default_code)
        return error_response(status, body, headers)

    def stream_error_event(self, message: str | None, code: str | None = None) -> bytes:
        # An error inside a 200 stream is a bare `data:` line holding the usual error object,
        # of OpenAI's 400 type when the caller must fix its request.
        kind = "invalid_request_error" if code in CALLER_FAULT_CODES else "server_error"
        return b"data: " + openai_error_body(message or _STREAM_ERROR, kind, code=code) + b"\n\n"


class AzureWire(OpenAIWire):
    """Azure OpenAI: `api-key` header (or Entra ID bearer), `api-version` query parameter."""

    name = "azure"

    def response_headers(self, config: MockConfig) -> dict[str, str]:
        request_id = random_id("", 32)
        return {
            "apim-request-id": request_id,
            "x-request-id": request_id,
            "x-ms-region": "East US",
            "x-ms-rai-invoked": "true",
            "x-ratelimit-remaining-requests": "999",
            "x-ratelimit-remaining-tokens": "999000",
        }

    def auth_refusal(self, request: web.Request, expected: str | None) -> web.Response | None:
        key = request.headers.get("api-key", "").strip()
        bearer = request.headers.get("authorization", "")
        if not key and bearer[:7].lower() == "bearer " and bearer[7:].strip():
            return None  # an Entra ID token; the mock cannot check those
        if not key or (expected is not None and key != expected):
            return self.error(401, None, {})
        if "api-version" not in request.query:
            # Azure answers a missing api-version with 404, not 400 (MicrosoftDocs/azure-docs
            # issue 114602); clients see "Resource not found".
            return self.error(404, None, {})
        return None

    def error(self, status: int, message: str | None, headers: dict[str, str], *,
              param: str | None = None, code: str | None = None,
              retry_after_s: float | None = None) -> web.Response:
        if status == 400 or (status == 404 and code == "model_not_found"):
            return super().error(status, message, headers, param=param, code=code)
        if retry_after_s is not None:
            headers = {**headers, "retry-after": retry_after_value(retry_after_s),
                       "retry-after-ms": str(int(retry_after_s * 1000))}
        text = message or _AZURE_MESSAGES.get(status, f"HTTP {status}")
        body = orjson.dumps({"error": {"code": str(status), "message": text}})
        return error_response(status, body, headers)


class MistralWire(OpenAIWire):
    """La Plateforme (api.mistral.ai), an OpenAI-compatible API: Bearer keys. Its request
    validation answers 422 with pydantic's error list, as in the refusal of
    `stream_options.include_usage` quoted in openai/openai-agents-python#442:
    `{"object": "error", "message": {"detail": [{"type": "extra_forbidden", "loc": [...],
    "msg": ..., "input": ...}]}, "type": "invalid_request_error", "param": null, "code": null}`.
    """

    name = "mistral"

    def response_headers(self, config: MockConfig) -> dict[str, str]:
        return {}

    def error(self, status: int, message: str | None, headers: dict[str, str], *,
              param: str | None = None, code: str | None = None,
              retry_after_s: float | None = None) -> web.Response:
        if status != 422 or param is None:
            return super().error(status, message, headers, param=param, code=code,
                                 retry_after_s=retry_after_s)
        detail = {"type": code, "loc": ["body", *param.split(".")], "msg": message}
        body = orjson.dumps({"object": "error", "message": {"detail": [detail]},
                             "type": "invalid_request_error", "param": None, "code": None})
        return error_response(status, body, headers)


def _masked(key: str) -> str:
    return key[:3] + "*" * 8 + key[-4:] if len(key) > 8 else "*" * len(key)


# -- message content, shared by chat and the Responses API ------------------------------------

TEXT_PARTS = frozenset({"text", "input_text", "output_text"})
IMAGE_PARTS = frozenset({"image_url", "input_image"})


def content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(part.get("text") or "") for part in content
                        if isinstance(part, dict) and part.get("type") in TEXT_PARTS)
    return ""


def content_images(content: Any) -> int:
    if not isinstance(content, list):
        return 0
    return sum(1 for part in content if isinstance(part, dict) and part.get("type") in IMAGE_PARTS)
