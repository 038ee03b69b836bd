"""middleware.cache.collect: `collect_sse` (raw bytes, templates) gives what `collect_stream`
(every event read in full) gives, on streams built to break the templates' shortcut.

The streams' wire shapes (OpenAI chunks with `obfuscation` pads, tool calls, completions;
Anthropic events) follow the mock providers and tests/middleware/test_cache_replay.py; here
they are varied at random: texts with quotes, backslashes, the keys' own bytes, non-ASCII
written raw or escaped, envelopes whose falsy values change, a `role` of null, other writers'
JSON (spaces, escaped non-ASCII, keys twice), CRLF, comments, events split over `data:` lines,
bytes that are not UTF-8, unfinished and failed streams.
"""
from __future__ import annotations

import json
import random
from typing import Any

import orjson
import pytest

from gateway.sse import SSEParser
from middleware.cache.collect import (
    RUN_BATCH,
    _string,
    _strings,
    _Template,
    collect_sse,
    collect_stream,
)

JSON = dict[str, Any]
Event = tuple[str | None, JSON | str]

# Pieces of text that look like the JSON around them, or need escaping.
TRICKY = ['"', "\\", '\\"', '"content":"', '"},"logprobs":null', "}]}", "\n", "\r\n", "\t",
          "é", "日本", "\u2028", "😀", "\x00", "/", "\\u0041", "sluicegate-text", "data: ",
          "\x00sluicegate-text", ",", " ", ""]
WORDS = ["Hello", " world", "!", " The", " answer", " is", " 42", ".", " Paris", " ok"]


def text(rng: random.Random) -> str:
    return "".join(rng.choice(TRICKY if rng.random() < 0.3 else WORDS)
                   for _ in range(rng.randint(0, 4)))


def write_json(rng: random.Random, value: JSON, odd: float) -> bytes:
    """How some writer puts an event's JSON on the wire (orjson's compact form mostly)."""
    if rng.random() >= odd:
        return orjson.dumps(value)
    style = rng.randrange(4)
    if style == 0:
        return json.dumps(value, ensure_ascii=True, separators=(",", ":")).encode()
    if style == 1:
        return json.dumps(value, ensure_ascii=False).encode()  # ", " and ": "
    if style == 2:  # a key twice: the last one counts
        first = next(iter(value), None)
        if first is None:
            return orjson.dumps(value)
        return b'{"%s":"shadowed",' % first.encode() + orjson.dumps(value)[1:]
    return orjson.dumps(value) + b"\xff" if rng.random() < 0.5 else b"\xfe" + orjson.dumps(value)


def render(rng: random.Random, events: list[Event], odd: float) -> bytes:
    crlf = rng.random() < 0.1
    out = []
    for name, data in events:
        payload = data.encode() if isinstance(data, str) else write_json(rng, data, odd)
        lines = [b"event: " + name.encode()] if name else []
        if rng.random() < odd / 2 and len(payload) > 2:  # one event over two data: lines
            cut = rng.randrange(1, len(payload))
            lines += [b"data: " + payload[:cut], b"data:" + payload[cut:]]
        else:
            lines.append(b"data: " + payload)
        if rng.random() < odd / 4:
            lines.insert(0, b": keep-alive")
        block = b"\n".join(lines) + b"\n\n"
        if rng.random() < odd / 4:
            block += b"\n"
        out.append(block)
    raw = b"".join(out)
    return raw.replace(b"\n", b"\r\n") if crlf else raw


def openai_events(rng: random.Random, completions: bool) -> list[Event]:
    head: JSON = {"id": "chatcmpl-fz", "object": "text_completion" if completions else
                  "chat.completion.chunk", "created": 1763840000, "model": "gpt-4o-mini"}
    if rng.random() < 0.5:
        head["system_fingerprint"] = rng.choice(["fp_1", None, ""])
    # Each stream has its own style (so that runs of events share their bytes), with
    # exceptions here and there.
    pad, usage_null, role_none = rng.random() < 0.6, rng.random() < 0.3, rng.random() < 0.15
    choices = rng.choice([1, 1, 1, 2])
    events: list[Event] = []

    def chunk(choice: JSON, **extra: Any) -> None:
        body = {**head, "choices": [choice], **extra}
        if pad and rng.random() < 0.95:
            body["obfuscation"] = "".join(rng.choice("aZ9") for _ in range(rng.randint(0, 6)))
        if usage_null != (rng.random() < 0.03):
            body["usage"] = None
        if rng.random() < 0.05:  # an envelope value changes mid-stream
            body["system_fingerprint"] = rng.choice(["fp_2", None, "", 0])
        events.append((None, body))

    for index in range(choices):
        if completions:
            chunk({"index": index, "text": "", "logprobs": None, "finish_reason": None})
        else:
            chunk({"index": index, "delta": {"role": "assistant", "content": ""},
                   "logprobs": None, "finish_reason": None})
    tool = not completions and rng.random() < 0.3
    repeat_call = rng.random() < 0.3  # some servers repeat a call's id and name every chunk
    filters = rng.random() < 0.2  # Azure's content_filter_results in every choice
    if tool:
        chunk({"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "call_1", "type":
               "function", "function": {"name": "f", "arguments": ""}}]},
               "logprobs": None, "finish_reason": None})
    for _ in range(rng.randint(0, 40)):
        index = rng.randrange(choices)
        value: Any = text(rng)
        if rng.random() < 0.02:
            value = rng.choice([7, None, ["x"], {"a": 1}])
        if completions:
            chunk({"index": index, "text": value, "logprobs": None, "finish_reason": None})
            continue
        call: JSON = {"index": 0, "function": {"arguments": value}}
        if repeat_call:
            call.update(id=rng.choice(["call_1", "call_1", "call_1", "call_2"]),
                        type="function")
            call["function"]["name"] = rng.choice(["f", "f", "f", "g"])
        delta: JSON = {"tool_calls": [call]} if tool and rng.random() < 0.5 else \
            {"content": value}
        roll = rng.random()
        if roll < 0.05:
            delta["role"] = "assistant"
        elif role_none != (roll < 0.08):
            delta["role"] = None
        elif roll < 0.15:
            delta["refusal"] = None
        choice = {"index": False if index == 0 and rng.random() < 0.05 else index,
                  "delta": delta, "logprobs": None, "finish_reason": None}
        if filters:
            choice["content_filter_results"] = rng.choice([{}, {"hate": {"filtered": False}}])
        if rng.random() < 0.03:
            choice["logprobs"] = {"content": [{"token": "x", "logprob": -0.5}]}
        chunk(choice)
        if rng.random() < 0.01:
            events.append((None, {"error": {"message": "boom", "type": "server_error"}}))
    for index in range(choices):
        if rng.random() < 0.97:
            chunk({"index": index, "delta": {}, "logprobs": None,
                   "finish_reason": "tool_calls" if tool and index == 0 else "stop"})
    if rng.random() < 0.7:
        events.append((None, {**head, "choices": [], "usage": {
            "prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}}))
    if rng.random() < 0.95:
        events.append((None, "[DONE]"))
    return events


def anthropic_events(rng: random.Random) -> list[Event]:
    start = {"type": "message_start", "message": {
        "id": "msg_fz", "type": "message", "role": "assistant", "model": "claude", "content": [],
        "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 3,
                                                              "output_tokens": 1}}}
    events: list[Event] = [("message_start", start)]
    for index in range(rng.randint(0, 3)):
        kind = rng.choice(["text", "text", "thinking", "tool_use"])
        block: JSON = {"type": kind, kind if kind != "tool_use" else "input":
                       "" if kind != "tool_use" else {}}
        if kind == "tool_use":
            block.update(id="toolu_1", name="f")
        events.append(("content_block_start", {"type": "content_block_start", "index": index,
                                               "content_block": block}))
        if index == 1 and rng.random() < 0.05:
            events.append(("message_start", start))  # a second start: a new message
        for _ in range(rng.randint(0, 30)):
            piece: Any = text(rng)
            if rng.random() < 0.02:
                piece = rng.choice([7, None])
            delta = {"type": "input_json_delta", "partial_json": rng.choice(["", " "])} \
                if kind == "tool_use" else {"type": f"{kind}_delta", kind: piece}
            events.append(("content_block_delta", {"type": "content_block_delta",
                                                   "index": index, "delta": delta}))
            if rng.random() < 0.05:
                events.append(("ping", {"type": "ping"}))
        if kind == "thinking":
            events.append(("content_block_delta", {"type": "content_block_delta", "index":
                           index, "delta": {"type": "signature_delta", "signature": "sig"}}))
        if rng.random() < 0.97:
            events.append(("content_block_stop", {"type": "content_block_stop",
                                                  "index": index}))
    if rng.random() < 0.02:
        events.append(("error", {"type": "error", "error": {"type": "overloaded_error",
                                                            "message": "Overloaded"}}))
    events.append(("message_delta", {"type": "message_delta", "delta": {
        "stop_reason": "end_turn", "stop_sequence": None}, "usage": {"output_tokens": 9}}))
    if rng.random() < 0.95:
        events.append(("message_stop", {"type": "message_stop"}))
    return events


KINDS = {
    "chat": ("openai", "openai.chat", lambda rng: openai_events(rng, False)),
    "completions": ("openai", "openai.completions", lambda rng: openai_events(rng, True)),
    "anthropic": ("anthropic", "anthropic.messages", anthropic_events),
}


def streams(kind: str, seed: int, count: int, odd: float) -> list[bytes]:
    rng = random.Random(f"{kind}-{seed}")
    make = KINDS[kind][2]
    return [render(rng, make(rng), odd) for _ in range(count)]


def by_events(raw: bytes, api_format: str, operation: str) -> JSON | None:
    return collect_stream(SSEParser().feed(raw + b"\n\n"), api_format, operation)


@pytest.mark.parametrize("odd", [0.0, 0.05, 0.3], ids=["compact", "few-odd", "many-odd"])
@pytest.mark.parametrize("kind", KINDS)
def test_collect_sse_gives_what_reading_every_event_gives(kind: str, odd: float) -> None:
    api_format, operation, _ = KINDS[kind]
    answers = 0
    for raw in streams(kind, 1, 300, odd):
        expected = by_events(raw, api_format, operation)
        # (as bytes: `==` takes 0 for False, and the stored answer is the bytes)
        assert orjson.dumps(collect_sse(raw, api_format, operation)) == orjson.dumps(expected), raw
        answers += expected is not None
    # (not all refused: most streams complete cleanly, fewer when many events are odd)
    assert answers >= (10 if odd > 0.1 else 60)


# -- templates ---------------------------------------------------------------------------------

CHUNK = {"id": "chatcmpl-t", "object": "chat.completion.chunk", "created": 1, "model": "m",
         "choices": [{"index": 0, "delta": {"content": "Hello"}, "logprobs": None,
                      "finish_reason": None}], "obfuscation": "aZ9"}
CONTENT = ("choices", 0, "delta", "content")


def template(block: bytes, paths: list[tuple[str | int, ...]]) -> tuple[_Template | None,
                                                                        list[str]]:
    added: list[str] = []
    event = (None, block[6:].decode())
    return _Template.of(block, event, orjson.loads(block[6:]), paths, added.append), added


def with_content(value: Any, pad: str = "aZ9") -> bytes:
    chunk = {**CHUNK, "choices": [{**CHUNK["choices"][0], "delta": {"content": value}}],
             "obfuscation": pad}
    return b"data: " + orjson.dumps(chunk)


def read(made: _Template, block: bytes) -> str | None:
    """The text `made` takes from `block` alone, or None if `block` is not its event."""
    found, index = made.run([block], 0)
    assert index == (0 if found is None else 1)
    return found


def test_a_template_reads_the_text_of_events_that_differ_only_in_their_strings() -> None:
    made, _ = template(with_content("Hello"), [CONTENT, ("obfuscation",)])
    assert made is not None
    for value in ["", '"},"x":1', "\\", "é😀", "\x00sluicegate-text", "a\nb"]:
        assert read(made, with_content(value, pad="different")) == value
    assert read(made, with_content("x", pad="")) == "x"
    assert read(made, with_content("x", pad='a-"b\\')) == "x"  # (not letters and digits)


def test_a_template_refuses_events_that_are_not_its_own() -> None:
    made, _ = template(with_content("Hello"), [CONTENT, ("obfuscation",)])
    assert made is not None
    block = with_content("Hi")
    assert read(made, block.replace(b'"created":1', b'"created":2')) is None
    assert read(made, with_content(7)) is None
    assert read(made, with_content(None)) is None
    assert read(made, block.replace(b'"Hi"', b'"Hi","content":"x"')) is None
    assert read(made, block.replace(b'"Hi"', b'"H\xffi"')) is None  # not UTF-8: read in full
    assert read(made, block.replace(b'"aZ9"', b'7')) is None
    assert read(made, block.replace(b'"aZ9"', b'"a","b":"c"')) is None
    assert read(made, b"data: [DONE]") is None


# Bytes that can make a string token's insides end early, escape its closing quote, or
# look like the separators `_strings` puts between tokens.
TOKEN_BYTES = [b'"', b"\\", b",", b"[", b"]", b"a", b" ", b"\n", b"u", b"0", b"\xff", b'\\"',
               b'","', b"\\\\", b"\\u00e9", b"\\n"]


def test_a_run_of_tokens_decodes_as_each_token_alone_or_not_at_all() -> None:
    """`_strings` decodes a run's tokens in one parse: whenever it gives a text, it is what
    each token gives alone, joined (and each is a string); it may refuse a run whose tokens are
    all strings alone (a token ending in an escaped backslash), never accept one that is not."""
    rng = random.Random(7)
    accepted = refused_valid = 0
    for _ in range(20_000):
        tokens = [b'"' + b"".join(rng.choice(TOKEN_BYTES) for _ in range(rng.randint(0, 4)))
                  + b'"' for _ in range(rng.randint(1, 4))]
        alone = [_string(token) for token in tokens]
        together = _strings(tokens)
        if together is not None:
            accepted += 1
            assert None not in alone and together == "".join(alone)
        elif None not in alone:
            refused_valid += 1
    assert accepted > 2_000 and refused_valid < accepted  # (the check is not vacuous)
    assert _strings([b'"a\\"', b'","z"']) is None  # an escaped closing quote, made up for
    assert _strings([b'"a\\\\"', b'"b"']) is None  # (valid alone: refused, read one by one)
    assert _strings([b'"a","b"']) is None
    assert _strings([b'"x"', b'"y\\"z"']) == 'xy"z'
    # (found by a review's exhaustive search: as many values as tokens, one an array)
    assert _strings([b'"a",["', b'","', b'"],"a"']) is None


def test_a_run_of_template_events_adds_what_each_event_adds_in_turn() -> None:
    """`_Template.run` over blocks that are the template's events with random strings in
    the text's and the pad's places (some not its events at all) stops where reading each
    block alone would, and gives what each block before it gives alone, joined; also for
    runs longer than a batch, whose strings are decoded a batch at a time."""
    rng = random.Random(11)
    base = with_content("Hello")
    for paths in ([CONTENT], [CONTENT, ("obfuscation",)]):
        made, _ = template(base, paths)
        assert made is not None
        for trial in range(3_000):
            long = trial % 10 == 0
            blocks = []
            for _ in range(rng.randint(RUN_BATCH, 2 * RUN_BATCH + 12) if long
                           else rng.randint(1, 5)):
                odd = not long or rng.random() < 0.01
                inside = b"".join(rng.choice(TOKEN_BYTES if odd else [b"a", b"\\n", b" "])
                                  for _ in range(rng.randint(0, 3)))
                pad = b"".join(rng.choice([b"aZ", b"9", b"-", b'"', b""] if odd else [b"aZ"])
                               for _ in range(2))
                blocks.append(base.replace(b'"Hello"', b'"' + inside + b'"')
                              .replace(b'"aZ9"', b'"' + pad + b'"'))
            start = rng.randint(0, 1)
            texts, index = [], start
            while index < len(blocks) and read(made, blocks[index]) is not None:
                texts.append(read(made, blocks[index]))
                index += 1
            expected = ("".join(texts) if texts else None), index
            assert made.run(blocks, start) == expected


class Counted(list[bytes]):
    """Blocks that count how often they are read."""
    reads = 0

    def __getitem__(self, index: Any) -> Any:
        self.reads += 1
        return super().__getitem__(index)


def test_events_that_fit_the_template_but_fail_it_cost_each_a_bounded_read() -> None:
    """Template events alternating with events of the template's bytes that are not its
    events (a text cut in a UTF-8 character: read in full): reading the stream as
    `collect_sse` does reads each block a bounded number of times, not once for every
    template event before it (a review found the first version quadratic here)."""
    made, _ = template(with_content("Hello"), [CONTENT, ("obfuscation",)])
    assert made is not None
    good, cut = with_content("ab"), with_content("Hi").replace(b'"Hi"', b'"a\xe6"')
    blocks = Counted([good, cut] * 2_000)
    index, texts = 0, 0
    while index < len(blocks):
        text, index = made.run(blocks, index)
        if text is None:
            index += 1  # (read in full)
        else:
            assert text == "ab"
            texts += 1
    assert texts == 2_000
    # (reading on to the end of the stream from each template event: ~4,000,000 reads)
    assert blocks.reads <= (RUN_BATCH + 2) * len(blocks)


def test_no_template_where_the_writer_is_not_orjson_or_the_mark_is_in_the_text() -> None:
    spaced = b"data: " + json.dumps(CHUNK).encode()
    assert template(spaced, [CONTENT])[0] is None
    escaped = b"data: " + json.dumps({**CHUNK, "model": "é"}, separators=(",", ":")).encode()
    assert template(escaped, [CONTENT])[0] is None
    marked = with_content("Hello").replace(b'"m"', b'"\\u0000sluicegate-text"')
    assert template(marked, [CONTENT])[0] is None
    assert template(with_content("Hello"), [CONTENT])[0] is not None


def chat_chunk(delta: JSON, finish: str | None = None, **envelope: Any) -> bytes:
    return b"data: " + orjson.dumps({"id": "c", "object": "chat.completion.chunk", "created": 1,
                                     **envelope, "choices": [{"index": 0, "delta": delta,
                                     "logprobs": None, "finish_reason": finish}]}) + b"\n\n"


@pytest.mark.parametrize("case", ["falsy envelope value", "role null"])
def test_what_a_template_event_would_set_again_is_set_again(case: str) -> None:
    """A template event's bytes may set a value again that an event between two of them
    changed: an envelope key with a falsy value (taken by every chunk until one has a true
    one) or a `role` of null. Such events are read as a whole event would be."""
    if case == "role null":
        first, changed, again = ({"content": "a", "role": None}, {"content": "b", "role":
                                 "assistant"}, {"content": "c", "role": None})
        fingerprints: tuple[Any, Any] = (None, None)
    else:
        first, changed, again = {"content": "a"}, {"content": "b", "role": "assistant"}, \
            {"content": "c"}
        fingerprints = (None, "")
    raw = b"".join([
        chat_chunk({"role": "assistant", "content": ""}, system_fingerprint=fingerprints[0]),
        chat_chunk(first, system_fingerprint=fingerprints[0]),
        chat_chunk(changed, system_fingerprint=fingerprints[1]),
        chat_chunk(again, system_fingerprint=fingerprints[0]),
        chat_chunk({}, "stop"), b"data: [DONE]\n\n"])
    body = collect_sse(raw, "openai", "openai.chat")
    assert body == by_events(raw, "openai", "openai.chat")
    assert body is not None and body["system_fingerprint"] is None
    assert body["choices"][0]["message"] == {"role": None if case == "role null" else
                                             "assistant", "content": "abc"}


# Found by a review: each gave another answer than reading every event before the template's
# `add` read its event again, and before a string's place had to hold a string token alone.
REVIEW_CASES = {
    "a tool call's id and name changed between template events": (
        b'data: {"choices":[{"index":0,"delta":{"role":"assistant"}}]}\n\n'
        b'data: {"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"c1","type":"funct'
        b'ion","function":{"name":"f","arguments":"{"}}]}}]}\n\n'
        b'data: {"choices": [{"index":0,"delta":{"tool_calls":[{"index":0,"id":"c2","type":"func'
        b'tion","function":{"name":"g","arguments":"x"}}]}}]}\n\n'
        b'data: {"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"c1","type":"funct'
        b'ion","function":{"name":"f","arguments":"}"}}]}}]}\n\n'
        b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}]}\n\n'
        b"data: [DONE]\n\n"),
    "a newline after a text's string": (
        b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"a"}}]}\n\n'
        b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"b"\n}}]}\n\n'
        b'data: {"id":"c","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
        b"data: [DONE]\n\n"),
    "a space before an Anthropic text's string": (
        b'event: message_start\ndata: {"type":"message_start","message":{"id":"m","content":[],'
        b'"stop_reason":null}}\n\n'
        b'event: content_block_start\ndata: {"type":"content_block_start","index":0,'
        b'"content_block":{"type":"text","text":""}}\n\n'
        b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":'
        b'{"type":"text_delta","text":"a"}}\n\n'
        b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":'
        b'{"type":"text_delta","text": "b"}}\n\n'
        b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n'
        b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn"'
        b'}}\n\n'
        b'event: message_stop\ndata: {"type":"message_stop"}\n\n'),
    "a call's function replaced by a string": (
        b'data: {"choices":[{"index":0,"delta":{"role":"assistant"}}]}\n\n'
        b'data: {"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments'
        b'":"{"}}]}}]}\n\n'
        b'data: {"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":"zz"}]}}]}'
        b'\n\n'
        b'data: {"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments'
        b'":"}"}}]}}]}\n\n'
        b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}]}\n\n'
        b"data: [DONE]\n\n"),
    "a choice index of false, then 0": (
        b'data: {"choices":[{"index":false,"delta":{"content":"a"}}]}\n\n'
        b'data: {"choices": [{"index":0,"delta":{"content":"b"}}]}\n\n'
        b'data: {"choices":[{"index":false,"delta":{"content":"c"}}]}\n\n'
        b'data: {"choices":[{"delta":{},"finish_reason":"stop"}]}\n\n'
        b"data: [DONE]\n\n"),
}


@pytest.mark.parametrize("raw", REVIEW_CASES.values(), ids=REVIEW_CASES.keys())
def test_streams_a_review_built_collect_as_every_event_read_in_full(raw: bytes) -> None:
    api_format = "anthropic" if raw.startswith(b"event:") else "openai"
    operation = "anthropic.messages" if api_format == "anthropic" else "openai.chat"
    expected = by_events(raw, api_format, operation)
    assert orjson.dumps(collect_sse(raw, api_format, operation)) == orjson.dumps(expected)


def chat_chunks(*deltas: JSON) -> bytes:
    chunks = [{"id": "c1", "object": "chat.completion.chunk", "choices": [
        {"index": 0, "delta": delta, "finish_reason": None}]} for delta in deltas]
    chunks.append({"id": "c1", "object": "chat.completion.chunk", "choices": [
        {"index": 0, "delta": {}, "finish_reason": "stop"}]})
    return b"".join(b"data: " + orjson.dumps(chunk) + b"\n\n" for chunk in chunks) + \
        b"data: [DONE]\n\n"


def test_an_object_sent_in_several_deltas_makes_no_answer() -> None:
    """OpenAI's streamed audio sends its transcript and its data in pieces, each an `audio`
    object: the answer must hold the whole of each, and replacing one object by the next
    kept only the last piece (a silent answer, served to every later caller). Such a stream
    makes no answer (a miss); one object sent once is kept as it came."""
    audio = chat_chunks({"role": "assistant", "content": None},
                        {"audio": {"id": "audio_1", "transcript": "Hello "}},
                        {"audio": {"transcript": "world."}},
                        {"audio": {"data": "AAAA"}}, {"audio": {"data": "BBBB"}},
                        {"audio": {"expires_at": 123}})
    for raw in (audio, audio.replace(b"\n\n", b"\r\n\r\n")):
        assert collect_sse(raw, "openai", "openai.chat") is None
        assert by_events(raw, "openai", "openai.chat") is None
    once = chat_chunks({"role": "assistant", "content": "Hi"},
                       {"annotation": {"kind": "note", "text": "x"}})
    collected = collect_sse(once, "openai", "openai.chat")
    assert collected is not None
    assert collected["choices"][0]["message"] == {
        "role": "assistant", "content": "Hi", "annotation": {"kind": "note", "text": "x"}}
    # The same object in every chunk is no piece of anything: kept once.
    repeated = chat_chunks({"role": "assistant", "content": "Hi"}, {"extra": {"k": 1}},
                           {"content": "!", "extra": {"k": 1}}, {"extra": {"k": 1}})
    collected = collect_sse(repeated, "openai", "openai.chat")
    assert collected is not None
    assert collected["choices"][0]["message"] == {"role": "assistant", "content": "Hi!",
                                                  "extra": {"k": 1}}
    assert by_events(repeated, "openai", "openai.chat") == collected
