"""A provider's `headers=`: header names to string values, else refused as the config loads
(aiohttp took anything, then refused every call with a 500), naming the header but never
showing a value (an Authorization's holds a key)."""
from __future__ import annotations

from pathlib import Path

import openai
import pytest

from gateway.app import create_app
from gateway.config import ConfigError, load_config
from providers import Provider
from tests.harness import TEST_KEY, ThreadedServer, mock_config, write_config
from tests.mock_providers import MockProviderServer

SECRET = "sk-proj-HEADERSECRET0123456789"


@pytest.mark.parametrize(("headers", "expected"), [
    ({"x-org-id": 12345}, "a openai provider's header 'x-org-id' must be a string, not int."),
    ({"x-org-id": None}, ("a openai provider's header 'x-org-id' must be a string, not "
                          "NoneType.")),
    ({"Authorization": f"Bearer {SECRET}\r\nx-injected: 1"},
     ("a openai provider's header 'Authorization' holds a line break or another control "
      "character, which HTTP does not allow (its value is not shown).")),
    ({"Authorization": f"Bearer {SECRET}\x00"}, "header 'Authorization' holds a line break"),
    ({f"Authorization: Bearer {SECRET}": "x"},
     ("a openai provider's headers must be named by HTTP header names (letters, digits and "
      "!#$%&'*+-.^_`|~), which one of them is not (not shown: it may hold a key).")),
    ({7: SECRET}, "must be named by HTTP header names"),
    ({"": SECRET}, "must be named by HTTP header names"),
    ([f"Authorization: Bearer {SECRET}"],
     "a openai provider's headers must be a dict such as {'x-org-id': 'org-1'}, not list."),
], ids=["int", "none", "crlf", "nul", "name-with-the-value", "name-int", "name-empty", "list"])
def test_headers_that_http_cannot_send_are_refused_without_their_values(
        headers: object, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Provider("openai", api_key_env="OPENAI_API_KEY", headers=headers)
    message = str(caught.value)
    assert expected in message and SECRET not in message and "\n" not in message


def test_a_bad_header_stops_the_config_loading(tmp_path: Path) -> None:
    path = write_config(tmp_path, (
        "from gateway.config import Deployment\nfrom providers import Provider\n"
        'providers = {"oa": Provider("openai", headers={"x-org-id": 12345})}\n'
        'models = {"m": [Deployment("oa", "y", free=True)]}\n'))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == (f"{path}, line 3: a openai provider's header 'x-org-id' must "
                                 "be a string, not int.")


def test_headers_of_names_and_strings_reach_the_provider(
        tmp_path: Path, mock: MockProviderServer, mock_url: str) -> None:
    assert Provider("anthropic", headers={"anthropic-beta": "x\ty"}).extra_headers == \
        {"anthropic-beta": "x\ty"}  # (a tab is a value's own character: RFC 9110 5.5)
    config = write_config(tmp_path, mock_config(mock_url, middleware="[]", extra=(
        'providers["openai"] = Provider("openai", base_url=MOCK + "/openai/v1", '
        'api_key_env="MOCK_PROVIDER_KEY", timeouts=fast, '
        'headers={"OpenAI-Organization": "org-1", "x-team": "search"})')))
    with ThreadedServer(create_app(config)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=TEST_KEY, max_retries=0)
        assert client.chat.completions.create(model="gpt-mock", messages=[
            {"role": "user", "content": "hi"}]).choices
    headers = [request["headers"] for request in mock.requests
               if request["provider"] == "openai"][-1]
    assert headers["openai-organization"] == "org-1" and headers["x-team"] == "search"
