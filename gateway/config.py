"""Loading the operator's config module: providers, models, the middleware list, settings.

The config module is a plain Python file. It defines `providers` (name -> adapter made with
`providers.Provider(...)`), `models` (public name -> `Model` or a list of `Deployment`),
`middleware` (a list of `Middleware(cls, **options)`, top = outermost) and optionally
`settings = Settings(...)`. Every problem becomes one `ConfigError` sentence naming the file.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import sys
import traceback
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, TypeGuard

from starlette.middleware import Middleware

from gateway.pricing import Price, resolve_price
from gateway.tokenizers import (
    HuggingFaceTokenizer,
    LoadedTokenizer,
    TiktokenFile,
    TokenizerError,
    automatic_tokenizer,
    load_tokenizer,
)
from gateway.upstream import Deployment, Model, ProviderAdapter, ProviderKey, Timeouts

__all__ = [
    "ConfigError", "Deployment", "GatewayConfig", "HuggingFaceTokenizer", "Middleware", "Model",
    "Price", "ProviderKey", "Settings", "TiktokenFile", "Timeouts", "env_name",
    "env_name_shown", "is_header_name", "is_postgres_dsn", "load_config",
]


class ConfigError(Exception):
    """A configuration problem, stated as one sentence for the operator."""


# What can be an environment variable's name: letters, digits and _, not a digit first.
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
# The conventional form (POSIX: upper case), the only one an error shows: a secret of
# letters and digits alone has the form above too.
_CONVENTIONAL_ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]{0,127}")


# RFC 9110 5.1: a field name is a token.
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def is_header_name(value: object) -> TypeGuard[str]:
    """Whether `value` is a string an HTTP header can be named by (a layer's or a provider's
    option)."""
    return isinstance(value, str) and _HEADER_NAME.fullmatch(value) is not None


def is_postgres_dsn(value: str) -> bool:
    """Whether a layer's store option given as a string is a PostgreSQL DSN (a URL, or libpq's
    key=value form), which the layer then opens its store on."""
    return value.startswith(("postgresql://", "postgres://", "host="))


def env_name(value: object, setting: str) -> str:
    """`value`, given as `setting` (an environment variable's name), if it can be one; else
    a ConfigError that names `setting` but never quotes the value: the slip
    `api_key_env=os.environ["OPENAI_API_KEY"]` gives the secret itself."""
    if not isinstance(value, str) or not _ENV_NAME.fullmatch(value):
        raise ConfigError(f"{setting} must be the name of an environment variable (letters, "
                          "digits and _); what it holds is not one, and is not shown: it may "
                          "be the secret itself.")
    return value


def env_name_shown(name: str) -> bool:
    """Whether a message may show `name`, an environment variable's name from the config or
    the command line: only in the conventional form, and never when it is the value of a
    set variable (a secret given where its variable's name belongs)."""
    return bool(_CONVENTIONAL_ENV_NAME.fullmatch(name)) and name not in os.environ.values()


@dataclass(frozen=True, slots=True)
class Settings:
    """Kernel settings; every field has a safe default."""

    max_body_bytes: int = 16 * 1024 * 1024
    # A request's body must have arrived whole this long after the request started (its
    # headers read), or it is answered 408 and its connection closed: a client that stops
    # sending, or sends a byte now and then, holds a connection that long at most. A total,
    # not a time between chunks, which such a client would never exceed. None: no deadline.
    body_timeout_s: float | None = 30.0
    request_id_header: str = "x-request-id"
    log_level: str = "info"
    log_format: str = "json"  # one JSON object per line with request and trace ids, or "text"
    demo: bool = False  # marks a config that serves mock upstreams; shown by /v1/models
    # Every deployment must have a price (the shipped table, `price=` or `free=True`), so
    # budgets and the bill are never silently zero. False only for configs that bill nothing.
    require_prices: bool = True
    # `Server-Timing: gateway;dur=<ms>` on every API response: the time from the request
    # being read to its response head (what a cache hit costs server-side, without the
    # client's queueing). Off by default: one more header on every response.
    server_timing: bool = False
    # Prometheus metrics of every request at this path (None: not recorded, not served).
    metrics_path: str | None = "/metrics"
    # The environment variable holding a token the metrics path then asks for
    # (`Authorization: Bearer <token>`); None: served to anyone who can reach it.
    metrics_token_env: str | None = None
    # An OpenTelemetry TracerProvider to trace with (a host app's, a test's); without one,
    # tracing follows the OTEL_* environment variables (gateway/tracing.py).
    tracer_provider: Any = None
    # An OpenTelemetry MeterProvider to export the /metrics numbers to (a host app's, a
    # test's); without one, OTEL_METRICS_EXPORTER=otlp or an OTLP endpoint makes one.
    meter_provider: Any = None


@dataclass(slots=True)
class GatewayConfig:
    """A loaded, validated config module."""

    path: str
    providers: dict[str, ProviderAdapter]
    models: dict[str, Model]
    middleware: list[Middleware] = field(default_factory=list)
    settings: Settings = field(default_factory=Settings)


def load_config(path: str | os.PathLike[str]) -> GatewayConfig:
    """Executes the config module at `path` and validates what it declares."""
    path = str(path)
    module = _execute(path)
    try:
        config = GatewayConfig(
            path=path,
            providers=_providers(module),
            models=_models(module),
            middleware=_middleware(module),
            settings=_settings(module),
        )
        _check_references(config)
        _resolve_keys(config)
        _resolve_prices(config)
        _resolve_tokenizers(config, _tokenizers(module))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return config


def _execute(path: str) -> Any:
    if not Path(path).is_file():
        raise ConfigError(f"{path}: no such config file.")
    name = "sluicegate_config_" + str(abs(hash(os.path.abspath(path))))
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"{path}: not a Python module.")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # lets spawned hypercorn workers and pickling find classes
    try:
        spec.loader.exec_module(module)
    except ConfigError as exc:
        raise ConfigError(f"{path}{_config_line(exc, path)}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 (the operator's module may raise anything)
        line = _config_line(exc, path)
        raise ConfigError(f"{path}{line}: {type(exc).__name__}: "
                          f"{_without_secrets(str(exc))}") from None
    return module


# Environment variables whose values are secrets by their names' look.
_SECRET_NAME = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIALS?|DSN)$", re.IGNORECASE)


def _without_secrets(text: str) -> str:
    """An exception of the operator's module as its error may print it (check-config, serve
    and a reload's log): it may quote anything the module read ("bad key " + os.environ[...]),
    and the config's secrets are not known, as it did not load. So the values of environment
    variables named like secrets (…_KEY, …_TOKEN, …_SECRET, …_PASSWORD…) go, with what the
    log filter takes out of any line (URL userinfo, sk-sg-… keys, password=…)."""
    from gateway.doctor import Scrubber  # (imports this module)
    secrets = [value.strip() for name, value in os.environ.items()
               if _SECRET_NAME.search(name) and len(value.strip()) >= 8]
    return Scrubber(secrets).redact(text)


def _config_line(exc: BaseException, path: str) -> str:
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == path]
    return f", line {frames[-1].lineno}" if frames else ""


def _providers(module: Any) -> dict[str, ProviderAdapter]:
    providers = getattr(module, "providers", None)
    if not isinstance(providers, dict) or not providers:
        raise ConfigError("it must define `providers`, a non-empty dict of name -> Provider(...).")
    for name, adapter in providers.items():
        if not isinstance(name, str) or not name:
            raise ConfigError(f"provider name {name!r} must be a non-empty string.")
        if not callable(getattr(adapter, "call", None)) or not hasattr(adapter, "resolve"):
            raise ConfigError(f"provider {name!r} is not a Provider(...) from the providers package.")
        adapter.resolve(name)
    return dict(providers)


def _models(module: Any) -> dict[str, Model]:
    declared = getattr(module, "models", None)
    if not isinstance(declared, dict) or not declared:
        raise ConfigError("it must define `models`, a non-empty dict of public name -> Model(...).")
    models: dict[str, Model] = {}
    for name, value in declared.items():
        if not isinstance(name, str) or not name:  # (1 and "1" were one model, the last won)
            raise ConfigError(f"model name {name!r} must be a non-empty string.")
        if isinstance(value, (list, tuple)):
            value = Model(list(value))
        if not isinstance(value, Model):
            raise ConfigError(f"model {name!r} must be a Model(...) or a list of Deployment(...).")
        if not value.deployments:
            raise ConfigError(f"model {name!r} has no deployments.")
        for deployment in value.deployments:
            if not isinstance(deployment, Deployment):
                raise ConfigError(f"model {name!r} lists {deployment!r}, not a Deployment(...).")
        models[name] = value
    return models


def _tokenizers(module: Any) -> dict[str, Any]:
    table = getattr(module, "tokenizers", {})
    if not isinstance(table, dict) or not all(isinstance(glob, str) and glob for glob in table):
        raise ConfigError("`tokenizers` must be a dict of model name or glob -> "
                          "TiktokenFile(...), HuggingFaceTokenizer(...), an object with "
                          "encode(text), or None.")
    return table


def _middleware(module: Any) -> list[Middleware]:
    stack = getattr(module, "middleware", [])
    if not isinstance(stack, (list, tuple)):
        raise ConfigError("`middleware` must be a list of Middleware(cls, **options).")
    for item in stack:
        if not isinstance(item, Middleware):
            raise ConfigError(f"`middleware` holds {item!r}, not a Middleware(cls, **options).")
    return list(stack)


_HEADER_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")  # (RFC 9110 token)
_LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def _settings(module: Any) -> Settings:
    settings = getattr(module, "settings", Settings())
    if not isinstance(settings, Settings):
        raise ConfigError("`settings` must be a Settings(...).")
    if type(settings.max_body_bytes) is not int or settings.max_body_bytes <= 0:
        raise ConfigError("Settings.max_body_bytes must be a positive number of bytes.")
    timeout_s = settings.body_timeout_s
    if timeout_s is not None and (isinstance(timeout_s, bool) or
                                  not isinstance(timeout_s, (int, float)) or
                                  not 0 < timeout_s < float("inf")):
        raise ConfigError("Settings.body_timeout_s must be a positive number of seconds, "
                          "or None.")
    if settings.log_format not in ("json", "text"):
        raise ConfigError("Settings.log_format must be 'json' or 'text'.")
    if str(settings.log_level).lower() not in _LOG_LEVELS:
        raise ConfigError(f"Settings.log_level must be one of {', '.join(_LOG_LEVELS)}.")
    if settings.metrics_path is not None and (
            not isinstance(settings.metrics_path, str) or
            not settings.metrics_path.startswith("/") or
            settings.metrics_path.rstrip("/") in ("", "/healthz", "/readyz", "/v1", "/admin")
            or settings.metrics_path.startswith(("/v1/", "/admin/"))):
        raise ConfigError("Settings.metrics_path must be a path such as '/metrics' (not /, "
                          "/healthz, /readyz, nor under /v1/ or /admin/), or None.")
    if settings.metrics_token_env is not None:
        name = env_name(settings.metrics_token_env, "Settings.metrics_token_env")
        shown = f"Settings.metrics_token_env={name!r}" if env_name_shown(name) else \
            "Settings.metrics_token_env"
        token = os.environ.get(name, "").strip()
        if not token:
            raise ConfigError(f"{shown} names an environment variable that is not set.")
        if token.startswith("sk-sg-"):
            raise ConfigError(f"{shown} holds a virtual key: the metrics token must be a "
                              "secret of its own.")
    if not isinstance(settings.request_id_header, str) or \
            not _HEADER_NAME.fullmatch(settings.request_id_header):
        raise ConfigError("Settings.request_id_header must be a header name (letters, digits "
                          "and - _ . ! # $ % & ' * + ^ ` | ~).")
    return settings


def _check_references(config: GatewayConfig) -> None:
    for name, model in config.models.items():
        names = [deployment.name for deployment in model.deployments]
        if len(set(names)) < len(names):
            raise ConfigError(f"model {name!r} has two deployments named the same "
                              f"({', '.join(names)}); give them distinct `label`s.")
        for deployment in model.deployments:
            if deployment.weight < 0 or any(
                    value is not None and (not isinstance(value, int) or value < 1)
                    for value in (deployment.rpm, deployment.tpm)):
                raise ConfigError(f"model {name!r}: {deployment.name} needs weight >= 0 and "
                                  "rpm/tpm that are positive integers or None.")
            if deployment.provider not in config.providers:
                known = ", ".join(sorted(config.providers))
                raise ConfigError(
                    f"model {name!r} uses provider {deployment.provider!r}, which is not in "
                    f"`providers` (known: {known})."
                )


def _resolve_keys(config: GatewayConfig) -> None:
    """Reads each deployment's provider keys from the environment (names only in errors)."""
    for name, model in list(config.models.items()):
        resolved = []
        for deployment in model.deployments:
            envs = deployment.api_key_envs
            if isinstance(envs, str):  # one name given as a plain string
                envs = (envs,)
            if not isinstance(envs, (tuple, list)) or \
                    not all(isinstance(env, str) and env for env in envs):
                raise ConfigError(f"model {name!r}: api_key_envs of {deployment.name} must be a "
                                  "tuple of environment variable names.")
            for env in envs:
                env_name(env, f"model {name!r}: api_key_envs of {deployment.name}")
            missing = [env for env in envs if not os.environ.get(env)]
            if missing:
                shown = [env for env in missing if env_name_shown(env)]
                hidden = len(missing) - len(shown)
                named = ", ".join(shown + ([f"{hidden} named in api_key_envs but not shown"]
                                           if hidden else []))
                raise ConfigError(f"model {name!r}: {deployment.name} needs the environment "
                                  f"variable(s) {named}, which are not set.")
            keys = tuple(ProviderKey(env, os.environ[env].strip()) for env in dict.fromkeys(envs))
            # (its keys go where the provider's would; an operator's own adapter may not check)
            check = getattr(config.providers[deployment.provider], "check_url_credentials", None)
            if keys and check is not None:
                check(keyed=True)
            resolved.append(dataclasses.replace(deployment, keys=keys))
        config.models[name] = Model(resolved, description=model.description,
                                    owned_by=model.owned_by, extra=model.extra)


def _resolve_prices(config: GatewayConfig) -> None:
    """Gives every deployment its Price: explicit, free, or from the shipped price table."""
    for name, model in list(config.models.items()):
        resolved = []
        for deployment in model.deployments:
            if deployment.price is not None and not isinstance(deployment.price, Price):
                raise ConfigError(f"model {name!r}: the price of {deployment.name} must be a "
                                  "Price(...) from gateway.config.")
            provider_type = config.providers[deployment.provider].type_name
            price = resolve_price(provider_type, deployment.model, explicit=deployment.price,
                                  free=deployment.free)
            if price is None and config.settings.require_prices:
                raise ConfigError(
                    f"model {name!r}: no price is known for {deployment.name} "
                    f"({provider_type}); give the Deployment price=Price(input_per_mtok=..., "
                    "output_per_mtok=...) or free=True.")
            resolved.append(dataclasses.replace(deployment, price=price))
        config.models[name] = Model(resolved, description=model.description,
                                    owned_by=model.owned_by, extra=model.extra)


def _resolve_tokenizers(config: GatewayConfig, table: dict[str, Any]) -> None:
    """Gives every deployment its tokenizer (gateway/tokenizers.py), loaded here, once: the
    deployment's own, else the first `tokenizers` entry whose glob matches its model id or
    the public model name, else tiktoken's cached encoding for an OpenAI model id. One that
    cannot load refuses to start."""
    loaded: dict[int, LoadedTokenizer] = {}  # per spec: one table entry loads once
    logged: set[str] = set()  # the automatic encodings said (once each, at info level)
    for name, model in list(config.models.items()):
        resolved = []
        for deployment in model.deployments:
            try:
                tokenizer = _tokenizer(name, deployment, table, loaded, logged)
            except TokenizerError as exc:
                raise ConfigError(f"model {name!r}: the tokenizer of {deployment.name}: "
                                  f"{exc}") from None
            resolved.append(dataclasses.replace(deployment, tokenizer=tokenizer))
        config.models[name] = Model(resolved, description=model.description,
                                    owned_by=model.owned_by, extra=model.extra)


_UNLISTED = object()  # a deployment no `tokenizers` entry matches


def _tokenizer(name: str, deployment: Deployment, table: dict[str, Any],
               loaded: dict[int, LoadedTokenizer], logged: set[str]) -> LoadedTokenizer | None:
    spec = deployment.tokenizer
    if spec is None:
        spec = next((value for glob, value in table.items()
                     if fnmatchcase(deployment.model, glob) or fnmatchcase(name, glob)),
                    _UNLISTED)
        if spec is _UNLISTED:
            return automatic_tokenizer(deployment.model, logged)
        if spec is None:  # listed as None: the heuristic
            return None
    if id(spec) not in loaded:
        loaded[id(spec)] = load_tokenizer(spec)
    return loaded[id(spec)]
