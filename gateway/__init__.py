"""Sluicegate's kernel: config loading, request context, errors, the app factory and the CLI."""
from gateway.compiled import use_sources_if_stale

use_sources_if_stale()  # (before any compiled module is imported: gateway/compiled.py)

from gateway.app import create_app
from gateway.config import ConfigError, Deployment, Middleware, Model, Settings, load_config
from gateway.context import RequestContext, Usage, request_context
from gateway.errors import ClientDisconnected, GatewayError, UpstreamError

__all__ = [
    "ClientDisconnected", "ConfigError", "Deployment", "GatewayError", "Middleware", "Model",
    "RequestContext", "Settings", "UpstreamError", "Usage", "create_app", "load_config",
    "request_context",
]
