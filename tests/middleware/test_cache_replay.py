"""middleware.cache.replay: stored answers as streams and back, checked with the official SDKs."""
from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import orjson
import pytest

from gateway.sse import SSEParser
from middleware.cache.collect import collect_sse, collect_stream
from middleware.cache.replay import (
    CACHED_USAGE_FLAG,
    mark_cached,
    marked_json,
    pieces,
    replay_stream,
)
from tests.harness import ThreadedServer, answer_lifespan, read_body
from tests.mock_providers.anthropic_api import message_events, message_object
from tests.mock_providers.behaviour import Reply, ToolCall
from tests.mock_providers.openai_chat import (
    Chat,
    azure_prompt_filter_chunk,
    chat_chunks,
    chat_completion,
)

JSON = dict[str, Any]
LONG_TEXT = ("The capital of France is Paris. It sits on the Seine, and about two million "
             "people live in the city itself.")

CHAT_USAGE = {"prompt_tokens": 19, "completion_tokens": 27, "total_tokens": 46,
              "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
              "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                            "accepted_prediction_tokens": 0,
                                            "rejected_prediction_tokens": 0}}


def chat(*choices: JSON, usage: JSON | None = CHAT_USAGE) -> JSON:
    body: JSON = {"id": "chatcmpl-C1aX9", "object": "chat.completion", "created": 1763840000,
                  "model": "gpt-4o-mini-2024-07-18", "choices": list(choices),
                  "service_tier": "default", "system_fingerprint": "fp_560af6e559"}
    if usage is not None:
        body["usage"] = usage
    return body


def choice(index: int = 0, content: str | None = LONG_TEXT, *, finish: str = "stop",
           refusal: str | None = None, tool_calls: list[JSON] | None = None,
           logprobs: JSON | None = None) -> JSON:
    message: JSON = {"role": "assistant", "content": content, "refusal": refusal,
                     "annotations": []}
    if tool_calls is not None:
        message["tool_calls"] = tool_calls
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish}


def call(call_id: str, name: str, arguments: JSON) -> JSON:
    return {"id": call_id, "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments)}}


CHAT_TEXT = chat(choice())
CHAT_NO_USAGE = chat(choice(), usage=None)
CHAT_TOOLS = chat(choice(content=None, finish="tool_calls", tool_calls=[
    call("call_W1", "get_weather", {"city": "Paris", "unit": "celsius", "days": 3}),
    call("call_T2", "get_time", {"timezone": "Europe/Paris", "format": "24h"})]))
CHAT_N2 = chat(choice(0), choice(1, "A shorter second answer, also cut up.", finish="length"))
CHAT_REFUSAL = chat(choice(content=None, refusal="I'm sorry, but I can't help with that "
                                                 "request."))
CHAT_LOGPROBS = chat(choice(content="Hi there", logprobs={"content": [
    {"token": "Hi", "logprob": -0.1, "bytes": [72, 105], "top_logprobs": []},
    {"token": " there", "logprob": -0.2, "bytes": None, "top_logprobs": []}], "refusal": None}))

COMPLETION: JSON = {"id": "cmpl-8XyZ", "object": "text_completion", "created": 1763840000,
              "model": "gpt-3.5-turbo-instruct", "system_fingerprint": "fp_mock0001",
              "choices": [{"text": LONG_TEXT, "index": 0, "logprobs": None, "finish_reason": "stop"},
                          {"text": " Second.", "index": 1, "logprobs": None,
                           "finish_reason": "length"}],
              "usage": {"prompt_tokens": 5, "completion_tokens": 30, "total_tokens": 35}}


def message(*content: JSON, stop_reason: str = "end_turn", stop_sequence: str | None = None,
            ) -> JSON:
    return {"id": "msg_01XFDUDYJgAACzvnptvVoYEL", "type": "message", "role": "assistant",
            "model": "claude-3-5-haiku-20241022", "content": list(content),
            "stop_reason": stop_reason, "stop_sequence": stop_sequence,
            "usage": {"input_tokens": 472, "cache_creation_input_tokens": 0,
                      "cache_read_input_tokens": 128, "output_tokens": 89,
                      "service_tier": "standard"}}


TEXT_BLOCK = {"type": "text", "text": LONG_TEXT}
WEATHER = {"type": "tool_use", "id": "toolu_01A09q90qw90lq917835lq9", "name": "get_weather",
           "input": {"location": "San Francisco, CA", "unit": "fahrenheit", "days": [1, 2]}}
CLOCK = {"type": "tool_use", "id": "toolu_01B7", "name": "get_time", "input": {}}
MESSAGE_TEXT = message(TEXT_BLOCK)
MESSAGE_TOOL = message(WEATHER, stop_reason="tool_use")
MESSAGE_MIXED = message(TEXT_BLOCK, WEATHER, CLOCK, stop_reason="tool_use")
MESSAGE_STOP_SEQUENCE = message({"type": "text", "text": "Counting: 1, 2, 3"},
                                stop_reason="stop_sequence", stop_sequence="###")
MESSAGE_THINKING = message(
    {"type": "thinking", "thinking": "The user wants the capital of France; that is Paris.",
     "signature": "EqQBCgIYAhIM1gbcDa9GJwZA2b3hGgxBdjrkzLoky3dl1pkiMOYds"},
    {"type": "redacted_thinking", "data": "EmwKAhgBEgy3va3pzix/LafPsn4a"},
    {"type": "text", "text": "Paris.", "citations": [
        {"type": "char_location", "cited_text": "Paris is the capital.", "document_index": 0,
         "document_title": None, "start_char_index": 0, "end_char_index": 21}]})

ROUND_TRIPS: dict[str, tuple[JSON, str, str, bool]] = {
    "chat text": (CHAT_TEXT, "openai", "openai.chat", True),
    "chat text, no usage": (CHAT_NO_USAGE, "openai", "openai.chat", False),
    "chat two tool calls": (CHAT_TOOLS, "openai", "openai.chat", True),
    "chat n=2": (CHAT_N2, "openai", "openai.chat", True),
    "chat refusal": (CHAT_REFUSAL, "openai", "openai.chat", True),
    "chat logprobs": (CHAT_LOGPROBS, "openai", "openai.chat", True),
    "text completion": (COMPLETION, "openai", "openai.completions", True),
    "anthropic text": (MESSAGE_TEXT, "anthropic", "anthropic.messages", False),
    "anthropic tool_use": (MESSAGE_TOOL, "anthropic", "anthropic.messages", False),
    "anthropic text+tool_use": (MESSAGE_MIXED, "anthropic", "anthropic.messages", False),
    "anthropic stop_sequence": (MESSAGE_STOP_SEQUENCE, "anthropic", "anthropic.messages", False),
    "anthropic thinking+citations": (MESSAGE_THINKING, "anthropic", "anthropic.messages", False),
}


def parse(chunks: list[bytes]) -> list[tuple[str | None, str]]:
    parser = SSEParser()
    events = [event for chunk in chunks for event in parser.feed(chunk)]
    return events + parser.flush()


def sse_bytes(events: list[tuple[str | None, str]]) -> bytes:
    """Events as the bytes a client was sent (one `data:` line each, after an `event:` line
    for a named one)."""
    return b"".join((b"event: %s\n" % name.encode() if name else b"") + b"data: "
                    + data.encode() + b"\n\n" for name, data in events)


def collected(events: list[tuple[str | None, str]], api_format: str, operation: str
              ) -> JSON | None:
    """`collect_stream` of the events, held to `collect_sse` of their bytes."""
    body = collect_stream(events, api_format, operation)
    assert collect_sse(sse_bytes(events), api_format, operation) == body
    return body


def datas(chunks: list[bytes]) -> list[Any]:
    return [orjson.loads(data) for _, data in parse(chunks) if data != "[DONE]"]


# -- pieces -----------------------------------------------------------------------------------

def test_pieces_rejoin_cut_after_spaces_and_stay_few() -> None:
    cut = pieces(LONG_TEXT)
    assert "".join(cut) == LONG_TEXT and len(cut) > 3
    assert all(piece.endswith(" ") for piece in cut[:-1])
    long_text = "word " * 2000
    assert "".join(pieces(long_text)) == long_text and len(pieces(long_text)) <= 20
    assert pieces("x" * 45) == ["x" * 20, "x" * 20, "x" * 5]  # no space: hard cuts
    assert pieces("") == [] and pieces("short") == ["short"]


# -- round trips ------------------------------------------------------------------------------

@pytest.mark.parametrize("cached", [True, False], ids=["cached", "unmarked"])
@pytest.mark.parametrize("case", ROUND_TRIPS.values(), ids=ROUND_TRIPS.keys())
def test_round_trip(case: tuple[JSON, str, str, bool], cached: bool) -> None:
    body, api_format, operation, include_usage = case
    original = copy.deepcopy(body)
    chunks = replay_stream(body, api_format, include_usage=include_usage, cached=cached)
    assert collected(parse(chunks), api_format, operation) == original
    assert body == original  # the stored answer is not mutated
    assert chunks == replay_stream(body, api_format, include_usage=include_usage, cached=cached)


def test_every_chunk_is_one_complete_event() -> None:
    for body, api_format, _, include_usage in ROUND_TRIPS.values():
        for chunk in replay_stream(body, api_format, include_usage=include_usage):
            parser = SSEParser()
            assert len(parser.feed(chunk)) == 1 and parser.flush() == []


def test_usage_left_out_when_the_client_did_not_ask_for_it() -> None:
    chunks = replay_stream(CHAT_TEXT, "openai", include_usage=False)
    assert all("usage" not in data for data in datas(chunks))
    expected = {key: value for key, value in CHAT_TEXT.items() if key != "usage"}
    assert collected(parse(chunks), "openai", "openai.chat") == expected


# -- wire shapes ------------------------------------------------------------------------------

def test_chat_chunks_follow_openai() -> None:
    chunks = replay_stream(CHAT_TEXT, "openai", include_usage=True)
    assert chunks[-1] == b"data: [DONE]\n\n"
    *deltas, last = datas(chunks)
    for data in deltas:
        assert {key: data[key] for key in ("id", "created", "model", "system_fingerprint",
                                           "service_tier")} == {
            key: CHAT_TEXT[key] for key in ("id", "created", "model", "system_fingerprint",
                                            "service_tier")}
        assert data["object"] == "chat.completion.chunk" and data["usage"] is None
    assert deltas[0]["choices"][0]["delta"] == {"role": "assistant", "content": "",
                                                "refusal": None, "annotations": []}
    content = [d["choices"][0]["delta"].get("content") for d in deltas[1:-1]]
    assert "".join(content) == LONG_TEXT and len(content) > 3
    assert deltas[-1]["choices"] == [{"index": 0, "delta": {}, "logprobs": None,
                                      "finish_reason": "stop"}]
    assert last["choices"] == [] and last["usage"] == {**CHAT_USAGE, CACHED_USAGE_FLAG: True}


def test_tool_calls_stream_head_then_argument_pieces() -> None:
    deltas = [d["choices"][0]["delta"] for d in datas(
        replay_stream(CHAT_TOOLS, "openai", include_usage=False))]
    assert deltas[0] == {"role": "assistant", "content": None, "refusal": None, "annotations": []}
    calls = [delta["tool_calls"][0] for delta in deltas if "tool_calls" in delta]
    for position, stored in enumerate(CHAT_TOOLS["choices"][0]["message"]["tool_calls"]):
        mine = [c for c in calls if c["index"] == position]
        assert mine[0] == {"index": position, "id": stored["id"], "type": "function",
                           "function": {"name": stored["function"]["name"], "arguments": ""}}
        assert all(set(c) == {"index", "function"} for c in mine[1:]) and len(mine) > 2
        assert "".join(c["function"]["arguments"] for c in mine) == stored["function"]["arguments"]


def test_n2_choices_interleave_and_each_finishes() -> None:
    indexes = [d["choices"][0]["index"] for d in datas(
        replay_stream(CHAT_N2, "openai", include_usage=True)) if d["choices"]]
    assert indexes[:4] == [0, 1, 0, 1]
    finishes = [(d["choices"][0]["index"], d["choices"][0]["finish_reason"]) for d in datas(
        replay_stream(CHAT_N2, "openai", include_usage=True))
        if d["choices"] and d["choices"][0]["finish_reason"]]
    assert finishes == [(0, "stop"), (1, "length")]


def test_text_completion_chunks() -> None:
    *chunks, usage = datas(replay_stream(COMPLETION, "openai", include_usage=True))
    assert all(c["object"] == "text_completion" and set(c["choices"][0]) == {
        "text", "index", "logprobs", "finish_reason"} for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"][0]["index"] == 0) \
        == LONG_TEXT
    assert usage["choices"] == [] and usage["usage"][CACHED_USAGE_FLAG] is True


def test_anthropic_event_sequence() -> None:
    events = parse(replay_stream(MESSAGE_MIXED, "anthropic", include_usage=False))
    names = [name for name, _ in events]
    text_deltas = len(pieces(LONG_TEXT))
    json_deltas = len(pieces(json.dumps(WEATHER["input"], separators=(",", ":"))))
    assert names == (["message_start", "content_block_start", "ping"]
                     + ["content_block_delta"] * text_deltas + ["content_block_stop"]
                     + ["content_block_start"] + ["content_block_delta"] * json_deltas
                     + ["content_block_stop", "content_block_start", "content_block_delta",
                        "content_block_stop", "message_delta", "message_stop"])
    payloads = [orjson.loads(data) for _, data in events]
    assert all(payload["type"] == name for name, payload in zip(names, payloads))
    start = payloads[0]["message"]
    assert start["content"] == [] and start["stop_reason"] is None
    assert start["usage"] == {**MESSAGE_MIXED["usage"], "output_tokens": 0,
                              CACHED_USAGE_FLAG: True}
    assert payloads[-2] == {"type": "message_delta",
                            "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                            "usage": {**MESSAGE_MIXED["usage"], CACHED_USAGE_FLAG: True}}
    tool_start = payloads[3 + text_deltas + 1]
    assert tool_start["content_block"] == {**WEATHER, "input": {}} and tool_start["index"] == 1


def test_replay_refuses_a_body_without_a_stream_form() -> None:
    embedding = {"object": "list", "data": [], "model": "text-embedding-3-small"}
    with pytest.raises(ValueError):
        replay_stream(embedding, "openai", include_usage=True)


def test_mark_cached_copies() -> None:
    marked = mark_cached(CHAT_TEXT)
    assert marked["usage"] == {**CHAT_USAGE, CACHED_USAGE_FLAG: True}
    assert CACHED_USAGE_FLAG not in CHAT_TEXT["usage"]
    assert mark_cached(CHAT_NO_USAGE) == CHAT_NO_USAGE


@pytest.mark.parametrize("raw", [
    b'{"usage":{}}',
    b'{"usage" : \n {  } , "a": 1}',
    b'{"a":{"usage":{"x":1}},"usage":{"y":2}}',  # a nested usage key: written anew
    b'{"type":"usage","usage":{"y":2}}',  # "usage" as a value too
    b'{"usage":{"x_sluicegate_cached":false}}',  # the flag already there
    b'{"usage":{"p":1,"x_sluicegate_cached":true}}',  # marked by an older gateway
    b'{"x":"say \\"usage\\": {","usage":{"p":1}}',  # the key, escaped, inside a string
    b'{"u":1}',
    b'{"usage":null}',
    b'{"usage":"none"}',
])
def test_marked_json_is_the_marked_answer(raw: bytes) -> None:
    assert orjson.loads(marked_json(raw)) == mark_cached(orjson.loads(raw))


def test_marked_json_keeps_the_bytes_the_client_got() -> None:
    """A pretty-printed answer (as OpenAI sends it) stays as it was, with the flag written
    into its usage object."""
    body = {**CHAT_TEXT, "usage": CHAT_USAGE}
    raw = orjson.dumps(body, option=orjson.OPT_INDENT_2)
    marked = marked_json(raw)
    assert orjson.loads(marked) == mark_cached(body)
    assert marked.replace(b'"x_sluicegate_cached":true,', b"") == raw


# -- collecting upstream streams (the mock providers' independent renderings) ----------------

def mock_items(items: list[tuple[bytes, bool]]) -> list[tuple[str | None, str]]:
    return parse([rendered for rendered, _ in items])


def without_annotations(body: JSON) -> JSON:
    body = orjson.loads(orjson.dumps(body))
    for each in body["choices"]:
        del each["message"]["annotations"]  # a chat stream never carries them
    return body


MOCK_TOOL = ToolCall("call_Zx1", "get_weather", {"city": "Paris", "unit": "c"},
                     '{"city": "Paris", "unit": "c"}')
MOCK_REPLIES = {"text": (Reply(LONG_TEXT, None, False, 12, 21), "stop"),
                "tool call": (Reply(None, MOCK_TOOL, False, 12, 4), "tool_calls")}


@pytest.mark.parametrize("azure", [False, True], ids=["openai", "azure"])
@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("kind", MOCK_REPLIES)
def test_collect_a_chat_stream_as_its_non_stream_answer(kind: str, n: int, azure: bool) -> None:
    reply, finish = MOCK_REPLIES[kind]
    settings = Chat("chatcmpl-mock1", 1763840000, "gpt-4o-mini", n, None, True, azure)
    items = chat_chunks(settings, reply, finish, chunk_chars=8)
    if azure:
        items.insert(0, azure_prompt_filter_chunk())
    expected = without_annotations(chat_completion(settings, reply, finish))
    assert collected(mock_items(items), "openai", "openai.chat") == expected


@pytest.mark.parametrize("kind", MOCK_REPLIES)
def test_collect_an_anthropic_stream_as_its_message(kind: str) -> None:
    reply, _ = MOCK_REPLIES[kind]
    items = message_events("msg_mock1", "claude-3-5-haiku", reply, chunk_chars=8)
    expected = message_object("msg_mock1", "claude-3-5-haiku", reply)
    assert collected(mock_items(items), "anthropic", "anthropic.messages") == expected


def plain_strings_only(value: Any) -> bool:
    """Whether every text in `value` is a `str` itself (nothing of the collector's own)."""
    if isinstance(value, dict):
        return all(plain_strings_only(item) for item in value.values())
    if isinstance(value, list):
        return type(value) is list and all(plain_strings_only(item) for item in value)
    return not isinstance(value, str) or type(value) is str


def test_a_long_chat_stream_collects_every_piece_in_order() -> None:
    """Thousands of deltas (some empty) in the content, a tool call's arguments and a second
    choice's text: each field is exactly its pieces joined, and only plain strings remain."""
    words = [f"w{i} " if i % 7 else "" for i in range(3000)]
    head = {"id": "chatcmpl-long", "object": "chat.completion.chunk", "created": 1,
            "model": "gpt-4o-mini"}
    events: list[tuple[str | None, str]] = []
    for i, word in enumerate(words):
        args = '{"n":' if i == 0 else (f"{i}," if i < len(words) - 1 else "0}")
        events.append((None, orjson.dumps({**head, "choices": [
            {"index": 0, "delta": {"content": word} if i else {"role": "assistant",
                                                              "content": word},
             "finish_reason": None},
            {"index": 1, "delta": {"tool_calls": [{"index": 0, "function": {
                "arguments": args}}]}, "finish_reason": None}]}).decode()))
    events.append((None, orjson.dumps({**head, "choices": [
        {"index": 0, "delta": {}, "finish_reason": "stop"},
        {"index": 1, "delta": {}, "finish_reason": "tool_calls"}]}).decode()))
    events.append((None, "[DONE]"))
    body = collected(events, "openai", "openai.chat")
    assert body is not None and plain_strings_only(body)
    first, second = body["choices"]
    assert first["message"] == {"role": "assistant", "content": "".join(words)}
    arguments = second["message"]["tool_calls"][0]["function"]["arguments"]
    assert arguments == '{"n":' + "".join(f"{i}," for i in range(1, len(words) - 1)) + "0}"
    assert orjson.loads(orjson.dumps(body)) == body


def test_a_long_anthropic_stream_collects_every_piece_in_order() -> None:
    pieces_of_text = [f"t{i} " if i % 5 else "" for i in range(2000)]
    events: list[tuple[str | None, str]] = [("message_start", orjson.dumps({
        "type": "message_start", "message": {
            "id": "msg_long", "type": "message", "role": "assistant", "model": "claude",
            "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": 5, "output_tokens": 1}}}).decode())]

    def event(name: str, payload: JSON) -> None:
        events.append((name, orjson.dumps({"type": name, **payload}).decode()))

    event("content_block_start", {"index": 0, "content_block": {"type": "thinking",
                                                                "thinking": ""}})
    for piece in pieces_of_text:
        event("content_block_delta", {"index": 0, "delta": {"type": "thinking_delta",
                                                            "thinking": piece}})
    event("content_block_stop", {"index": 0})
    event("content_block_start", {"index": 1, "content_block": {"type": "text", "text": "A"}})
    for piece in pieces_of_text:
        event("content_block_delta", {"index": 1, "delta": {"type": "text_delta",
                                                            "text": piece}})
    event("content_block_stop", {"index": 1})
    event("content_block_start", {"index": 2, "content_block": {
        "type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}})
    for piece in ['{"a": [', *[f"{i}," for i in range(500)], "", "1]}"]:
        event("content_block_delta", {"index": 2, "delta": {"type": "input_json_delta",
                                                            "partial_json": piece}})
    event("content_block_stop", {"index": 2})
    event("content_block_start", {"index": 3, "content_block": {
        "type": "tool_use", "id": "toolu_2", "name": "g", "input": {}}})
    for piece in ["", ""]:  # a tool without arguments: empty pieces mean {}
        event("content_block_delta", {"index": 3, "delta": {"type": "input_json_delta",
                                                            "partial_json": piece}})
    event("content_block_stop", {"index": 3})
    event("message_delta", {"delta": {"stop_reason": "tool_use", "stop_sequence": None},
                            "usage": {"output_tokens": 4000}})
    event("message_stop", {})
    body = collected(events, "anthropic", "anthropic.messages")
    assert body is not None and plain_strings_only(body)
    thinking, text, tool, empty_tool = body["content"]
    assert thinking["thinking"] == "".join(pieces_of_text)
    assert text["text"] == "A" + "".join(pieces_of_text)
    assert tool["input"] == {"a": [*range(500), 1]}
    assert empty_tool["input"] == {}


def test_a_text_delta_that_is_not_a_string_is_not_collected() -> None:
    events = message_stream_events()
    at = next(i for i, (name, data) in enumerate(events) if '"text_delta"' in data)
    bad = orjson.loads(events[at][1])
    bad["delta"]["text"] = 7
    broken = [*events[:at], (events[at][0], orjson.dumps(bad).decode()), *events[at + 1:]]
    assert collected(broken, "anthropic", "anthropic.messages") is None


# -- what must not be cached ------------------------------------------------------------------

def chat_events(**replay: Any) -> list[tuple[str | None, str]]:
    return parse(replay_stream(CHAT_TOOLS, "openai", include_usage=True, **replay))


def message_stream_events() -> list[tuple[str | None, str]]:
    return parse(replay_stream(MESSAGE_MIXED, "anthropic", include_usage=False))


def test_an_openai_stream_without_done_is_not_collected() -> None:
    assert collected(chat_events()[:-1], "openai", "openai.chat") is None
    assert collected(chat_events()[:-2], "openai", "openai.chat") is None


def test_an_openai_error_chunk_is_not_collected() -> None:
    events = chat_events()
    error = (None, '{"error":{"message":"The server had an error","type":"server_error"}}')
    assert collected([*events[:3], error, *events[3:]], "openai", "openai.chat") is None


def test_an_openai_choice_without_finish_reason_is_not_collected() -> None:
    events = [event for event in chat_events() if '"finish_reason":"tool_calls"' not in event[1]]
    assert collected(events, "openai", "openai.chat") is None


def test_an_anthropic_stream_without_message_stop_is_not_collected() -> None:
    events = message_stream_events()
    assert collected(events[:-1], "anthropic", "anthropic.messages") is None
    no_delta = [event for event in events if event[0] != "message_delta"]
    assert collected(no_delta, "anthropic", "anthropic.messages") is None


def test_an_anthropic_error_event_is_not_collected() -> None:
    events = message_stream_events()
    error = ("error", '{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}')
    assert collected([*events[:4], error, *events[4:]], "anthropic",
                          "anthropic.messages") is None


def test_unfinished_tool_input_is_not_collected() -> None:
    events = message_stream_events()
    stops = [i for i, (name, _) in enumerate(events) if name == "content_block_stop"]
    cut = events[:stops[1] - 1] + events[stops[1]:]  # the last input_json_delta is lost
    assert collected(cut, "anthropic", "anthropic.messages") is None
    unstopped = events[:stops[1]] + events[stops[1] + 1:]  # the tool block never closed
    assert collected(unstopped, "anthropic", "anthropic.messages") is None


def test_unreadable_or_unknown_streams_are_not_collected() -> None:
    assert collected([(None, "{not json"), (None, "[DONE]")], "openai", "openai.chat") is None
    assert collected(chat_events(), "openai", "openai.responses") is None
    assert collected(chat_events(), "anthropic", "openai.chat") is None
    assert collected(message_stream_events(), "openai", "openai.chat") is None


# -- the official SDKs read the replay --------------------------------------------------------

class CachedAnswers:
    """Answers every call from `stored`, as a cache hit does: replayed for a stream request,
    the marked JSON otherwise."""

    def __init__(self) -> None:
        self.stored: JSON = {}

    async def __call__(self, scope: JSON, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        body = await read_body(receive)
        request = orjson.loads(body) if body else {}
        api_format = "anthropic" if scope["path"].endswith("/messages") else "openai"
        if not request.get("stream"):
            await respond(send, b"application/json", [orjson.dumps(mark_cached(self.stored))])
            return
        options = request.get("stream_options") or {}
        await respond(send, b"text/event-stream", replay_stream(
            self.stored, api_format, include_usage=options.get("include_usage") is True))


async def respond(send: Any, content_type: bytes, chunks: list[bytes]) -> None:
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", content_type)]})
    for chunk in chunks:
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


@pytest.fixture(scope="module")
def server() -> Iterator[ThreadedServer]:
    with ThreadedServer(CachedAnswers()) as running:
        yield running


def serving(server: ThreadedServer, body: JSON) -> ThreadedServer:
    server.app.stored = body
    return server


def openai_client(server: ThreadedServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="sk-test", max_retries=0)


def anthropic_client(server: ThreadedServer) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key="sk-ant-test", max_retries=0)


ASK: Any = [{"role": "user", "content": "What is the capital of France?"}]
CHAT_SDK_CASES = {name: ROUND_TRIPS[name][0] for name in (
    "chat text", "chat two tool calls", "chat n=2", "chat refusal", "chat logprobs")}
MESSAGE_SDK_CASES = {name: ROUND_TRIPS[name][0] for name in (
    "anthropic text", "anthropic tool_use", "anthropic text+tool_use", "anthropic stop_sequence",
    "anthropic thinking+citations")}


def expected_calls(stored_message: JSON) -> list[tuple[str, str, Any]]:
    return [(c["id"], c["function"]["name"], json.loads(c["function"]["arguments"]))
            for c in stored_message.get("tool_calls") or ()]


@pytest.mark.parametrize("body", CHAT_SDK_CASES.values(), ids=CHAT_SDK_CASES.keys())
def test_openai_sdk_accumulates_the_replayed_chat_stream(server: ThreadedServer,
                                                         body: JSON) -> None:
    client = openai_client(serving(server, body))
    chunks = list(client.chat.completions.create(
        model="gpt-mock", messages=ASK, stream=True,
        stream_options={"include_usage": True}))
    for stored in body["choices"]:
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == stored["index"]]
        message = stored["message"]
        assert "".join(c.delta.content or "" for c in mine) == (message["content"] or "")
        assert "".join(c.delta.refusal or "" for c in mine) == (message["refusal"] or "")
        calls: dict[int, list[Any]] = {}
        for delta_call in (t for c in mine for t in c.delta.tool_calls or ()):
            entry = calls.setdefault(delta_call.index, [delta_call.id, None, ""])
            assert delta_call.function is not None
            entry[1] = entry[1] or delta_call.function.name
            entry[2] += delta_call.function.arguments or ""
        assert [(i, n, json.loads(a)) for i, n, a in calls.values()] == expected_calls(message)
        assert [c.finish_reason for c in mine if c.finish_reason] == [stored["finish_reason"]]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.to_dict() == {**body["usage"], CACHED_USAGE_FLAG: True}
    assert chunks[-1].usage.model_extra == {CACHED_USAGE_FLAG: True}


@pytest.mark.parametrize("body", CHAT_SDK_CASES.values(), ids=CHAT_SDK_CASES.keys())
def test_openai_stream_helper_rebuilds_the_stored_completion(server: ThreadedServer,
                                                             body: JSON) -> None:
    client = openai_client(serving(server, body))
    with client.chat.completions.stream(model="gpt-mock", messages=ASK,
                                        stream_options={"include_usage": True}) as stream:
        try:
            final: Any = stream.get_final_completion()
        except openai.LengthFinishReasonError as exc:  # the helper refuses to parse "length"
            final = exc.completion
    assert (final.id, final.model, final.created, final.system_fingerprint) == (
        body["id"], body["model"], body["created"], body["system_fingerprint"])
    for got, stored in zip(final.choices, body["choices"], strict=True):
        message = got.message
        assert (message.content, message.refusal, got.finish_reason) == (
            stored["message"]["content"], stored["message"]["refusal"], stored["finish_reason"])
        assert [(c.id, c.function.name, json.loads(c.function.arguments))
                for c in message.tool_calls or ()] == expected_calls(stored["message"])
        assert (got.logprobs.to_dict() if got.logprobs else None) == stored["logprobs"]
    assert final.usage is not None
    assert final.usage.to_dict() == {**body["usage"], CACHED_USAGE_FLAG: True}


@pytest.mark.parametrize("body", CHAT_SDK_CASES.values(), ids=CHAT_SDK_CASES.keys())
def test_openai_sdk_reads_the_stored_chat_completion(server: ThreadedServer, body: JSON) -> None:
    completion = openai_client(serving(server, body)).chat.completions.create(
        model="gpt-mock", messages=ASK)
    assert completion.to_dict() == mark_cached(body)
    assert completion.usage is not None and completion.usage.model_extra == {
        CACHED_USAGE_FLAG: True}


def test_openai_sdk_reads_the_text_completion_replay(server: ThreadedServer) -> None:
    client = openai_client(serving(server, COMPLETION))
    chunks = list(client.completions.create(model="gpt-mock", prompt="Say", stream=True,
                                            stream_options={"include_usage": True}))
    for stored in COMPLETION["choices"]:
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == stored["index"]]
        assert "".join(c.text for c in mine) == stored["text"]
        assert [c.finish_reason for c in mine if c.finish_reason] == [stored["finish_reason"]]
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.to_dict() == {**COMPLETION["usage"], CACHED_USAGE_FLAG: True}
    plain = client.completions.create(model="gpt-mock", prompt="Say")
    assert plain.to_dict() == mark_cached(COMPLETION)


@pytest.mark.parametrize("body", MESSAGE_SDK_CASES.values(), ids=MESSAGE_SDK_CASES.keys())
def test_anthropic_sdk_stream_rebuilds_the_stored_message(server: ThreadedServer,
                                                          body: JSON) -> None:
    client = anthropic_client(serving(server, body))
    with client.messages.stream(model="claude-mock", max_tokens=256, messages=ASK) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "".join(b["text"] for b in body["content"] if b["type"] == "text")
    # The SDK sets stop_details from every message_delta (None: no refusal details).
    assert final.to_dict() == {**mark_cached(body), "stop_details": None}
    assert final.usage.model_extra == {CACHED_USAGE_FLAG: True}


@pytest.mark.parametrize("body", MESSAGE_SDK_CASES.values(), ids=MESSAGE_SDK_CASES.keys())
def test_anthropic_sdk_reads_raw_replayed_events(server: ThreadedServer, body: JSON) -> None:
    client = anthropic_client(serving(server, body))
    events: list[Any] = list(client.messages.create(model="claude-mock", max_tokens=256, messages=ASK,
                                         stream=True))
    assert [event.type for event in events] == [  # the SDK drops pings
        name for name, _ in parse(replay_stream(body, "anthropic", include_usage=False))
        if name != "ping"]
    assert isinstance(events[0], anthropic.types.RawMessageStartEvent)
    assert events[0].message.usage.input_tokens == body["usage"]["input_tokens"]
    delta = events[-2]
    assert isinstance(delta, anthropic.types.RawMessageDeltaEvent)
    assert (delta.delta.stop_reason, delta.delta.stop_sequence, delta.usage.output_tokens) == (
        body["stop_reason"], body["stop_sequence"], body["usage"]["output_tokens"])
    inputs: dict[int, str] = {}
    for event in events:
        if event.type == "content_block_delta" and event.delta.type == "input_json_delta":
            inputs[event.index] = inputs.get(event.index, "") + event.delta.partial_json
    assert {i: json.loads(text) for i, text in inputs.items()} == {
        i: b["input"] for i, b in enumerate(body["content"]) if b["type"] == "tool_use"}


@pytest.mark.parametrize("body", MESSAGE_SDK_CASES.values(), ids=MESSAGE_SDK_CASES.keys())
def test_anthropic_sdk_reads_the_stored_message(server: ThreadedServer, body: JSON) -> None:
    reply = anthropic_client(serving(server, body)).messages.create(
        model="claude-mock", max_tokens=256, messages=ASK)
    assert reply.to_dict() == mark_cached(body)


def test_a_chat_answer_whose_content_is_a_list_of_parts_replays_it_whole() -> None:
    # (Mistral's reasoning models answer with a list of parts; the replay sent none of it,
    # an empty answer marked as a hit)
    parts = [{"type": "text", "text": "The answer is 42."}]
    body = {"id": "x", "object": "chat.completion", "created": 1, "model": "magistral",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": parts},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}}
    raw = b"".join(replay_stream(body, "openai", include_usage=True, cached=False))
    collected = collect_sse(raw, "openai", "openai.chat")
    assert collected is not None
    assert collected["choices"][0]["message"]["content"] == parts


def test_a_collected_openai_stream_keeps_no_obfuscation_pad() -> None:
    # (the first chunk's random pad became a field of the stored chat.completion, which the
    # real non-stream answer never has, and was copied into every replayed chunk)
    chunks = [{"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
               "obfuscation": pad}
              for delta, finish, pad in [({"role": "assistant", "content": ""}, None, "abcd"),
                                         ({"content": "hi"}, None, "xy"), ({}, "stop", "q")]]
    raw = b"".join(b"data: " + orjson.dumps(chunk) + b"\n\n" for chunk in chunks)
    collected = collect_sse(raw + b"data: [DONE]\n\n", "openai", "openai.chat")
    assert collected is not None and "obfuscation" not in collected
    assert collected["choices"][0]["message"]["content"] == "hi"
    replayed = b"".join(replay_stream(collected, "openai", include_usage=False))
    assert b"obfuscation" not in replayed
