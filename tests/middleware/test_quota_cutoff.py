"""The budget stream cut-off at its edges: a continuation with little or no room left in its
budget, SSE comments between a stream's events, a cache hit, a stream its admission made
room for, one whose provider goes past the caller's max_tokens, and streams side by side.

Prices, prompt and budget are test_quota_layer's: a cost in micro-dollars is input tokens +
2 x output tokens, the budget (CUTOFF_BUDGET) is 35, and the slow mock streams one
character per content event. The cut-off counts each content delta as an output token, as
a stream cut short is billed. A stream without max_tokens reserves the quota layer's
default_max_output_tokens (`cutoff_quota`: 10), which bounds nothing the provider knows
of: a stream of 10 input tokens is ended before its 13th delta (10 + 2 x 13 > 35).
"""
from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import anthropic
import openai
import pytest
from openai.types.chat import ChatCompletionChunk

from gateway.sse import count_events
from tests.middleware.test_quota_billing import billed, deltas, metering, post, streamed
from tests.middleware.test_quota_failover import BUDGET, FAILOVER, TWO_DEPLOYMENTS
from tests.middleware.test_quota_layer import (
    COST,
    CUTOFF_BUDGET,
    CUTOFF_MESSAGE,
    INPUT,
    OUTPUT,
    PROMPT,
    Gateway,
    Start,
    auth,
    cutoff_quota,
    eventually,
    prefix,
    quota,
    slow,
    slow_mock,
    start,
    static_key,
    store,
    wait_streams_done,
)
from tests.mock_providers import Fault, MockConfig, MockProviderServer
from tests.mock_providers.wire import KEEPALIVE
from tests.providers.test_responses_streams import failed_ending, stream_events_of

__all__ = ["prefix", "slow", "slow_mock", "start", "store"]  # (fixtures, used by name)

REPLY = "Mock reply to: a b c d e f g"  # (the mock's whole answer to PROMPT)

# -- a continuation with no room left -----------------------------------------------------------

# With the failover layer above the quota layer, a stream broken after `after_chunks`
# content events is continued on gpt-mock's (claude-mock's) second deployment, and that
# call's input is the prompt plus the text so far, billed again. The broken part costs
# 10 + 2 x its deltas (neither OpenAI's opening role chunk nor Anthropic's message_start,
# content_block_start and ping are deltas). A continuation of "Mock r" has 15 input tokens:
# 22 + 15 > 35, its input alone over the budget. After "Mock " the input fits, 20 + 15 = 35
# (OpenAI), or 20 + 14 = 34 (Anthropic, whose prefill goes without the space), and its
# first delta does not: 37, 36.
NO_ROOM = [("openai", 6), ("openai", 5), ("anthropic", 6), ("anthropic", 5)]
TWO_CLAUDE_DEPLOYMENTS = TWO_DEPLOYMENTS + '''
models["claude-mock"] = [Deployment("anthropic", "claude-3-5-haiku", price=MOCK_PRICE),
                         Deployment("anthropic", "claude-3-5-sonnet", price=MOCK_PRICE)]
'''
FAILOVER_BOTH = FAILOVER.replace("continuation=True)}", "continuation=True), "
                                 "'claude-mock': Route(strategy='priority', continuation=True)}")


def committed(gateway: Gateway, amount: int) -> int | None:
    """The key's budget counter, once it holds `amount` (read until then, or a timeout)."""
    expected: int | None = amount
    return eventually(lambda: gateway.committed(), expected)


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
        read.deltas += bool(chunk.choices[0].delta.content)  # (not the opening role chunk)
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
    # The continuation went upstream and was cut at its first delta, billed its input: 37
    # for a budget of 35; after "Mock ", the budget's last 15 for nothing the caller
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
    assert committed(gateway, cost) == cost


def test_an_anthropic_stream_cut_off_ends_as_the_api_ends_a_failed_one(
        start: Start, slow: MockProviderServer, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    # An Anthropic stream sets max_tokens, and is cut off only where a continuation's input
    # takes its room. Broken after "M" (10 + 2 x 1 = 12), it is continued with an input of
    # 14: the continuation's first four deltas fit (12 + 14 + 2 x 4 = 34; its
    # message_start, content_block_start and ping are none, and the relay drops them), its
    # fifth does not. The error event, the upstream cancelled and the charge are those
    # test_quota_layer and test_quota_billing check of OpenAI streams.
    journal = tmp_path / "journal"
    gateway = start(auth(static_key(CUTOFF_BUDGET)), metering(journal), FAILOVER_BOTH,
                    quota("'memory'"), extra=TWO_CLAUDE_DEPLOYMENTS, upstream=slow.url)
    wait_streams_done(slow)
    cancelled = slow.cancelled_streams
    slow.push_fault(Fault(kind="error_event", provider="anthropic", after_chunks=1))
    response = post(gateway, "anthropic", streamed("anthropic", OUTPUT))
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = response.text.split("\n\n")
    assert events[-1] == ""
    events = events[:-1]
    assert events[0].startswith("event: message_start\n")
    assert [event.startswith("event: content_block_delta\n") for event in events[3:-1]] == \
        [True] * 5  # "M", then the continuation's "ock r"
    assert events[-1].startswith("event: error\ndata: ")
    assert json.loads(events[-1].split("data: ", 1)[1]) == {
        "type": "error", "error": {"type": "billing_error", "message": CUTOFF_MESSAGE}}
    assert "message_stop" not in response.text
    assert len(slow.requests) == 2  # (continued)
    wait_streams_done(slow)
    assert slow.cancelled_streams == cancelled + 1
    cost = billed(journal)
    assert cost == INPUT + 2 * 1 + 14 + 2 * 4 <= BUDGET
    assert committed(gateway, cost) == cost
    # (Nothing was sent after the end: the kernel would log it as an unhandled error.)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


# -- SSE comments ---------------------------------------------------------------------------------

@pytest.mark.parametrize("events,count", [
    (b"data: 1\n\ndata: 2\n\n", 2),
    (b": keepalive\n\ndata: 1\n\n: keepalive\n\n", 1),
    (b": a\n: b\n\n", 0),  # (one block of comments)
    (b"event: x\n: note\ndata: 1\n\n", 1),  # (a comment line inside an event)
    (b"data: 1\n\n\n: keepalive\n\n", 1),  # (an extra blank line before a comment)
    (b'data: {"a":":"}\n\n', 1),
])
def test_the_cut_off_counts_events_not_comments(events: bytes, count: int) -> None:
    assert count_events(events) == count


@pytest.fixture(scope="module")
def keepalive_mock() -> Iterator[MockProviderServer]:
    """The slow mock, with a `: keepalive` comment before each content event."""
    server = MockProviderServer(MockConfig(chunk_delay_s=0.1, chunk_chars=1,
                                           keepalive_comments=True))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def keepalive(keepalive_mock: MockProviderServer) -> MockProviderServer:
    keepalive_mock.config.chunk_chars = 1
    keepalive_mock.clear_faults()
    keepalive_mock.reset_log()
    wait_streams_done(keepalive_mock)  # (an earlier test's stream is not cut in this one)
    return keepalive_mock


def events_and_comments(raw: str) -> tuple[list[str], int]:
    blocks = raw.split("\n\n")
    assert blocks[-1] == ""
    comments = [block for block in blocks[:-1] if block.startswith(":")]
    assert set(comments) == {KEEPALIVE.decode().strip()}
    return [block for block in blocks[:-1] if not block.startswith(":")], len(comments)


def test_keepalive_comments_are_not_counted_as_events(
        start: Start, store: str, keepalive: MockProviderServer) -> None:
    # Each comment was counted as an event, an output token: the stream was ended after 6
    # of the 12 events its budget pays for (test_quota_layer's, without them).
    gateway = start(auth(static_key(CUTOFF_BUDGET)), cutoff_quota(store),
                    upstream=keepalive.url)
    response = post(gateway, "openai", streamed("openai", None))
    assert response.status_code == 200
    events, comments = events_and_comments(response.text)
    assert comments > 0  # (passed on, as the client's SDK skips them)
    assert len(events) == 14  # the role chunk, 12 deltas, then the error event
    assert CUTOFF_MESSAGE in events[-1]
    wait_streams_done(keepalive)


def test_a_stream_within_its_max_tokens_passes_its_keepalive_comments_on_whole(
        start: Start, store: str, keepalive: MockProviderServer) -> None:
    # An Anthropic stream of max_tokens=10 in 16 events, with a comment before each of its
    # 10 content deltas (three characters each, about a token): the 26 are more than the
    # 12 this budget pays for as output tokens, but the provider stops at 10 tokens, and the
    # admission reserved them.
    keepalive.config.chunk_chars = 3
    gateway = start(auth(static_key(CUTOFF_BUDGET)), cutoff_quota(store),
                    upstream=keepalive.url)
    response = post(gateway, "anthropic", streamed("anthropic", OUTPUT))
    assert response.status_code == 200
    events, comments = events_and_comments(response.text)
    assert comments == 10
    assert len(events) == 16
    assert events[-1].startswith("event: message_stop\n")
    assert CUTOFF_MESSAGE not in response.text
    assert committed(gateway, COST) == COST
    wait_streams_done(keepalive)


def test_keepalive_comments_are_not_numbered_in_a_responses_stream(
        start: Start, store: str, keepalive: MockProviderServer) -> None:
    # Each comment was counted as an event: the cut-off's `error` and `response.failed` were
    # numbered past the events the stream had sent, by the comments among them.
    gateway = start(auth(static_key(CUTOFF_BUDGET)), cutoff_quota(store),
                    upstream=keepalive.url)
    with gateway.openai().responses.with_streaming_response.create(
            model="gpt-mock", input=PROMPT[0]["content"], stream=True) as response:
        assert response.status_code == 200
        raw = response.text()
    assert events_and_comments(raw)[1] > 0
    events = stream_events_of(raw)
    assert events[-2][1]["code"] == "budget_exceeded"
    failed = failed_ending(events)  # (numbered on from the events sent, 0, 1, 2, ...)
    assert failed.response.error is not None
    assert failed.response.error.code == "rate_limit_exceeded"
    wait_streams_done(keepalive)


# -- what costs nothing more -----------------------------------------------------------------------

def test_a_cache_hit_is_not_cut_off(start: Start, store: str, mock: MockProviderServer) -> None:
    # A budget of 42 pays for one answer (30: without max_tokens, a request reserves the
    # quota layer's default_max_output_tokens, here 1, so 12, and is billed what it used)
    # and has 12 left for a second, the same: a cache hit, charged nothing. Its replay's
    # deltas (the text in two) counted 10 + 2 x 2 = 14 past those 12: the caller got the
    # cut-off's error and nothing of the answer.
    gateway = start(auth(static_key("Limits(budgets=(Budget('0.000042', period='lifetime', "
                                    "stream_cutoff=True),))")),
                    quota(store, default_max_output_tokens="1"),
                    "Middleware(CacheMiddleware)")
    body = {**streamed("openai", None), "temperature": 0}  # (cached: deterministic)
    first = post(gateway, "openai", body)
    assert first.headers["x-sluicegate-cache"] == "miss"
    assert CUTOFF_MESSAGE not in first.text
    assert committed(gateway, COST) == COST
    hit = post(gateway, "openai", body)
    assert hit.headers["x-sluicegate-cache"] == "hit"
    assert CUTOFF_MESSAGE not in hit.text
    assert hit.text.endswith("data: [DONE]\n\n")
    chunks = stream_events_of(hit.text.removesuffix("data: [DONE]\n\n"))
    assert "".join(chunk["choices"][0]["delta"].get("content") or ""
                   for _, chunk in chunks) == REPLY
    assert len(mock.requests) == 1
    assert committed(gateway, COST) == COST


# -- a stream its admission made room for ---------------------------------------------------------

# A budget of 30 admits exactly one answer of max_tokens=10: the reservation, 10 + 2 x 10,
# is what the answer is billed. This mock streams the reply three characters an event: ten
# content events for its ten tokens, as a provider streams about a token an event. Were
# each event counted as an output token, the stream's opening and closing events would take
# it past its 30 at its end: the cut-off's error in place of the last text, the finish and
# [DONE] (message_stop, response.completed) of an answer the budget had paid for.
EXACT_BUDGET = "Limits(budgets=(Budget('0.000030', period='lifetime', stream_cutoff=True),))"


@pytest.fixture(scope="module")
def token_mock() -> Iterator[MockProviderServer]:
    """A mock that streams its reply about a token (three characters) an event."""
    server = MockProviderServer(MockConfig(chunk_chars=3))
    server.start()
    yield server
    server.stop()


def read_whole_openai_stream(gateway: Gateway) -> None:
    sdk = gateway.openai()
    with sdk.chat.completions.with_streaming_response.create(
            model="gpt-mock", messages=[{"role": "user", "content": PROMPT[0]["content"]}],
            max_tokens=OUTPUT, stream=True) as response:
        raw = response.read()  # (kept: the SDK's stream below reads these bytes)
        chunks = list(response.parse())
    assert raw.endswith(b"data: [DONE]\n\n")
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks
                   if chunk.choices) == REPLY
    assert [chunk.choices[0].finish_reason for chunk in chunks
            if chunk.choices and chunk.choices[0].finish_reason] == ["stop"]


def read_whole_anthropic_stream(gateway: Gateway) -> None:
    with gateway.anthropic().messages.stream(
            model="claude-mock", messages=[{"role": "user", "content": PROMPT[0]["content"]}],
            max_tokens=OUTPUT) as stream:
        events = list(stream)
        message = stream.get_final_message()
    assert events[-1].type == "message_stop"
    assert [block.text for block in message.content if block.type == "text"] == [REPLY]
    assert message.stop_reason == "end_turn"


def read_whole_responses_stream(gateway: Gateway) -> None:
    events = list(gateway.openai().responses.create(
        model="gpt-mock", input=PROMPT[0]["content"], max_output_tokens=OUTPUT, stream=True))
    assert events[-1].type == "response.completed"
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert "".join(event.delta for event in events
                   if event.type == "response.output_text.delta") == REPLY
    assert events[-1].response.output_text == REPLY


READ_WHOLE = {"openai": read_whole_openai_stream, "anthropic": read_whole_anthropic_stream,
              "responses": read_whole_responses_stream}


@pytest.mark.parametrize("api", sorted(READ_WHOLE))
def test_a_stream_its_admission_made_room_for_is_not_cut_off_at_its_end(
        start: Start, store: str, token_mock: MockProviderServer, tmp_path: Path,
        api: str) -> None:
    journal = tmp_path / "journal"
    gateway = start(auth(static_key(EXACT_BUDGET)), metering(journal), quota(store),
                    upstream=token_mock.url)
    READ_WHOLE[api](gateway)  # (an in-band error raises in the SDK)
    assert billed(journal) == COST
    assert committed(gateway, COST) == COST



# -- a provider that goes past max_tokens ---------------------------------------------------------

@pytest.mark.parametrize("api", ["openai", "anthropic"])
def test_a_stream_past_its_max_tokens_is_cut_off_at_its_budget(
        start: Start, store: str, slow: MockProviderServer, tmp_path: Path,
        api: str) -> None:
    # max_tokens=2 reserves 10 + 2 x 2 = 14 of a budget of 25, but the provider ignores it
    # and streams its whole reply, ten deltas (30). The cut-off counted no more output than
    # the caller's max_tokens: the stream ran to its end, billed 30 against a budget of 25.
    # Each delta counted, it is ended before its 8th (10 + 2 x 8 > 25).
    journal = tmp_path / "journal"
    budget = "Limits(budgets=(Budget('0.000025', period='lifetime', stream_cutoff=True),))"
    gateway = start(auth(static_key(budget)), metering(journal), quota(store),
                    upstream=slow.url)
    slow.config.chunk_chars = 3  # (about a token an event, as a provider streams)
    wait_streams_done(slow)
    slow.push_fault(Fault(kind="ignore_max_tokens", provider=api))
    response = post(gateway, api, streamed(api, 2))
    assert response.status_code == 200
    assert CUTOFF_MESSAGE in response.text.split("\n\n")[-2]
    assert deltas(response.content) == 7
    assert billed(journal) == INPUT + 2 * 7 <= 25
    assert committed(gateway, INPUT + 2 * 7) == INPUT + 2 * 7
    wait_streams_done(slow)


# -- streams side by side -------------------------------------------------------------------------

# A budget of 70 admits two streams without max_tokens (each reserves 10 + 2 x 10 = 30) and
# has 10 left. Each stream's reply is 28 one-character deltas (66 in all). Each one could
# spend what was left at its admission on top of its reservation: the first 40 + 30 (all
# of its reply, 66), the second 10 + 30 (15 deltas, 40), 106 in all against 70. What is
# left goes to the first to cross its reservation: 10 + 2 x 15 = 40, and the other is cut
# at its reservation, 10 + 2 x 10 = 30.
SIDE_BY_SIDE_BUDGET = ("Limits(budgets=(Budget('0.000070', period='lifetime', "
                       "stream_cutoff=True),))")


def deltas_until_cut_off(gateway: Gateway, started: threading.Event) -> int:
    """The content deltas an openai SDK client read of a stream without max_tokens before
    its in-band error, which must be the cut-off's; `started` is set at its first chunk."""
    read = 0
    with pytest.raises(openai.APIError) as raised:
        for chunk in gateway.openai().chat.completions.create(
                model="gpt-mock", messages=[{"role": "user", "content": PROMPT[0]["content"]}],
                stream=True):
            started.set()
            read += bool(chunk.choices[0].delta.content)
    assert raised.value.message == CUTOFF_MESSAGE
    return read


def test_streams_side_by_side_spend_no_more_than_the_budget_together(
        start: Start, store: str, slow: MockProviderServer) -> None:
    gateway = start(auth(static_key(SIDE_BY_SIDE_BUDGET)), cutoff_quota(store),
                    upstream=slow.url)
    wait_streams_done(slow)
    first_started, second_started = threading.Event(), threading.Event()
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(deltas_until_cut_off, gateway, first_started)
        assert first_started.wait(10)  # (admitted, and streaming: the second comes beside it)
        second = pool.submit(deltas_until_cut_off, gateway, second_started)
        read = sorted([first.result(), second.result()])
    assert read == [10, 15]
    wait_streams_done(slow)
    assert committed(gateway, 70) == 70  # (10 + 2 x 15, and 10 + 2 x 10)
