"""Config reload: SIGHUP to `sluicegate serve --workers 2` swaps the workers for ones built
from the edited config, without failing a request in flight or one arriving meanwhile, and
new workers serve before the old ones drain; a broken edit keeps the last config that
loaded."""
from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.harness import (
    AUTH,
    REPO,
    SHARED_QUOTA,
    free_port,
    mock_config,
    start_cli_gateway,
    stop_process,
    wait_for,
    write_config,
)
from tests.mock_providers import MockProviderServer

LONG = " ".join(f"word{i}" for i in range(150))
NEW_MODEL = 'models["gpt-mock-2"] = [Deployment("openai", "gpt-4o", price=MOCK_PRICE)]'


# hypercorn's documented swap race (see the README): a connection an old worker accepted as
# it stopped is closed unread, seen as a clean close or, with the request unread, a reset.
SWAP_RACE = (httpx.RemoteProtocolError, httpx.ReadError)


def worker_pids(url: str) -> set[str]:
    for attempt in range(3):  # the probe itself may meet the swap race
        try:
            text = httpx.get(url + "/metrics", timeout=10).text
            break
        except SWAP_RACE:
            if attempt == 2:
                raise
    return set(re.findall(r'sluicegate_requests_in_flight\{worker="(\d+)"\}', text))


def chat(url: str, model: str) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", headers=AUTH, timeout=60,
                      json={"model": model, "messages": [{"role": "user", "content": "hi"}]})


@pytest.fixture
def slow_streams(mock: MockProviderServer) -> Iterator[MockProviderServer]:
    mock.config.update({"chunk_delay_s": 0.01, "chunk_chars": 8})
    yield mock
    mock.config.update({"chunk_delay_s": 0.0})


def stream_in_background(url: str) -> tuple[threading.Thread, list[str]]:
    """A stream of LONG in a thread; its `data:` lines land in the list as it ends."""
    streamed: list[str] = []

    def stream() -> None:
        with httpx.stream("POST", url + "/v1/chat/completions", headers=AUTH, timeout=60,
                          json={"model": "gpt-mock", "stream": True,
                                "messages": [{"role": "user", "content": LONG}]}) as r:
            streamed.extend(line for line in r.iter_lines() if line.startswith("data: "))
    streaming = threading.Thread(target=stream)
    streaming.start()
    return streaming, streamed


def both_workers(url: str) -> set[str]:
    """The pids of the two workers (each scrape is answered by one of them)."""
    pids: set[str] = set()
    deadline = time.monotonic() + 10
    while len(pids) < 2 and time.monotonic() < deadline:
        pids |= worker_pids(url)
    return pids


def old_workers_gone(url: str, old: set[str], timeout_s: float = 60) -> set[str]:
    """The worker pids once none of `old` is left (they drain, then exit)."""
    deadline = time.monotonic() + timeout_s
    pids = worker_pids(url)
    while pids & old and time.monotonic() < deadline:
        time.sleep(0.2)
        pids = worker_pids(url)
    return pids


def test_a_rejected_reload_never_reaches_a_replacement_worker(
        tmp_path: Path, mock_url: str) -> None:
    """A reload one of whose new workers cannot start is rejected, and its config is not the
    last good: a worker that replaces a crashed one later serves the running config (the new
    worker that did start had made its config the last good, and a replacement served the
    rejected model beside an old worker serving the running one)."""
    started, fail = tmp_path / "one-started", tmp_path / "fail-the-second"
    layer = f'''
{NEW_MODEL}


class OnlyOneStarts:
    def __init__(self, app):
        self.app = app

    async def startup(self):
        try:
            os.close(os.open({str(started)!r}, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            if os.path.exists({str(fail)!r}):
                raise RuntimeError("the second worker cannot start")

    async def __call__(self, scope, receive, send):
        await self.app(scope, receive, send)


middleware = [Middleware(OnlyOneStarts)]
'''
    config = write_config(tmp_path, mock_config(mock_url, middleware="none"))
    log = tmp_path / "serve.log"
    process, url = start_cli_gateway(config, workers=2, log_path=log)
    try:
        before = both_workers(url)
        write_config(tmp_path, mock_config(mock_url, middleware="none") + layer)
        fail.touch()
        os.kill(process.pid, signal.SIGHUP)
        assert wait_for(lambda: "reload: the new workers did not start" in log.read_text(), 60)
        assert wait_for(lambda: worker_pids(url) <= before)  # the one that started has gone
        fail.unlink()  # whatever kept it from starting is over; the file is as it was reloaded
        pids = set(before)
        for victim in sorted(before):  # each old worker crashes in turn: replacements answer
            os.kill(int(victim), signal.SIGKILL)
            deadline = time.monotonic() + 60
            while (victim in pids or len(pids) < 2) and time.monotonic() < deadline:
                with contextlib.suppress(*SWAP_RACE):
                    pids = worker_pids(url) | pids - {victim}
        assert not pids & before and len(pids) == 2, pids
        assert {chat(url, "gpt-mock-2").status_code for _ in range(6)} == {404}
        assert {chat(url, "gpt-mock").status_code for _ in range(6)} == {200}
    finally:
        stop_process(process)


def test_sighup_reloads_the_config_without_failing_requests(
        tmp_path: Path, mock_url: str, slow_streams: MockProviderServer) -> None:
    config = write_config(tmp_path, mock_config(mock_url, quota_store=SHARED_QUOTA))
    log = tmp_path / "serve.log"
    process, url = start_cli_gateway(config, workers=2, log_path=log)
    try:
        assert chat(url, "gpt-mock-2").status_code == 404  # not a model yet
        before = both_workers(url)
        # A stream long enough (about 15 s) to be in flight across the whole reload.
        slow_streams.config.update({"chunk_delay_s": 0.1})
        streaming, streamed = stream_in_background(url)
        time.sleep(0.3)
        write_config(tmp_path, mock_config(mock_url, extra=NEW_MODEL, quota_store=SHARED_QUOTA))
        os.kill(process.pid, signal.SIGHUP)
        statuses, unanswered = [], 0
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # requests keep coming during the swap
            try:
                statuses.append(chat(url, "gpt-mock").status_code)
                if chat(url, "gpt-mock-2").status_code == 200:
                    break
            except SWAP_RACE:
                # A connection an old worker accepted in the instant it stopped is closed
                # before its request was read (hypercorn's graceful stop); the SDKs retry
                # these. Anything else (a 5xx, a refused connection) fails the test.
                unanswered += 1
        # The new workers answered while an old one was still draining the stream: a reload
        # never leaves the gateway without a worker that accepts.
        assert streaming.is_alive()
        assert unanswered <= 2
        streaming.join(timeout=60)
        after = old_workers_gone(url, before)
        assert after and not after & before  # new workers only, once the old ones drained
        assert {chat(url, "gpt-mock-2").status_code for _ in range(6)} == {200}
        assert set(statuses) == {200}, statuses
        assert streamed and streamed[-1] == "data: [DONE]"
        assert not any('"error"' in line for line in streamed)

        # A broken edit: the new workers keep the last config that loaded, and say why.
        write_config(tmp_path, "providers = {\n")
        os.kill(process.pid, signal.SIGHUP)
        current = old_workers_gone(url, after)
        assert not current & after  # swapped again
        assert process.poll() is None
        assert chat(url, "gpt-mock-2").status_code == 200
        assert "serving the last config that did" in log.read_text()

        # So does an edit that puts the quota layer's counters in each worker's memory,
        # where each of the two would hold every limit on its own.
        write_config(tmp_path, mock_config(mock_url, extra=NEW_MODEL))
        os.kill(process.pid, signal.SIGHUP)
        assert not old_workers_gone(url, current) & current
        assert chat(url, "gpt-mock-2").status_code == 200
        assert "keeps limits and budgets in one process: with --workers 2" in log.read_text()
    finally:
        stop_process(process)


def test_a_reload_whose_workers_cannot_start_keeps_the_running_ones(
        tmp_path: Path, mock_url: str) -> None:
    """New workers that fail their startup are stopped; the old ones never stopped serving."""
    flag = tmp_path / "fail-startup"
    layer = f'''
class FailsToStartWhenFlagged:
    def __init__(self, app):
        self.app = app

    async def startup(self):
        if os.path.exists({str(flag)!r}):
            raise RuntimeError("flagged to fail")

    async def __call__(self, scope, receive, send):
        await self.app(scope, receive, send)


middleware = [Middleware(FailsToStartWhenFlagged)]
'''
    config = write_config(tmp_path, mock_config(mock_url, middleware="none") + layer)
    log = tmp_path / "serve.log"
    process, url = start_cli_gateway(config, workers=2, log_path=log)
    try:
        before = both_workers(url)
        flag.touch()
        os.kill(process.pid, signal.SIGHUP)
        deadline = time.monotonic() + 60
        while "did not start" not in log.read_text() and time.monotonic() < deadline:
            assert chat(url, "gpt-mock").status_code == 200  # served throughout
            time.sleep(0.1)
        assert "reload: the new workers did not start" in log.read_text()
        assert process.poll() is None
        assert worker_pids(url) <= before  # the same workers
        assert {chat(url, "gpt-mock").status_code for _ in range(6)} == {200}
    finally:
        stop_process(process)


def test_sigterm_with_workers_drains_streams_in_flight_then_exits(
        tmp_path: Path, mock_url: str, slow_streams: MockProviderServer) -> None:
    config = write_config(tmp_path, mock_config(mock_url, quota_store=SHARED_QUOTA))
    process, url = start_cli_gateway(config, workers=2, log_path=tmp_path / "serve.log")
    try:
        slow_streams.config.update({"chunk_delay_s": 0.05})  # about 7 s of stream
        calls = len(slow_streams.requests)
        streaming, streamed = stream_in_background(url)
        deadline = time.monotonic() + 10
        while len(slow_streams.requests) == calls:  # until the stream is in flight
            assert time.monotonic() < deadline, "the stream never reached the upstream"
            time.sleep(0.01)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        streaming.join(timeout=60)
        assert streamed and streamed[-1] == "data: [DONE]"  # finished, not cut
        with pytest.raises(httpx.ConnectError):
            chat(url, "gpt-mock")  # nobody listens any more
    finally:
        if process.poll() is None:
            stop_process(process)


def test_a_worker_that_dies_while_serving_is_replaced(tmp_path: Path, mock_url: str) -> None:
    config = write_config(tmp_path, mock_config(mock_url, quota_store=SHARED_QUOTA))
    log = tmp_path / "serve.log"
    process, url = start_cli_gateway(config, workers=2, log_path=log)
    try:
        before = both_workers(url)
        victim = min(before)
        os.kill(int(victim), signal.SIGKILL)  # as the OOM killer would
        deadline = time.monotonic() + 60
        pids = worker_pids(url)
        while (victim in pids or len(pids) < 2) and time.monotonic() < deadline:
            try:
                assert chat(url, "gpt-mock").status_code == 200  # the other one serves
            except SWAP_RACE:
                pass  # a connection the dying worker had accepted
            pids = worker_pids(url) | pids - {victim}
        assert victim not in pids and len(pids) == 2, pids
        assert process.poll() is None
        assert "exited with status -9 while serving; starting another" in log.read_text()
        assert {chat(url, "gpt-mock").status_code for _ in range(6)} == {200}
        # A Ctrl-C reaches every process of the group: workers ignore it, the new one too.
        (replacement,) = pids - before
        os.kill(int(replacement), signal.SIGINT)
        time.sleep(1)
        assert replacement in worker_pids(url) | worker_pids(url)
        assert {chat(url, "gpt-mock").status_code for _ in range(6)} == {200}
    finally:
        stop_process(process)


def test_a_replacement_worker_loads_the_running_config_and_is_retried(
        tmp_path: Path, mock_url: str) -> None:
    """A worker that dies is replaced with the config the running workers loaded, not the
    file as edited since (a reload's, not a crash's); one that fails its startup while the
    other serves is tried again, never the end of `serve` (it stopped it, the healthy worker
    with it, and the port went dead)."""
    flag = tmp_path / "fail-startup"
    layer = f'''
class FailsToStartWhenFlagged:
    def __init__(self, app):
        self.app = app

    async def startup(self):
        if os.path.exists({str(flag)!r}):
            raise RuntimeError("flagged to fail")

    async def __call__(self, scope, receive, send):
        await self.app(scope, receive, send)


middleware = [Middleware(FailsToStartWhenFlagged)]
'''
    config = write_config(tmp_path, mock_config(mock_url, middleware="none") + layer)
    log = tmp_path / "serve.log"
    process, url = start_cli_gateway(config, workers=2, log_path=log)
    try:
        before = both_workers(url)
        config.write_text(config.read_text() + f"\n{NEW_MODEL}\nraise SyntaxError\n")  # (no reload)
        flag.touch()  # (a store briefly unreachable, as a worker starts)
        victim = min(before)
        os.kill(int(victim), signal.SIGKILL)
        deadline = time.monotonic() + 60
        while "another starts in" not in log.read_text() and time.monotonic() < deadline:
            try:
                assert chat(url, "gpt-mock").status_code == 200  # the other one serves
            except SWAP_RACE:
                pass
            time.sleep(0.1)
        assert "a replacement worker exited with status" in log.read_text()
        assert process.poll() is None
        flag.unlink()
        pids = worker_pids(url)
        while (victim in pids or len(pids) < 2) and time.monotonic() < deadline:
            assert chat(url, "gpt-mock").status_code == 200
            pids = worker_pids(url) | pids - {victim}
        assert victim not in pids and len(pids) == 2, pids
        # The replacement serves the running config: the edit (a new model) is not in it.
        assert {chat(url, "gpt-mock").status_code for _ in range(6)} == {200}
        assert {chat(url, "gpt-mock-2").status_code for _ in range(6)} == {404}
    finally:
        stop_process(process)


def test_serve_refuses_what_check_config_refuses_in_one_sentence(
        tmp_path: Path, mock_url: str) -> None:
    """A config the layers refuse (a fallback to a model that does not exist) stopped
    `serve --workers 2` with worker tracebacks and status 1 (systemd restarts on 1, in a
    loop), naming a temporary copy of the config; `check-config` says one sentence, exit 2."""
    extra = ('from middleware.failover import FailoverMiddleware, Route\n'
             'middleware = [Middleware(FailoverMiddleware, '
             'routes={"gpt-mock": Route(fallbacks=["no-such-model"])})]\n')
    config = write_config(tmp_path, mock_config(mock_url, middleware="none", extra=extra))
    for workers in ("1", "2"):
        result = subprocess.run(
            [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config),
             "--port", "0", "--workers", workers], cwd=REPO, capture_output=True, text=True,
            timeout=60, check=False)
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr
        assert "no-such-model" in result.stderr
        assert "last-good" not in result.stderr


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_startup_that_cannot_reach_postgresql_stops_serve_in_one_sentence(
        tmp_path: Path, mock_url: str, workers: str) -> None:
    """The key store's PostgreSQL unreachable at startup stopped `serve` with hypercorn's
    LifespanFailureError traceback (65 lines with one worker, 118 with two: each worker's),
    printed past the log's redaction; doctor said it in one line. Status 1, not 2: the
    config is right, and a start once PostgreSQL answers succeeds."""
    password = "pg-password-" + "x" * 16
    dsn = f"postgresql://sg:{password}@127.0.0.1:{free_port()}/sluicegate"  # nothing listens
    extra = ("from middleware.auth import PostgresKeyStore\n"
             "middleware = [Middleware(AuthMiddleware, store=PostgresKeyStore("
             f"{dsn!r}), keys=[StaticKey('tests', key_env='SG_TEST_KEY')])]\n")
    config = write_config(tmp_path, mock_config(mock_url, middleware="none", extra=extra))
    result = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config),
         "--port", str(free_port()), "--workers", workers], cwd=REPO, capture_output=True,
        text=True, timeout=90, check=False)
    assert result.returncode == 1, result.stderr
    said = [line for line in result.stderr.splitlines() if not line.startswith("{")]
    assert len(said) == 1, said
    assert said[0].startswith("sluicegate: the key store could not reach PostgreSQL at "
                              "startup (OperationalError: connection failed: ")
    assert password not in result.stderr + result.stdout
