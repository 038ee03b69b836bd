"""Example config: Fireworks AI's OpenAI-compatible API at https://api.fireworks.ai/inference/v1.

Run: `sluicegate serve --config deploy/examples/fireworks.py`.
"""
from gateway.config import Deployment, Middleware, Model, Price, Timeouts
from middleware.auth import AuthMiddleware, StaticKey
from middleware.cache import CacheMiddleware
from middleware.failover import FailoverMiddleware
from middleware.metering import MeteringMiddleware
from middleware.quota import QuotaMiddleware
from providers import Provider

providers = {
    "fireworks": Provider("fireworks", api_key_env="FIREWORKS_API_KEY", timeouts=Timeouts(connect_s=5, first_byte_s=60, idle_s=60, total_s=600)),
}
models: dict[str, Model | list[Deployment]] = {
    # Fireworks has no table in gateway/prices.json, so each deployment carries its list price.
    # Serverless Standard tier, $0.15 in / $0.015 cached in / $0.60 out per 1M tokens, from
    # https://docs.fireworks.ai/serverless/pricing (and the $0.15/$0.60 on
    # https://fireworks.ai/models/fireworks/gpt-oss-120b), read 2026-11-28.
    "gpt-oss-120b": [Deployment(
        "fireworks", "accounts/fireworks/models/gpt-oss-120b",
        price=Price(input_per_mtok="0.15", cached_input_per_mtok="0.015", output_per_mtok="0.60",
                    source="https://docs.fireworks.ai/serverless/pricing"))],
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
