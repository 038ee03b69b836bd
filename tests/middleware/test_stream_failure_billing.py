"""A stream that fails before its response starts costs nothing, whatever its opening said.

The mock Anthropic API opens the stream (`message_start`, with the input count) and then
sends an `overloaded_error` event, before any content. Metered in the journal, behind the
failover layer (one attempt), the request costs nothing for every caller: an Anthropic
caller (the stream passed through), and an OpenAI caller (translated, whose codec reads a
usage out of `message_start` at once; it was billed that input and one output token). Then
the same caller's next request, which the provider answers, is billed its own usage alone.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from gateway import create_app
from middleware.metering import UsageRecord
from tests.harness import TEST_KEY, ThreadedServer, mock_config, write_config
from tests.middleware.test_exact_billing_sweep import wait_until
from tests.middleware.test_metering_below_failover import journaled
from tests.mock_providers import Fault, MockConfig, MockProviderServer

PROMPT = [{"role": "user", "content": "tell me a story about a lighthouse keeper please"}]


@pytest.fixture(scope="module")
def mock() -> Iterator[MockProviderServer]:
    with MockProviderServer(MockConfig()) as server:
        yield server


def stream_once(url: str, api: str) -> Any:
    if api == "openai":
        client: Any = openai.OpenAI(base_url=url + "/v1", api_key=TEST_KEY, max_retries=0)
        return list(client.chat.completions.create(
            model="claude-mock", messages=PROMPT, max_tokens=20, stream=True,
            stream_options={"include_usage": True}))
    client = anthropic.Anthropic(base_url=url, api_key=TEST_KEY, max_retries=0)
    return list(client.messages.create(model="claude-mock", messages=PROMPT, max_tokens=20,
                                       stream=True))


@pytest.mark.parametrize("api", ["openai", "anthropic"])
def test_a_stream_that_fails_before_its_response_starts_costs_nothing(
        mock: MockProviderServer, tmp_path: Path, api: str) -> None:
    metering = (f"Middleware(MeteringMiddleware, journal_dir={str(tmp_path / 'journal')!r}, "
                f"flush_interval_s=0.05)")
    layers = (f"[Middleware(AuthMiddleware, keys=[StaticKey('tests', key_env='SG_TEST_KEY')]), "
              f"{metering}, Middleware(FailoverMiddleware, retry=RetryPolicy(max_attempts=1), "
              f"breaker=NEVER_OPENS)]")
    app = create_app(write_config(tmp_path, mock_config(mock.url, middleware=layers)))
    with ThreadedServer(app) as server:
        mock.push_fault(Fault("error_event", provider="anthropic", after_chunks=0))
        with pytest.raises((openai.APIStatusError, anthropic.APIStatusError)) as failed:
            stream_once(server.url, api)
        assert failed.value.status_code == 529
        stream_once(server.url, api)  # (answered)

        def records() -> list[UsageRecord]:
            return journaled(tmp_path / "journal")
        assert wait_until(lambda: len(records()) == 2)
    failure, answer = sorted(records(), key=lambda record: record.status != 529)
    assert (failure.status, failure.input_tokens, failure.output_tokens,
            failure.cost_micros) == (529, 0, 0, 0)
    assert answer.status == 200 and answer.input_tokens > 0 and answer.output_tokens > 0
    assert answer.cost_micros == answer.input_tokens + 2 * answer.output_tokens
