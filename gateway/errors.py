"""API-shaped errors: one helper renders every refusal in the caller's wire format.

A refusal (bad input, auth, quota, upstream failure) is a `GatewayError` raised by any layer;
the kernel turns it into a response in the shape of the API the caller spoke, unless the
response has already started. A bug is any other exception.
"""
from __future__ import annotations

import email.utils
import re
from typing import Any

import orjson

from gateway.context import OPENAI_RESPONSES
from gateway.sse import named_event

# Status -> (OpenAI error type, Anthropic error type). Sources: OpenAI "Error codes" guide,
# Anthropic "Errors" page (https://docs.anthropic.com/en/api/errors).
_TYPES_BY_STATUS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "invalid_request_error"),
    401: ("authentication_error", "authentication_error"),
    402: ("insufficient_quota", "billing_error"),
    403: ("permission_error", "permission_error"),
    404: ("invalid_request_error", "not_found_error"),  # OpenAI: `model_not_found` is one too
    405: ("invalid_request_error", "invalid_request_error"),
    408: ("timeout_error", "timeout_error"),
    409: ("conflict_error", "invalid_request_error"),
    413: ("invalid_request_error", "request_too_large"),
    415: ("invalid_request_error", "invalid_request_error"),
    422: ("invalid_request_error", "invalid_request_error"),
    429: ("rate_limit_error", "rate_limit_error"),
    500: ("server_error", "api_error"),
    502: ("upstream_error", "api_error"),
    503: ("service_unavailable", "overloaded_error"),
    504: ("timeout_error", "timeout_error"),
    529: ("service_unavailable", "overloaded_error"),
}

# Status -> Gemini's (Google API) error status name, for requests on Gemini's paths, which the
# gateway does not serve (https://ai.google.dev/gemini-api/docs/troubleshooting).
_GEMINI_STATUS: dict[int, str] = {
    400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
    404: "NOT_FOUND", 405: "INVALID_ARGUMENT", 413: "INVALID_ARGUMENT",
    415: "INVALID_ARGUMENT", 429: "RESOURCE_EXHAUSTED", 503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}

JSON_HEADERS = [(b"content-type", b"application/json")]

# A Retry-After's seconds: RFC 9110's delay-seconds, or with a fraction, which the failover
# layer and the SDKs read as well (`float`). ASCII only: `\d` and `float` take any script's
# digits too.
_RETRY_AFTER_SECONDS = re.compile(r"[0-9]+(?:\.[0-9]+)?")


class GatewayError(Exception):
    """A refusal with a status and a message meant for the API caller."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        error_type: str | None = None,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.error_type = error_type
        self.headers = headers or []

    def type_for(self, api_format: str) -> str:
        if self.error_type:
            return self.error_type
        openai_type, anthropic_type = _TYPES_BY_STATUS.get(
            self.status, ("server_error" if self.status >= 500 else "invalid_request_error",
                          "api_error" if self.status >= 500 else "invalid_request_error"))
        return anthropic_type if api_format == "anthropic" else openai_type

    def body(self, api_format: str) -> dict[str, Any]:
        if api_format == "gemini":
            return {"error": {"code": self.status, "message": self.message,
                              "status": _GEMINI_STATUS.get(self.status, "INTERNAL")}}
        error_type = self.type_for(api_format)
        if api_format == "anthropic":
            return {"type": "error", "error": {"type": error_type, "message": self.message}}
        return {
            "error": {
                "message": self.message,
                "type": error_type,
                "param": self.param,
                "code": self.code,
            }
        }

    def render(self, api_format: str) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        body = orjson.dumps(self.body(api_format))
        headers = [*JSON_HEADERS, (b"content-length", str(len(body)).encode()), *self.headers]
        return self.status, headers, body


class UpstreamError(GatewayError):
    """A provider's failure: a call that failed before any byte reached the client, or (sent
    in-band) a stream that broke after it started.

    The failover layer may retry it; otherwise the kernel renders it with the provider's
    status and `Retry-After` kept. `error_type` names the failure for the gateway (the
    provider's error type, or a word such as "timeout"); it is also this error's `code`.
    What the provider said in its own wire format (`wire_format`: "openai", "anthropic",
    "gemini") reaches a caller of that same format as it was: `native_type`, and for OpenAI
    `native_code` (when it gave one) and `param`. Other callers get the type their API uses
    for the status: for OpenAI's any 5xx is a `server_error`, as its own are.
    A `retry_after` that is no Retry-After value (`_retry_after_value`) is dropped.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        provider: str,
        error_type: str | None = None,
        retry_after: str | None = None,
        retryable: bool | None = None,
        wire_format: str | None = None,
        native_type: str | None = None,
        native_code: str | None = None,
        param: str | None = None,
    ) -> None:
        retry_after = _retry_after_value(retry_after)
        headers = [(b"retry-after", retry_after.encode("ascii"))] if retry_after else []
        super().__init__(status, message, headers=headers, code=error_type, param=param)
        self.provider = provider
        self.upstream_error_type = error_type
        self.wire_format = wire_format
        self.native_type = native_type
        self.native_code = native_code
        self.retry_after = retry_after
        self.retryable = retryable if retryable is not None else status in (408, 429) or status >= 500

    def type_for(self, api_format: str) -> str:
        if self.error_type:
            return self.error_type
        if self.native_type and api_format == self.wire_format:
            return self.native_type
        if api_format == "openai" and self.status >= 500:
            return "server_error"
        return super().type_for(api_format)

    def body(self, api_format: str) -> dict[str, Any]:
        body = super().body(api_format)
        if api_format == "openai" == self.wire_format and self.native_code is not None:
            body["error"]["code"] = self.native_code  # (else the error's kind, `code`)
        return body


def _retry_after_value(value: str | None) -> str | None:
    """`value` if it is a Retry-After, seconds or an HTTP date (RFC 9110 §10.2.3), else None.

    A provider's header comes as it sent it: a full-width digit in UTF-8 or a stray byte
    could not be encoded for the caller's response (a 500 where its 429 was), a control
    character would be passed on.
    """
    if not value or not value.isascii():
        return None
    if _RETRY_AFTER_SECONDS.fullmatch(value):
        return value
    return value if value.isprintable() and email.utils.parsedate_tz(value) else None


class UntranslatableRequest(GatewayError):
    """A request one deployment's provider adapter cannot express (more stop sequences than
    the provider takes, an image URL a model does not fetch): refused before any upstream
    call, by providers/base.py only. Another deployment of the model may take it, so the
    failover layer tries one before this reaches the caller."""


class StreamInterrupted(Exception):
    """A stream broke after its response started, and the request asked to continue it
    (`ctx.continue_streams`, set by the failover layer): the response is still open, nothing
    has ended it. `error` is what to send in-band if it cannot be continued."""

    def __init__(self, error: GatewayError) -> None:
        super().__init__(error.message)
        self.error = error


class ClientDisconnected(Exception):
    """The caller went away; there is nobody to answer. Layers may record it and re-raise."""


def stream_error_ending(api_format: str, error: GatewayError, *, operation: str = "",
                        sequence_number: int = 0, first_event: dict[str, Any] | None = None,
                        failed_code: str = "server_error") -> bytes:
    """The last bytes of a stream the gateway ends after its response started: the in-band
    error event of its API (`stream_error_event`).

    A Responses stream ends as the live API ends a failed one (vercel/ai#6534): its `error`
    event, numbered `sequence_number`, then `response.failed` numbered one more, failed with
    `failed_code` (see `failed_response_event`).
    """
    ending = stream_error_event(api_format, error, operation=operation,
                                sequence_number=sequence_number)
    if operation != OPENAI_RESPONSES:
        return ending
    return ending + failed_response_event(first_event, failed_code, error.message,
                                          sequence_number + 1)


def failed_response_event(first_event: dict[str, Any] | None, code: str, message: str,
                          sequence_number: int) -> bytes:
    """`response.failed` for a Responses stream the gateway ends: the response its first
    event, `response.created`, opened (its id, model and settings; a minimal response when
    that is not at hand), failed with a ResponseError: `code` is one of that type's closed
    set of codes (openai-python's types/responses/response_error.py)."""
    opened = first_event.get("response") \
        if first_event is not None and first_event.get("type") == "response.created" else None
    response = dict(opened) if isinstance(opened, dict) else {"object": "response",
                                                              "output": []}
    response.update(status="failed", error={"code": code, "message": message})
    return named_event("response.failed", {"type": "response.failed",
                                           "sequence_number": sequence_number,
                                           "response": response})


def stream_error_event(api_format: str, error: GatewayError, *, operation: str = "",
                       sequence_number: int = 0) -> bytes:
    """The in-band SSE event that ends a stream whose response has already started.

    A Responses API stream (`operation` "openai.responses") ends with that API's own `error`
    event, numbered `sequence_number`: the number the stream's next event would take (its
    events are numbered from 0).
    """
    body = error.body(api_format)
    if operation == OPENAI_RESPONSES:
        return b"event: error\ndata: " + orjson.dumps(
            _responses_error_event(body["error"], sequence_number)) + b"\n\n"
    if api_format == "anthropic":
        return b"event: error\ndata: " + orjson.dumps(body) + b"\n\n"
    return b"data: " + orjson.dumps(body) + b"\n\n"


def _responses_error_event(fields: dict[str, Any], sequence_number: int) -> dict[str, Any]:
    # `code`, `message`, `param` and `sequence_number` at the top level, as OpenAI's streaming
    # reference documents the event (ResponseErrorEvent); the same fields in an `error`
    # object too, as the live API sends them (openai/openai-dotnet#881), which is what the
    # openai SDKs raise an error for.
    return {"type": "error", "code": fields["code"], "message": fields["message"],
            "param": fields["param"], "sequence_number": sequence_number, "error": fields}
