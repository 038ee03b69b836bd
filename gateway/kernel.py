"""The kernel: the outermost ASGI app, always present, never in the operator's list.

It answers health, readiness and model-list requests itself; admin requests and a key's own
usage (`/v1/usage/self`) go down the stack without a context, for the layer that owns the
path to answer. For API requests it assigns the request id, reads the body once (bounded in
size, and in time: `Settings.body_timeout_s`), parses it once, detects the ingress format,
puts a `RequestContext` in the scope, runs the operator's stack (with auth outermost, the
body is parsed only once the caller's key is checked: `body_after_auth`), and turns refusals
into API-shaped errors while the response has not started. It also owns startup and shutdown of every component in the stack that has
`startup`/`shutdown` methods.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import os
import random
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Mapping,
    MutableMapping,
    Sequence,
)
from contextlib import AbstractContextManager, asynccontextmanager, nullcontext
from typing import Any

import orjson

from gateway.body_deadline import BodyDeadlines
from gateway.config import GatewayConfig
from gateway.context import (
    CONTEXT_KEY,
    OPENAI_RESPONSES,
    PRINCIPAL_KEY,
    SELF_USAGE_PATH,
    RequestContext,
)
from gateway.errors import ClientDisconnected, GatewayError
from gateway.ingress import (
    OPERATIONS_BY_PATH,
    api_format_of,
    check_body,
    guess_api_format,
    is_models_path,
    model_of_path,
    nesting_exceeds,
    too_deep,
    unknown_model,
)
from gateway.logs import REQUEST_IDS
from gateway.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from gateway.metrics import (
    METRICS_DIR_ENV,
    SNAPSHOT_INTERVAL_S,
    RequestMetrics,
    Sample,
    otlp_exporter_wanted,
    otlp_meter_provider,
    register_otlp,
)
from gateway.policy import model_allowed
from gateway.readiness import ReadinessChecks
from gateway.tokens import remember_conversation
from gateway.tracing import tracing_from

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

logger = logging.getLogger("sluicegate")
_NO_DEADLINE = nullcontext()  # (`Kernel._within` without a deadline; reusable)
_random_bits = random.Random().getrandbits  # seeded from os.urandom



def _request_id(headers: list[tuple[bytes, bytes]], header: bytes) -> bytes:
    callers = _callers_request_id(headers, header)
    return callers if callers is not None else _new_request_id()


def _callers_request_id(headers: list[tuple[bytes, bytes]], header: bytes) -> bytes | None:
    for name, value in headers:
        if name == header:
            # Passed through only when it is short and printable, so it is safe in logs, and
            # does not look like a key (`sk-sg-`, `sk-proj-`, `sk-ant-`...): a client that sends
            # its key as its request id would have it in every log line, record and trace.
            if 0 < len(value) <= 128 and value.isascii() and value.replace(b"-", b"").isalnum() \
                    and value[:3].lower() != b"sk-":
                return value
            break
    return None


def _new_request_id() -> bytes:
    # Unique, not secret: the process's PRNG (seeded from os.urandom) spares a system call.
    return b"%032x" % _random_bits(128)


async def drain_body(receive: Receive, message: Message | None = None,
                     limit_bytes: int = 64 * 1024 * 1024) -> None:
    """Reads and drops the rest of an oversized body (up to a bound), so the client finishes
    sending and reads the 413 rather than a reset connection. `message`: the last one read
    (None: nothing read yet)."""
    message = message if message is not None else {"more_body": True}
    drained = 0
    while message.get("more_body", False) and drained < limit_bytes:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        drained += len(message.get("body", b""))


def bearer_is(headers: list[tuple[bytes, bytes]], token: bytes) -> bool:
    """Whether the request's `Authorization: Bearer` is `token` (compared in constant time):
    the metrics token here, the admin token in gateway.admin."""
    for name, value in headers:
        if name == b"authorization":
            scheme, _, given = value.partition(b" ")
            return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), token)
    return False


def route_path(scope: Scope) -> str:
    """The path below the mount point (Starlette keeps the full path and sets root_path)."""
    path: str = scope["path"]
    root = scope.get("root_path", "")
    if root and path.startswith(root):
        return path[len(root):] or "/"
    return path


def degraded(report: dict[str, str], why: str) -> dict[str, str]:
    """A readiness report where a failing store is "degraded: ..." (still ready: the layer
    keeps serving without it) instead of an error."""
    return {name: value if value == "ok" else f"degraded: {value}; {why}"
            for name, value in report.items()}


def stack_components(app: Any) -> list[Any]:
    """The chain of layers under the kernel, outermost first, following `.app` links."""
    components = []
    seen: set[int] = set()
    while app is not None and id(app) not in seen:
        seen.add(id(app))
        components.append(app)
        app = getattr(app, "app", None)
    return components


def check_stack(components: Sequence[Any], config: GatewayConfig) -> None:
    """Runs each layer's `check_config(config)` (the layers that check their options against
    the config, and learn from it what the layers below them are), raising ConfigError."""
    for component in components:
        check = getattr(component, "check_config", None)
        if callable(check):
            check(config)


def body_after_auth(components: Sequence[Any]) -> bool:
    """Whether the kernel leaves a request's body unparsed for the layer that checks the
    caller (gateway/layers.py): when the outermost layers, before one that says it parses the
    body once the caller is checked (`loads_body = True`: auth), all read the request only
    once it has ended (`reads_request_at_end = True`: metering). Then a request without a
    valid key is refused before its body is parsed, and its errors say nothing of which
    models exist."""
    for component in components:
        if getattr(component, "loads_body", False) is True:
            return True
        if getattr(component, "reads_request_at_end", False) is not True:
            return False
    return False


class Kernel:
    """The gateway's ASGI application (what `create_app` returns)."""

    def __init__(self, app: ASGIApp, *, config: GatewayConfig) -> None:
        self.app = app
        self.config = config
        self.max_body_bytes = config.settings.max_body_bytes
        self.body_timeout_s = config.settings.body_timeout_s
        self._bodies = None if self.body_timeout_s is None \
            else BodyDeadlines(self.body_timeout_s)
        self.request_id_header = config.settings.request_id_header.lower().encode()
        self.server_timing = config.settings.server_timing
        self.metrics_path = config.settings.metrics_path
        token_env = config.settings.metrics_token_env  # (set and checked by load_config)
        self._metrics_token = os.environ[token_env].strip().encode() if token_env else None
        self.metrics = RequestMetrics(config.models, directory=os.environ.get(METRICS_DIR_ENV)) \
            if self.metrics_path is not None else None
        self._snapshots: asyncio.Task[None] | None = None
        self.tracing = tracing_from(config.settings.tracer_provider)
        self._meter_provider = config.settings.meter_provider
        self._owns_meter_provider = False
        if self.metrics is not None and self._meter_provider is None and otlp_exporter_wanted():
            self._meter_provider, self._owns_meter_provider = otlp_meter_provider(), True
        self.components = stack_components(app)
        check_stack(self.components, config)
        self._models_openai = orjson.dumps(self._model_list_openai(list(config.models)))
        self._models_anthropic = orjson.dumps(self._model_list_anthropic(list(config.models)))
        # With a layer that says who the caller is, the model list goes down the stack to it.
        self._models_guarded = any(getattr(component, "identifies_caller", False) is True
                                   for component in self.components)
        self._body_after_auth = body_after_auth(self.components)
        self._ready_checks = ReadinessChecks(self.components)
        self._started = False
        self._start_lock = asyncio.Lock()
        self._lazy_start: asyncio.Task[None] | None = None  # (see `_start_lazily`)
        # Called once the server's lifespan startup has completed (see gateway/asgi.py).
        self.after_startup: list[Callable[[], object]] = []

    # -- lifecycle ---------------------------------------------------------------------------

    async def startup(self) -> None:
        """Opens every component's resources, innermost first (idempotent). When one fails
        to start (or the start is cancelled), those already started are shut down again,
        outermost first, and its error is raised."""
        async with self._start_lock:
            if self._started:
                return
            started: list[Any] = []
            try:
                for component in reversed(self.components):
                    start = getattr(component, "startup", None)
                    if callable(start):
                        await start()
                        started.append(component)
                self._start_own()
            except BaseException:  # (CancelledError too: re-raised once the rollback is done)
                await self._stop_snapshots()
                for component in reversed(started):  # (outermost first)
                    await stop_after_failed_start(component)
                raise
            self._started = True

    def _start_own(self) -> None:
        if self._writes_snapshots:
            self._snapshots = asyncio.create_task(self._write_snapshots(),
                                                  name="sluicegate-metrics-snapshots")
        if self.metrics is not None and self._meter_provider is not None:
            register_otlp(self.metrics, self._gauges, self._meter_provider)

    async def _stop_snapshots(self) -> None:
        if self._snapshots is not None:
            self._snapshots.cancel()
            await asyncio.gather(self._snapshots, return_exceptions=True)
            self._snapshots = None

    async def shutdown(self) -> None:
        """Closes resources in the reverse order of startup: outermost first. A start on a
        request that is still under way (`_start_lazily`) is cancelled: it shuts down what it
        had started. With several workers, the metrics snapshot is written one last time
        first: the requests a draining worker ended since its timer's last one still count."""
        starting, self._lazy_start = self._lazy_start, None
        if starting is not None and not starting.done():
            starting.cancel()
            await asyncio.wait([starting])
        async with self._start_lock:
            if not self._started:
                return
            self._started = False
            self._ready_checks.abandon()
            if self._owns_meter_provider:
                self._meter_provider.shutdown()  # the last export
                self._owns_meter_provider, self._meter_provider = False, None
            if self.tracing is not None:
                self.tracing.flush()  # (the batch's last spans; not only at process exit)
            await self._stop_snapshots()
            if self._writes_snapshots:
                self._write_snapshot()
            failed: BaseException | None = None
            for component in self.components:  # each, though one before it failed (its
                stop = getattr(component, "shutdown", None)  # pools and tasks left open)
                if not callable(stop):
                    continue
                try:
                    await stop()
                except Exception as exc:
                    logger.exception("shutdown of %s failed", type(component).__name__)
                    failed = failed or exc
            if failed is not None:
                raise failed

    @asynccontextmanager
    async def lifespan(self) -> AsyncIterator[Kernel]:
        """For host apps that own the lifespan: `async with gateway.lifespan(): yield`."""
        await self.startup()
        try:
            yield self
        finally:
            await self.shutdown()

    async def _serve_lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:
                    logger.exception("startup failed")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                for hook in self.after_startup:
                    hook()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                try:
                    await self.shutdown()
                except Exception as exc:  # noqa: BLE001 (each was logged as it failed)
                    await send({"type": "lifespan.shutdown.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.shutdown.complete"})
                return

    # -- requests ----------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._serve_lifespan(receive, send)
            return
        if scope["type"] != "http":
            await send({"type": "websocket.close", "code": 1003})
            return
        if not self._started and not await self._start_lazily(scope, send):
            return
        path = route_path(scope)
        operation = OPERATIONS_BY_PATH.get(path)
        if operation is None:
            if path.startswith("/admin/") or path == SELF_USAGE_PATH or (
                    self._models_guarded and is_models_path(path)):
                await self._serve_by_layers(scope, receive, send, path)
            else:
                await self._serve_builtin(scope, path, receive, send)
            return
        callers = _callers_request_id(scope["headers"], self.request_id_header)
        # (`_new_request_id`, inline: a call frame on every request)
        request_id = callers if callers is not None else b"%032x" % _random_bits(128)
        api_format = api_format_of(operation)
        try:
            ctx = await self._make_context(scope, receive, operation, api_format, request_id)
            if callers is not None:  # (it may come with other requests: see `unique_id`)
                ctx.unique_id = f"{ctx.request_id}.{_random_bits(64):016x}"
        except GatewayError as exc:
            if self.metrics is not None:  # (no layer saw it: counted here)
                self.metrics.refused(exc.status, operation)
            await self._send_error(send, exc, api_format, request_id)
            return
        except ClientDisconnected:  # gone while sending the body: nobody to answer
            return
        scope[CONTEXT_KEY] = ctx
        if self.tracing is not None:
            ctx.trace = self.tracing.start(ctx)
        ids = REQUEST_IDS.set((ctx.request_id, ctx.trace.trace_id if ctx.trace else None))
        try:
            await self._run_stack(scope, receive, send, ctx)
        finally:
            REQUEST_IDS.reset(ids)

    async def _start_lazily(self, scope: Scope, send: Send) -> bool:
        """Mounted in a host that never forwards lifespan: start on the first request. The
        start runs in a task of its own, which the requests that arrive meanwhile wait for, a
        client gone does not cancel, and `shutdown` does; after a failed one, the next
        request tries again."""
        starting = self._lazy_start
        if starting is None or starting.done():
            starting = self._lazy_start = asyncio.create_task(
                self._start_for_requests(), name="sluicegate-lazy-startup")
            starting.add_done_callback(_retrieved)  # (logged already: its waiters may be gone)
        await asyncio.wait([starting])
        if not starting.cancelled() and starting.exception() is None:
            return True
        error = GatewayError(503, "The gateway could not start; see its log.")
        api_format = guess_api_format(route_path(scope), scope["headers"])
        await self._send_error(send, error, api_format,
                               _request_id(scope["headers"], self.request_id_header))
        return False

    async def _start_for_requests(self) -> None:
        try:
            await self.startup()
        except Exception:
            logger.exception("startup failed")
            raise

    async def _make_context(
        self, scope: Scope, receive: Receive, operation: str, api_format: str, request_id: bytes
    ) -> RequestContext:
        deadline = self._body_deadline()
        if scope["method"] != "POST":
            await self._drain(receive, deadline)
            raise GatewayError(405, f"Method {scope['method']} is not allowed here; use POST.",
                               headers=[(b"allow", b"POST")])
        try:
            content_length = self._check_headers(scope["headers"])
        except GatewayError:
            await self._drain(receive, deadline)  # (see `_send_error`)
            raise
        if content_length is not None and content_length > self.max_body_bytes:
            await self._drain(receive, deadline)  # so the client reads the 413
            raise self._too_large()
        raw = await self._read_body(receive, deadline)
        text = request_id.decode()
        ctx = RequestContext(
            request_id=text, unique_id=text, operation=operation, api_format=api_format,
            body={}, raw_body=raw, model="", stream=False, headers=scope["headers"],
            models=self.config.models,
        )
        if self._body_after_auth:  # parsed once the caller is checked (`body_after_auth`)
            ctx.body_parser = self._parse_body
        else:
            self._parse_body(ctx)
        return ctx

    def _parse_body(self, ctx: RequestContext) -> None:
        """Parses and checks the body (`RequestContext.parse_body` when the kernel left it
        unparsed): fills in `body`, `model` and `stream`, or raises the 4xx it gets."""
        try:
            body = orjson.loads(ctx.raw_body)
        except orjson.JSONDecodeError as exc:
            raise GatewayError(400, f"The request body is not valid JSON: {exc}.") from None
        if nesting_exceeds(ctx.raw_body, body):
            raise too_deep()
        ctx.model, ctx.stream = check_body(ctx.operation, body, self.config.models)
        ctx.body = body
        if ctx.trace is not None:
            ctx.trace.read_request(ctx)

    def _check_headers(self, headers: list[tuple[bytes, bytes]]) -> int | None:
        content_length = None
        for name, value in headers:
            if name == b"content-type":
                media_type = value.split(b";", 1)[0].strip().lower()
                if media_type != b"application/json":
                    raise GatewayError(
                        415, f"Content-Type must be application/json, not "
                             f"{media_type.decode('latin-1')!r}.")
            elif name == b"content-length":
                content_length = int(value) if value.isdigit() else None
            elif name == b"content-encoding" and value.strip().lower() not in (b"", b"identity"):
                # RFC 9110 15.5.16: 415 for a content coding the server does not take, with
                # Accept-Encoding saying which it does. Read as JSON, a gzipped body would be
                # a 400 about invalid UTF-8.
                raise GatewayError(
                    415, f"Content-Encoding {value.strip().decode('latin-1')!r} is not "
                         "supported: send the request body uncompressed.",
                    headers=[(b"accept-encoding", b"identity")])
        return content_length

    def _too_large(self) -> GatewayError:
        return GatewayError(413, f"The request body exceeds {self.max_body_bytes} bytes.",
                            code="request_too_large")

    def _body_deadline(self) -> float | None:
        """When a request's body must have arrived whole (`Settings.body_timeout_s` from the
        request's start, `time.monotonic`); None: no deadline."""
        bodies = self._bodies
        return None if bodies is None else bodies.deadline()

    def _body_timed_out(self) -> GatewayError:
        # RFC 9110 15.5.9: a server that sends 408 should close the connection (hypercorn
        # closes it anyway: the body never ended).
        return GatewayError(408, f"The request body did not arrive within "
                                 f"{self.body_timeout_s:g} s of the request's start.",
                            code="request_timeout", headers=[(b"connection", b"close")])

    def _within(self, deadline: float | None) -> AbstractContextManager[None]:
        """A read that raises TimeoutError once `deadline` passes (one timer for all
        requests, `gateway.body_deadline`: none of its own); no deadline: a plain read."""
        bodies = self._bodies
        return _NO_DEADLINE if bodies is None or deadline is None else bodies.within(deadline)

    async def _drain(self, receive: Receive, deadline: float | None,
                     message: Message | None = None) -> None:
        """`drain_body` for a refusal made before the body was read, until `deadline`: the
        refusal goes out then whatever is left unsent (and the connection is closed)."""
        try:
            with self._within(deadline):
                await drain_body(receive, message)
        except TimeoutError:
            pass

    async def _read_body(self, receive: Receive, deadline: float | None) -> bytes:
        """The whole body, by `deadline` (else 408), at most `max_body_bytes` (else 413)."""
        bodies = self._bodies
        if bodies is None or deadline is None:
            body = await self._receive_body(receive)
        else:  # (`_within` spelled out: ~4k instructions less on every request's body read)
            task = bodies.enter(deadline)
            try:
                body = await self._receive_body(receive)
            except asyncio.CancelledError:
                if not bodies.expired(task):
                    raise
                raise self._body_timed_out() from None
            finally:
                bodies.leave(task)
        if not isinstance(body, bytes):  # the message that went past max_body_bytes
            await self._drain(receive, deadline, body)  # so the client reads the 413
            raise self._too_large()
        return body

    async def _receive_body(self, receive: Receive) -> bytes | Message:
        """The body's bytes, or the message that took it past `max_body_bytes`."""
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected()
        body: bytes = message.get("body", b"")
        if not message.get("more_body", False):
            return body if len(body) <= self.max_body_bytes else message
        chunks, size = [body], len(body)
        while message.get("more_body", False):
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnected()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return message
            chunks.append(chunk)
        return b"".join(chunks)

    async def _run_stack(self, scope: Scope, receive: Receive, send: Send,
                         ctx: RequestContext) -> None:
        request_id = ctx.request_id.encode()
        started = False
        server_timing = self.server_timing

        def send_with_request_id(message: Message) -> Awaitable[None]:
            # Not a coroutine function: it returns the server's `send` for the caller to
            # await, so each message (a stream's every event) costs no coroutine of its own.
            nonlocal started
            if message["type"] == "http.response.start":
                if started:
                    raise RuntimeError("a layer sent a second response start")
                started = True
                ctx.status = message["status"]
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", request_id),
                                      *ctx.response_headers]
                if server_timing:
                    elapsed_ms = (time.monotonic() - ctx.started_monotonic) * 1000
                    message["headers"].append((b"server-timing", b"gateway;dur=%.3f" % elapsed_ms))
            elif not message.get("more_body", False):
                ctx.response_ended = True
            return send(message)

        metrics = self.metrics
        if metrics is not None:
            metrics.in_flight += 1
        try:
            await self.app(scope, receive, send_with_request_id)
        except GatewayError as exc:
            ctx.status = exc.status
            ctx.error_type = ctx.error_type or exc.type_for(ctx.api_format)
            if not started:
                await self._send_error(send, exc, ctx.api_format, request_id,
                                       ctx.response_headers)
        except ClientDisconnected:
            ctx.client_disconnected = True
        except asyncio.CancelledError:
            # The server cancelled the request (the grace period of its shutdown ran out, or
            # its connection was torn down): an answer it cut short is no success.
            if started and not ctx.response_ended and not ctx.client_disconnected:
                ctx.error_type = ctx.error_type or "cancelled"
            raise
        except Exception:
            logger.exception("unhandled error in request %s", ctx.request_id)
            ctx.status, ctx.error_type = 500, "internal_error"
            if not started:
                error = GatewayError(500, "The gateway failed to handle this request; "
                                          f"request id {ctx.request_id}.")
                await self._send_error(send, error, ctx.api_format, request_id)
        finally:
            if metrics is not None:
                metrics.in_flight -= 1
                metrics.record(ctx, time.monotonic())
            if ctx.trace is not None:
                ctx.trace.end(ctx)
            if ctx.operation == OPENAI_RESPONSES:  # (its follow-ups are billed it as input)
                remember_conversation(ctx)
            if ctx.on_end is not None:
                _run_end_hooks(ctx)

    async def _send_error(self, send: Send, error: GatewayError, api_format: str,
                          request_id: bytes, extra: Sequence[tuple[bytes, bytes]] = ()) -> None:
        """Sends `error`. A refusal made before the request's body was read is sent once the
        body is drained (`drain_body`): answered first, hypercorn (h11) does not recycle the
        connection when the body arrives, and the client, still sending, may find it reset."""
        status, headers, body = error.render(api_format)
        headers.append((b"x-request-id", request_id))
        headers.extend(extra)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    # -- requests the kernel answers itself --------------------------------------------------

    async def _serve_by_layers(self, scope: Scope, receive: Receive, send: Send,
                               path: str) -> None:
        """/admin/ requests and /v1/usage/self go down the stack without a context; the layer
        that owns the path answers (auth: keys and limits; quota and metering: usage), and
        nobody answering is a 404. So does the model list when an auth layer is configured:
        it lets the caller through, and the kernel answers with the models its key may use."""
        request_id = _request_id(scope["headers"], self.request_id_header)
        api_format = guess_api_format(path, scope["headers"]) if is_models_path(path) \
            else "openai"
        started = False
        body_read = False
        deadline = self._body_deadline()

        async def receive_tracked() -> Message:
            nonlocal body_read
            if body_read:  # (what is left to receive is the client's disconnect: no deadline)
                return await receive()
            try:
                with self._within(deadline):
                    message = await receive()
            except TimeoutError:
                raise self._body_timed_out() from None
            body_read = not message.get("more_body", False)
            return message

        async def send_tracked(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                if not body_read:  # (a layer's refusal from the headers: see `_send_error`)
                    await self._drain(receive, deadline)
                started = True
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", request_id)]
            await send(message)

        try:
            await self.app(scope, receive_tracked, send_tracked)
        except GatewayError as exc:
            if not started:
                await self._send_error(send, exc, api_format, request_id)
            return
        except ClientDisconnected:
            return
        except Exception:
            logger.exception("unhandled error in request %s", request_id.decode())
            if not started:
                await self._send_error(send, GatewayError(500, "The request failed; see the "
                                                               "gateway log."),
                                       api_format, request_id)
            return
        if not started and not body_read:
            await self._drain(receive, deadline)
        if not started and is_models_path(path):
            await self._send_models(scope, path, send, request_id, scope.get(PRINCIPAL_KEY))
        elif not started:
            message = (f"Unknown admin path {path!r} (is the layer that serves it configured "
                       "with an admin token?)." if path.startswith("/admin/") else
                       f"{path} is not served: this gateway has no metering layer.")
            error = GatewayError(404, message, code="unknown_url")
            await self._send_error(send, error, api_format, request_id)

    async def _serve_builtin(self, scope: Scope, path: str, receive: Receive,
                             send: Send) -> None:
        request_id = _request_id(scope["headers"], self.request_id_header)
        if scope["method"] not in ("GET", "HEAD"):  # (a body: refused, drained first)
            await self._drain(receive, self._body_deadline())
        if is_models_path(path):
            await self._send_models(scope, path, send, request_id, None)
        elif path == self.metrics_path and self.metrics is not None:
            if self._metrics_token is not None and \
                    not bearer_is(scope["headers"], self._metrics_token):
                error = GatewayError(401, "The metrics need the metrics token: send it as "
                                          "'Authorization: Bearer <token>'.",
                                     code="invalid_metrics_token")
                await self._send_error(send, error, "openai", request_id,
                                       [(b"www-authenticate", b"Bearer")])
                return
            body = self.metrics.exposition(self._gauges())
            await self._send_json(send, 200, body, request_id, scope,
                                  content_type=METRICS_CONTENT_TYPE)
        elif path == "/healthz":
            await self._send_json(send, 200, b'{"status":"ok"}', request_id, scope)
        elif path == "/readyz":
            status, body = await self._readiness()
            await self._send_json(send, status, body, request_id, scope)
        else:
            api_format = guess_api_format(path, scope["headers"])
            error = GatewayError(404, f"Unknown path {path!r}.", code="unknown_url")
            await self._send_error(send, error, api_format, request_id)

    def _gauges(self) -> list[Sample]:
        """What the layers report at scrape time (`metric_samples()`), never failing a scrape."""
        samples: list[Sample] = []
        for component in self.components:
            collect = getattr(component, "metric_samples", None)
            if callable(collect):
                try:
                    samples.extend(collect())
                except Exception:
                    logger.exception("metric_samples() of %s failed", type(component).__name__)
        return samples

    @property
    def _writes_snapshots(self) -> bool:
        return self.metrics is not None and self.metrics.directory is not None

    async def _write_snapshots(self) -> None:
        """Several workers: this one's metrics on disk for the others' scrapes, every second
        (and once more at shutdown, after its last request: see `shutdown`)."""
        while True:
            await asyncio.sleep(SNAPSHOT_INTERVAL_S)
            self._write_snapshot()

    def _write_snapshot(self) -> None:
        assert self.metrics is not None
        try:
            self.metrics.write_snapshot(self._gauges())
        except OSError as exc:
            logger.warning("cannot write the metrics snapshot: %s", exc)
        except Exception:
            logger.exception("counting the metrics failed")

    async def _send_json(self, send: Send, status: int, body: bytes, request_id: bytes,
                         scope: Scope, content_type: bytes = b"application/json") -> None:
        if await self._refused_method(scope, send, request_id):
            return
        headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode()),
                   (b"x-request-id", request_id)]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body",
                    "body": b"" if scope["method"] == "HEAD" else body})

    async def _refused_method(self, scope: Scope, send: Send, request_id: bytes) -> bool:
        """Sends the 405 for a method other than GET and HEAD; True when it did."""
        if scope["method"] in ("GET", "HEAD"):
            return False
        error = GatewayError(405, f"Method {scope['method']} is not allowed here; use GET "
                                  "or HEAD.", code="method_not_allowed",
                             headers=[(b"allow", b"GET, HEAD")])
        await self._send_error(send, error, "openai", request_id)
        return True

    async def _readiness(self) -> tuple[int, bytes]:
        """{store name: "ok" | problem} from each component with a `check_ready()`."""
        checks = await self._ready_checks.report()
        # "degraded: ..." is still ready: the gateway serves (e.g. known keys from its cache
        # while PostgreSQL is down); taking every pod out of the balancer would be worse.
        ready = self._started and all(value == "ok" or value.startswith("degraded")
                                      for value in checks.values())
        payload = {"status": "ready" if ready else "not ready", "started": self._started,
                   "checks": checks}
        return (200 if ready else 503), orjson.dumps(payload)

    async def _send_models(self, scope: Scope, path: str, send: Send, request_id: bytes,
                           caller: Mapping[str, Any] | None) -> None:
        """The model list, or the one model its path names, in the caller's shape
        (Anthropic's when it sent anthropic-version), of the models `caller`'s key may use
        (every model: no caller, or a key without allowed models)."""
        anthropic = any(name == b"anthropic-version" for name, _ in scope["headers"])
        allowed = caller.get("allowed_models") if caller is not None else None
        model = model_of_path(path)
        if model is not None:
            await self._send_model(scope, send, request_id, model, anthropic, allowed)
            return
        if allowed:
            names = [name for name in self.config.models if model_allowed(allowed, name)]
            body = orjson.dumps(self._model_list_anthropic(names) if anthropic
                                else self._model_list_openai(names))
        else:
            body = self._models_anthropic if anthropic else self._models_openai
        await self._send_json(send, 200, body, request_id, scope)

    async def _send_model(self, scope: Scope, send: Send, request_id: bytes, model: str,
                          anthropic: bool, allowed: Sequence[str] | None) -> None:
        """`GET /v1/models/{model}`: the model as the list shows it; a model the list leaves
        out (unknown, or not one the key may use) is a 404, as OpenAI's own retrieve says
        of a model the caller cannot use."""
        if model not in self.config.models or (allowed and not model_allowed(allowed, model)):
            if not await self._refused_method(scope, send, request_id):
                await self._send_error(send, unknown_model(model),
                                       "anthropic" if anthropic else "openai", request_id)
            return
        body = self._model_anthropic(model) if anthropic else self._model_openai(model)
        await self._send_json(send, 200, orjson.dumps(body), request_id, scope)

    def _model_openai(self, name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": 0,
                "owned_by": self.config.models[name].owned_by}

    def _model_anthropic(self, name: str) -> dict[str, Any]:
        return {"type": "model", "id": name, "display_name": name,
                "created_at": "1970-01-01T00:00:00Z"}

    def _model_list_openai(self, names: list[str]) -> dict[str, Any]:
        return {"object": "list", "data": [self._model_openai(name) for name in names]}

    def _model_list_anthropic(self, names: list[str]) -> dict[str, Any]:
        return {
            "data": [self._model_anthropic(name) for name in names],
            "has_more": False, "first_id": names[0] if names else None,
            "last_id": names[-1] if names else None,
        }


async def stop_after_failed_start(component: Any) -> None:
    """After a failed startup (the kernel's, or a component's own part-way): the component's
    `shutdown()`, if it has one, which closes what it had opened; a failure of that is
    logged, since the startup's error is the one to raise."""
    stop = getattr(component, "shutdown", None)
    if not callable(stop):
        return
    try:
        await stop()
    except Exception:
        logger.exception("shutdown of %s failed (after a failed startup)",
                         type(component).__name__)


def _retrieved(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()


def _run_end_hooks(ctx: RequestContext) -> None:
    assert ctx.on_end is not None
    for hook in ctx.on_end:
        try:
            hook(ctx)
        except Exception:
            logger.exception("an end-of-request hook failed for request %s", ctx.request_id)
