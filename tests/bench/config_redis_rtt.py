"""Bench target: the bare passthrough plus one Redis round trip a request, and nothing else.

The floor under the quota layer's bar: the quota issue requires exactly one Redis round trip
before the upstream call (and one write after it), so no auth + quota can cost less than this
layer does. It sends a one-line Lua script with EVALSHA (the quota store's command) through
the gateway's own Redis client before each call, and queues one unawaited command after it
(the settle's shape), then passes the request on.
"""
import hashlib
import os

from gateway.config import Deployment, Middleware, Model, Price
from gateway.resp import RespClient, encode_command
from providers import Provider

upstream = os.environ.get("SLUICEGATE_BENCH_UPSTREAM", "http://127.0.0.1:18080/json/v1")
redis_url = os.environ.get("SLUICEGATE_BENCH_REDIS", "redis://127.0.0.1:6379/0")
providers = {"mock": Provider("openai", base_url=upstream, max_connections=1024)}
# Priced as in real use (the same price in every bench config): the kernel prices each
# response for /metrics, so a free model here would leave that work out of every ratio.
models = {"bench": Model([Deployment("mock", "bench",
                                     price=Price(input_per_mtok="0.15", output_per_mtok="0.60"))])}

_SCRIPT = "return ARGV[1]"
_SHA = hashlib.sha1(_SCRIPT.encode()).hexdigest()


class RoundTrip:
    """One EVALSHA awaited before the request, one command queued (not awaited) after it."""

    def __init__(self, app):
        self.app = app
        self.client = RespClient(redis_url)
        self.admit = encode_command(["EVALSHA", _SHA, "1", "{rtt}:k", "1"])
        self.settle = encode_command(["EVALSHA", _SHA, "1", "{rtt}:k", "0"])

    async def startup(self):
        await self.client.call("SCRIPT", "LOAD", _SCRIPT)

    async def shutdown(self):
        await self.client.close()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            await self.client.call_encoded(self.admit)
            try:
                await self.app(scope, receive, send)
            finally:
                self.client.send_unawaited([self.settle], _ignore, [None])
        else:
            await self.app(scope, receive, send)


def _ignore(error, context):
    """The settle's reply is not awaited, and this floor has nothing to undo on an error."""


middleware = [Middleware(RoundTrip)]
