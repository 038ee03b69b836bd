"""Anthropic Messages streams <-> OpenAI chat chunks, and the pieces both directions share.

Anthropic (https://docs.anthropic.com/en/api/messages-streaming): `message_start` carries a
Message with empty content and the input usage; each content block is a
`content_block_start`, deltas (`text_delta`, `input_json_delta`, `thinking_delta`,
`signature_delta`, and `citations_delta` which has no chat equivalent) and a
`content_block_stop`; then `message_delta` (stop_reason and cumulative usage, which may
repeat the input counts) and `message_stop`. `ping` may come anywhere; an `error` event
ends a stream that already answered 200. The SDKs index `content[event.index]`, so block
indexes must count up from 0 in start order.
OpenAI (https://platform.openai.com/docs/api-reference/chat-streaming): the first chunk
carries `delta.role`; a tool call's first delta carries its `index`, `id`, `type` and name,
later ones only `index` and argument text; `finish_reason` comes on the last choice chunk;
with `stream_options.include_usage` a final chunk has `choices: []` and the usage, and
every other chunk `usage: null`.
providers.anthropic_format re-exports the public names.
"""
from __future__ import annotations

import hashlib
import re
import time
import uuid
from typing import Any

import orjson

from gateway.context import reasoning_is_extra, token_count
from providers.streams import StreamError as UpstreamStreamError
from providers.streams import chat_chunk

JSON = dict[str, Any]
Event = tuple[str, JSON]

# Message.stop_reason -> finish_reason. pause_turn only follows Anthropic's own server
# tools, so the answer so far is complete as far as a chat client can tell.
_FINISH_BY_STOP = {
    "end_turn": "stop", "stop_sequence": "stop", "pause_turn": "stop",
    "max_tokens": "length", "model_context_window_exceeded": "length",
    "tool_use": "tool_calls", "refusal": "content_filter",
}
_STOP_BY_FINISH = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use",
                   "function_call": "tool_use", "content_filter": "refusal"}


def completion_id(message_id: Any) -> str:
    """chat.completion id from an Anthropic message id (msg_X -> chatcmpl-X)."""
    if isinstance(message_id, str) and message_id:
        return "chatcmpl-" + message_id.removeprefix("msg_")
    return "chatcmpl-" + uuid.uuid4().hex


def message_id(chat_id: Any) -> str:
    """Anthropic message id from a chat.completion id (chatcmpl-X -> msg_X)."""
    if isinstance(chat_id, str) and chat_id:
        return "msg_" + chat_id.removeprefix("chatcmpl-")
    return "msg_" + uuid.uuid4().hex


# tool_use.id and tool_result.tool_use_id must match this (the API's 400 is quoted in
# maximhq/bifrost#5097); other providers' call ids need not, e.g. Kimi's
# `functions.get_weather:0`.
_ANTHROPIC_TOOL_ID = re.compile(r"[a-zA-Z0-9_-]+")


def tool_use_id(call_id: Any) -> Any:
    """An id Anthropic takes for a tool call id from another API: the id itself when valid,
    else `toolu_` and a hash of it. The same id always maps alike, so a tool_use and the
    tool_result that answers it still match, in this request and in the next."""
    if not isinstance(call_id, str) or _ANTHROPIC_TOOL_ID.fullmatch(call_id):
        return call_id
    return "toolu_" + hashlib.sha256(call_id.encode()).hexdigest()[:24]


def created_now() -> int:
    """OpenAI's `created`; reading the clock is the only impurity in the translators."""
    return int(time.time())


def finish_reason(stop_reason: Any, has_tool_calls: bool) -> str:
    """Anthropic stop_reason -> OpenAI finish_reason."""
    reason = _FINISH_BY_STOP.get(stop_reason) if isinstance(stop_reason, str) else None
    if reason is None:  # missing, or a value newer than this table
        return "tool_calls" if has_tool_calls else "stop"
    return reason


def stop_reason(finish: Any, has_tool_use: bool, refused: bool) -> str:
    """OpenAI finish_reason -> Anthropic stop_reason.

    Some OpenAI-compatible servers (vLLM, Ollama) report "stop" next to tool calls; an
    Anthropic client runs tools on `tool_use`, so the calls decide. An OpenAI `refusal`
    comes with "stop" too.
    """
    if finish in (None, "stop"):
        if has_tool_use:
            return "tool_use"
        if refused:
            return "refusal"
    return _STOP_BY_FINISH.get(finish, "end_turn") if isinstance(finish, str) else "end_turn"


def chat_usage(usage: Any) -> JSON | None:
    """Anthropic usage -> OpenAI usage.

    Anthropic's `input_tokens` excludes cache reads and writes; the prompt is their sum
    (Message.usage docs). Reads become `cached_tokens` and writes `cache_write_tokens`
    (both in OpenAI's prompt_tokens_details), the writes kept for an hour, which cost more,
    also `cache_write_1h_tokens`; thinking tokens are `reasoning_tokens`.
    """
    if not isinstance(usage, dict):
        return None
    cache_read = token_count(usage.get("cache_read_input_tokens"))
    cache_write = token_count(usage.get("cache_creation_input_tokens"))
    by_ttl = usage.get("cache_creation")
    written_1h = token_count(by_ttl.get("ephemeral_1h_input_tokens")) \
        if isinstance(by_ttl, dict) else 0
    prompt = token_count(usage.get("input_tokens")) + cache_read + cache_write
    completion = token_count(usage.get("output_tokens"))
    details = usage.get("output_tokens_details")
    thinking = token_count(details.get("thinking_tokens")) if isinstance(details, dict) else 0
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cache_read,
                                      "cache_write_tokens": cache_write,
                                      **({"cache_write_1h_tokens": written_1h}
                                         if written_1h else {})},
            "completion_tokens_details": {"reasoning_tokens": thinking}}


def anthropic_usage(usage: Any) -> JSON:
    """OpenAI usage (None: all zero) -> Anthropic usage, whose input_tokens excludes cache.

    Reasoning tokens become `output_tokens_details.thinking_tokens` (Anthropic's breakdown
    of output_tokens, which include them as completion_tokens include reasoning_tokens;
    anthropic-sdk-python's Usage and MessageDeltaUsage), only when there are some; those a
    provider counts beside its completion_tokens (xAI) are added to output_tokens.
    """
    usage = usage if isinstance(usage, dict) else {}
    details = usage.get("prompt_tokens_details")
    details = details if isinstance(details, dict) else {}
    cached = token_count(details.get("cached_tokens"))
    written = token_count(details.get("cache_write_tokens"))
    out_details = usage.get("completion_tokens_details")
    reasoning = token_count(out_details.get("reasoning_tokens")) \
        if isinstance(out_details, dict) else 0
    prompt = token_count(usage.get("prompt_tokens"))
    completion = token_count(usage.get("completion_tokens"))
    if reasoning and reasoning_is_extra(prompt, completion, reasoning, usage.get("total_tokens")):
        completion += reasoning  # (xAI's: beside the completion, and output as Anthropic counts)
    return {"input_tokens": max(prompt - cached - written, 0),
            "output_tokens": completion,
            "cache_read_input_tokens": cached, "cache_creation_input_tokens": written,
            **({"output_tokens_details": {"thinking_tokens": reasoning}} if reasoning else {})}


def chat_reasoning(message: JSON) -> str:
    """The reasoning text of an OpenAI chat message or stream delta: `reasoning_content`
    (DeepSeek and many OpenAI-compatible servers) or `reasoning` (OpenRouter, vLLM); one
    of them, as a server that sends both sends the same text twice."""
    for field in ("reasoning_content", "reasoning"):
        text = message.get(field)
        if isinstance(text, str) and text:
            return text
    return ""


def chat_thinking_block(block: JSON) -> JSON:
    """An Anthropic thinking or redacted_thinking block as a chat message's `thinking_blocks`
    hold it (LiteLLM's shape: the block's own fields)."""
    if block.get("type") == "redacted_thinking":
        return {"type": "redacted_thinking", "data": block.get("data") or ""}
    return {"type": "thinking", "thinking": block.get("thinking") or "",
            "signature": block.get("signature") or ""}


def stream_error(error: Any, default_type: str) -> UpstreamStreamError:
    """UpstreamStreamError from an `error` object of either API (or a bare string)."""
    if isinstance(error, dict):
        return UpstreamStreamError(str(error.get("type") or error.get("code") or default_type),
                                   str(error.get("message") or "upstream stream error"))
    return UpstreamStreamError(default_type, str(error or "upstream stream error"))


class MessagesStreamToChat:
    """Anthropic stream events -> OpenAI `chat.completion.chunk` dicts, one message's worth.

    Thinking streams as `reasoning_content` deltas; each thinking block, once it stopped
    (its signature is its last delta), follows whole with its signature in a delta's
    `thinking_blocks`, a redacted one as soon as it starts. LiteLLM sends every piece there
    too, but then the pieces a client (or the cache) collects are no blocks it can send back.
    Each entry carries its `index` among the message's thinking blocks, as a tool call's
    delta does: the openai SDK's stream helper merges the entries of a delta's lists by
    `index` and raises without one (openai-python lib/streaming/_deltas.py); the translation
    back to Anthropic reads a block's own fields only, so a block sent back with it is taken.
    """

    __slots__ = ("_calls", "_chat_usage", "_created", "_finish_sent", "_finished", "_id",
                 "_include_usage", "_model", "_opened", "_thinking", "_thinking_count",
                 "_usage", "_with_arguments")

    def __init__(self, public_model: str, include_usage: bool) -> None:
        self._model = public_model
        self._include_usage = include_usage
        self._id: str | None = None
        self._created = created_now()
        self._calls: dict[int, int] = {}  # Anthropic block index -> OpenAI tool_calls index
        self._with_arguments: set[int] = set()  # tool_calls indexes that got argument text
        self._thinking: dict[int, JSON] = {}  # Anthropic block index -> the thinking so far
        self._thinking_count = 0  # thinking blocks started: the next one's `index`
        self._usage: JSON | None = None   # Anthropic-shaped, merged as events arrive
        self._chat_usage: JSON | None = None  # the same, OpenAI-shaped
        self._opened = False
        self._finish_sent = False
        self._finished = False

    @property
    def usage(self) -> JSON | None:
        """OpenAI-shaped usage: input counts from message_start, final after message_delta.

        None until message_start; an interrupted stream still bills its prompt.
        """
        return self._chat_usage

    @property
    def finished(self) -> bool:
        """True once message_stop arrived."""
        return self._finished

    def feed(self, event: str, data: JSON) -> list[JSON]:
        """Chunks for one parsed event; raises UpstreamStreamError on an `error` event."""
        kind = event or str(data.get("type") or "")
        if kind == "error":
            raise stream_error(data.get("error"), "api_error")
        if kind == "message_start":
            return self._message_start(data.get("message") or {})
        if kind == "content_block_start":
            return self._block_start(data)
        if kind == "content_block_delta":
            return self._block_delta(data)
        if kind == "message_delta":
            return self._message_delta(data)
        if kind == "message_stop":
            return self._message_stop()
        if kind == "content_block_stop":
            return self._block_stop(data)
        return []  # ping, and event types added later

    def _message_start(self, message: JSON) -> list[JSON]:
        if self._id is None:
            self._id = completion_id(message.get("id"))
        if isinstance(message.get("usage"), dict):
            usage = dict(message["usage"])
            # (read now: unreadable, it is an unreadable event, not a failure at the end)
            self._usage, self._chat_usage = usage, chat_usage(usage)
        return self._emit(None)

    def _block_start(self, data: JSON) -> list[JSON]:
        block = data.get("content_block") or {}
        if block.get("type") == "tool_use":
            position = len(self._calls)
            self._calls[int(data.get("index", 0))] = position
            arguments = ""
            given = block.get("input")
            if isinstance(given, dict) and given:  # (Anthropic's is {}, its input in deltas;
                # a compatible server may send the whole input here, and no delta)
                arguments = orjson.dumps(given).decode()
                self._with_arguments.add(position)
            call = {"index": position, "id": block.get("id"), "type": "function",
                    "function": {"name": block.get("name"), "arguments": arguments}}
            return self._emit({"tool_calls": [call]})
        if block.get("type") == "text" and block.get("text"):
            return self._emit({"content": block["text"]})
        if block.get("type") == "thinking":
            self._thinking[int(data.get("index", 0))] = {
                "index": self._next_thinking_index(), "type": "thinking",
                "thinking": [block.get("thinking") or ""],
                "signature": block.get("signature") or ""}
            return self._emit({"reasoning_content": block["thinking"]}) \
                if block.get("thinking") else []
        if block.get("type") == "redacted_thinking":
            return self._emit({"thinking_blocks": [
                {"index": self._next_thinking_index(), **chat_thinking_block(block)}]})
        return []  # server-tool blocks are not part of a chat answer

    def _next_thinking_index(self) -> int:
        self._thinking_count += 1
        return self._thinking_count - 1

    def _block_delta(self, data: JSON) -> list[JSON]:
        delta = data.get("delta") or {}
        if delta.get("type") == "text_delta" and delta.get("text"):
            return self._emit({"content": delta["text"]})
        thinking = self._thinking.get(int(data.get("index", -1)))
        if thinking is not None and delta.get("type") == "signature_delta":
            thinking["signature"] = delta.get("signature") or ""
        if thinking is not None and delta.get("type") == "thinking_delta" and \
                delta.get("thinking"):
            thinking["thinking"].append(delta["thinking"])
            return self._emit({"reasoning_content": delta["thinking"]})
        if delta.get("type") == "input_json_delta" and delta.get("partial_json"):
            position = self._calls.get(int(data.get("index", -1)))
            if position is not None:  # else a server tool's input, not a client call
                self._with_arguments.add(position)
                return self._emit({"tool_calls": [{"index": position, "function": {
                    "arguments": delta["partial_json"]}}]})
        return []

    def _block_stop(self, data: JSON) -> list[JSON]:
        """A call without arguments streams `input: {}` and an empty partial_json; its
        OpenAI arguments are "{}", as OpenAI's own and the non-stream translation say."""
        thinking = self._thinking.pop(int(data.get("index", -1)), None)
        if thinking is not None:
            return self._emit({"thinking_blocks": [
                {**thinking, "thinking": "".join(thinking["thinking"])}]})
        position = self._calls.get(int(data.get("index", -1)))
        if position is None or position in self._with_arguments:
            return []
        self._with_arguments.add(position)
        return self._emit({"tool_calls": [{"index": position, "function": {"arguments": "{}"}}]})

    def _message_delta(self, data: JSON) -> list[JSON]:
        usage = data.get("usage")
        if isinstance(usage, dict):  # cumulative: overwrite, keeping fields it omits
            merged = dict(self._usage or {})
            merged.update({key: value for key, value in usage.items() if value is not None})
            self._usage, self._chat_usage = merged, chat_usage(merged)
        reason = (data.get("delta") or {}).get("stop_reason")
        if not reason or self._finish_sent:
            return []
        self._finish_sent = True
        return self._emit({}, finish=finish_reason(reason, bool(self._calls)))

    def _message_stop(self) -> list[JSON]:
        out: list[JSON] = []
        if not self._finish_sent:
            self._finish_sent = True
            out = self._emit({}, finish=finish_reason(None, bool(self._calls)))
        self._finished = True
        if self._include_usage:
            out.append({**self._envelope([]), "usage": self.usage or chat_usage({})})
        return out

    def _emit(self, delta: JSON | None, *, finish: str | None = None) -> list[JSON]:
        """The chunk for `delta`, after the role chunk if that has not gone out yet."""
        out: list[JSON] = []
        if not self._opened:
            self._opened = True
            out.append(self._chunk({"role": "assistant", "content": ""}, None))
        if delta is not None:
            out.append(self._chunk(delta, finish))
        return out

    def _chunk(self, delta: JSON, finish: str | None) -> JSON:
        return self._envelope([{"index": 0, "delta": delta, "logprobs": None,
                                "finish_reason": finish}])

    def _envelope(self, choices: list[JSON]) -> JSON:
        if self._id is None:  # events before (or without) message_start
            self._id = completion_id(None)
        return chat_chunk(self._id, self._created, self._model, choices, self._include_usage)


class _ToolBlock:
    """One tool call's tool_use block (`ChatStreamToMessages`): its id, its block index, the
    argument text sent so far, and whether the block is still open."""

    __slots__ = ("arguments", "id", "index", "open")

    def __init__(self, tool_id: str, index: int) -> None:
        self.id, self.index = tool_id, index
        self.arguments: list[str] = []
        self.open = True

    def whole(self) -> bool:
        """Whether the arguments so far are a whole JSON value (more would break it)."""
        try:
            orjson.loads("".join(self.arguments))
        except orjson.JSONDecodeError:
            return False
        return True


class ChatStreamToMessages:
    """OpenAI `chat.completion.chunk` dicts -> Anthropic stream events, one message's worth.

    OpenAI sends usage only at the end (often in a chunk after the finish_reason), so
    message_start carries zero input tokens and message_delta the real counts, input
    included, which Anthropic's own message_delta may do too (its usage is cumulative).
    Each tool call is a tool_use block. OpenAI sends a call's deltas one after another, and
    the blocks are too: a call for a new index (or a new id at the same index) closes the
    call before it. A server may interleave parallel calls' deltas (index 0, 1, 0, 1): a
    call whose arguments are not yet whole JSON when the next one starts stays open, its
    deltas still going to its own block, and every open call closes when the calls end
    (anthropic-sdk-python accumulates each block by its index). Arguments for a call
    already closed whole are an unreadable event. Reasoning deltas (`reasoning_content`,
    `reasoning`) become a thinking block. Only choice 0 is translated.
    """

    __slots__ = ("_block", "_finish", "_id", "_kind", "_model", "_refused", "_sent_delta",
                 "_started", "_stopped", "_tool_seen", "_tools", "_usage")

    def __init__(self, public_model: str) -> None:
        self._model = public_model
        self._id: str | None = None
        self._usage: JSON | None = None
        # The index of the open text or thinking block, else of the next block to open.
        self._block = 0
        self._kind: str | None = None  # "thinking", "text" or "tool_use" while one is open
        self._tools: dict[int, _ToolBlock] = {}  # OpenAI index -> its call, while "tool_use"
        self._tool_seen = False
        self._refused = False
        self._finish: str | None = None
        self._started = False
        self._sent_delta = False
        self._stopped = False

    @property
    def usage(self) -> JSON | None:
        """The OpenAI usage the upstream reported, or None before it did."""
        return self._usage

    def feed(self, chunk: JSON) -> list[Event]:
        """Events for one parsed chunk; raises UpstreamStreamError on an error chunk."""
        if chunk.get("error"):
            raise stream_error(chunk["error"], "api_error")
        out = self._start(chunk)
        if isinstance(chunk.get("usage"), dict):
            self._usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue  # n > 1 has no Anthropic shape; the ingress never asks for it
            out += self._delta(choice.get("delta") or {})
            if choice.get("finish_reason"):
                out += self._close_block()
                self._finish = choice["finish_reason"]
        # The usage that came with the finish or after it (a server that reports a running
        # usage on its content chunks sends the final one last): the message_delta's.
        if self._finish is not None and isinstance(chunk.get("usage"), dict) \
                and not self._sent_delta:
            out += self._message_delta()
        return out

    def finish(self) -> list[Event]:
        """The closing events once the upstream ended: open block, message_delta, stop."""
        if self._stopped:
            return []
        self._stopped = True
        out = self._start({}) + self._close_block()
        if not self._sent_delta:
            out += self._message_delta()
        out.append(("message_stop", {"type": "message_stop"}))
        return out

    def _start(self, chunk: JSON) -> list[Event]:
        if self._started:
            return []
        self._started = True
        self._id = message_id(chunk.get("id"))
        usage = anthropic_usage(chunk.get("usage"))
        message: JSON = {"id": self._id, "type": "message", "role": "assistant", "content": [],
                   "model": self._model, "stop_reason": None, "stop_sequence": None,
                   "usage": {"input_tokens": usage["input_tokens"], "output_tokens": 0}}
        return [("message_start", {"type": "message_start", "message": message}),
                ("ping", {"type": "ping"})]

    def _delta(self, delta: JSON) -> list[Event]:
        out: list[Event] = []
        reasoning = chat_reasoning(delta)
        if reasoning:  # (before the text, should one delta carry both)
            out += self._thinking(reasoning)
        if isinstance(delta.get("content"), str) and delta["content"]:
            out += self._text(delta["content"])
        if isinstance(delta.get("refusal"), str) and delta["refusal"]:
            self._refused = True
            out += self._text(delta["refusal"])
        for call in delta.get("tool_calls") or ():
            out += self._tool_delta(call)
        return out

    def _text(self, text: str) -> list[Event]:
        out: list[Event] = []
        if self._kind != "text":
            out += self._close_block()
            out += self._open("text", {"type": "text", "text": ""})
        out.append(self._block_delta({"type": "text_delta", "text": text}))
        return out

    def _thinking(self, text: str) -> list[Event]:
        """A thinking block for the upstream's reasoning. Anthropic ends its own with a
        `signature_delta` (what authenticates the thinking when a client sends it back to
        Anthropic); another provider's reasoning has no signature, so none is sent, and the
        block keeps the empty one it starts with (a ThinkingBlock's `signature` is required).
        """
        out: list[Event] = []
        if self._kind != "thinking":
            out += self._close_block()
            out += self._open("thinking", {"type": "thinking", "thinking": "", "signature": ""})
        out.append(self._block_delta({"type": "thinking_delta", "thinking": text}))
        return out

    def _tool_delta(self, call: JSON) -> list[Event]:
        out: list[Event] = []
        function = call.get("function") or {}
        arguments = function.get("arguments")
        position = call["index"] if isinstance(call.get("index"), int) else 0
        # (an empty id is none: DashScope's and GLM's later deltas of a call repeat `"id": ""`)
        new_id = tool_use_id(call.get("id") or None)
        if self._kind != "tool_use":
            out += self._close_block()
            self._kind, self._tools = "tool_use", {}
        tool = self._tools.get(position)
        # A new call: one at a new index, a new id at the same index, or, from a server that
        # sends neither (every call at index 0, no ids), a name after the arguments are whole.
        if tool is None or (new_id and new_id != tool.id) or (
                not new_id and function.get("name") and tool.whole()):
            if tool is not None and tool.open:  # (a server that numbers every call 0)
                out.append(self._stop(tool))
            out += [self._stop(other) for other in self._tools.values()
                    if other.open and other.whole()]
            tool = self._tools[position] = _ToolBlock(
                new_id or "toolu_" + uuid.uuid4().hex[:24], self._block)
            self._block += 1
            self._tool_seen = True
            out.append(("content_block_start", {
                "type": "content_block_start", "index": tool.index,
                "content_block": {"type": "tool_use", "id": tool.id,
                                  "name": function.get("name") or "", "input": {}}}))
        elif not tool.open and isinstance(arguments, str) and arguments.strip():
            raise ValueError("arguments for a tool call that was already whole")
        if arguments and tool.open:
            tool.arguments.append(arguments)
            out.append(("content_block_delta", {
                "type": "content_block_delta", "index": tool.index,
                "delta": {"type": "input_json_delta", "partial_json": arguments}}))
        return out

    def _stop(self, tool: _ToolBlock) -> Event:
        tool.open = False
        return ("content_block_stop", {"type": "content_block_stop", "index": tool.index})

    def _open(self, kind: str, block: JSON) -> list[Event]:
        self._kind = kind
        return [("content_block_start", {"type": "content_block_start", "index": self._block,
                                         "content_block": block})]

    def _block_delta(self, delta: JSON) -> Event:
        return ("content_block_delta", {"type": "content_block_delta", "index": self._block,
                                        "delta": delta})

    def _close_block(self) -> list[Event]:
        if self._kind is None:
            return []
        if self._kind == "tool_use":  # (each has its index already; the next is `_block`)
            events = [self._stop(tool) for tool in sorted(self._tools.values(),
                                                          key=lambda tool: tool.index)
                      if tool.open]
            self._kind, self._tools = None, {}
            return events
        event = ("content_block_stop", {"type": "content_block_stop", "index": self._block})
        self._kind = None
        self._block += 1
        return [event]

    def _message_delta(self) -> list[Event]:
        self._sent_delta = True
        reason = stop_reason(self._finish, self._tool_seen, self._refused)
        return [("message_delta", {"type": "message_delta",
                                   "delta": {"stop_reason": reason, "stop_sequence": None},
                                   "usage": anthropic_usage(self._usage)})]
