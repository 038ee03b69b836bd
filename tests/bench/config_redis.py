"""Bench target: the default stack with auth and quota on Redis (limits that always admit).

Every request is authenticated (a static virtual key) and admitted against a key RPM, a key
TPM and a project budget in Redis: one EVALSHA before the upstream call, one after it.
With SLUICEGATE_BENCH_ONLY_AUTH_QUOTA=1 the two layers run alone over the bare passthrough
(the `auth-quota` target: what auth + quota cost, the ratio the quota issue names);
SLUICEGATE_BENCH_QUOTA_STORE=memory puts the quota state in process instead (the
`auth-quota-memory` target: the embedded default, no Redis).
"""
import os

from gateway.config import Deployment, Middleware, Model, Price
from gateway.policy import Budget, Limits
from middleware.auth import AuthMiddleware, StaticKey
from middleware.cache import CacheMiddleware
from middleware.failover import FailoverMiddleware
from middleware.metering import MeteringMiddleware
from middleware.quota import QuotaMiddleware, RedisQuotaStore
from providers import Provider

# The bench's load tools send `Authorization: Bearer sk-sg-bench-not-a-secret-0123456789` (tests/bench/bench_load.py).
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
_store = os.environ.get("SLUICEGATE_BENCH_QUOTA_STORE", "redis")
auth = Middleware(AuthMiddleware, keys=[StaticKey("bench", key_env="SLUICEGATE_API_KEY",
                                                  limits=key_limits)],
                  limits={("project", "bench"): project_budget})
quota = Middleware(QuotaMiddleware, store=RedisQuotaStore(redis_url, prefix="{sluicegate-bench}")
                   if _store == "redis" else "memory")
if os.environ.get("SLUICEGATE_BENCH_ONLY_AUTH_QUOTA") == "1":
    middleware = [auth, quota]
else:
    middleware = [auth, Middleware(MeteringMiddleware), quota, Middleware(CacheMiddleware),
                  Middleware(FailoverMiddleware)]
