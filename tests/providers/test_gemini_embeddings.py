"""OpenAI embeddings requests served by Gemini, through the gateway.

OpenAI takes up to 2,048 inputs per request; Gemini's batchEmbedContents at most 100. The
gateway sends batches of 100 and answers as one: the embeddings in input order, indexed
across batches, the usage of all of them.
"""
from __future__ import annotations

import base64
import struct

import openai
import pytest

from tests.harness import TEST_KEY, ThreadedServer
from tests.mock_providers import Fault, MockProviderServer
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
