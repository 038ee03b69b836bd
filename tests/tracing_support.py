"""One in-memory OpenTelemetry pipeline for the tests' gateways (config modules import it, so
the test and the gateway share the same exporter object)."""
from __future__ import annotations

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

EXPORTER = InMemorySpanExporter()
PROVIDER = TracerProvider()
PROVIDER.add_span_processor(SimpleSpanProcessor(EXPORTER))

# Metrics: an in-memory reader the tests collect from when they want.
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

METER_READER = InMemoryMetricReader()
METER_PROVIDER = MeterProvider(metric_readers=[METER_READER])
