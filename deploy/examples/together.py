"""Example config: Together AI's OpenAI-compatible API at https://api.together.xyz/v1.

Run: `sluicegate serve --config deploy/examples/together.py`.
"""
from gateway.config import Deployment, Middleware, Model, Price, Timeouts
from middleware.auth import AuthMiddleware, StaticKey
from middleware.cache import CacheMiddleware
from middleware.failover import FailoverMiddleware
from middleware.metering import MeteringMiddleware
from middleware.quota import QuotaMiddleware
from providers import Provider

providers = {
    "together": Provider("together", api_key_env="TOGETHER_API_KEY", timeouts=Timeouts(connect_s=5, first_byte_s=60, idle_s=60, total_s=600)),
}
models: dict[str, Model | list[Deployment]] = {
    # Together has no table in gateway/prices.json, so each deployment carries its list price.
    # $0.88 in / $0.88 out per 1M tokens, no separate cache rate, serverless tier; read
    # 2026-11-28. Together's own catalog (https://docs.together.ai/docs/serverless/models) was
    # not readable; the rate is as quoted from it by models.dev
    # (providers/togetherai/models/meta-llama/Llama-3.3-70B-Instruct-Turbo.toml) and
    # https://mastra.ai/models/providers/togetherai. Check the catalog before billing on it.
    "llama-3.3-70b": [Deployment(
        "together", "meta-llama/Llama-3.3-70B-Instruct-Turbo",
        price=Price(input_per_mtok="0.88", output_per_mtok="0.88",
                    source="https://docs.together.ai/docs/serverless/models"))],
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
