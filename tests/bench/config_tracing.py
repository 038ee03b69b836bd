"""Bench target: the bare passthrough with OpenTelemetry tracing on (a SERVER span and a
CLIENT child span per request, GenAI attributes, traceparent sent upstream), through the
SDK's batch processor into an exporter that drops the spans: what tracing costs the
gateway, without a collector's cost. Tracing off is the `bare` target (the default)."""
import os
from collections.abc import Sequence

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from gateway.config import Deployment, Model, Price, Settings
from providers import Provider


class DroppingExporter(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


upstream = os.environ.get("SLUICEGATE_BENCH_UPSTREAM", "http://127.0.0.1:18080/json/v1")
providers = {"mock": Provider("openai", base_url=upstream, max_connections=1024)}
# Priced as in real use (the same price in every bench config): the kernel prices each
# response for /metrics, so a free model here would leave that work out of every ratio.
models = {"bench": Model([Deployment("mock", "bench",
                                     price=Price(input_per_mtok="0.15", output_per_mtok="0.60"))])}
middleware: list = []
tracer_provider = TracerProvider()
tracer_provider.add_span_processor(BatchSpanProcessor(DroppingExporter()))
settings = Settings(tracer_provider=tracer_provider)
