"""The failover layer against real mock providers: retries, fallbacks, breakers, hedging.

Two mock servers play two independent upstreams ("a" is the primary, "b" the fallback), so a
fault injected into one never touches the other. Each test gets a gateway of its own: breaker
state lives in the layer.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

from gateway import create_app
from gateway.tokens import estimate_text
from middleware.metering.journal import Journal
from middleware.metering.record import UsageRecord
from tests.harness import (
    AUTH,
    TEST_KEY,
    ThreadedServer,
    config_head,
    mock_config,
    openai_client,
    serve,
    wait_for,
    write_config,
)
from tests.mock_providers import Fault, MockProviderServer

ADMIN_TOKEN = "failover-admin-token-0123456789"
QUESTION = [{"role": "user", "content": "one two three four five six seven eight nine ten"}]


def failover_config(a: MockProviderServer, b: MockProviderServer, layer: str,
                    extra: str = "") -> str:
    return f'''
{config_head("SG_FAILOVER_ADMIN", ADMIN_TOKEN)}providers = {{
    "a": Provider("openai", base_url="{a.base_url("openai")}", api_key_env="MOCK_PROVIDER_KEY",
                  timeouts=fast),
    "b": Provider("openai", base_url="{b.base_url("openai")}", api_key_env="MOCK_PROVIDER_KEY",
                  timeouts=fast),
    "b-claude": Provider("anthropic", base_url="{b.base_url("anthropic")}",
                         api_key_env="MOCK_PROVIDER_KEY", timeouts=fast),
    "a-claude": Provider("anthropic", base_url="{a.base_url("anthropic")}",
                         api_key_env="MOCK_PROVIDER_KEY", timeouts=fast),
}}
models = {{
    "primary": [Deployment("a", "gpt-4o-mini", price=PRICE)],
    "backup": [Deployment("b", "gpt-4o-mini", price=PRICE)],
    "big": [Deployment("b-claude", "claude-3-5-haiku-latest", price=PRICE)],
    "pair": [Deployment("a", "gpt-4o-mini", price=PRICE), Deployment("b", "gpt-4o", price=PRICE)],
    "claude-a": [Deployment("a-claude", "claude-3-5-haiku-latest", price=PRICE)],
}}
{extra}
middleware = [
    Middleware(AuthMiddleware, keys=[StaticKey("tests", key_env="SG_TEST_KEY")]),
    Middleware(FailoverMiddleware, admin_token_env="SG_FAILOVER_ADMIN", {layer}),
]
'''


def chat(server: ThreadedServer, model: str, **options: object) -> httpx.Response:
    return chat_at(server.url, model, **options)


def chat_at(url: str, model: str, **options: object) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", headers=AUTH, timeout=30,
                      json={"model": model, "messages": QUESTION, **options})


def deployments(server: ThreadedServer) -> dict[str, object]:
    response = httpx.get(server.url + "/admin/deployments",
                         headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
    assert response.status_code == 200, response.text
    result: dict[str, object] = response.json()
    return result


def breaker_of(server: ThreadedServer, model: str, index: int = 0) -> str:
    state = deployments(server)["models"][model]["deployments"][index]  # type: ignore[index]
    return str(state["breaker"])



# -- acceptance: a flaky primary, a dead primary, Retry-After -------------------------------

def test_half_failing_primary_with_a_healthy_fallback_succeeds_within_the_retry_budget(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer) -> None:
    a.config.update({"fail_ratio": 0.5, "fail_status": 503, "fail_seed": 7})
    layer = ('routes={"primary": Route(fallbacks=("backup",))}, '
             'retry=RetryPolicy(max_attempts=3, budget_ratio=0.2, budget_window_s=10, '
             'budget_min_per_s=1)')
    with serve(tmp_path, failover_config(a, b, layer)) as gateway:
        sdk = openai_client(gateway)
        ok, began = 0, time.monotonic()
        for _ in range(1000):
            try:
                answer = sdk.chat.completions.create(model="primary", messages=QUESTION)
                ok += answer.choices[0].message.content is not None
            except openai.APIError:
                pass
        windows = math.ceil((time.monotonic() - began) / 10)
        state = deployments(gateway)
    counters = state["counters"]  # type: ignore[index]
    assert ok >= 999, f"only {ok} of 1000 succeeded"
    assert counters["requests"] == 1000
    # Every retry went through the budget: at most 20% of the requests of a 10 s window plus
    # 1/s, so over the run at most 0.2 × 1000 + 10 per 10 s window it lasted.
    assert counters["retries"] <= 0.2 * 1000 + 10 * windows
    # Why so few retries are needed: a's error rate opened its breaker, and requests then
    # went to the fallback as their first attempt (half-open probes test a again).
    primary = state["models"]["primary"]["deployments"][0]  # type: ignore[index]
    assert primary["failures"] == a.ratio_failures()
    # The failures a saw are exactly the retries and fallbacks' causes: none was lost.
    assert a.ratio_failures() >= 1
    assert len(b.requests) >= a.ratio_failures() - counters["budget_refusals"]


def test_a_dead_primary_opens_its_breaker_and_requests_go_straight_to_the_fallback(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer) -> None:
    a.config.update({"fail_ratio": 1.0, "fail_status": 503})
    layer = ('routes={"primary": Route(fallbacks=("backup",))}, '
             'breaker=BreakerSettings(consecutive_failures=3, cooldown_s=2.0, min_requests=1000)')
    with serve(tmp_path, failover_config(a, b, layer)) as gateway:
        for _ in range(3):
            assert chat(gateway, "primary").status_code == 200
        assert breaker_of(gateway, "primary") == "open"
        calls_to_a = len(a.requests)
        assert calls_to_a == 3
        for _ in range(8):  # well inside the cool-down, even on a slow machine
            response = chat(gateway, "primary")
            assert response.status_code == 200
            assert response.headers["x-sluicegate-attempts"] == "1"  # no time paid on a
            assert response.headers["x-sluicegate-fallback"] == "backup"
        assert len(a.requests) == calls_to_a
        # a recovers; after the cool-down one half-open probe goes to a and closes it.
        a.config.update({"fail_ratio": 0.0})
        time.sleep(2.1)
        response = chat(gateway, "primary")
        assert response.status_code == 200
        assert response.headers["x-sluicegate-deployment"] == "a/gpt-4o-mini"
        assert "x-sluicegate-fallback" not in response.headers
        assert breaker_of(gateway, "primary") == "closed"
        assert len(a.requests) == calls_to_a + 1


def test_a_refused_connection_fails_over_and_opens_the_breaker(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer) -> None:
    text = failover_config(a, b, 'routes={"primary": Route(fallbacks=("backup",))}, '
                                 'breaker=BreakerSettings(consecutive_failures=2)')
    text = text.replace(a.base_url("openai"), "http://127.0.0.1:9/v1")  # nothing listens
    with serve(tmp_path, text) as gateway:
        for _ in range(4):
            response = chat(gateway, "primary")
            assert response.status_code == 200
            assert response.headers["x-sluicegate-deployment"] == "b/gpt-4o-mini"
        assert breaker_of(gateway, "primary") == "open"
        attempts = [int(chat(gateway, "primary").headers["x-sluicegate-attempts"])
                    for _ in range(3)]
        assert attempts == [1, 1, 1]


def test_429_retry_after_is_honoured_when_it_fits_the_deadline(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer) -> None:
    a.push_fault(Fault("status", provider="openai", status=429, retry_after_s=1))
    with serve(tmp_path, failover_config(a, b, "retry=RetryPolicy(deadline_s=10)")) as gateway:
        began = time.monotonic()
        response = chat(gateway, "primary")
        waited = time.monotonic() - began
    assert response.status_code == 200
    assert response.headers["x-sluicegate-attempts"] == "2"
    assert waited >= 1.0  # the second call waited for Retry-After, not for a short backoff
    assert len(a.requests) == 2


def test_429_whose_retry_after_exceeds_the_deadline_is_answered_at_once(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer) -> None:
    a.push_fault(Fault("status", provider="openai", status=429, retry_after_s=30))
    with serve(tmp_path, failover_config(a, b, "retry=RetryPolicy(deadline_s=5)")) as gateway:
        response = chat(gateway, "primary")
        assert response.status_code == 429
        assert response.headers["retry-after"] == "30"
        # (OpenAI's own type and code for a request-rate limit, kept for an OpenAI caller)
        error = response.json()["error"]
        assert (error["type"], error["code"]) == ("requests", "rate_limit_exceeded")
        assert len(a.requests) == 1
        # While a cools down, another request does not hammer it: it is refused with the
        # time left, in the caller's shape.
        again = chat(gateway, "primary")
        assert again.status_code == 429
        assert 1 <= int(again.headers["retry-after"]) <= 30
        assert len(a.requests) == 1


def test_429_whose_retry_after_exceeds_the_deadline_is_answered_at_once_despite_the_cap(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer) -> None:
    """max_retry_after_s bounds the cool-down, not the pause asked for: 30 s do not fit an 8 s
    deadline, so the 429 goes back at once (not after 2 s, to a provider that said 30)."""
    a.push_fault(Fault("status", provider="openai", status=429, retry_after_s=30))
    layer = "retry=RetryPolicy(deadline_s=8, max_retry_after_s=2)"
    with serve(tmp_path, failover_config(a, b, layer)) as gateway:
        with pytest.raises(openai.RateLimitError) as refused:
            openai_client(gateway).chat.completions.create(model="primary", messages=QUESTION)
        state = deployments(gateway)["models"]["primary"]["deployments"][0]  # type: ignore[index]
    assert refused.value.response.headers["retry-after"] == "30"
    assert refused.value.response.headers["x-sluicegate-attempts"] == "1"
    assert len(a.requests) == 1
    assert 0 < state["cooling_s"] <= 2  # the deployment is out for the cap only


def test_429_on_one_deployment_moves_to_the_other_at_once(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer) -> None:
    a.push_fault(Fault("status", provider="openai", status=429, retry_after_s=30))
    layer = 'routes={"pair": Route(strategy="priority")}'
    with serve(tmp_path, failover_config(a, b, layer)) as gateway:
        began = time.monotonic()
        response = chat(gateway, "pair")
        assert time.monotonic() - began < 5  # did not wait 30 s for a
        assert response.headers["x-sluicegate-deployment"] == "b/gpt-4o"
        # a is cooling down for 30 s: the next requests go to b first.
        assert chat(gateway, "pair").headers["x-sluicegate-attempts"] == "1"
        assert len(a.requests) == 1


def test_a_long_retry_after_on_one_deployment_does_not_stop_retrying_another(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer) -> None:
    """a asks for 30 s, past the deadline; b fails once with a 503. a's pause is a's: b is
    tried again after a backoff, and answers."""
    a.push_fault(Fault("status", provider="openai", status=429, retry_after_s=30))
    b.push_fault(Fault("status", provider="openai", status=503))
    layer = ('routes={"pair": Route(strategy="priority")}, '
             'retry=RetryPolicy(max_attempts=3, deadline_s=10)')
    with serve(tmp_path, failover_config(a, b, layer)) as gateway:
        answer = openai_client(gateway).chat.completions.with_raw_response.create(
            model="pair", messages=QUESTION)
    assert answer.headers["x-sluicegate-deployment"] == "b/gpt-4o"
    assert answer.headers["x-sluicegate-attempts"] == "3"
    assert answer.parse().choices[0].message.content
    assert (len(a.requests), len(b.requests)) == (1, 2)  # a, cooling down, was not asked again


# -- streams ---------------------------------------------------------------------------------

@pytest.mark.parametrize("fault", [
    Fault("status", provider="openai", status=503),
    Fault("error_event", provider="openai", after_chunks=0),
    Fault("reset", provider="openai", after_chunks=0),
], ids=["503", "error-event-in-200", "reset"])
def test_a_stream_failing_before_its_first_chunk_fails_over_invisibly(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer, fault: Fault) -> None:
    a.push_fault(fault)
    layer = 'routes={"primary": Route(fallbacks=("backup",))}'
    with serve(tmp_path, failover_config(a, b, layer)) as gateway:
        stream = openai_client(gateway).chat.completions.create(model="primary", messages=QUESTION,
                                                         stream=True)
        text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text  # one clean stream from b: the SDK saw no error
    assert len(a.requests) == 1 and len(b.requests) == 1


def test_stream_failover_headers_and_bytes(tmp_path: Path, a: MockProviderServer,
                                           b: MockProviderServer) -> None:
    a.push_fault(Fault("status", provider="openai", status=503))
    layer = 'routes={"primary": Route(fallbacks=("backup",))}'
    with serve(tmp_path, failover_config(a, b, layer)) as gateway, httpx.stream(
            "POST", gateway.url + "/v1/chat/completions", headers=AUTH,
            json={"model": "primary", "messages": QUESTION, "stream": True}) as r:
        body = r.read().decode()
        headers = r.headers
    assert headers["x-sluicegate-deployment"] == "b/gpt-4o-mini"
    assert headers["x-sluicegate-attempts"] == "2"
    assert headers["x-sluicegate-fallback"] == "backup"
    assert body.count("data: [DONE]") == 1 and '"error"' not in body


def metered(text: str, journal: Path) -> str:
    """A failover config with the metering layer (journal only) in front of the failover
    layer."""
    return text.replace("    Middleware(FailoverMiddleware,",
                        f"    Middleware(MeteringMiddleware, journal_dir={str(journal)!r}, "
                        "flush_interval_s=0.05),\n    Middleware(FailoverMiddleware,")


def journaled_record(journal: Path, request_id: str) -> UsageRecord:
    """The one usage record of `request_id` in the gateway's (one) journal slot."""
    [slot] = sorted(journal.glob("slot-*"))
    reader = Journal(slot, read_only=True)
    reader.open()
    try:
        [record] = [r for r in (UsageRecord.decode(p) for _, p in reader.pending())
                    if r.request_id == request_id]
    finally:
        reader.close()
    return record


def test_a_fallback_is_metered_at_the_deployment_that_served_it(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer) -> None:
    """The usage record of a request the fallback answered: the model asked for, the model,
    provider and deployment that served it, its attempts and fallbacks, and its cost at the
    served deployment's price (the backup's is three times the primary's here)."""
    a.push_fault(Fault("status", provider="openai", status=503))
    journal = tmp_path / "journal"
    text = failover_config(
        a, b, 'routes={"primary": Route(fallbacks=("backup",))}',
        extra='DEAR = Price(input_per_mtok="3", output_per_mtok="6")\n'
              'models["backup"] = [Deployment("b", "gpt-4o-mini", price=DEAR)]')
    with serve(tmp_path, metered(text, journal)) as gateway:
        answered = openai_client(gateway).chat.completions.with_raw_response.create(
            model="primary", messages=QUESTION)
        request_id = answered.headers["x-request-id"]
        usage = answered.parse().usage
    assert usage is not None and answered.headers["x-sluicegate-fallback"] == "backup"
    record = journaled_record(journal, request_id)
    assert (record.model, record.served_model, record.provider, record.deployment) == \
        ("primary", "gpt-4o-mini", "b", "b/gpt-4o-mini")
    assert (record.attempts, record.fallbacks, record.status) == (2, 1, 200)
    assert (record.input_tokens, record.output_tokens) == \
        (usage.prompt_tokens, usage.completion_tokens)
    assert record.cost_micros == 3 * usage.prompt_tokens + 6 * usage.completion_tokens
    assert len(a.requests) == 1 and len(b.requests) == 1


def test_a_stream_failing_midway_ends_with_a_well_formed_error_event(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer) -> None:
    a.push_fault(Fault("error_event", provider="openai", after_chunks=3))
    layer = ('routes={"primary": Route(fallbacks=("backup",))}, '
             'breaker=BreakerSettings(consecutive_failures=1, cooldown_s=60)')
    with serve(tmp_path, failover_config(a, b, layer)) as gateway:
        with httpx.stream("POST", gateway.url + "/v1/chat/completions", headers=AUTH,
                          json={"model": "primary", "messages": QUESTION, "stream": True}) as r:
            events = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert r.status_code == 200
        content = [e for e in events if '"choices"' in e]
        assert len(content) >= 3
        assert '"error"' in events[-1]
        assert events[-1].startswith('data: {"error": {') or events[-1].startswith('data: {"error":{')
        assert len(b.requests) == 0  # nothing is retried once content went out
        # The broken stream counted against a: its breaker (1 failure) is open now.
        assert breaker_of(gateway, "primary") == "open"
        assert chat(gateway, "primary").headers["x-sluicegate-fallback"] == "backup"


# -- continuation ------------------------------------------------------------------------------

FULL_REPLY = "Mock reply to: " + QUESTION[0]["content"]


def test_a_broken_openai_stream_is_continued_by_the_fallback_from_where_it_broke(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer) -> None:
    a.push_fault(Fault("error_event", provider="openai", after_chunks=3))
    layer = 'routes={"primary": Route(fallbacks=("big",), continuation=True)}'
    with serve(tmp_path, failover_config(a, b, layer)) as gateway, httpx.stream(
            "POST", gateway.url + "/v1/chat/completions", headers=AUTH,
            json={"model": "primary", "messages": QUESTION, "stream": True,
                  "stream_options": {"include_usage": True}}) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and not any('"error"' in e for e in events)
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == FULL_REPLY  # the client saw one answer, nothing repeated or lost
    # The fallback was asked to go on from the text the client already had.
    asked = b.requests[-1]["json"]
    partial = asked["messages"][-1]
    prefill = partial["content"] if isinstance(partial["content"], str) else "".join(
        block["text"] for block in partial["content"])
    assert partial["role"] == "assistant"
    assert FULL_REPLY.startswith(prefill) and 0 < len(prefill) < len(text)
    usage = [c["usage"] for c in chunks if c.get("usage")]
    assert usage and usage[-1]["completion_tokens"] >= 1


def keyed_model(monkeypatch: pytest.MonkeyPatch, name: str, provider: str, model: str) -> str:
    """Config lines for a public model of one deployment whose one provider key is in
    KEY_ONE (set here)."""
    monkeypatch.setenv("KEY_ONE", "sk-good-key-one-0000000000")
    return (f'models["{name}"] = [Deployment("{provider}", "{model}", price=PRICE, '
            'api_key_envs=("KEY_ONE",))]')


def test_a_deployment_with_provider_keys_closes_its_breaker_after_the_cooldown(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The first attempt's pick took the half-open probe, then a deployment with provider keys
    # went to the attempt loop, which picked again and was refused: the probe was never given
    # back, and the model answered 503 for ever.
    extra = keyed_model(monkeypatch, "keyed", "a", "gpt-4o-mini")
    layer = ("breaker=BreakerSettings(consecutive_failures=1, cooldown_s=0.5), "
             "retry=RetryPolicy(max_attempts=1)")
    with serve(tmp_path, failover_config(a, b, layer, extra)) as gateway:
        a.push_fault(Fault("status", provider="openai", status=503))
        assert chat(gateway, "keyed").status_code == 503  # opens the breaker
        time.sleep(0.7)  # past the cool-down: half-open
        assert chat(gateway, "keyed").status_code == 200  # the probe goes, and closes it
        assert chat(gateway, "keyed").status_code == 200
        state = deployments(gateway)["models"]["keyed"]["deployments"][0]  # type: ignore[index]
    assert state["breaker"] == "closed"


def continued_at_a_higher_price(a: MockProviderServer, b: MockProviderServer) -> str:
    """`primary` (on a, $1/$2 per 1M) continues broken streams at `big` (Claude on b, $100 in,
    $200 out)."""
    return failover_config(
        a, b, 'routes={"primary": Route(fallbacks=("big",), continuation=True)}',
        extra='models["big"] = [Deployment("b-claude", "claude-3-5-haiku-latest", '
              'price=Price(input_per_mtok="100", output_per_mtok="200"))]')


def test_a_continued_stream_bills_each_part_at_its_own_deployments_price(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer) -> None:
    # The broken attempt's usage was added to the continuation's and the sum priced at the
    # continuation's deployment: here 100 times the broken attempt's price.
    a.push_fault(Fault("error_event", provider="openai", after_chunks=3))
    journal = tmp_path / "journal"
    with serve(tmp_path, metered(continued_at_a_higher_price(a, b), journal)) as gateway:
        with httpx.stream("POST", gateway.url + "/v1/chat/completions", headers=AUTH,
                          json={"model": "primary", "messages": QUESTION, "stream": True,
                                "stream_options": {"include_usage": True}}) as r:
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
            request_id = r.headers["x-request-id"]
        # (the continuation's own usage, as the client saw it)
        [later] = [json.loads(e)["usage"] for e in events[:-1] if json.loads(e).get("usage")]
    record = journaled_record(journal, request_id)
    broken_in = record.input_tokens - later["prompt_tokens"]
    broken_out = record.output_tokens - later["completion_tokens"]
    assert broken_in > 0 and broken_out > 0 and record.attempts == 2
    # The broken part is at least the estimate of the text it delivered (the fallback was
    # asked to go on from it), not one token a chunk.
    partial = b.requests[-1]["json"]["messages"][-1]["content"]
    text = partial if isinstance(partial, str) else "".join(p["text"] for p in partial)
    assert broken_out >= estimate_text(text) > 3
    assert record.cost_micros == (broken_in * 1 + broken_out * 2  # $1/$2 per 1M: micros
                                  + later["prompt_tokens"] * 100
                                  + later["completion_tokens"] * 200)


def test_a_continued_stream_the_client_leaves_bills_both_parts(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer) -> None:
    # The client leaves during the continuation: the record held only the continuation's
    # usage, from which the broken attempt's was then taken away again when it was priced
    # (the broken part billed at its price, the continuation's part mostly not at all).
    a.push_fault(Fault("error_event", provider="openai", after_chunks=3))
    b.config.update({"chunk_delay_s": 0.3})
    journal = tmp_path / "journal"
    with serve(tmp_path, metered(continued_at_a_higher_price(a, b), journal)) as gateway:
        with httpx.stream("POST", gateway.url + "/v1/chat/completions", headers=AUTH,
                          json={"model": "primary", "messages": QUESTION,
                                "stream": True}) as r:
            request_id = r.headers["x-request-id"]
            content = 0
            for line in r.iter_lines():
                content += line.startswith('data: {"id"')
                if content == 5:  # three from the broken attempt, two from the fallback
                    break
        assert wait_for(lambda: deployments(gateway)["models"]["big"]  # type: ignore[index]
                        ["deployments"][0]["in_flight"] == 0)
    record = journaled_record(journal, request_id)
    partial = b.requests[-1]["json"]["messages"][-1]["content"]
    prefill = partial if isinstance(partial, str) else "".join(p["text"] for p in partial)
    asked = b.requests[-1]["json"]
    assert record.attempts == 2
    # Both parts' input (the fallback read the question and the text so far) and output.
    broken_out = estimate_text(prefill)
    assert record.output_tokens > broken_out > 3
    assert record.input_tokens > estimate_text(QUESTION[0]["content"]) + broken_out
    # The fallback's part at its own price ($100 per 1M input: 100 micros a token), its
    # prompt at least the question and the text so far.
    assert asked["messages"][0]["role"] == "user"
    assert record.cost_micros >= 100 * (estimate_text(QUESTION[0]["content"]) + broken_out)


@pytest.mark.parametrize("chunk_chars,after_chunks", [(8, 2), (5, 1)],
                         ids=["mid-word", "after-a-space"])
def test_a_broken_anthropic_stream_is_continued_as_one_message(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer, chunk_chars: int,
        after_chunks: int) -> None:
    # "after-a-space": the client has "Mock " when it breaks; Anthropic refuses a prefill
    # ending in whitespace, so the prefill is "Mock" and the continuation's " reply" loses
    # the space the client already has.
    a.config.update({"chunk_chars": chunk_chars})
    a.push_fault(Fault("error_event", provider="anthropic", after_chunks=after_chunks))
    layer = 'routes={"claude-a": Route(fallbacks=("big",), continuation=True)}'
    with serve(tmp_path, failover_config(a, b, layer)) as gateway:
        sdk = anthropic.Anthropic(base_url=gateway.url, api_key=TEST_KEY, max_retries=0)
        with sdk.messages.stream(model="claude-a", max_tokens=100,
                                 messages=QUESTION) as stream:  # type: ignore[arg-type]
            names = [event.type for event in stream]
            message = stream.get_final_message()
    assert message.content[0].text == FULL_REPLY  # type: ignore[union-attr]
    assert names.count("message_start") == 1 and names.count("message_stop") == 1
    assert "error" not in names
    assert b.requests[-1]["json"]["messages"][-1]["role"] == "assistant"


def test_a_continuation_that_cannot_happen_ends_with_the_error_event(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer) -> None:
    a.push_fault(Fault("error_event", provider="openai", after_chunks=2))
    b.push_fault(Fault("status", provider="anthropic", status=503))
    layer = 'routes={"primary": Route(fallbacks=("big",), continuation=True)}'
    with serve(tmp_path, failover_config(a, b, layer)) as gateway, httpx.stream(
            "POST", gateway.url + "/v1/chat/completions", headers=AUTH,
            json={"model": "primary", "messages": QUESTION, "stream": True}) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert json.loads(events[-1])["error"]["code"]  # well-formed, and the last event
    assert sum('"error"' in e for e in events) == 1


# -- fallbacks by error kind, keys, caller errors ---------------------------------------------

def test_context_window_errors_go_to_the_larger_model(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer) -> None:
    a.push_fault(Fault("status", provider="openai", status=400,
                       message="This model's maximum context length is 8192 tokens. However, "
                               "your messages resulted in 9000 tokens."))
    layer = 'routes={"primary": Route(context_window_fallbacks=("big",))}'
    with serve(tmp_path, failover_config(a, b, layer)) as gateway:
        response = chat(gateway, "primary")
        assert response.status_code == 200
        assert response.headers["x-sluicegate-fallback"] == "big"
        assert response.headers["x-sluicegate-deployment"] == "b-claude/claude-3-5-haiku-latest"
        assert response.json()["choices"][0]["message"]["content"]
        assert breaker_of(gateway, "primary") == "closed"


def test_content_policy_refusals_go_to_the_alternative(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer) -> None:
    a.push_fault(Fault("status", provider="openai", status=400,
                       message="The response was filtered due to the prompt triggering Azure "
                               "OpenAI's content management policy."))
    layer = 'routes={"primary": Route(content_policy_fallbacks=("backup",))}'
    with serve(tmp_path, failover_config(a, b, layer)) as gateway:
        response = chat(gateway, "primary")
    assert response.status_code == 200
    assert response.headers["x-sluicegate-fallback"] == "backup"


def test_caller_errors_are_answered_as_they_are_and_never_open_a_breaker(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer) -> None:
    layer = ('routes={"primary": Route(fallbacks=("backup",))}, '
             'breaker=BreakerSettings(consecutive_failures=1)')
    with serve(tmp_path, failover_config(a, b, layer)) as gateway:
        for _ in range(3):
            a.push_fault(Fault("status", provider="openai", status=400,
                               message="Invalid value for 'temperature'."))
            response = chat(gateway, "primary")
            assert response.status_code == 400
            assert "temperature" in response.json()["error"]["message"]
        assert breaker_of(gateway, "primary") == "closed"
        assert len(b.requests) == 0


def test_a_failing_provider_key_is_taken_out_and_another_key_serves(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEY_ONE", "sk-good-key-one-0000000000")
    monkeypatch.setenv("KEY_REVOKED", "sk-revoked-key-000000000")
    a.config.update({"expected_keys": {"openai": "sk-good-key-one-0000000000"}})
    extra = ('models["keyed"] = [Deployment("a", "gpt-4o-mini", price=PRICE, '
             'api_key_envs=("KEY_REVOKED", "KEY_ONE"))]')
    with serve(tmp_path, failover_config(a, b, "retry=RetryPolicy(max_attempts=2)",
                                         extra)) as gateway:
        for _ in range(12):
            response = chat(gateway, "keyed")
            assert response.status_code == 200, response.text
            assert int(response.headers["x-sluicegate-attempts"]) <= 2
        state = deployments(gateway)["models"]["keyed"]["deployments"][0]  # type: ignore[index]
    keys = {key["key"]: key for key in state["keys"]}
    assert keys["KEY_REVOKED"]["failures"] >= 1
    assert keys["KEY_REVOKED"]["last_error"].startswith("401")
    assert keys["KEY_ONE"]["failures"] == 0
    sent = {r["headers"].get("authorization") for r in a.requests}
    assert sent <= {"Bearer sk-good-key-one-0000000000", "Bearer sk-revoked-key-000000000"}
    assert state["breaker"] == "closed"


# -- timeouts and hedging ---------------------------------------------------------------------

def test_no_first_byte_within_the_ttft_timeout_fails_over(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer) -> None:
    a.push_fault(Fault("slow_first_byte", provider="openai", delay_s=3))
    layer = 'routes={"primary": Route(fallbacks=("backup",), ttft_timeout_s=0.3)}'
    with serve(tmp_path, failover_config(a, b, layer)) as gateway:
        began = time.monotonic()
        response = chat(gateway, "primary", stream=True)
        elapsed = time.monotonic() - began
    assert response.status_code == 200
    assert response.headers["x-sluicegate-deployment"] == "b/gpt-4o-mini"
    assert elapsed < 3  # a's slow answer was abandoned, not waited for
    assert "data: [DONE]" in response.text


def test_hedging_starts_a_second_call_and_the_first_to_answer_wins(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer) -> None:
    a.push_fault(Fault("slow_first_byte", provider="openai", delay_s=2))
    layer = 'routes={"pair": Route(strategy="priority", hedge_after_s=0.2)}'
    with serve(tmp_path, failover_config(a, b, layer)) as gateway:
        began = time.monotonic()
        with httpx.stream("POST", gateway.url + "/v1/chat/completions", headers=AUTH,
                          json={"model": "pair", "messages": QUESTION, "stream": True}) as r:
            body = r.read().decode()
            headers = r.headers
        elapsed = time.monotonic() - began
        counters = deployments(gateway)["counters"]  # type: ignore[index]
        # An answer that comes in time is not hedged.
        quick = chat(gateway, "pair")
    assert headers["x-sluicegate-deployment"] == "b/gpt-4o"
    assert headers["x-sluicegate-attempts"] == "2"
    assert body.count("data: [DONE]") == 1 and '"error"' not in body
    assert elapsed < 2  # b won; a's slow call was cancelled, not waited for
    assert counters["hedges"] == 1
    assert quick.headers["x-sluicegate-deployment"] == "a/gpt-4o-mini"
    assert quick.headers["x-sluicegate-attempts"] == "1"


def test_hedged_call_falls_back_when_both_fail(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer) -> None:
    a.push_fault(Fault("status", provider="openai", status=503))
    layer = 'routes={"pair": Route(strategy="priority", hedge_after_s=0.2)}'
    with serve(tmp_path, failover_config(a, b, layer)) as gateway:
        response = chat(gateway, "pair")
    # a failed at once (before the hedge delay): b is the next deployment, as a retry.
    assert response.status_code == 200
    assert response.headers["x-sluicegate-deployment"] == "b/gpt-4o"


# -- admin --------------------------------------------------------------------------------------

def test_admin_deployments_needs_the_admin_token(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer) -> None:
    with serve(tmp_path, failover_config(a, b, 'routes={}')) as gateway:
        assert chat(gateway, "pair").status_code == 200
        anonymous = httpx.get(gateway.url + "/admin/deployments")
        with_key = httpx.get(gateway.url + "/admin/deployments", headers=AUTH)
        state = deployments(gateway)
    assert anonymous.status_code == 401 and with_key.status_code == 401
    pair = state["models"]["pair"]  # type: ignore[index]
    assert pair["strategy"] == "weighted"
    assert {d["name"] for d in pair["deployments"]} == {"a/gpt-4o-mini", "b/gpt-4o"}
    assert sum(d["requests"] for d in pair["deployments"]) == 1
    assert "provider-secret" not in httpx.Response(200, json=state).text


def test_x_sluicegate_tags_pins_requests_to_deployments_with_those_tags(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer) -> None:
    extra = ('models["regions"] = [Deployment("a", "gpt-4o-mini", price=PRICE, tags=("us",)), '
             'Deployment("b", "gpt-4o", price=PRICE, tags=("eu", "premium"))]')
    with serve(tmp_path, failover_config(a, b, "retry=RetryPolicy(max_attempts=3)",
                                         extra)) as gateway:
        def served(tags: str | None) -> httpx.Response:
            headers = {**AUTH, **({"x-sluicegate-tags": tags} if tags is not None else {})}
            return httpx.post(gateway.url + "/v1/chat/completions", headers=headers,
                              json={"model": "regions", "messages": QUESTION})
        assert {served("eu").headers["x-sluicegate-deployment"] for _ in range(8)} == \
            {"b/gpt-4o"}
        assert {served("premium, eu").headers["x-sluicegate-deployment"]
                for _ in range(4)} == {"b/gpt-4o"}
        assert {served("us").headers["x-sluicegate-deployment"] for _ in range(8)} == \
            {"a/gpt-4o-mini"}
        unknown = served("apac")
        assert unknown.status_code == 400
        assert unknown.json()["error"]["code"] == "no_deployment_with_tags"
        # A pinned request never leaves its tags, even when its deployment fails.
        b.push_fault(Fault("status", provider="openai", status=503))
        b.push_fault(Fault("status", provider="openai", status=503))
        b.push_fault(Fault("status", provider="openai", status=503))
        failed = served("eu")
        assert failed.status_code == 503
        assert len([r for r in a.requests if r["json"]["model"] == "gpt-4o-mini"]) == 8
        assert {served(None).headers["x-sluicegate-deployment"] for _ in range(40)} == \
            {"a/gpt-4o-mini", "b/gpt-4o"}


def test_x_sluicegate_tags_hold_on_a_model_whose_own_deployments_have_none(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer) -> None:
    """The pin is read whatever the requested model's deployments carry: its fallback's
    tagged deployment serves, and tags that no deployment has are a 400."""
    extra = 'models["eu-backup"] = [Deployment("b", "gpt-4o", price=PRICE, tags=("eu",))]'
    layer = 'routes={"primary": Route(fallbacks=("eu-backup",))}'
    with serve(tmp_path, failover_config(a, b, layer, extra)) as gateway:
        client = openai_client(gateway)
        pinned = client.chat.completions.with_raw_response.create(
            model="primary", messages=QUESTION, extra_headers={"x-sluicegate-tags": "eu"})
        with pytest.raises(openai.BadRequestError) as unknown:
            client.chat.completions.create(model="primary", messages=QUESTION,
                                           extra_headers={"x-sluicegate-tags": "apac"})
        unpinned = chat(gateway, "primary")
    assert pinned.headers["x-sluicegate-deployment"] == "b/gpt-4o"
    assert pinned.headers["x-sluicegate-fallback"] == "eu-backup"
    assert unknown.value.code == "no_deployment_with_tags"
    assert unpinned.headers["x-sluicegate-deployment"] == "a/gpt-4o-mini"
    assert len(a.requests) == 1  # only the request without a pin went to the untagged one


def test_a_deployment_out_of_its_own_rpm_is_a_rate_limit_not_an_open_breaker(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer) -> None:
    """Two requests a minute: the third is a 429 in OpenAI's shape, told when a request's
    worth has refilled (30 s a request, whole seconds), not a 503 'breakers are open'."""
    extra = 'models["limited"] = [Deployment("a", "gpt-4o-mini", price=PRICE, rpm=2)]'
    with serve(tmp_path, failover_config(a, b, "retry=RetryPolicy(deadline_s=60)",
                                         extra)) as gateway:
        client = openai_client(gateway)
        for _ in range(2):
            client.chat.completions.create(model="limited", messages=QUESTION)
        with pytest.raises(openai.RateLimitError) as paced:
            client.chat.completions.create(model="limited", messages=QUESTION)
    assert paced.value.code == "rate_limited"
    assert 25 <= int(paced.value.response.headers["retry-after"]) <= 30
    assert len(a.requests) == 2


def test_a_hedged_answer_is_cached_like_any_other(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer) -> None:
    """The cache above keeps what the winning call sent (its context copy's record of it)."""
    a.push_fault(Fault("slow_first_byte", provider="openai", delay_s=2))
    layer = 'routes={"pair": Route(strategy="priority", hedge_after_s=0.2)}'
    text = failover_config(a, b, layer).replace(
        "    Middleware(FailoverMiddleware",
        '    Middleware(CacheMiddleware, policy="always"),\n    Middleware(FailoverMiddleware')
    with serve(tmp_path, "from middleware.cache import CacheMiddleware\n" + text) as gateway:
        first = chat(gateway, "pair")
        assert first.headers["x-sluicegate-deployment"] == "b/gpt-4o"
        assert first.headers["x-sluicegate-cache"] == "miss"
        # Asked of the cache only (no upstream call that could store another answer):
        # only-if-cached gets a 504 until the first answer is stored.
        deadline = time.monotonic() + 5
        while (second := httpx.post(
                gateway.url + "/v1/chat/completions", timeout=30,
                headers={**AUTH, "cache-control": "only-if-cached"},
                json={"model": "pair", "messages": QUESTION})).status_code == 504 \
                and time.monotonic() < deadline:
            time.sleep(0.05)
    assert second.status_code == 200, second.text
    assert second.headers["x-sluicegate-cache"] == "hit"
    assert second.json()["choices"] == first.json()["choices"]
    assert len(b.requests) == 1


def test_a_hedge_losers_refusal_does_not_replace_the_winners_answer(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer) -> None:
    # a is slow, so b is called too; a then refuses with a 400 before b starts answering. b's
    # answer is the response: it is metered as b's 200, its usage and cost (the loser's 400
    # was raised after b's answer had gone out, and metered as a $0 400).
    a.config.update({"ttft_s": 0.5})
    a.push_fault(Fault("status", provider="openai", status=400,
                       message="Invalid value for 'temperature'."))
    b.config.update({"ttft_s": 1.5})
    journal = tmp_path / "journal"
    layer = 'routes={"pair": Route(strategy="priority", hedge_after_s=0.2)}'
    with serve(tmp_path, metered(failover_config(a, b, layer), journal)) as gateway:
        answered = openai_client(gateway).chat.completions.with_raw_response.create(
            model="pair", messages=QUESTION)
        request_id = answered.headers["x-request-id"]
        usage = answered.parse().usage
        assert breaker_of(gateway, "pair", 1) == "closed"
    assert usage is not None and answered.headers["x-sluicegate-deployment"] == "b/gpt-4o"
    assert len(a.requests) == 1 and len(b.requests) == 1  # the race did happen
    record = journaled_record(journal, request_id)
    assert (record.status, record.deployment, record.attempts) == (200, "b/gpt-4o", 2)
    assert (record.input_tokens, record.output_tokens) == \
        (usage.prompt_tokens, usage.completion_tokens)
    assert record.cost_micros == usage.prompt_tokens + 2 * usage.completion_tokens > 0


def test_hedged_calls_are_held_to_the_ttft_timeout(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer) -> None:
    # Both deployments of "pair" are slow to start: the TTFT timeout abandons the first call
    # and the hedge's second alike, and the fallback answers (hedged calls went straight to
    # the app below, with no TTFT timeout: the slow a answered after its 3 s).
    a.push_fault(Fault("slow_first_byte", provider="openai", delay_s=3))
    b.push_fault(Fault("slow_first_byte", provider="openai", delay_s=3))
    layer = ('routes={"pair": Route(strategy="priority", fallbacks=("backup",), '
             'hedge_after_s=0.2, ttft_timeout_s=0.6)}')
    with serve(tmp_path, failover_config(a, b, layer)) as gateway:
        response = chat(gateway, "pair", stream=True)
    assert response.status_code == 200
    assert response.headers["x-sluicegate-deployment"] == "b/gpt-4o-mini"
    assert response.headers["x-sluicegate-fallback"] == "backup"
    assert response.headers["x-sluicegate-attempts"] == "3"
    assert response.text.count("data: [DONE]") == 1 and '"error"' not in response.text


def test_a_hedged_stream_that_breaks_is_continued(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer) -> None:
    # a answers before the hedge delay, then breaks: the route asks for continuation, so
    # the other deployment (one that prefills) goes on from the text sent. The hedged call
    # was not continued: it ended with the error event.
    a.push_fault(Fault("error_event", provider="openai", after_chunks=3))
    extra = ('models["mixed"] = [Deployment("a", "gpt-4o-mini", price=PRICE), '
             'Deployment("b-claude", "claude-3-5-haiku-latest", price=PRICE)]')
    layer = 'routes={"mixed": Route(strategy="priority", hedge_after_s=0.5, continuation=True)}'
    with serve(tmp_path, failover_config(a, b, layer, extra)) as gateway, httpx.stream(
            "POST", gateway.url + "/v1/chat/completions", headers=AUTH,
            json={"model": "mixed", "messages": QUESTION, "stream": True}) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and not any('"error"' in e for e in events)
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == FULL_REPLY
    assert len(a.requests) == 1 and len(b.requests) == 1
    assert b.requests[-1]["json"]["messages"][-1] == {
        "role": "assistant", "content": [{"type": "text", "text": "Mock reply to: one two t"}]}


def test_the_ttft_timeout_leaves_non_stream_calls_alone(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer) -> None:
    # A non-stream answer arrives whole when the model is done, so its first byte is its
    # last: like the provider's first_byte_s, ttft_timeout_s bounds streams only (total_s
    # bounds a non-stream call). The slower answer was thrown away and asked again of backup.
    a.push_fault(Fault("slow_first_byte", provider="openai", delay_s=1))
    layer = 'routes={"primary": Route(fallbacks=("backup",), ttft_timeout_s=0.3)}'
    with serve(tmp_path, failover_config(a, b, layer)) as gateway:
        response = chat(gateway, "primary")
    assert response.status_code == 200
    assert response.headers["x-sluicegate-deployment"] == "a/gpt-4o-mini"
    assert response.headers["x-sluicegate-attempts"] == "1"
    assert response.json()["choices"][0]["message"]["content"] == FULL_REPLY
    assert len(a.requests) == 1 and len(b.requests) == 0


@pytest.mark.parametrize("kind,message", [
    ("context_window", "prompt is too long: 9000 tokens > 8192 maximum"),
    ("content_policy", "Output blocked by content filtering policy."),
])
def test_a_deployment_that_refused_the_request_is_not_asked_again(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer, kind: str,
        message: str) -> None:
    # primary refuses, and so does "big", the first of its fallbacks for that refusal: the
    # next one answers. (The fallback chain started over at "big", which refused again
    # until the attempts ran out.)
    a.push_fault(Fault("status", provider="openai", status=400, message=message))
    for _ in range(2):
        b.push_fault(Fault("status", provider="anthropic", status=400, message=message))
    layer = f'routes={{"primary": Route({kind}_fallbacks=("big", "backup"))}}'
    with serve(tmp_path, failover_config(a, b, layer)) as gateway:
        response = chat(gateway, "primary")
        assert breaker_of(gateway, "big") == "closed"
    assert [r["provider"] for r in a.requests + b.requests] == ["openai", "anthropic", "openai"]
    assert response.status_code == 200, response.text
    assert response.headers["x-sluicegate-fallback"] == "backup"
    assert response.headers["x-sluicegate-attempts"] == "3"


def test_a_deployment_whose_only_key_is_refused_answers_at_once(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # After its one key failed, every round found nothing to call, yet the layer backed off
    # and went round again until the 120 s deadline (the client gave up first: ReadTimeout).
    extra = keyed_model(monkeypatch, "keyed", "a", "gpt-4o-mini")
    with serve(tmp_path, failover_config(a, b, "retry=RetryPolicy(deadline_s=120)",
                                         extra)) as gateway:
        a.push_fault(Fault("status", provider="openai", status=401))
        response = chat(gateway, "keyed")
    assert response.status_code == 401
    assert len(a.requests) == 1


def test_a_deployment_whose_provider_key_is_refused_is_not_called_again_with_it(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A deployment with one key (api_key_env): it was called again with that key after the
    # backoff, max_attempts times, each a breaker failure, before the 401 went back.
    extra = 'models["single"] = [Deployment("a", "gpt-4o-mini", price=PRICE)]'
    with serve(tmp_path, failover_config(a, b, "retry=RetryPolicy(max_attempts=3)",
                                         extra)) as gateway:
        a.push_fault(Fault("status", provider="openai", status=401))
        calls = len(a.requests)
        response = chat(gateway, "single")
        assert response.status_code == 401
        assert len(a.requests) == calls + 1
        assert response.headers["x-sluicegate-attempts"] == "1"


def key_breaker_of(server: ThreadedServer, model: str) -> str:
    state = deployments(server)["models"][model]["deployments"][0]  # type: ignore[index]
    return str(state["keys"][0]["breaker"])


def test_a_key_probe_refused_by_the_attempt_limit_is_given_back(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The fallback's pick took its half-open key's probe, then the attempt limit refused the
    # retry: the deployment's slot was given back, the key's never was, and "keyed" had no
    # usable key for ever after.
    extra = keyed_model(monkeypatch, "keyed", "b", "gpt-4o")
    layer = ('routes={"primary": Route(fallbacks=("keyed",))}, '
             'breaker=BreakerSettings(consecutive_failures=1, cooldown_s=0.5), '
             'retry=RetryPolicy(max_attempts=1)')
    with serve(tmp_path, failover_config(a, b, layer, extra)) as gateway:
        b.push_fault(Fault("status", provider="openai", status=401))
        assert chat(gateway, "keyed").status_code == 401  # opens the key's breaker
        assert key_breaker_of(gateway, "keyed") == "open"
        time.sleep(0.7)  # past the cool-down: the key is half-open
        a.push_fault(Fault("status", provider="openai", status=503))
        assert chat(gateway, "primary").status_code == 503  # no attempt left for "keyed"
        response = chat(gateway, "keyed")  # the key's probe
        assert response.status_code == 200, response.text
        assert key_breaker_of(gateway, "keyed") == "closed"
    assert len(b.requests) == 2


def test_a_failed_continuation_records_its_keys_probe(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A continuation that failed recorded its deployment's failure but not its key's: the
    # half-open key kept its probe for ever, and "keyed-claude" never answered again.
    extra = keyed_model(monkeypatch, "keyed-claude", "b-claude", "claude-3-5-haiku-latest")
    layer = ('routes={"primary": Route(fallbacks=("keyed-claude",), continuation=True)}, '
             'breaker=BreakerSettings(consecutive_failures=1, cooldown_s=0.5)')
    with serve(tmp_path, failover_config(a, b, layer, extra)) as gateway:
        b.push_fault(Fault("status", provider="anthropic", status=401))
        assert chat(gateway, "keyed-claude").status_code == 401  # opens the key's breaker
        time.sleep(0.7)  # the key is half-open
        a.push_fault(Fault("error_event", provider="openai", after_chunks=2))
        b.push_fault(Fault("status", provider="anthropic", status=503))
        broken = chat(gateway, "primary", stream=True)  # the continuation fails: 503
        assert broken.text.count('"error"') == 1 and len(b.requests) == 2
        time.sleep(0.7)  # the deployment's breaker, opened by that 503, is half-open
        response = chat(gateway, "keyed-claude")
        assert response.status_code == 200, response.text
        assert key_breaker_of(gateway, "keyed-claude") == "closed"
        assert breaker_of(gateway, "keyed-claude") == "closed"


def test_a_continuation_with_nowhere_to_go_spends_no_retry_budget(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer) -> None:
    a.push_fault(Fault("error_event", provider="openai", after_chunks=2))
    layer = 'routes={"primary": Route(continuation=True)}'  # no other deployment, no fallback
    with serve(tmp_path, failover_config(a, b, layer)) as gateway:
        broken = chat(gateway, "primary", stream=True)
        counters = deployments(gateway)["counters"]  # type: ignore[index]
    assert broken.text.count('"error"') == 1
    assert counters["retries"] == 0 and counters["budget_refusals"] == 0


def test_a_continuation_the_client_left_gives_its_deployment_back(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer) -> None:
    # The client leaves while the continuation waits for its first byte: the call is
    # cancelled, and it was never counted as finished (in flight for ever, and a half-open
    # breaker's probe never given back).
    a.push_fault(Fault("error_event", provider="openai", after_chunks=2))
    b.config.update({"ttft_s": 3.0})
    layer = 'routes={"primary": Route(fallbacks=("big",), continuation=True)}'
    with serve(tmp_path, failover_config(a, b, layer)) as gateway:
        with httpx.stream("POST", gateway.url + "/v1/chat/completions", headers=AUTH,
                          json={"model": "primary", "messages": QUESTION, "stream": True}) as r:
            content = 0
            for line in r.iter_lines():
                content += line.startswith('data: {"id"')
                if content == 2:
                    break
            assert wait_for(lambda: len(b.requests) == 1)  # the continuation is under way
        # (the client has gone)

        def big() -> dict[str, int]:
            return deployments(gateway)["models"]["big"]["deployments"][0]  # type: ignore

        assert wait_for(lambda: big()["requests"] == 1 and big()["in_flight"] == 0)


def test_a_fallback_the_key_may_not_use_is_passed_over(
        tmp_path: Path, mock_url: str, mock: MockProviderServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The key may use gpt-mock and azure-mock: its primary failing, the route's first
    # fallback (claude-mock) is not a way round that; the second serves.
    limited = "sk-sg-gpt-and-azure-only-0123456789abcdef0123"
    monkeypatch.setenv("SG_LIMITED_KEY", limited)
    stack = ("[Middleware(AuthMiddleware, keys=[StaticKey('tests', key_env='SG_TEST_KEY'), "
             "StaticKey('limited', key_env='SG_LIMITED_KEY', "
             "allowed_models=('gpt-mock', 'azure-*'))]), "
             "Middleware(FailoverMiddleware, retry=RetryPolicy(max_attempts=3), "
             "routes={'gpt-mock': Route(fallbacks=('claude-mock', 'azure-mock'))})]")
    text = mock_config(mock_url, middleware="[]",
                       extra="from middleware.failover import Route\nmiddleware = " + stack)
    with ThreadedServer(create_app(write_config(tmp_path, text))) as server:
        for key, fallback, provider in ((limited, "azure-mock", "azure"),
                                        (TEST_KEY, "claude-mock", "anthropic")):
            mock.reset_log()
            mock.push_fault(Fault("status", provider="openai", status=503))
            response = httpx.post(server.url + "/v1/chat/completions",
                                  headers={"authorization": f"Bearer {key}"},
                                  json={"model": "gpt-mock", "messages": [
                                      {"role": "user", "content": "hello"}]}, timeout=10)
            assert response.status_code == 200, response.text
            assert response.headers["x-sluicegate-fallback"] == fallback
            assert [r["provider"] for r in mock.requests] == ["openai", provider]


def test_a_round_that_finds_the_breaker_open_waits_for_it_to_half_open_in_the_deadline(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer) -> None:
    # The only deployment answers 429 Retry-After: 1, which opens its breaker (cool-down
    # 1.5 s). After the second's wait the breaker is still open: the request waits for it
    # to half-open (well inside the 10 s deadline) and its probe serves the answer, rather
    # than the 429 going back to a client that would retry into the open breaker.
    a.push_fault(Fault("status", provider="openai", status=429, retry_after_s=1))
    layer = ('retry=RetryPolicy(deadline_s=10, max_attempts=3), '
             'breaker=BreakerSettings(consecutive_failures=1, cooldown_s=1.5)')
    with serve(tmp_path, failover_config(a, b, layer)) as gateway:
        response = chat(gateway, "primary")
    assert response.status_code == 200, response.text
    assert len(a.requests) == 2 and b.requests == []
