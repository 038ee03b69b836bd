"""Hedged calls: a second deployment is called when the first is slow to start answering.

The first call starts at once. If its response has not started after `Route.hedge_after_s`,
a second deployment is called too (it needs the retry budget, like any retry). The first of
the two to start its response wins; the other is cancelled then, which closes its upstream
connection. Each call runs in its own task with its own copy of the request context, so the
two never write the same fields; the winner's fields are copied back, and both calls'
attempts put in `ctx.attempts`, before its last message goes up: a layer above may record
the request as it passes (the metering layer's durability="response"). The response headers
stay the request's: what a layer below puts on them (the quota layer's, listed below this
one) is on the response whichever call wins; so do the hooks a layer below adds to run once
the request has ended (`RequestContext.on_end`: the quota layer's settle), which run
whichever call added them. A call that failed while the other went on to answer counts
against its deployment, but never replaces the answer (nor its metering). Each call is held
to the route's TTFT timeout, and the winner's stream continued when it breaks, as an
unhedged call.

Limits: a provider may bill the loser's input tokens even though it was cancelled before its
first byte; those are not in the usage record (nobody told us how many there were).
"""
from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import MutableMapping
from typing import TYPE_CHECKING, Any

from gateway.context import CONTEXT_KEY, RequestContext, Rerouted
from gateway.errors import (
    ClientDisconnected,
    StreamInterrupted,
    UntranslatableRequest,
    UpstreamError,
)
from gateway.layers import Message, Receive, Scope, Send
from middleware.failover.routing import DeploymentState, KeyState, Tried, route_headers

if TYPE_CHECKING:
    from middleware.failover import FailoverMiddleware
    from middleware.failover.continuation import Transcript
    from middleware.failover.policy import Route

__all__ = ["Hedge", "HedgeFailed"]

# What the winning call wrote into its context copy, and goes back into the request's.
_RESULT_FIELDS = ("deployment", "provider_key", "served_deployment", "served_model", "provider",
                  "usage", "first_byte_s", "first_event", "sent_json", "error_type",
                  "stream_error", "client_disconnected", "response_model", "finish_reasons")


class HedgeFailed(Exception):
    """Both hedged calls failed before answering (their failures are recorded)."""

    def __init__(self, next_chain: list[str] | None) -> None:
        super().__init__("both hedged calls failed")
        self.next_chain = next_chain


class _Lost(Exception):
    """Raised inside the slower call when it tries to start a response."""


class Hedge:
    """One request's race between two deployments (see the module docstring)."""

    def __init__(self, layer: FailoverMiddleware, scope: Scope, receive: Receive, send: Send,
                 ctx: RequestContext, route: Route, tried: Tried,
                 fallback_model: str | None) -> None:
        self.layer, self.scope, self.send, self.ctx = layer, scope, send, ctx
        self.route, self.tried, self.fallback_model = route, tried, fallback_model
        if ctx.on_end is None:  # (the copies share the request's list: `_launch`)
            ctx.on_end = []
        self.attempts_before = len(ctx.attempts)  # (the calls' attempts go after these)
        self.receive = _SharedReceive(receive)
        self.winner: asyncio.Task[None] | None = None
        self.hedged: asyncio.Task[None] | None = None  # the second call, when it was made
        self.started = asyncio.Event()
        self.copies: dict[asyncio.Task[None], RequestContext] = {}
        self.began: dict[asyncio.Task[None], float] = {}
        self.transcripts: dict[asyncio.Task[None], Transcript | None] = {}

    async def run(self, first: tuple[DeploymentState, KeyState | None],
                  second: tuple[DeploymentState, KeyState | None]) -> None:
        calls = {self._launch(*first): first}
        try:
            await self._wait_start_or_end(calls, self.route.hedge_after_s)
            if not self.started.is_set() and not all(task.done() for task in calls) and \
                    self.layer.may_hedge(self.tried):
                self.hedged = self._launch(*second)
                calls[self.hedged] = second
            else:
                second[0].release(self.tried.rate_limited)
                if second[1] is not None:
                    second[1].breaker.release()
            await self._finish(calls)
        finally:
            for task in calls:
                if not task.done():
                    task.cancel()
            self.receive.close()

    def _launch(self, state: DeploymentState, key: KeyState | None) -> asyncio.Task[None]:
        self.tried.attempts += 1
        if self.fallback_model is not None:
            self.layer.count_fallback(self.ctx, 1)
        number = self.tried.attempts
        copy = dataclasses.replace(self.ctx, attempts=[], deployment=state.deployment,
                                   provider_key=None if key is None else key.key)
        scope = dict(self.scope)
        scope[CONTEXT_KEY] = copy
        extra = route_headers(state, number, self.fallback_model)
        task: asyncio.Task[None]

        async def send_if_first(message: Message) -> None:
            if message["type"] == "http.response.start":
                if self.winner is not None and self.winner is not task:
                    raise _Lost()
                self.winner = task
                self.tried.started = True
                self.started.set()
                for other in self.copies:  # (now: no attempt of theirs comes after this)
                    if other is not task:
                        other.cancel()
                self._copy_back(copy)
                self.tried.set_headers(self.ctx, extra)  # the kernel adds them to this start
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                # A layer above may record the request as its last message passes (metering's
                # durability="response"): the call's usage and every attempt are in by then.
                self._copy_back(copy)
                self._gather_attempts()
            await self.send(message)

        # Each call as an unhedged attempt makes it: the TTFT timeout, and continuation.
        send, transcript = self.layer.continuable(send_if_first, copy, self.route)

        async def call() -> None:
            state.started(self.tried.rate_limited)
            try:
                await self.layer.call(scope, self.receive, send, copy, self.route, state)
            finally:
                state.finished(copy.usage)

        task = asyncio.ensure_future(call())
        self.began[task] = time.monotonic()
        self.copies[task] = copy
        self.transcripts[task] = transcript
        return task

    async def _wait_start_or_end(self, calls: dict[asyncio.Task[None], Any],
                                 timeout_s: float | None) -> None:
        started = asyncio.ensure_future(self.started.wait())
        try:
            await asyncio.wait([*calls, started], timeout=timeout_s,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            started.cancel()

    async def _finish(self, calls: dict[asyncio.Task[None], tuple[DeploymentState,
                                                                     KeyState | None]]) -> None:
        pending = set(calls)
        while pending and self.winner is None:
            await self._wait_start_or_end({task: None for task in pending}, None)
            pending = {task for task in pending if not task.done()}
        await asyncio.wait(calls)  # (the loser was cancelled when the winner started)
        self._gather_attempts()
        next_chain: list[str] | None = None
        answer: UpstreamError | None = None  # a failure that goes back to the caller as it is
        other: BaseException | None = None  # a refusal from below, or the client went away
        rerouted: Rerouted | None = None  # a layer below sent the request to another model
        for task, (state, key) in calls.items():
            error = task.exception() if not task.cancelled() else None
            if task is self.winner:
                continue
            if isinstance(error, UpstreamError):
                try:
                    next_chain = self.layer.after_failure(error, state, key, self.tried,
                                                          self.ctx) or next_chain
                except UpstreamError as refusal:  # the caller's, unless the other call answered
                    answer = refusal
                continue
            # Cancelled as the loser, lost the race, refused by its adapter before any call,
            # or ended otherwise: no verdict on health.
            state.release(self.tried.rate_limited)
            if key is not None:
                key.breaker.release()
            if isinstance(error, (UntranslatableRequest, Rerouted)):  # no call: not an attempt
                self.tried.attempts -= 1
                if self.fallback_model is not None:
                    self.layer.count_fallback(self.ctx, -1)
                state.refused(self.tried.rate_limited)
                if task is self.hedged:
                    self.layer.hedge_not_made()
            if isinstance(error, UntranslatableRequest):  # out for this request
                self.tried.refuse(state, error)
            elif isinstance(error, Rerouted):
                rerouted = error
            elif error is not None and not isinstance(error, _Lost):
                other = error
        if self.winner is None:
            if rerouted is not None:  # (before any failure: every later call goes there)
                raise rerouted
            if answer is not None:
                raise answer
            if other is not None:
                if isinstance(other, ClientDisconnected):
                    self._client_left(calls)
                raise other
            raise HedgeFailed(next_chain)
        state, key = calls[self.winner]
        copy = self.copies[self.winner]
        if self.winner.cancelled():
            raise asyncio.CancelledError()
        error = self.winner.exception()
        self._copy_back(copy)
        if isinstance(error, StreamInterrupted):
            transcript = self.transcripts[self.winner]
            assert transcript is not None
            await self.layer.continue_broken(self.scope, self.receive, self.send, self.ctx,
                                             self.route, state, key, self.tried, transcript,
                                             error)
            return
        if error is not None:
            raise error
        self.layer.succeeded(self.ctx, state, key, self.began[self.winner])

    def _client_left(self, calls: dict[asyncio.Task[None], Any]) -> None:
        """The client left before either call answered: the request is billed as an
        unhedged call would be (`providers.base`: the input it sent, estimated), the first
        call that has such usage, in the order they were made; the other is a loser, unbilled
        (see the module docstring)."""
        for task in calls:
            copy = self.copies[task]
            if copy.usage is not None:
                self._copy_back(copy)
                break
        self.ctx.client_disconnected = True

    def _gather_attempts(self) -> None:
        """Puts the calls' attempts so far in the request's context, in the order the calls
        were made (again: the winner's last message put them there first)."""
        self.ctx.attempts[self.attempts_before:] = [
            attempt for copy in self.copies.values() for attempt in copy.attempts]

    def _copy_back(self, copy: RequestContext) -> None:
        for name in _RESULT_FIELDS:
            setattr(self.ctx, name, getattr(copy, name))
        self.ctx.status = copy.status or self.ctx.status


class _SharedReceive:
    """One `receive()` for two concurrent calls: the server delivers `http.disconnect` once,
    so both callers wait on the same message."""

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._pending: asyncio.Future[MutableMapping[str, Any]] | None = None

    async def __call__(self) -> MutableMapping[str, Any]:
        if self._pending is None:
            self._pending = asyncio.ensure_future(self._receive())
        return await asyncio.shield(self._pending)

    def close(self) -> None:
        if self._pending is not None and not self._pending.done():
            self._pending.cancel()
