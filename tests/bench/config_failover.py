"""Bench target: the failover layer alone on its success path (one deployment, healthy),
against the bare passthrough: the layer picks, checks the breaker, adds its two headers and
records the outcome on every request."""
import os

from gateway.config import Deployment, Middleware, Model, Price
from middleware.failover import FailoverMiddleware, Route
from providers import Provider

upstream = os.environ.get("SLUICEGATE_BENCH_UPSTREAM", "http://127.0.0.1:18080/json/v1")
providers = {"mock": Provider("openai", base_url=upstream, max_connections=1024)}
# Priced as in real use (the same price in every bench config): the kernel prices each
# response for /metrics, so a free model here would leave that work out of every ratio.
models = {"bench": Model([Deployment("mock", "bench",
                                     price=Price(input_per_mtok="0.15", output_per_mtok="0.60"))])}
middleware = [Middleware(FailoverMiddleware, routes={"bench": Route(fallbacks=())})]
