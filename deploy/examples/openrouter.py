"""Example config: OpenRouter's OpenAI-compatible API at https://openrouter.ai/api/v1.

Run: `sluicegate serve --config deploy/examples/openrouter.py`.
"""
from gateway.config import Deployment, Middleware, Model, Timeouts
from middleware.auth import AuthMiddleware
from middleware.cache import CacheMiddleware
from middleware.failover import FailoverMiddleware
from middleware.metering import MeteringMiddleware
from middleware.quota import QuotaMiddleware
from providers import Provider

providers = {
    "openrouter": Provider("openrouter", api_key_env="OPENROUTER_API_KEY", timeouts=Timeouts(connect_s=5, first_byte_s=60, idle_s=60, total_s=600)),
}
models: dict[str, Model | list[Deployment]] = {
    "claude-via-openrouter": [Deployment("openrouter", "anthropic/claude-3.5-sonnet")],
}
middleware = [
    Middleware(AuthMiddleware),
    Middleware(MeteringMiddleware),
    Middleware(QuotaMiddleware),
    Middleware(CacheMiddleware),
    Middleware(FailoverMiddleware),
]
