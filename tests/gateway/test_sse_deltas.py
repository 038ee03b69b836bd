"""Content deltas (gateway/sse.py): what a stream cut short is billed at least, one output
token each, and what a budget's cut-off counts. Every stream format the gateway sends, as
the mock providers write it and as the gateway translates it: only the events that carry
output count, not a chat stream's opening role chunk or closing chunk, nor an Anthropic
message_delta, a Responses lifecycle event or an empty delta."""
from __future__ import annotations

import json
from typing import Any

import orjson
import pytest

from gateway.context import ANTHROPIC_MESSAGES, OPENAI_CHAT, OPENAI_COMPLETIONS, OPENAI_RESPONSES
from gateway.sse import content_counters, count_content, delivered_counting, opening_excess
from providers.anthropic import AnthropicSource
from providers.anthropic_format import ChatStreamToMessages, MessagesStreamToChat
from providers.gemini import GeminiSource
from providers.gemini_format import GeminiStreamToChat
from providers.streams import (
    AnthropicEventSink,
    OpenAIChunkSink,
    OpenAIChunkSource,
    TranslatingCodec,
)
from tests.mock_providers.anthropic_api import message_events
from tests.mock_providers.behaviour import Reply, ToolCall
from tests.mock_providers.gemini_api import stream_chunks
from tests.mock_providers.openai_chat import Chat, chat_chunks
from tests.mock_providers.openai_extra import _completion_chunks
from tests.mock_providers.openai_responses import response_events, response_object

TEXT = Reply("Mock reply to: a b c d e f g", None, False, 10, 10)
CALL = ToolCall("call_1", "get_weather", {"city": "test", "days": 1},
                '{"city": "test", "days": 1}')
TOOL = Reply(None, CALL, False, 10, 4)

Items = list[tuple[bytes, bool]]


def openai_chat(reply: Reply, n: int = 1, usage: bool = True) -> Items:
    chat = Chat("chatcmpl-1", 1, "gpt-mock", n, None, usage, False)
    return chat_chunks(chat, reply, "tool_calls" if reply.tool_call else "stop", 3)


def anthropic(reply: Reply) -> Items:
    return message_events("msg_1", "claude-mock", reply, 3)


def responses(reply: Reply) -> Items:
    final = response_object({"model": "gpt-mock"}, reply, "resp_1", "msg_1")
    return response_events(final, reply, 3)


def gemini(reply: Reply) -> Items:
    return [(b"data: " + orjson.dumps(chunk) + b"\r\n\r\n", content)
            for chunk, content in stream_chunks("gemini-mock", reply, "r1", 3)]


def translated(source: Any, sink: Any, items: Items) -> bytes:
    codec = TranslatingCodec(source, sink)
    return b"".join(codec.feed(item) for item, _ in items) + codec.finish()


def count(operation: str, messages: list[bytes]) -> int:
    """A stream's content deltas, counted message by message as the gateway counts them."""
    counters, counted = content_counters(operation), 0
    for message in messages:
        counted += count_content(counters, message, counted)
    return counted


def delivered(operation: str, messages: list[bytes]) -> int:
    """A stream's content deltas as the passthrough counts what it sends on (providers/
    base.py: a marker a message, less the opening; `gateway.sse.delivered_counting`)."""
    marker, exact = delivered_counting(operation, messages[0])
    total = sum(message.count(marker) if marker is not None else exact(message)
                for message in messages)
    return total - opening_excess(operation, messages[0], marker)


def events_of(stream: bytes) -> list[bytes]:
    return [block + b"\n\n" for block in stream.split(b"\n\n")[:-1]]


def every_way(operation: str, stream: bytes) -> set[int]:
    """The count of a stream sent whole, an event a message, and with each counter alone."""
    fast, exact = content_counters(operation)
    events = events_of(stream)
    return {count(operation, [stream]), count(operation, events), exact(stream),
            sum(map(exact, events)), fast(stream) if events else 0}


STREAMS = {
    "chat": lambda reply: (OPENAI_CHAT, b"".join(item for item, _ in openai_chat(reply))),
    "anthropic": lambda reply: (ANTHROPIC_MESSAGES, b"".join(i for i, _ in anthropic(reply))),
    "responses": lambda reply: (OPENAI_RESPONSES, b"".join(i for i, _ in responses(reply))),
    "anthropic->chat": lambda reply: (OPENAI_CHAT, translated(
        AnthropicSource(MessagesStreamToChat("gpt-mock", True)), OpenAIChunkSink(),
        anthropic(reply))),
    "gemini->chat": lambda reply: (OPENAI_CHAT, translated(
        GeminiSource(GeminiStreamToChat("gpt-mock", True)), OpenAIChunkSink(), gemini(reply))),
    "chat->anthropic": lambda reply: (ANTHROPIC_MESSAGES, translated(
        OpenAIChunkSource(), AnthropicEventSink(ChatStreamToMessages("claude-mock")),
        openai_chat(reply))),
    "gemini->anthropic": lambda reply: (ANTHROPIC_MESSAGES, translated(
        GeminiSource(GeminiStreamToChat("claude-mock", True)),
        AnthropicEventSink(ChatStreamToMessages("claude-mock")), gemini(reply))),
}


@pytest.mark.parametrize("reply", [TEXT, TOOL], ids=["text", "tool"])
@pytest.mark.parametrize("name", sorted(STREAMS))
def test_a_stream_counts_its_content_events_only(name: str, reply: Reply) -> None:
    operation, stream = STREAMS[name](reply)
    # (Gemini sends a call whole, one content event; the opening and closing events, the
    # usage chunk and [DONE], message_start, content_block_start/stop, message_delta,
    # message_stop and the Responses lifecycle events count nothing.)
    # (At 3 characters an event: the text in 10, the arguments in 9.)
    expected = 10 if reply is TEXT else 1 if name.startswith("gemini") else 9
    assert every_way(operation, stream) == {expected}


@pytest.mark.parametrize("reply", [TEXT, TOOL], ids=["text", "tool"])
def test_a_chat_stream_written_with_spaces_is_counted_exactly(reply: Reply) -> None:
    """The passthrough's marker is compact JSON's; a provider that writes `"delta": {` (as
    Python's json.dumps does) is counted by the exact count, from its first event on."""
    spaced = b"".join(
        b"data: " + (json.dumps(json.loads(event[6:])).encode() if event[6:7] == b"{"
                     else event[6:].strip()) + b"\n\n"
        for event in (e.strip() for e in events_of(STREAMS["chat"](reply)[1])))
    assert b'"delta": {' in spaced
    expected = 10 if reply is TEXT else 9
    assert delivered(OPENAI_CHAT, [spaced]) == expected
    assert delivered(OPENAI_CHAT, events_of(spaced)) == expected


@pytest.mark.parametrize("reply", [TEXT, TOOL], ids=["text", "tool"])
@pytest.mark.parametrize("name", sorted(STREAMS))
def test_the_passthrough_counts_a_streams_content_events_with_a_marker(
        name: str, reply: Reply) -> None:
    """What providers/base.py counts as it sends a stream on, whole or an event a message:
    the content events, and a tool call's opening chunk (its name, empty arguments) where it
    is not the stream's first event (an Anthropic tool_use block translated to chat: OpenAI
    opens a call in its first chunk)."""
    operation, stream = STREAMS[name](reply)
    expected = 10 if reply is TEXT else 1 if name.startswith("gemini") else 9
    if name == "anthropic->chat" and reply is TOOL:
        expected += 1
    assert delivered(operation, [stream]) == delivered(operation, events_of(stream)) == expected


def test_the_mocks_content_events_are_what_is_counted() -> None:
    for items, operation in ((openai_chat(TEXT, n=2), OPENAI_CHAT),
                             (anthropic(TEXT), ANTHROPIC_MESSAGES),
                             (responses(TOOL), OPENAI_RESPONSES)):
        for item, content in items:
            assert every_way(operation, item) == {int(content)}


def test_a_legacy_completion_counts_its_texts_not_the_empty_last_one() -> None:
    meta = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m"}
    items = _completion_chunks(meta, [TEXT, TEXT], [TEXT.text or "", "ab"], 2, 3, None)
    stream = b"".join(item for item, _ in items)
    assert every_way(OPENAI_COMPLETIONS, stream) == {2 * (10 + 1)}  # (2 prompts, 2 choices)


@pytest.mark.parametrize("delta,content", [
    (b'{"role":"assistant","content":"","refusal":null}', 0),  # OpenAI's opening
    (b'{"role":"assistant"}', 0),  # (an older opening, without a content field)
    ((b'{"role":"assistant","content":null,"tool_calls":[{"index":0,"id":"call_1","type":'
      b'"function","function":{"name":"f","arguments":""}}],"refusal":null}'), 0),
    (b"{}", 0),
    (b'{"content":""}', 0),
    (b'{"content":"x"}', 1),
    (b'{"role":"assistant","content":"Hi"}', 1),  # (Ollama sends the role with each)
    (b'{"refusal":"I can\'t"}', 1),
    (b'{"tool_calls":[{"index":0,"function":{"arguments":"{\\"a"}}]}', 1),
    (b'{"content":null,"reasoning_content":"Hmm"}', 1),  # DeepSeek
    (b'{"role":"assistant","content":"","reasoning":"Hmm"}', 1),  # OpenRouter
    (b'{"content":"\\"delta\\":{\\"content\\":\\"x\\"}"}', 1),  # (the keys' bytes as text)
])
def test_a_chat_delta_counts_when_it_carries_output(delta: bytes, content: int) -> None:
    first = b'data: {"choices":[{"index":0,"delta":{"content":"a"}}]}\n\n'
    chunk = b'data: {"choices":[{"index":0,"delta":' + delta + b',"finish_reason":null}]}\n\n'
    assert count(OPENAI_CHAT, [chunk]) == content
    # (Once content has gone out, the fast count takes a delta without an empty string for
    # content: an opening without one, which comes first, would be.)
    assert count(OPENAI_CHAT, [first, chunk]) == 1 + content + (delta == b'{"role":"assistant"}')
    spaced = chunk.replace(b'":', b'": ')  # (JSON written with spaces: Python's json.dumps)
    assert count(OPENAI_CHAT, [spaced]) == content


@pytest.mark.parametrize("delta,content", [
    (b'{"type":"text_delta","text":"Hi"}', 1),
    (b'{"type":"thinking_delta","thinking":"Hmm"}', 1),
    (b'{"type":"input_json_delta","partial_json":""}', 0),  # (a tool's first, always empty)
    (b'{"type":"input_json_delta","partial_json":"{\\"a"}', 1),
    (b'{"type":"signature_delta","signature":"EqQBCgIYAhIM"}', 0),
    (b'{"type":"citations_delta","citation":{"type":"char_location","cited_text":"a"}}', 0),
])
def test_an_anthropic_delta_counts_when_it_carries_output(delta: bytes, content: int) -> None:
    event = (b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
             b'"delta":' + delta + b'}\n\n')
    stop = (b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":'
            b'"end_turn","stop_sequence":null},"usage":{"output_tokens":5}}\n\n')
    assert count(ANTHROPIC_MESSAGES, [event + stop]) == content
    assert count(ANTHROPIC_MESSAGES, [event.replace(b'":', b'": ') + stop]) == content
