"""Where the calls of a downgraded request go when a layer above the quota layer routed it.

A failover layer listed above the quota layer picks a deployment of the model the caller
asked for before each attempt it makes (the first, a retry, a broken stream's continuation),
and the quota layer sees every attempt. Once the quota layer has sent the request to a
cheaper model, each of those attempts goes to the cheaper model too: the request is priced,
reserved, billed and announced (`x-sluicegate-downgraded`) as the cheaper model's. The quota
layer does not see why an attempt failed, only that another one comes, so it takes the
cheaper model's deployments in turn, its first again after its last: how many attempts there
are stays the failover layer's decision, and when they are spent the caller gets the last
one's error, never an answer of the model the limit had no room for.

The failover layer names the deployment it picked in `x-sluicegate-deployment`; the quota
layer puts the one it sent the call to in its place, so the header names the deployment
that answered, as it does without a downgrade.
"""
from __future__ import annotations

from dataclasses import dataclass

from gateway.context import RequestContext, route_to
from gateway.upstream import Deployment

__all__ = ["Downgrade"]

DEPLOYMENT_HEADER = b"x-sluicegate-deployment"


@dataclass(slots=True)
class Downgrade:
    """A request the quota layer sent to `model` after a layer above had routed it."""

    model: str
    deployments: tuple[Deployment, ...]  # the model's, that serve the request's operation
    calls: int = 0

    def route(self, ctx: RequestContext) -> None:
        """Sends the next call below to the next of the cheaper model's deployments."""
        route_to(ctx, self.model)
        deployment = ctx.deployment = self.deployments[self.calls % len(self.deployments)]
        self.calls += 1
        # (all of them: the failover layer adds its own for each attempt)
        headers = [h for h in ctx.response_headers if h[0] != DEPLOYMENT_HEADER]
        headers.append((DEPLOYMENT_HEADER, deployment.name.encode("latin-1", "replace")))
        ctx.response_headers[:] = headers
