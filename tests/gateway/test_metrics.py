"""/metrics after known traffic: the counts, tokens, cost, histograms and layer gauges."""
from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest

from gateway import create_app
from gateway.config import ConfigError
from gateway.metrics import LATENCY_BUCKETS, RequestMetrics, render
from tests.harness import (
    SHARED_QUOTA,
    TEST_KEY,
    ThreadedServer,
    mock_config,
    start_cli_gateway,
    stop_process,
    write_config,
)
from tests.mock_providers import Fault, MockConfig, MockProviderServer

LINE = re.compile(r'^(?P<name>[a-z_]+)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$')
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Prometheus text format -> {(name, labels): value}; also checks every line's shape."""
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith(("# HELP ", "# TYPE ")):
            continue
        match = LINE.match(line)
        assert match, f"not a sample line: {line!r}"
        labels = frozenset(LABEL.findall(match["labels"] or ""))
        samples[(match["name"], labels)] = float(match["value"])
    return samples


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
          **labels: str) -> float:
    """The sum over samples of `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= set(ls))


def scrape_until(url: str, name: str, total: float) -> dict[tuple[str, frozenset[tuple[
        str, str]]], float]:
    """/metrics once `name` sums to `total` (a request is counted just after its last byte
    went out, so the client can be a moment ahead)."""
    deadline = time.monotonic() + 5
    while True:
        samples = parse(httpx.get(url + "/metrics").text)
        if value(samples, name) >= total or time.monotonic() > deadline:
            return samples
        time.sleep(0.01)


@pytest.fixture
def metered_gateway(tmp_path: Path, mock_url: str) -> Iterator[ThreadedServer]:
    with ThreadedServer(create_app(write_config(tmp_path, mock_config(mock_url)))) as server:
        yield server


def test_metrics_count_known_traffic(metered_gateway: ThreadedServer,
                                     mock: MockProviderServer) -> None:
    sdk = openai.OpenAI(base_url=metered_gateway.url + "/v1", api_key=TEST_KEY, max_retries=0)
    prompt, completion = 0, 0
    for i in range(3):
        answer = sdk.chat.completions.create(
            model="gpt-mock", messages=[{"role": "user", "content": f"count me {i}"}])
        assert answer.usage is not None
        prompt += answer.usage.prompt_tokens
        completion += answer.usage.completion_tokens
    stream = sdk.chat.completions.create(
        model="claude-mock", stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "a stream"}])
    chunks = list(stream)
    assert chunks[-1].usage is not None
    mock.push_fault(Fault("status", provider="openai", status=500))
    with pytest.raises(openai.InternalServerError):
        sdk.chat.completions.create(model="gpt-mock", messages=[{"role": "user", "content": "x"}])
    # Deterministic requests are cached by the default stack: the second one is a hit.
    for _ in range(2):
        sdk.chat.completions.create(model="gpt-mock", temperature=0,
                                    messages=[{"role": "user", "content": "cache me"}])
    response = httpx.get(metered_gateway.url + "/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = scrape_until(metered_gateway.url, "sluicegate_requests_total", 7)

    ok = value(samples, "sluicegate_requests_total", model="gpt-mock", status="200",
               operation="openai.chat", provider="openai")
    assert ok == 4  # three, then the miss of the cached pair; its hit came from the cache
    assert value(samples, "sluicegate_requests_total", model="gpt-mock", status="200",
                 provider="cache") == 1
    assert value(samples, "sluicegate_requests_total", model="gpt-mock", status="500") == 1
    assert value(samples, "sluicegate_requests_total", model="claude-mock", status="200",
                 provider="anthropic") == 1
    # Tokens: the three plain calls plus the cached pair's miss (a hit bills nothing).
    miss = sdk.chat.completions.create(model="gpt-mock", temperature=0, messages=[
        {"role": "user", "content": "cache me"}], extra_headers={"cache-control": "no-cache"})
    assert miss.usage is not None
    assert value(samples, "sluicegate_tokens_total", model="gpt-mock", direction="input") == \
        prompt + miss.usage.prompt_tokens
    assert value(samples, "sluicegate_tokens_total", model="gpt-mock", direction="output") == \
        completion + miss.usage.completion_tokens
    # The mock price is $1 in, $2 out per million tokens (rounded up per request).
    cost = value(samples, "sluicegate_cost_usd_total", model="gpt-mock")
    exact = (Decimal(prompt + miss.usage.prompt_tokens)
             + 2 * Decimal(completion + miss.usage.completion_tokens)) / 10**6
    assert abs(Decimal(str(cost)) - exact) <= Decimal("0.000005")
    assert value(samples, "sluicegate_cache_requests_total", model="gpt-mock", result="hit") == 1
    assert value(samples, "sluicegate_cost_saved_usd_total", model="gpt-mock") > 0
    # Histograms: one observation per request, cumulative buckets ending at the count.
    count = value(samples, "sluicegate_request_duration_seconds_count", model="gpt-mock")
    assert count == 6
    assert value(samples, "sluicegate_request_duration_seconds_bucket", model="gpt-mock",
                 le="+Inf") == count
    buckets = [value(samples, "sluicegate_request_duration_seconds_bucket", model="gpt-mock",
                     le=repr(float(bound))) for bound in LATENCY_BUCKETS]
    assert buckets == sorted(buckets)
    assert value(samples, "sluicegate_ttft_seconds_count", model="claude-mock") == 1
    assert value(samples, "sluicegate_requests_in_flight") == 0
    assert ("sluicegate_metering_queue_depth", frozenset()) in samples


def test_quota_refusals_breakers_and_unknown_models(tmp_path: Path, mock_url: str) -> None:
    extra = ("middleware[2] = Middleware(QuotaMiddleware, limits=Limits(rpm=2))\n"
             "middleware[-1] = Middleware(FailoverMiddleware, retry=RetryPolicy(max_attempts=1))")
    text = mock_config(mock_url, extra=extra)
    with ThreadedServer(create_app(write_config(tmp_path, text))) as server:
        statuses = [httpx.post(server.url + "/v1/chat/completions",
                               headers={"authorization": f"Bearer {TEST_KEY}"},
                               json={"model": "gpt-mock",
                                     "messages": [{"role": "user", "content": str(i)}]}
                               ).status_code for i in range(4)]
        samples = scrape_until(server.url, "sluicegate_requests_total", 4)
    assert statuses.count(429) == 2
    assert value(samples, "sluicegate_quota_refusals_total", model="gpt-mock",
                 reason="requests") == 2
    assert value(samples, "sluicegate_breaker_state", model="gpt-mock") == 0  # closed
    assert ("sluicegate_breaker_state", frozenset({("model", "gpt-mock"),
                                                   ("deployment", "openai/gpt-4o-mini")})) \
        in samples


def test_requests_the_kernel_refuses_are_counted(metered_gateway: ThreadedServer) -> None:
    # Refused before any layer saw them (a wrong method, a wrong content type, a body too
    # large); a flood of them was invisible in /metrics.
    url = metered_gateway.url + "/v1/chat/completions"
    auth = {"authorization": f"Bearer {TEST_KEY}"}
    statuses = [httpx.get(url, headers=auth).status_code,
                httpx.post(url, headers={**auth, "content-type": "text/plain"},
                           content=b"{}").status_code,
                httpx.post(url, headers=auth, content=b"x" * (17 << 20)).status_code]
    assert statuses == [405, 415, 413]
    samples = scrape_until(metered_gateway.url, "sluicegate_requests_total", 3)
    for status in statuses:
        assert value(samples, "sluicegate_requests_total", model="other", provider="",
                     status=str(status), operation="openai.chat") == 1, status


METRICS_TOKEN = "metrics-token-5f0c2e9a"


def test_a_metrics_token_keeps_the_metrics_from_those_without_it(
        tmp_path: Path, mock_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SG_METRICS_TOKEN", METRICS_TOKEN)
    text = mock_config(mock_url, extra="settings = Settings(metrics_token_env='SG_METRICS_TOKEN')")
    with ThreadedServer(create_app(write_config(tmp_path, text))) as server:
        sdk = openai.OpenAI(base_url=server.url + "/v1", api_key=TEST_KEY, max_retries=0)
        sdk.chat.completions.create(model="gpt-mock",
                                    messages=[{"role": "user", "content": "hi"}])
        for headers in ({}, {"authorization": "Bearer wrong-token"},
                        {"authorization": f"Basic {METRICS_TOKEN}"},
                        {"authorization": f"Bearer {TEST_KEY}"}):  # (a virtual key is not it)
            refused = httpx.get(server.url + "/metrics", headers=headers)
            assert refused.status_code == 401, headers
            assert refused.headers["www-authenticate"] == "Bearer"
            assert refused.json()["error"]["code"] == "invalid_metrics_token"
            assert "gpt-mock" not in refused.text and METRICS_TOKEN not in refused.text
        answered = httpx.get(server.url + "/metrics",
                             headers={"authorization": f"bearer {METRICS_TOKEN}"})
        assert answered.status_code == 200
        assert value(parse(answered.text), "sluicegate_requests_total", model="gpt-mock") >= 1
        assert httpx.get(server.url + "/healthz").status_code == 200  # (only the metrics)


@pytest.mark.parametrize("token,fragment", [
    (None, "is not set"), ("", "is not set"), (TEST_KEY, "holds a virtual key")])
def test_a_metrics_token_that_is_missing_or_a_key_refuses_to_start(
        tmp_path: Path, mock_url: str, monkeypatch: pytest.MonkeyPatch, token: str | None,
        fragment: str) -> None:
    if token is None:
        monkeypatch.delenv("SG_METRICS_TOKEN", raising=False)
    else:
        monkeypatch.setenv("SG_METRICS_TOKEN", token)
    text = mock_config(mock_url, extra="settings = Settings(metrics_token_env='SG_METRICS_TOKEN')")
    with pytest.raises(ConfigError) as caught:
        create_app(write_config(tmp_path, text))
    assert fragment in str(caught.value) and TEST_KEY not in str(caught.value)


def test_render_merges_workers_and_escapes_labels() -> None:
    first, second = RequestMetrics(["m"]), RequestMetrics(["m"])
    first.counters["sluicegate_retries_total"][("m",)] = 2
    second.counters["sluicegate_retries_total"][("m",)] = 3
    second.counters["sluicegate_quota_refusals_total"][("m", 'a"b\\c\nd')] = 1
    snapshots = [first.snapshot(), second.snapshot()]
    snapshots[1]["pid"] = 12345
    samples = parse(render(snapshots, {}, multi=True).decode())
    assert value(samples, "sluicegate_retries_total", model="m") == 5
    assert value(samples, "sluicegate_quota_refusals_total") == 1
    text = render(snapshots, {}, multi=True).decode()
    assert 'reason="a\\"b\\\\c\\nd"' in text
    in_flight = [k for k in samples if k[0] == "sluicegate_requests_in_flight"]
    assert {dict(labels)["worker"] for _, labels in in_flight} == {str(first.pid), "12345"}


def test_workers_are_aggregated(tmp_path: Path, mock_url: str) -> None:
    """`serve --workers 2`: whichever worker answers a scrape, the counts are everyone's."""
    config = write_config(tmp_path, mock_config(mock_url, quota_store=SHARED_QUOTA))
    process, url = start_cli_gateway(config, workers=2)
    try:
        with httpx.Client(headers={"authorization": f"Bearer {TEST_KEY}"}) as client:
            for i in range(30):
                answer = client.post(url + "/v1/chat/completions", json={
                    "model": "gpt-mock", "messages": [{"role": "user", "content": f"w{i}"}]})
                assert answer.status_code == 200
        # Workers write their snapshots every second: until each has written one since,
        # a scrape may be a moment behind. Then every scrape (new connections: any worker)
        # has everyone's counts.
        deadline = time.monotonic() + 10
        while True:
            totals: set[float] = set()
            pids: set[str] = set()
            for _ in range(8):
                samples = parse(httpx.get(url + "/metrics").text)
                totals.add(value(samples, "sluicegate_requests_total", model="gpt-mock"))
                pids |= {dict(labels)["worker"] for name, labels in samples
                         if name == "sluicegate_requests_in_flight"}
            if (totals == {30} and len(pids) == 2) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert totals == {30}
        assert len(pids) == 2
    finally:
        stop_process(process)


def test_a_stream_that_ends_while_its_worker_drains_is_counted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker told to stop (a reload's old one) drains its stream, then exits: the final
    snapshot it leaves for the others' scrapes counts that stream."""
    directory = tmp_path / "metrics"
    directory.mkdir()
    monkeypatch.setenv("SLUICEGATE_METRICS_DIR", str(directory))
    with MockProviderServer(MockConfig(chunk_delay_s=0.05, chunk_chars=8)) as slow:
        server = ThreadedServer(create_app(write_config(
            tmp_path, mock_config(f"http://127.0.0.1:{slow.port}", middleware="none"))))
        with server:
            sdk = openai.OpenAI(base_url=server.url + "/v1", api_key=TEST_KEY, max_retries=0)
            stream = sdk.chat.completions.create(
                model="gpt-mock", stream=True,
                messages=[{"role": "user", "content": "drain " * 12}])
            chunks = [next(stream)]
            stopping = threading.Thread(target=server.__exit__, args=(None, None, None))
            stopping.start()  # (its `with` exits again at the end: a second stop is a no-op)
            chunks += list(stream)
            stopping.join()
    assert chunks[-1].choices[0].finish_reason == "stop"
    (path,) = directory.glob("worker-*.json")
    samples = parse(render([orjson.loads(path.read_bytes())], {}, multi=True).decode())
    assert value(samples, "sluicegate_requests_total", model="gpt-mock", status="200") == 1


def test_the_same_metrics_go_out_over_otlp(tmp_path: Path, mock_url: str) -> None:
    from tests.tracing_support import METER_READER

    text = mock_config(mock_url, extra=(
        "from tests.tracing_support import METER_PROVIDER\n"
        "settings = Settings(meter_provider=METER_PROVIDER)"))
    with ThreadedServer(create_app(write_config(tmp_path, text))) as server:
        for i in range(3):
            assert httpx.post(server.url + "/v1/chat/completions",
                              headers={"authorization": f"Bearer {TEST_KEY}"},
                              json={"model": "gpt-mock", "messages": [
                                  {"role": "user", "content": f"otlp {i}"}]}).status_code == 200
        scrape_until(server.url, "sluicegate_requests_total", 3)
        data = METER_READER.get_metrics_data()
    points: dict[str, list[Any]] = {}
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                points.setdefault(metric.name, []).extend(metric.data.data_points)
    requests = [p for p in points["sluicegate_requests_total"]
                if p.attributes.get("model") == "gpt-mock"]
    assert sum(p.value for p in requests) == 3
    assert {p.attributes["status"] for p in requests} == {"200"}
    counts = [p for p in points["sluicegate_request_duration_seconds_count"]
              if p.attributes.get("model") == "gpt-mock"]
    assert sum(p.value for p in counts) == 3
    inf = [p for p in points["sluicegate_request_duration_seconds_bucket"]
           if p.attributes.get("le") == "+Inf" and p.attributes.get("model") == "gpt-mock"]
    assert sum(p.value for p in inf) == 3
    (in_flight,) = points["sluicegate_requests_in_flight"]
    assert in_flight.value == 0 and in_flight.attributes["worker"].isdigit()
    assert "sluicegate_metering_queue_depth" in points


class OTLPReceiver(ThreadingHTTPServer):
    """An OTLP/HTTP collector on 127.0.0.1: keeps each export's protobuf body by path."""

    def __init__(self) -> None:
        self.bodies: dict[str, list[bytes]] = {}
        received = self.bodies

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                received.setdefault(self.path, []).append(body)
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)


def test_metrics_exported_over_otlp_name_the_service_as_the_traces_do(
        tmp_path: Path, mock_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The standard environment's OTLP exporter, to a real receiver: the metrics' resource
    says service.name "sluicegate", as the traces' does (it said "unknown_service")."""
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
        ExportMetricsServiceRequest,
    )
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    receiver = OTLPReceiver()
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT",
                           f"http://127.0.0.1:{receiver.server_address[1]}")
        monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
        monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
        monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
        with ThreadedServer(create_app(write_config(tmp_path, mock_config(mock_url)))) as server:
            assert httpx.post(server.url + "/v1/chat/completions",
                              headers={"authorization": f"Bearer {TEST_KEY}"},
                              json={"model": "gpt-mock", "messages": [
                                  {"role": "user", "content": "exported"}]}).status_code == 200
            scrape_until(server.url, "sluicegate_requests_total", 1)
        # (stopping the server flushes both: the last metrics export, the batched spans)
    finally:
        receiver.shutdown()
        receiver.server_close()
    services: dict[str, set[str]] = {}
    names: set[str] = set()
    for path, message in (("/v1/metrics", ExportMetricsServiceRequest),
                          ("/v1/traces", ExportTraceServiceRequest)):
        for body in receiver.bodies.get(path, []):
            export = message.FromString(body)
            for resource in getattr(export, "resource_metrics", None) or export.resource_spans:
                services.setdefault(path, set()).update(
                    a.value.string_value for a in resource.resource.attributes
                    if a.key == "service.name")
                for scope in getattr(resource, "scope_metrics", ()):
                    names.update(metric.name for metric in scope.metrics)
    assert services == {"/v1/metrics": {"sluicegate"}, "/v1/traces": {"sluicegate"}}
    assert "sluicegate_requests_total" in names
