"""Example config: OpenAI (https://platform.openai.com/docs/api-reference). Chat, completions, embeddings and the Responses API.

Run: `sluicegate serve --config deploy/examples/openai.py`.
"""
from gateway.config import Deployment, Middleware, Model, Timeouts
from middleware.auth import AuthMiddleware
from middleware.cache import CacheMiddleware
from middleware.failover import FailoverMiddleware
from middleware.metering import MeteringMiddleware
from middleware.quota import QuotaMiddleware
from providers import Provider

providers = {
    "openai": Provider("openai", api_key_env="OPENAI_API_KEY", timeouts=Timeouts(connect_s=5, first_byte_s=60, idle_s=60, total_s=600)),
}
models: dict[str, Model | list[Deployment]] = {
    "gpt-4o": [Deployment("openai", "gpt-4o")],
    "gpt-4o-mini": [Deployment("openai", "gpt-4o-mini")],
    "text-embedding-3-small": [Deployment("openai", "text-embedding-3-small")],
}
middleware = [
    Middleware(AuthMiddleware),
    Middleware(MeteringMiddleware),
    Middleware(QuotaMiddleware),
    Middleware(CacheMiddleware),
    Middleware(FailoverMiddleware),
]
