"""`GET /v1/models` and `GET /v1/models/{model}`, answered by the kernel, through the official
SDKs (`models.list()` and `models.retrieve()`). Behind the auth layer, with a key that may use
some models only: tests/middleware/test_auth_layer.py."""
from __future__ import annotations

from collections.abc import Iterator

import anthropic
import httpx
import openai
import pytest

from gateway import create_app
from tests.harness import TEST_KEY, ThreadedServer, mock_config, openai_client, write_config

EXTRA = 'models["acme/llama-mock"] = models["gpt-mock"]  # (a name with a slash)\n'
UNKNOWN = "The model 'gpt-nope' does not exist or you do not have access to it."


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, mock_url: str) -> Iterator[ThreadedServer]:
    config = write_config(tmp_path_factory.mktemp("models"),
                          mock_config(mock_url, middleware="none", extra=EXTRA))
    with ThreadedServer(create_app(config)) as gateway:
        yield gateway


def claude(server: ThreadedServer) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key=TEST_KEY, max_retries=0)


@pytest.mark.parametrize("name", ["gpt-mock", "claude-mock", "acme/llama-mock"])
def test_an_openai_client_retrieves_a_model_as_the_list_shows_it(server: ThreadedServer,
                                                                 name: str) -> None:
    listed = {model.id: model for model in openai_client(server).models.list()}
    retrieved = openai_client(server).models.retrieve(name)
    assert retrieved.to_dict() == listed[name].to_dict()
    assert retrieved.to_dict() == {"id": name, "object": "model", "created": 0,
                                   "owned_by": listed[name].owned_by}


@pytest.mark.parametrize("name", ["claude-mock", "gpt-mock"])
def test_an_anthropic_client_retrieves_a_model_as_the_list_shows_it(server: ThreadedServer,
                                                                    name: str) -> None:
    listed = {model.id: model for model in claude(server).models.list()}
    retrieved = claude(server).models.retrieve(name)
    assert retrieved.to_dict(mode="json") == listed[name].to_dict(mode="json")
    assert retrieved.to_dict(mode="json") == {"type": "model", "id": name, "display_name": name,
                                              "created_at": "1970-01-01T00:00:00Z"}


def test_an_unknown_model_is_a_404_in_the_callers_shape(server: ThreadedServer) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        openai_client(server).models.retrieve("gpt-nope")
    assert missing.value.body == {  # type: ignore[comparison-overlap]
        "message": UNKNOWN, "type": "invalid_request_error", "param": "model",
        "code": "model_not_found"}  # (as a chat request's unknown model)
    with pytest.raises(anthropic.NotFoundError) as not_found:
        claude(server).models.retrieve("gpt-nope")
    assert not_found.value.body == {  # type: ignore[comparison-overlap]
        "type": "error", "error": {"type": "not_found_error", "message": UNKNOWN}}


def test_a_model_takes_get_and_head_only(server: ThreadedServer) -> None:
    for path in ("/v1/models/gpt-mock", "/v1/models/gpt-nope", "/models/gpt-mock"):
        refused = httpx.post(server.url + path, json={})
        assert refused.status_code == 405 and refused.headers["allow"] == "GET, HEAD", path
    head = httpx.head(server.url + "/models/gpt-mock")
    assert head.status_code == 200 and head.content == b""
    assert int(head.headers["content-length"]) == len(
        httpx.get(server.url + "/models/gpt-mock").content)
