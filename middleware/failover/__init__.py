"""The failover layer: routing, retries, fallbacks and circuit breakers.

Today this is a pass-through shell (issue 5 gives it its behaviour): it satisfies the
layer contract, sits in the default stack, and enforces nothing. It takes no options yet, so
a config that asks it to enforce something refuses to start.
"""
from gateway.layers import ShellLayer


class FailoverMiddleware(ShellLayer):
    """routing, retries, fallbacks and circuit breakers — pass-through shell; enforces nothing yet."""

    concern = "failover"


__all__ = ["FailoverMiddleware"]
