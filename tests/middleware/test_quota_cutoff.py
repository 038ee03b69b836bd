"""The budget stream cut-off at its edges: a continuation with no room left in its budget.

Prices, prompt and budget are test_quota_layer's: a cost in micro-dollars is input tokens +
2 x output tokens, the budget (CUTOFF_BUDGET) is 35, and the slow mock streams one
character per content event. The cut-off counts each event as an output token, so a stream
of 10 input tokens is ended before its 13th event (10 + 2 x 13 > 35).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import anthropic
import openai
import pytest
from openai.types.chat import ChatCompletionChunk

from tests.middleware.test_quota_billing import billed, metering
from tests.middleware.test_quota_failover import BUDGET, FAILOVER, TWO_DEPLOYMENTS
from tests.middleware.test_quota_layer import (
    CUTOFF_BUDGET,
    CUTOFF_MESSAGE,
    INPUT,
    OUTPUT,
    PROMPT,
    Gateway,
    Start,
    auth,
    eventually,
    prefix,
    quota,
    slow,
    slow_mock,
    start,
    static_key,
    wait_streams_done,
)
from tests.mock_providers import Fault, MockProviderServer

__all__ = ["prefix", "slow", "slow_mock", "start"]  # (fixtures, used by name)

# -- a continuation with no room left -----------------------------------------------------------

# With the failover layer above the quota layer, a stream broken after `after_chunks`
# content events is continued on gpt-mock's (claude-mock's) second deployment, and that
# call's input is the prompt plus the text so far, billed again. The broken part costs
# 10 + 2 x its deltas (OpenAI's opening role chunk is one; Anthropic's message_start,
# content_block_start and ping are events but no deltas). A continuation of "Mock r" has
# 15 input tokens: 24 (OpenAI) or 22 (Anthropic) + 15 > 35, its input alone over the
# budget. After "Mock" (OpenAI) or "Mock " (Anthropic, whose prefill goes without the
# space) the input fits, 20 + 14 = 34, and its first event does not: 36.
NO_ROOM = [("openai", 6), ("openai", 4), ("anthropic", 6), ("anthropic", 5)]
TWO_CLAUDE_DEPLOYMENTS = TWO_DEPLOYMENTS + '''
models["claude-mock"] = [Deployment("anthropic", "claude-3-5-haiku", price=MOCK_PRICE),
                         Deployment("anthropic", "claude-3-5-sonnet", price=MOCK_PRICE)]
'''
FAILOVER_BOTH = FAILOVER.replace("continuation=True)}", "continuation=True), "
                                 "'claude-mock': Route(strategy='priority', continuation=True)}")


@dataclass
class Read:
    """What a client read of a stream: its text, and its content deltas (what the ledger
    bills a stream cut short)."""

    text: str = ""
    deltas: int = 0


def read_until_cut_off(gateway: Gateway, api: str) -> Read:
    """What an official SDK client read of a stream before its in-band error, which must be
    the cut-off's."""
    read = Read()
    if api == "openai":
        with pytest.raises(openai.APIError) as raised:
            read_openai_stream(gateway, read)
        assert raised.value.message == CUTOFF_MESSAGE
        assert raised.value.body == {"message": CUTOFF_MESSAGE, "type": "insufficient_quota",
                                     "param": None, "code": "budget_exceeded"}
    else:
        with pytest.raises(anthropic.APIStatusError) as refused:
            read_anthropic_stream(gateway, read)
        assert refused.value.body == {"type": "error", "error": {"type": "billing_error",
                                                                 "message": CUTOFF_MESSAGE}}
    return read


def read_openai_stream(gateway: Gateway, read: Read) -> None:
    for chunk in gateway.openai().chat.completions.create(
            model="gpt-mock", messages=[{"role": "user", "content": PROMPT[0]["content"]}],
            max_tokens=OUTPUT, stream=True):
        assert isinstance(chunk, ChatCompletionChunk)
        read.deltas += 1  # (every chunk has a delta, the opening role chunk too)
        read.text += chunk.choices[0].delta.content or ""


def read_anthropic_stream(gateway: Gateway, read: Read) -> None:
    with gateway.anthropic().messages.stream(
            model="claude-mock", messages=[{"role": "user", "content": PROMPT[0]["content"]}],
            max_tokens=OUTPUT) as events:
        for event in events:
            if event.type == "content_block_delta" and event.delta.type == "text_delta":
                read.deltas += 1
                read.text += event.delta.text


@pytest.mark.parametrize("api,after_chunks", NO_ROOM)
def test_a_continuation_with_no_room_in_the_budget_is_not_called(
        start: Start, slow: MockProviderServer, tmp_path: Path, api: str,
        after_chunks: int) -> None:
    # The continuation went upstream and was cut at its first event, billed its input: 39
    # for a budget of 35; after "Mock", the budget's last 14 for nothing the caller
    # received (OpenAI), or 36 (Anthropic, whose message_start reports an output token).
    journal = tmp_path / "journal"
    gateway = start(auth(static_key(CUTOFF_BUDGET)), metering(journal), FAILOVER_BOTH,
                    quota("'memory'"), extra=TWO_CLAUDE_DEPLOYMENTS, upstream=slow.url)
    wait_streams_done(slow)
    slow.push_fault(Fault(kind="error_event", provider=api, after_chunks=after_chunks))
    read = read_until_cut_off(gateway, api)
    assert read.text == "Mock reply"[:after_chunks]  # (the broken part, and nothing after it)
    assert len(slow.requests) == 1  # (no continuation call)
    wait_streams_done(slow)
    cost = billed(journal)
    assert cost == INPUT + 2 * read.deltas <= BUDGET  # (the broken part's)
    committed: int | None = cost
    assert eventually(lambda: gateway.committed(), committed) == cost
