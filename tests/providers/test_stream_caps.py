"""The bounds on what a stream holds back: an event that never ends (`MAX_EVENT_BYTES`) and a
preamble that never turns into output (`MAX_PREAMBLE_BYTES`) fail the stream as a broken
upstream answer (`bad_response`), where they grew a buffer, re-searched at every read, until
the stream's total time ran out. And a normal stream read in pieces cut anywhere still gives
the bytes it gives read whole.

The codecs without ASGI or sockets, fed the way the adapter feeds them; then the same endless
event through a gateway from a scripted upstream (`tests.mock_providers.scripted`), to the
official SDK.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import orjson
import pytest

from gateway import create_app
from gateway.sse import MAX_EVENT_BYTES, EventTooLong, SSEParser
from providers.streams import (
    MAX_PREAMBLE_BYTES,
    OpenAIChunkSink,
    OpenAIChunkSource,
    PassthroughCodec,
    StreamCodec,
    StreamError,
    TranslatingCodec,
    chat_chunk_has_content,
)
from tests.harness import ThreadedServer, config_head, openai_client, write_config
from tests.mock_providers.scripted import Scripted, ScriptedUpstream

MIB = 1024 * 1024
OPENING = b'data: {"x":"'  # an event whose string never ends
ENDLESS = b"a" * MIB


def chunk(delta: dict[str, Any], **more: Any) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
            "model": "gpt-4o-mini",
            "choices": [{"index": 0, "delta": delta, "finish_reason": None}], **more}


def data(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


CONTENT = data(chunk({"role": "assistant", "content": "Hi"}))


def passthrough() -> PassthroughCodec:
    return PassthroughCodec(lambda payload, usage: usage, chat_chunk_has_content)


def translating() -> TranslatingCodec:
    return TranslatingCodec(OpenAIChunkSource(), OpenAIChunkSink())


CODECS = {"passthrough": passthrough, "translating": translating}


def reads_until_error(codec: StreamCodec, reads: Iterator[bytes], limit: int) -> tuple[int,
                                                                                     StreamError]:
    """(how many reads were fed, the error the last one raised); fails after `limit` reads."""
    for count, read in enumerate(reads, 1):
        try:
            codec.feed(read)
        except StreamError as exc:
            return count, exc
        assert count < limit, "the stream never failed"
    raise AssertionError("ran out of reads")


def endless_event() -> Iterator[bytes]:
    yield OPENING
    while True:
        yield ENDLESS


@pytest.mark.parametrize("make", CODECS.values(), ids=CODECS.keys())
def test_an_event_that_never_ends_fails_the_stream_once_past_the_cap(make: Any) -> None:
    codec = make()
    assert codec.feed(CONTENT)  # (output started: the error goes in-band)
    count, error = reads_until_error(codec, endless_event(), MAX_EVENT_BYTES // MIB + 3)
    assert count == MAX_EVENT_BYTES // MIB + 1  # the opening, then the read past the cap
    assert (error.error_type, error.from_provider) == ("bad_response", False)
    assert error.message == f"an event went past {MAX_EVENT_BYTES} bytes without its end"


@pytest.mark.parametrize("make", CODECS.values(), ids=CODECS.keys())
def test_one_read_past_the_cap_without_an_events_end_fails_the_stream(make: Any) -> None:
    with pytest.raises(StreamError, match="without its end"):
        make().feed(CONTENT + OPENING + b"a" * MAX_EVENT_BYTES)


@pytest.mark.parametrize("make", CODECS.values(), ids=CODECS.keys())
def test_an_event_just_under_the_cap_is_read(make: Any) -> None:
    text = "b" * (MAX_EVENT_BYTES - 200)
    event = data(chunk({"content": text}))
    assert len(event) < MAX_EVENT_BYTES
    codec = make()
    out = codec.feed(CONTENT)
    for start in range(0, len(event), MIB):
        out += codec.feed(event[start:start + MIB])
    assert out.endswith(b'"content":"' + text.encode() + b'"},"finish_reason":null}]}\n\n')


def endless_preamble() -> Iterator[bytes]:
    role_only = data(chunk({"role": "assistant"}, padding="p" * MIB))
    while True:
        yield role_only


@pytest.mark.parametrize("make", CODECS.values(), ids=CODECS.keys())
def test_a_preamble_that_never_turns_into_output_fails_the_stream_past_the_cap(
        make: Any) -> None:
    count, error = reads_until_error(make(), endless_preamble(), MAX_PREAMBLE_BYTES // MIB + 2)
    assert MAX_PREAMBLE_BYTES // MIB - 1 <= count <= MAX_PREAMBLE_BYTES // MIB + 1
    assert (error.error_type, error.from_provider) == ("bad_response", False)
    assert error.message == (f"the stream sent {MAX_PREAMBLE_BYTES} bytes of events without "
                             "any output")


def test_the_sse_parser_refuses_an_event_past_its_cap() -> None:
    parser = SSEParser(max_event_bytes=1000)
    assert parser.feed(b"event: x\ndata: " + b"a" * 900) == []
    assert parser.feed(b"a" * 85) == []  # (1000 bytes: at it)
    with pytest.raises(EventTooLong):
        parser.feed(b"a")
    assert parser.feed(b"data: next\n\n") == [(None, "next")]  # (the long event dropped)


# A stream with each shape of event the providers send (one `data:` line, `event:` then
# `data:`, several `data:` lines, a comment, `[DONE]`), CRLF line ends in the second.
STREAM = (b": keep-alive\n\n" + CONTENT + data(chunk({"content": " there"}))
          + b'event: message\ndata: {"choices":[{"index":0,"delta":{"content":"!"},'
          + b'"finish_reason":"stop"}],\ndata: "usage":{"prompt_tokens":1,'
          + b'"completion_tokens":2}}\n\n'
          + b"data: [DONE]\n\n")
STREAMS = {"lf": STREAM, "crlf": STREAM.replace(b"\n", b"\r\n")}


def read_passthrough(reads: list[bytes]) -> bytes:
    codec = passthrough()
    return b"".join(codec.feed(read) for read in reads) + codec.finish()


def read_parser(reads: list[bytes]) -> list[tuple[str | None, str]]:
    parser = SSEParser()
    return [event for read in reads for event in parser.feed(read)] + parser.flush()


@pytest.mark.parametrize("stream", STREAMS.values(), ids=STREAMS.keys())
def test_a_stream_cut_anywhere_reads_as_it_does_whole(stream: bytes) -> None:
    whole_out, whole_events = read_passthrough([stream]), read_parser([stream])
    assert whole_out == STREAM  # (LF line ends)
    assert len(whole_events) == 4
    bytewise = [stream[at:at + 1] for at in range(len(stream))]
    assert read_passthrough(bytewise) == whole_out
    assert read_parser(bytewise) == whole_events
    for at in range(len(stream) + 1):
        for second in (at, min(at + 1, len(stream)), min(at + 2, len(stream))):
            reads = [stream[:at], stream[at:second], stream[second:]]
            assert read_passthrough(reads) == whole_out, (at, second)
            assert read_parser(reads) == whole_events, (at, second)


# -- through a gateway ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def upstream() -> Iterator[ScriptedUpstream]:
    with ScriptedUpstream() as server:
        yield server


@pytest.fixture(scope="module")
def gateway(upstream: ScriptedUpstream,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedServer]:
    text = f'''{config_head()}
providers = {{
    "oai": Provider("openai", base_url="{upstream.url}/v1", api_key_env=KEY, timeouts=fast),
}}
models = {{"gpt": [Deployment("oai", "gpt-4o-mini", price=PRICE)]}}
'''
    with ThreadedServer(create_app(write_config(tmp_path_factory.mktemp("caps"), text))) as server:
        yield server


ASK = [{"role": "user", "content": "hello"}]
PAST_THE_CAP = [ENDLESS] * (MAX_EVENT_BYTES // MIB + 1)


def test_an_endless_event_after_output_ends_the_stream_with_an_error_event(
        gateway: ThreadedServer, upstream: ScriptedUpstream) -> None:
    upstream.queue(Scripted.stream(chunk({"role": "assistant", "content": "Hi"}),
                                   OPENING, *PAST_THE_CAP, pause_s=0))
    stream = openai_client(gateway).chat.completions.create(model="gpt", messages=ASK,
                                                            stream=True)
    texts = []
    with pytest.raises(openai.APIError, match="without its end") as failed:
        for part in stream:
            texts += [choice.delta.content for choice in part.choices]
    assert texts == ["Hi"]
    assert not isinstance(failed.value, openai.APIStatusError)  # (in-band: the 200 stands)


def test_an_endless_event_before_output_is_a_502(gateway: ThreadedServer,
                                                   upstream: ScriptedUpstream) -> None:
    upstream.queue(Scripted.stream(OPENING, *PAST_THE_CAP, pause_s=0))
    with pytest.raises(openai.APIStatusError) as failed:
        list(openai_client(gateway).chat.completions.create(model="gpt", messages=ASK,
                                                           stream=True))
    assert failed.value.status_code == 502
    assert "sent a broken stream: an event went past" in failed.value.message
