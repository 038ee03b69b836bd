"""A provider that answers exactly what a test scripts: for odd answers no real provider
sends on purpose (usage counts that are not counts, JSON too deep to write back, tool-call
deltas of parallel calls interleaved), which the mock providers' own behaviour never makes.

Each POST, whatever its path, takes the next queued `Scripted` answer (status, content
type, body bytes; or, for a stream, its SSE payloads, one write each). A request with none
queued is answered 500. Served by aiohttp on 127.0.0.1 in a background thread.
"""
from __future__ import annotations

import asyncio
import json
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Self

import orjson
from aiohttp import web


@dataclass(slots=True)
class Scripted:
    """One answer: `body` as it is, or `events` as an SSE stream (`data: <json>` each, a
    str sent as it is, as `[DONE]`; bytes written as they are), `pause_s` apart (so the
    gateway reads them apart)."""

    status: int = 200
    body: bytes = b""
    events: list[Any] = field(default_factory=list)
    content_type: str = "application/json"
    pause_s: float = 0.0
    reset: bool = False  # a stream's connection is reset after its events, not ended

    @classmethod
    def json(cls, payload: Any) -> Scripted:
        # (the standard library's writer: it writes integers past 64 bits, which orjson
        # refuses, as a server in another language may)
        return cls(body=json.dumps(payload).encode())

    @classmethod
    def stream(cls, *events: Any, pause_s: float = 0.05,
               content_type: str = "text/event-stream", reset: bool = False) -> Scripted:
        return cls(events=list(events), content_type=content_type, pause_s=pause_s,
                   reset=reset)


class ScriptedUpstream:
    """The server (a context manager); `queue` answers, `requests` holds each request's
    path and JSON body."""

    def __init__(self) -> None:
        self._answers: deque[Scripted] = deque()
        self.requests: list[tuple[str, Any]] = []
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def queue(self, *answers: Scripted) -> None:
        self._answers.extend(answers)

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.requests.append((request.path, orjson.loads(body) if body else None))
        if not self._answers:
            return web.Response(status=500, text="nothing scripted")
        answer = self._answers.popleft()
        if not answer.events:
            return web.Response(status=answer.status, body=answer.body,
                                content_type=answer.content_type)
        response = web.StreamResponse(status=answer.status,
                                      headers={"content-type": answer.content_type})
        await response.prepare(request)
        for position, event in enumerate(answer.events):
            if position:
                await asyncio.sleep(answer.pause_s)
            if isinstance(event, bytes):  # (raw SSE text: a comment, an `event:` line)
                await response.write(event)
                continue
            data = event if isinstance(event, str) else json.dumps(event)
            await response.write(f"data: {data}\n\n".encode())
        if answer.reset and request.transport is not None:
            await asyncio.sleep(answer.pause_s)  # (the events reach the client first)
            request.transport.abort()
            return response
        await response.write_eof()
        return response

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_route("POST", "/{tail:.*}", self._answer)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def __enter__(self) -> Self:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
