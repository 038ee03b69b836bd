"""Prometheus metrics: what every request did, and what the layers report at scrape time.

The kernel records each API request once it has ended (`RequestMetrics.record`): a few dict
updates, no I/O, no locks (one event loop per process). `GET /metrics` renders the text
exposition format 0.0.4. Layers add gauges at scrape time through `metric_samples()`, a
method the kernel looks for on every component (e.g. breaker states, the metering queue).

Several workers (`sluicegate serve --workers N`): each worker writes a snapshot of its
registry into `$SLUICEGATE_METRICS_DIR` (set by `serve`) every `SNAPSHOT_INTERVAL_S`, on
each scrape and at its shutdown (after the last request it drained), and the worker
answering a scrape merges every snapshot: counters and histograms are summed over the
workers (those of a worker that has exited still count, so totals never go backwards),
gauges carry a `worker` label and are shown only for live workers. A single process needs no directory.
"""
from __future__ import annotations

import bisect
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson

from gateway.context import RequestContext
from gateway.pricing import CACHE_HITS, EARLIER_ATTEMPT, call_cost_micros
from gateway.tracing import service_resource

__all__ = ["METRICS_DIR_ENV", "RequestMetrics", "Sample", "render", "request_cost_micros"]

METRICS_DIR_ENV = "SLUICEGATE_METRICS_DIR"
SNAPSHOT_INTERVAL_S = 1.0
CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   120.0)
_CACHE_RESULTS = {"hit": "hit", "semantic-hit": "semantic-hit", "miss": "miss",
                  "bypass": "bypass"}

_STATUS = {code: str(code) for code in (200, 400, 401, 403, 404, 429, 500, 502, 503, 504)}
# A gauge sample from a layer: (name, help, labels, value).
Sample = tuple[str, str, dict[str, str], float]

_HELP = {
    "sluicegate_requests_total": ("counter", ("API requests answered, by model, provider, "
                                              "status and operation.")),
    "sluicegate_tokens_total": ("counter", "Tokens billed, by model, provider and direction."),
    "sluicegate_cost_usd_total": ("counter", "Spend in USD at the served deployment's price."),
    "sluicegate_cost_saved_usd_total": ("counter", "USD that cache hits saved."),
    "sluicegate_cache_requests_total": ("counter", "Cache outcomes of API requests."),
    "sluicegate_retries_total": ("counter", "Upstream calls beyond the first, per request."),
    "sluicegate_fallbacks_total": ("counter", "Requests answered by a fallback model."),
    "sluicegate_quota_refusals_total": ("counter", "Requests the quota layer refused."),
    "sluicegate_client_disconnects_total": ("counter", "Requests whose client went away."),
    "sluicegate_request_duration_seconds": ("histogram",
                                            "Time from the request being read to its end."),
    "sluicegate_ttft_seconds": ("histogram", "Time to the first byte from the provider."),
    "sluicegate_requests_in_flight": ("gauge", "API requests being served."),
}


class RequestMetrics:
    """This process's registry (see the module docstring)."""

    def __init__(self, models: Iterable[str], *, directory: str | None = None) -> None:
        self._model_keys = {model: (model,) for model in models}
        self.counters: dict[str, dict[tuple[str, ...], float]] = {
            name: {} for name, (kind, _) in _HELP.items() if kind == "counter"}
        self.histograms: dict[str, dict[tuple[str, ...], list[float]]] = {
            "sluicegate_request_duration_seconds": {}, "sluicegate_ttft_seconds": {}}
        self.in_flight = 0
        self.directory = Path(directory) if directory else None
        self.pid = os.getpid()
        self._requests = self.counters["sluicegate_requests_total"]
        self._tokens = self.counters["sluicegate_tokens_total"]
        self._cost = self.counters["sluicegate_cost_usd_total"]
        self._duration = self.histograms["sluicegate_request_duration_seconds"]
        self._ttft = self.histograms["sluicegate_ttft_seconds"]

    # -- recording -------------------------------------------------------------------------

    def record(self, ctx: RequestContext, ended_monotonic: float) -> None:
        """Counts one ended API request (the kernel calls this)."""
        model = ctx.model
        model_key = self._model_keys.get(model)
        if model_key is None:  # an unknown name: one label value for all (bounded series)
            model, model_key = "other", ("other",)
        cache = ctx.cache_status
        hit = cache == "hit" or cache == "semantic-hit"
        provider = "cache" if hit else ctx.provider or ""  # who answered ("": nobody)
        status = ctx.status
        key = (model, provider, _STATUS.get(status) or str(status), ctx.operation)
        requests = self._requests
        requests[key] = requests.get(key, 0) + 1
        usage = ctx.usage
        if usage is not None and not hit:
            tokens = self._tokens
            key_in, key_out = (model, provider, "input"), (model, provider, "output")
            tokens[key_in] = tokens.get(key_in, 0) + usage.input_tokens
            tokens[key_out] = tokens.get(key_out, 0) + usage.output_tokens
        cost_micros = request_cost_micros(ctx) if usage is not None and not hit else 0
        if cost_micros:
            cost_key = (model, provider)
            self._cost[cost_key] = self._cost.get(cost_key, 0) + cost_micros / 1_000_000
        _observe(self._duration, model_key, ended_monotonic - ctx.started_monotonic)
        if ctx.first_byte_s is not None and not hit:
            _observe(self._ttft, model_key, ctx.first_byte_s)
        if cache is not None:
            self._count("sluicegate_cache_requests_total", (model, _CACHE_RESULTS.get(
                cache, cache)))
            saved = ctx.state.get("cache.saved_micros") if hit else None
            if saved:
                self._count("sluicegate_cost_saved_usd_total", model_key, saved / 1_000_000)
        if len(ctx.attempts) > 1:
            self._count("sluicegate_retries_total", model_key, len(ctx.attempts) - 1)
        if ctx.client_disconnected:
            self._count("sluicegate_client_disconnects_total", model_key)
        state = ctx.state
        if state:
            if state.get("failover.fallbacks"):
                self._count("sluicegate_fallbacks_total", model_key)
            refusal = state.get("quota.refused")
            if refusal:
                self._count("sluicegate_quota_refusals_total", (model, str(refusal)))

    def refused(self, status: int, operation: str) -> None:
        """Counts an API request the kernel refused before any layer saw it (a 405, 408, 413,
        415, or a 400 for its body): model "other", answered by nobody."""
        key = ("other", "", _STATUS.get(status) or str(status), operation)
        self._requests[key] = self._requests.get(key, 0) + 1

    def _count(self, name: str, key: tuple[str, ...], amount: float = 1) -> None:
        values = self.counters[name]
        values[key] = values.get(key, 0) + amount

    # -- exposition ------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "counters": {name: [[*key, value] for key, value in values.items()]
                         for name, values in self.counters.items()},
            "histograms": {name: [[*key, *counts] for key, counts in values.items()]
                           for name, values in self.histograms.items()},
            "gauges": [["sluicegate_requests_in_flight", {}, self.in_flight]],
        }

    def write_snapshot(self, extra_gauges: Sequence[Sample] = ()) -> None:
        """Writes this worker's snapshot for the others' scrapes (multi-worker only)."""
        if self.directory is None:
            return
        snapshot = self.snapshot()
        snapshot["gauges"].extend([name, labels, value] for name, _, labels, value in extra_gauges)
        path = self.directory / f"worker-{self.pid}.json"
        temporary = path.with_suffix(".tmp")
        temporary.write_bytes(orjson.dumps(snapshot))
        os.replace(temporary, path)  # readers see the old or the new file, never half

    def exposition(self, gauges: list[Sample]) -> bytes:
        """The text format of every worker's metrics (this one's fresh), gauges included."""
        helps = {name: help_ for name, help_, _, _ in gauges}
        if self.directory is None:
            snapshots = [self.snapshot()]
            snapshots[0]["gauges"].extend([n, labels, v] for n, _, labels, v in gauges)
        else:
            self.write_snapshot(gauges)
            snapshots = list(_read_snapshots(self.directory))
        return render(snapshots, helps, multi=self.directory is not None)


def request_cost_micros(ctx: RequestContext) -> int:
    """What a request cost at its served deployment's price (a cache hit, a free
    deployment: nothing)."""
    if ctx.usage is None or ctx.cache_status in CACHE_HITS:
        return 0
    price = getattr(ctx.served_deployment, "price", None)
    if price is not None and not price.input_per_mtok and not price.output_per_mtok \
            and EARLIER_ATTEMPT not in ctx.state:  # (a broken attempt elsewhere may cost)
        return 0
    return call_cost_micros(ctx, ctx.usage)


def _observe(values: dict[tuple[str, ...], list[float]], key: tuple[str, ...],
             seconds: float) -> None:
    counts = values.get(key)
    if counts is None:
        counts = values[key] = [0.0] * (len(LATENCY_BUCKETS) + 3)
    counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1  # the last bucket is +Inf
    counts[-2] += seconds
    counts[-1] += 1


def _read_snapshots(directory: Path) -> Iterator[dict[str, Any]]:
    for path in sorted(directory.glob("worker-*.json")):
        try:
            snapshot = orjson.loads(path.read_bytes())
        except (OSError, orjson.JSONDecodeError):
            continue  # being replaced right now, or gone: the next scrape sees it
        if not _alive(int(snapshot.get("pid", 0))):
            snapshot["gauges"] = []  # a gone worker's counters stay; its gauges do not
        yield snapshot


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_LABELS = {
    "sluicegate_requests_total": ("model", "provider", "status", "operation"),
    "sluicegate_tokens_total": ("model", "provider", "direction"),
    "sluicegate_cost_usd_total": ("model", "provider"),
    "sluicegate_cost_saved_usd_total": ("model",),
    "sluicegate_cache_requests_total": ("model", "result"),
    "sluicegate_retries_total": ("model",),
    "sluicegate_fallbacks_total": ("model",),
    "sluicegate_quota_refusals_total": ("model", "reason"),
    "sluicegate_client_disconnects_total": ("model",),
    "sluicegate_request_duration_seconds": ("model",),
    "sluicegate_ttft_seconds": ("model",),
}


def render(snapshots: list[dict[str, Any]], gauge_help: dict[str, str], *,
           multi: bool) -> bytes:
    """Merges snapshots (sums counters and histograms; gauges per worker when `multi`)."""
    lines: list[str] = []
    for name, labels in _LABELS.items():
        kind, help_ = _HELP[name]
        lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
        if kind == "counter":
            merged: dict[tuple[str, ...], float] = {}
            for snapshot in snapshots:
                for *key, value in snapshot["counters"].get(name, ()):
                    merged[tuple(key)] = merged.get(tuple(key), 0) + value
            lines += [f"{name}{_labels(labels, key)} {_number(value)}"
                      for key, value in sorted(merged.items())]
        else:
            lines += _histogram_lines(name, labels, snapshots)
    gauges: dict[str, list[str]] = {}
    for snapshot in snapshots:
        for name, sample_labels, value in snapshot["gauges"]:
            if multi:
                sample_labels = {**sample_labels, "worker": str(snapshot["pid"])}
            gauges.setdefault(name, []).append(
                f"{name}{_labels(tuple(sample_labels), tuple(sample_labels.values()))} "
                f"{_number(value)}")
    for name, samples in sorted(gauges.items()):
        help_ = _HELP.get(name, ("gauge", gauge_help.get(name, name)))[1]
        lines += [f"# HELP {name} {help_}", f"# TYPE {name} gauge", *samples]
    return ("\n".join(lines) + "\n").encode()


def _histogram_lines(name: str, labels: tuple[str, ...],
                     snapshots: list[dict[str, Any]]) -> list[str]:
    width = len(labels)
    merged: dict[tuple[str, ...], list[float]] = {}
    for snapshot in snapshots:
        for row in snapshot["histograms"].get(name, ()):
            key, counts = tuple(row[:width]), row[width:]
            total = merged.setdefault(key, [0.0] * len(counts))
            for index, count in enumerate(counts):
                total[index] += count
    lines = []
    for key, counts in sorted(merged.items()):
        running = 0.0
        bounds = [repr(float(bound)) for bound in LATENCY_BUCKETS] + ["+Inf"]
        for le, count in zip(bounds, counts[:-2], strict=True):
            running += count
            lines.append(f"{name}_bucket{_labels((*labels, 'le'), (*key, le))} "
                         f"{_number(running)}")
        lines.append(f"{name}_sum{_labels(labels, key)} {_number(counts[-2])}")
        lines.append(f"{name}_count{_labels(labels, key)} {_number(counts[-1])}")
    return lines


def _labels(names: tuple[str, ...], values: tuple[Any, ...]) -> str:
    if not names:
        return ""
    pairs = ",".join(f'{name}="{_escape(str(value))}"' for name, value in zip(names, values,
                                                                             strict=True))
    return "{" + pairs + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if value == int(value) and abs(value) < 2 ** 53:
        return str(int(value))
    return repr(float(value))


# -- OTLP --------------------------------------------------------------------------------------

def otlp_exporter_wanted() -> bool:
    """Whether the standard environment asks for metrics over OTLP."""
    exporter = os.environ.get("OTEL_METRICS_EXPORTER", "").strip().lower()
    if exporter == "none" or os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    return exporter == "otlp" or bool(os.environ.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")
                                      or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def register_otlp(metrics: RequestMetrics, gauges: Any, meter_provider: Any) -> None:
    """The same numbers as /metrics, as OpenTelemetry observable instruments on
    `meter_provider` (read when its reader collects): counters as monotonic sums, each
    histogram as `<name>_bucket` (cumulative, with `le`), `_sum` and `_count`, and the layers'
    gauges. This process's numbers only: each worker exports its own, with its pid as
    `worker`, and the collector adds them up."""
    from opentelemetry.metrics import CallbackOptions, Observation

    meter = meter_provider.get_meter("sluicegate")
    worker = {"worker": str(os.getpid())}

    def counter(name: str) -> Any:
        def observe(_: CallbackOptions) -> Iterator[Observation]:
            labels = _LABELS[name]
            for key, value in list(metrics.counters[name].items()):
                yield Observation(value, {**dict(zip(labels, key, strict=True)), **worker})
        return observe

    def histogram(name: str, part: str) -> Any:
        def observe(_: CallbackOptions) -> Iterator[Observation]:
            labels = _LABELS[name]
            for key, counts in list(metrics.histograms[name].items()):
                attributes = {**dict(zip(labels, key, strict=True)), **worker}
                if part == "sum":
                    yield Observation(counts[-2], attributes)
                elif part == "count":
                    yield Observation(counts[-1], attributes)
                else:
                    running = 0.0
                    bounds = [repr(float(b)) for b in LATENCY_BUCKETS] + ["+Inf"]
                    for le, count in zip(bounds, counts[:-2], strict=True):
                        running += count
                        yield Observation(running, {**attributes, "le": le})
        return observe

    def gauge(name: str) -> Any:
        def observe(_: CallbackOptions) -> Iterator[Observation]:
            samples = [("sluicegate_requests_in_flight", "", {}, float(metrics.in_flight)),
                       *gauges()]
            for sample_name, _help, labels, value in samples:
                if sample_name == name:
                    yield Observation(value, {**labels, **worker})
        return observe

    for name in metrics.counters:
        meter.create_observable_counter(name, callbacks=[counter(name)],
                                        description=_HELP[name][1])
    for name in metrics.histograms:
        for part in ("bucket", "sum", "count"):
            meter.create_observable_counter(f"{name}_{part}", callbacks=[histogram(name, part)],
                                            description=_HELP[name][1])
    gauge_names = {"sluicegate_requests_in_flight", *(sample[0] for sample in gauges())}
    for name in sorted(gauge_names):
        meter.create_observable_gauge(name, callbacks=[gauge(name)])


def otlp_meter_provider() -> Any:
    """A MeterProvider exporting over OTLP (endpoint, headers, interval from OTEL_*), its
    resource the one the traces carry (service.name "sluicegate" unless OTEL_* names one)."""
    exporter, provider, reader = _otlp_metric_classes()
    return provider(metric_readers=[reader(exporter())], resource=service_resource())


def check_otlp_metrics(metrics_path: str | None, meter_provider: Any) -> None:
    """Refuses, as the gateway would when it starts, OTEL_* asking for metrics over OTLP
    without the packages for it (without making the provider: no exporter thread)."""
    if metrics_path is not None and meter_provider is None and otlp_exporter_wanted():
        _otlp_metric_classes()


def _otlp_metric_classes() -> tuple[Any, Any, Any]:
    from gateway.config import ConfigError

    try:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    except ImportError:
        raise ConfigError("OTEL_* asks for metrics over OTLP, but opentelemetry-sdk and "
                          "opentelemetry-exporter-otlp-proto-http are not installed (pip "
                          "install 'sluicegate[otel]').") from None
    return OTLPMetricExporter, MeterProvider, PeriodicExportingMetricReader
