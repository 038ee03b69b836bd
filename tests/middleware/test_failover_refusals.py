"""A deployment whose adapter cannot express the request is skipped for that request only.

Gemini 2.0 models do not fetch image URLs and take at most 5 stop sequences; OpenAI takes at
most 4 (providers/gemini_format.py, providers/openai.py). Such a request is refused before any
upstream call; the failover layer tries the model's next deployment, then its fallbacks, and
answers the first refusal (400) only when every one of them refused. No refusal counts against
a deployment's health, as an attempt or as a retry, and what the refused pick took (an rpm
token, a retry or hedge from the retry budget) is given back. Two mock servers ("a", "b") play the
upstreams; their request logs say who was called, `/admin/deployments` what the layer saw.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest

from tests.harness import AUTH, TEST_KEY, ThreadedServer, config_head, openai_client, serve
from tests.middleware.test_failover_layer import journaled_record, metered
from tests.mock_providers import Fault, MockProviderServer

ADMIN_TOKEN = "refusals-admin-token-0123456789"
IMAGE_URL = "https://example.com/cat.png"
GEMINI_SAYS = ("The request cannot be sent to this model: Gemini 2.0 models do not fetch images "
               "from URLs; send the image inline as a base64 data: URL.")
LOOK: Any = [{"role": "user", "content": [
    {"type": "text", "text": "What is in this picture?"},
    {"type": "image_url", "image_url": {"url": IMAGE_URL}}]}]
HI: Any = [{"role": "user", "content": "hi"}]


# (`a` and `b`: two mock provider servers, tests/conftest.py)


def config(a: MockProviderServer, b: MockProviderServer, routes: str,
           retry: str = "RetryPolicy(max_attempts=1)") -> str:
    return f'''
{config_head("SG_REFUSALS_ADMIN", ADMIN_TOKEN)}providers = {{
    "a": Provider("openai", base_url="{a.base_url("openai")}", api_key_env=KEY, timeouts=fast),
    "a-gemini": Provider("gemini", base_url="{a.base_url("gemini")}", api_key_env=KEY,
                         timeouts=fast),
    "b": Provider("openai", base_url="{b.base_url("openai")}", api_key_env=KEY, timeouts=fast),
    "b-gemini": Provider("gemini", base_url="{b.base_url("gemini")}", api_key_env=KEY,
                         timeouts=fast),
}}
models = {{
    "vision": [Deployment("a-gemini", "gemini-2.0-flash", price=PRICE),
               Deployment("b", "gpt-4o", price=PRICE)],
    "stops": [Deployment("a", "gpt-4o", price=PRICE),
              Deployment("b-gemini", "gemini-2.0-flash", price=PRICE)],
    "flash": [Deployment("a-gemini", "gemini-2.0-flash", price=PRICE)],
    "flash-b": [Deployment("b-gemini", "gemini-2.0-flash", price=PRICE)],
    "gpt": [Deployment("b", "gpt-4o", price=PRICE)],
    "vision-1rpm": [Deployment("a-gemini", "gemini-2.0-flash", price=PRICE, rpm=1),
                    Deployment("b", "gpt-4o", price=PRICE)],
    "three": [Deployment("a", "gpt-4o", price=PRICE),
              Deployment("a-gemini", "gemini-2.0-flash", price=PRICE),
              Deployment("b", "gpt-4o", price=PRICE)],
    "hedged": [Deployment("a", "gpt-4o", price=PRICE),
               Deployment("a-gemini", "gemini-2.0-flash", price=PRICE)],
    "streamer": [Deployment("a", "gpt-4o", price=PRICE)],
}}
middleware = [
    Middleware(AuthMiddleware, keys=[StaticKey("tests", key_env="SG_TEST_KEY")]),
    Middleware(FailoverMiddleware, admin_token_env="SG_REFUSALS_ADMIN",
               retry={retry}, routes={{{routes}}}),
]
'''


def layer_state(server: ThreadedServer) -> dict[str, Any]:
    response = httpx.get(server.url + "/admin/deployments",
                         headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
    assert response.status_code == 200, response.text
    state: dict[str, Any] = response.json()
    return state


def assert_untouched(deployment: dict[str, Any]) -> None:
    """Nothing was learnt of a deployment's health (and nothing is left held)."""
    assert deployment["breaker"] == "closed" and deployment["failures"] == 0
    assert deployment["cooling_s"] == 0 and deployment["cool_down_probes"] == 0
    assert deployment["in_flight"] == 0


@pytest.mark.parametrize("route", ['Route(strategy="priority")',
                                   'Route(strategy="priority", hedge_after_s=2)'])
def test_an_image_url_gemini_2_0_refuses_is_served_by_the_openai_deployment(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer, route: str) -> None:
    # Before: every such request got Gemini's 400 (it comes first by priority). With
    # max_attempts=1, the refusal must not count as the one attempt either.
    with serve(tmp_path, config(a, b, f'"vision": {route}')) as gateway:
        raw = openai_client(gateway).chat.completions.with_raw_response.create(
            model="vision", messages=LOOK)
        after = openai_client(gateway).chat.completions.with_raw_response.create(
            model="vision", messages=HI)
        state = layer_state(gateway)
    assert raw.parse().choices[0].message.content
    assert raw.headers["x-sluicegate-deployment"] == "b/gpt-4o"
    assert raw.headers["x-sluicegate-attempts"] == "1"
    assert [entry["path"] for entry in b.requests] == ["/openai/v1/chat/completions"]
    sent = b.requests[0]["json"]["messages"][0]["content"][1]
    assert sent == {"type": "image_url", "image_url": {"url": IMAGE_URL}}
    # Out for that request only: the next one goes to Gemini first again.
    assert after.headers["x-sluicegate-deployment"] == "a-gemini/gemini-2.0-flash"
    assert [entry["provider"] for entry in a.requests] == ["gemini"]
    gemini, gpt = state["models"]["vision"]["deployments"]
    assert_untouched(gemini)
    assert_untouched(gpt)
    assert state["counters"]["retries"] == 0 and state["counters"]["budget_refusals"] == 0


def test_five_stop_sequences_openai_refuses_are_served_by_gemini(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer) -> None:
    # Anthropic's Messages API to an OpenAI deployment: the adapter translates, and refuses
    # more than OpenAI's 4 `stop`; Gemini takes 5. Before: that 400 (OpenAI first by priority).
    stops = ["one", "two", "three", "four", "five"]
    with serve(tmp_path, config(a, b, '"stops": Route(strategy="priority")')) as gateway:
        sdk = anthropic.Anthropic(base_url=gateway.url, api_key=TEST_KEY, max_retries=0)
        with sdk.messages.with_streaming_response.create(
                model="stops", max_tokens=20, messages=HI, stop_sequences=stops,
                stream=True) as raw:
            text = "".join(event.delta.text for event in raw.parse()
                           if event.type == "content_block_delta"
                           and event.delta.type == "text_delta")
            served_by = raw.headers["x-sluicegate-deployment"]
        state = layer_state(gateway)
    assert text
    assert served_by == "b-gemini/gemini-2.0-flash"
    assert a.requests == []
    [sent] = b.requests
    assert sent["json"]["generationConfig"]["stopSequences"] == stops
    assert_untouched(state["models"]["stops"]["deployments"][0])


def test_a_fallback_model_serves_what_the_model_refuses(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer) -> None:
    # Before: 400 from the model's only deployment; the fallback was never asked.
    with serve(tmp_path, config(a, b, '"flash": Route(fallbacks=("gpt",))')) as gateway:
        raw = openai_client(gateway).chat.completions.with_raw_response.create(
            model="flash", messages=LOOK)
        state = layer_state(gateway)
    assert raw.parse().choices[0].message.content
    assert raw.headers["x-sluicegate-fallback"] == "gpt"
    assert raw.headers["x-sluicegate-deployment"] == "b/gpt-4o"
    assert a.requests == [] and len(b.requests) == 1
    assert state["counters"]["fallbacks"] == 1
    assert_untouched(state["models"]["flash"]["deployments"][0])


ANTHROPIC_LOOK: Any = [{"role": "user", "content": [
    {"type": "text", "text": "What is in this picture?"},
    {"type": "image", "source": {"type": "url", "url": IMAGE_URL}}]}]


@pytest.mark.parametrize("api", ["openai", "anthropic"])
def test_when_every_deployment_and_fallback_refuses_the_first_refusal_is_the_answer(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer, api: str) -> None:
    # Before: the same 400, but from the first deployment alone: the fallback was never
    # asked (its `requests` stayed 0).
    with serve(tmp_path, config(a, b, '"flash": Route(fallbacks=("flash-b",))')) as gateway:
        if api == "openai":
            response = httpx.post(gateway.url + "/v1/chat/completions", headers=AUTH,
                                  json={"model": "flash", "messages": LOOK}, timeout=10)
        else:
            response = httpx.post(gateway.url + "/v1/messages", headers=AUTH, timeout=10,
                                  json={"model": "flash", "max_tokens": 20,
                                        "messages": ANTHROPIC_LOOK})
        state = layer_state(gateway)
    assert response.status_code == 400
    if api == "openai":
        assert response.json() == {"error": {"message": GEMINI_SAYS,
                                             "type": "invalid_request_error",
                                             "param": None, "code": None}}
    else:
        assert response.json() == {"type": "error", "error": {
            "type": "invalid_request_error", "message": GEMINI_SAYS}}
    assert a.requests == [] and b.requests == []
    models = state["models"]
    for model in ("flash", "flash-b"):
        [deployment] = models[model]["deployments"]
        assert deployment["requests"] == 1, model  # asked once each, in this request
        assert_untouched(deployment)
    assert state["counters"]["fallbacks"] == 0 and state["counters"]["retries"] == 0


# -- what a refused pick took is given back ------------------------------------------------------

@pytest.mark.parametrize("route", ['Route(strategy="priority")',
                                   'Route(strategy="priority", hedge_after_s=2)',
                                   'Route(strategy="priority", ttft_timeout_s=5)'],
                         ids=["first-attempt", "hedged", "attempt-loop"])
def test_a_refused_pick_gives_its_rpm_token_back(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer, route: str) -> None:
    # Gemini's deployment takes one request a minute. Before, the image URL it refused took
    # that one, and the next request, which it can serve, went to b.
    with serve(tmp_path, config(a, b, f'"vision-1rpm": {route}')) as gateway:
        refused = openai_client(gateway).chat.completions.with_raw_response.create(
            model="vision-1rpm", messages=LOOK)
        served = [openai_client(gateway).chat.completions.with_raw_response.create(
            model="vision-1rpm", messages=HI) for _ in range(2)]
        state = layer_state(gateway)
    assert refused.headers["x-sluicegate-deployment"] == "b/gpt-4o"
    assert [raw.headers["x-sluicegate-deployment"] for raw in served] == [
        "a-gemini/gemini-2.0-flash", "b/gpt-4o"]  # (the one token a minute is held to)
    assert [entry["provider"] for entry in a.requests] == ["gemini"]
    for deployment in state["models"]["vision-1rpm"]["deployments"]:
        assert_untouched(deployment)


# One retry in the budget's window, for the whole gateway (no share earned by requests).
ONE_RETRY = "RetryPolicy(max_attempts=3, budget_ratio=0, budget_window_s=10, budget_min_per_s=0.1)"


def test_a_retry_whose_pick_refused_gives_the_retry_back(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer) -> None:
    # a's OpenAI deployment fails; the retry's pick, Gemini 2.0, refuses the image URL; b
    # serves it. Before, the refused pick had spent the one retry the budget holds, and the
    # request was answered the 503.
    a.push_fault(Fault("status", provider="openai", status=503))
    routes = '"three": Route(strategy="priority")'
    with serve(tmp_path, config(a, b, routes, ONE_RETRY)) as gateway:
        raw = openai_client(gateway).chat.completions.with_raw_response.create(
            model="three", messages=LOOK)
        state = layer_state(gateway)
    assert raw.headers["x-sluicegate-deployment"] == "b/gpt-4o"
    assert raw.headers["x-sluicegate-attempts"] == "2"
    assert [entry["provider"] for entry in a.requests] == ["openai"] and len(b.requests) == 1
    assert state["counters"]["retries"] == 1 and state["counters"]["budget_refusals"] == 0
    assert_untouched(state["models"]["three"]["deployments"][1])


def test_a_hedged_call_refused_gives_the_retry_back(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer) -> None:
    # a is slow to answer; the hedged call to Gemini 2.0 refuses the image URL, and a answers.
    # Before, that hedge kept the one retry the budget holds: the next request's retry was
    # refused, and its first call's 503 was its answer.
    a.push_fault(Fault("slow_first_byte", provider="openai", delay_s=1.0))
    a.push_fault(Fault("status", provider="openai", status=503))
    routes = ('"hedged": Route(strategy="priority", hedge_after_s=0.2), '
              '"three": Route(strategy="priority")')
    with serve(tmp_path, config(a, b, routes, ONE_RETRY)) as gateway:
        hedged = openai_client(gateway).chat.completions.with_raw_response.create(
            model="hedged", messages=LOOK)
        retried = openai_client(gateway).chat.completions.with_raw_response.create(
            model="three", messages=HI)
        state = layer_state(gateway)
    assert hedged.headers["x-sluicegate-deployment"] == "a/gpt-4o"
    assert hedged.headers["x-sluicegate-attempts"] == "1"
    assert retried.headers["x-sluicegate-deployment"] == "a-gemini/gemini-2.0-flash"
    assert retried.headers["x-sluicegate-attempts"] == "2"
    assert [entry["provider"] for entry in a.requests] == ["openai", "openai", "gemini"]
    counters = state["counters"]
    assert (counters["hedges"], counters["retries"], counters["budget_refusals"]) == (0, 1, 0)
    for deployment in state["models"]["hedged"]["deployments"]:
        assert_untouched(deployment)


# -- a continuation's target that refuses ----------------------------------------------------------

def stream_events(gateway: ThreadedServer, model: str) -> tuple[list[str], str]:
    """The data of every event of a chat stream that asks about the picture, and the
    request's id."""
    with httpx.stream("POST", gateway.url + "/v1/chat/completions", headers=AUTH, timeout=10,
                      json={"model": model, "messages": LOOK, "stream": True}) as response:
        assert response.status_code == 200
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
        return events, response.headers["x-request-id"]


def test_a_continuation_whose_fallback_refuses_goes_on_at_the_next(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer) -> None:
    # The stream breaks on a; the first fallback (Gemini 2.0) cannot take the image URL, the
    # second (b) continues from the text the client has.
    a.push_fault(Fault("error_event", provider="openai", after_chunks=2))
    routes = '"streamer": Route(fallbacks=("flash", "gpt"), continuation=True)'
    with serve(tmp_path, config(a, b, routes, "RetryPolicy(max_attempts=2)")) as gateway:
        events, _ = stream_events(gateway, "streamer")
        state = layer_state(gateway)
    assert events[-1] == "[DONE]" and not any('"error"' in event for event in events)
    assert [entry["provider"] for entry in a.requests] == ["openai"]
    [continued] = b.requests
    assert continued["json"]["messages"][-1]["role"] == "assistant"
    assert state["counters"]["retries"] == 1
    assert_untouched(state["models"]["flash"]["deployments"][0])


def test_a_continuation_whose_only_fallback_refuses_ends_with_the_error_event(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer) -> None:
    # Before: the refusal went up through the open response, which was cut off without an
    # ending (the client read an incomplete chunked body).
    a.push_fault(Fault("error_event", provider="openai", after_chunks=2))
    routes = '"streamer": Route(fallbacks=("flash",), continuation=True)'
    journal = tmp_path / "journal"
    text = metered(config(a, b, routes, "RetryPolicy(max_attempts=2)"), journal)
    with serve(tmp_path, text) as gateway:
        events, request_id = stream_events(gateway, "streamer")
        state = layer_state(gateway)
    record = journaled_record(journal, request_id)
    assert json.loads(events[-1])["error"]["code"]  # well-formed, and the last event
    assert sum('"error"' in event for event in events) == 1
    assert [entry["provider"] for entry in a.requests] == ["openai"] and b.requests == []
    assert state["counters"]["retries"] == 0 and state["counters"]["budget_refusals"] == 0
    [flash] = state["models"]["flash"]["deployments"]
    assert flash["requests"] == 1
    assert_untouched(flash)
    # Metered as the broken stream it is, served by a, as if there were no fallback.
    assert (record.deployment, record.provider, record.served_model) == (
        "a/gpt-4o", "a", "gpt-4o")
    assert record.attempts == 1 and record.fallbacks == 0 and record.error_type
    assert record.output_tokens > 0 and record.cost_micros > 0
