"""Bench target: the bare passthrough (kernel + passthrough, no layers)."""
import os

from gateway.config import Deployment, Model
from providers import Provider

upstream = os.environ.get("SLUICEGATE_BENCH_UPSTREAM", "http://127.0.0.1:18080/json/v1")
providers = {"mock": Provider("openai", base_url=upstream, max_connections=1024)}
# free=True: the bench upstream is a mock, so there is nothing to bill.
models = {"bench": Model([Deployment("mock", "bench", free=True)])}
middleware: list = []
