"""providers/streams.py without ASGI or sockets: a Responses stream's failure events.

(The chat codec's cases are in tests/gateway/test_sse.py; the same streams through the
gateway, against the mock provider, in test_responses_streams.py.)
"""
from __future__ import annotations

from typing import Any

import orjson

from providers import Provider
from providers.openai import responses_codec
from providers.streams import PassthroughCodec, StreamError

ADAPTER = Provider("openai", base_url="http://127.0.0.1:9/v1")


def event(kind: str, number: int, **fields: Any) -> bytes:
    data = orjson.dumps({"type": kind, "sequence_number": number, **fields})
    return b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"


ERROR = {"type": "tokens", "code": "rate_limit_exceeded", "message": "Slow down.", "param": None}
OPENING = event("response.created", 0, response={"id": "resp_1", "status": "in_progress"})
DELTA = event("response.output_text.delta", 1, item_id="msg_1", output_index=0,
              content_index=0, delta="Hello")
ERROR_EVENT = event("error", 2, error=ERROR)
FAILED = event("response.failed", 3, response={
    "id": "resp_1", "status": "failed", "error": {"code": "rate_limit_exceeded",
                                                  "message": "Slow down."}})


def run(codec: PassthroughCodec, reads: list[bytes]) -> tuple[bytes, StreamError | None]:
    """(the bytes the client gets, the error that ends the stream) as the adapter reads
    them: a codec's `error` is raised once the bytes before it went out."""
    out = b""
    try:
        for read in reads:
            out += codec.feed(read)
            if codec.error is not None:
                return out, codec.error
        out += codec.finish()
    except StreamError as exc:
        return out, exc
    return out, codec.error


def test_an_error_event_goes_on_with_the_failed_response_that_ends_the_stream() -> None:
    for reads in ([OPENING + DELTA, ERROR_EVENT, FAILED],
                  [OPENING + DELTA + ERROR_EVENT + FAILED],
                  [OPENING + DELTA, ERROR_EVENT + FAILED[:20], FAILED[20:]]):
        codec = responses_codec(ADAPTER.redact)
        out, error = run(codec, reads)
        assert out == OPENING + DELTA + ERROR_EVENT + FAILED
        assert error is not None and error.forwarded
        assert (error.error_type, error.code, error.message) == (
            "tokens", "rate_limit_exceeded", "Slow down.")
        assert codec.sent_error is error


def test_nothing_after_the_failed_response_goes_on() -> None:
    after = event("response.output_text.delta", 4, delta="late")
    codec = responses_codec(ADAPTER.redact)
    out, error = run(codec, [OPENING + DELTA, ERROR_EVENT + FAILED + after])
    assert out == OPENING + DELTA + ERROR_EVENT + FAILED
    assert error is not None and error.code == "rate_limit_exceeded"


def test_while_the_failed_response_is_awaited_the_error_is_already_the_clients() -> None:
    codec = responses_codec(ADAPTER.redact)
    assert codec.feed(OPENING + DELTA) == OPENING + DELTA
    assert codec.feed(ERROR_EVENT) == ERROR_EVENT
    assert codec.error is None  # (the stream goes on to its last event)
    sent = codec.sent_error
    assert sent is not None and sent.code == "rate_limit_exceeded"


def test_a_stream_that_ends_after_its_error_event_ends_with_that_error() -> None:
    codec = responses_codec(ADAPTER.redact)
    out, error = run(codec, [OPENING + DELTA, ERROR_EVENT])
    assert out == OPENING + DELTA + ERROR_EVENT
    assert error is not None and error.forwarded and error.code == "rate_limit_exceeded"
    assert error.error_type != "incomplete_stream"


def test_a_failed_response_alone_ends_the_stream_at_once() -> None:
    codec = responses_codec(ADAPTER.redact)
    out, error = run(codec, [OPENING + DELTA, event("response.failed", 2, response={
        "status": "failed", "error": {"code": "server_error", "message": "Oops."}})])
    assert out.endswith(b'"Oops."}}}\n\n') and out.count(b"response.failed") == 2
    assert error is not None and error.forwarded and error.code == "server_error"


def test_a_key_in_the_providers_error_events_is_redacted_and_nothing_else_changes() -> None:
    key = "sk-proj-" + "Zz09" * 8
    said = {"code": "invalid_api_key", "message": f"Incorrect API key provided: {key}.",
            "param": None, "type": "invalid_request_error"}
    error_event = event("error", 2, error=said)
    failed = event("response.failed", 3, response={
        "id": "resp_1", "status": "failed", "instructions": f"Quote {key} back",
        "error": {"code": "invalid_api_key", "message": said["message"]}})
    codec = responses_codec(ADAPTER.redact)
    out, error = run(codec, [OPENING + DELTA, error_event[:30], error_event[30:] + failed])
    assert out.startswith(OPENING + DELTA)
    names = [block.split(b"\n")[0] for block in out.split(b"\n\n") if block]
    assert names[-2:] == [b"event: error", b"event: response.failed"]
    clean = "Incorrect API key provided: [redacted]."
    events = [orjson.loads(block.split(b"data: ", 1)[1]) for block in out.split(b"\n\n")[2:4]]
    assert events[0] == {"type": "error", "sequence_number": 2, "error": {**said, "message": clean}}
    assert events[1]["response"]["error"] == {"code": "invalid_api_key", "message": clean}
    # (the caller's own words echoed in the failed response are theirs: left as they were)
    assert events[1]["response"]["instructions"] == f"Quote {key} back"
    assert error is not None and error.message == said["message"]  # (redacted where rendered)
