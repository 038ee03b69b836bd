"""The pure parts of stream continuation (middleware/failover/continuation.py): what a broken
call is billed when its provider never reported its usage.

The tokenizer is a small real tiktoken encoding, made as tests/gateway/test_tokenizers.py
makes it (no real OpenAI encoding is on this machine): single bytes plus a few words, so text
without those words is a token a byte, far from the heuristic's quarter.
"""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway import context as c
from gateway.config import Deployment, Model
from gateway.context import RequestContext, Usage
from gateway.tokenizers import LoadedTokenizer, TiktokenFile, load_tokenizer
from gateway.tokens import count_messages, estimate_messages, estimate_text
from middleware.failover.continuation import ContinuationRelay, Transcript, estimated_usage
from tests.gateway.test_tokenizers import RANKS, exact, write_tiktoken

PARTIAL = "hello world, \u6f22\u5b57 and so on "  # (what the client received)


@pytest.fixture
def counter(tmp_path: Path) -> LoadedTokenizer:
    return load_tokenizer(TiktokenFile(str(write_tiktoken(tmp_path / "small.tiktoken", RANKS))))


def broken(operation: str, body: dict[str, Any], tokenizer: LoadedTokenizer | None,
           ) -> RequestContext:
    """A request whose stream broke at its model's second deployment (the one with
    `tokenizer`; the first has none)."""
    first = Deployment("openai", "gpt-4o")
    second = Deployment("openai", "gpt-4o-mini", tokenizer=tokenizer)
    ctx = RequestContext(request_id="r", operation=operation, api_format="openai", body=body,
                         raw_body=b"", model="m", stream=True,
                         models={"m": Model([first, second])})
    ctx.deployment = second
    return ctx


CASES = [
    (c.OPENAI_CHAT, {"messages": [{"role": "system", "content": "hello"},
                                  {"role": "user", "content": "hello" + " hello" * 9}]}),
    (c.ANTHROPIC_MESSAGES, {"system": "hello", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "\u6f22\u5b57 world"}]}]}),
]


@pytest.mark.parametrize("operation,body", CASES)
def test_a_broken_call_is_counted_with_its_deployments_tokenizer(
        counter: LoadedTokenizer, operation: str, body: dict[str, Any]) -> None:
    messages, system = body["messages"], body.get("system")
    expected = Usage(input_tokens=count_messages(messages, counter, system)[0],
                     output_tokens=exact(PARTIAL))
    assert estimated_usage(broken(operation, body, counter), PARTIAL) == expected
    heuristic = Usage(input_tokens=estimate_messages(messages, system),
                      output_tokens=estimate_text(PARTIAL))
    assert heuristic.input_tokens != expected.input_tokens
    assert heuristic.output_tokens != expected.output_tokens
    # Without a tokenizer at the deployment that broke, the heuristic.
    assert estimated_usage(broken(operation, body, None), PARTIAL) == heuristic


def test_the_white_space_a_continuation_repeats_is_dropped_across_its_deltas() -> None:
    # The client has "Line one.\n\n"; the prefill went without its white space, which the
    # continuation repeats, here split over two deltas ("\n", then "\nLine two."). Only the
    # first delta was trimmed: the client got one newline too many.
    def delta(text: str) -> bytes:
        return b"event: content_block_delta\ndata: " + orjson.dumps(
            {"type": "content_block_delta", "index": 0,
             "delta": {"type": "text_delta", "text": text}}) + b"\n\n"

    transcript = Transcript("anthropic")
    transcript.feed(delta("Line one.\n\n"))
    sent: list[bytes] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message.get("body", b""))

    relay = ContinuationRelay(send, "anthropic", transcript)

    async def run() -> None:
        await relay({"type": "http.response.body", "body": delta("\n"), "more_body": True})
        await relay({"type": "http.response.body", "body": delta("\nLine two."),
                     "more_body": False})
    asyncio.run(run())
    assert transcript.text == "Line one.\n\nLine two."
