"""Cancelling upstream work when the client goes away.

While the passthrough waits on a provider, a watcher waits on `receive()`; `http.disconnect`
cancels the serving task, and the cancellation is turned into `ClientDisconnected` so layers
above can record a partial request with ordinary exception handling.

The watcher starts `WATCH_AFTER_S` into the request, not at once: a task per request is the
largest single cost on the hot path, most fast calls are over before then, and a disconnect
that happened earlier is still seen at once when the watcher starts (it is queued). So the
provider call is cancelled at most `WATCH_AFTER_S` after the client left.

A disconnect that comes once the response's last message has gone out (`ctx.response_ended`)
is no client leaving: hypercorn reports one as it sends the end of every response, which a
layer that awaits after forwarding that message (an audit write) would otherwise see as a
departure, cancelling and flagging a request answered in full.
"""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, MutableMapping
from typing import Any

from gateway.context import RequestContext
from gateway.errors import ClientDisconnected

Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
WATCH_AFTER_S = 0.2


async def run_until_disconnect(
    work: Coroutine[Any, Any, None], receive: Receive, ctx: RequestContext
) -> None:
    """Awaits `work`; raises ClientDisconnected if the client disconnects first."""
    if ctx.client_disconnected:  # seen by an earlier attempt's watcher
        work.close()
        raise ClientDisconnected()
    task = asyncio.current_task()
    assert task is not None
    loop = task.get_loop()
    watching = True
    watcher: asyncio.Future[MutableMapping[str, Any]] | None = None

    def on_message(received: asyncio.Future[MutableMapping[str, Any]]) -> None:
        # Runs in a later loop step. The disconnect is always recorded (the server sends it
        # once, and a retry of `work` must see it), unless the response has ended; the task
        # is cancelled only while `work` runs, so a late disconnect never cancels whatever
        # the task does next.
        if received.cancelled() or received.exception() is not None or ctx.response_ended:
            return
        if received.result().get("type") == "http.disconnect":
            ctx.client_disconnected = True
            if watching:
                task.cancel()

    def start_watching() -> None:
        nonlocal watcher
        if watching:
            watcher = asyncio.ensure_future(receive())
            watcher.add_done_callback(on_message)

    timer = loop.call_later(WATCH_AFTER_S, start_watching)
    try:
        await work
    except asyncio.CancelledError:
        if ctx.client_disconnected and task.uncancel() == 0:
            raise ClientDisconnected() from None
        raise
    finally:
        watching = False
        timer.cancel()
        if watcher is not None:
            watcher.cancel()
