"""The SSE parser and the passthrough codec, without ASGI or sockets."""
from __future__ import annotations

import orjson

from gateway.sse import SSEParser, split_complete_events
from providers.openai import _chat_usage
from providers.streams import PassthroughCodec, StreamError, chat_chunk_has_content

CHUNK = b'data: {"id":"1","choices":[{"index":0,"delta":{"content":"hi"}}],"usage":null}\n\n'
USAGE = b'data: {"id":"1","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}\n\n'
DONE = b"data: [DONE]\n\n"


def test_parser_handles_split_events_names_comments_and_crlf() -> None:
    parser = SSEParser()
    assert parser.feed(b"event: message_start\r\ndata: {\"a\"") == []
    assert parser.feed(b":1}\r\n\r\n: a comment\n\ndata: x\ndata: y\n\n") == [
        ("message_start", '{"a":1}'), (None, "x\ny")]
    assert parser.feed(b"data: tail") == []
    assert parser.flush() == [(None, "tail")]


def test_split_complete_events_keeps_the_unfinished_tail() -> None:
    assert split_complete_events(CHUNK + b"data: {") == (CHUNK, b"data: {")
    assert split_complete_events(b"data: {") == (b"", b"data: {")


def test_passthrough_forwards_bytes_untouched_across_arbitrary_cuts() -> None:
    stream = CHUNK * 3 + USAGE + DONE
    codec = PassthroughCodec(_chat_usage, chat_chunk_has_content)
    out = b"".join(codec.feed(stream[i:i + 7]) for i in range(0, len(stream), 7)) + codec.finish()
    assert out == stream
    assert codec.usage is not None
    assert (codec.usage.input_tokens, codec.usage.output_tokens) == (3, 2)


def test_passthrough_drops_only_the_usage_chunk_the_client_did_not_ask_for() -> None:
    codec = PassthroughCodec(_chat_usage, chat_chunk_has_content, drop_usage_event=True)
    out = codec.feed(CHUNK + USAGE + DONE) + codec.finish()
    assert out == CHUNK + DONE
    assert codec.usage is not None and codec.usage.output_tokens == 2


def test_passthrough_raises_on_an_error_event() -> None:
    codec = PassthroughCodec(_chat_usage, chat_chunk_has_content)
    error = orjson.dumps({"error": {"type": "server_error", "message": "boom"}})
    try:
        codec.feed(b"data: " + error + b"\n\n")
    except StreamError as exc:
        assert (exc.error_type, exc.message) == ("server_error", "boom")
    else:
        raise AssertionError("no StreamError")


def test_content_mentioning_error_or_usage_is_not_mistaken() -> None:
    text = b'data: {"choices":[{"delta":{"content":"\\"error\\":{ and \\"usage\\":{"}}]}\n\n'
    codec = PassthroughCodec(_chat_usage, chat_chunk_has_content)
    assert codec.feed(text) == text
    assert codec.usage is None
