"""Building the gateway: kernel over the operator's layers over the passthrough."""
from __future__ import annotations

import gc
import os

from gateway.config import ConfigError, GatewayConfig, load_config
from gateway.kernel import ASGIApp, Kernel, stack_components
from gateway.passthrough import Passthrough


def build_stack(config: GatewayConfig) -> ASGIApp:
    """Wraps the passthrough in the configured layers; the first listed is the outermost."""
    check_order(config)
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


# How many worker processes `sluicegate serve` runs (set for them: a reload checks it too).
WORKERS_ENV = "SLUICEGATE_WORKERS"


def check_workers(app: ASGIApp, workers: int) -> None:
    """Refuses several worker processes (ConfigError) when a layer keeps state the workers
    cannot share (its `check_workers(workers)` says so: the quota layer on its in-process
    store, whose limits each worker would hold on its own)."""
    if workers > 1:
        for layer in stack_components(app):
            check = getattr(layer, "check_workers", None)
            if callable(check):
                check(workers)


def check_order(config: GatewayConfig) -> None:
    """Refuses a stack where a layer that acts per caller before calling the layers under
    it (`acts_per_caller = True`: quota, cache) sits above the layer that says who the
    caller is (`identifies_caller = True`: auth). Above it, the quota layer would admit and
    the cache answer every caller as one anonymous caller, before the key is even checked:
    a cached answer would reach a caller without a key, and no key's limit would hold."""
    acting: list[str] = []
    for item in config.middleware:
        cls, _args, _kwargs = item
        name = getattr(cls, "__name__", str(cls))
        if getattr(cls, "identifies_caller", False) is True and acting:
            raise ConfigError(
                f"{config.path}: {', '.join(acting)} {'is' if len(acting) == 1 else 'are'} "
                f"above {name}, so {'it' if len(acting) == 1 else 'they'} would act before "
                f"the caller is known (every caller as one, without a key); list {name} "
                "first.")
        if getattr(cls, "acts_per_caller", False) is True:
            acting.append(name)


def create_app(config: GatewayConfig | str | os.PathLike[str]) -> Kernel:
    """The gateway as an ASGI app, from a loaded config or the path of a config module.

    Standalone: `sluicegate serve --config PATH`. Mounted: `Mount("/llm", create_app(PATH))`
    and, in the host's lifespan, `async with gateway.lifespan(): ...` (without that, the
    gateway starts itself on its first request).
    """
    if not isinstance(config, GatewayConfig):
        config = load_config(config)
    return Kernel(build_stack(config), config=config)


def tune_gc() -> None:
    """For a serving process, once its app is built: the objects made at startup (modules,
    config, tables) move out of the collector's sight, and young collections run ten times
    less often. Requests allocate many short-lived objects that die by reference counting;
    scanning for cycles on every 700 allocations cost about a tenth of a request's CPU."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 20, 20)
