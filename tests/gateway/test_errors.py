"""gateway/errors.py: the in-band ending of a started stream, per API."""
from __future__ import annotations

import orjson

from gateway.errors import GatewayError, UpstreamError, stream_error_ending, stream_error_event

BUDGET = GatewayError(402, "The stream was ended.", code="budget_exceeded")


def test_chat_and_anthropic_events_keep_their_shapes() -> None:
    assert stream_error_event("openai", BUDGET) == (
        b'data: {"error":{"message":"The stream was ended.","type":"insufficient_quota",'
        b'"param":null,"code":"budget_exceeded"}}\n\n')
    assert stream_error_event("openai", BUDGET, operation="openai.chat",
                              sequence_number=7) == stream_error_event("openai", BUDGET)
    assert stream_error_event("anthropic", BUDGET, operation="anthropic.messages") == (
        b'event: error\ndata: {"type":"error","error":{"type":"billing_error",'
        b'"message":"The stream was ended."}}\n\n')


def test_a_responses_stream_ends_with_the_responses_error_event() -> None:
    """ResponseErrorEvent's fields at the top level, as documented, and in `error` as the
    live API sends them; numbered as asked."""
    broken = UpstreamError(502, "Provider 'p' failed mid-stream: boom", provider="p",
                           error_type="server_error", wire_format="openai",
                           native_type="server_error", native_code="E42", param="input")
    event = stream_error_event("openai", broken, operation="openai.responses",
                               sequence_number=9)
    name, _, data = event.partition(b"\n")
    assert name == b"event: error" and data.startswith(b"data: ") and event.endswith(b"}\n\n")
    assert orjson.loads(data[6:]) == {
        "type": "error", "code": "E42", "message": "Provider 'p' failed mid-stream: boom",
        "param": "input", "sequence_number": 9,
        "error": {"type": "server_error", "code": "E42", "param": "input",
                  "message": "Provider 'p' failed mid-stream: boom"}}


def test_the_ending_of_a_chat_or_anthropic_stream_is_its_error_event() -> None:
    for api_format, operation in (("openai", "openai.chat"), ("anthropic", "anthropic.messages")):
        assert stream_error_ending(api_format, BUDGET, operation=operation, sequence_number=7,
                                   first_event={"type": "response.created"}) == \
            stream_error_event(api_format, BUDGET, operation=operation)


def test_a_responses_stream_ends_with_its_error_event_then_the_failed_response() -> None:
    """`response.failed` numbered after the `error` event, for the response `response.created`
    opened (or a minimal one without it), failed with the ResponseError code asked for."""
    opened = {"id": "resp_1", "object": "response", "model": "m", "status": "in_progress",
              "output": [], "error": None}
    for first_event, response in (
            ({"type": "response.created", "sequence_number": 0, "response": opened}, opened),
            (None, {"object": "response", "output": []}),
            ({"type": "response.output_text.delta", "delta": "x"},
             {"object": "response", "output": []})):
        ending = stream_error_ending("openai", BUDGET, operation="openai.responses",
                                     sequence_number=4, first_event=first_event,
                                     failed_code="rate_limit_exceeded")
        error, failed, rest = ending.split(b"\n\n")
        assert error + b"\n\n" == stream_error_event("openai", BUDGET,
                                                     operation="openai.responses",
                                                     sequence_number=4)
        name, _, data = failed.partition(b"\n")
        assert (name, rest) == (b"event: response.failed", b"")
        assert orjson.loads(data.removeprefix(b"data: ")) == {
            "type": "response.failed", "sequence_number": 5,
            "response": {**response, "status": "failed", "error": {
                "code": "rate_limit_exceeded", "message": "The stream was ended."}}}
