"""Bench target: the whole production stack, as issue 7 defines it: auth and quota on Redis,
metering into PostgreSQL (through its journal), the exact cache on Redis missing every time
(run with the unique-prompt scenario, or every request is a hit), the failover layer, tracing
off. PostgreSQL is the machine's (SLUICEGATE_BENCH_PG), Redis the bench's own."""
import os

from gateway.config import Deployment, Middleware, Model, Price
from gateway.policy import Budget, Limits
from middleware.auth import AuthMiddleware, StaticKey
from middleware.cache import CacheMiddleware
from middleware.failover import FailoverMiddleware
from middleware.metering import MeteringMiddleware, PostgresUsageStore
from middleware.quota import QuotaMiddleware, RedisQuotaStore
from providers import Provider

os.environ.setdefault("SLUICEGATE_API_KEY", "sk-sg-bench-not-a-secret-0123456789")
upstream = os.environ.get("SLUICEGATE_BENCH_UPSTREAM", "http://127.0.0.1:18080/json/v1")
redis_url = os.environ.get("SLUICEGATE_BENCH_REDIS", "redis://127.0.0.1:6379/0")
database_url = os.environ.get("SLUICEGATE_BENCH_PG", "host=127.0.0.1 port=5432 user=root dbname=test")

providers = {"mock": Provider("openai", base_url=upstream, max_connections=1024)}
models = {"bench": Model([Deployment("mock", "bench",
                                     price=Price(input_per_mtok="0.15", output_per_mtok="0.60"))])}
key_limits = Limits(rpm=100_000_000, tpm=10_000_000_000)
project_budget = Limits(budgets=(Budget("1000000", period="monthly"),))
middleware = [
    Middleware(AuthMiddleware, keys=[StaticKey("bench", key_env="SLUICEGATE_API_KEY",
                                               limits=key_limits)],
               limits={("project", "bench"): project_budget}),
    Middleware(MeteringMiddleware,
               store=PostgresUsageStore(database_url, prefix="sluicegate_bench")),
    Middleware(QuotaMiddleware, store=RedisQuotaStore(redis_url, prefix="{sluicegate-bench}")),
    Middleware(CacheMiddleware, store=redis_url, policy="always"),
    Middleware(FailoverMiddleware),
]
