"""Every field a translator reads, of every wrong JSON type, on every translated route.

A request translated for another provider's API (OpenAI chat to Anthropic or Gemini, Anthropic
messages and token counts to OpenAI or Gemini, OpenAI embeddings to Gemini) is refused with a
400 in the caller's API shape that names the field at fault (`param`, and the message, which
is all an Anthropic error has) and says what it must be, in API words: a translator that read
a field without checking it answered in Python's ("'int' object is not iterable").

Each route has a well-formed body that touches every field its translators read (served: the
positive control). The sweep replaces one field at a time (every leaf and every container of
that body) with a value of each JSON type it must not have. Subtrees a translator passes on
unread (a tool's JSON schema, a tool call's input) and fields it drops are left out; a null is
refused only where the field is required (elsewhere it means "absent" and is served).
Responses requests are not in the sweep: only OpenAI-format deployments serve them, untouched.
"""
from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import pytest

from tests.harness import TEST_KEY, ThreadedServer

PNG = "iVBORw0KGgo="
PDF = "JVBERi0="
CHAT_BODY: dict[str, Any] = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": [{"type": "text", "text": "Really brief."}]},
        {"role": "user", "content": [
            {"type": "text", "text": "What is in these?"},
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
            {"type": "file", "file": {"file_data": f"data:application/pdf;base64,{PDF}",
                                      "filename": "a.pdf"}}]},
        {"role": "assistant", "content": "Let me look.", "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "look", "arguments": '{"at": "both"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "ok"}]},
        {"role": "user", "content": "So?"},
    ],
    "tools": [{"type": "function", "function": {
        "name": "look", "description": "Looks.", "strict": False,
        "parameters": {"type": "object", "properties": {}}}}],
    "tool_choice": {"type": "function", "function": {"name": "look"}},
    "parallel_tool_calls": True,
    "temperature": 0.5, "top_p": 0.9, "stop": ["END"], "max_tokens": 20, "n": 1,
    "response_format": {"type": "json_schema",
                        "json_schema": {"name": "r", "schema": {"type": "object"}}},
    "user": "user-1", "logprobs": False, "modalities": ["text"],
}
GEMINI_CHAT_BODY: dict[str, Any] = {
    **CHAT_BODY, "seed": 7, "top_k": 3, "presence_penalty": 0.5, "top_logprobs": 2,
    "messages": [*CHAT_BODY["messages"][:-1], {"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}]}]}
MESSAGES_BODY: dict[str, Any] = {
    "max_tokens": 20,
    "system": [{"type": "text", "text": "Be brief."}],
    "messages": [
        {"role": "user", "content": [
            {"type": "text", "text": "What is in these?"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": PNG}},
            {"type": "document", "title": "a.pdf",
             "source": {"type": "base64", "media_type": "application/pdf", "data": PDF}}]},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me look."},
            {"type": "tool_use", "id": "toolu_1", "name": "look", "input": {"at": "both"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1",
             "content": [{"type": "text", "text": "ok"}]},
            {"type": "text", "text": "So?"}]},
    ],
    "tools": [{"name": "look", "description": "Looks.", "strict": False,
               "input_schema": {"type": "object", "properties": {}}}],
    "tool_choice": {"type": "tool", "name": "look", "disable_parallel_tool_use": True},
    "stop_sequences": ["END"], "temperature": 0.5, "top_p": 0.9,
    "metadata": {"user_id": "user-1"},
    "output_config": {"format": {"type": "json_schema", "schema": {"type": "object"}}},
}
COUNT_BODY = {name: value for name, value in MESSAGES_BODY.items()
              if name in ("system", "messages", "tools", "tool_choice")}
EMBEDDINGS_BODY: dict[str, Any] = {"input": ["a", "b"], "dimensions": 8,
                                   "encoding_format": "float"}

# (route, model, body): the caller's endpoint and a model served by another API.
ROUTES: list[tuple[str, str, dict[str, Any]]] = [
    ("chat", "claude-mock", CHAT_BODY),
    ("chat", "gemini-mock", GEMINI_CHAT_BODY),
    ("messages", "gpt-mock", MESSAGES_BODY),
    ("messages", "gemini-mock", MESSAGES_BODY),
    ("count_tokens", "gpt-mock", COUNT_BODY),  # (counted by the gateway itself)
    ("count_tokens", "gemini-mock", COUNT_BODY),
    ("embeddings", "gemini-embed", EMBEDDINGS_BODY),
]
# Passed on unread (JSON schemas, a tool call's input, a schema's name) or dropped, per route.
UNREAD = re.compile(r".*\.(parameters|input_schema|schema|input)\..*|.*json_schema\.name")
DROPPED = {
    ("chat", "claude-mock"): {"parallel_tool_calls"},
    ("chat", "gemini-mock"): {"user", "parallel_tool_calls", "top_logprobs"},
}
# Fields a null is refused for: array elements and the required fields (elsewhere null stands
# for "left out"); in the Anthropic API a message's content too.
REQUIRED = re.compile(
    r".*\]|messages|input|response_format\.json_schema|.*input_audio\.format"
    r"|.*\.(role|type|text|image_url|url|file|file_data|source|media_type|data|function|name|id"
    r"|tool_call_id|tool_use_id|input_audio)")
NOT_REQUIRED = re.compile(r".*tool_calls\[\d+\]\.type")
ANTHROPIC_REQUIRED = re.compile(r"messages\[\d+\]\.content")
# Where the refusal names another field than the one sent: Anthropic's models need a schema
# for structured output, and a refusal of one without it names `response_format`; for Gemini
# a tool result must answer a call of the history.
NAMED = {("claude-mock", "response_format.json_schema.schema", "null"): "response_format",
         ("claude-mock", "response_format.json_schema", "null"): "response_format",
         ("gemini-mock", "messages[3].tool_calls", "null"): "messages[4].tool_call_id"}


def refused_null(route: str, model: str, path: str) -> bool:
    if (model, path, "null") in NAMED:
        return True
    if route in ("messages", "count_tokens") and ANTHROPIC_REQUIRED.fullmatch(path):
        return True
    return bool(REQUIRED.fullmatch(path)) and not NOT_REQUIRED.fullmatch(path)


WRONG: dict[str, Any] = {"integer": 5, "array": [5], "object": {"x": 5}, "null": None,
                         "boolean": True}
# What a type error must never say: Python's words (an "object" is JSON's word too, so only
# Python's phrasings of it count).
PYTHONISMS = ("' object", "object is not", "object has no", "NoneType", "not iterable",
              "has no attribute", "unhashable", "subscriptable", "KeyError", "str'", "int'",
              "dict'", "list'", "bool'", "float'", "Traceback")


def json_kind(value: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
            dict: "object", type(None): "null"}[type(value)]


def leaves(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """Every field of `value` (containers too) as (its name in API words, its value)."""
    if path:
        yield path, value
    if isinstance(value, dict):
        for name, item in value.items():
            yield from leaves(item, f"{path}.{name}" if path else name)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from leaves(item, f"{path}[{index}]")


def replaced(body: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(body)
    steps = re.findall(r"[^.\[\]]+|\[\d+\]", path)
    holder: Any = out
    for step in steps[:-1]:
        holder = holder[int(step[1:-1])] if step.startswith("[") else holder[step]
    last = steps[-1]
    holder[int(last[1:-1]) if last.startswith("[") else last] = value
    return out


def cases() -> list[tuple[str, str, dict[str, Any], str, str]]:
    found = []
    for route, model, body in ROUTES:
        for path, good in leaves(body):
            if UNREAD.fullmatch(path) or path in DROPPED.get((route, model), ()):
                continue
            for kind in WRONG:
                if kind == json_kind(good) or (kind == "integer" and json_kind(good) == "number"):
                    continue
                if kind == "object" and path.endswith(".function.arguments"):
                    continue  # (taken as the parsed arguments, as some clients send them)
                found.append((route, model, body, path, kind))
    return found


def send(server: ThreadedServer, route: str, model: str, body: dict[str, Any]) -> None:
    """`body` through the official SDK of the route's API (everything in `extra_body`, so
    that the SDK sends each field exactly as given)."""
    if route in ("chat", "embeddings"):
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=TEST_KEY, max_retries=0)
        if route == "chat":
            client.chat.completions.create(model=model, messages=[], extra_body=body)
        else:
            client.embeddings.create(model=model, input="", extra_body=body)
        return
    claude = anthropic.Anthropic(base_url=server.url, api_key=TEST_KEY, max_retries=0)
    if route == "messages":
        claude.messages.create(model=model, max_tokens=1, messages=[], extra_body=body)
    else:
        claude.messages.count_tokens(model=model, messages=[], extra_body=body)


@pytest.mark.parametrize(("route", "model", "body"), ROUTES,
                         ids=[f"{route}-{model}" for route, model, _ in ROUTES])
def test_the_well_formed_body_of_each_route_is_served(
        gateway: ThreadedServer, route: str, model: str, body: dict[str, Any]) -> None:
    send(gateway, route, model, body)


CASES = cases()


@pytest.mark.parametrize(("route", "model", "body", "path", "kind"), CASES,
                         ids=[f"{case[0]}-{case[1]}-{case[3]}-{case[4]}" for case in CASES])
def test_a_field_of_a_wrong_type_is_a_400_naming_it_in_api_words(
        gateway: ThreadedServer, route: str, model: str, body: dict[str, Any], path: str,
        kind: str) -> None:
    bad = replaced(body, path, WRONG[kind])
    if kind == "null" and not refused_null(route, model, path):
        send(gateway, route, model, bad)  # (served: a null optional field is left out)
        return
    error_class = openai.BadRequestError if route in ("chat", "embeddings") \
        else anthropic.BadRequestError
    with pytest.raises(error_class) as refused:
        send(gateway, route, model, bad)
    assert refused.value.status_code == 400
    error: Any = refused.value.body
    if error_class is anthropic.BadRequestError:
        assert set(error) == {"type", "error"} and error["type"] == "error", error
        error = error["error"]
        assert set(error) == {"type", "message"} and error["type"] == "invalid_request_error"
        param = re.search(r"'([^']+)'", error["message"])
        named = param.group(1) if param else ""
    else:
        assert set(error) == {"message", "type", "param", "code"}, error
        assert error["type"] == "invalid_request_error"
        named = error["param"]
        assert f"'{named}'" in error["message"] or named.split(".")[0] in error["message"]
    # The field itself, or (for a container) the element in it at fault.
    path = NAMED.get((model, path, kind), path)
    assert named == path or named.startswith((path + ".", path + "[")), (path, error)
    message = error["message"]
    assert not [word for word in PYTHONISMS if word in message], message
    if kind != "null":  # ("Missing required parameter" for a null)
        assert "expected" in message or "must" in message or "is required" in message, message
