"""Stream continuation: a chat stream that breaks after content went out goes on elsewhere.

Opt-in per model (`Route(continuation=True)`), for streamed OpenAI chat completions and
Anthropic messages. While such a stream is relayed, a `Transcript` keeps the assistant text
the client has received. When the provider's stream breaks (an error event, a reset, an idle
timeout), the adapter stops without ending the response (`ctx.continue_streams`) and raises
`StreamInterrupted`; the failover layer then sends the same request, plus the partial text as
a final assistant message (a prefill), to the next deployment or fallback, and relays that
answer into the open response through a `ContinuationRelay`, which drops what would start a
second message (Anthropic's `message_start`, the first text block's `content_block_start`,
`ping`s; the new response start).

Limits:
- The continuation is only as seamless as the fallback's prefill: Anthropic (and Gemini)
  continue a final assistant message exactly; OpenAI's own API answers it with a new turn,
  so point continuation at deployments that prefill.
- Text only: a stream that was sending tool calls, several choices (`n > 1`), or thinking
  blocks ends with the in-band error event instead.
- The provider's failures only: an error event saying the caller must fix its request (a
  400, as `policy.classify` reads it) would come back from anywhere, and ends the stream.
- One continuation per request; the continued part's chunks carry the fallback's ids.
- Usage is the sum of both calls; the broken call's is the provider's when it reported one,
  else estimated (its output from the text received, its input from the request: with the
  deployment's tokenizer where it has one). The sum is in the request's context before the
  continuation's last message goes up: a layer above may record the request as it passes
  (the metering layer's durability="response").
"""
from __future__ import annotations

import orjson

from gateway.context import ANTHROPIC_MESSAGES, OPENAI_CHAT, RequestContext, Usage, add_usage
from gateway.layers import Message, Send
from gateway.sse import SSEParser, split_complete_events
from gateway.tokens import estimate_input_tokens, estimate_text, tokenizer_of

__all__ = ["CONTINUABLE", "BothParts", "ContinuationRelay", "Transcript", "add_usage",
           "continuation_body", "estimated_usage", "transcript_tee"]

CONTINUABLE = frozenset({OPENAI_CHAT, ANTHROPIC_MESSAGES})
_DROPPED_ANTHROPIC = (b"event: message_start", b"event: ping")


class Transcript:
    """The assistant text a stream has sent, read from its SSE events (ingress format)."""

    __slots__ = ("_parser", "anthropic", "finished", "parts", "plain")

    def __init__(self, api_format: str) -> None:
        self._parser = SSEParser()
        self.anthropic = api_format == "anthropic"
        self.parts: list[str] = []
        self.plain = True  # only text so far: nothing a prefill could not express
        # The answer's end went out (a finish reason, Anthropic's stop_reason): a break after
        # it has nothing left to continue.
        self.finished = False

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def feed(self, chunk: bytes) -> None:
        for _, data in self._parser.feed(chunk):
            if data == "[DONE]":
                continue
            try:
                event = orjson.loads(data)
            except orjson.JSONDecodeError:
                continue
            if isinstance(event, dict):
                self._anthropic(event) if self.anthropic else self._openai(event)

    def _openai(self, event: dict[str, object]) -> None:
        choices = event.get("choices")
        for choice in choices if isinstance(choices, list) else ():
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta") or {}
            if choice.get("index", 0) != 0 or delta.get("tool_calls") or \
                    delta.get("function_call"):
                self.plain = False
            content = delta.get("content")
            if isinstance(content, str):
                self.parts.append(content)
            if choice.get("finish_reason") and choice.get("index", 0) == 0:
                self.finished = True

    def _anthropic(self, event: dict[str, object]) -> None:
        kind = event.get("type")
        if kind == "content_block_start":
            block = event.get("content_block")
            if not isinstance(block, dict) or block.get("type") != "text" or \
                    event.get("index", 0) != 0:
                self.plain = False
        elif kind == "content_block_delta":
            delta = event.get("delta")
            if isinstance(delta, dict) and delta.get("type") == "text_delta" and \
                    isinstance(delta.get("text"), str):
                self.parts.append(str(delta["text"]))
            else:
                self.plain = False
        elif kind == "message_delta":
            delta = event.get("delta")
            if isinstance(delta, dict) and delta.get("stop_reason"):
                self.finished = True


def transcript_tee(send: Send, transcript: Transcript) -> Send:
    """`send`, noting the assistant text of every body chunk on its way to the client."""
    async def send_noting_text(message: Message) -> None:
        if message["type"] == "http.response.body":
            transcript.feed(message.get("body", b""))
        await send(message)
    return send_noting_text


def estimated_usage(ctx: RequestContext, partial: str) -> Usage:
    """The broken call's usage when its provider never reported one: the request's input and
    the text it delivered, counted with its deployment's tokenizer where it has one (else
    the heuristic)."""
    tokenizer = tokenizer_of(ctx)
    return Usage(input_tokens=estimate_input_tokens(ctx),
                 output_tokens=estimate_text(partial) if tokenizer is None
                 else tokenizer.count(partial))


class BothParts:
    """Puts the request's usage, the broken call's plus the continuation's, in its context:
    as the continuation's last message goes up (a layer above may record the request as it
    passes: metering's durability="response"), and again when the continuation has ended
    (once: a usage already summed is not summed again)."""

    __slots__ = ("broken", "ctx", "own", "summed")

    def __init__(self, ctx: RequestContext, broken: Usage) -> None:
        self.ctx, self.broken = ctx, broken
        self.own: Usage | None = None  # the continuation's, when it was summed
        self.summed: Usage | None = None

    @property
    def continuation(self) -> Usage | None:
        """The continuation call's own usage (what its deployment's capacity pays)."""
        summed = self.summed is not None and self.ctx.usage is self.summed
        return self.own if summed else self.ctx.usage

    def tee(self, send: Send) -> Send:
        async def send_summing_usage_at_end(message: Message) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body"):
                self.sum()
            await send(message)
        return send_summing_usage_at_end

    def sum(self) -> None:
        if self.summed is None or self.ctx.usage is not self.summed:
            self.own = self.ctx.usage
            self.ctx.usage = self.summed = add_usage(self.broken, self.own)


def continuation_body(ctx: RequestContext, partial: str) -> dict[str, object]:
    """The request that asks for the rest: the original one, the partial text appended as a
    final assistant message (OpenAI and Anthropic both spell it role/content). Anthropic
    refuses a prefill that ends in whitespace, so it goes without it; the relay then drops
    that whitespace from the front of the continuation, which repeats it."""
    body = dict(ctx.body)
    messages = list(body.get("messages") or [])
    messages.append({"role": "assistant", "content": partial.rstrip()})
    body["messages"] = messages
    return body


class ContinuationRelay:
    """Sends a continuation's answer into the response that is already open."""

    __slots__ = ("_buffer", "_send", "_skip", "anthropic", "transcript")

    def __init__(self, send: Send, api_format: str, transcript: Transcript) -> None:
        self._send = send
        self._buffer = b""
        self.anthropic = api_format == "anthropic"
        self.transcript = transcript
        text = transcript.text
        self._skip = text[len(text.rstrip()):]  # the whitespace the prefill went without

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            return  # the client has its response start already
        if message["type"] != "http.response.body":
            await self._send(message)
            return
        more = message.get("more_body", False)
        complete, self._buffer = split_complete_events(self._buffer + message.get("body", b""))
        if not more:
            complete, self._buffer = complete + self._buffer, b""
        body = b"".join(self._relayed(block) for block in complete.split(b"\n\n")
                        if block.strip())
        self.transcript.feed(body)
        if body or not more:
            await self._send({"type": "http.response.body", "body": body, "more_body": more})

    def _relayed(self, block: bytes) -> bytes:
        """One event as the client gets it: dropped when it would restart the message, its
        text trimmed of the whitespace the client has already."""
        if self.anthropic and (block.startswith(_DROPPED_ANTHROPIC) or
                               _starts_first_block(block)):
            return b""
        if self._skip:
            block = self._trimmed(block)
        return block + b"\n\n"

    def _trimmed(self, block: bytes) -> bytes:
        head, sep, data = block.rpartition(b"data: ")
        try:
            event = orjson.loads(data)
        except orjson.JSONDecodeError:
            return block
        holder: dict[str, object] | None = None
        if self.anthropic and isinstance(event, dict) and \
                event.get("type") == "content_block_delta":
            holder = event.get("delta") if isinstance(event.get("delta"), dict) else None
            field = "text"
        elif not self.anthropic and isinstance(event, dict) and event.get("choices"):
            choice = event["choices"][0]
            holder = choice.get("delta") if isinstance(choice, dict) else None
            field = "content"
        if holder is None or not isinstance(holder.get(field), str) or not holder[field]:
            return block
        text = str(holder[field])
        common = 0
        while common < min(len(self._skip), len(text)) and text[common].isspace():
            common += 1
        holder[field] = text[common:]
        # The first text that is not all white space decides: the rest is the model's. One
        # that is ("\n", then "\nLine two.") leaves the rest of the skip to the next.
        self._skip = self._skip[common:] if common == len(text) else ""
        return head + sep + orjson.dumps(event)


def _starts_first_block(block: bytes) -> bool:
    """A `content_block_start` for block 0: the broken stream opened that block already."""
    if not block.startswith(b"event: content_block_start"):
        return False
    for _, data in SSEParser().feed(block + b"\n\n"):
        try:
            event = orjson.loads(data)
        except orjson.JSONDecodeError:
            return False
        return isinstance(event, dict) and event.get("index", 0) == 0
    return False
