"""Which layers see a request before its body is parsed (gateway.kernel.body_after_auth).

With auth outermost, or below layers that read a request only once it has ended (metering),
the body is parsed once the key is checked; any other layer above auth gets it parsed first.
"""
from __future__ import annotations

from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from gateway import create_app
from gateway.context import find_request_context
from middleware.metering.journal import Journal
from middleware.metering.record import UsageRecord
from tests.harness import AUTH, TEST_KEY, ThreadedServer, mock_config, write_config
from tests.mock_providers import MockProviderServer

CHAT = "/v1/chat/completions"
UNKNOWN_MODEL = {"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}
SEEN: list[tuple[str, str]] = []  # (layer, the model it saw on the way in)


class SeesTheModel:
    """A layer above auth that reads the request as it arrives."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        ctx = find_request_context(scope)
        if ctx is not None:
            SEEN.append(("sees", ctx.model))
        await self.app(scope, receive, send)


class ReadsAtEnd(SeesTheModel):
    """A layer that says it reads the request only once it has ended."""

    reads_request_at_end = True

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        ctx = find_request_context(scope)
        if ctx is not None:
            SEEN.append(("at-end", ctx.model))
        await self.app(scope, receive, send)


class SaysItLoadsButDoesNot:
    """A layer that says it parses the body and never does: the passthrough parses it."""

    loads_body = True

    def __init__(self, app: Any) -> None:
        self.app = app

    def __call__(self, scope: Any, receive: Any, send: Any) -> Awaitable[None]:
        return self.app(scope, receive, send)


AUTH_LAYER = "Middleware(AuthMiddleware, keys=[StaticKey('tests', key_env='SG_TEST_KEY')])"
THIS = "from tests.gateway.test_body_after_auth import ReadsAtEnd, SaysItLoadsButDoesNot, " \
       "SeesTheModel\n"


def server(tmp_path: Path, mock_url: str, layers: str) -> ThreadedServer:
    text = mock_config(mock_url, middleware="[]", extra=f"{THIS}middleware = [{layers}]\n")
    return ThreadedServer(create_app(write_config(tmp_path, text)))


@pytest.fixture(autouse=True)
def _clean() -> Iterator[None]:
    SEEN.clear()
    yield
    SEEN.clear()


def test_layers_that_read_at_the_end_keep_the_body_unparsed_above_auth(
        tmp_path: Path, mock_url: str, mock: MockProviderServer) -> None:
    layers = f"Middleware(ReadsAtEnd), Middleware(MeteringMiddleware), {AUTH_LAYER}"
    with server(tmp_path, mock_url, layers) as gateway:
        refused = httpx.post(gateway.url + CHAT, json=UNKNOWN_MODEL)
        assert refused.status_code == 401, refused.text
        assert "no-such-model" not in refused.text
        assert SEEN == [("at-end", "")]  # (it came in before its body was parsed)
        assert mock.requests == []
        sdk = openai.OpenAI(base_url=gateway.url + "/v1", api_key=TEST_KEY, max_retries=0)
        answer = sdk.chat.completions.create(
            model="gpt-mock", messages=[{"role": "user", "content": "hello"}])
        assert answer.choices[0].message.content
        assert mock.requests[-1]["json"]["messages"] == [{"role": "user", "content": "hello"}]
        # An authenticated caller still learns that a model does not exist.
        missing = httpx.post(gateway.url + CHAT, json=UNKNOWN_MODEL, headers=AUTH)
        assert missing.status_code == 404 and "no-such-model" in missing.text


def test_a_layer_above_auth_that_reads_the_request_gets_it_parsed(
        tmp_path: Path, mock_url: str, mock: MockProviderServer) -> None:
    with server(tmp_path, mock_url, f"Middleware(SeesTheModel), {AUTH_LAYER}") as gateway:
        sdk = openai.OpenAI(base_url=gateway.url + "/v1", api_key=TEST_KEY, max_retries=0)
        sdk.chat.completions.create(model="gpt-mock",
                                    messages=[{"role": "user", "content": "hello"}])
        assert SEEN == [("sees", "gpt-mock")]
        # Parsed before the key is checked, a body's errors come first (as documented).
        refused = httpx.post(gateway.url + CHAT, json=UNKNOWN_MODEL)
        assert refused.status_code == 404


def test_a_body_no_layer_parsed_is_parsed_by_the_passthrough(
        tmp_path: Path, mock_url: str, mock: MockProviderServer) -> None:
    with server(tmp_path, mock_url, "Middleware(SaysItLoadsButDoesNot)") as gateway:
        sdk = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
        answer = sdk.chat.completions.create(
            model="gpt-mock", messages=[{"role": "user", "content": "read me"}])
        assert answer.choices[0].message.content
        assert mock.requests[-1]["json"]["messages"] == [{"role": "user", "content": "read me"}]
        bad = httpx.post(gateway.url + CHAT, json=UNKNOWN_MODEL)
        assert bad.status_code == 404 and "no-such-model" in bad.text


def test_a_bad_body_from_a_valid_key_is_recorded_with_that_key(
        tmp_path: Path, mock_url: str, mock: MockProviderServer) -> None:
    journal_dir = tmp_path / "journal"
    layers = f"Middleware(MeteringMiddleware, journal_dir={str(journal_dir)!r}), {AUTH_LAYER}"
    with server(tmp_path, mock_url, layers) as gateway:
        response = httpx.post(gateway.url + CHAT, json=UNKNOWN_MODEL, headers=AUTH)
        assert response.status_code == 404
        request_id = response.headers["x-request-id"]
    records = []
    for slot in sorted(journal_dir.glob("slot-*")):
        journal = Journal(slot)
        journal.open()
        try:
            records += [UsageRecord.decode(payload) for _, payload in journal.pending(limit=100)]
        finally:
            journal.close()
    (record,) = [r for r in records if r.request_id == request_id]
    assert record.status == 404
    assert record.key_id is not None and record.project == "tests"
