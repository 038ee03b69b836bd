"""A request the server cancels mid-answer (its shutdown's grace period ran out, its
connection torn down) is recorded as cut short, never as a success."""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from gateway import create_app
from gateway.context import RequestContext, find_request_context
from gateway.layers import ASGIApp, Receive, Scope, Send
from tests.harness import TEST_KEY, mock_config, write_config

ENDED: list[tuple[int, str | None, bool]] = []  # (status, error_type, client_disconnected)


class StallsMidAnswer:
    """A layer that answers itself: a response start, one chunk, then nothing, for ever."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ctx = find_request_context(scope)
        if ctx is None:
            await self.app(scope, receive, send)
            return
        ctx.at_end(_note)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        await send({"type": "http.response.body", "body": b"data: {}\n\n", "more_body": True})
        await asyncio.sleep(3600)


def _note(ctx: RequestContext) -> None:
    ENDED.append((ctx.status, ctx.error_type, ctx.client_disconnected))


async def test_a_request_cancelled_mid_answer_is_no_success(tmp_path: Path,
                                                            mock_url: str) -> None:
    # At a shutdown's grace timeout hypercorn cancels the requests still running: a stream
    # cut so was recorded status 200, no error, as if it had finished.
    layer = "[Middleware(StallsMidAnswer)]"
    text = "from tests.gateway.test_kernel_cancelled import StallsMidAnswer\n" + \
        mock_config(mock_url, middleware=layer)
    kernel = create_app(write_config(tmp_path, text))
    body = b'{"model": "gpt-mock", "stream": true, "messages": [{"role": "user", "content": "x"}]}'
    scope: dict[str, Any] = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
        "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 2), "state": {},
        "headers": [(b"host", b"x"), (b"content-type", b"application/json"),
                    (b"content-length", b"%d" % len(body)),
                    (b"authorization", b"Bearer " + TEST_KEY.encode())]}
    sent: list[dict[str, Any]] = []
    chunk = asyncio.Event()
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "http.response.body":
            chunk.set()

    ENDED.clear()
    served = asyncio.create_task(kernel(scope, receive, send))
    await asyncio.wait_for(chunk.wait(), 10)
    served.cancel()
    await asyncio.gather(served, return_exceptions=True)
    assert sent[0]["status"] == 200
    assert ENDED == [(200, "cancelled", False)]
