"""Example config: one public name per model family, every provider at once.

OpenAI-, Anthropic- and Gemini-SDK-shaped traffic can reach any of these; the translation
happens in providers/. Set the keys you have; remove the providers you don't use.
"""
from gateway.config import Deployment, Middleware, Model
from middleware.auth import AuthMiddleware, StaticKey
from middleware.cache import CacheMiddleware
from middleware.failover import FailoverMiddleware
from middleware.metering import MeteringMiddleware
from middleware.quota import QuotaMiddleware
from providers import Provider

providers = {
    "openai": Provider("openai", api_key_env="OPENAI_API_KEY"),
    "anthropic": Provider("anthropic", api_key_env="ANTHROPIC_API_KEY"),
    "gemini": Provider("gemini", api_key_env="GEMINI_API_KEY"),
    "groq": Provider("groq", api_key_env="GROQ_API_KEY"),
}
models = {
    "smart": Model([Deployment("anthropic", "claude-sonnet-4-5"),
                    Deployment("openai", "gpt-6.2-sol")],
                   description="Claude first; the failover layer can fall back to GPT-6.2 Sol"),
    "fast": Model([Deployment("groq", "llama-3.3-70b-versatile"),
                   Deployment("gemini", "gemini-3.8-flash")]),
    "embed": Model([Deployment("openai", "text-embedding-3-small")]),
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
