"""Bench target: the default stack (every built-in layer, in the default order)."""
import os

from gateway.config import Deployment, Middleware, Model
from middleware.auth import AuthMiddleware
from middleware.cache import CacheMiddleware
from middleware.failover import FailoverMiddleware
from middleware.metering import MeteringMiddleware
from middleware.quota import QuotaMiddleware
from providers import Provider

upstream = os.environ.get("SLUICEGATE_BENCH_UPSTREAM", "http://127.0.0.1:18080/json/v1")
providers = {"mock": Provider("openai", base_url=upstream, max_connections=1024)}
models = {"bench": Model([Deployment("mock", "bench")])}
middleware = [
    Middleware(AuthMiddleware),
    Middleware(MeteringMiddleware),
    Middleware(QuotaMiddleware),
    Middleware(CacheMiddleware),
    Middleware(FailoverMiddleware),
]
