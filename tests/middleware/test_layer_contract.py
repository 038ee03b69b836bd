"""The layer contract, checked for every built-in layer and the example custom layer.

Each layer must: pass lifespan and websocket scopes to the inner app untouched; keep a
20-chunk SSE stream as 20 body messages with identical bytes; let `http.disconnect` reach the
inner app; never call the inner app when it short-circuits; send nothing after an inner
error once the response has started.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import pytest

from gateway.context import CONTEXT_KEY, RequestContext
from gateway.errors import GatewayError
from gateway.policy import Limits
from middleware.auth import AuthMiddleware, StaticKey
from middleware.auth.keys import hash_key
from middleware.cache import CacheMiddleware
from middleware.failover import FailoverMiddleware
from middleware.metering import MeteringMiddleware
from middleware.quota import QuotaMiddleware

REPO = Path(__file__).resolve().parents[2]


def _example_module() -> Any:
    os.environ.setdefault("SLUICEGATE_API_KEY", "sk-sg-contract-example")  # its auth key
    path = REPO / "deploy/examples/custom_layer.py"
    spec = importlib.util.spec_from_file_location("custom_layer_example", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PromptGuard = _example_module().PromptGuard

KEY = "sk-sg-contract-test-key-0123456789abcdefghijkl"
ALLOWED = StaticKey("contract", key_hash=hash_key(KEY), allowed_models=("m",))

# (layer factory, a request body that makes the layer short-circuit, or None if it never does)
LAYERS = {
    "auth": (lambda app: AuthMiddleware(app, keys=[ALLOWED]),
             {"model": "not-allowed", "messages": [{"role": "user", "content": "hi"}]}),
    "metering": (lambda app: MeteringMiddleware(app), None),
    "quota": (lambda app: QuotaMiddleware(app, model_limits={"blocked": Limits(rpm=0)}),
              {"model": "blocked", "messages": [{"role": "user", "content": "hi"}]}),
    "cache": (lambda app: CacheMiddleware(app), None),
    "failover": (lambda app: FailoverMiddleware(app), None),
    "prompt_guard": (lambda app: PromptGuard(app, block_patterns=["forbidden"]),
                     {"model": "m", "messages": [{"role": "user", "content": "a forbidden ask"}]}),
}


def http_scope(body: dict[str, Any] | None = None) -> dict[str, Any]:
    body = body or {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    headers = [(b"authorization", b"Bearer " + KEY.encode())]
    ctx = RequestContext(request_id="r1", operation="openai.chat", api_format="openai",
                         body=body, raw_body=b"", model=body["model"],
                         stream=bool(body.get("stream")), headers=headers)
    return {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": headers,
            "query_string": b"", "root_path": "", CONTEXT_KEY: ctx}


class Recorder:
    """An inner app that records what reached it and streams 20 SSE chunks."""

    def __init__(self, *, fail_after_start: bool = False, read_disconnect: bool = False) -> None:
        self.calls: list[dict[str, Any]] = []
        self.received: list[dict[str, Any]] = []
        self.fail_after_start = fail_after_start
        self.read_disconnect = read_disconnect

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.calls.append(scope)
        if scope["type"] == "lifespan":
            self.received.append(await receive())
            await send({"type": "lifespan.startup.complete"})
            return
        if scope["type"] == "websocket":
            self.received.append(await receive())
            await send({"type": "websocket.accept"})
            return
        if self.read_disconnect:
            self.received.append(await receive())
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        if self.fail_after_start:
            raise RuntimeError("inner failure after start")
        for i in range(20):
            await send({"type": "http.response.body", "body": chunk(i), "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def chunk(i: int) -> bytes:
    return b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"part %d"}}]}\n\n' % i


async def drive(app: Any, scope: dict[str, Any], incoming: list[dict[str, Any]]) -> list[Any]:
    sent: list[dict[str, Any]] = []
    queue = list(incoming)

    async def receive() -> dict[str, Any]:
        return queue.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


@pytest.fixture(params=sorted(LAYERS))
def layer_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def test_lifespan_passes_through(layer_name: str) -> None:
    inner = Recorder()
    app = LAYERS[layer_name][0](inner)
    scope = {"type": "lifespan", "asgi": {"version": "3.0"}}
    sent = await drive(app, scope, [{"type": "lifespan.startup"}])
    assert inner.calls == [scope]
    assert inner.received == [{"type": "lifespan.startup"}]
    assert sent == [{"type": "lifespan.startup.complete"}]


async def test_websocket_passes_through(layer_name: str) -> None:
    inner = Recorder()
    app = LAYERS[layer_name][0](inner)
    scope = {"type": "websocket", "path": "/ws", "headers": []}
    sent = await drive(app, scope, [{"type": "websocket.connect"}])
    assert inner.calls == [scope]
    assert sent == [{"type": "websocket.accept"}]


async def test_sse_stream_keeps_every_chunk_and_byte(layer_name: str) -> None:
    app = LAYERS[layer_name][0](Recorder())
    sent = await drive(app, http_scope(), [])
    bodies = [m for m in sent if m["type"] == "http.response.body" and m["body"]]
    assert [m["body"] for m in bodies] == [chunk(i) for i in range(20)]
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    assert sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}


async def test_disconnect_reaches_inner_app(layer_name: str) -> None:
    inner = Recorder(read_disconnect=True)
    app = LAYERS[layer_name][0](inner)
    await drive(app, http_scope(), [{"type": "http.disconnect"}])
    assert inner.received == [{"type": "http.disconnect"}]


async def test_short_circuit_never_calls_inner_app(layer_name: str) -> None:
    factory, refusing_body = LAYERS[layer_name]
    if refusing_body is None:
        pytest.skip(f"the {layer_name} layer is a shell and never short-circuits yet")
    inner = Recorder()
    with pytest.raises(GatewayError) as refusal:
        await drive(factory(inner), http_scope(refusing_body), [])
    assert 400 <= refusal.value.status < 500  # a refusal, in the caller's shape
    assert inner.calls == []


async def test_nothing_sent_after_inner_error_once_started(layer_name: str) -> None:
    app = LAYERS[layer_name][0](Recorder(fail_after_start=True))
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    with pytest.raises(RuntimeError, match="inner failure after start"):
        await app(http_scope(), receive, send)
    assert [m["type"] for m in sent] == ["http.response.start"]
