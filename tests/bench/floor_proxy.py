# Copied verbatim from ../shared/bench/floor_proxy.py (the project's reference measurements), so
# the benchmark harness can run the floor target from the repository. Do not tune it: it is the
# yardstick. Credit: the reference floor proxy in ../shared/bench (see its README.md).
"""Floor reference: the thinnest Python ASGI gateway -- raw ASGI, no framework, no parsing.

Reads the request body, POSTs it to FLOOR_UPSTREAM + (path without the leading /v1) over a pooled
aiohttp ClientSession, and streams the upstream response back chunk by chunk (JSON and SSE alike).
Run: hypercorn -w 1 -k uvloop floor_proxy:app   |   uvicorn --loop uvloop --http httptools floor_proxy:app
"""
import os

import aiohttp

UPSTREAM = os.environ.get("FLOOR_UPSTREAM", "http://127.0.0.1:18080/json/v1").rstrip("/")
DROP_REQ = {b"host", b"content-length", b"connection", b"keep-alive", b"transfer-encoding"}
DROP_RESP = {b"connection", b"keep-alive", b"transfer-encoding", b"server", b"date"}
session = None


async def _lifespan(receive, send):
    global session
    while True:
        msg = await receive()
        if msg["type"] == "lifespan.startup":
            connector = aiohttp.TCPConnector(limit=1024, keepalive_timeout=75, ttl_dns_cache=None)
            session = aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                            timeout=aiohttp.ClientTimeout(total=600))
            await send({"type": "lifespan.startup.complete"})
        elif msg["type"] == "lifespan.shutdown":
            await session.close()
            await send({"type": "lifespan.shutdown.complete"})
            return


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        return await _lifespan(receive, send)
    body, more = b"", True
    while more:
        msg = await receive()
        body += msg.get("body", b"")
        more = msg.get("more_body", False)
    path = scope["path"][3:] if scope["path"].startswith("/v1/") else scope["path"]
    url = UPSTREAM + path + ("?" + scope["query_string"].decode() if scope["query_string"] else "")
    headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"] if k not in DROP_REQ]
    async with session.request(scope["method"], url, data=body, headers=headers) as resp:
        out = [(k.lower(), v) for k, v in resp.raw_headers if k.lower() not in DROP_RESP]
        await send({"type": "http.response.start", "status": resp.status, "headers": out})
        async for chunk in resp.content.iter_any():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})
