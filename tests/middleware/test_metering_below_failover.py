"""The metering layer listed below the failover layer: one record per request, the default
order's.

Listed between a failover layer (above) and a quota layer (below), the metering layer is
called once per call the failover layer makes for a request: each retry, each deployment it
moves on to, the call again for a cheaper model the quota layer downgraded the request to
(`Rerouted`), the call after a deployment's adapter refused the request
(`UntranslatableRequest`), a broken stream's continuation, a hedge. The caller sent one
request, and the ledger holds one record of it, made when it has ended: its final outcome,
every attempt in it, the same record (bar its id and timings) as the default order's
(metering above quota above failover) for the same request against the same mock.

The durable mode (`durability="response"`) holds a response's last byte until the record is
on disk; below the failover layer, the answers that layer makes itself (its error after the
last attempt, a stream it ends in-band) never pass the metering layer, so that order is
refused at startup, naming the order to use.

Prices and arithmetic are test_quota_layer's; `gpt-mock` has two deployments on the
session's mock, routed by priority, so a fault injected for the next call hits the first.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway import create_app
from gateway.config import ConfigError
from middleware.metering import UsageRecord
from middleware.metering.journal import Journal
from tests.gateway.test_config import run_cli
from tests.harness import TEST_KEY, ThreadedServer, mock_config, write_config
from tests.middleware.test_quota_failover import TWO_DEPLOYMENTS
from tests.middleware.test_quota_layer import (
    ANTHROPIC_HEADERS,
    INPUT,
    OUTPUT,
    PRELUDE,
    PROMPT,
    auth,
    quota,
    static_key,
)
from tests.mock_providers import Fault, MockProviderServer

OPENAI = {"authorization": f"Bearer {TEST_KEY}"}
# `stops`: an OpenAI deployment first, which takes at most 4 stop sequences (its adapter
# refuses 5 before any call), then a Gemini one, which takes them. `hedged-mock`: gpt-mock's
# two deployments, the second called too when the first has not answered in 0.2 s.
MODELS = TWO_DEPLOYMENTS + '''
models["stops"] = [Deployment("openai", "gpt-4o-mini", price=MOCK_PRICE),
                   Deployment("gemini", "gemini-2.0-flash", price=MOCK_PRICE)]
models["hedged-mock"] = models["gpt-mock"]
'''
FAILOVER = ("Middleware(FailoverMiddleware, breaker=NEVER_OPENS, "
            "retry=RetryPolicy(max_attempts=2), routes={"
            "'gpt-mock': Route(strategy='priority', continuation=True), "
            "'stops': Route(strategy='priority'), "
            "'hedged-mock': Route(strategy='priority', hedge_after_s=0.2)})")
# Past one request a minute, the key's requests go to the cheaper model.
DOWNGRADING = static_key("Limits(rpm=1, on_overflow='downgrade', downgrade_to='cheap-mock')")
# What differs between two records of one request made twice: its id and its timings.
UNCOMPARED = ("request_id", "started_at", "ended_at", "latency_ms", "ttft_ms")


def metering(journal: Path, durability: str = "batch") -> str:
    return (f"Middleware(MeteringMiddleware, journal_dir={str(journal)!r}, "
            f"durability={durability!r}, flush_interval_s=0.05)")


def stack(order: str, journal: Path, key: str, durability: str = "batch") -> list[str]:
    """The layers of `order`: "default" (metering above quota above failover) or
    "below_failover" (failover above metering above quota)."""
    layers = {"default": [metering(journal, durability), quota("'memory'"), FAILOVER],
              "below_failover": [FAILOVER, metering(journal, durability), quota("'memory'")]}
    return [auth(key), *layers[order]]


def config_file(tmp_path: Path, mock_url: str, layers: list[str]) -> Path:
    text = mock_config(mock_url, middleware="none",
                       extra=PRELUDE + MODELS + f"\nmiddleware = [{', '.join(layers)}]\n")
    tmp_path.mkdir(parents=True, exist_ok=True)
    return write_config(tmp_path, text)


def journaled(journal: Path) -> list[UsageRecord]:
    """Every record in the journals under `journal`, as journaled (none counted out)."""
    records = []
    for slot in sorted(journal.glob("slot-*")):
        reader = Journal(slot, read_only=True)
        reader.open()
        try:
            records.extend(UsageRecord.decode(payload) for _, payload in reader.pending())
        finally:
            reader.close()
    return records


def compared(record: UsageRecord) -> dict[str, Any]:
    fields = dataclasses.asdict(record)
    for name in UNCOMPARED:
        del fields[name]
    return fields


Requests = Callable[[str, MockProviderServer], list[httpx.Response]]


def chat(url: str, model: str = "gpt-mock", **body: Any) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", headers=OPENAI, timeout=20,
                      json={"model": model, "messages": PROMPT, "max_tokens": OUTPUT, **body})


def downgraded(url: str, mock: MockProviderServer) -> list[httpx.Response]:
    first = chat(url)
    second = chat(url)  # over the key's rpm: to cheap-mock (a `Rerouted` below failover)
    assert second.headers["x-sluicegate-downgraded"].startswith("gpt-mock -> cheap-mock")
    return [first, second]


def retried(url: str, mock: MockProviderServer) -> list[httpx.Response]:
    mock.push_fault(Fault(kind="status", provider="openai", status=500))
    response = chat(url)
    assert response.headers["x-sluicegate-attempts"] == "2"
    return [response]


def refused_by_an_adapter(url: str, mock: MockProviderServer) -> list[httpx.Response]:
    # Anthropic's API to the OpenAI deployment: its adapter refuses the fifth stop sequence
    # (an `UntranslatableRequest` below failover), and the Gemini deployment answers.
    response = httpx.post(url + "/v1/messages", timeout=20,
                          headers={"x-api-key": TEST_KEY, **ANTHROPIC_HEADERS},
                          json={"model": "stops", "messages": PROMPT, "max_tokens": OUTPUT,
                                "stop_sequences": ["one", "two", "three", "four", "five"]})
    assert response.headers["x-sluicegate-deployment"] == "gemini/gemini-2.0-flash"
    return [response]


def continued(url: str, mock: MockProviderServer) -> list[httpx.Response]:
    mock.push_fault(Fault(kind="error_event", provider="openai", after_chunks=3))
    response = chat(url, stream=True, stream_options={"include_usage": True})
    assert response.text.count("data: [DONE]") == 1 and '"error"' not in response.text
    return [response]


def failed(url: str, mock: MockProviderServer) -> list[httpx.Response]:
    for _ in range(2):
        mock.push_fault(Fault(kind="status", provider="openai", status=503))
    response = chat(url)
    assert response.status_code == 503
    return [response]


def hedged(url: str, mock: MockProviderServer) -> list[httpx.Response]:
    mock.push_fault(Fault(kind="slow_first_byte", provider="openai", delay_s=5))
    response = chat(url, "hedged-mock")
    assert response.headers["x-sluicegate-deployment"] == "openai/gpt-4o"
    return [response]


REQUESTS: dict[str, Requests] = {
    "downgraded": downgraded, "retried": retried, "refused_by_an_adapter": refused_by_an_adapter,
    "continued": continued, "failed": failed, "hedged": hedged,
}


def recorded(tmp_path: Path, mock: MockProviderServer, mock_url: str, order: str,
             requests: Requests) -> list[UsageRecord]:
    """The journaled records of `requests` made to a gateway of `order`, in the order the
    requests were sent, once the gateway has stopped (its queue written out); one each."""
    journal = tmp_path / order / "journal"
    path = config_file(tmp_path / order, mock_url, stack(order, journal, DOWNGRADING))
    mock.clear_faults()
    with ThreadedServer(create_app(path)) as server:
        responses = requests(server.url, mock)
    records = journaled(journal)
    sent = [response.headers["x-request-id"] for response in responses]
    assert sorted(record.request_id for record in records) == sorted(sent)  # one each
    by_id = {record.request_id: record for record in records}
    return [by_id[request_id] for request_id in sent]


@pytest.mark.parametrize("name", sorted(REQUESTS))
def test_a_request_is_recorded_once_below_failover_as_in_the_default_order(
        tmp_path: Path, mock: MockProviderServer, mock_url: str, name: str) -> None:
    # Each call the failover layer made for the request added the layer's record to the
    # request's end (RequestContext.on_end) once more: the journal held a record of the
    # request per call (the ledger's reader counts one of them, by luck of their order).
    default = recorded(tmp_path, mock, mock_url, "default", REQUESTS[name])
    below = recorded(tmp_path, mock, mock_url, "below_failover", REQUESTS[name])
    assert [compared(record) for record in below] == [compared(record) for record in default]


def test_the_records_below_failover_hold_the_final_outcome_and_every_attempt(
        tmp_path: Path, mock: MockProviderServer, mock_url: str) -> None:
    # (what the comparison above compares: not the same wrong record twice)
    [first, second] = recorded(tmp_path, mock, mock_url, "below_failover", downgraded)
    assert (first.model, first.status, first.cost_micros) == ("gpt-mock", 200,
                                                              INPUT + 2 * OUTPUT)
    assert (second.model, second.served_model, second.status, second.attempts) == \
        ("cheap-mock", "cheap-upstream", 200, 1)
    [again] = recorded(tmp_path / "again", mock, mock_url, "below_failover", failed)
    assert (again.status, again.attempts, again.cost_micros) == (503, 2, 0)
    [refused] = recorded(tmp_path / "refused", mock, mock_url, "below_failover",
                         refused_by_an_adapter)
    assert (refused.status, refused.attempts, refused.deployment) == \
        (200, 1, "gemini/gemini-2.0-flash")


def test_durable_metering_below_failover_is_refused_at_startup(
        tmp_path: Path, mock_url: str) -> None:
    # It recorded a downgraded request's `Rerouted` as a 500 (and each failed attempt as the
    # request's outcome): the first record of a request is the one the ledger keeps.
    journal = tmp_path / "journal"
    path = config_file(tmp_path, mock_url,
                       stack("below_failover", journal, DOWNGRADING, "response"))
    with pytest.raises(ConfigError) as refused:
        create_app(path)
    assert str(refused.value) == (
        f"{path}: MeteringMiddleware(durability='response') is listed below "
        "FailoverMiddleware, which answers some requests itself (its error after the last "
        "attempt, a stream it ends in-band), so their last byte cannot wait for their "
        "record; list MeteringMiddleware above FailoverMiddleware (auth, metering, quota, "
        "cache, failover), or use durability='batch' there.")
    default = config_file(tmp_path / "default", mock_url,
                          stack("default", journal, DOWNGRADING, "response"))
    create_app(default)  # (above it: accepted)


# A layer of the operator's own that routes every call it makes below, as the failover layer
# does (`RequestContext.reroutable`), without telling the layers below at startup.
REROUTER = '''
from gateway.context import Rerouted, route_to


class Rerouter:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        ctx = find_request_context(scope)
        if scope["type"] != "http" or ctx is None:
            await self.app(scope, receive, send)
            return
        ctx.reroutable = True
        try:
            await self.app(scope, receive, send)
        except Rerouted as rerouted:
            route_to(ctx, rerouted.model)
            await self.app(scope, receive, send)
'''


def test_durable_metering_below_a_custom_router_records_a_rerouted_request_once(
        tmp_path: Path, mock: MockProviderServer, mock_url: str) -> None:
    # The durable path took the quota layer's `Rerouted` for a failure and recorded the
    # request as a 500 (then again as the 200 it was): the ledger kept the 500.
    journal = tmp_path / "journal"
    layers = [auth(DOWNGRADING), "Middleware(Rerouter)", metering(journal, "response"),
              quota("'memory'")]
    path = config_file(tmp_path, mock_url, layers)
    path.write_text(path.read_text().replace("\nmiddleware = [", REROUTER + "\nmiddleware = [",
                                             1))
    with ThreadedServer(create_app(path)) as server:
        responses = downgraded(server.url, mock)
    records = journaled(journal)
    assert sorted(record.request_id for record in records) == \
        sorted(response.headers["x-request-id"] for response in responses)
    second = next(record for record in records
                  if record.request_id == responses[1].headers["x-request-id"])
    assert (second.model, second.served_model, second.status, second.error_type) == \
        ("cheap-mock", "cheap-upstream", 200, None)


def test_check_config_refuses_what_the_gateway_would_refuse_at_startup(
        tmp_path: Path, mock_url: str) -> None:
    """`sluicegate check-config` runs the layers' own checks (it only built the stack, and
    said such a config was fine)."""
    path = config_file(tmp_path, mock_url, stack("below_failover", tmp_path / "journal",
                                                 DOWNGRADING, "response"))
    result = run_cli("check-config", str(path))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "MeteringMiddleware(durability='response') is listed below FailoverMiddleware" \
        in result.stderr
    accepted = config_file(tmp_path / "default", mock_url,
                           stack("default", tmp_path / "journal", DOWNGRADING, "response"))
    assert run_cli("check-config", str(accepted)).returncode == 0
