"""Bench target: the bare passthrough (kernel + passthrough, no layers)."""
import os

from gateway.config import Deployment, Model
from providers import Provider

upstream = os.environ.get("SLUICEGATE_BENCH_UPSTREAM", "http://127.0.0.1:18080/json/v1")
providers = {"mock": Provider("openai", base_url=upstream, max_connections=1024)}
models = {"bench": Model([Deployment("mock", "bench")])}
middleware: list = []
