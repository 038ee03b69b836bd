"""Structured logs: JSON lines carrying the request id and trace id of the request served."""
from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import httpx

from gateway import create_app
from gateway.logs import JsonFormatter
from tests.harness import AUTH, ThreadedServer, find_secrets_in_logs, mock_config, write_config

LAYER = '''
import logging
class Chatty:
    def __init__(self, app):
        self.app = app
    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            logging.getLogger("sluicegate.chatty").warning("serving", extra={"step": 1})
        await self.app(scope, receive, send)
middleware.insert(0, Middleware(Chatty))
from tests.tracing_support import PROVIDER
settings = Settings(tracer_provider=PROVIDER)
'''


def test_log_lines_carry_the_request_and_trace_ids(tmp_path: Path, mock_url: str) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("sluicegate.chatty")
    logger.addHandler(handler)
    try:
        app = create_app(write_config(tmp_path, mock_config(mock_url, extra=LAYER)))
        with ThreadedServer(app) as server:
            response = httpx.post(server.url + "/v1/chat/completions", headers={
                **AUTH, "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
                json={"model": "gpt-mock", "messages": [{"role": "user", "content": "hi"}]})
    finally:
        logger.removeHandler(handler)
    (line,) = stream.getvalue().splitlines()
    entry = json.loads(line)
    assert entry["message"] == "serving" and entry["level"] == "warning"
    assert entry["logger"] == "sluicegate.chatty" and entry["step"] == 1
    assert entry["request_id"] == response.headers["x-request-id"]
    assert entry["trace_id"] == "0af7651916cd43dd8448eb211c80319c"
    assert entry["ts"].endswith("Z")


def test_the_secret_search_finds_keys(tmp_path: Path) -> None:
    (tmp_path / "a.log").write_text('{"message": "key sk-sg-abcdefghijklmnopqrstuvwxyz012345"}')
    (tmp_path / "b.log").write_text("provider said provider-secret-123456789 oops")
    (tmp_path / "c.log").write_text("nothing to see: sk-sg-short")
    found = sorted(where.rsplit("/", 1)[1] for where, _ in find_secrets_in_logs(tmp_path))
    assert found == ["a.log", "b.log"]
