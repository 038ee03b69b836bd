"""Finished streams turned into stored answers: the reverse of middleware/cache/replay.py.

`collect_stream` reads the (event name, data) pairs gateway.sse's SSEParser gives;
`collect_sse` reads the raw bytes the client was sent and gives the same answer, faster.
Either is None for a stream that must not be cached: one that did not complete cleanly (no
`[DONE]` or `message_stop`, a choice without finish_reason, an error event), has an
unreadable event, or belongs to an operation without a stream form. Pure: no I/O, no clock.

Most events of a long answer are text deltas that differ from the delta before only in their
text (and, from OpenAI, in the random `obfuscation` pad of each chunk: stream_options.
include_obfuscation, on by default). `collect_sse` reads one such event in full, notes the
bytes around its strings (a `_Template`), and reads the next events that have exactly those
bytes around strings by decoding the strings alone (see `_Template`). An event that does not
fit is read in full, so every stream gives what `collect_stream` gives; the tests hold the
two to each other on streams built to break the shortcut.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import orjson

from gateway.context import ANTHROPIC_MESSAGES, OPENAI_CHAT, OPENAI_COMPLETIONS
from gateway.sse import parse_sse_block
from middleware.cache.replay import CACHED_USAGE_FLAG, CHUNK_ONLY

__all__ = ["collect_sse", "collect_stream"]

JSON = dict[str, Any]
SSEEvent = tuple[str | None, str]
_UNREADABLE = (ValueError, TypeError, LookupError, AttributeError)  # not a stream to rebuild


def collect_stream(events: Iterable[SSEEvent], api_format: str, operation: str
                   ) -> JSON | None:
    """The non-stream response a completed stream stands for, or None (module docstring).

    `events` are the (event name, data) pairs delivered to the client, as gateway.sse's
    SSEParser gives them."""
    make = _COLLECTORS.get((api_format, operation))
    if make is None:
        return None
    collector = make()
    try:
        for name, data in events:
            if collector.feed(name, data):
                return _finished(collector.result)
    except _UNREADABLE:
        return None
    return None


# At most this many events a stream are tried as templates (making one costs about a full
# read of an event; with n > 1 choices interleaved, each choice's events miss the other's).
MAX_TEMPLATES = 8


def collect_sse(raw: bytes, api_format: str, operation: str) -> JSON | None:
    """`collect_stream(SSEParser().feed(raw + b"\\n\\n"), ...)`, from the raw SSE bytes."""
    make = _COLLECTORS.get((api_format, operation))
    if make is None:
        return None
    collector = make()
    buffer = raw + b"\n\n"  # (what SSEParser does with these bytes, step by step)
    if b"\r" in buffer:
        buffer = buffer.replace(b"\r\n", b"\n")
    template: _Template | None = None
    made = 0
    blocks = buffer[:buffer.rfind(b"\n\n")].split(b"\n\n")
    count = len(blocks)
    index = 0
    try:
        while index < count:
            if template is not None:
                # The template's events from here on, added at once (as adding each in turn:
                # see _Template) before the next event is read in full.
                text, index = template.run(blocks, index)
                if text is not None:
                    template.add(text)
                    if index == count:
                        break
            block = blocks[index]
            index += 1
            event = parse_sse_block(block)
            if event is None:
                continue
            if collector.feed(*event):
                return _finished(collector.result)
            if made < MAX_TEMPLATES:
                shape = collector.shape(event[0])
                if shape is not None:
                    made += 1
                    template = _Template.of(block, event, collector.last, *shape) or template
    except _UNREADABLE:
        return None
    return None


def _finished(body: JSON | None) -> JSON | None:
    if body is None:
        return None
    _joined(body)
    if not isinstance(body.get("usage"), dict):
        return body
    # A stored answer is never marked: the flag is added when a hit is served.
    return {**body, "usage": {k: v for k, v in body["usage"].items() if k != CACHED_USAGE_FLAG}}


# -- templates ------------------------------------------------------------------------------------

Path = tuple[str | int, ...]
# An event a template may be made of: its strings' paths (the text's, then perhaps a pad's,
# which the collector ignores), and `add(text)`, which reads the event again with `text`.
Shape = tuple[list[Path], Callable[[str], None]]


class _Template:
    """The bytes of one event around the insides of its text's JSON string and, perhaps, a
    pad's: `head` (ending in a quote), a string's inside, [`between` (from quote to quote),
    the other string's inside,] `tail` (from a quote on).

    An event whose bytes are the same fixed parts around JSON string tokens (from quote to
    quote, the quotes in the fixed parts; each decoding alone to one string) is the
    template's event with other strings at those paths: a string token cannot change how
    the bytes around it parse (it holds no raw newline and no unescaped quote, so it also
    cannot be split at the wrong place). A pad is a string the collector ignores once it
    has one.

    `add(text)` reads the template's event again with `text` at the first path. The
    collector's `shape` only offers events that grow that one text and set nothing else that
    reading them again would change (no other text or list that grows), so the texts of
    consecutive template events are added as one: reading the event with "a" and then with
    "b" leaves what reading it with "ab" does."""

    __slots__ = ("add", "between", "head", "head_size", "tail", "tail_size", "text_first")

    def __init__(self, fixed: list[bytes], text_first: bool, add: Callable[[str], None]
                 ) -> None:
        self.head, self.tail = fixed[0], fixed[-1]
        self.head_size, self.tail_size = len(self.head), len(self.tail)
        self.between = fixed[1] if len(fixed) == 3 else None
        self.text_first = text_first
        self.add = add

    @classmethod
    def of(cls, block: bytes, event: SSEEvent, parsed: Any, paths: list[Path],
           add: Callable[[str], None]) -> _Template | None:
        """The template of an event just read (`parsed`: its data), or None unless the
        event's data ends its block (one last `data:` line, after whatever lines) and is
        what orjson writes for `parsed`: then the bytes around each string are known
        exactly, as orjson writes `parsed` with a mark in its place. (OpenAI and Anthropic
        write compact JSON as orjson does; other writers' events are read in full.)"""
        assert len(paths) <= len(_MARKS)  # (the text and at most one pad)
        data = event[1].encode()
        if not block.endswith(data) or orjson.dumps(parsed) != data:
            return None
        marked = parsed
        for position, path in enumerate(paths):
            marked = _with(marked, path, _MARKS[position])
        text = orjson.dumps(marked)  # the same bytes as `data` but for the marks
        spans = []
        for position in range(len(paths)):
            mark = _MARK_TOKENS[position]
            found = text.find(mark)
            if found < 0 or text.find(mark, found + 1) >= 0:  # (the text has the mark too)
                return None
            spans.append((found, position))
        spans.sort()
        # The fixed parts keep each string's quotes: `run` then needs no check that a
        # string's bytes run from quote to quote (orjson.loads would also take whitespace
        # around one, and a newline there would end the SSE line).
        fixed = [block[:len(block) - len(data)]]  # the event's `data: ` (and `event:`) line
        end = 0
        for found, position in spans:
            fixed[-1] += text[end:found + 1]
            fixed.append(b"")
            end = found + len(_MARK_TOKENS[position]) - 1
        fixed[-1] += text[end:]
        return cls(fixed, spans[0][1] == 0, add)

    def run(self, blocks: list[bytes], start: int) -> tuple[str | None, int]:
        """The text that the template's events among `blocks[start:]`, up to the first block
        that is not one, add together (None if `blocks[start]` is not one), and the index of
        that first other block. A block is the template's event when it has the template's
        bytes around a text token that decodes alone to one string (and a pad that does).
        The texts are decoded RUN_BATCH events at a time, in one orjson call a batch; a
        batch that call cannot take is decoded one event at a time up to the first that is
        not the template's. (The batch bounds how far past such an event the blocks are
        read, so blocks that fit the template's bytes but fail it cost linear time, not
        quadratic: each is read in full and the next run starts after it.)"""
        texts: list[str] = []
        index, count = start, len(blocks)
        while True:
            tokens, pads = self._tokens(blocks, index, min(index + RUN_BATCH, count))
            if not tokens:
                break
            text = _strings(tokens) if not pads or b"".join(pads).isalnum() else None
            found = len(tokens)
            if text is None:
                text, found = _one_by_one(tokens, pads)
            if found:
                texts.append(text)
                index += found
            if found < RUN_BATCH:
                break
        return ("".join(texts) if texts else None), index

    def _tokens(self, blocks: list[bytes], start: int, stop: int
                ) -> tuple[list[bytes], list[bytes]]:
        """The text's JSON string token (quotes included) and the pad's inside (if the
        template has one) of each block in `blocks[start:stop]` up to the first that is not
        this template's bytes around two strings' places (not yet decoded)."""
        head, tail, head_size, tail_size = self.head, self.tail, self.head_size, self.tail_size
        between = self.between
        tokens: list[bytes] = []
        pads: list[bytes] = []
        for index in range(start, stop):
            block = blocks[index]
            end = len(block) - tail_size  # (the strings' insides run from head_size to end)
            if end < head_size or not block.startswith(head) or not block.endswith(tail):
                break
            if between is None:
                tokens.append(block[head_size - 1:end + 1])
                continue
            middle = block.find(between, head_size, end)
            if middle < 0:
                break
            if self.text_first:
                tokens.append(block[head_size - 1:middle + 1])
                pads.append(block[middle + len(between):end])
            else:
                pads.append(block[head_size:middle])
                tokens.append(block[middle + len(between) - 1:end + 1])
        return tokens, pads


# Events decoded in one orjson call at most (see _Template.run).
RUN_BATCH = 64


def _one_by_one(tokens: list[bytes], pads: list[bytes]) -> tuple[str, int]:
    """The strings of `tokens` up to the first that is not one string on its own or whose
    pad (if `pads`) is not, joined, and how many that is."""
    texts: list[str] = []
    for position, token in enumerate(tokens):
        text = _string(token)
        if text is None or (pads and not _is_pad(pads[position])):
            break
        texts.append(text)
    return "".join(texts), len(texts)


def _string(token: bytes) -> str | None:
    """The string a JSON string token decodes to; None for anything else."""
    try:
        value = orjson.loads(token)
    except orjson.JSONDecodeError:
        return None
    return value if type(value) is str else None


def _strings(tokens: list[bytes]) -> str | None:
    """What `_string` gives for each token (each from a quote to a quote), joined, in one
    parse; None unless every token is one JSON string on its own.

    In `[t1,t2,...]`, each token's quotes delimit it when neither is escaped: the opening one
    follows `[` or `,`, and the closing one is escaped only after a backslash, which the
    check for a backslash before `","` (and before the last `"]`) rules out (also, needlessly,
    after an escaped backslash: those runs are read one by one; inside one string token a
    `","` cannot follow `\"`, as its second quote would end the string). The tokens then
    bring two unescaped quotes each, plus any of their own; a parse into as many values as
    tokens, all strings (no arrays: a token may open one that another closes; joining
    anything else raises TypeError), has two unescaped quotes a value, so no token has a
    quote of its own: one string per token."""
    joined = b"[" + b",".join(tokens) + b"]"
    if joined.find(b'\\","') != -1 or joined.endswith(b'\\"]'):
        return None
    try:
        values = orjson.loads(joined)
        return "".join(values) if len(values) == len(tokens) else None
    except (orjson.JSONDecodeError, TypeError):
        return None


def _is_pad(inside: bytes) -> bool:
    """Whether the inside of a string that is not the text makes a string with its quotes
    (letters and digits, as OpenAI's pads, need no decoding)."""
    return inside.isalnum() or _string(b'"' + inside + b'"') is not None


# Put in the strings' places to find them in orjson's text: a text holding the mark's
# characters exactly would not be told apart from it (`of` then makes no template).
_MARKS = ("\x00sluicegate-text", "\x00sluicegate-pad")
_MARK_TOKENS = [orjson.dumps(mark) for mark in _MARKS]


def _with(value: Any, path: Path, new: Any) -> Any:
    """A copy of `value` with `new` at `path` (the dicts and lists on the path copied)."""
    top = node = value.copy()
    for step in path[:-1]:
        inner = node[step].copy()
        node[step] = inner
        node = inner
    node[path[-1]] = new
    return top


# -- OpenAI chat and completions --------------------------------------------------------------

# A chunk pads itself with a random string under this key (OpenAI, since 2025-08). Only the
# first chunk's reaches the envelope, as with every key already filled.
_PADDING = "obfuscation"
_DELTA_MERGED = ("role", "tool_calls", "function_call")  # delta keys not grown as text


class _OpenAICollector:
    """Chat completion chunks (or completions) -> the chat.completion (text_completion)."""

    __slots__ = ("body_object", "choices", "empty", "envelope", "filled", "last", "result",
                 "usage")

    def __init__(self, body_object: str, empty: JSON) -> None:
        self.body_object = body_object
        self.empty = empty
        self.envelope: JSON = {}
        self.filled = set(CHUNK_ONLY)  # keys the envelope takes nothing more of
        self.choices: dict[int, JSON] = {}
        self.usage: JSON | None = None
        self.last: Any = None  # the chunk read last
        self.result: JSON | None = None

    def feed(self, name: str | None, data: str) -> bool:
        """Reads one event; True once the stream has ended (`result`: the answer or None)."""
        if data == "[DONE]":
            self.result = self._body()
            return True
        self.last = None
        if not data:
            return False
        chunk = orjson.loads(data)
        if name == "error" or chunk.get("error"):
            return True
        self._read(chunk)
        self.last = chunk
        return False

    def _read(self, chunk: JSON) -> None:
        filled = self.filled
        if not chunk.keys() <= filled:  # (after the first chunks, every key is filled)
            envelope = self.envelope
            for key, value in chunk.items():  # Azure opens with an id-less filter chunk
                if key not in filled and not envelope.get(key):
                    envelope[key] = value
                    if value:
                        filled.add(key)
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            _merge_choice(self.choices.setdefault(choice.get("index", 0), {}), choice)

    def shape(self, name: str | None) -> Shape | None:
        """For a chunk of one choice that grows one text (content, a tool call's arguments,
        a completion's text) and sets nothing else that reading it twice would change: the
        paths of its strings, and how another text is added (the chunk read again with it)."""
        chunk = self.last
        if name is not None or type(chunk) is not dict or chunk.get("usage") is not None:
            return None
        choices = chunk.get("choices")
        if type(choices) is not list or len(choices) != 1 or type(choices[0]) is not dict:
            return None
        choice = choices[0]
        if choice.get("logprobs") is not None:  # (their lists grow)
            return None
        path = _text_path(choice)
        if path is None:
            return None
        text_path = ("choices", 0, *path)
        paths: list[Path] = [text_path]
        if _PADDING in self.filled and type(chunk.get(_PADDING)) is str:
            paths.append((_PADDING,))

        def add(text: str) -> None:
            self._read(_with(chunk, text_path, text))
        return paths, add

    def _body(self) -> JSON | None:
        choices = self.choices
        if not choices or any(c.get("finish_reason") is None for c in choices.values()):
            return None
        ordered = [{**self.empty, "logprobs": None, **choices[index]}
                   for index in sorted(choices)]
        for choice in ordered:
            calls = choice.get("message", {}).get("tool_calls")
            if isinstance(calls, dict):
                choice["message"]["tool_calls"] = [calls[position] for position in sorted(calls)]
        envelope = self.envelope
        body: JSON = {"id": envelope.get("id"), "object": self.body_object, **envelope,
                      "choices": ordered}
        body.pop(_PADDING, None)  # (a chunk's random pad: the answer has none, nor a replay)
        if self.usage is not None:
            body["usage"] = self.usage
        return body


def _text_path(choice: JSON) -> Path | None:
    """Where a choice's one growing text is: its only text (a completion's), or its delta's
    only value that grows (besides `role`, which is set); None for anything else."""
    if "text" in choice:
        return ("text",) if "delta" not in choice and _grows(choice["text"]) else None
    delta = choice.get("delta")
    if type(delta) is not dict:
        return None
    growing = [key for key, value in delta.items() if value is not None and key != "role"]
    if len(growing) != 1:
        return None
    key = growing[0]
    value = delta[key]
    if key == "tool_calls":
        if type(value) is not list or len(value) != 1 or type(value[0]) is not dict:
            return None
        function = value[0].get("function")
        if type(function) is not dict or not _grows(function.get("arguments")):
            return None
        return ("delta", "tool_calls", 0, "function", "arguments")
    if key in _DELTA_MERGED or not _grows(value):
        return None
    return ("delta", key)


def _grows(text: Any) -> bool:
    # Not an empty text: a choice's first chunk (its role, a tool call's id and name) has
    # one, and the chunks after it have other bytes, so a template of it would be wasted.
    return type(text) is str and text != ""


def _merge_choice(state: JSON, choice: JSON) -> None:
    for key, value in choice.items():
        if key == "delta":
            _merge_delta(state.setdefault("message", {}), value or {})
        elif key == "text":
            state["text"] = _grow(state.get("text"), _text(value))
        elif key == "logprobs":
            state["logprobs"] = _merge_logprobs(state.get("logprobs"), value)
        elif key == "finish_reason":
            if value is not None or key not in state:
                state[key] = value
        elif not state.get(key):
            state[key] = value


def _merge_delta(message: JSON, delta: JSON) -> None:
    for key, value in delta.items():
        if key == "role":
            message[key] = value
        elif key == "tool_calls":
            for call in value or ():
                calls = message.setdefault("tool_calls", {})
                _merge_call(calls.setdefault(call.get("index", 0), {}), call)
        elif key == "function_call":
            if isinstance(value, dict):
                _merge_function(message.setdefault("function_call", {}), value)
        elif key == "thinking_blocks" and type(value) is list:
            message[key] = _accumulate(message.get(key), [_unindexed(b) for b in value])
        else:
            message[key] = _accumulate(message.get(key), value)


def _unindexed(block: Any) -> Any:
    """A streamed thinking block as the answer holds it: a stream numbers each whole block
    with its `index` (for the openai SDK's merging: providers/anthropic_stream.py), which a
    non-stream answer's blocks do not carry."""
    if type(block) is not dict or "index" not in block:
        return block
    return {key: value for key, value in block.items() if key != "index"}


def _merge_call(call: JSON, delta: JSON) -> None:
    for key, value in delta.items():
        if key == "function" and isinstance(value, dict):
            _merge_function(call.setdefault("function", {}), value)
        elif key != "index" and value is not None:
            call[key] = value


def _merge_function(function: JSON, delta: JSON) -> None:
    for key, value in delta.items():
        if key == "arguments":
            function[key] = _grow(function.get(key), _text(value))
        elif value is not None:
            function[key] = value


def _merge_logprobs(current: JSON | None, delta: Any) -> JSON | None:
    if not isinstance(delta, dict):
        return current
    if current is None:
        return dict(delta)
    return {**current, **{k: _accumulate(current.get(k), v) for k, v in delta.items()}}


def _accumulate(current: Any, value: Any) -> Any:
    """Strings and lists grow by their deltas; anything else is replaced (None never wins).
    An object that follows a different one is refused (ValueError: the stream makes no
    answer, a miss): how its members add up is the member's own (OpenAI's streamed `audio` sends the
    transcript and base64 pieces of its data in turn, and its answer holds the whole of
    each), and replacing it would keep only the last piece."""
    if value is None:
        return current
    if type(value) is dict and current is not None and value != current:
        raise ValueError("no way to rebuild an object sent in several deltas")
    if isinstance(value, str) and (type(current) is _Text or isinstance(current, str)):
        return _grow(current, value)
    if isinstance(value, list) and isinstance(current, list) and type(current) is not _Text:
        current.extend(value)  # (a list of this collection's own: the parsed chunks')
        return current
    return value


# -- texts ----------------------------------------------------------------------------------------

class _Text(list[str]):
    """A text being rebuilt from its deltas: its pieces, joined once the stream is collected
    (`_joined`), since adding each delta to a string copies all of it (quadratic in the
    length of a long answer)."""

    __slots__ = ()


def _grow(current: Any, piece: str) -> Any:
    """`current + piece` for a text built from deltas (`current` None or absent: "")."""
    if type(current) is _Text:
        current.append(piece)
        return current
    if not current:
        return piece
    return _Text((current, piece))


def _str(value: Any) -> Any:
    return "".join(value) if type(value) is _Text else value


def _joined(value: dict[Any, Any] | list[Any]) -> None:
    """Makes every `_Text` in `value` (at any depth) a string, in place."""
    for key, item in value.items() if type(value) is dict else enumerate(value):
        if type(item) is _Text:
            value[key] = "".join(item)  # (a value replaced: the dict keeps its size)
        elif type(item) is dict or type(item) is list:
            _joined(item)


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _checked_text(value: Any) -> Any:
    """A text (or one being rebuilt) that must be a string, as adding to one required."""
    if type(value) is not _Text and not isinstance(value, str):
        raise TypeError("a text that is not a string")
    return value


# -- Anthropic messages ---------------------------------------------------------------------------

_DELTA_TEXTS = {"text_delta": "text", "thinking_delta": "thinking"}  # delta type -> its text


class _MessageCollector:
    """Anthropic Messages stream events -> the Message."""

    __slots__ = ("last", "message", "partial_inputs", "result")

    def __init__(self) -> None:
        self.message: JSON | None = None
        self.partial_inputs: dict[int, Any] = {}  # tool input JSON per block, until its stop
        self.last: Any = None  # the event read last
        self.result: JSON | None = None

    def feed(self, name: str | None, data: str) -> bool:
        """Reads one event; True once the stream has ended (`result`: the answer or None)."""
        self.last = payload = orjson.loads(data)
        return self._read(name or payload.get("type"), payload)

    def _read(self, kind: Any, payload: JSON) -> bool:
        message = self.message
        if kind == "error":
            return True
        if kind == "message_start":
            self.message = {**payload["message"], "content": []}
        elif kind == "message_stop":
            complete = message is not None and message.get("stop_reason") is not None
            self.result = message if complete and not self.partial_inputs else None
            return True
        elif kind in _MESSAGE_EVENTS:
            if message is None:
                return True
            _MESSAGE_EVENTS[kind](message, self.partial_inputs, payload)
        return False

    def shape(self, name: str | None) -> Shape | None:
        """For a text or thinking delta: the path of its text, and how another text is added
        (the event read again with it)."""
        payload = self.last
        if name != "content_block_delta" or type(payload) is not dict:
            return None
        delta = payload.get("delta")
        if type(delta) is not dict:
            return None
        field = _DELTA_TEXTS.get(delta.get("type"))  # type: ignore[arg-type]
        if field is None or not _grows(delta.get(field)):
            return None
        path = ("delta", field)

        def add(text: str) -> None:
            self._read(name, _with(payload, path, text))
        return [path], add


def _block_start(message: JSON, partial_inputs: dict[int, Any], event: JSON) -> None:
    if event["index"] != len(message["content"]):  # the SDKs index content by it too
        raise ValueError("content blocks out of order")
    message["content"].append(dict(event["content_block"]))


def _block_delta(message: JSON, partial_inputs: dict[int, Any], event: JSON) -> None:
    index, delta = event["index"], event["delta"]
    block = message["content"][index]
    kind = delta["type"]
    if kind == "text_delta":
        block["text"] = _grow(_checked_text(block.get("text", "")), _checked_text(delta["text"]))
    elif kind == "input_json_delta":
        partial_inputs[index] = _grow(partial_inputs.get(index),
                                      _checked_text(delta["partial_json"]))
    elif kind == "thinking_delta":
        block["thinking"] = _grow(_checked_text(block.get("thinking", "")),
                                  _checked_text(delta["thinking"]))
    elif kind == "signature_delta":
        block["signature"] = delta["signature"]
    elif kind == "citations_delta":
        block["citations"] = [*(block.get("citations") or ()), delta["citation"]]
    else:
        raise ValueError(f"no way to rebuild a {kind!r} delta")


def _block_stop(message: JSON, partial_inputs: dict[int, Any], event: JSON) -> None:
    index = event["index"]
    if index in partial_inputs:  # a tool without arguments may stream "" as its input
        message["content"][index]["input"] = orjson.loads(_str(partial_inputs.pop(index))
                                                          or "{}")


def _message_delta(message: JSON, partial_inputs: dict[int, Any], event: JSON) -> None:
    for key, value in (event.get("delta") or {}).items():
        if value is not None or key not in message:
            message[key] = value
    usage = event.get("usage")
    if isinstance(usage, dict):  # cumulative: it overwrites, and what it omits stays
        counts = {key: value for key, value in usage.items() if value is not None}
        message["usage"] = {**(message.get("usage") or {}), **counts}


_MESSAGE_EVENTS: dict[str, Callable[[JSON, dict[int, Any], JSON], None]] = {
    "content_block_start": _block_start,
    "content_block_delta": _block_delta,
    "content_block_stop": _block_stop,
    "message_delta": _message_delta,
}

_Collector = _OpenAICollector | _MessageCollector
_COLLECTORS: dict[tuple[str, str], Callable[[], _Collector]] = {
    ("openai", OPENAI_CHAT): lambda: _OpenAICollector("chat.completion",
                                                      {"message": {"role": "assistant"}}),
    ("openai", OPENAI_COMPLETIONS): lambda: _OpenAICollector("text_completion", {"text": ""}),
    ("anthropic", ANTHROPIC_MESSAGES): _MessageCollector,
}
