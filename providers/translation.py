"""What the format translations share: their refusal, reading the fields they translate, and
reading tool-call arguments.

A translator checks each field where it reads it (no separate pass over a well-formed body):
a field of the wrong type is refused naming it (`param`, e.g. `messages[2].content[0]`) and
saying what it must be, in the words of OpenAI's own refusals ("Invalid type for
'messages[0].content': expected a string or an array of content parts, but got an integer
instead.", code `invalid_type`), never in Python's.

The stream translators raise `providers.streams.StreamError` (re-exported by each format
module as `UpstreamStreamError`) for an error event inside a 200 stream.
"""
from __future__ import annotations

from typing import Any

import orjson

JSON = dict[str, Any]

# The JSON kinds orjson reads, in API words.
_KINDS: dict[type, str] = {type(None): "null", bool: "a boolean", int: "an integer",
                           float: "a number", str: "a string", list: "an array",
                           dict: "an object"}


class TranslationError(ValueError):
    """A request the other API cannot express without silently changing the answer, or a
    field the translator reads that has the wrong type or is missing; `param` names the
    request field at fault, where the refusal names one."""

    def __init__(self, message: str, *, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


def invalid(param: str, expected: str, value: Any) -> TranslationError:
    """`param` is of the wrong type: `expected` says what it must be ("an object")."""
    got = _KINDS.get(type(value), "a value of another type")
    return TranslationError(f"Invalid type for '{param}': expected {expected}, but got {got} "
                            "instead.", param=param, code="invalid_type")


def missing(param: str) -> TranslationError:
    return TranslationError(f"Missing required parameter: '{param}'.", param=param,
                            code="missing_required_parameter")


def an_object(value: Any, param: str) -> JSON:
    if isinstance(value, dict):
        return value
    raise missing(param) if value is None else invalid(param, "an object", value)


def an_array(value: Any, param: str, expected: str = "an array") -> list[Any]:
    """A list, or None as an empty one (a field left out or sent as null)."""
    if isinstance(value, list):
        return value
    if value is None:
        return []
    raise invalid(param, expected, value)


def a_string(value: Any, param: str) -> str:
    if isinstance(value, str):
        return value
    raise missing(param) if value is None else invalid(param, "a string", value)


def a_flag(value: Any, param: str) -> bool | None:
    """A boolean, or None when absent or null."""
    if value is None or isinstance(value, bool):
        return value
    raise invalid(param, "a boolean", value)


def a_string_or_none(value: Any, param: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise invalid(param, "a string", value)


REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")


def a_reasoning_effort(body: JSON) -> str | None:
    """The request's OpenAI `reasoning_effort` (None when absent or null); a value OpenAI
    does not take is refused, as OpenAI refuses it."""
    effort = a_string_or_none(body.get("reasoning_effort"), "reasoning_effort")
    if effort is not None and effort not in REASONING_EFFORTS:
        raise TranslationError(f"reasoning_effort {effort!r} is not one of "
                               f"{', '.join(REASONING_EFFORTS)}.", param="reasoning_effort")
    return effort


def an_integer(body: JSON, name: str) -> int | None:
    """`body[name]` when it is an integer (a boolean is not), None when absent or null."""
    value = body.get(name)
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise invalid(name, "an integer", value)


def a_number(body: JSON, name: str) -> float | int | None:
    value = body.get(name)
    if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        return value
    raise invalid(name, "a number", value)


def strings(value: Any, param: str, expected: str = "a string or an array of strings",
            ) -> list[str]:
    """A string or an array of strings (OpenAI's `stop`) as a list; None as an empty one."""
    if isinstance(value, str):
        return [value]
    for index, item in enumerate(an_array(value, param, expected)):
        if not isinstance(item, str):
            raise invalid(f"{param}[{index}]", "a string", item)
    return value or []


def tool_arguments(arguments: Any, param: str = "arguments") -> dict[str, Any]:
    """An OpenAI tool call's `arguments` (a JSON string) as an object, or TranslationError."""
    if isinstance(arguments, dict):
        return arguments
    if arguments is None or arguments == "":
        return {}
    if not isinstance(arguments, str):
        raise invalid(param, "a string of JSON", arguments)
    try:
        parsed = orjson.loads(arguments)
    except orjson.JSONDecodeError:
        raise TranslationError("a tool call's `arguments` is not valid JSON.",
                               param=param) from None
    if not isinstance(parsed, dict):
        raise TranslationError("a tool call's `arguments` must be a JSON object.", param=param)
    return parsed


# -- reading an OpenAI chat request (what both of its translations read alike) ---------------

def response_format_type(body: JSON) -> str | None:
    """The `type` of an OpenAI request's `response_format`, None without one."""
    response_format = body.get("response_format")
    if response_format is None:
        return None
    return a_string(an_object(response_format, "response_format").get("type"),
                    "response_format.type")


def content_parts(content: Any, param: str, parts: str = "content parts") -> list[Any]:
    """A message's content as its list of parts (a string or null is not one); `parts`: what
    the API calls them (Anthropic: content blocks)."""
    if isinstance(content, list):
        return content
    raise invalid(param, f"a string or an array of {parts}", content)


def part_type(part: Any, param: str) -> tuple[JSON, str]:
    """(the content part, its `type`)."""
    part = an_object(part, param)
    return part, a_string(part.get("type"), param + ".type")


def part_text(part: JSON, kind: str, param: str) -> str:
    """A text part's `text`, a refusal part's `refusal`."""
    name = "refusal" if kind == "refusal" else "text"
    return a_string(part.get(name), f"{param}.{name}")


def image_url(part: JSON, param: str) -> str:
    """An `image_url` part's URL: `{"url": ...}`, or a bare string as some clients send."""
    image = part.get("image_url")
    if isinstance(image, str):
        return image
    if image is None:
        raise missing(param + ".image_url")
    if not isinstance(image, dict):
        raise invalid(param + ".image_url", "an object with a `url` string", image)
    return a_string(image.get("url"), param + ".image_url.url")


def tool_call(call: Any, param: str) -> tuple[str, str, Any]:
    """(id, function name, raw arguments) of an assistant message's tool call."""
    call = an_object(call, param)
    kind = a_string_or_none(call.get("type"), param + ".type")
    if kind not in (None, "function"):
        raise TranslationError(f"tool calls of type {kind!r} can only be sent to OpenAI "
                               "models.", param=param + ".type")
    function = an_object(call.get("function"), param + ".function")
    return (a_string(call.get("id"), param + ".id"),
            a_string(function.get("name"), param + ".function.name"), function.get("arguments"))


def function_tool(tool: Any, param: str) -> tuple[JSON, str] | None:
    """(the `function`, its name) of an OpenAI tool; None for a tool of another type."""
    tool = an_object(tool, param)
    if a_string(tool.get("type"), param + ".type") != "function":
        return None
    function = an_object(tool.get("function"), param + ".function")
    name = a_string(function.get("name"), param + ".function.name")
    a_string_or_none(function.get("description"), param + ".function.description")
    a_flag(function.get("strict"), param + ".function.strict")
    if function.get("parameters") is not None:
        an_object(function["parameters"], param + ".function.parameters")
    return function, name


def chosen_function(choice: JSON) -> str:
    """The function name of a `{"type": "function", "function": {"name": ...}}` tool_choice."""
    function = an_object(choice.get("function"), "tool_choice.function")
    return a_string(function.get("name"), "tool_choice.function.name")


def allowed_tools(choice: JSON) -> tuple[set[str], bool]:
    """(the names an `allowed_tools` tool_choice allows, whether one is required)."""
    allowed = an_object(choice.get("allowed_tools"), "tool_choice.allowed_tools")
    names = set()
    param = "tool_choice.allowed_tools.tools"
    for index, tool in enumerate(an_array(allowed.get("tools"), param)):
        found = function_tool(tool, f"{param}[{index}]")
        if found is not None:
            names.add(found[1])
    return names, allowed.get("mode") == "required"


def bad_tool_choice(choice: Any, family: str) -> TranslationError:
    if isinstance(choice, str):
        return TranslationError(f"tool_choice {choice!r} has no {family} equivalent.",
                                param="tool_choice")
    if isinstance(choice, dict):
        kind = a_string(choice.get("type"), "tool_choice.type")
        return TranslationError(f"tool_choice of type {kind!r} has no {family} equivalent.",
                                param="tool_choice")
    return invalid("tool_choice", "a string or an object", choice)
