"""What the format translations share: their refusal, and reading tool-call arguments.

The stream translators raise `providers.streams.StreamError` (re-exported by each format
module as `UpstreamStreamError`) for an error event inside a 200 stream.
"""
from __future__ import annotations

from typing import Any

import orjson


class TranslationError(ValueError):
    """A request the other API cannot express without silently changing the answer;
    `param` names the request field at fault, where the refusal names one."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def tool_arguments(arguments: Any) -> dict[str, Any]:
    """An OpenAI tool call's `arguments` (a JSON string) as an object, or TranslationError."""
    if isinstance(arguments, dict):
        return arguments
    if arguments is None or arguments == "":
        return {}
    try:
        parsed = orjson.loads(arguments)
    except (orjson.JSONDecodeError, TypeError):
        raise TranslationError("a tool call's `arguments` is not valid JSON.") from None
    if not isinstance(parsed, dict):
        raise TranslationError("a tool call's `arguments` must be a JSON object.")
    return parsed
