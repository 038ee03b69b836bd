"""Example config: Google Gemini (Generative Language API v1beta): generateContent, streaming, embeddings, countTokens.

Run: `sluicegate serve --config deploy/examples/gemini.py`.
"""
from gateway.config import Deployment, Middleware, Model, Timeouts
from middleware.auth import AuthMiddleware
from middleware.cache import CacheMiddleware
from middleware.failover import FailoverMiddleware
from middleware.metering import MeteringMiddleware
from middleware.quota import QuotaMiddleware
from providers import Provider

providers = {
    "gemini": Provider("gemini", api_key_env="GEMINI_API_KEY", timeouts=Timeouts(connect_s=5, first_byte_s=60, idle_s=60, total_s=600)),
}
models: dict[str, Model | list[Deployment]] = {
    "gemini-flash": [Deployment("gemini", "gemini-2.0-flash")],
    "gemini-embedding": [Deployment("gemini", "text-embedding-004")],
}
middleware = [
    Middleware(AuthMiddleware),
    Middleware(MeteringMiddleware),
    Middleware(QuotaMiddleware),
    Middleware(CacheMiddleware),
    Middleware(FailoverMiddleware),
]
