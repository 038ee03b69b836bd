"""In-band errors after a stream started, and the health of the deployment that sent them.

Once output went out nothing is retried: the provider's error event ends the stream. What it
says of the deployment follows the rule for errors before output (policy.classify): the
provider's failures (server errors, rate limits) count against its breaker, a request the
caller must fix (a prompt or an image the provider refuses) does not.

Each test gets a gateway of its own (breaker state lives in the layer) over the two mock
servers `a` and `b` (tests/conftest.py); a breaker opens at the first failure.
"""
from __future__ import annotations

from pathlib import Path

import anthropic
import openai
import pytest

from tests.harness import TEST_KEY, ThreadedServer, openai_client, serve
from tests.middleware.test_failover_layer import chat, deployments, failover_config
from tests.mock_providers import Fault, MockProviderServer
from tests.providers.test_responses_streams import failed_ending, stream_events_of

QUESTION = "one two three four five six seven eight nine ten"
OPENS_AT_ONCE = "breaker=BreakerSettings(consecutive_failures=1, cooldown_s=60)"
WITH_FALLBACK = 'routes={"primary": Route(fallbacks=("backup",))}, ' + OPENS_AT_ONCE
# (event, code) of a Responses stream failure: `error.nested` is the live API's `error`
# event, whose type is `invalid_request_error` for a request the caller must fix.
CALLERS = [("response.failed", "invalid_prompt"), ("response.failed", "image_too_large"),
           ("error", "invalid_image_url"), ("error.nested", "invalid_prompt"),
           ("error.nested", "context_length_exceeded")]
PROVIDERS = [("response.failed", "server_error"), ("error.nested", "server_error"),
             ("response.failed", "rate_limit_exceeded"), ("error.nested", "rate_limit_exceeded")]


def responses_failure(event: str, code: str) -> Fault:
    return Fault("error_event", provider="openai", after_chunks=2, event=event, code=code)


def streamed_responses(gateway: ThreadedServer, model: str) -> tuple[list[str], str | None]:
    """The event types the official SDK reads from a streamed `/v1/responses` call, and the
    code of the error that ended it: the last event's (`response.failed`, or the documented
    flat `error` event), or the one the SDK raised (the live API's nested `error` event)."""
    types, code = [], None
    try:
        for event in openai_client(gateway).responses.create(model=model, input=QUESTION,
                                                              stream=True):
            types.append(event.type)
            if event.type == "error":
                code = event.code
            elif event.type == "response.failed":
                code = code or event.response.error.code  # type: ignore[union-attr]
    except openai.APIError as error:
        code = error.code
    return types, code


def health(gateway: ThreadedServer, model: str, index: int = 0) -> tuple[str, int, float]:
    """A deployment's breaker, failures and cool-down left, from `GET /admin/deployments`."""
    state = deployments(gateway)["models"][model]["deployments"][index]  # type: ignore[index]
    return state["breaker"], state["failures"], state["cooling_s"]


@pytest.mark.parametrize("event,code,callers", [*((*case, True) for case in CALLERS),
                                                 *((*case, False) for case in PROVIDERS)])
def test_a_failure_after_output_counts_against_the_deployment_unless_the_caller_must_fix_it(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer, event: str,
        code: str, callers: bool) -> None:
    a.push_fault(responses_failure(event, code))
    with serve(tmp_path, failover_config(a, b, WITH_FALLBACK)) as gateway:
        types, error_code = streamed_responses(gateway, "primary")
        assert types.count("response.output_text.delta") == 2
        assert error_code == code
        # A rate limit in-band has no Retry-After to cool the deployment down for: like a 429
        # without one before output, it is a failure for the breaker only.
        assert health(gateway, "primary") == (("closed", 0, 0) if callers else ("open", 1, 0))
        # The next request goes to it again, unless its breaker opened: then to the fallback.
        response = chat(gateway, "primary")
        assert response.status_code == 200
        assert response.headers.get("x-sluicegate-fallback") == (None if callers else "backup")
    assert (len(a.requests), len(b.requests)) == ((2, 0) if callers else (1, 1))


def test_an_anthropic_error_event_after_output_counts_against_the_deployment(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer) -> None:
    a.push_fault(Fault("error_event", provider="anthropic", after_chunks=2))  # overloaded_error
    with serve(tmp_path, failover_config(a, b, OPENS_AT_ONCE)) as gateway:
        client = anthropic.Anthropic(base_url=gateway.url, api_key=TEST_KEY, max_retries=0)
        types: list[str] = []
        with pytest.raises(anthropic.APIStatusError) as failed, client.messages.stream(
                model="claude-a", max_tokens=100,
                messages=[{"role": "user", "content": QUESTION}]) as stream:
            for event in stream:
                types.append(event.type)
        assert types.count("content_block_delta") == 2
        assert failed.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]
        assert health(gateway, "claude-a") == ("open", 1, 0)


@pytest.mark.parametrize("code,judged", [("invalid_prompt", ("closed", 0, 0)),
                                          ("server_error", ("open", 1, 0))])
def test_a_hedged_streams_failure_after_output_is_judged_as_an_unhedged_ones(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer, code: str,
        judged: tuple[str, int, float]) -> None:
    """A route that hedges runs its calls on copies of the request context (hedge.py): the
    error must come back from the copy for its deployment to be judged."""
    a.push_fault(responses_failure("response.failed", code))
    layer = 'routes={"pair": Route(strategy="priority", hedge_after_s=30)}, ' + OPENS_AT_ONCE
    with serve(tmp_path, failover_config(a, b, layer)) as gateway:
        assert streamed_responses(gateway, "pair")[1] == code
        assert len(a.requests) == 1 and len(b.requests) == 0  # no hedge: a answered at once
        assert health(gateway, "pair", 0) == judged


@pytest.mark.parametrize("code,judged,continued", [("invalid_prompt", ("closed", 0, 0), False),
                                                   (None, ("open", 1, 0), True)])
def test_a_continued_routes_failure_after_output_is_judged_as_any_other(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer, code: str | None,
        judged: tuple[str, int, float], continued: bool) -> None:
    """A route that continues broken chat streams (continuation.py) continues the provider's
    failures elsewhere; a request the caller must fix would be refused there too, and is
    answered with its error, as before output, with no verdict against the deployment."""
    a.push_fault(Fault("error_event", provider="openai", after_chunks=3, code=code))
    layer = 'routes={"primary": Route(fallbacks=("backup",), continuation=True)}, ' + \
        OPENS_AT_ONCE
    with serve(tmp_path, failover_config(a, b, layer)) as gateway:
        text, error_code = streamed_chat(gateway, "primary")
        assert text.startswith("Mock reply to: ")
        assert (error_code, len(b.requests)) == ((None, 1) if continued else (code, 0))
        assert health(gateway, "primary") == judged


def test_a_responses_stream_on_a_continued_route_ends_as_the_live_api_ends_a_failed_one(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer) -> None:
    """Continuation is for chat streams: a Responses stream the gateway breaks off on a route
    that continues streams is not continued, and never ends with the failover layer's
    unnumbered error event, but as the adapter ends it: the `error` event numbered on, then
    `response.failed` for the stream's response."""
    a.push_fault(Fault("reset", provider="openai", after_chunks=2))
    layer = 'routes={"primary": Route(fallbacks=("backup",), continuation=True)}, ' + \
        OPENS_AT_ONCE
    with serve(tmp_path, failover_config(a, b, layer)) as gateway:
        with openai_client(gateway).responses.with_streaming_response.create(
                model="primary", input=QUESTION, stream=True) as response:
            events = stream_events_of(response.text())
        assert events[-2][1]["code"] == "connection_error"
        assert failed_ending(events).response.error is not None
        assert len(b.requests) == 0


def streamed_chat(gateway: ThreadedServer, model: str) -> tuple[str, str | None]:
    """The text the official SDK reads from a streamed chat completion, and the code of the
    error that ended it (None when it ended well)."""
    text, code = "", None
    try:
        for chunk in openai_client(gateway).chat.completions.create(
                model=model, messages=[{"role": "user", "content": QUESTION}], stream=True):
            text += "".join(choice.delta.content or "" for choice in chunk.choices)
    except openai.APIError as error:
        code = error.code
    return text, code


def test_a_continuation_the_caller_must_fix_is_no_failure_of_its_deployment(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer) -> None:
    """The continuation call itself is refused for the request: the stream ends with the
    broken call's error, and the deployment that refused it has no failure to show (its
    breaker stays closed, and so does its count in GET /admin/deployments)."""
    a.push_fault(Fault("error_event", provider="openai", after_chunks=3))
    b.push_fault(Fault("status", provider="openai", status=400,
                       message="Invalid value for 'messages'."))
    layer = 'routes={"primary": Route(fallbacks=("backup",), continuation=True)}, ' + \
        OPENS_AT_ONCE
    with serve(tmp_path, failover_config(a, b, layer)) as gateway:
        text, error_code = streamed_chat(gateway, "primary")
        assert text.startswith("Mock reply to: ") and error_code is not None
        assert len(b.requests) == 1
        assert health(gateway, "primary") == ("open", 1, 0)
        assert health(gateway, "backup") == ("closed", 0, 0)  # (was counted: 1)


def test_a_failure_the_operator_does_not_retry_is_not_continued(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer) -> None:
    """With `retry_on` leaving server errors out, a server error before output is answered
    as it is (policy.FATAL): after output it ends the stream as it is too, though the route
    continues streams. It still counts against its deployment."""
    a.push_fault(Fault("error_event", provider="openai", after_chunks=3))
    layer = ('routes={"primary": Route(fallbacks=("backup",), continuation=True)}, '
             'retry=RetryPolicy(retry_on=frozenset({429})), ' + OPENS_AT_ONCE)
    with serve(tmp_path, failover_config(a, b, layer)) as gateway:
        text, error_code = streamed_chat(gateway, "primary")
        assert text.startswith("Mock reply to: ")
        assert error_code is not None
        assert len(b.requests) == 0  # (was continued there)
        assert health(gateway, "primary") == ("open", 1, 0)


GEMINI_A = '''
providers["a-gemini"] = Provider("gemini", base_url="{url}", api_key_env="MOCK_PROVIDER_KEY",
                                 timeouts=fast)
models["gemini-a"] = [Deployment("a-gemini", "gemini-2.0-flash", price=PRICE)]
'''


@pytest.mark.parametrize("provider,model,code", [
    ("anthropic", "claude-a", "invalid_request_error"),
    ("gemini", "gemini-a", "INVALID_ARGUMENT"),
    ("gemini", "gemini-a", "FAILED_PRECONDITION"),
], ids=["anthropic", "gemini-invalid-argument", "gemini-failed-precondition"])
def test_an_anthropic_or_gemini_error_after_output_the_caller_must_fix_leaves_it_healthy(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer, provider: str,
        model: str, code: str) -> None:
    """Their in-band errors name the caller's fault in their own words: Anthropic's error
    types, Gemini's google.rpc status (an OpenAI client here, translated)."""
    a.push_fault(Fault("error_event", provider=provider, after_chunks=2, code=code))
    extra = GEMINI_A.format(url=a.base_url("gemini"))
    with serve(tmp_path, failover_config(a, b, OPENS_AT_ONCE, extra)) as gateway:
        text, error_code = streamed_chat(gateway, model)
        assert text and error_code is not None  # the error came after output
        assert health(gateway, model) == ("closed", 0, 0)
