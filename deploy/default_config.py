"""Sluicegate's embedded default config: runs with no Redis, no PostgreSQL and no provider keys.

It serves a clearly labelled `demo` model through the local OpenAI mock (`make run` starts
it on 127.0.0.1:18080), and adds real providers whenever their API keys are in the
environment. Copy this file to start your own; every line is yours to change.
"""
import os

from gateway.config import Deployment, Middleware, Model, Settings
from middleware.auth import AuthMiddleware
from middleware.cache import CacheMiddleware
from middleware.failover import FailoverMiddleware
from middleware.metering import MeteringMiddleware
from middleware.quota import QuotaMiddleware
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
    "demo": Model([Deployment("demo-mock", "mock-gpt")], owned_by="sluicegate-demo",
                  description="DEMO: answered by the local mock provider, not a real model"),
}

# Real providers join when their keys are set.
if os.environ.get("OPENAI_API_KEY"):
    providers["openai"] = Provider("openai", api_key_env="OPENAI_API_KEY")
    models["gpt-4o-mini"] = [Deployment("openai", "gpt-4o-mini")]
    models["text-embedding-3-small"] = [Deployment("openai", "text-embedding-3-small")]
if os.environ.get("ANTHROPIC_API_KEY"):
    providers["anthropic"] = Provider("anthropic", api_key_env="ANTHROPIC_API_KEY")
    models["claude-haiku"] = [Deployment("anthropic", "claude-3-5-haiku-latest")]
if os.environ.get("GEMINI_API_KEY"):
    providers["gemini"] = Provider("gemini", api_key_env="GEMINI_API_KEY")
    models["gemini-flash"] = [Deployment("gemini", "gemini-2.0-flash")]

# Top = outermost. Reorder or delete lines freely; the kernel is always there.
middleware = [
    Middleware(AuthMiddleware),
    Middleware(MeteringMiddleware),
    Middleware(QuotaMiddleware),
    Middleware(CacheMiddleware),
    Middleware(FailoverMiddleware),
]
