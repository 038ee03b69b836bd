"""Mock OpenAI, Azure OpenAI, Anthropic and Gemini servers speaking the real wire formats.

    with MockProviderServer(MockConfig(chunk_chars=4)) as mock:
        client = openai.OpenAI(base_url=mock.base_url("openai"), api_key="x")
        mock.push_fault(Fault("status", provider="openai", status=429, retry_after_s=2))

The answers are deterministic (see `behaviour`); `python -m tests.mock_providers` serves the
same thing in the foreground.
"""
from tests.mock_providers.faults import Fault, MockConfig
from tests.mock_providers.server import PREFIXES, MockProviderServer

__all__ = ["PREFIXES", "Fault", "MockConfig", "MockProviderServer"]
