"""Without a failover layer, the passthrough calls the model's first deployment whose provider
serves the request's operation (Azure has no Responses API, Anthropic no embeddings)."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from gateway import create_app
from tests.harness import ThreadedServer, mock_config, write_config
from tests.mock_providers import MockProviderServer

MODELS = '''
models["smart"] = [Deployment("azure", "my-gpt-deployment", price=MOCK_PRICE),
                   Deployment("openai", "gpt-4o", price=MOCK_PRICE)]
models["mixed"] = [Deployment("anthropic", "claude-3-5-haiku-latest", price=MOCK_PRICE),
                   Deployment("openai", "text-embedding-3-small", price=MOCK_PRICE)]
'''


@pytest.fixture
def bare(tmp_path: Path, mock_url: str) -> Iterator[ThreadedServer]:
    text = mock_config(mock_url, middleware="none", extra=MODELS)
    with ThreadedServer(create_app(write_config(tmp_path, text))) as server:
        yield server


def test_each_operation_goes_to_the_first_deployment_that_serves_it(
        bare: ThreadedServer, mock: MockProviderServer) -> None:
    sdk = openai.OpenAI(base_url=bare.url + "/v1", api_key="unused", max_retries=0)
    assert sdk.responses.create(model="smart", input="hello").output_text
    assert sdk.embeddings.create(model="mixed", input="hello").data[0].embedding
    assert sdk.chat.completions.create(model="smart", messages=[
        {"role": "user", "content": "hi"}]).choices[0].message.content
    assert sdk.chat.completions.create(model="mixed", messages=[
        {"role": "user", "content": "hi"}]).choices[0].message.content
    assert [(entry["provider"], entry["path"]) for entry in mock.requests] == [
        ("openai", "/openai/v1/responses"),
        ("openai", "/openai/v1/embeddings"),
        ("azure", "/azure/openai/deployments/my-gpt-deployment/chat/completions"),
        ("anthropic", "/anthropic/v1/messages"),
    ]


def test_an_operation_no_deployment_serves_is_a_400(
        bare: ThreadedServer, mock: MockProviderServer) -> None:
    response = httpx.post(bare.url + "/v1/responses", timeout=10,
                          json={"model": "azure-mock", "input": "hello"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "unsupported_operation"
    assert "does not support /v1/responses" in error["message"]
    assert mock.requests == []
