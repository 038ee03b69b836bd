"""Shared fixtures: one mock provider server per session, gateways on real sockets."""
from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path

import pytest

from gateway import create_app
from gateway.logs import JsonFormatter
from tests import redis_topologies
from tests.harness import ThreadedServer, find_secrets_in_logs, mock_config, write_config
from tests.mock_providers import MockConfig, MockProviderServer

# Gateways in tests keep their usage journals in a directory of the run's own, not in the
# checkout (each process claims a free slot in it; see middleware/metering).
os.environ.setdefault("SLUICEGATE_JOURNAL_DIR", tempfile.mkdtemp(prefix="sluicegate-journals-"))
# The harness serves "gpt-4o-mini", which gets tiktoken's exact count wherever tiktoken's cache
# holds its encoding (gateway/tokenizers.py): the run's own, empty cache keeps the heuristic
# every test computes its reservations with, whatever the machine has cached.
os.environ["TIKTOKEN_CACHE_DIR"] = tempfile.mkdtemp(prefix="sluicegate-tiktoken-cache-")
# Every log line of the run (this process at DEBUG, and every `sluicegate serve` the tests
# start) lands in one directory, which is searched for secrets when the run ends.
LOG_DIR = Path(os.environ.setdefault("SLUICEGATE_TEST_LOG_DIR",
                                     tempfile.mkdtemp(prefix="sluicegate-test-logs-")))
_run_log = logging.FileHandler(LOG_DIR / f"pytest-{os.getpid()}.log")
_run_log.setFormatter(JsonFormatter())
_run_log.setLevel(logging.DEBUG)
logging.getLogger().addHandler(_run_log)
logging.getLogger().setLevel(logging.DEBUG)
# The tests' own HTTP clients (httpx, also under the openai and anthropic SDKs) log every
# request's URL at INFO, so a test that pastes a key into a URL on purpose (to see the gateway
# not echo it) read as a leak when run on its own. The gateway never uses httpx.
logging.getLogger("httpx").setLevel(logging.WARNING)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fails the run when any log line of it holds a key the tests used (or any virtual
    key at all: the gateway must never log one)."""
    _run_log.flush()
    leaks = list(find_secrets_in_logs(LOG_DIR))
    if leaks:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        for where, what in leaks[:20]:
            message = f"SECRET IN LOGS: {what} in {where}"
            if reporter is not None:
                reporter.write_line(message, red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def mock_server() -> Iterator[MockProviderServer]:
    server = MockProviderServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def mock(mock_server: MockProviderServer) -> Iterator[MockProviderServer]:
    """The session's mock with a clean request log and no queued faults."""
    mock_server.clear_faults()
    mock_server.reset_log()
    yield mock_server
    mock_server.clear_faults()


@pytest.fixture(scope="session")
def mock_url(mock_server: MockProviderServer) -> str:
    return f"http://127.0.0.1:{mock_server.port}"


@pytest.fixture(scope="session")
def config_path(tmp_path_factory: pytest.TempPathFactory, mock_url: str) -> Path:
    return write_config(tmp_path_factory.mktemp("config"), mock_config(mock_url))


@pytest.fixture(scope="session")
def gateway(config_path: Path) -> Iterator[ThreadedServer]:
    """The gateway with the default stack, in-process under hypercorn, on a real socket."""
    with ThreadedServer(create_app(config_path)) as server:
        yield server


# -- Redis deployments beyond the machine's one server (started on first use) -------------------

@pytest.fixture(scope="session")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[redis_topologies.TlsRedis]:
    yield from redis_topologies.tls_redis(tmp_path_factory.mktemp("redis-tls"))


@pytest.fixture(scope="session")
def sentinel_redis(tmp_path_factory: pytest.TempPathFactory
                   ) -> Iterator[redis_topologies.SentinelRedis]:
    yield from redis_topologies.sentinel_redis(tmp_path_factory.mktemp("redis-sentinel"))


@pytest.fixture(scope="session")
def cluster_redis(tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[redis_topologies.ClusterRedis]:
    yield from redis_topologies.cluster_redis(tmp_path_factory.mktemp("redis-cluster"))


# -- two more mock provider servers, for tests that need two upstreams (failover) ---------------

@pytest.fixture(scope="module")
def upstream_a() -> Iterator[MockProviderServer]:
    with MockProviderServer(MockConfig()) as server:
        yield server


@pytest.fixture(scope="module")
def upstream_b() -> Iterator[MockProviderServer]:
    with MockProviderServer(MockConfig()) as server:
        yield server


def _clean(server: MockProviderServer) -> Iterator[MockProviderServer]:
    # The config too: one test's latency or chunking must not slow the module's next ones.
    config = {f.name: getattr(server.config, f.name) for f in fields(server.config) if f.init}

    def reset() -> None:
        server.clear_faults()
        server.reset_log()
        server.reset_ratio_failures()
        server.config.update(config)
    reset()
    yield server
    reset()


@pytest.fixture
def a(upstream_a: MockProviderServer) -> Iterator[MockProviderServer]:
    """A mock provider server of the test module's own, its faults and log cleared."""
    yield from _clean(upstream_a)


@pytest.fixture
def b(upstream_b: MockProviderServer) -> Iterator[MockProviderServer]:
    """A second one, as `a`."""
    yield from _clean(upstream_b)
