"""The quota layer: rate limits and budgets.

Today this is a pass-through shell (issue 3 gives it its behaviour): it satisfies the
layer contract, sits in the default stack, and enforces nothing. It takes no options yet, so
a config that asks it to enforce something refuses to start.
"""
from gateway.layers import ShellLayer


class QuotaMiddleware(ShellLayer):
    """rate limits and budgets — pass-through shell; enforces nothing yet."""

    concern = "quota"


__all__ = ["QuotaMiddleware"]
