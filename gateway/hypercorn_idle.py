"""A keep-alive connection's idle timeout on a timer, not on a task per request.

Hypercorn (0.18, asyncio) closes a connection that has been idle for `keep_alive_timeout`
with a task: each time a connection goes idle (a response has ended) it starts one that waits
on `asyncio.wait_for(context.terminated.wait(), keep_alive_timeout)`, and each time a request
arrives it cancels that task and waits for it to end. That is two tasks, a timer, two
cancellations and two lock round trips for every request on a kept-alive connection: about
12 us, as much as the rest of what hypercorn does for the request's headers, and about 5% of
what the bare passthrough costs a request on one core.

`install()` gives hypercorn's `TCPServer` an idle watch that does the same with one
`loop.call_later` handle: a connection going idle arms it, a request disarms it (a cancel),
and when it fires the connection is closed as hypercorn would close it (its own
`_initiate_server_close`, in the connection's task group, which never cancels it: hypercorn
shields it). When the worker stops (`context.terminated` is set), one task per worker closes
every idle connection at once, as hypercorn's tasks would all have woken up then; a
connection that goes idle after that is closed at once. An action that is not hypercorn's idle
timeout gets hypercorn's own task (`AsyncioSingleTask`), unchanged.

`gateway.asgi` (the app `sluicegate serve` runs) installs it. Mounted into a host's app, the
gateway leaves the host's hypercorn alone. A hypercorn without the expected pieces is left as
it is.
"""
from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("sluicegate")

__all__ = ["IdleTimer", "install", "installed"]

_idle_timeout: Callable[..., Any] | None = None  # TCPServer._idle_timeout, once installed
# Per worker context: the connections whose idle timer is armed, and the task that closes
# them all when the worker stops.
_armed: weakref.WeakKeyDictionary[Any, set[IdleTimer]] = weakref.WeakKeyDictionary()
_watchers: set[asyncio.Task[None]] = set()


def installed() -> bool:
    return _idle_timeout is not None


class IdleTimer:
    """Stands in for hypercorn's `AsyncioSingleTask` as a `TCPServer.idle_task`."""

    __slots__ = ("_fallback", "_handle", "_server", "_task_group")

    def __init__(self) -> None:
        self._handle: asyncio.TimerHandle | None = None
        self._server: Any = None
        self._task_group: Any = None
        self._fallback: Any = None  # hypercorn's own single task, for any other action

    async def restart(self, task_group: Any, action: Callable[[], Any]) -> None:
        server = getattr(action, "__self__", None)
        if server is None or getattr(action, "__func__", None) is not _idle_timeout:
            self._disarm()
            if self._fallback is None:
                from hypercorn.asyncio.worker_context import AsyncioSingleTask
                self._fallback = AsyncioSingleTask()
            await self._fallback.restart(task_group, action)
            return
        if self._fallback is not None:
            await self._fallback.stop()
        self._disarm()
        self._server, self._task_group = server, task_group
        context = server.context
        if context.terminated.is_set():  # the worker is stopping: no more idling
            self._close()
            return
        armed = _armed.get(context)
        if armed is None:
            armed = _armed[context] = set()
            _watch(server.loop, context, armed)
        armed.add(self)
        self._handle = server.loop.call_later(server.config.keep_alive_timeout, self._fire)

    async def stop(self) -> None:
        self._disarm()
        if self._fallback is not None:
            await self._fallback.stop()

    def _disarm(self) -> None:
        handle = self._handle
        if handle is not None:
            handle.cancel()
            self._handle = None
            armed = _armed.get(self._server.context)
            if armed is not None:
                armed.discard(self)

    def _fire(self) -> None:
        self._disarm()
        self._close()

    def _close(self) -> None:
        server, task_group = self._server, self._task_group
        close = server._initiate_server_close()
        try:
            task_group._task_group.create_task(close)
        except RuntimeError:  # the connection's task group has ended: it is closed already
            close.close()


def _watch(loop: asyncio.AbstractEventLoop, context: Any, armed: set[IdleTimer]) -> None:
    """Closes every idle connection of a worker once it is told to stop."""
    async def watch() -> None:
        await context.terminated.wait()
        for timer in list(armed):
            timer._fire()

    task = loop.create_task(watch(), name="sluicegate-idle-connections")
    _watchers.add(task)
    task.add_done_callback(_watchers.discard)


def install() -> bool:
    """Gives hypercorn's connections the timer (once); False when hypercorn is not the shape
    this was written against, and then nothing changes."""
    global _idle_timeout
    if _idle_timeout is not None:
        return True
    try:
        from hypercorn.asyncio import tcp_server, worker_context
    except ImportError:
        return False
    server_class = getattr(tcp_server, "TCPServer", None)
    found = getattr(server_class, "_idle_timeout", None)
    if found is None or not hasattr(server_class, "_initiate_server_close") \
            or getattr(tcp_server, "AsyncioSingleTask", None) \
            is not getattr(worker_context, "AsyncioSingleTask", None):
        logger.info("hypercorn: idle connections keep hypercorn's own timeout task")
        return False
    tcp_server.AsyncioSingleTask = IdleTimer  # type: ignore[assignment,attr-defined]
    _idle_timeout = found
    return True
