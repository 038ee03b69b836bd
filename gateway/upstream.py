"""What the kernel knows of providers: the deployment records and the adapter protocol.

Adapters live in `providers/` and reach the gateway through the operator's config module;
the gateway never imports them.
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from gateway.ingress import OPERATIONS_BY_PATH

Message = MutableMapping[str, Any]
Send = Callable[[Message], Awaitable[None]]

# Every ingress operation, with the path an error names it by ("openai.embeddings":
# "/v1/embeddings").
OPERATION_PATHS = {operation: path for path, operation in OPERATIONS_BY_PATH.items()
                   if path.startswith("/v1/")}


@dataclass(frozen=True, slots=True)
class ProviderKey:
    """One provider API key of a deployment: the environment variable it was read from (its
    public name in logs, headers and /admin/deployments) and the secret, never shown."""

    env: str
    secret: str = field(default="", repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class Deployment:
    """One way to serve a public model: a provider, its model id there, and a weight.

    `api_key_envs` names environment variables holding provider keys for this deployment
    (several keys multiply throughput; the failover layer spreads calls over them and takes a
    key that fails auth or billing out); empty means the provider's own `api_key_env`.
    `rpm`/`tpm` are the deployment's capacity per gateway process (a deployment whose capacity
    is used up is skipped by the failover layer). `label` names the deployment when two in a
    group share provider and model.
    """

    provider: str
    model: str
    weight: float = 1.0
    tags: tuple[str, ...] = ()
    # What a call costs (gateway.pricing): an explicit Price, or None to look the model up in
    # the shipped price table; `free=True` for self-hosted or mock models.
    price: Any = None
    free: bool = False
    api_key_envs: tuple[str, ...] = ()
    rpm: int | None = None
    tpm: int | None = None
    label: str = ""
    keys: tuple[ProviderKey, ...] = ()  # filled from `api_key_envs` when the config loads
    # How its input tokens are counted (gateway.tokenizers): a TiktokenFile, a
    # HuggingFaceTokenizer, an object with `encode(text)`, or None for the config's
    # `tokenizers` table, else tiktoken's cached encoding for OpenAI model ids, else the
    # heuristic. Loaded when the config loads: a gateway.tokenizers.LoadedTokenizer or None.
    tokenizer: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        from gateway.config import ConfigError
        for name in ("provider", "model"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ConfigError(f"Deployment {name} must be a non-empty string, not "
                                  f"{getattr(self, name)!r}.")
        where = f"Deployment({self.provider!r}, {self.model!r})"
        if isinstance(self.weight, bool) or not isinstance(self.weight, int | float) \
                or not 0 <= self.weight < float("inf"):
            raise ConfigError(f"{where}: weight must be a finite number >= 0, not "
                              f"{self.weight!r}.")
        for name in ("tags", "api_key_envs"):
            value = getattr(self, name)
            if isinstance(value, str) and value:  # one name given as a plain string (it was
                value = (value,)  # split into its characters, tags="prod" as p, r, o, d)
            if not isinstance(value, tuple | list) or \
                    not all(isinstance(item, str) and item for item in value):
                raise ConfigError(f"{where}: {name} must be a tuple of strings such as "
                                  f"('eu',), not {_not_names(value)}.")
            object.__setattr__(self, name, tuple(value))
        if not isinstance(self.free, bool):
            raise ConfigError(f"{where}: free must be True or False, not {self.free!r}.")
        if not isinstance(self.label, str):
            raise ConfigError(f"{where}: label must be a string, not {self.label!r}.")

    @property
    def name(self) -> str:
        return self.label or f"{self.provider}/{self.model}"


def _not_names(value: object) -> str:
    """What a value that is not a tuple of non-empty strings is, told by its type alone:
    `api_key_envs=[os.environ.get("OPENAI_API_KEY")]` gives the keys themselves."""
    if not isinstance(value, tuple | list):
        return _a_type(value)
    wrong = next(item for item in value if not (isinstance(item, str) and item))
    return f"{_a_type(value)} holding " + ("an empty string" if wrong == "" else _a_type(wrong))


def _a_type(value: object) -> str:
    name = type(value).__name__
    return "None" if value is None else f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


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

    def __post_init__(self) -> None:
        for name in ("connect_s", "first_byte_s", "idle_s", "total_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) \
                    or not 0 < value < float("inf"):
                from gateway.config import ConfigError
                raise ConfigError(f"Timeouts.{name} must be a positive number of seconds, "
                                  f"not {value!r}.")


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


def serving_deployments(model: Model, providers: Mapping[str, ProviderAdapter],
                        operation: str) -> tuple[Deployment, ...]:
    """The deployments of `model` whose provider can serve `operation`, in declared order
    (asked once per model and operation when the gateway is built, never per request)."""
    return tuple(deployment for deployment in model.deployments
                 if providers[deployment.provider].supports(operation))
