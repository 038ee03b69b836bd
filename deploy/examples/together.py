"""Example config: Together AI's OpenAI-compatible API at https://api.together.xyz/v1.

Run: `sluicegate serve --config deploy/examples/together.py`.
"""
from gateway.config import Deployment, Middleware, Model, Timeouts
from middleware.auth import AuthMiddleware
from middleware.cache import CacheMiddleware
from middleware.failover import FailoverMiddleware
from middleware.metering import MeteringMiddleware
from middleware.quota import QuotaMiddleware
from providers import Provider

providers = {
    "together": Provider("together", api_key_env="TOGETHER_API_KEY", timeouts=Timeouts(connect_s=5, first_byte_s=60, idle_s=60, total_s=600)),
}
models: dict[str, Model | list[Deployment]] = {
    "llama-3.1-8b": [Deployment("together", "meta-llama/Meta-Llama-3.1-8B-Instruct-Turbo")],
}
middleware = [
    Middleware(AuthMiddleware),
    Middleware(MeteringMiddleware),
    Middleware(QuotaMiddleware),
    Middleware(CacheMiddleware),
    Middleware(FailoverMiddleware),
]
