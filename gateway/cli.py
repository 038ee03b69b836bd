"""The `sluicegate` command: `serve` and `check-config`."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from gateway.app import build_stack
from gateway.config import ConfigError, GatewayConfig, load_config


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sluicegate", description="The Sluicegate LLM gateway.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gateway under hypercorn")
    serve.add_argument("--config", required=True, help="path of the config module")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--workers", type=int, default=1)
    serve.add_argument("--access-log", action="store_true", help="log every request")
    check = commands.add_parser("check-config", help="load a config module and print it")
    check.add_argument("path")
    args = parser.parse_args(argv)
    try:
        if args.command == "check-config":
            return check_config(args.path)
        return serve_forever(args)
    except ConfigError as exc:
        print(f"sluicegate: {exc}", file=sys.stderr)
        return 2


def check_config(path: str) -> int:
    config = load_config(path)
    stack = build_stack(config)
    print(f"config: {path}")
    print("stack (outermost first):")
    print("  kernel (errors, request id, body, context, /healthz, /readyz, /v1/models)")
    for item in config.middleware:
        options = ", ".join(f"{k}=..." for k in item.kwargs)  # values may hold secrets (DSNs)
        print(f"  {getattr(item.cls, '__name__', item.cls)}({options})")
    print(f"  {type(_innermost(stack)).__name__} (innermost)")
    print("providers:")
    for name, adapter in config.providers.items():
        key = f", key from ${adapter.api_key_env}" if adapter.api_key_env else ", no key"
        print(f"  {name}: {adapter.type_name} at {adapter.base_url}{key}")
    print("models:")
    for name, model in config.models.items():
        print(f"  {name}:")
        for deployment in model.deployments:
            print(f"    -> {deployment.provider} / {deployment.model} (weight {deployment.weight:g})")
    return 0


def _innermost(app: object) -> object:
    inner: object = getattr(app, "app", None)
    while inner is not None:
        app, inner = inner, getattr(inner, "app", None)
    return app


def serve_forever(args: argparse.Namespace) -> int:
    from hypercorn.config import Config
    from hypercorn.run import run

    path = os.path.abspath(args.config)
    config: GatewayConfig = load_config(path)  # fail fast, in the parent, with one sentence
    build_stack(config)
    os.environ["SLUICEGATE_CONFIG"] = path
    logging.basicConfig(level=config.settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    hyper = Config()
    hyper.bind = [f"{args.host}:{args.port}"]
    hyper.worker_class = "uvloop"
    hyper.application_path = "gateway.asgi:app"
    # One worker runs in this process (no spawn); N > 1 spawns N processes sharing the socket.
    hyper.workers = 0 if args.workers <= 1 else args.workers
    hyper.keep_alive_timeout = 75
    hyper.include_server_header = False  # do not advertise the server software (OWASP)
    hyper.graceful_timeout = 30
    if args.access_log:
        hyper.accesslog = "-"
    return run(hyper)


if __name__ == "__main__":
    sys.exit(main())
