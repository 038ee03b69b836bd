"""OpenAI Responses API streams (`/v1/responses`) that fail, through the gateway.

A Responses stream fails with `response.failed` (its error under `response.error`) or with
the API's `error` event (documented flat, sent nested by the live API), which the live API
follows with `response.failed`. Before any output
that is an ordinary error the failover layer retries elsewhere, unseen by the client; after
it, the provider's event goes to the client as it was and ends the stream, recorded with the
provider's error type and counted against its deployment. `response.incomplete` is a normal
end.
"""
from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.responses import ResponseFailedEvent

from gateway import create_app
from middleware.metering.journal import Journal
from middleware.metering.record import UsageRecord
from tests.harness import (
    AUTH,
    TEST_KEY,
    ThreadedServer,
    config_head,
    openai_client,
    write_config,
)
from tests.mock_providers import Fault, MockProviderServer

ADMIN_TOKEN = "responses-admin-token-0123456789"
QUESTION = "one two three four five six seven eight nine ten"
REPLY = "Mock reply to: " + QUESTION
FAILURES = ["response.failed", "error", "error.nested"]
MESSAGE = "The model had a problem; try again."


# (`a` and `b`: two mock provider servers, tests/conftest.py)


def config(a: MockProviderServer, b: MockProviderServer, journal: Path) -> str:
    """`primary` (on a) falls back to `backup` (on b); a breaker opens at one failure; the
    metering layer journals every request."""
    return f'''
{config_head("SG_RESPONSES_ADMIN", ADMIN_TOKEN)}providers = {{
    "a": Provider("openai", base_url="{a.base_url("openai")}", api_key_env="MOCK_PROVIDER_KEY",
                  timeouts=fast),
    "b": Provider("openai", base_url="{b.base_url("openai")}", api_key_env="MOCK_PROVIDER_KEY",
                  timeouts=fast),
}}
models = {{
    "primary": [Deployment("a", "gpt-4o-mini", price=PRICE)],
    "backup": [Deployment("b", "gpt-4o-mini", price=PRICE)],
}}
middleware = [
    Middleware(AuthMiddleware, keys=[StaticKey("tests", key_env="SG_TEST_KEY")]),
    Middleware(MeteringMiddleware, journal_dir={str(journal)!r}, flush_interval_s=0.05),
    Middleware(FailoverMiddleware, admin_token_env="SG_RESPONSES_ADMIN",
               routes={{"primary": Route(fallbacks=("backup",))}},
               breaker=BreakerSettings(consecutive_failures=1, cooldown_s=60)),
]
'''


@contextmanager
def serve(tmp_path: Path, a: MockProviderServer, b: MockProviderServer,
          idle_s: float = 5) -> Iterator[tuple[ThreadedServer, Path]]:
    """The gateway of `config`, its providers' longest idle gap in a stream `idle_s`."""
    journal = tmp_path / "journal"
    path = write_config(tmp_path, config(a, b, journal).replace("idle_s=5", f"idle_s={idle_s}"))
    with ThreadedServer(create_app(path)) as server:
        yield server, journal


def stream_events(url: str, **body: Any) -> tuple[httpx.Response, list[tuple[str | None,
                                                                              dict[str, Any]]]]:
    """The (event name, data) of every event of a streamed `/v1/responses` call."""
    with httpx.stream("POST", url + "/v1/responses", headers=AUTH, timeout=30,
                      json={"model": "primary", "input": QUESTION, "stream": True,
                            **body}) as response:
        raw = response.read().decode()
    return response, stream_events_of(raw)


def stream_events_of(raw: str) -> list[tuple[str | None, dict[str, Any]]]:
    """The (event name, data) of each SSE event in `raw`."""
    events = []
    for block in raw.split("\n\n"):
        name = next((line[7:] for line in block.split("\n") if line.startswith("event: ")), None)
        data = [line[6:] for line in block.split("\n") if line.startswith("data: ")]
        if data:
            events.append((name, json.loads("\n".join(data))))
    return events


def breaker_of(server: ThreadedServer, model: str) -> str:
    state = httpx.get(server.url + "/admin/deployments",
                      headers={"authorization": f"Bearer {ADMIN_TOKEN}"}).json()
    return str(state["models"][model]["deployments"][0]["breaker"])


def journaled_record(journal: Path, request_id: str, timeout_s: float = 5.0) -> UsageRecord:
    """The one usage record of `request_id` in the gateway's (one) journal slot."""
    deadline = time.monotonic() + timeout_s
    while True:
        found: list[UsageRecord] = []
        for slot in sorted(journal.glob("slot-*")):
            reader = Journal(slot, read_only=True)
            reader.open()
            try:
                found += [r for r in (UsageRecord.decode(p) for _, p in reader.pending())
                          if r.request_id == request_id]
            finally:
                reader.close()
        if found or time.monotonic() > deadline:
            [record] = found
            return record
        time.sleep(0.02)


def failure_fault(event: str, after_chunks: int, code: str = "server_error") -> Fault:
    return Fault("error_event", provider="openai", after_chunks=after_chunks, event=event,
                 code=code, message=MESSAGE)


# -- before any output: an ordinary error, which the failover layer retries ---------------------

@pytest.mark.parametrize("event", FAILURES)
def test_a_failure_before_any_output_fails_over_invisibly(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer, event: str) -> None:
    a.push_fault(failure_fault(event, after_chunks=0))
    with serve(tmp_path, a, b) as (gateway, journal):
        response, events = stream_events(gateway.url)
        assert response.status_code == 200
        kinds = [data["type"] for _, data in events]
        assert kinds[-1] == "response.completed" and "error" not in kinds
        assert "response.failed" not in kinds
        assert "".join(d["delta"] for _, d in events
                       if d["type"] == "response.output_text.delta") == REPLY
        assert response.headers["x-sluicegate-fallback"] == "backup"
        assert len(a.requests) == 1 and len(b.requests) == 1
        assert breaker_of(gateway, "primary") == "open"  # a's failure counted
        record = journaled_record(journal, response.headers["x-request-id"])
        assert (record.status, record.error_type, record.attempts, record.deployment) == \
            (200, None, 2, "b/gpt-4o-mini")
        # The official SDK sees one clean stream.
        a.push_fault(failure_fault(event, after_chunks=0))
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=TEST_KEY, max_retries=0)
        with client.responses.stream(model="backup", input=QUESTION) as stream:
            assert stream.get_final_response().output_text == REPLY


@pytest.mark.parametrize("event,code,status", [
    ("response.failed", "server_error", 502), ("response.failed", "rate_limit_exceeded", 429),
    ("error", "server_error", 502), ("error.nested", "server_error", 502)])
def test_a_failure_before_any_output_without_a_fallback_is_an_error_response(
        gateway: ThreadedServer, mock: MockProviderServer, event: str, code: str,
        status: int) -> None:
    mock.push_fault(failure_fault(event, after_chunks=0, code=code))
    response = httpx.post(gateway.url + "/v1/responses", headers=AUTH, timeout=30,
                          json={"model": "gpt-mock", "input": QUESTION, "stream": True})
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["code"] == code
    assert error["message"] == f"Provider 'openai' reported an error in its stream: {MESSAGE}"


@pytest.mark.parametrize("event,code", [
    ("response.failed", "invalid_prompt"), ("response.failed", "image_too_large"),
    ("error", "invalid_prompt"), ("error.nested", "invalid_prompt"),
    ("error.nested", "context_length_exceeded")])
def test_a_failure_the_caller_must_fix_is_its_400_and_never_fails_over(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer, event: str,
        code: str) -> None:
    """A prompt the provider refuses (ResponseError codes `invalid_prompt` and the image
    ones, or an `error` event of type `invalid_request_error`) fails the same everywhere:
    the caller gets the 400 a non-stream call gets, and the deployment stays healthy."""
    a.push_fault(failure_fault(event, after_chunks=0, code=code))
    with serve(tmp_path, a, b) as (gateway, journal):
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=TEST_KEY, max_retries=0)
        with pytest.raises(openai.BadRequestError) as refused:
            list(client.responses.create(model="primary", input=QUESTION, stream=True))
        assert refused.value.status_code == 400
        assert refused.value.body == {  # type: ignore[comparison-overlap]
            "message": f"Provider 'a' reported an error in its stream: {MESSAGE}",
            "type": "invalid_request_error", "param": None, "code": code}
        assert len(a.requests) == 1 and len(b.requests) == 0
        assert "x-sluicegate-fallback" not in refused.value.response.headers
        assert breaker_of(gateway, "primary") == "closed"
        record = journaled_record(journal, refused.value.response.headers["x-request-id"])
        assert (record.status, record.error_type, record.attempts) == (
            400, "invalid_request_error", 1)


# -- after output: the provider's event ends the stream -------------------------------------------

@pytest.mark.parametrize("event", FAILURES)
def test_a_failure_after_output_ends_the_stream_with_the_providers_event(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer, event: str) -> None:
    a.push_fault(failure_fault(event, after_chunks=2))
    with serve(tmp_path, a, b) as (gateway, journal):
        response, events = stream_events(gateway.url)
        assert response.status_code == 200
        deltas = [d for _, d in events if d["type"] == "response.output_text.delta"]
        assert len(deltas) == 2
        # The provider's own events, as it sent them, and nothing after them: an `error`
        # event and the `response.failed` the live API follows it with, or that alone.
        ending = ["error", "response.failed"] if event.startswith("error") \
            else ["response.failed"]
        assert [name for name, _ in events[-len(ending):]] == ending
        assert [data["type"] for _, data in events[-len(ending):]] == ending
        numbers = [data["sequence_number"] for _, data in events]
        assert numbers == list(range(len(events)))
        assert events[-1][1]["response"]["error"] == {"code": "server_error", "message": MESSAGE}
        assert all("type" in data for _, data in events)  # no chat-style error added
        assert sum(d["type"] in ("error", "response.failed") for _, d in events) == len(ending)
        assert len(b.requests) == 0  # nothing is retried once output went out
        assert breaker_of(gateway, "primary") == "open"
        record = journaled_record(journal, response.headers["x-request-id"])
        assert (record.status, record.error_type) == (200, "server_error")


@pytest.mark.parametrize("event", ["error", "error.nested"])
def test_after_an_error_event_the_sdk_sees_the_failed_response(
        gateway: ThreadedServer, mock: MockProviderServer, event: str) -> None:
    """The openai SDK raises on the live API's nested `error` event; it yields the
    documented flat one as a typed event and then, as from the API itself, the
    `response.failed` that ends the stream: the failed response, with its error."""
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=TEST_KEY, max_retries=0)
    mock.push_fault(failure_fault(event, after_chunks=2, code="rate_limit_exceeded"))
    received: list[Any] = []
    if event == "error.nested":
        with pytest.raises(openai.APIError) as failure:
            received.extend(client.responses.create(model="gpt-mock", input=QUESTION,
                                                    stream=True))
        assert (failure.value.message, failure.value.code) == (MESSAGE, "rate_limit_exceeded")
        return
    received.extend(client.responses.create(model="gpt-mock", input=QUESTION, stream=True))
    error, failed = received[-2:]
    assert (error.type, error.code, error.message) == ("error", "rate_limit_exceeded", MESSAGE)
    assert failed.type == "response.failed"
    assert failed.sequence_number == error.sequence_number + 1
    assert failed.response.status == "failed"
    assert (failed.response.error.code, failed.response.error.message) == (
        "rate_limit_exceeded", MESSAGE)


PROVIDER_KEY = "provider-secret-123456789"  # the mock provider's key (tests/harness.py)
KEY_LIKE = "sk-proj-" + "a1B2c3D4" * 4
ORG = "org-H9rGLigVW0aTEjgfHIg3Ircj"  # (as OpenAI's rate-limit messages name it)


@pytest.mark.parametrize("event", FAILURES)
@pytest.mark.parametrize("after_chunks", [0, 2])
def test_the_providers_error_event_reaches_the_client_redacted(
        gateway: ThreadedServer, mock: MockProviderServer, event: str, after_chunks: int) -> None:
    """Provider error messages may quote the key they were sent: it never reaches the
    caller, whether the gateway renders the error (before any output) or passes the
    provider's own events on (after it), as it never does in a non-stream error."""
    said = f"Incorrect API key provided: {PROVIDER_KEY}. Or was it {KEY_LIKE}? ({ORG})"
    mock.push_fault(Fault("error_event", provider="openai", after_chunks=after_chunks,
                          event=event, code="server_error", message=said))
    response = httpx.post(gateway.url + "/v1/responses", headers=AUTH, timeout=30,
                          json={"model": "gpt-mock", "input": QUESTION, "stream": True})
    assert PROVIDER_KEY not in response.text and KEY_LIKE not in response.text
    assert ORG not in response.text
    clean = "Incorrect API key provided: [redacted]. Or was it [redacted]? ([redacted])"
    if after_chunks == 0:
        assert response.json()["error"]["message"] == \
            f"Provider 'openai' reported an error in its stream: {clean}"
        return
    events = stream_events_of(response.text)
    deltas = [d["delta"] for _, d in events if d["type"] == "response.output_text.delta"]
    assert "".join(deltas) == REPLY[:16]  # (the output before it untouched)
    messages = [d.get("message") or d.get("error", {}).get("message") for _, d in events
                if d["type"] == "error"]
    messages += [d["response"]["error"]["message"] for _, d in events
                 if d["type"] == "response.failed"]
    assert messages == [clean] * (2 if event.startswith("error") else 1)
    # The official SDK's view of it.
    mock.push_fault(Fault("error_event", provider="openai", after_chunks=2, event=event,
                          code="server_error", message=said))
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=TEST_KEY, max_retries=0)
    if event == "error.nested":
        with pytest.raises(openai.APIError) as failure:
            list(client.responses.create(model="gpt-mock", input=QUESTION, stream=True))
        assert failure.value.message == clean
    else:
        last = list(client.responses.create(model="gpt-mock", input=QUESTION, stream=True))[-1]
        assert last.response.error.message == clean  # type: ignore[union-attr]


def test_response_incomplete_is_a_normal_end_with_its_usage(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer) -> None:
    """`response.incomplete`: a response that ran out of `max_output_tokens` (OpenAI takes
    16 at least), its usage in the event."""
    words = " ".join(f"w{n}" for n in range(30))
    with serve(tmp_path, a, b) as (gateway, journal):
        response, events = stream_events(gateway.url, input=words, max_output_tokens=16)
        name, last = events[-1]
        assert (name, last["type"], last["response"]["status"]) == (
            "response.incomplete", "response.incomplete", "incomplete")
        assert last["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
        record = journaled_record(journal, response.headers["x-request-id"])
        assert (record.status, record.error_type) == (200, None)
        assert (record.input_tokens, record.output_tokens) == (
            last["response"]["usage"]["input_tokens"], 16)
        assert breaker_of(gateway, "primary") == "closed"
        assert len(b.requests) == 0


def failed_ending(events: list[tuple[str | None, dict[str, Any]]]) -> ResponseFailedEvent:
    """The stream's last event, a `response.failed` as the openai SDK's own type reads it
    (every field a Response needs), after an `error` event and numbered on from it, for the
    response the stream's `response.created` opened."""
    (error_name, error), (failed_name, failed) = events[-2:]
    assert (error_name, error["type"], failed_name) == ("error", "error", "response.failed")
    ending = ResponseFailedEvent.model_validate(failed)
    assert ending.sequence_number == error["sequence_number"] + 1
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    assert ending.response.id == events[0][1]["response"]["id"]
    assert ending.response.status == "failed"
    return ending


# -- the gateway's own in-band error: the Responses API's `error`, then `response.failed` ---------

@pytest.mark.parametrize("kind,code,what", [
    ("reset", "connection_error", "the connection broke mid-stream"),
    ("truncate", "incomplete_stream", "the stream ended before its response.completed")])
def test_a_stream_the_gateway_ends_ends_as_the_live_api_ends_a_failed_one(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer, kind: str, code: str,
        what: str) -> None:
    """Broken after output (reset, or cut short without its final event): the gateway's error
    event is the Responses API's, numbered after the last event sent, and the stream's last
    event is the `response.failed` the live API follows its `error` event with: the stream's
    response, failed with a server error (a ResponseError's code)."""
    a.push_fault(Fault(kind, provider="openai", after_chunks=2))
    message = f"Provider 'a' failed mid-stream: {what}"
    with serve(tmp_path, a, b) as (gateway, journal):
        with openai_client(gateway).responses.with_streaming_response.create(
                model="primary", input=QUESTION, stream=True) as response:
            events = stream_events_of(response.text())
        assert len([d for _, d in events if d["type"] == "response.output_text.delta"]) == 2
        assert events[-2][1] == {
            "type": "error", "code": code, "message": message, "param": None,
            "sequence_number": events[-3][1]["sequence_number"] + 1,
            "error": {"message": message, "type": "server_error", "param": None, "code": code}}
        failed = failed_ending(events).response.error
        assert failed is not None and (failed.code, failed.message) == ("server_error", message)
        record = journaled_record(journal, response.headers["x-request-id"])
        assert (record.status, record.error_type) == (200, code)
        # The official SDK raises it, as it does the live API's error event (a's breaker is
        # open now: b serves).
        b.push_fault(Fault(kind, provider="openai", after_chunks=2))
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=TEST_KEY, max_retries=0)
        with pytest.raises(openai.APIError) as failure:
            list(client.responses.create(model="backup", input=QUESTION, stream=True))
        assert failure.value.message == message.replace("'a'", "'b'")


@pytest.mark.parametrize("stall_s", [0.01, 60])
def test_a_provider_silent_after_its_error_event_gets_the_failed_response_it_owes(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer, stall_s: float) -> None:
    """The provider sends its `error` event after output, then never its `response.failed`:
    the upstream ends at once (0.01 s), or stays open and silent (60 s) until the gateway's
    idle timeout (1 s) gives up on it. Either way the client's stream ends, well before its
    own 20 s timeout, with the provider's event as it was and then the `response.failed` it
    was owed, with the same error; the request is recorded with the provider's error and
    billed what it delivered."""
    a.push_fault(Fault("error_event", provider="openai", after_chunks=2, event="error",
                       code="rate_limit_exceeded", message=MESSAGE, stall_s=stall_s))
    with serve(tmp_path, a, b, idle_s=1) as (gateway, journal):
        client = openai_client(gateway).with_options(timeout=20)
        with client.responses.with_streaming_response.create(
                model="primary", input=QUESTION, stream=True) as response:
            assert response.status_code == 200
            events = stream_events_of(response.text())
        deltas = [d["delta"] for _, d in events if d["type"] == "response.output_text.delta"]
        assert "".join(deltas) == REPLY[:16]
        assert {key: events[-2][1][key] for key in ("code", "message")} == {
            "code": "rate_limit_exceeded", "message": MESSAGE}
        failed = failed_ending(events).response.error
        assert failed is not None and (failed.code, failed.message) == (
            "rate_limit_exceeded", MESSAGE)
        record = journaled_record(journal, response.headers["x-request-id"])
        assert (record.status, record.error_type) == (200, "rate_limit_exceeded")
        assert record.input_tokens > 0 and record.output_tokens == len(deltas)
        assert record.cost_micros == record.input_tokens + 2 * record.output_tokens  # PRICE
        assert len(b.requests) == 0
