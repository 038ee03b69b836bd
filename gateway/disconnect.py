"""Cancelling upstream work when the client goes away.

While the passthrough waits on a provider, a watcher waits on `receive()`; `http.disconnect`
cancels the serving task, and the cancellation is turned into `ClientDisconnected` so layers
above can record a partial request with ordinary exception handling.
"""
from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable, Coroutine

from gateway.context import RequestContext
from gateway.errors import ClientDisconnected

Receive = Callable[[], Awaitable[dict[str, Any]]]


async def run_until_disconnect(
    work: Coroutine[Any, Any, None], receive: Receive, ctx: RequestContext
) -> None:
    """Awaits `work`; raises ClientDisconnected if the client disconnects first."""
    task = asyncio.current_task()
    assert task is not None
    watching = True

    def on_message(received: asyncio.Future[dict[str, Any]]) -> None:
        # Runs in a later loop step; `watching` is False once `work` has ended, so a late
        # disconnect never cancels whatever the task does next.
        if not watching or received.cancelled() or received.exception() is not None:
            return
        if received.result().get("type") == "http.disconnect":
            ctx.client_disconnected = True
            task.cancel()

    watcher = asyncio.ensure_future(receive())
    watcher.add_done_callback(on_message)
    try:
        await work
    except asyncio.CancelledError:
        if ctx.client_disconnected and task.uncancel() == 0:
            raise ClientDisconnected() from None
        raise
    finally:
        watching = False
        watcher.cancel()
