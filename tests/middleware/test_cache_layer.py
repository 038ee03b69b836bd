"""The exact cache through a real gateway and the mock providers, over the in-process and the
Redis store, with the official SDKs as clients."""
from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
import redis

from gateway.app import create_app
from tests.harness import AUTH, TEST_KEY, ThreadedServer, mock_config, write_config
from tests.mock_providers import MockProviderServer

OTHER_KEY = "sk-sg-another-project-key-0123456789abcdef"
ADMIN_TOKEN = "cache-admin-" + uuid.uuid4().hex
OPT_IN = {"x-sluicegate-cache": "on"}  # cached without temperature 0


def stack(store: str) -> str:
    return ("[Middleware(AuthMiddleware, keys=[StaticKey('tests', key_env='SG_TEST_KEY'), "
            "StaticKey('other', key_env='SG_OTHER_KEY')]), "
            "Middleware(QuotaMiddleware, limits=Limits(budgets=(Budget('100'),))), "
            f"Middleware(CacheMiddleware, store={store}, admin_token_env='SG_CACHE_ADMIN')]")


@pytest.fixture(params=["memory", "redis"])
def gateway(request: pytest.FixtureRequest, tmp_path: Path, mock_url: str,
            monkeypatch: pytest.MonkeyPatch) -> Iterator[ThreadedServer]:
    monkeypatch.setenv("SG_OTHER_KEY", OTHER_KEY)
    monkeypatch.setenv("SG_CACHE_ADMIN", ADMIN_TOKEN)
    prefix = "{sgct-" + uuid.uuid4().hex + "}"
    store = ("'memory'" if request.param == "memory"
             else f"RedisCacheStore('redis://127.0.0.1:6379/0', prefix={prefix!r})")
    extra = "from middleware.cache.stores import RedisCacheStore"
    config = write_config(tmp_path, mock_config(mock_url, middleware=stack(store), extra=extra)
                          .replace("from middleware.cache import CacheMiddleware",
                                   "from middleware.cache import CacheMiddleware\n" + extra))
    with ThreadedServer(create_app(config)) as server:
        yield server
    client = redis.Redis()
    for key in client.scan_iter(match=prefix + "*"):
        client.delete(key)
    client.close()


def ask(server: ThreadedServer, text: str, *, key: str = TEST_KEY, **extra: Any) -> Any:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
    extra.setdefault("temperature", 0)
    return client.chat.completions.with_raw_response.create(
        model="gpt-mock", messages=[{"role": "user", "content": text}], **extra)


def wait_for(condition: Callable[[], bool]) -> None:
    import time
    deadline = time.monotonic() + 3
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)


def test_a_repeat_is_a_hit_with_the_original_usage(gateway: ThreadedServer,
                                                  mock: MockProviderServer) -> None:
    text = "cache me " + uuid.uuid4().hex
    first = ask(gateway, text)
    assert first.headers["x-sluicegate-cache"] == "miss"
    wait_for(lambda: ask(gateway, text).headers["x-sluicegate-cache"] == "hit")
    second = ask(gateway, text)
    assert second.headers["x-sluicegate-cache"] == "hit"
    assert len([r for r in mock.requests if text in str(r)]) == 1
    a, b = first.parse(), second.parse()
    assert b.choices[0].message.content == a.choices[0].message.content
    assert b.usage is not None and a.usage is not None
    assert b.usage.prompt_tokens == a.usage.prompt_tokens
    assert b.usage.model_extra == {"x_sluicegate_cached": True}


def test_a_stored_answer_replays_as_a_stream_and_a_stream_answers_json(
        gateway: ThreadedServer, mock: MockProviderServer) -> None:
    text = "replay me " + uuid.uuid4().hex
    ask(gateway, text)
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=TEST_KEY, max_retries=0)
    wait_for(lambda: ask(gateway, text).headers["x-sluicegate-cache"] == "hit")
    stream = client.chat.completions.create(
        model="gpt-mock", temperature=0, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": text}])
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        f"Mock reply to: {text}"
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    # The other way round: a completed stream answers a later non-stream request.
    streamed = "streamed first " + uuid.uuid4().hex
    list(client.chat.completions.create(model="gpt-mock", temperature=0, stream=True,
                                        messages=[{"role": "user", "content": streamed}]))
    wait_for(lambda: ask(gateway, streamed).headers["x-sluicegate-cache"] == "hit")
    assert ask(gateway, streamed).parse().choices[0].message.content == \
        f"Mock reply to: {streamed}"
    assert len([r for r in mock.requests if streamed in str(r)]) == 1


def test_anthropic_callers_get_their_own_shape(gateway: ThreadedServer) -> None:
    text = "claude cache " + uuid.uuid4().hex
    claude = anthropic.Anthropic(base_url=gateway.url, api_key=TEST_KEY, max_retries=0)

    def once() -> Any:
        return claude.messages.with_raw_response.create(
            model="claude-mock", max_tokens=50, extra_headers=OPT_IN,
            messages=[{"role": "user", "content": text}])
    first = once()
    wait_for(lambda: once().headers["x-sluicegate-cache"] == "hit")
    with claude.messages.stream(model="claude-mock", max_tokens=50, extra_headers=OPT_IN,
                                messages=[{"role": "user", "content": text}]) as stream:
        replayed = stream.get_final_message()
    assert replayed.content[0].text == first.parse().content[0].text  # type: ignore[union-attr]
    assert replayed.stop_reason == "end_turn"


def test_projects_never_share_answers(gateway: ThreadedServer,
                                      mock: MockProviderServer) -> None:
    text = "tenant " + uuid.uuid4().hex
    ask(gateway, text)
    wait_for(lambda: ask(gateway, text).headers["x-sluicegate-cache"] == "hit")
    other = ask(gateway, text, key=OTHER_KEY)
    assert other.headers["x-sluicegate-cache"] == "miss"
    assert len([r for r in mock.requests if text in str(r)]) == 2


def test_controls_bypass_no_cache_and_no_store(gateway: ThreadedServer,
                                               mock: MockProviderServer) -> None:
    text = "controls " + uuid.uuid4().hex
    warm = ask(gateway, text, temperature=0.7)
    assert warm.headers["x-sluicegate-cache"] == "bypass"
    stored = ask(gateway, text, extra_headers={"cache-control": "no-store"})
    assert stored.headers["x-sluicegate-cache"] == "miss"
    assert ask(gateway, text).headers["x-sluicegate-cache"] == "miss"  # no-store kept it out
    wait_for(lambda: ask(gateway, text).headers["x-sluicegate-cache"] == "hit")
    fresh = ask(gateway, text, extra_headers={"cache-control": "no-cache"})
    assert fresh.headers["x-sluicegate-cache"] == "miss"
    spaced = ask(gateway, text, extra_headers={"x-sluicegate-cache-namespace": "eval"})
    assert spaced.headers["x-sluicegate-cache"] == "miss"
    bad = httpx.post(gateway.url + "/v1/chat/completions",
                     headers={**AUTH, "x-sluicegate-cache-namespace": "x" * 300},
                     json={"model": "gpt-mock", "temperature": 0,
                           "messages": [{"role": "user", "content": text}]})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_cache_header"


def test_a_failed_upstream_answer_is_not_stored(gateway: ThreadedServer,
                                                mock: MockProviderServer) -> None:
    from tests.mock_providers import Fault
    text = "fails " + uuid.uuid4().hex
    mock.push_fault(Fault("status", provider="openai", status=500))
    with pytest.raises(openai.InternalServerError):
        ask(gateway, text)
    assert ask(gateway, text).headers["x-sluicegate-cache"] == "miss"


def test_an_admin_call_invalidates_a_project(gateway: ThreadedServer,
                                             mock: MockProviderServer) -> None:
    text = "invalidate " + uuid.uuid4().hex
    ask(gateway, text)
    wait_for(lambda: ask(gateway, text).headers["x-sluicegate-cache"] == "hit")
    url = gateway.url + "/admin/cache/invalidate"
    assert httpx.post(url, json={"project": "tests"}).status_code == 401
    assert httpx.post(url, json={"project": "tests"},
                      headers={"authorization": f"Bearer {TEST_KEY}"}).status_code == 401
    admin = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    assert httpx.post(url, json={}, headers=admin).status_code == 400
    assert httpx.post(url, json={"project": "tests", "colour": "red"},
                      headers=admin).status_code == 400
    done = httpx.post(url, json={"project": "tests", "model": "gpt-mock"}, headers=admin)
    assert done.status_code == 200 and done.json()["dropped"] >= 1
    assert ask(gateway, text).headers["x-sluicegate-cache"] == "miss"
    assert len([r for r in mock.requests if text in str(r)]) == 2
