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


END_WATCHER = '''
from gateway.context import find_request_context


class EndWatcher:
    """Adds two end-of-request hooks: one that fails, then one that notes the outcome."""

    def __init__(self, app):
        self.app = app
        self.seen = []

    def __call__(self, scope, receive, send):
        ctx = find_request_context(scope)
        if ctx is not None:
            ctx.on_end = [*(ctx.on_end or []), self.fail, self.note]
        return self.app(scope, receive, send)

    def fail(self, ctx):
        raise RuntimeError("this hook fails")

    def note(self, ctx):
        self.seen.append((ctx.request_id, ctx.status, ctx.error_type))


middleware = [Middleware(EndWatcher)]
'''


async def test_end_hooks_see_the_final_outcome_and_a_failing_one_harms_nothing(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The kernel runs a request's `on_end` hooks after the response, with the status it
    sent, even when the response is an error it rendered for a failure further down; a hook
    that raises is logged and the next hook still runs."""
    app = create_app(write_config(tmp_path, mock_config("http://127.0.0.1:9", middleware="[]",
                                                        extra=END_WATCHER)))
    body = b'{"model":"gpt-mock","messages":[{"role":"user","content":"hi"}]}'
    scope = {**http_scope(), "headers": [(b"content-type", b"application/json"),
                                         (b"x-request-id", b"req-end-1")]}
    sent = await call(app, scope, [{"type": "http.request", "body": body}])
    await app.shutdown()
    status = sent[0]["status"]
    assert status >= 500  # nothing listens on port 9: the kernel renders the upstream error
    watcher = app.components[0]
    assert watcher.seen == [("req-end-1", status, watcher.seen[0][2])]
    assert watcher.seen[0][2]  # the error's type, as the response body names it
    assert "an end-of-request hook failed for request req-end-1" in caplog.text
