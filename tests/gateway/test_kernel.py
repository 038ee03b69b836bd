"""The kernel driven directly over ASGI: disconnects, lifespan and settings."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway import create_app
from gateway.config import ConfigError, load_config
from tests.harness import mock_config, write_config


async def call(app: Any, scope: dict[str, Any], messages: list[dict[str, Any]]) -> list[Any]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


def http_scope(path: str = "/v1/chat/completions") -> dict[str, Any]:
    return {"type": "http", "method": "POST", "path": path, "root_path": "", "query_string": b"",
            "headers": [(b"content-type", b"application/json")]}


async def test_disconnect_while_reading_the_body_sends_nothing(tmp_path: Path) -> None:
    app = create_app(write_config(tmp_path, mock_config("http://127.0.0.1:9")))
    sent = await call(app, http_scope(), [
        {"type": "http.request", "body": b'{"model":', "more_body": True},
        {"type": "http.disconnect"}])
    assert sent == []
    await app.shutdown()


async def test_lifespan_starts_and_stops_every_component(tmp_path: Path) -> None:
    app = create_app(write_config(tmp_path, mock_config("http://127.0.0.1:9")))
    sent = await call(app, {"type": "lifespan"},
                      [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
    assert [m["type"] for m in sent] == ["lifespan.startup.complete",
                                         "lifespan.shutdown.complete"]
    passthrough = app.components[-1]
    assert all(adapter._session is None for adapter in passthrough.providers.values())


@pytest.mark.parametrize("settings,fragment", [
    ("Settings(max_body_bytes='16MB')", "max_body_bytes must be a positive number"),
    ("Settings(log_level='verbose')", "log_level must be one of"),
])
def test_bad_settings_are_one_sentence(tmp_path: Path, settings: str, fragment: str) -> None:
    path = write_config(tmp_path, mock_config("http://127.0.0.1:9", extra=f"settings = {settings}"))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert fragment in str(caught.value) and str(caught.value).startswith(str(path))
