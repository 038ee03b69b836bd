"""Example config: Google Gemini (Generative Language API v1beta): generateContent, streaming, embeddings, countTokens.

Run: `sluicegate serve --config deploy/examples/gemini.py`.
"""
from gateway.config import Deployment, Middleware, Model, Timeouts
from middleware.auth import AuthMiddleware, StaticKey
from middleware.cache import CacheMiddleware
from middleware.failover import FailoverMiddleware
from middleware.metering import MeteringMiddleware
from middleware.quota import QuotaMiddleware
from providers import Provider

providers = {
    "gemini": Provider("gemini", api_key_env="GEMINI_API_KEY", timeouts=Timeouts(connect_s=5, first_byte_s=60, idle_s=60, total_s=600)),
}
# A model by its id, or by its resource name as Gemini's model list gives it
# ("models/gemini-3.8-flash"): either is called at /v1beta/models/gemini-3.8-flash:...
models: dict[str, Model | list[Deployment]] = {
    "gemini-flash": [Deployment("gemini", "gemini-3.8-flash")],
    "gemini-embedding": [Deployment("gemini", "gemini-embedding-2")],
}
middleware = [
    # Virtual keys: one declared here (its plaintext in $SLUICEGATE_API_KEY; only the hash is
    # kept), or store=PostgresKeyStore(dsn) for keys made with the admin API.
    Middleware(AuthMiddleware, keys=[StaticKey("my-team", key_env="SLUICEGATE_API_KEY")]),
    Middleware(MeteringMiddleware),
    Middleware(QuotaMiddleware),
    Middleware(CacheMiddleware),
    Middleware(FailoverMiddleware),
]
