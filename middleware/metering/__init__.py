"""The metering layer: the usage ledger.

Today this is a pass-through shell (issue 6 gives it its behaviour): it satisfies the
layer contract, sits in the default stack, and enforces nothing. It takes no options yet, so
a config that asks it to enforce something refuses to start.
"""
from gateway.layers import ShellLayer


class MeteringMiddleware(ShellLayer):
    """the usage ledger — pass-through shell; enforces nothing yet."""

    concern = "metering"


__all__ = ["MeteringMiddleware"]
