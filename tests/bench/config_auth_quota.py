"""Bench target: auth and quota on Redis alone over the bare passthrough (issue 3's ratio).

Every request is authenticated (a static virtual key) and admitted against a key RPM, a key
TPM and a project budget in Redis: one EVALSHA before the upstream call, one after it. Beside
the bare passthrough on the same load this is what auth + quota cost; the `redis` target
measures the same layers inside the whole default stack.
"""
import os

from gateway.config import Deployment, Middleware, Model, Price
from gateway.policy import Budget, Limits
from middleware.auth import AuthMiddleware, StaticKey
from middleware.quota import QuotaMiddleware, RedisQuotaStore
from providers import Provider

# The bench's load tools send `Authorization: Bearer sk-sg-bench-not-a-secret-0123456789`.
os.environ.setdefault("SLUICEGATE_API_KEY", "sk-sg-bench-not-a-secret-0123456789")
upstream = os.environ.get("SLUICEGATE_BENCH_UPSTREAM", "http://127.0.0.1:18080/json/v1")
redis_url = os.environ.get("SLUICEGATE_BENCH_REDIS", "redis://127.0.0.1:6379/0")

providers = {"mock": Provider("openai", base_url=upstream, max_connections=1024)}
# A real price, so every request reserves and settles money against the budget.
models = {"bench": Model([Deployment("mock", "bench",
                                     price=Price(input_per_mtok="0.15", output_per_mtok="0.60"))])}
# Limits high enough never to refuse during a run, so every request does the full work.
key_limits = Limits(rpm=100_000_000, tpm=10_000_000_000)
project_budget = Limits(budgets=(Budget("1000000", period="monthly"),))
middleware = [
    Middleware(AuthMiddleware, keys=[StaticKey("bench", key_env="SLUICEGATE_API_KEY",
                                               limits=key_limits)],
               limits={("project", "bench"): project_budget}),
    Middleware(QuotaMiddleware, store=RedisQuotaStore(redis_url, prefix="{sluicegate-bench}")),
]
