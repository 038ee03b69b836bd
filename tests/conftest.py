"""Shared fixtures: one mock provider server per session, gateways on real sockets."""
from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway import create_app
from tests.harness import ThreadedServer, mock_config, write_config
from tests.mock_providers import MockProviderServer

# Gateways in tests keep their usage journals in a directory of the run's own, not in the
# checkout (each process claims a free slot in it; see middleware/metering).
os.environ.setdefault("SLUICEGATE_JOURNAL_DIR", tempfile.mkdtemp(prefix="sluicegate-journals-"))


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
