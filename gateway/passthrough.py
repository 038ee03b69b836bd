"""The innermost app: sends the request to the chosen deployment and streams the answer back.

It holds no policy. The deployment is the one the failover layer put in the context, or, when
no failover layer is configured, the model's first deployment whose provider serves the
request's operation. Translation and streaming are the provider adapter's job (providers/);
this app only dispatches and watches for disconnects.
"""
from __future__ import annotations

from gateway.context import find_request_context
from gateway.disconnect import run_until_disconnect
from gateway.errors import GatewayError
from gateway.kernel import Receive, Scope, Send, stop_after_failed_start
from gateway.upstream import (
    OPERATION_PATHS,
    Deployment,
    Model,
    ProviderAdapter,
    serving_deployments,
)


class Passthrough:
    """Dispatches each API request to its deployment's provider adapter."""

    # Sends a JSON answer as it records it in `ctx.sent_json` (see gateway/layers.py).
    passes_json_through = True

    def __init__(self, *, providers: dict[str, ProviderAdapter], models: dict[str, Model]) -> None:
        self.providers = providers
        self.models = models
        # Per operation and model, the deployment to call when no layer chose one: the first
        # whose provider serves the operation (with none, the first: it answers the 400).
        self.first_serving = {
            operation: {name: (serving_deployments(model, providers, operation)
                               or model.deployments)[0] for name, model in models.items()}
            for operation in OPERATION_PATHS}

    async def startup(self) -> None:
        try:
            for adapter in self.providers.values():
                await adapter.startup()
        except BaseException:  # (the sessions opened are closed again)
            await stop_after_failed_start(self)
            raise

    async def shutdown(self) -> None:
        for adapter in reversed(list(self.providers.values())):
            await adapter.shutdown()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ctx = find_request_context(scope)
        if scope["type"] != "http" or ctx is None:
            return  # not an API request (e.g. /admin/ no layer answered): the kernel says 404
        if ctx.body_parser is not None:  # (a `loads_body` layer that did not: never unparsed)
            ctx.parse_body()
        deployment: Deployment = ctx.deployment or self.first_serving[ctx.operation][ctx.model]
        ctx.served_deployment = deployment
        adapter = self.providers[deployment.provider]
        if not adapter.supports(ctx.operation):
            raise GatewayError(
                400, f"Model '{ctx.model}' is served by a {adapter.type_name} deployment, which "
                     f"does not support {OPERATION_PATHS.get(ctx.operation, ctx.operation)}.",
                param="model", code="unsupported_operation",
            )
        await run_until_disconnect(adapter.call(ctx, deployment, send), receive, ctx)

