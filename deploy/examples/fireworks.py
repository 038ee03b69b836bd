"""Example config: Fireworks AI's OpenAI-compatible API at https://api.fireworks.ai/inference/v1.

Run: `sluicegate serve --config deploy/examples/fireworks.py`.
"""
from gateway.config import Deployment, Middleware, Model, Timeouts
from middleware.auth import AuthMiddleware
from middleware.cache import CacheMiddleware
from middleware.failover import FailoverMiddleware
from middleware.metering import MeteringMiddleware
from middleware.quota import QuotaMiddleware
from providers import Provider

providers = {
    "fireworks": Provider("fireworks", api_key_env="FIREWORKS_API_KEY", timeouts=Timeouts(connect_s=5, first_byte_s=60, idle_s=60, total_s=600)),
}
models: dict[str, Model | list[Deployment]] = {
    "llama-3.1-70b": [Deployment("fireworks", "accounts/fireworks/models/llama-v3p1-70b-instruct")],
}
middleware = [
    Middleware(AuthMiddleware),
    Middleware(MeteringMiddleware),
    Middleware(QuotaMiddleware),
    Middleware(CacheMiddleware),
    Middleware(FailoverMiddleware),
]
