"""Example config: one public name per model family, every provider at once.

OpenAI-, Anthropic- and Gemini-SDK-shaped traffic can reach any of these; the translation
happens in providers/. Set the keys you have; remove the providers you don't use.
"""
from gateway.config import Deployment, Middleware, Model
from middleware.auth import AuthMiddleware
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
    "smart": Model([Deployment("anthropic", "claude-sonnet-4-5"), Deployment("openai", "gpt-4o")],
                   description="Claude first; the failover layer can fall back to GPT-4o"),
    "fast": Model([Deployment("groq", "llama-3.3-70b-versatile"),
                   Deployment("gemini", "gemini-2.0-flash")]),
    "embed": Model([Deployment("openai", "text-embedding-3-small")]),
}
middleware = [
    Middleware(AuthMiddleware),
    Middleware(MeteringMiddleware),
    Middleware(QuotaMiddleware),
    Middleware(CacheMiddleware),
    Middleware(FailoverMiddleware),
]
