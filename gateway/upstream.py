"""What the kernel knows of providers: the deployment records and the adapter protocol.

Adapters live in `providers/` and reach the gateway through the operator's config module;
the gateway never imports them.
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any, Protocol

Message = MutableMapping[str, Any]
Send = Callable[[Message], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Deployment:
    """One way to serve a public model: a provider, its model id there, and a weight."""

    provider: str
    model: str
    weight: float = 1.0
    tags: tuple[str, ...] = ()
    # What a call costs (gateway.pricing): an explicit Price, or None to look the model up in
    # the shipped price table; `free=True` for self-hosted or mock models.
    price: Any = None
    free: bool = False

    @property
    def name(self) -> str:
        return f"{self.provider}/{self.model}"


@dataclass(frozen=True, slots=True)
class Model:
    """A public model name's deployments (tried in order when no failover layer picks)."""

    deployments: tuple[Deployment, ...]
    description: str = ""
    owned_by: str = "sluicegate"
    extra: dict[str, Any] = field(default_factory=dict)

    def __init__(
        self,
        deployments: list[Deployment] | tuple[Deployment, ...],
        *,
        description: str = "",
        owned_by: str = "sluicegate",
        extra: dict[str, Any] | None = None,
    ) -> None:
        object.__setattr__(self, "deployments", tuple(deployments))
        object.__setattr__(self, "description", description)
        object.__setattr__(self, "owned_by", owned_by)
        object.__setattr__(self, "extra", dict(extra or {}))


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Upstream timeouts in seconds: connect, first byte, idle gap between chunks, total."""

    connect_s: float = 10.0
    first_byte_s: float = 120.0
    idle_s: float = 120.0
    total_s: float = 900.0


class ProviderAdapter(Protocol):
    """The contract every provider family implements (see providers/base.py)."""

    type_name: str
    base_url: str
    api_key_env: str | None

    def resolve(self, name: str) -> None:
        """Reads secrets from the environment; raises ConfigError naming what is missing."""

    def supports(self, operation: str) -> bool:
        """Whether this provider can serve an ingress operation (e.g. "openai.embeddings")."""

    async def startup(self) -> None: ...

    async def shutdown(self) -> None: ...

    async def call(self, ctx: Any, deployment: Deployment, send: Send) -> None:
        """Serves one request: raises UpstreamError before the response starts, or sends it."""
