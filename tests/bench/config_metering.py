"""Bench target: the metering layer alone, recording every request into its journal (no
PostgreSQL: the journal is the ledger), against the bare passthrough."""
import os
import tempfile

from gateway.config import Deployment, Middleware, Model, Price
from middleware.metering import MeteringMiddleware
from providers import Provider

upstream = os.environ.get("SLUICEGATE_BENCH_UPSTREAM", "http://127.0.0.1:18080/json/v1")
providers = {"mock": Provider("openai", base_url=upstream, max_connections=1024)}
# Priced as in real use (the same price in every bench config): the kernel prices each
# response for /metrics, so a free model here would leave that work out of every ratio.
models = {"bench": Model([Deployment("mock", "bench",
                                     price=Price(input_per_mtok="0.15", output_per_mtok="0.60"))])}
journal = os.environ.get("SLUICEGATE_BENCH_JOURNAL") or tempfile.mkdtemp(prefix="sg-bench-journal-")
# The writer's batch interval; 0.2 s is the layer's default. `make bench-instructions` runs this
# target at 1/50 of full speed and stretches it, so a batch holds as many records as at full
# speed (see tests/bench/run_instructions.py).
flush_interval_s = float(os.environ.get("SLUICEGATE_BENCH_FLUSH_S", "0.2"))
middleware = [Middleware(MeteringMiddleware, journal_dir=journal,
                         flush_interval_s=flush_interval_s)]
