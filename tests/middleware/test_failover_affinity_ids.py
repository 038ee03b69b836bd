"""A `previous_response_id` that cannot be a response's id is refused before it goes anywhere.

An id this process has not seen is looked up in Redis (`shared=RedisHealth(...)`), with the
caller's string as the key. OpenAI's ids are "resp_" and about 50 hex digits, and the live
API refuses a malformed one with 400 (`Invalid 'previous_response_id': ...`, e.g. "Expected an
ID that contains letters, numbers, underscores, or dashes"); the gateway refuses one longer
than 256 characters, or with characters other than printable ASCII, in that shape, with no
Redis call. Here Redis answers late, so each lookup times out and is counted
(`lookup_errors`).
"""
from __future__ import annotations

from pathlib import Path

import openai
import pytest

from tests.harness import ThreadedServer, openai_client, serve
from tests.middleware.test_failover_affinity import turn
from tests.middleware.test_failover_affinity_shared import late_redis, prefix, shared_config
from tests.middleware.test_failover_layer import deployments
from tests.mock_providers import MockProviderServer
from tests.tcp_proxy import TcpProxy

__all__ = ["late_redis", "prefix"]  # (fixtures, used by name)


def lookup_errors(gateway: ThreadedServer) -> int:
    shared = deployments(gateway)["shared"]
    assert isinstance(shared, dict)
    return int(shared["lookup_errors"])


@pytest.mark.parametrize("previous,code", [
    ("resp_" + "0123456789" * 100, "string_above_max_length"),
    ("resp_abc\x00def", "invalid_value"),
    ("resp_abc\ndef", "invalid_value"),
    ("resp_caf\u00e9", "invalid_value"),
], ids=["long", "nul", "newline", "non-ascii"])
def test_a_previous_response_id_that_cannot_be_one_is_refused_before_any_redis_call(
        tmp_path: Path, a: MockProviderServer, b: MockProviderServer, prefix: str,
        late_redis: TcpProxy, previous: str, code: str) -> None:
    # It cost a Redis GET with the caller's string as its key (a request body's worth of
    # it), then routed as an unknown id.
    shared = (f'RedisHealth("redis://127.0.0.1:{late_redis.port}/0", prefix="{prefix}", '
              'sync_interval_s=3600, lookup_timeout_s=0.2)')
    with serve(tmp_path, shared_config(a, b, shared)) as gateway:
        sdk = openai_client(gateway)
        turn(sdk, "trio", None, False)  # (Redis answers: the answer's pin was written)
        late_redis.reply_delay_s = 1.0
        with pytest.raises(openai.BadRequestError) as refused:
            sdk.responses.create(model="trio", input="Go on", previous_response_id=previous)
        assert lookup_errors(gateway) == 0
        # (An id that may be one is looked up: the test sees a Redis call.)
        with pytest.raises(openai.BadRequestError) as unknown:
            sdk.responses.create(model="trio", input="Go on",
                                 previous_response_id="resp_made_elsewhere")
        assert unknown.value.code == "previous_response_not_found"
        assert lookup_errors(gateway) == 1
    error = refused.value.body
    assert isinstance(error, dict)
    assert (error["code"], error["param"], error["type"]) == \
        (code, "previous_response_id", "invalid_request_error")
    assert error["message"].startswith("Invalid 'previous_response_id': ")
    assert previous not in error["message"]  # (never echoed)
    assert len(a.requests) + len(b.requests) == 2  # the first turn, the unknown id
