"""OpenAI embeddings requests served by Gemini, through the gateway.

OpenAI takes up to 2,048 inputs per request; Gemini's batchEmbedContents at most 100. The
gateway sends batches of 100 and answers as one: the embeddings in input order, indexed
across batches, the usage of all of them. A batch that fails fails the request, which is
billed the batches Gemini answered (Gemini bills them): the ledger's record of it (the
metering journal) has their input at their deployment's price, and a retry elsewhere adds
its own call's at its own price. Gemini says no usage: the input is counted, with the
deployment's tokenizer where it has one.
"""
from __future__ import annotations

import base64
import struct
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from gateway import create_app
from middleware.metering import UsageRecord
from tests.harness import TEST_KEY, ThreadedServer, mock_config, write_config
from tests.middleware.test_exact_billing_sweep import wait_until
from tests.middleware.test_metering_below_failover import journaled
from tests.mock_providers import Fault, MockConfig, MockProviderServer
from tests.mock_providers.behaviour import embed

TEXTS = [f"text number {n} of the batch" for n in range(250)]


def client(server: ThreadedServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=TEST_KEY, max_retries=0)


def batch_sizes(mock: MockProviderServer) -> list[int]:
    return sorted((len(r["json"]["requests"]) for r in mock.requests
                   if r["path"].endswith(":batchEmbedContents")), reverse=True)


def test_more_inputs_than_one_gemini_batch_are_sent_in_batches_of_100(
        gateway: ThreadedServer, mock: MockProviderServer) -> None:
    result = client(gateway).embeddings.create(model="gemini-embed", input=TEXTS,
                                               dimensions=4)
    assert batch_sizes(mock) == [100, 100, 50]
    assert [item.index for item in result.data] == list(range(250))
    assert [item.embedding for item in result.data] == [embed(text, 4) for text in TEXTS]
    # The usage of the whole input: what the three parts cost asked one by one.
    parts = [client(gateway).embeddings.create(model="gemini-embed", input=TEXTS[at:at + 100])
             for at in (0, 100, 200)]
    assert result.usage.prompt_tokens == sum(part.usage.prompt_tokens for part in parts) > 0


def test_batched_embeddings_in_base64(gateway: ThreadedServer, mock: MockProviderServer) -> None:
    result = client(gateway).embeddings.with_raw_response.create(
        model="gemini-embed", input=TEXTS[:101], encoding_format="base64").parse()
    assert batch_sizes(mock) == [100, 1]
    decoded = [list(struct.unpack("<8f", base64.b64decode(item.embedding)))  # type: ignore[arg-type]
               for item in result.data]
    assert decoded == [embed(text) for text in TEXTS[:101]]


def test_a_failing_batch_fails_the_request(gateway: ThreadedServer,
                                           mock: MockProviderServer) -> None:
    mock.push_fault(Fault("status", provider="gemini", status=429, retry_after_s=3))
    with pytest.raises(openai.RateLimitError) as failure:
        client(gateway).embeddings.create(model="gemini-embed", input=TEXTS)
    assert failure.value.response.headers["retry-after"] == "3"
    assert "Provider 'gemini' returned 429" in failure.value.message


# `embed-words`: a Gemini deployment with a tokenizer of its own. `embed-pair`: two Gemini
# deployments priced apart ($1 and $3 per 1M input tokens: a
# micro-dollar and three a token), called in that order, each call's failure retried once
# on the other.
METERED = '''
from middleware.failover import Route
class Words:  # a stand-in tokenizer: a token a word
    def encode(self, text):
        return text.split()
models["embed-words"] = [Deployment("gemini", "text-embedding-004", price=Price("1", "2"),
                                    tokenizer=Words())]
models["embed-pair"] = [Deployment("gemini", "text-embedding-004", price=Price("1", "2")),
                        Deployment("gemini", "gemini-embedding-001", price=Price("3", "5"))]
middleware = [
    Middleware(AuthMiddleware, keys=[StaticKey("tests", key_env="SG_TEST_KEY")]),
    Middleware(MeteringMiddleware, journal_dir=JOURNAL, flush_interval_s=0.05),
    Middleware(FailoverMiddleware, breaker=NEVER_OPENS, retry=RetryPolicy(max_attempts=2),
               routes={"embed-pair": Route(strategy="priority")}),
]
'''


@pytest.fixture(scope="module")
def billing_mock() -> Iterator[MockProviderServer]:
    with MockProviderServer(MockConfig(record_bills=True)) as server:
        yield server


@pytest.fixture(scope="module")
def metered(tmp_path_factory: pytest.TempPathFactory,
            billing_mock: MockProviderServer) -> Iterator[tuple[ThreadedServer, Path]]:
    """A gateway that meters into a journal, on the billing mock: (server, journal)."""
    directory = tmp_path_factory.mktemp("metered")
    extra = f"JOURNAL = {str(directory / 'journal')!r}\n" + METERED
    text = mock_config(f"http://127.0.0.1:{billing_mock.port}", middleware="none", extra=extra)
    with ThreadedServer(create_app(write_config(directory, text))) as server:
        yield server, directory / "journal"


def record_of(journal: Path, request_id: str) -> UsageRecord:
    assert wait_until(lambda: any(r.request_id == request_id for r in journaled(journal)))
    [record] = [r for r in journaled(journal) if r.request_id == request_id]
    return record


def answered_inputs(mock: MockProviderServer) -> list[int]:
    """The inputs of each batch Gemini answered whole, as the gateway read it."""
    return [len(bill["json"]["requests"]) for bill in mock.bills
            if bill["status"] == 200 and bill["complete"] and not bill["cancelled"]]


def test_a_failed_request_is_billed_the_batches_gemini_answered_in_each_call(
        metered: tuple[ThreadedServer, Path], billing_mock: MockProviderServer) -> None:
    server, journal = metered
    # What the first two batches cost asked on their own (a request that answers).
    alone = client(server).embeddings.create(model="gemini-embed", input=TEXTS[:200])
    billing_mock.reset_log()
    # Both calls (the request's and its retry): the third batch fails at once, the other two
    # answer after that failure.
    for _ in range(2):
        billing_mock.push_fault(Fault("status", provider="gemini", status=429,
                                      match="text number 249 "))
        for marker in ("text number 0 ", "text number 100 "):
            billing_mock.push_fault(Fault("slow_first_byte", provider="gemini", delay_s=0.5,
                                          match=marker))
    with pytest.raises(openai.RateLimitError) as failure:
        client(server).embeddings.create(model="gemini-embed", input=TEXTS)
    assert sorted(answered_inputs(billing_mock)) == [100, 100, 100, 100]
    record = record_of(journal, failure.value.response.headers["x-request-id"])
    assert (record.status, record.attempts) == (429, 2)
    assert alone.usage.prompt_tokens > 0
    assert (record.input_tokens, record.cost_micros) == (2 * alone.usage.prompt_tokens,
                                                        2 * alone.usage.prompt_tokens)


def test_a_retry_elsewhere_bills_each_call_once_at_its_own_price(
        metered: tuple[ThreadedServer, Path], billing_mock: MockProviderServer) -> None:
    server, journal = metered
    sdk = client(server)
    first_two = sdk.embeddings.create(model="gemini-embed", input=TEXTS[:200]).usage
    every = sdk.embeddings.create(model="gemini-embed", input=TEXTS).usage
    billing_mock.reset_log()
    # The first deployment answers two batches of three, the second all three.
    billing_mock.push_fault(Fault("status", provider="gemini", status=429,
                                  match="text number 249 "))
    raw = sdk.embeddings.with_raw_response.create(model="embed-pair", input=TEXTS)
    result = raw.parse()
    assert [item.embedding for item in result.data] == [embed(text) for text in TEXTS]
    assert result.usage.prompt_tokens == every.prompt_tokens  # (the caller sees its answer's)
    assert sorted(answered_inputs(billing_mock)) == [50, 100, 100, 100, 100]
    record = record_of(journal, raw.headers["x-request-id"])
    assert (record.status, record.attempts, record.deployment) == (200, 2, "gemini/gemini-embedding-001")
    assert record.input_tokens == first_two.prompt_tokens + every.prompt_tokens
    assert record.cost_micros == first_two.prompt_tokens * 1 + every.prompt_tokens * 3


def test_a_retry_that_fails_too_bills_both_calls_answered_batches(
        metered: tuple[ThreadedServer, Path], billing_mock: MockProviderServer) -> None:
    server, journal = metered
    sdk = client(server)
    first_two = sdk.embeddings.create(model="gemini-embed", input=TEXTS[:200]).usage
    last_two = sdk.embeddings.create(model="gemini-embed", input=TEXTS[100:]).usage
    billing_mock.reset_log()
    # The first deployment answers the first two batches, the second the last two.
    billing_mock.push_fault(Fault("status", provider="gemini", status=429,
                                  match="text number 249 "))
    billing_mock.push_fault(Fault("status", provider="gemini", status=503, match=(
        'gemini-embedding-001","content":{"parts":[{"text":"text number 0 ')))
    with pytest.raises(openai.InternalServerError) as failure:
        sdk.embeddings.create(model="embed-pair", input=TEXTS)
    assert sorted(answered_inputs(billing_mock)) == [50, 100, 100, 100]
    record = record_of(journal, failure.value.response.headers["x-request-id"])
    assert (record.status, record.attempts) == (503, 2)
    assert record.input_tokens == first_two.prompt_tokens + last_two.prompt_tokens
    assert record.cost_micros == first_two.prompt_tokens * 1 + last_two.prompt_tokens * 3


def test_the_input_is_counted_with_the_deployments_tokenizer(
        metered: tuple[ThreadedServer, Path]) -> None:
    server, journal = metered
    texts = [" ".join(["word"] * words) for words in range(1, 151)]  # (two batches)
    raw = client(server).embeddings.with_raw_response.create(model="embed-words", input=texts)
    words = sum(range(1, 151))  # (the heuristic, a token per 4 bytes, says 14,175)
    assert raw.parse().usage.prompt_tokens == words
    record = record_of(journal, raw.headers["x-request-id"])
    assert (record.input_tokens, record.cost_micros) == (words, words)
