"""Deadlines for request bodies, kept by one timer for the whole process.

A client that sends its headers and then (the rest of) its body late, or never, must not hold
its connection for ever (`Settings.body_timeout_s`, from the request's start). An
`asyncio.timeout_at` around each read would give every request a timer of its own, made and
cancelled even when the body came with the headers, as it nearly always does: ~1-4 µs a
request. Here a read registers its task and deadline in a dict instead; one timer, running
only while some body is awaited, looks at them every `tick_s` and cancels the tasks whose
time is up. The read that was cancelled so (`expired`) takes the cancellation back and
answers as the deadline says (408, or a drain that gives up); any other cancellation goes on.
A late body is found up to `tick_s` late. `within(deadline)` wraps a read as
`asyncio.timeout_at` would: past the deadline, the read raises TimeoutError.
"""
from __future__ import annotations

import asyncio
from time import monotonic

__all__ = ["BodyDeadlines", "Within"]


class BodyDeadlines:
    """The tasks awaiting a request body, and until when each may."""

    __slots__ = ("_expired", "_handle", "_loop", "_reading", "tick_s", "timeout_s")

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.tick_s = min(1.0, timeout_s / 4)
        self._reading: dict[asyncio.Task[object], float] = {}
        self._expired: set[asyncio.Task[object]] = set()
        self._handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # (the timer's)

    def deadline(self) -> float:
        """The deadline of a request starting now (`time.monotonic`)."""
        return monotonic() + self.timeout_s

    def within(self, deadline: float) -> Within:
        """A context for one read: TimeoutError out of it if `deadline` passes during it."""
        return Within(self, deadline)

    def enter(self, deadline: float) -> asyncio.Task[object] | None:
        """Registers the current task as awaiting its body until `deadline`; the task, for
        `leave` and `expired` (None outside a task: nothing is watched)."""
        task = asyncio.current_task()
        if task is None:
            return None
        self._reading[task] = deadline
        if self._handle is None or self._loop is not task.get_loop():  # (a loop of its own:
            self._loop = task.get_loop()                                # a test's, a thread's)
            self._handle = self._loop.call_later(self.tick_s, self._tick)
        return task

    def leave(self, task: asyncio.Task[object] | None) -> None:
        if task is not None:
            self._reading.pop(task, None)

    def expired(self, task: asyncio.Task[object] | None) -> bool:
        """Whether the cancellation `task` is handling is this watch's (its deadline passed);
        if so, it is taken back, and the caller answers for the deadline instead."""
        if task is None or task not in self._expired:
            return False
        self._expired.discard(task)
        task.uncancel()
        return True

    def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        now = monotonic()
        for task, deadline in list(self._reading.items()):
            if task.done():  # (a loop that stopped with the task in it)
                del self._reading[task]
            elif deadline <= now and task.get_loop() is loop:
                del self._reading[task]
                self._expired.add(task)
                task.cancel()
        self._handle = loop.call_later(self.tick_s, self._tick) if self._reading else None


class Within:
    """`BodyDeadlines.within`: registers the read's task on entry, and on exit turns the
    watch's cancellation into TimeoutError (any other goes on)."""

    __slots__ = ("_bodies", "_deadline", "_task")

    def __init__(self, bodies: BodyDeadlines, deadline: float) -> None:
        self._bodies, self._deadline = bodies, deadline
        self._task: asyncio.Task[object] | None = None

    def __enter__(self) -> None:
        self._task = self._bodies.enter(self._deadline)

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: object) -> None:
        self._bodies.leave(self._task)
        if kind is asyncio.CancelledError and self._bodies.expired(self._task):
            raise TimeoutError from None
