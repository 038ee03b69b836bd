"""Bench target: the cache layer alone, on its miss path (the load asks a new prompt each time).

Every request is looked up, missed, sent upstream, teed, and stored in memory after its last
byte went out (`policy="always"`): what the cache layer costs a request it cannot answer.
Compare with the bare passthrough on the same scenario (json-c16-unique; sse-c16-unique for
streams, each stored as the answer it amounts to).
"""
import os

from gateway.config import Deployment, Middleware, Model, Price
from middleware.cache import CacheMiddleware
from providers import Provider

upstream = os.environ.get("SLUICEGATE_BENCH_UPSTREAM", "http://127.0.0.1:18080/json/v1")
providers = {"mock": Provider("openai", base_url=upstream, max_connections=1024)}
# Priced as in real use (the same price in every bench config): the kernel prices each
# response for /metrics, so a free model here would leave that work out of every ratio.
models = {"bench": Model([Deployment("mock", "bench",
                                     price=Price(input_per_mtok="0.15", output_per_mtok="0.60"))])}
middleware = [
    Middleware(CacheMiddleware, store=os.environ.get("SLUICEGATE_BENCH_CACHE", "memory"),
               policy="always"),
]
