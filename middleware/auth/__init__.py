"""The auth layer: authentication (virtual keys, customers).

Today this is a pass-through shell (issue 3 gives it its behaviour): it satisfies the
layer contract, sits in the default stack, and enforces nothing. It takes no options yet, so
a config that asks it to enforce something refuses to start.
"""
from gateway.layers import ShellLayer


class AuthMiddleware(ShellLayer):
    """authentication (virtual keys, customers) — pass-through shell; enforces nothing yet."""

    concern = "auth"


__all__ = ["AuthMiddleware"]
