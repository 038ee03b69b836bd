"""`/readyz`: every component's `check_ready()` at once, under one deadline.

A Kubernetes readiness probe gives up after its `timeoutSeconds` (5 s in deploy/k8s) and takes
the pod out of the Service. A store that hangs (accepts TCP and never answers: a partition
that drops packets, a stuck server) must not do that to every pod at once while they serve,
any more than a store that refuses connections does ("degraded" is still ready). So the
checks run concurrently, and one without an answer within `READY_DEADLINE_S` is reported
"degraded: no answer within 3 s". It is not awaited further (psycopg, cancelled, waits up to
10 s for the server to cancel the query): it is left to end on its own, and the next probe
awaits the same check instead of starting another, so a store that never answers holds one
check in flight, not one per probe.
"""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

__all__ = ["READY_DEADLINE_S", "STORE_CHECK_TIMEOUT_S", "ReadinessChecks", "postgres_answers"]

READY_DEADLINE_S = 3.0       # every check's answer, well inside the probe's 5 s
STORE_CHECK_TIMEOUT_S = 2.0  # what a store's own check_ready waits for its server

Check = Callable[[], Awaitable[dict[str, str]]]


class ReadinessChecks:
    """The `check_ready()` of each component that has one, and the checks still running."""

    def __init__(self, components: Sequence[Any]) -> None:
        self._checks: list[tuple[str, Check]] = [
            (type(component).__name__, component.check_ready) for component in components
            if callable(getattr(component, "check_ready", None))]
        self._in_flight: dict[int, asyncio.Task[dict[str, str]]] = {}

    async def report(self) -> dict[str, str]:
        """{store name: "ok" | problem}; "error: ..." for a check that raised."""
        tasks = [self._running(index, check) for index, (_, check) in enumerate(self._checks)]
        if tasks:
            await asyncio.wait(tasks, timeout=READY_DEADLINE_S)
        report: dict[str, str] = {}
        for (name, _), task in zip(self._checks, tasks, strict=True):
            report.update(_outcome(name, task))
        return report

    def abandon(self) -> None:
        """At shutdown: the checks still running are cancelled (not awaited: see above)."""
        for task in self._in_flight.values():
            task.cancel()
        self._in_flight.clear()

    def _running(self, index: int, check: Check) -> asyncio.Task[dict[str, str]]:
        task = self._in_flight.get(index)
        if task is None or task.done():
            task = self._in_flight[index] = asyncio.create_task(
                _ask(check), name=f"sluicegate-readiness-{self._checks[index][0]}")
            task.add_done_callback(_retrieved)
        return task


async def postgres_answers(dsn: str, application_name: str) -> None:
    """Returns once PostgreSQL at `dsn` completes a new connection's handshake; raises a
    psycopg error, OSError or TimeoutError (after `STORE_CHECK_TIMEOUT_S`) otherwise. A
    connection of the check's own: a pool's or a writer's may be held by a statement the
    server never answers, and a cancelled statement waits (psycopg: up to 10 s) for the
    server to cancel it, where a handshake that times out is dropped at once."""
    import psycopg  # (not at import: a gateway without PostgreSQL runs without psycopg)
    async with asyncio.timeout(STORE_CHECK_TIMEOUT_S):
        conn = await psycopg.AsyncConnection.connect(
            dsn, connect_timeout=max(2, int(STORE_CHECK_TIMEOUT_S)),  # (libpq's least)
            application_name=application_name)
    await conn.close()


async def _ask(check: Check) -> dict[str, str]:
    # (a coroutine of ours: a check_ready that raises before it awaits fails the task only)
    return await check()


def _outcome(name: str, task: asyncio.Task[dict[str, str]]) -> dict[str, str]:
    if not task.done():
        return {name: f"degraded: no answer within {READY_DEADLINE_S:g} s"}
    if task.cancelled():  # (the gateway is shutting down)
        return {name: "error: cancelled"}
    error = task.exception()
    if isinstance(error, TimeoutError):  # the check's own timeout: a hang, as above
        return {name: "degraded: no answer in time"}
    if error is not None:
        return {name: f"error: {type(error).__name__}"}
    return task.result()


def _retrieved(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()
