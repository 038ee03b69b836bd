"""The worker processes of `sluicegate serve --workers N`, and reloads that never stop serving.

hypercorn's own multi-worker loop reloads (SIGHUP) by stopping every worker, waiting until
their last requests have ended, and only then starting new ones. While a long stream drains
(minutes, for some LLM calls), no worker accepts: new requests wait in the listen backlog.

Here a reload starts the new workers first, beside the old ones, on the same listening
sockets. Each new worker loads the config and runs its startup, then says it is ready (a
file named by its pid in `$SLUICEGATE_READY_DIR`, written by gateway/asgi.py), next to the
config text it loaded (`<pid>.config`: a candidate). Once all are ready, the generation is
accepted: the supervisor makes its config the last good one, and the old workers are told
to stop accepting and to drain: their requests in flight end normally, up to hypercorn's
`graceful_timeout`. If the new workers do not all come up within `start_timeout_s`, they
are stopped, the old ones go on serving, the last good config stays as it was (the one they
serve), and the error is logged. The first start's workers are accepted so too, once all
are ready.

SIGTERM or SIGINT: every worker stops accepting and drains, then `serve` exits. A worker that
dies while serving (a crash, the OOM killer) is replaced, and the others serve on. The
replacement loads the config the running workers loaded (`$SLUICEGATE_CONFIG_LAST_GOOD`, which
only the supervisor writes), not the file as it is now: an edit not yet reloaded, or a reload
that was rejected, is not a crash's to serve. A worker of the
first start that fails before it is ready stops `serve` with its exit status (it cannot start:
restarting it would only loop); a replacement that fails so while others serve (a store
briefly unreachable at its startup) is tried again `RETRY_S` later, and the others serve on.
A worker whose startup failed leaves the error's message beside its ready file
(`<pid>.failed`) and exits 1 without a traceback; `startup_failure` holds the message of the
first start's, for `serve` to print as one sentence.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import sys
import time
from dataclasses import dataclass
from multiprocessing import get_context
from multiprocessing.connection import wait
from multiprocessing.context import SpawnContext
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

from hypercorn.config import Config, Sockets
from hypercorn.utils import LifespanFailureError

logger = logging.getLogger("sluicegate")

READY_DIR_ENV = "SLUICEGATE_READY_DIR"
# A directory the workers share (every worker of this serve, across reloads): what they must
# agree on lives there (the memory cache's invalidations, middleware/cache/shared.py).
SHARED_DIR_ENV = "SLUICEGATE_SHARED_DIR"
# Set ("1") in a replacement worker's environment: it loads the running workers' config.
REPLACEMENT_ENV = "SLUICEGATE_REPLACEMENT_WORKER"
RETRY_S = 2.0  # before another replacement, after one that failed to start


def announce_ready(config_text: bytes | None = None) -> None:
    """Called in a worker once its startup has completed (see the module docstring), with
    the text of the config file it loaded (None: it loaded the last good copy): the
    supervisor makes that the last good config once the worker's generation is accepted."""
    directory = os.environ.get(READY_DIR_ENV)
    if directory:
        if config_text is not None:
            candidate = Path(directory, f"{os.getpid()}.config")
            temporary = candidate.with_suffix(".tmp")
            temporary.write_bytes(config_text)
            os.replace(temporary, candidate)  # whole before the worker says it is ready
        Path(directory, str(os.getpid())).touch()


def lifespan_failure(error: LifespanFailureError) -> str:
    """The message of the exception that failed the app's startup (or shutdown), out of
    hypercorn's "Lifespan failure in startup. '<message>'" (the kernel sends str(exc))."""
    text = str(error)
    match = re.fullmatch(r"Lifespan failure in \w+\. '(.*)'", text, re.DOTALL)
    return match[1] if match else text


def run_worker(**kwargs: Any) -> None:
    """A worker process: hypercorn's uvloop worker. Its startup failing (a store it cannot
    do without unreachable) is no crash: the kernel logged it; its message goes to the
    supervisor, and the worker exits 1 (multiprocessing would print the traceback)."""
    from hypercorn.asyncio.run import uvloop_worker

    try:
        uvloop_worker(**kwargs)
    except LifespanFailureError as exc:
        Path(os.environ[READY_DIR_ENV], f"{os.getpid()}.failed").write_text(
            lifespan_failure(exc))
        sys.exit(1)


@dataclass(slots=True)
class _Worker:
    process: BaseProcess
    stop: Event
    replacement: bool = False


class Supervisor:
    """Runs `workers` hypercorn uvloop workers on `config`'s sockets until told to stop."""

    def __init__(self, config: Config, workers: int, *, ready_dir: str,
                 last_good: str | None = None, shared_dir: str | None = None,
                 start_timeout_s: float = 120.0) -> None:
        if workers < 1:
            raise ValueError("the supervisor needs at least one worker")
        self.config = config
        self.workers = workers
        self.ready_dir = Path(ready_dir)
        self.last_good = Path(last_good) if last_good else None  # (None: none kept)
        # (beside the ready directory by default: in the serve's own directory, removed at exit)
        self.shared_dir = Path(shared_dir) if shared_dir else self.ready_dir.with_name("shared")
        self.start_timeout_s = start_timeout_s
        self._ctx: SpawnContext = get_context("spawn")
        self._sockets: Sockets | None = None
        self._signals: list[str] = []  # "reload" or "stop", acted on by the loop
        self.startup_failure: str | None = None  # why the first start failed, if it did

    def run(self) -> int:
        self.ready_dir.mkdir(parents=True, exist_ok=True)
        os.environ[READY_DIR_ENV] = str(self.ready_dir)  # the workers inherit it
        self.shared_dir.mkdir(parents=True, exist_ok=True)
        os.environ[SHARED_DIR_ENV] = str(self.shared_dir)
        self._sockets = self.config.create_sockets()
        current = [self._spawn(run_worker) for _ in range(self.workers)]
        starting = list(current)  # the first start, until it is accepted
        draining: list[_Worker] = []
        for name in ("SIGINT", "SIGTERM"):
            signal.signal(getattr(signal, name), lambda *_: self._signals.append("stop"))
        if hasattr(signal, "SIGHUP"):
            signal.signal(signal.SIGHUP, lambda *_: self._signals.append("reload"))
        exitcode = 0
        missing, respawn_at = 0, 0.0  # workers to replace, and not before when
        try:
            while True:
                wait([w.process.sentinel for w in current + draining], timeout=0.5)
                draining = [w for w in draining if not self._reaped(w)]
                exited = [w for w in current if not w.process.is_alive()]
                if exited:
                    current = [w for w in current if w not in exited]
                    exitcode, retry = self._fatal(exited, serving=len(current))
                    if exitcode:
                        break
                    missing += len(exited)
                    if retry:
                        respawn_at = time.monotonic() + RETRY_S
                starting = [w for w in starting if w in current]
                if starting and all(self._ready(w) for w in starting):
                    self._accept(starting)
                    starting = []
                if missing and time.monotonic() >= respawn_at:
                    current += [self._spawn(run_worker, replacement=True)
                                for _ in range(missing)]
                    missing = 0
                if "stop" in self._signals:
                    break
                if self._signals:
                    self._signals.clear()
                    current, old = self._reload(current, run_worker)
                    for worker in old:
                        worker.stop.set()  # stop accepting; drain what is in flight
                    draining += old
        finally:
            self._stop_all(current + draining)
            for sock in [*self._sockets.secure_sockets, *self._sockets.insecure_sockets]:
                sock.close()
        return exitcode

    def _fatal(self, exited: list[_Worker], serving: int) -> tuple[int, bool]:
        """(the status to stop `serve` with, 0: replace the workers and go on; whether to
        wait `RETRY_S` first). A worker of the first start that failed before it was ready
        cannot start; a replacement that failed so, while `serving` others serve, is tried
        again later; one that died while serving (a crash, the OOM killer) is replaced and
        the others serve on."""
        status, retry = 0, False
        for worker in exited:
            ready = self._ready(worker)
            code = worker.process.exitcode or 0
            failure = self._failure(worker)
            self._reaped(worker)
            if code and not ready and worker.replacement and serving:
                logger.error("a replacement worker exited with status %s before it was ready; "
                             "the others serve on, and another starts in %g s", code, RETRY_S)
                retry = True
            elif code and not ready:
                logger.error("a worker exited with status %s before it was ready; stopping",
                             code)
                status = status or code
                self.startup_failure = self.startup_failure or failure
            elif code:
                logger.error("a worker (pid %s) exited with status %s while serving; starting "
                             "another", worker.process.pid, code)
        return status, retry

    def _ready(self, worker: _Worker) -> bool:
        return (self.ready_dir / str(worker.process.pid)).exists()

    def _spawn(self, target: Any, *, replacement: bool = False) -> _Worker:
        stop = self._ctx.Event()
        process = self._ctx.Process(target=target, kwargs={
            "config": self.config, "sockets": self._sockets, "shutdown_event": stop})
        process.daemon = False
        # A worker inherits SIGINT ignored (a handler would not survive the exec): a Ctrl-C
        # in a terminal reaches the whole process group, and the supervisor alone decides
        # how workers stop (drained, not killed). It inherits the environment as it is now.
        handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
        if replacement:
            os.environ[REPLACEMENT_ENV] = "1"
        try:
            process.start()
        finally:
            signal.signal(signal.SIGINT, handler)
            os.environ.pop(REPLACEMENT_ENV, None)
        return _Worker(process, stop, replacement)

    def _reload(self, current: list[_Worker], target: Any
                ) -> tuple[list[_Worker], list[_Worker]]:
        """(the workers that serve now, the ones to drain)."""
        logger.info("reload: starting %d new worker(s) beside the running ones", self.workers)
        fresh = [self._spawn(target) for _ in range(self.workers)]
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            if all(self._ready(w) for w in fresh):
                logger.info("reload: the new workers are ready; the old ones drain")
                self._accept(fresh)
                return fresh, current
            failed = [w for w in fresh if not w.process.is_alive()]
            if failed or time.monotonic() > deadline or "stop" in self._signals:
                if failed or time.monotonic() > deadline:
                    why = (f"one exited: {self._failure(failed[0]) or 'see its log'}"
                           if failed else "timed out")
                    logger.error("reload: the new workers did not start (%s); the running "
                                 "ones go on serving", why)
                self._stop_all(fresh)
                return current, []
            wait([w.process.sentinel for w in fresh], timeout=0.1)

    def _accept(self, generation: list[_Worker]) -> None:
        """Makes the config `generation` loaded the last good one (the first candidate its
        workers left; none: they all loaded the last good copy, which stays)."""
        candidates = [self._candidate(w) for w in generation]
        offered = [path for path in candidates if path.exists()]
        if offered and self.last_good is not None:
            os.replace(offered[0], self.last_good)
        for path in candidates:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def _candidate(self, worker: _Worker) -> Path:
        return self.ready_dir / f"{worker.process.pid}.config"

    def _failure(self, worker: _Worker) -> str | None:
        """The message a worker whose startup failed left (`run_worker`), if it did."""
        try:
            return (self.ready_dir / f"{worker.process.pid}.failed").read_text()
        except FileNotFoundError:
            return None

    def _reaped(self, worker: _Worker) -> bool:
        """True (and its ready file and candidate removed) once the worker's process has
        exited."""
        if worker.process.is_alive():
            return False
        worker.process.join()
        for path in (self.ready_dir / str(worker.process.pid), self._candidate(worker),
                     self.ready_dir / f"{worker.process.pid}.failed"):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        return True

    def _stop_all(self, workers: list[_Worker]) -> None:
        for worker in workers:
            worker.stop.set()
        deadline = time.monotonic() + float(self.config.graceful_timeout) + 5
        for worker in workers:
            worker.process.join(max(0.0, deadline - time.monotonic()))
        for worker in workers:
            if worker.process.is_alive():
                logger.error("a worker did not stop within the graceful timeout; killing it")
                worker.process.kill()
                worker.process.join()
            self._reaped(worker)
