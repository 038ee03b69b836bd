"""Bench target: the metering layer alone, recording every request into its journal (no
PostgreSQL: the journal is the ledger), against the bare passthrough."""
import os
import tempfile

from gateway.config import Deployment, Middleware, Model
from middleware.metering import MeteringMiddleware
from providers import Provider

upstream = os.environ.get("SLUICEGATE_BENCH_UPSTREAM", "http://127.0.0.1:18080/json/v1")
providers = {"mock": Provider("openai", base_url=upstream, max_connections=1024)}
models = {"bench": Model([Deployment("mock", "bench", free=True)])}  # a mock: nothing to bill
journal = os.environ.get("SLUICEGATE_BENCH_JOURNAL") or tempfile.mkdtemp(prefix="sg-bench-journal-")
middleware = [Middleware(MeteringMiddleware, journal_dir=journal)]
