"""Example config: OpenRouter's OpenAI-compatible API at https://openrouter.ai/api/v1.

Run: `sluicegate serve --config deploy/examples/openrouter.py`.
"""
from gateway.config import Deployment, Middleware, Model, Price, Timeouts
from middleware.auth import AuthMiddleware, StaticKey
from middleware.cache import CacheMiddleware
from middleware.failover import FailoverMiddleware
from middleware.metering import MeteringMiddleware
from middleware.quota import QuotaMiddleware
from providers import Provider

providers = {
    "openrouter": Provider("openrouter", api_key_env="OPENROUTER_API_KEY", timeouts=Timeouts(connect_s=5, first_byte_s=60, idle_s=60, total_s=600)),
}
models: dict[str, Model | list[Deployment]] = {
    # OpenRouter has no table in gateway/prices.json, so each deployment carries its price.
    # OpenRouter passes Anthropic's list price through: $3 in / $0.30 cache reads / $3.75
    # cache writes / $15 out per 1M tokens, as for claude-sonnet-4-6 in gateway/prices.json. Read 2026-11-28 from
    # models.dev (providers/openrouter/models/anthropic/claude-sonnet-4.6.toml) and
    # https://planpulse.online/blog/openrouter-vs-official-api; live rates:
    # https://openrouter.ai/anthropic/claude-sonnet-4.6. OpenRouter's credit-purchase fee is
    # not included.
    "claude-via-openrouter": [Deployment(
        "openrouter", "anthropic/claude-sonnet-4.6",
        price=Price(input_per_mtok="3.00", cached_input_per_mtok="0.30",
                    cache_write_per_mtok="3.75", output_per_mtok="15.00",
                    source="https://openrouter.ai/anthropic/claude-sonnet-4.6"))],
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
