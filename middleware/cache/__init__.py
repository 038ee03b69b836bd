"""The cache layer: exact and semantic caching.

Today this is a pass-through shell (issue 4 gives it its behaviour): it satisfies the
layer contract, sits in the default stack, and enforces nothing. It takes no options yet, so
a config that asks it to enforce something refuses to start.
"""
from gateway.layers import ShellLayer


class CacheMiddleware(ShellLayer):
    """exact and semantic caching — pass-through shell; enforces nothing yet."""

    concern = "cache"


__all__ = ["CacheMiddleware"]
