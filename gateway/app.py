"""Building the gateway: kernel over the operator's layers over the passthrough."""
from __future__ import annotations

import os

from gateway.config import ConfigError, GatewayConfig, load_config
from gateway.kernel import ASGIApp, Kernel
from gateway.passthrough import Passthrough


def build_stack(config: GatewayConfig) -> ASGIApp:
    """Wraps the passthrough in the configured layers; the first listed is the outermost."""
    app: ASGIApp = Passthrough(providers=config.providers, models=config.models)
    for item in reversed(config.middleware):
        cls, args, kwargs = item
        try:
            app = cls(app, *args, **kwargs)
        except (TypeError, ValueError, ConfigError) as exc:
            raise ConfigError(
                f"{config.path}: layer {getattr(cls, '__name__', cls)!s} has wrong options: {exc}"
            ) from None
        except Exception as exc:  # noqa: BLE001 (any failure here is a config problem)
            raise ConfigError(f"{config.path}: layer {getattr(cls, '__name__', cls)!s} failed "
                              f"to build: {type(exc).__name__}: {exc}") from None
    return app


def create_app(config: GatewayConfig | str | os.PathLike[str]) -> Kernel:
    """The gateway as an ASGI app, from a loaded config or the path of a config module.

    Standalone: `sluicegate serve --config PATH`. Mounted: `Mount("/llm", create_app(PATH))`
    and, in the host's lifespan, `async with gateway.lifespan(): ...` (without that, the
    gateway starts itself on its first request).
    """
    if not isinstance(config, GatewayConfig):
        config = load_config(config)
    return Kernel(build_stack(config), config=config)
