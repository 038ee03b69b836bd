"""Sluicegate's built-in layers, one package per concern. Each is a pure ASGI middleware."""
