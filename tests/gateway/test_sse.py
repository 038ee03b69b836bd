"""The SSE parser and the passthrough codec, without ASGI or sockets."""
from __future__ import annotations

import orjson

from gateway.sse import SSEParser, split_complete_events
from providers.openai import _CHAT_END, _chat_usage
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


def test_the_usual_event_shapes_read_as_the_general_rules_read_them() -> None:
    """One `data:` line, and `event:` then one `data:` line, are read without splitting
    lines; the pairs are those the WHATWG rules give (names with colons, empty data, no
    space after the colon, several data lines, comments)."""
    cases = {
        b"data: {}": (None, "{}"),
        b"data: ": (None, ""),
        b"data:  two spaces": (None, " two spaces"),
        b"data:no-space": (None, "no-space"),
        b"event: a:b\ndata: x": ("a:b", "x"),
        b"event: ping\ndata: ": ("ping", ""),
        b"event:tight\ndata: x": ("tight", "x"),
        b"event: two\ndata: a\ndata: b": ("two", "a\nb"),
        b"event: e\n: comment\ndata: x": ("e", "x"),
        b"data: caf\xc3\xa9 \xff": (None, "caf\u00e9 \ufffd"),
        b"event: only": ("only", ""),
    }
    for block, pair in cases.items():
        assert SSEParser().feed(block + b"\n\n") == [pair], block


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


def test_parser_keeps_a_crlf_split_between_reads_together() -> None:
    parser = SSEParser()
    assert parser.feed(b"event: content_block_delta\r") == []
    assert parser.feed(b'\ndata: {"a":1}\r\n\r\n') == [("content_block_delta", '{"a":1}')]


def test_passthrough_reads_crlf_streams_without_losing_events() -> None:
    finish = (b'data: {"id":"1","choices":[{"index":0,"delta":{},"finish_reason":"stop"}],'
              b'"usage":null}\n\n')
    crlf = (CHUNK + finish + USAGE + DONE).replace(b"\n", b"\r\n")
    codec = PassthroughCodec(_chat_usage, chat_chunk_has_content, drop_usage_event=True)
    out = codec.feed(crlf[:50]) + codec.feed(crlf[50:]) + codec.finish()
    assert out == CHUNK + finish + DONE
    assert codec.usage is not None and codec.usage.input_tokens == 3


def test_an_unreadable_event_is_a_stream_error_not_a_crash() -> None:
    codec = PassthroughCodec(_chat_usage, chat_chunk_has_content)
    codec.feed(CHUNK)
    try:
        codec.feed(b'data: {"usage":{"prompt_tokens": oops}}\n\n')
    except StreamError as exc:
        assert exc.error_type == "bad_response"
    else:
        raise AssertionError("no StreamError")


def test_error_after_content_in_the_same_read_keeps_the_content() -> None:
    codec = PassthroughCodec(_chat_usage, chat_chunk_has_content)
    error = b'data: {"error":{"type":"server_error","message":"boom"}}\n\n'
    assert codec.feed(CHUNK + error) == CHUNK
    assert codec.error is not None and codec.error.message == "boom"


def test_error_before_any_output_raises_at_once() -> None:
    role = b'data: {"id":"1","choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'
    codec = PassthroughCodec(_chat_usage, chat_chunk_has_content)
    assert codec.feed(role) == b""  # the preamble is held back
    try:
        codec.feed(b'data: {"error":{"type":"server_error","message":"boom"}}\n\n')
    except StreamError as exc:
        assert exc.message == "boom"
    else:
        raise AssertionError("no StreamError")


def test_a_stream_that_ends_without_its_final_event_is_an_error_at_the_end() -> None:
    """Checked once, at the end: a [DONE] cut across reads is found, one in the text is not."""
    stream = CHUNK * 2 + USAGE + DONE
    codec = PassthroughCodec(_chat_usage, chat_chunk_has_content, end_markers=(b"[DONE]\n\n",))
    out = b"".join(codec.feed(stream[i:i + 5]) for i in range(0, len(stream), 5))
    assert out + codec.finish() == stream and codec.error is None
    mention = b'data: {"id":"1","choices":[{"index":0,"delta":{"content":"[DONE]"}}]}\n\n'
    codec = PassthroughCodec(_chat_usage, chat_chunk_has_content, end_markers=(b"[DONE]\n\n",),
                             final_event="[DONE]")
    assert codec.feed(CHUNK + mention) == CHUNK + mention
    try:
        codec.finish()
    except StreamError as exc:
        assert (exc.error_type, exc.message) == ("incomplete_stream",
                                                 "the stream ended before its [DONE]")
    else:
        raise AssertionError("no StreamError")
    # The last events without their blank line: delivered, the error left for after them.
    codec = PassthroughCodec(_chat_usage, chat_chunk_has_content, end_markers=(b"[DONE]\n\n",))
    assert codec.feed(CHUNK + CHUNK[:-2]) == CHUNK
    assert codec.finish() == CHUNK
    assert codec.error is not None and codec.error.error_type == "incomplete_stream"


def test_a_stream_cut_in_its_preamble_raises_and_delivers_nothing() -> None:
    role = b'data: {"id":"1","choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'
    codec = PassthroughCodec(_chat_usage, chat_chunk_has_content, end_markers=(b"[DONE]\n\n",))
    assert codec.feed(role) == b""
    try:
        codec.finish()
    except StreamError as exc:
        assert (exc.error_type, exc.from_provider) == ("incomplete_stream", False)
    else:
        raise AssertionError("no StreamError")
    # An empty stream is left to the caller (the adapter's "empty_stream").
    assert PassthroughCodec(_chat_usage, chat_chunk_has_content,
                            end_markers=(b"[DONE]\n\n",)).finish() == b""


def _chat_codec() -> PassthroughCodec:
    from providers.openai import _CHAT_END  # (as the OpenAI adapter builds a chat stream's)

    return PassthroughCodec(_chat_usage, chat_chunk_has_content, end_markers=_CHAT_END,
                            final_event="[DONE]")


def _verdict(codec: PassthroughCodec, reads: list[bytes]) -> StreamError | None:
    try:
        for read in reads:
            codec.feed(read)
        codec.finish()
    except StreamError as exc:
        return exc
    return codec.error


FINISH = b'data: {"id":"1","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'


def test_the_end_of_a_chat_stream_may_be_a_read_before_the_last() -> None:
    # No [DONE] (some servers), the usage chunk in a read of its own: the finish is the end.
    assert _verdict(_chat_codec(), [CHUNK, FINISH, USAGE]) is None
    # Something complete after the end, in a later read (a keep-alive comment, a blank line).
    for after in (b": keep-alive\n\n", b"\n\n"):
        assert _verdict(_chat_codec(), [CHUNK + FINISH + USAGE + DONE, after]) is None


def test_done_in_the_answers_text_is_not_the_end() -> None:
    said = b'data: {"id":"1","choices":[{"index":0,"delta":{"content":"Reply [DONE] when"}}]}\n\n'
    error = _verdict(_chat_codec(), [CHUNK, said])
    assert error is not None and error.error_type == "incomplete_stream"


def test_a_chunk_carrying_only_reasoning_or_thinking_blocks_is_output() -> None:
    # (the first-byte timeout waits for output: a reasoning model's first is its reasoning,
    # and an OpenAI-compatible server in front of Claude may open with a redacted block)
    def chunk(delta: dict[str, object]) -> dict[str, object]:
        return {"choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
    assert not chat_chunk_has_content(chunk({"role": "assistant", "content": ""}))
    for delta in ({"reasoning_content": "Let me"}, {"reasoning": "Let me"},
                  {"thinking_blocks": [{"type": "redacted_thinking", "data": "EmwK"}]}):
        assert chat_chunk_has_content(chunk(delta)), delta


def finish_error(codec: PassthroughCodec) -> StreamError | None:
    """The error `finish` raises or leaves in `codec.error`."""
    try:
        codec.finish()
    except StreamError as exc:
        return exc
    return codec.error


def test_a_json_answer_to_a_stream_request_is_an_incomplete_stream() -> None:
    # (a server that ignores `stream`: its answer holds `"finish_reason":"`, an end marker,
    # in no event; the body went out as a stream without any)
    answer = orjson.dumps({"id": "1", "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "ok"},
         "finish_reason": "stop"}]})
    codec = PassthroughCodec(_chat_usage, chat_chunk_has_content, end_markers=_CHAT_END)
    assert codec.feed(answer) == b""
    error = finish_error(codec)
    assert error is not None and error.error_type == "incomplete_stream"
