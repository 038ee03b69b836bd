"""Bench target: exact cache hits (every request after the first is a hit), from memory, or
from Redis when $SLUICEGATE_BENCH_CACHE is a redis:// URL.

`policy="always"`: the bench request has no temperature, and the point is the hit path.
`server_timing`: every response says how long the gateway took (the hit's server-side time).
"""
import os

from gateway.config import Deployment, Middleware, Model, Price, Settings
from middleware.auth import AuthMiddleware, StaticKey
from middleware.cache import CacheMiddleware
from providers import Provider

# The bench's load tools send this key (tests/bench/bench_load.py).
os.environ.setdefault("SLUICEGATE_API_KEY", "sk-sg-bench-not-a-secret-0123456789")
upstream = os.environ.get("SLUICEGATE_BENCH_UPSTREAM", "http://127.0.0.1:18080/json/v1")
providers = {"mock": Provider("openai", base_url=upstream, max_connections=1024)}
# Priced as in real use (the same price in every bench config): the kernel prices each
# response for /metrics, so a free model here would leave that work out of every ratio.
models = {"bench": Model([Deployment("mock", "bench",
                                     price=Price(input_per_mtok="0.15", output_per_mtok="0.60"))])}
middleware = [
    Middleware(AuthMiddleware, keys=[StaticKey("bench", key_env="SLUICEGATE_API_KEY")]),
    Middleware(CacheMiddleware, store=os.environ.get("SLUICEGATE_BENCH_CACHE", "memory"),
               policy="always"),
]
settings = Settings(server_timing=True)
