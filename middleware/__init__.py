"""Sluicegate's built-in layers, one package per concern. Each is a pure ASGI middleware."""
# The kernel first: its import decides whether the compiled layers' extensions are used
# (gateway/compiled.py), which has to happen before one of them is imported from here.
import gateway as _gateway  # noqa: F401
