"""providers/openai.py without a server: what a planned request to each service holds.

(The tests through the gateway, against the mock providers, are in test_cross_provider.py;
Mistral's own host cannot be reached from tests, so what it is sent is read off the plan.)
"""
from __future__ import annotations

from typing import Any

import orjson
import pytest

from gateway.context import OPENAI_CHAT, RequestContext
from gateway.upstream import Deployment
from providers import Provider

QUESTION = [{"role": "user", "content": "Hello"}]


def planned_body(provider: Any, **body: Any) -> dict[str, Any]:
    """The JSON body `provider` would send for an OpenAI chat request with `body`."""
    body = {"model": "public", "messages": QUESTION, **body}
    ctx = RequestContext(request_id="r", operation=OPENAI_CHAT, api_format="openai", body=body,
                         raw_body=orjson.dumps(body), model="public",
                         stream=body.get("stream") is True)
    exchange = provider.plan(ctx, Deployment("p", "upstream-model"))
    return orjson.loads(exchange.body)  # type: ignore[no-any-return]


@pytest.mark.parametrize("base_url", ["https://api.mistral.ai/v1", "https://API.Mistral.ai:443/v1/",
                                      "https://codestral.mistral.ai/v1"])
@pytest.mark.parametrize("client_asks", [False, True])
def test_a_generic_openai_compatible_provider_on_mistrals_api_gets_no_stream_options(
        base_url: str, client_asks: bool) -> None:
    """Mistral's API refuses `stream_options` (422, "Extra inputs are not permitted") whatever
    the provider type is called in the config: its host decides."""
    extra = {"stream_options": {"include_usage": True}} if client_asks else {}
    body = planned_body(Provider("openai-compatible", base_url=base_url), stream=True, **extra)
    assert "stream_options" not in body
    assert body["model"] == "upstream-model"


@pytest.mark.parametrize("base_url", ["https://api.groq.com/openai/v1",
                                      "https://mistral.example.com/v1",
                                      "http://127.0.0.1:8000/v1"])
def test_other_openai_compatible_hosts_are_still_asked_for_the_usage_chunk(
        base_url: str) -> None:
    body = planned_body(Provider("openai-compatible", base_url=base_url), stream=True)
    assert body["stream_options"] == {"include_usage": True}


def test_the_mistral_preset_on_any_host_gets_no_stream_options() -> None:
    body = planned_body(Provider("mistral", base_url="http://127.0.0.1:9/mistral/v1"),
                        stream=True, stream_options={"include_usage": True})
    assert "stream_options" not in body


# -- a Responses stream's error event: the status it would have had as a response ---------------

@pytest.mark.parametrize(("event", "status", "kind"), [
    # The live API's rate limit (vercel/ai#6534): its `type` says nothing, its code does.
    ({"type": "error", "sequence_number": 2, "error": {
        "type": "tokens", "code": "rate_limit_exceeded", "param": None,
        "message": "Request too large for gpt-4.1 on tokens per min (TPM)"}}, 429, "tokens"),
    # An input over the context window (openai/openai-dotnet#849): the caller's to fix.
    ({"type": "error", "sequence_number": 2, "error": {
        "type": "invalid_request_error", "code": "context_length_exceeded", "param": "input",
        "message": "Your input exceeds the context window of this model."}}, 400,
     "invalid_request_error"),
    # A ResponseError has a code and no type: the caller's type is its status's.
    ({"type": "response.failed", "sequence_number": 3, "response": {
        "status": "failed", "error": {"code": "invalid_prompt", "message": "Flagged."}}}, 400,
     "invalid_request_error"),
    ({"type": "response.failed", "sequence_number": 3, "response": {
        "status": "failed", "error": {"code": "vector_store_timeout", "message": "Slow."}}}, 502,
     "server_error"),
])
def test_a_responses_error_event_has_the_status_its_type_or_code_says(
        event: dict[str, Any], status: int, kind: str) -> None:
    from providers.openai import _responses_error

    adapter = Provider("openai", base_url="http://127.0.0.1:9/v1")
    found = _responses_error(event)
    assert found is not None
    error = adapter._stream_error(found, "Provider 'openai' reported an error in its stream")
    assert error.status == status
    assert error.retryable is (status >= 500 or status == 429)
    assert error.body("openai")["error"]["type"] == kind


# -- what the adapter takes out of a provider's error message -----------------------------------

# OpenAI's live rate-limit messages name the operator's organization and project
# (vercel/ai#6534; prism-php/prism's recorded stream-unknown-error-responses-1).
TOO_LARGE = ("Request too large for gpt-4o in project proj_f4H0b30rYp2y52CGw64BafkL "
             "organization org-H9rGLigVW0aTEjgfHIg3Ircj on tokens per min (TPM).")


@pytest.mark.parametrize(("said", "shown"), [
    (TOO_LARGE, TOO_LARGE.replace("proj_f4H0b30rYp2y52CGw64BafkL", "[redacted]")
     .replace("org-H9rGLigVW0aTEjgfHIg3Ircj", "[redacted]")),
    # A key fragment with an ellipsis, and OpenAI's asterisk-masked key.
    ("Incorrect API key provided: sk-abc...xyz.", "Incorrect API key provided: [redacted]."),
    ("Incorrect API key provided: sk-proj-" + "*" * 40 + "abcd.",
     "Incorrect API key provided: [redacted]."),
    # Words alone stay.
    ("Your keys... org-wide limits, proj_x", "Your keys... org-wide limits, proj_x"),
    # Letters that spell a key's prefix inside a word are not a key.
    ("Ask-me-anything mode and monkey_business_2024 are not supported.",
     "Ask-me-anything mode and monkey_business_2024 are not supported."),
    ("Bad key (sk-live-0123456789abcdef) and AIzaSyA0123456789abcdef.",
     "Bad key ([redacted]) and [redacted]."),
])
def test_provider_error_messages_lose_keys_and_account_ids(said: str, shown: str) -> None:
    assert Provider("openai", base_url="http://127.0.0.1:9/v1").redact(said) == shown
