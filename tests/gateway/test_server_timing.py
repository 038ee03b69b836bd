"""`Settings(server_timing=True)`: every API response says how long the gateway took."""
from __future__ import annotations

import re
from pathlib import Path

import openai
import pytest

from gateway.app import create_app
from tests.harness import TEST_KEY, ThreadedServer, mock_config, write_config


@pytest.mark.parametrize("enabled", [True, False])
def test_server_timing_header(tmp_path: Path, mock_url: str, enabled: bool) -> None:
    extra = f"settings = Settings(server_timing={enabled})"
    config = write_config(tmp_path, mock_config(mock_url, extra=extra))
    with ThreadedServer(create_app(config)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=TEST_KEY, max_retries=0)
        ok = client.chat.completions.with_raw_response.create(
            model="gpt-mock", messages=[{"role": "user", "content": "time me"}])
        with pytest.raises(openai.NotFoundError) as refused:
            client.chat.completions.create(model="no-such-model",
                                           messages=[{"role": "user", "content": "x"}])
    headers = [ok.headers.get("server-timing"), refused.value.response.headers.get("server-timing")]
    if not enabled:
        assert headers == [None, None]
        return
    found = re.fullmatch(r"gateway;dur=(\d+\.\d{3})", headers[0] or "")
    assert found is not None and float(found.group(1)) > 0
    # An error answered by the kernel itself carries no timing: only responses from the stack.
    assert headers[1] is None
