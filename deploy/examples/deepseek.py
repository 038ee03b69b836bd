"""Example config: DeepSeek's OpenAI-compatible API at https://api.deepseek.com/v1.

Run: `sluicegate serve --config deploy/examples/deepseek.py`.
"""
from gateway.config import Deployment, Middleware, Model, Timeouts
from middleware.auth import AuthMiddleware
from middleware.cache import CacheMiddleware
from middleware.failover import FailoverMiddleware
from middleware.metering import MeteringMiddleware
from middleware.quota import QuotaMiddleware
from providers import Provider

providers = {
    "deepseek": Provider("deepseek", api_key_env="DEEPSEEK_API_KEY", timeouts=Timeouts(connect_s=5, first_byte_s=60, idle_s=60, total_s=600)),
}
models: dict[str, Model | list[Deployment]] = {
    "deepseek-chat": [Deployment("deepseek", "deepseek-chat")],
}
middleware = [
    Middleware(AuthMiddleware),
    Middleware(MeteringMiddleware),
    Middleware(QuotaMiddleware),
    Middleware(CacheMiddleware),
    Middleware(FailoverMiddleware),
]
