"""Bench target: the default stack (every built-in layer, in the default order)."""
import os

from gateway.config import Deployment, Middleware, Model, Price
from middleware.auth import AuthMiddleware, StaticKey
from middleware.cache import CacheMiddleware
from middleware.failover import FailoverMiddleware
from middleware.metering import MeteringMiddleware
from middleware.quota import QuotaMiddleware
from providers import Provider

# The bench's load tools send `Authorization: Bearer sk-sg-bench-not-a-secret-0123456789` (tests/bench/bench_load.py).
os.environ.setdefault("SLUICEGATE_API_KEY", "sk-sg-bench-not-a-secret-0123456789")
upstream = os.environ.get("SLUICEGATE_BENCH_UPSTREAM", "http://127.0.0.1:18080/json/v1")
providers = {"mock": Provider("openai", base_url=upstream, max_connections=1024)}
# Priced as in real use (the same price in every bench config): the kernel prices each
# response for /metrics, so a free model here would leave that work out of every ratio.
models = {"bench": Model([Deployment("mock", "bench",
                                     price=Price(input_per_mtok="0.15", output_per_mtok="0.60"))])}
middleware = [
    # Virtual keys: one declared here (its plaintext in $SLUICEGATE_API_KEY; only the hash is
    # kept), or store=PostgresKeyStore(dsn) for keys made with the admin API.
    Middleware(AuthMiddleware, keys=[StaticKey("my-team", key_env="SLUICEGATE_API_KEY")]),
    Middleware(MeteringMiddleware),
    Middleware(QuotaMiddleware),
    Middleware(CacheMiddleware),
    Middleware(FailoverMiddleware),
]
