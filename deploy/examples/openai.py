"""Example config: OpenAI (https://platform.openai.com/docs/api-reference). Chat, completions, embeddings and the Responses API.

Run: `sluicegate serve --config deploy/examples/openai.py`.
"""
from gateway.config import Deployment, Middleware, Model, Timeouts
from middleware.auth import AuthMiddleware, StaticKey
from middleware.cache import CacheMiddleware
from middleware.failover import FailoverMiddleware
from middleware.metering import MeteringMiddleware
from middleware.quota import QuotaMiddleware
from providers import Provider

providers = {
    "openai": Provider("openai", api_key_env="OPENAI_API_KEY", timeouts=Timeouts(connect_s=5, first_byte_s=60, idle_s=60, total_s=600)),
}
models: dict[str, Model | list[Deployment]] = {
    "gpt-6.2-sol": [Deployment("openai", "gpt-6.2-sol")],
    "gpt-6-luna": [Deployment("openai", "gpt-6-luna")],
    "text-embedding-3-small": [Deployment("openai", "text-embedding-3-small")],
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
