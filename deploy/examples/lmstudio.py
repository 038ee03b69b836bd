"""Example config: LM Studio's local server; it needs no key.

Run: `sluicegate serve --config deploy/examples/lmstudio.py`.
"""
from gateway.config import Deployment, Middleware, Model, Timeouts
from middleware.auth import AuthMiddleware, StaticKey
from middleware.cache import CacheMiddleware
from middleware.failover import FailoverMiddleware
from middleware.metering import MeteringMiddleware
from middleware.quota import QuotaMiddleware
from providers import Provider

providers = {
    "lmstudio": Provider("lmstudio", base_url="http://127.0.0.1:1234/v1", timeouts=Timeouts(connect_s=5, first_byte_s=60, idle_s=60, total_s=600)),
}
models: dict[str, Model | list[Deployment]] = {
    # free=True: self-hosted, so you pay for the hardware, not per token. Give it a
    # price=Price(...) instead to charge callers an internal rate.
    "local": [Deployment("lmstudio", "qwen2.5-7b-instruct", free=True)],
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
