"""Sluicegate's embedded default config: runs with no Redis, no PostgreSQL and no provider keys.

It serves a clearly labelled `demo` model through the local OpenAI mock (`make run` starts
it on 127.0.0.1:18080), and adds real providers whenever their API keys are in the
environment. Copy this file to start your own; every line is yours to change.
"""
import os

from gateway.config import Deployment, Middleware, Model, Settings
from middleware.auth import AuthMiddleware, PostgresKeyStore, StaticKey
from middleware.cache import CacheMiddleware
from middleware.failover import FailoverMiddleware
from middleware.metering import MeteringMiddleware, PostgresUsageStore
from middleware.quota import PostgresSpendLedger, QuotaMiddleware
from providers import Provider

settings = Settings(demo=True)

# The demo upstream is the mock provider from tests/mock_providers; its key is not a secret.
os.environ.setdefault("SLUICEGATE_DEMO_KEY", "demo-key-not-a-secret")
demo_upstream = os.environ.get("SLUICEGATE_DEMO_UPSTREAM", "http://127.0.0.1:18080")

providers = {
    "demo-mock": Provider("openai", base_url=f"{demo_upstream}/openai/v1",
                          api_key_env="SLUICEGATE_DEMO_KEY"),
}
models = {
    # free=True: the mock is no real model, so there is nothing to bill.
    "demo": Model([Deployment("demo-mock", "mock-gpt", free=True)], owned_by="sluicegate-demo",
                  description="DEMO: answered by the local mock provider, not a real model"),
}

# Real providers join when their keys are set. Their models are priced by id from the shipped
# price table (gateway/prices.json), so each id below must be one the table knows.
if os.environ.get("OPENAI_API_KEY"):
    providers["openai"] = Provider("openai", api_key_env="OPENAI_API_KEY")
    models["gpt-6-luna"] = [Deployment("openai", "gpt-6-luna")]
    models["text-embedding-3-small"] = [Deployment("openai", "text-embedding-3-small")]
if os.environ.get("ANTHROPIC_API_KEY"):
    providers["anthropic"] = Provider("anthropic", api_key_env="ANTHROPIC_API_KEY")
    models["claude-haiku"] = [Deployment("anthropic", "claude-haiku-5-5")]
if os.environ.get("GEMINI_API_KEY"):
    providers["gemini"] = Provider("gemini", api_key_env="GEMINI_API_KEY")
    models["gemini-flash"] = [Deployment("gemini", "gemini-3.8-flash")]

# Virtual keys. Embedded: one key, its plaintext in $SLUICEGATE_API_KEY (only its hash is
# kept). With $SLUICEGATE_DATABASE_URL, keys live in PostgreSQL and are managed with the admin
# API / `sluicegate keys` (admin token in $SLUICEGATE_ADMIN_TOKEN). The public demo key is
# set only while the mock is the only provider: once a real provider is configured, a
# forgotten $SLUICEGATE_API_KEY (and no database) refuses to start instead of opening the
# gateway to a key printed in this file.
if len(providers) == 1:
    os.environ.setdefault("SLUICEGATE_API_KEY", "sk-sg-demo-offline-only-not-a-secret")
database_url = os.environ.get("SLUICEGATE_DATABASE_URL")
admin_token_env = "SLUICEGATE_ADMIN_TOKEN" if os.environ.get("SLUICEGATE_ADMIN_TOKEN") else None
static_keys = ([StaticKey("demo", key_env="SLUICEGATE_API_KEY")]
               if os.environ.get("SLUICEGATE_API_KEY") else [])
auth = Middleware(AuthMiddleware, keys=static_keys,
                  store=PostgresKeyStore(database_url) if database_url else None,
                  admin_token_env=admin_token_env)

# Rate limits and budgets: in process, or shared by every gateway through $SLUICEGATE_REDIS_URL
# (with the spend ledger in PostgreSQL, so a Redis flush never resets a budget). Limits are
# set per key, project and customer with the admin API; gateway-wide ones go in `limits=`.
# In process, they hold in one process only: `serve --workers 2` (the image's and the unit's
# command) refuses to start without $SLUICEGATE_REDIS_URL, as each worker would hold them alone.
redis_url = os.environ.get("SLUICEGATE_REDIS_URL")
quota = Middleware(QuotaMiddleware, store=redis_url or "memory",
                   ledger=PostgresSpendLedger(database_url) if database_url else None,
                   admin_token_env=admin_token_env)

# Usage: one record per request, through a local journal (./sluicegate-journal or
# $SLUICEGATE_JOURNAL_DIR) into PostgreSQL when $SLUICEGATE_DATABASE_URL is set.
metering = Middleware(MeteringMiddleware,
                      store=PostgresUsageStore(database_url) if database_url else None,
                      admin_token_env=admin_token_env)

# Top = outermost; the kernel is always there. Reorder or delete lines freely, except that
# quota and cache stay below auth: they act per caller, and above it they would act before
# the key is checked, so the gateway refuses to start with either above auth.
middleware = [
    auth,
    metering,
    quota,
    Middleware(CacheMiddleware),
    Middleware(FailoverMiddleware),
]
