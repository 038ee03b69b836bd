"""The mock provider server: one aiohttp app, every provider under its own path prefix.

`MockProviderServer` runs it on its own event loop in a background thread (sync SDK clients,
in-process gateways and subprocesses can all reach it) or on the caller's loop
(`start_async`). Each provider request is recorded, authenticated, given the next matching
queued fault (else, by `MockConfig.fail_ratio`, perhaps a status fault), then answered by its
provider module. `/_mock/...` controls the server over HTTP for subprocess use.
"""
from __future__ import annotations

import asyncio
import ipaddress
import threading
from collections.abc import Awaitable, Callable
from typing import Any, Self

import orjson
from aiohttp import web

from tests.mock_providers import anthropic_api, gemini_api, openai_extra
from tests.mock_providers.anthropic_api import AnthropicWire
from tests.mock_providers.faults import Fault, MockConfig
from tests.mock_providers.gemini_api import GeminiWire
from tests.mock_providers.openai_chat import chat_completions
from tests.mock_providers.openai_responses import responses
from tests.mock_providers.openai_wire import AzureWire, MistralWire, OpenAIWire
from tests.mock_providers.wire import BadRequest, Call, ProviderWire, ServerState

Handler = Callable[[Call], Awaitable[web.StreamResponse]]
PREFIXES = {"openai": "/openai/v1", "azure": "/azure", "anthropic": "/anthropic",
            "gemini": "/gemini", "mistral": "/mistral/v1"}
_BAD_JSON = {
    "openai": "We could not parse the JSON body of your request. (HINT: This likely means you "
              "aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, "
              "but what was sent was not valid JSON.)",
    "anthropic": "There was an issue with the request body: it is not valid JSON.",
    "gemini": "Invalid JSON payload received. Unexpected token.",
}
_START_TIMEOUT_S = 15.0


def endpoint(state: ServerState, wire: ProviderWire, handler: Handler) -> Callable[
        [web.Request], Awaitable[web.StreamResponse]]:
    """Wrap a provider handler with recording, auth, bad-JSON refusal and fault dispatch.

    A queued fault comes first; without one, `MockConfig.draw_failure` may give the request a
    status fault (counted in `state.ratio_failures`), answered like a queued one.
    """
    bad_json = _BAD_JSON.get(wire.name, _BAD_JSON["openai"])

    async def handle(request: web.Request) -> web.StreamResponse:
        config = state.config
        raw = await request.read() if request.body_exists else b""
        try:
            body: Any = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            body = raw
        if config.record_requests:
            state.record({"provider": wire.name, "method": request.method, "path": request.path,
                          "query": dict(request.query),
                          "headers": {k.lower(): v for k, v in request.headers.items()},
                          "json": None if isinstance(body, bytes) else body})
        refusal = wire.auth_refusal(request, (config.expected_keys or {}).get(wire.name))
        if refusal is not None:
            return refusal
        headers = wire.response_headers(config)
        if isinstance(body, bytes):
            return wire.error(400, bad_json, headers)
        fault = state.faults.take(wire.name, raw)
        if fault is None:
            fault = config.draw_failure(wire.name)
            if fault is not None:
                failures = state.ratio_failures
                failures[wire.name] = failures.get(wire.name, 0) + 1
        call = Call(request, wire, body, fault, state, headers)
        status_fault = call.fault_of("status")
        if status_fault is not None:
            await call.wait_first_byte()
            call.keep_bill(status_fault.sent_status or status_fault.status)
            refused = wire.error(status_fault.status, status_fault.message, headers,
                                 retry_after_s=status_fault.retry_after_s,
                                 param=status_fault.param, code=status_fault.code)
            if not status_fault.retry_after_header:
                refused.headers.popall("retry-after", None)
            refused.headers.update(status_fault.headers or {})
            if status_fault.error_type is not None:
                refused.body = _with_error_type(refused.body, status_fault.error_type)
            if status_fault.sent_status is not None:
                refused.set_status(status_fault.sent_status)
                if status_fault.code is None:  # (OpenRouter's shape: the status as its code)
                    refused.body = _with_status_code(refused.body, status_fault.status)
            return refused
        try:
            return await handler(call)
        except BadRequest as exc:
            call.keep_bill(exc.status)
            return wire.error(exc.status, exc.message, headers, param=exc.param, code=exc.code)

    return handle


def _with_status_code(body: Any, status: int) -> Any:
    """An error body whose error object's `code` is `status`, a number."""
    payload = orjson.loads(body)
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        payload["error"]["code"] = status
    return orjson.dumps(payload)


def _with_error_type(body: Any, error_type: str) -> Any:
    """An error body whose error object's `type` is `error_type`."""
    payload = orjson.loads(body)
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        payload["error"]["type"] = error_type
    return orjson.dumps(payload)


def _not_found() -> Handler:
    async def handle(call: Call) -> web.StreamResponse:
        raise BadRequest(f"Unknown request URL: {call.request.method} {call.request.path}.",
                         status=404)
    return handle


def build_app(state: ServerState) -> web.Application:
    """The aiohttp application: provider routes, per-provider 404s and `/_mock` controls."""
    app = web.Application(client_max_size=64 * 1024 * 1024)
    wires = {"openai": OpenAIWire(), "azure": AzureWire(), "anthropic": AnthropicWire(),
             "gemini": GeminiWire(), "mistral": MistralWire()}
    version = "{version:v1beta|v1}"
    routes: list[tuple[str, str, str, Handler]] = [
        ("POST", "/openai/v1/chat/completions", "openai", chat_completions),
        ("POST", "/openai/v1/completions", "openai", openai_extra.completions),
        ("POST", "/openai/v1/embeddings", "openai", openai_extra.embeddings),
        ("POST", "/openai/v1/responses", "openai", responses),
        ("GET", "/openai/v1/models", "openai", openai_extra.list_models),
        ("POST", "/azure/openai/deployments/{deployment}/chat/completions", "azure",
         chat_completions),
        ("POST", "/azure/openai/deployments/{deployment}/completions", "azure",
         openai_extra.completions),
        ("POST", "/azure/openai/deployments/{deployment}/embeddings", "azure",
         openai_extra.embeddings),
        ("GET", "/azure/openai/models", "azure", openai_extra.list_azure_models),
        ("POST", "/anthropic/v1/messages", "anthropic", anthropic_api.messages),
        ("POST", "/anthropic/v1/messages/count_tokens", "anthropic", anthropic_api.count_tokens),
        ("GET", "/anthropic/v1/models", "anthropic", anthropic_api.list_models),
        ("POST", f"/gemini/{version}/models/{{target}}", "gemini", gemini_api.model_method),
        ("GET", f"/gemini/{version}/models", "gemini", gemini_api.list_models),
        ("GET", f"/gemini/{version}/models/{{target}}", "gemini", gemini_api.get_model),
        ("POST", "/mistral/v1/chat/completions", "mistral", chat_completions),
    ]
    for method, path, provider, handler in routes:
        app.router.add_route(method, path, endpoint(state, wires[provider], handler))
    for provider, wire in wires.items():
        app.router.add_route("*", f"/{provider}/{{tail:.*}}",
                             endpoint(state, wire, _not_found()))
    _add_controls(app, state)
    return app


# -- /_mock controls --------------------------------------------------------------------------

def _json(payload: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(payload),
                        content_type="application/json")


def _add_controls(app: web.Application, state: ServerState) -> None:
    async def push_faults(request: web.Request) -> web.Response:
        try:
            payload = orjson.loads(await request.read())
            faults = [Fault(**item) for item in (payload if isinstance(payload, list)
                                                 else [payload])]
        except (orjson.JSONDecodeError, TypeError, ValueError) as exc:
            return _json({"error": str(exc)}, 400)
        for fault in faults:
            state.faults.push(fault)
        return _json({"queued": len(faults)}, 201)

    async def clear_faults(request: web.Request) -> web.Response:
        state.faults.clear()
        return _json({"cleared": True})

    async def list_faults(request: web.Request) -> web.Response:
        return _json([fault.as_dict() for fault in state.faults.pending()])

    async def get_requests(request: web.Request) -> web.Response:
        return _json(state.requests)

    async def clear_requests(request: web.Request) -> web.Response:
        state.requests.clear()
        return _json({"cleared": True})

    async def put_config(request: web.Request) -> web.Response:
        try:
            values = orjson.loads(await request.read())
            if not isinstance(values, dict):
                raise TypeError("the config must be a JSON object")
            state.config.update(values)
        except (orjson.JSONDecodeError, TypeError, ValueError) as exc:
            return _json({"error": str(exc)}, 400)
        return _json(state.config.as_dict())

    async def get_config(request: web.Request) -> web.Response:
        return _json(state.config.as_dict())

    async def stats(request: web.Request) -> web.Response:
        return _json({"active_streams": state.active_streams,
                      "cancelled_streams": state.cancelled_streams,
                      "recorded_requests": len(state.requests),
                      "pending_faults": len(state.faults.pending()),
                      "ratio_failures": sum(state.ratio_failures.values()),
                      "ratio_failures_by_provider": dict(state.ratio_failures)})

    async def health(request: web.Request) -> web.Response:
        return _json({"status": "ok"})

    for method, path, handler in [
            ("POST", "/_mock/faults", push_faults), ("DELETE", "/_mock/faults", clear_faults),
            ("GET", "/_mock/faults", list_faults), ("GET", "/_mock/requests", get_requests),
            ("DELETE", "/_mock/requests", clear_requests), ("PUT", "/_mock/config", put_config),
            ("GET", "/_mock/config", get_config), ("GET", "/_mock/stats", stats),
            ("GET", "/_mock/health", health)]:
        app.router.add_route(method, path, handler)


# -- the server -------------------------------------------------------------------------------

def check_loopback(host: str) -> None:
    """The mock serves this machine only; refuse any other bind address."""
    if host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"the mock binds to loopback addresses only, not {host!r}")


class MockProviderServer:
    """Mock OpenAI, Azure OpenAI, Anthropic and Gemini APIs on one 127.0.0.1 port.

    `start()`/`stop()` run it in a background thread (also a context manager);
    `start_async()`/`stop_async()` run it on the current event loop. Faults are queued with
    `push_fault`, random failures set on `config` (`fail_ratio`, ...) and counted by
    `ratio_failures()`; `requests` is the log of provider requests (provider, method, path, query,
    lower-cased headers, json body).
    """

    def __init__(self, config: MockConfig | None = None, *, host: str = "127.0.0.1",
                 port: int = 0) -> None:
        check_loopback(host)
        self.config = config or MockConfig()
        self.host = host
        self._requested_port = port
        self._port: int | None = None
        self._state = ServerState(self.config)
        self._runner: web.AppRunner | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # -- addresses --

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the mock server is not started")
        return self._port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def base_url(self, provider: str) -> str:
        """The base URL an SDK or gateway uses for `provider` (see PREFIXES)."""
        if provider not in PREFIXES:
            raise ValueError(f"unknown provider {provider!r}; expected one of {list(PREFIXES)}")
        return self.url + PREFIXES[provider]

    # -- faults, log, counters --

    def push_fault(self, fault: Fault) -> None:
        self._state.faults.push(fault)

    def clear_faults(self) -> None:
        self._state.faults.clear()

    @property
    def pending_faults(self) -> list[Fault]:
        return self._state.faults.pending()

    @property
    def requests(self) -> list[dict[str, Any]]:
        return self._state.requests

    def reset_log(self) -> None:
        self._state.requests.clear()
        self._state.bills.clear()

    @property
    def bills(self) -> list[dict[str, Any]]:
        """One bill per provider call while `config.record_bills` is on (see `wire.Call`)."""
        return self._state.bills

    @property
    def active_streams(self) -> int:
        """Streams being written right now."""
        return self._state.active_streams

    @property
    def cancelled_streams(self) -> int:
        """Streams whose client went away before the end."""
        return self._state.cancelled_streams

    def ratio_failures(self, provider: str | None = None) -> int:
        """Requests failed by `config.fail_ratio` (not by queued faults): all, or `provider`'s."""
        if provider is None:
            return sum(self._state.ratio_failures.values())
        if provider not in PREFIXES:
            raise ValueError(f"unknown provider {provider!r}; expected one of {list(PREFIXES)}")
        return self._state.ratio_failures.get(provider, 0)

    def reset_ratio_failures(self) -> None:
        self._state.ratio_failures.clear()

    # -- lifecycle --

    async def start_async(self) -> None:
        """Serve on the running event loop until `stop_async`."""
        self._runner = web.AppRunner(build_app(self._state), access_log=None,
                                     handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self._requested_port, backlog=1024,
                           reuse_address=True)
        await site.start()
        self._port = int(self._runner.addresses[0][1])

    async def stop_async(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def start(self) -> Self:
        """Serve from a background thread; returns once the port is listening."""
        if self._thread is not None:
            raise RuntimeError("the mock server is already started")
        ready = threading.Event()
        failure: list[Exception] = []
        self._thread = threading.Thread(target=self._serve_in_thread, args=(ready, failure),
                                        name="mock-providers", daemon=True)
        self._thread.start()
        if not ready.wait(_START_TIMEOUT_S):
            raise TimeoutError("the mock server did not start in time")
        if failure:
            self._thread.join()
            self._thread = None
            raise failure[0]
        return self

    def _serve_in_thread(self, ready: threading.Event, failure: list[Exception]) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self.start_async())
        except Exception as exc:  # noqa: BLE001 -- handed to start(), raised in the caller
            failure.append(exc)
            ready.set()
            loop.close()
            return
        self._loop = loop
        ready.set()
        try:
            loop.run_forever()
            loop.run_until_complete(self.stop_async())
        finally:
            loop.close()

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
        self._loop = None
        self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
