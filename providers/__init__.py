"""Provider families and the `Provider(...)` factory the config module calls.

`Provider(type, base_url=None, api_key_env=None, timeouts=Timeouts(), max_connections=512,
headers=None, **type_specific)` returns the adapter for `type`. OpenAI-compatible services
are presets of the OpenAI adapter with their public base URL filled in.
"""
from __future__ import annotations

from typing import Any

from gateway.config import ConfigError
from providers.anthropic import AnthropicAdapter
from providers.base import HTTPAdapter
from providers.gemini import GeminiAdapter
from providers.openai import AzureOpenAIAdapter, OpenAIAdapter

# type -> (adapter class, default options). Base URLs from each service's API docs.
_OPENAI_COMPATIBLE = {
    "groq": "https://api.groq.com/openai/v1",
    "together": "https://api.together.xyz/v1",
    "deepseek": "https://api.deepseek.com/v1",
    "xai": "https://api.x.ai/v1",
    "mistral": "https://api.mistral.ai/v1",
    "openrouter": "https://openrouter.ai/api/v1",
    "fireworks": "https://api.fireworks.ai/inference/v1",
    "vllm": "http://127.0.0.1:8000/v1",
    "ollama": "http://127.0.0.1:11434/v1",
    "lmstudio": "http://127.0.0.1:1234/v1",
}
PROVIDER_TYPES: dict[str, tuple[type[HTTPAdapter], dict[str, Any]]] = {
    "openai": (OpenAIAdapter, {}),
    "openai-compatible": (OpenAIAdapter, {"type_name": "openai-compatible",
                                          "responses_api": False}),
    "azure": (AzureOpenAIAdapter, {}),
    "anthropic": (AnthropicAdapter, {}),
    "gemini": (GeminiAdapter, {}),
    **{name: (OpenAIAdapter, {"type_name": name, "base_url": url, "responses_api": False})
       for name, url in _OPENAI_COMPATIBLE.items()},
}


def Provider(type: str, **options: Any) -> HTTPAdapter:
    """Declares a provider in the config module, e.g. `Provider("groq", api_key_env="GROQ_KEY")`."""
    if type not in PROVIDER_TYPES:
        known = ", ".join(sorted(PROVIDER_TYPES))
        raise ConfigError(f"unknown provider type {type!r} (known types: {known}).")
    cls, defaults = PROVIDER_TYPES[type]
    try:
        return cls(**{**defaults, **options})
    except TypeError as exc:
        raise ConfigError(f"provider type {type!r} got wrong options: {exc}.") from None


__all__ = ["PROVIDER_TYPES", "Provider"]
